"""Hostile inputs of issue 6 (defects 3, 6 and 9): each must be a 4xx-class error of the project's own (or,
for special tokens, a normal answer), with bounded memory.

First against the parser and the service layer (tracemalloc peaks), then the same inputs against the real
server subprocess with the real Redis and a real worker (conftest `stack`), each followed by a good request
that still succeeds, with the peak RSS of server and worker checked against a generous bound.
"""

from __future__ import annotations

import json
import tracemalloc

import httpx
import numpy as np
import pytest

from backend.errors import is_input_error
from backend.labelstudio.config import (
    MAX_EXTRA_PARAMS_DEPTH,
    MAX_TAXONOMY_DEPTH,
    LabelConfigError,
    parse_extra_params,
    parse_label_config,
)
from backend.labelstudio.regions import MAX_URL_CHARS, TaskDataError, parse_context, task_image_url
from backend.labelstudio.results import result_items
from backend.service import labels as scoring
from backend.service.geometry import MAX_RLE_VALUES, rasterise
from backend.service.predict import predict_regions
from backend.service.tasks import Category, Plan, RegionSpec
from osprey_core import load_engine
from osprey_core.errors import RegionError

W, H = 64, 48
HUGE = 16384


@pytest.fixture(scope="module")
def engine():
    return load_engine("tiny", device="cpu")


@pytest.fixture(scope="module")
def image():
    img = np.zeros((H, W, 3), dtype=np.uint8)
    img[8:30, 10:40] = (200, 40, 40)
    return img


def rect_config(labels: list[str]) -> str:
    inner = "".join(f'<Label value="{v}"/>' for v in labels)
    return f'<View><Image name="image" value="$image"/><RectangleLabels name="box" toName="image">{inner}</RectangleLabels></View>'


def rectangles(n: int, width: int, height: int) -> dict:
    return {"result": [
        {"id": f"r{i}", "from_name": "box", "to_name": "image", "type": "rectanglelabels", "original_width": width,
         "original_height": height, "value": {"x": 1 + i, "y": 2, "width": 50, "height": 40, "rotation": 0,
                                               "rectanglelabels": ["cat"]}}
        for i in range(n)]}


def traced(call):
    """(result or exception, peak bytes Python allocated during `call`)."""
    tracemalloc.start()
    try:
        try:
            out = call()
        except Exception as exc:  # noqa: BLE001 - returned for the test to inspect
            out = exc
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# ---- defect 3: memory amplification ------------------------------------------------------------------


def test_claimed_huge_image_is_parsed_without_a_raster_and_refused_before_rasterising(engine, image):
    plan = parse_label_config(rect_config(["cat", "dog"]))
    specs, peak = traced(lambda: parse_context(rectangles(12, HUGE, HUGE), plan))
    assert len(specs) == 12 and all(s.size == (HUGE, HUGE) for s in specs)
    assert peak < 2 * 1024 * 1024  # one 16384x16384 bool mask alone is 268 MB
    error, peak = traced(lambda: predict_regions(engine, image, plan.to_plan(), specs))
    assert isinstance(error, RegionError) and is_input_error(error)
    assert "drawn on a 16384x16384 image but the task's image is 64x48" in str(error)
    assert peak < 2 * 1024 * 1024


def test_brush_rle_claiming_a_gibibyte_is_checked_by_its_header_only(engine, image):
    plan = parse_label_config('<View><Image name="image" value="$image"/><BrushLabels name="b" toName="image">'
                              '<Label value="cat"/></BrushLabels></View>')
    # A valid header for 16384x16384x4 = 2^30 values, then 275 KB of runs: LS's decoder would allocate 1 GiB.
    rle = list((HUGE * HUGE * 4).to_bytes(4, "big")) + [0b00111000, 0, 0] + [7] * 275_000
    context = {"result": [{"id": "B", "from_name": "b", "to_name": "image", "type": "brushlabels",
                           "original_width": HUGE, "original_height": HUGE,
                           "value": {"format": "rle", "rle": rle, "brushlabels": ["cat"]}}]}
    specs, peak = traced(lambda: parse_context(context, plan))
    assert specs[0].kind == "brush_rle" and peak < 16 * 1024 * 1024
    error, peak = traced(lambda: predict_regions(engine, image, plan.to_plan(), specs))
    assert isinstance(error, RegionError) and "drawn on a 16384x16384 image" in str(error)
    assert peak < 16 * 1024 * 1024
    context["result"][0]["value"]["rle"] = rle[:7] + [1] * MAX_RLE_VALUES
    with pytest.raises(RegionError, match="above the limit"):
        parse_context(context, plan)


