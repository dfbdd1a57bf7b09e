"""predict_regions with the real tiny Osprey engine: its neutral answers, turned into Label Studio result
items by the LS adapter, checked against direct engine calls and against label-studio-sdk's prediction
validator (the one LS 1.23 runs behind `fflag_feat_utc_210_prediction_validation_15082025`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from label_studio_sdk.label_interface import LabelInterface

from backend.labelstudio.config import parse_label_config
from backend.labelstudio.regions import parse_context, parse_results
from backend.labelstudio.results import prediction, result_items
from backend.service import predict
from backend.service.geometry import rasterise
from backend.service.tasks import Plan, RegionAnswer, RegionSpec
from osprey_core import load_engine
from osprey_core.errors import RegionError
from osprey_core.regions import Region

EXAMPLES = Path(__file__).resolve().parents[2] / "deploy" / "labelstudio"
W, H = 64, 48


@pytest.fixture(scope="module")
def engine():
    return load_engine("tiny", device="cpu")


@pytest.fixture(scope="module")
def image():
    img = np.zeros((H, W, 3), dtype=np.uint8)
    img[8:30, 10:40] = (200, 40, 40)
    img[28:46, 36:60] = (30, 30, 220)
    return img


class Counting:
    """The real engine, with its calls counted (to check how predict_regions batches them)."""

    def __init__(self, engine):
        self.engine, self.calls = engine, []

    def __getattr__(self, name):
        method = getattr(self.engine, name)

        def call(image, regions, *args, **kwargs):
            self.calls.append((name, len(regions)))
            return method(image, regions, *args, **kwargs)

        return call


def predict_regions(engine, image, plan, specs, refiner=None):
    """The whole path as the worker and the LS adapter run it: LS plan -> neutral plan -> answers (through
    their JSON, as they travel) -> LS result items."""
    neutral = plan.to_plan()
    answers = predict.predict_regions(engine, image, neutral, specs, refiner=refiner)
    shipped = [RegionAnswer.from_dict(json.loads(json.dumps(a.to_dict()))) for a in answers]
    return result_items(shipped, specs, neutral)


def mask_of(spec):
    return rasterise(spec, spec.size).mask


def config(name):
    text = (EXAMPLES / name).read_text()
    return text, parse_label_config(text)


def assert_valid(config_text, result, model_version):
    pred = prediction(result, model_version)
    assert LabelInterface(config_text).validate_prediction(pred, return_errors=True) == []
    json.dumps(pred)  # JSON-safe all the way down
    return pred


def mask(x0, y0, x1, y1):
    m = np.zeros((H, W), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def test_brush_region_gets_category_attributes_and_descriptions(engine, image):
    text, plan = config("brush_attributes.xml")
    drawn = mask(10, 8, 40, 30)
    context = {"result": [{"original_width": W, "original_height": H, "image_rotation": 0,
        "value": {"format": "rle", "rle": Region(drawn).to_ls_brush(), "brushlabels": ["cat"]},
        "id": "Br55uu11aa", "from_name": "category", "to_name": "image", "type": "brushlabels", "origin": "manual"}]}
    refs = parse_context(context, plan)
    result = predict_regions(engine, image, plan, refs)

    labels = plan.tools[0].labels
    expected = engine.classify(image, [drawn], list(labels))[0]
    attrs = engine.attributes(image, [drawn], {a.name: list(a.choices) for a in plan.attributes})[0]
    short = engine.describe(image, [drawn], detail="short")[0]
    detailed = engine.describe(image, [drawn], detail="detailed")[0]

    by_name = {item["from_name"]: item for item in result}
    assert [item["from_name"] for item in result] == ["category", "color", "size", "caption", "detailed_description"]
    assert all(item["id"] == "Br55uu11aa" and item["to_name"] == "image" for item in result)
    assert all((item["original_width"], item["original_height"]) == (W, H) for item in result)
    region = by_name["category"]
    assert region["type"] == "brushlabels" and region["value"]["brushlabels"] == [expected.label]
    assert region["score"] == pytest.approx(expected.score) and 0 < region["score"] <= 1
    # The brush comes back as an RLE of the same mask (alpha 255), in every per-region item too.
    assert region["value"]["format"] == "rle"
    assert np.array_equal(Region.from_ls_brush(region["value"]["rle"], W, H).mask, drawn)
    assert by_name["color"]["value"]["rle"] == region["value"]["rle"]
    for name in ("color", "size"):
        assert by_name[name]["type"] == "choices"
        assert by_name[name]["value"]["choices"] == [attrs[name].label]
        assert by_name[name]["score"] == pytest.approx(attrs[name].score)
    assert by_name["caption"]["type"] == "textarea" and by_name["caption"]["value"]["text"] == [short]
    assert by_name["detailed_description"]["value"]["text"] == [detailed]
    assert "score" not in by_name["caption"]

    pred = assert_valid(text, result, engine.model_version)
    assert pred["score"] == pytest.approx(min(expected.score, attrs["color"].score, attrs["size"].score))
    assert pred["model_version"] == engine.model_version


def test_plain_rectangle_uses_split_format_and_one_classify_per_label_set(engine, image):
    text, plan = config("polygon_rectangle.xml")
    common = {"to_name": "image", "original_width": W, "original_height": H, "image_rotation": 0}
    annotation = [
        {"id": "b1", "from_name": "box", "type": "rectangle", **common,
         "value": {"x": 15.625, "y": 16.0, "width": 46.875, "height": 45.0, "rotation": 0}},
        {"id": "b1", "from_name": "object", "type": "labels", **common,
         "value": {"x": 15.625, "y": 16.0, "width": 46.875, "height": 45.0, "rotation": 0, "labels": ["bus"]}},
        {"id": "b2", "from_name": "box", "type": "rectangle", **common,
         "value": {"x": 56.25, "y": 58.0, "width": 37.5, "height": 37.5, "rotation": 15}},
        {"id": "p1", "from_name": "part", "type": "polygonlabels", **common,
         "value": {"points": [[10, 10], [60, 12], [40, 70]], "closed": True, "polygonlabels": ["door"]}},
    ]
    refs = parse_results(annotation, plan)
    counting = Counting(engine)
    result = predict_regions(counting, image, plan, refs)

    classify = [c for c in counting.calls if c[0] == "classify"]
    assert sorted(classify) == [("classify", 1), ("classify", 2)]  # boxes together, the polygon alone
    assert [c for c in counting.calls if c[0] == "attributes"] == [("attributes", 3)]
    assert [c for c in counting.calls if c[0] == "describe"] == [("describe", 3)]

    items = {(item["id"], item["from_name"]): item for item in result}
    geometry = items[("b1", "box")]
    assert geometry["type"] == "rectangle" and "score" not in geometry
    assert geometry["value"] == {"x": 15.625, "y": 16.0, "width": 46.875, "height": 45.0, "rotation": 0}
    labelled = items[("b1", "object")]
    box_masks = [mask_of(r) for r in refs[:2]]
    expected = engine.classify(image, box_masks, ["car", "bus", "bicycle", "person"])
    assert labelled["type"] == "labels" and labelled["value"]["labels"] == [expected[0].label]
    assert {k: v for k, v in labelled["value"].items() if k != "labels"} == geometry["value"]
    assert items[("b2", "object")]["value"]["labels"] == [expected[1].label]
    assert items[("b2", "box")]["value"]["rotation"] == 15
    assert items[("p1", "part")]["value"]["polygonlabels"][0] in ("wheel", "window", "door")
    assert {k for (_, k) in items} == {"box", "object", "part", "occluded", "description"}
    assert_valid(text, result, engine.model_version)


def test_taxonomy_path_top_down_and_multiple_choice(engine, image):
    text, plan = config("taxonomy.xml")
    context = {"result": [{"original_width": W, "original_height": H, "image_rotation": 0,
        "value": {"x": 40.0, "y": 40.0, "radiusX": 20.0, "radiusY": 25.0, "rotation": 0, "ellipselabels": ["object"]},
        "id": "E1", "from_name": "ellipse", "to_name": "image", "type": "ellipselabels", "origin": "manual"}]}
    (ref,) = parse_context(context, plan)
    result = predict_regions(engine, image, plan, [ref])
    items = {item["from_name"]: item for item in result}

    # Walk the tree the same way with direct engine calls.
    nodes, path, prob = plan.taxonomies[0].roots, [], 1.0
    while nodes:
        if len(nodes) == 1:
            pick, p = nodes[0].value, 1.0
        else:
            cls = engine.classify(image, [mask_of(ref)], [n.value for n in nodes])[0]
            pick, p = cls.label, cls.score
        path.append(pick)
        prob *= p
        nodes = next(n for n in nodes if n.value == pick).children
    assert items["kind"]["type"] == "taxonomy" and items["kind"]["value"]["taxonomy"] == [path]
    assert items["kind"]["score"] == pytest.approx(prob)

    cls = engine.attributes(image, [mask_of(ref)], {"pattern": ["striped", "spotted", "plain"]})[0]["pattern"]
    expected = [c for c in ("striped", "spotted", "plain") if c == cls.label or cls.scores[c] > 1 / 3]
    assert items["pattern"]["value"]["choices"] == expected
    assert items["ellipse"]["value"]["ellipselabels"] == ["object"] and items["ellipse"]["score"] == pytest.approx(1.0)
    assert_valid(text, result, engine.model_version)


class FakeSam:
    """Stands in for SAM (no SAM checkpoint can be downloaded here): a square around the positive clicks."""

    def box_to_mask(self, image, box_xyxy):
        x0, y0, x1, y1 = (int(v) for v in box_xyxy)
        return Region(mask(x0 + 1, y0 + 1, x1 - 1, y1 - 1))

    def points_to_mask(self, image, points, labels):
        pos = np.array([p for p, lab in zip(points, labels, strict=True) if lab == 1])
        x0, y0 = (pos.min(axis=0) - 6).astype(int)
        x1, y1 = (pos.max(axis=0) + 6).astype(int)
        return Region(mask(max(x0, 0), max(y0, 0), x1, y1))


def keypoint_context(*clicks):
    return {"result": [{"original_width": W, "original_height": H, "image_rotation": 0,
        "value": {"x": x, "y": y, "width": 0.32, "keypointlabels": ["cat"], "labels": ["cat"]},
        "is_positive": positive, "id": rid, "from_name": "point", "to_name": "image",
        "type": "keypointlabels", "origin": "manual"} for rid, x, y, positive in clicks]}


def test_keypoint_with_sam_answers_a_brush_region(engine, image):
    text, plan = config("keypoint_sam.xml")
    refs = parse_context(keypoint_context(("k1", 40.0, 40.0, True), ("k2", 50.0, 45.0, False)), plan)
    result = predict_regions(engine, image, plan, refs, refiner=FakeSam())
    region, caption = result
    assert region["id"].startswith("sam-") and caption["id"] == region["id"]
    assert (region["from_name"], region["type"]) == ("mask", "brushlabels")
    sam_mask = Region.from_ls_brush(region["value"]["rle"], W, H)
    expected = engine.classify(image, [sam_mask], ["cat", "dog", "bird", "car", "person"])[0]
    assert region["value"]["brushlabels"] == [expected.label]
    assert caption["from_name"] == "caption" and caption["value"]["text"][0] == engine.describe(image, [sam_mask])[0]
    assert_valid(text, result, engine.model_version)


def test_keypoint_without_sam_is_labelled_in_place(engine, image):
    text, plan = config("keypoint_sam.xml")
    refs = parse_context(keypoint_context(("k1", 40.0, 40.0, True), ("k2", 50.0, 45.0, False)), plan)
    result = predict_regions(engine, image, plan, refs)
    assert [(i["id"], i["from_name"], i["type"]) for i in result] == [
        ("k1", "point", "keypointlabels"), ("k1", "caption", "textarea")
    ]
    assert result[0]["value"]["x"] == 40.0 and result[0]["value"]["keypointlabels"][0] in plan.tools[0].labels
    assert_valid(text, result, engine.model_version)


def test_when_conditions_decide_which_per_region_controls_are_predicted(engine, image):
    """Single-candidate controls make the predicted values certain, so the conditions decide alone."""
    text = """<View><Image name="image" value="$image"/>
      <RectangleLabels name="box" toName="image"><Label value="cat"/></RectangleLabels>
      <Choices name="fur" toName="image" perRegion="true" whenLabelValue="cat"><Choice value="long"/></Choices>
      <Choices name="wings" toName="image" perRegion="true" whenLabelValue="bird"><Choice value="two"/></Choices>
      <Choices name="fur_color" toName="image" perRegion="true" whenTagName="fur" whenChoiceValue="long">
        <Choice value="grey"/><Choice value="ginger"/></Choices>
      <TextArea name="fur_note" toName="image" perRegion="true" whenTagName="fur" whenChoiceValue="short"/>
      <TextArea name="box_note" toName="image" perRegion="true" whenTagName="box"/>
      <TextArea name="other_note" toName="image" perRegion="true" whenTagName="nothing"/>
    </View>"""
    plan = parse_label_config(text)
    item = {"id": "R", "from_name": "box", "to_name": "image", "type": "rectanglelabels", "original_width": W,
            "original_height": H, "value": {"x": 10, "y": 10, "width": 50, "height": 50, "rectanglelabels": ["cat"]}}
    result = predict_regions(engine, image, plan, parse_results([item], plan))
    assert [i["from_name"] for i in result] == ["box", "fur", "fur_color", "box_note"]
    assert result[1]["value"]["choices"] == ["long"] and result[1]["score"] == pytest.approx(1.0)
    assert_valid(text, result, engine.model_version)


def test_job_payload_round_trip_gives_the_same_result(engine, image):
    text, plan = config("polygon_rectangle.xml")
    item = {"id": "P", "from_name": "part", "to_name": "image", "type": "polygonlabels", "original_width": W,
            "original_height": H, "value": {"points": [[5, 5], [90, 10], [50, 90]], "polygonlabels": ["door"]}}
    refs = parse_results([item], plan)
    shipped = [RegionSpec.from_dict(json.loads(json.dumps(r.to_dict()))) for r in refs]
    neutral = plan.to_plan()
    plan_shipped = Plan.from_dict(json.loads(json.dumps(neutral.to_dict())))
    assert plan_shipped == neutral
    answers = predict.predict_regions(engine, image, plan_shipped, shipped)
    assert result_items(answers, shipped, plan_shipped) == predict_regions(engine, image, plan, refs)


def test_size_mismatch_and_empty_input(engine, image):
    _, plan = config("brush_attributes.xml")
    drawn = np.zeros((H + 1, W), dtype=bool)
    drawn[5:10, 5:10] = True
    context = {"result": [{"original_width": W, "original_height": H + 1, "id": "X", "from_name": "category",
                           "to_name": "image", "type": "brushlabels",
                           "value": {"format": "rle", "rle": Region(drawn).to_ls_brush(), "brushlabels": []}}]}
    with pytest.raises(RegionError, match=r"region 'X' was drawn on a 64x49 image but the task's image is 64x48"):
        predict_regions(engine, image, plan, parse_context(context, plan))
    assert predict_regions(engine, image, plan, []) == []
    empty = prediction([], engine.model_version)
    assert empty == {"result": [], "score": None, "model_version": engine.model_version}
    assert not math.isnan(prediction([{"score": 0.25}, {"score": 0.5}], "v")["score"])


def test_real_tiny_sam_refiner_drives_the_answer(engine, image):
    """The real SamRefiner with the random-weight "tiny" SAM preset (no SAM checkpoint can be
    downloaded here): its mask, whatever it is, must be what comes back; an empty one falls back."""
    import torch

    from osprey_core.sam import SamRefiner, build_sam

    text, plan = config("keypoint_sam.xml")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        refiner = SamRefiner.from_model(build_sam("tiny"))
    clicks = (("k1", 40.0, 40.0, True), ("k2", 70.0, 60.0, False))
    sam_mask = refiner.points_to_mask(image, [(x * W / 100, y * H / 100) for _, x, y, _ in clicks], [1, 0])
    result = predict_regions(engine, image, plan, parse_context(keypoint_context(*clicks), plan), refiner=refiner)
    region = result[0]
    if sam_mask.area:
        assert region["type"] == "brushlabels" and region["id"].startswith("sam-")
        assert np.array_equal(Region.from_ls_brush(region["value"]["rle"], W, H).mask, sam_mask.mask)
    else:
        assert (region["id"], region["type"]) == ("k1", "keypointlabels")
    assert_valid(text, result, engine.model_version)
