"""Interactive `keep` vs `suggest` through the real server and worker (tiny model): with
`extra_params: {"label_mode": "keep"}` at /setup, a region drawn as one label comes back with that label,
scored with the model's probability of it, and attributes/descriptions filled; `suggest` (the default)
returns the model's label. A bad label_mode is refused at /setup."""

from __future__ import annotations

import json

import pytest

from tests.backend.conftest import IMAGE_H, IMAGE_W

PROJECT = "77.1795681025"


def region(payloads, label: str) -> dict:
    item = payloads.brush("keepme01")
    item["value"]["brushlabels"] = [label]
    return item


def ask(stack, payloads, config: str, label: str) -> dict:
    body = payloads.predict([payloads.task(770)], config, {"result": [region(payloads, label)]})
    body["project"] = PROJECT
    response = stack.post("/predict", body)
    assert response.status_code == 200, response.text
    [prediction] = response.json()["results"]
    return prediction


def setup(stack, payloads, config: str, extra: dict | None) -> None:
    body = payloads.setup(config, json.dumps(extra) if extra is not None else None)
    body["project"] = PROJECT
    response = stack.post("/setup", body)
    assert response.status_code == 200, response.text


def test_keep_keeps_the_annotators_label_and_suggest_replaces_it(stack, payloads, configs):
    config = configs["brush_attributes"]
    setup(stack, payloads, config, None)
    suggested = ask(stack, payloads, config, "cat")
    category = next(i for i in suggested["result"] if i["from_name"] == "category")
    model_label, model_score = category["value"]["brushlabels"][0], category["score"]
    given = next(v for v in ("cat", "dog", "car", "tree", "person") if v != model_label)

    setup(stack, payloads, config, {"label_mode": "keep"})
    kept = ask(stack, payloads, config, given)
    items = {i["from_name"]: i for i in kept["result"]}
    assert items["category"]["value"]["brushlabels"] == [given]
    assert 0.0 < items["category"]["score"] < model_score  # the model prefers another label
    assert set(items) == {"category", "color", "size", "caption", "detailed_description"}
    # What the model would have picked, in the region's meta (shown in the region's details in Label Studio).
    meta = items["category"]["meta"]
    assert (meta["model_label"], meta["agrees"]) == (model_label, False)
    assert meta["model_score"] == pytest.approx(model_score)
    assert meta["text"] == [f"model: {model_label} ({model_score:.2f})"]
    assert all("meta" not in i for i in kept["result"] if i["from_name"] != "category")
    assert (items["category"]["original_width"], items["category"]["original_height"]) == (IMAGE_W, IMAGE_H)

    setup(stack, payloads, config, {})  # back to the default
    again = ask(stack, payloads, config, given)
    assert next(i for i in again["result"] if i["from_name"] == "category")["value"]["brushlabels"] == [model_label]
    assert all("meta" not in i for i in again["result"])  # suggest mode: nothing to report


def test_bad_label_mode_is_refused_at_setup(stack, payloads, configs):
    body = payloads.setup(configs["brush_attributes"], json.dumps({"label_mode": "replace"}))
    body["project"] = PROJECT
    response = stack.post("/setup", body)
    assert response.status_code == 422 and "label_mode" in response.text
    body["extra_params"] = json.dumps({"autolabel": {"max_regions": 0}})
    response = stack.post("/setup", body)
    assert response.status_code == 422 and "max_regions" in response.text