def test_large_label_sets_are_scored_in_chunks_that_merge_exactly(engine, image, monkeypatch):
    mask = np.zeros((H, W), dtype=bool)
    mask[8:30, 10:40] = True
    labels = [f"label {i} thing" for i in range(40)]
    whole = engine.classify(image, [mask, ~mask], labels)
    calls = []
    original = engine.classify

    def counted(img, regions, chunk):
        calls.append(len(chunk))
        return original(img, regions, chunk)

    monkeypatch.setattr(scoring, "CHUNK_LABELS", 7)
    monkeypatch.setattr(engine, "classify", counted)
    chunked = scoring.classify(engine, image, [mask, ~mask], labels)
    assert calls == [7, 7, 7, 7, 7, 5]
    for a, b in zip(whole, chunked, strict=True):
        assert b.label == a.label
        assert b.score == pytest.approx(a.score, rel=1e-6)
        assert sum(b.scores.values()) == pytest.approx(1.0)
        # A chunk is a shorter packed sequence, so fp32 sums run in another order: log-likelihoods of
        # magnitude ~10 then differ in the 6th-7th digit (measured 1.4e-6 relative on one CPU, 0 on another).
        for label in labels:
            assert b.scores[label] == pytest.approx(a.scores[label], rel=1e-5, abs=1e-12)


def test_label_set_limits_are_4xx_at_parse_and_in_the_service():
    scoring_limit = scoring.MAX_LABELS
    too_many = [f"l{i}" for i in range(scoring_limit + 1)]
    with pytest.raises(LabelConfigError, match=f"5001 labels; at most {scoring_limit}"):
        parse_label_config(rect_config(too_many))
    assert parse_label_config(rect_config(too_many[:scoring_limit])).tools[0].labels[-1] == f"l{scoring_limit - 1}"
    with pytest.raises(scoring.LabelSetError, match="above the limit"):
        scoring.check_label_set(too_many, "a category")
    with pytest.raises(LabelConfigError, match="characters; at most"):
        parse_label_config(rect_config(["x" * (scoring.MAX_LABEL_CHARS + 1)]))


# ---- defect 6: bad input that gave 5xx ---------------------------------------------------------------


SPECIAL = ["<image>", "<mask>", "<pos>", "<s>", "</s>", "<unk>"]


def test_special_tokens_in_labels_and_attribute_names_are_neutralised(engine, image):
    config = ('<View><Image name="image" value="$image"/><RectangleLabels name="box" toName="image">'
              + "".join(f'<Label value="{v}"/>' for v in ["&lt;image&gt;", "cat", "&lt;/s&gt;"])
              + '</RectangleLabels><Choices name="&lt;mask&gt; kind" toName="image" perRegion="true">'
              '<Choice value="&lt;pos&gt;"/><Choice value="&lt;unk&gt;"/><Choice value="&lt;s&gt;"/></Choices>'
              '<Taxonomy name="tax" toName="image" perRegion="true"><Choice value="&lt;image&gt;">'
              '<Choice value="&lt;mask&gt;&lt;pos&gt;"/><Choice value="b"/></Choice><Choice value="c"/></Taxonomy></View>')
    plan = parse_label_config(config)
    assert plan.tools[0].labels == ("<image>", "cat", "</s>")
    specs = parse_context(rectangles(1, W, H), plan)
    answers = predict_regions(engine, image, plan.to_plan(), specs)
    items = {i["from_name"]: i for i in result_items(answers, specs, plan.to_plan())}
    assert items["box"]["value"]["rectanglelabels"][0] in ("<image>", "cat", "</s>")  # what the user sees
    assert items["<mask> kind"]["value"]["choices"][0] in ("<pos>", "<unk>", "<s>")
    assert items["tax"]["value"]["taxonomy"][0][0] in ("<image>", "c")
    # The scores are those of the neutralised text, which the tokenizer reads as plain characters.
    mask = rasterise(specs[0], (W, H)).mask
    direct = engine.classify(image, [mask], ["< image>", "cat", "< /s>"])[0]
    assert items["box"]["score"] == pytest.approx(direct.score, rel=1e-6)
    texts = [scoring.model_text(t) for t in SPECIAL]
    assert all("<" + t.strip("<>/") + ">" not in x for t, x in zip(SPECIAL, texts, strict=True))
    # Distinct labels stay distinct even when one's neutral text is another label.
    mapped = scoring.model_texts(["<image>", "< image>", "cat"])
    assert len(set(mapped.values())) == 3 and mapped["cat"] == "cat" and mapped["< image>"] == "< image>"


