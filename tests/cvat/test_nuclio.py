"""The nuclio detector of deploy/cvat/, called through nuclio-sdk's mock platform (which runs the module's
`init_context` once, as nuclio does), answers CVAT's documented detector format; its masks round-trip
through CVAT's server-side conversion (cropped flat array + inclusive box -> RLE + box) and cvat-sdk's
decoder; function.yaml's spec declares exactly the labels and attributes the handler is configured with."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from backend.cvat.function import parse_attributes
from backend.cvat.nuclio import spec_annotation, to_cvat_mask
from tests.cvat.conftest import frame

REPO = Path(__file__).resolve().parents[2]


def load_main():
    spec = importlib.util.spec_from_file_location("main", REPO / "deploy" / "cvat" / "main.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def yaml_env(doc: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in doc["spec"]["env"]}


@pytest.mark.parametrize("name", ["function.yaml", "function-gpu.yaml"])
def test_function_yaml_declares_what_the_handler_returns(name):
    doc = yaml.safe_load((REPO / "deploy" / "cvat" / name).read_text())
    ann = doc["metadata"]["annotations"]
    assert ann["type"] == "detector" and doc["spec"]["handler"] == "main:handler"
    env = yaml_env(doc)
    expected = spec_annotation(env["OSPREY_CVAT_LABELS"].split(","), parse_attributes(env["OSPREY_CVAT_ATTRIBUTES"]),
                               env["OSPREY_CVAT_DESCRIBE"] == "1")
    assert json.loads(ann["spec"]) == json.loads(expected)
    assert doc["spec"]["triggers"]["myHttpTrigger"]["attributes"]["maxRequestBodySize"] == 33554432
    if name == "function-gpu.yaml":
        assert doc["spec"]["resources"]["limits"]["nvidia.com/gpu"] == 1 and env["OSPREY_DEVICE"] == "cuda"


def cvat_server_mask(flat: list[int]) -> list[int]:
    """What CVAT's lambda manager does with a detector's `mask`: crop back from the flat array and the
    inclusive box, then store it as RLE + box (the format cvat-sdk's masks module reads)."""
    from cvat_sdk.masks import encode_mask

    *values, xtl, ytl, xbr, ybr = flat
    crop = np.array(values).reshape(ybr - ytl + 1, xbr - xtl + 1) > 0
    return encode_mask(np.pad(crop, ((ytl, 0), (xtl, 0))), bbox=[xtl, ytl, xbr + 1, ybr + 1])


def test_handler_through_nuclio_mock_platform(monkeypatch):
    from cvat_sdk.masks import decode_mask
    from nuclio_sdk import Event
    from nuclio_sdk.test.mock_platform import Platform

    from osprey_core.proposals import ClassicalProposer

    doc = yaml.safe_load((REPO / "deploy" / "cvat" / "function.yaml").read_text())
    for key, value in {**yaml_env(doc), "OSPREY_MODEL": "tiny", "OSPREY_MAX_NEW_TOKENS": "3"}.items():
        monkeypatch.setenv(key, value)
    spec = {lab["name"]: {a["name"]: a for a in lab["attributes"]} for lab in json.loads(doc["metadata"]["annotations"]["spec"])}
    main = load_main()
    platform = Platform()
    img = frame(5)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    response = platform.call_handler(main.handler, Event(body={"image": base64.b64encode(buf.getvalue()).decode()}))
    assert response.status_code == 200 and response.content_type == "application/json"
    objects = json.loads(response.body)
    truth = [p.region for p in ClassicalProposer().propose(img)]
    assert len(objects) == len(truth) == 3
    for obj in objects:
        assert obj["type"] == "mask" and obj["label"] in spec and 0 < float(obj["confidence"]) <= 1
        for a in obj["attributes"]:
            declared = spec[obj["label"]][a["name"]]
            assert declared["input_type"] == "text" or a["value"] in declared["values"]
        assert {a["name"] for a in obj["attributes"]} == set(spec[obj["label"]])
        assert len(obj["points"]) >= 6 and len(obj["points"]) % 2 == 0
        stored = cvat_server_mask(obj["mask"])
        mask = decode_mask(stored, image_width=96, image_height=96)
        assert any(np.array_equal(mask, r.mask) for r in truth)
    # A second call reuses the context init_context built (the model is loaded once per worker).
    again = platform.call_handler(main.handler, Event(body={"image": base64.b64encode(buf.getvalue()).decode(),
                                                             "threshold": 1.0}))
    assert json.loads(again.body) == []


def test_bad_request_is_a_400(monkeypatch):
    from nuclio_sdk import Event
    from nuclio_sdk.test.mock_platform import Platform

    from backend.cvat import nuclio

    monkeypatch.setattr(nuclio, "init_context", lambda context: None)
    platform = Platform()
    for body in ({}, {"image": "not base64 !"}, {"image": base64.b64encode(b"not an image").decode()}):
        response = platform.call_handler(nuclio.handler, Event(body=body))
        assert response.status_code == 400 and "bad request" in json.loads(response.body)["error"]


def test_to_cvat_mask_is_crop_flat_and_inclusive_box():
    m = np.zeros((10, 12), bool)
    m[2:5, 3:7] = True
    m[4, 3] = False
    flat = to_cvat_mask(m, (3, 2, 7, 5))
    assert flat[-4:] == [3, 2, 6, 4] and len(flat) == 3 * 4 + 4
    assert set(flat[:-4]) == {0, 255} and flat[8] == 0