def test_taxonomy_250_levels_deep_is_a_config_error_and_32_levels_work():
    def taxonomy(depth: int) -> str:
        inner = "".join(f'<Choice value="n{i}">' for i in range(depth)) + "</Choice>" * depth
        return (f'<View><Image name="image" value="$image"/><Rectangle name="r" toName="image"/>'
                f'<Taxonomy name="t" toName="image" perRegion="true">{inner}</Taxonomy></View>')

    with pytest.raises(LabelConfigError, match="levels deep"):
        parse_label_config(taxonomy(250))
    with pytest.raises(LabelConfigError, match=f"more than {MAX_TAXONOMY_DEPTH} levels deep"):
        parse_label_config(taxonomy(MAX_TAXONOMY_DEPTH + 1))
    plan = parse_label_config(taxonomy(MAX_TAXONOMY_DEPTH))
    neutral = plan.to_plan()
    assert Plan.from_dict(neutral.to_dict()) == neutral
    node, depth = neutral.taxonomies[0].roots[0], 1
    while node.children:
        node, depth = node.children[0], depth + 1
    assert depth == MAX_TAXONOMY_DEPTH


@pytest.mark.parametrize("shape", ["string", "object"])
def test_extra_params_nested_100000_deep_is_a_config_error(shape):
    if shape == "string":
        extra: object = "[" * 100_000 + "]" * 100_000
    else:
        extra = current = {}
        for _ in range(100_000):
            current["a"] = {}
            current = current["a"]
    with pytest.raises(LabelConfigError, match=f"deeper than {MAX_EXTRA_PARAMS_DEPTH} levels"):
        parse_extra_params(extra)
    assert parse_extra_params('{"a": {"b": "[[[[[["}}') == {"a": {"b": "[[[[[["}}
    assert parse_extra_params(None) == {} and parse_extra_params("") == {}
    with pytest.raises(LabelConfigError, match="not valid JSON"):
        parse_extra_params("{nope")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("/data/upload/1/a\tb.png", r"control character '\\t'"),
        ("/data/upload/1/a.png\r\nX-Injected: 1", r"control character '\\r'"),
        ("http://example.com/" + "a" * 1_000_000, "characters long, above the limit"),
        ("/data/local-files/?d=" + "a" * 10_000, "characters long|bytes long"),
        ("/data/local-files/?d=imgs/" + "b" * 300 + ".png", "file name in the local-files path is 304 bytes"),
        ("http://[::1/a.png", "malformed"),
    ],
)
def test_bad_image_urls_are_task_data_errors(url, message):
    plan = parse_label_config(rect_config(["cat"]))
    with pytest.raises(TaskDataError, match=message) as info:
        task_image_url({"id": 3, "data": {"image": url}}, plan)
    assert info.value.status_code == 422
    ok = "/data/local-files/?d=imgs/" + "c" * 200 + ".png"
    assert len(ok) < MAX_URL_CHARS and task_image_url({"id": 3, "data": {"image": ok}}, plan) == ok


# ---- defect 9: only the project's own errors are bad input -------------------------------------------


def test_a_bug_in_the_engine_is_not_disguised_as_bad_input(image):
    class Broken:
        def classify(self, *args):
            raise ValueError("a bug, not the user's input")

    plan = Plan(categories=(Category("box", ("cat", "dog")),))
    spec = RegionSpec("r", {"kind": "box", "x": 1, "y": 1, "width": 10, "height": 10, "rotation": 0}, W, H,
                      categories=("box",))
    with pytest.raises(ValueError, match="a bug") as info:
        predict_regions(Broken(), image, plan, [spec])
    assert not is_input_error(info.value)
    bad = RegionSpec("r", {"kind": "star"}, W, H)
    with pytest.raises(RegionError, match="unknown geometry kind 'star'") as info:
        predict_regions(Broken(), image, plan, [bad])
    assert is_input_error(info.value)


# ---- the same inputs against the real server, Redis and worker (conftest `stack`) ------------------


def peak_rss_mib(pid: int) -> float:
    """VmHWM: the process's peak resident set size so far."""
    with open(f"/proc/{pid}/status") as status:
        line = next(x for x in status if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


@pytest.fixture(scope="module")
def served(stack):
    """The stack, with peak RSS of its server and worker checked after every hostile request of this module:
    each may grow by at most a generous 768 MiB over its peak before the first (the defects cost GBs)."""
    pids = {"server": stack.server.pid, "worker": stack.workers[0].pid}
    before = {name: peak_rss_mib(pid) for name, pid in pids.items()}
    yield stack
    after = {name: peak_rss_mib(pid) for name, pid in pids.items()}
    for name in pids:
        assert after[name] < before[name] + 768, f"{name} peak RSS {before[name]:.0f} -> {after[name]:.0f} MiB"


def good_request(stack, payloads) -> None:
    """A normal interactive request that must still succeed after each hostile one."""
    config = rect_config(["cat", "dog", "car"])
    context = {"result": [payloads.item("rectanglelabels", "box", {"x": 10, "y": 10, "width": 40, "height": 40,
                                                                    "rotation": 0, "rectanglelabels": ["cat"]}, "ok1")]}
    response = stack.post("/predict", payloads.predict([payloads.task()], config, context))
    assert response.status_code == 200, response.text
    (prediction,) = response.json()["results"]
    assert prediction["result"][0]["value"]["rectanglelabels"][0] in ("cat", "dog", "car")


def interactive(stack, payloads, config: str, items: list[dict], image: str | None = None) -> httpx.Response:
    return stack.post("/predict", payloads.predict([payloads.task(image=image)], config, {"result": items}))


def test_server_special_token_labels_answer_normally(served, payloads):
    config = rect_config(["&lt;image&gt;", "&lt;mask&gt;", "&lt;/s&gt;", "cat"])
    items = [payloads.item("rectanglelabels", "box", {"x": 10, "y": 10, "width": 40, "height": 40, "rotation": 0,
                                                      "rectanglelabels": ["cat"]}, "t1")]
    response = interactive(served, payloads, config, items)
    assert response.status_code == 200, response.text
    (item,) = response.json()["results"][0]["result"]
    assert item["value"]["rectanglelabels"][0] in ("<image>", "<mask>", "</s>", "cat")
    good_request(served, payloads)


def test_server_claimed_huge_image_is_a_422_from_the_worker(served, payloads):
    items = [{**item, "original_width": HUGE, "original_height": HUGE}
             for item in rectangles(12, HUGE, HUGE)["result"]]
    response = interactive(served, payloads, rect_config(["cat", "dog"]), items)
    assert response.status_code == 422, response.text
    assert "drawn on a 16384x16384 image but the task's image is 64x48" in response.json()["detail"]
    good_request(served, payloads)


def test_server_brush_rle_claiming_a_gibibyte_is_a_422(served, payloads):
    config = ('<View><Image name="image" value="$image"/><BrushLabels name="b" toName="image">'
              '<Label value="cat"/></BrushLabels></View>')
    rle = list((HUGE * HUGE * 4).to_bytes(4, "big")) + [0b00111000, 0, 0] + [7] * 275_000
    item = {**payloads.item("brushlabels", "b", {"format": "rle", "rle": rle, "brushlabels": ["cat"]}, "B1"),
            "original_width": HUGE, "original_height": HUGE}
    response = interactive(served, payloads, config, [item])
    assert response.status_code == 422, response.text
    assert "drawn on a 16384x16384 image" in response.json()["detail"]
    good_request(served, payloads)


def test_server_large_label_sets_are_answered_and_too_large_ones_refused(served, payloads):
    # Above one chunk (the unchunked 3,000 failed allocating 300 MB); 600 keeps the tiny model on 2 shared
    # cores inside OSPREY_INTERACTIVE_TIMEOUT_S. The 5,000 limit itself is exercised in-process above.
    labels = [f"label {i} thing" for i in range(600)]
    items = [payloads.item("rectanglelabels", "box", {"x": 10, "y": 10, "width": 40, "height": 40, "rotation": 0,
                                                      "rectanglelabels": ["x"]}, "L1")]
    response = interactive(served, payloads, rect_config(labels), items)
    assert response.status_code == 200, response.text
    assert response.json()["results"][0]["result"][0]["value"]["rectanglelabels"][0] in labels
    too_many = rect_config([f"l{i}" for i in range(scoring.MAX_LABELS + 1)])
    response = interactive(served, payloads, too_many, items)
    assert response.status_code == 422 and "at most 5000" in response.json()["detail"]
    response = served.post("/setup", payloads.setup(too_many))
    assert response.status_code == 422 and "at most 5000" in response.json()["detail"]
    good_request(served, payloads)


def test_server_deep_taxonomy_and_extra_params_are_422(served, payloads):
    inner = "".join(f'<Choice value="n{i}">' for i in range(250)) + "</Choice>" * 250
    deep = (f'<View><Image name="image" value="$image"/><Rectangle name="r" toName="image"/>'
            f'<Taxonomy name="t" toName="image" perRegion="true">{inner}</Taxonomy></View>')
    response = served.post("/setup", payloads.setup(deep))
    assert response.status_code == 422 and "levels deep" in response.json()["detail"]
    nested = "[" * 100_000 + "]" * 100_000
    response = served.post("/setup", payloads.setup(rect_config(["cat"]), extra_params=nested))
    assert response.status_code == 422 and "deeper than" in response.json()["detail"]
    body = json.dumps(payloads.setup(rect_config(["cat"])))[:-1] + ', "deep": ' + nested + "}"
    response = served.client().post("/setup", content=body, headers={"Content-Type": "application/json"})
    assert 400 <= response.status_code < 500, response.text
    good_request(served, payloads)


@pytest.mark.parametrize(
    "url",
    ["/data/upload/1/a\tb.png", "/data/upload/1/a.png\r\nX-Injected: 1", "http://example.com/" + "a" * 1_000_000,
     "/data/local-files/?d=" + "a" * 10_000],
    ids=["tab", "crlf", "1MB", "10KB-d-path"],
)
def test_server_bad_image_urls_are_422(served, payloads, url):
    items = [payloads.item("rectanglelabels", "box", {"x": 10, "y": 10, "width": 40, "height": 40, "rotation": 0,
                                                      "rectanglelabels": ["cat"]}, "U1")]
    response = interactive(served, payloads, rect_config(["cat", "dog"]), items, image=url)
    assert response.status_code == 422, response.text[:500]
    assert "image URL" in response.json()["detail"]
    good_request(served, payloads)


@pytest.mark.parametrize(
    ("geometry", "message"),
    [
        ({"kind": "points", "points": [[1, 2]], "positive": "yes"}, "positive must be a list of booleans"),
        ({"kind": "points", "points": "12"}, "must be a list of"),
        ({"kind": "box", "x": 1, "y": 1, "width": -3, "height": 2}, "width must be > 0"),
        ({"kind": "rle", "size": [H, W], "counts": {"a": 1}}, "counts must be a string or a list"),
        ({"kind": "rle", "size": [H + 1, W], "counts": "0"}, "does not match"),
    ],
)
def test_malformed_neutral_job_geometry_is_a_region_error(engine, image, geometry, message):
    """A job payload that did not come from an adapter is still the input's fault, never a TypeError."""
    plan = Plan(categories=(Category("box", ("cat", "dog")),))
    with pytest.raises(RegionError, match=message):
        predict_regions(engine, image, plan, [RegionSpec("g", geometry, W, H, categories=("box",))])
