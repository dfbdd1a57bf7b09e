"""Label Studio result items -> neutral RegionSpecs: the payload shapes of LS 1.23 (protocol notes §2.5, §3),
batch selection, job payloads, SAM refinement (service side) and clear errors for malformed items."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest

from backend.labelstudio.config import PredictionPlan, parse_label_config
from backend.labelstudio.regions import (
    TaskDataError,
    parse_context,
    parse_results,
    select_regions,
    select_result,
    task_image_url,
)
from backend.service.geometry import rasterise
from backend.service.predict import refine_regions as refine
from backend.service.tasks import RegionSpec, TaskError
from osprey_core.errors import RegionError
from osprey_core.regions import Region


def mask_of(spec: RegionSpec) -> Region:
    """What the worker rasterises for a spec (on an image of the size it claims)."""
    return rasterise(spec, spec.size)


def refine_regions(image, plan: PredictionPlan, specs, sam):
    return refine(image, plan.to_plan(), specs, sam)

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <KeyPointLabels name="tag2" toName="image" smart="true"><Label value="Banana"/><Label value="Apple"/></KeyPointLabels>
  <RectangleLabels name="label" toName="image" smart="true"><Label value="Car"/><Label value="Bus"/></RectangleLabels>
  <PolygonLabels name="poly" toName="image" smart="true"><Label value="Car"/><Label value="Bus"/></PolygonLabels>
  <BrushLabels name="brush" toName="image" smart="true"><Label value="Cat"/><Label value="Dog"/></BrushLabels>
  <EllipseLabels name="ell" toName="image"><Label value="Cat"/><Label value="Dog"/></EllipseLabels>
  <Rectangle name="box" toName="image"/>
  <Labels name="kind" toName="image"><Label value="Cat"/><Label value="Dog"/></Labels>
  <Choices name="color" toName="image" perRegion="true"><Choice value="red"/><Choice value="blue"/></Choices>
  <TextArea name="caption" toName="image" perRegion="true"/>
  <Choices name="quality" toName="image"><Choice value="good"/></Choices>
  <Relations><Relation value="near"/></Relations>
</View>"""


@pytest.fixture(scope="module")
def plan():
    return parse_label_config(CONFIG)


def brush_mask(width=64, height=48):
    mask = np.zeros((height, width), dtype=bool)
    mask[10:30, 12:40] = True
    return mask


# Interactive `params.context` payloads, shaped exactly as LS 1.23 sends them (protocol notes §2.6).
KEYPOINT = {"result": [{"original_width": 1080, "original_height": 1080, "image_rotation": 0,
    "value": {"x": 49.44, "y": 59.97, "width": 0.32, "keypointlabels": ["Banana"], "labels": ["Banana"]},
    "is_positive": True, "id": "fBWv1t0S2L", "from_name": "tag2", "to_name": "image",
    "type": "keypointlabels", "origin": "manual"}]}
RECTANGLE = {"result": [{"original_width": 1920, "original_height": 1080, "image_rotation": 0,
    "value": {"x": 12.5, "y": 20.0, "width": 30.1, "height": 25.4, "rotation": 0, "rectanglelabels": ["Car"]},
    "id": "Xy12ab34cd", "from_name": "label", "to_name": "image", "type": "rectanglelabels", "origin": "manual"}]}
POLYGON = {"result": [{"original_width": 1920, "original_height": 1080, "image_rotation": 0,
    "value": {"points": [[10.1, 20.2], [30.0, 22.5], [25.3, 40.0]], "closed": True, "polygonlabels": ["Car"]},
    "id": "Pq98zx76wv", "from_name": "poly", "to_name": "image", "type": "polygonlabels", "origin": "manual"}]}


def brush_context():
    return {"result": [{"original_width": 64, "original_height": 48, "image_rotation": 0,
        "value": {"format": "rle", "rle": Region(brush_mask()).to_ls_brush(), "brushlabels": ["Cat"]},
        "id": "Br55uu11aa", "from_name": "brush", "to_name": "image", "type": "brushlabels", "origin": "manual"}]}


def test_interactive_keypoint(plan):
    (ref,) = parse_context(KEYPOINT, plan)
    assert (ref.id, ref.meta["from_name"], ref.meta["type"], ref.kind) == ("fBWv1t0S2L", "tag2", "keypointlabels", "points")
    assert ref.size == (1080, 1080) and ref.interactive and ref.geometry["positive"] == [True]
    assert ref.labels == ("Banana",) and ref.categories == ("tag2",) and ref.tags == ("tag2",)
    assert ref.geometry["points"] == [[49.44 * 1080 / 100, 59.97 * 1080 / 100]]  # pixels
    assert ref.meta["value"] == {"x": 49.44, "y": 59.97, "width": 0.32}  # geometry only, labels stripped
    # The disk sits on the clicked pixel.
    region = mask_of(ref)
    assert region.mask[int(59.97 * 1080 / 100), int(49.44 * 1080 / 100)]
    assert region.id == "fBWv1t0S2L"


def test_interactive_rectangle_and_polygon(plan):
    (rect,) = parse_context(RECTANGLE, plan)
    assert mask_of(rect).bbox == (240, 216, 818, 490)  # 12.5% of 1920 .. (12.5+30.1)%, 20% of 1080 .. 45.4%
    assert rect.meta["value"] == {"x": 12.5, "y": 20.0, "width": 30.1, "height": 25.4, "rotation": 0}
    assert rect.geometry == {"kind": "box", "x": 240.0, "y": 216.0, "width": 30.1 * 1920 / 100,
                             "height": 25.4 * 1080 / 100, "rotation": 0.0}
    (poly,) = parse_context(POLYGON, plan)
    assert poly.meta["value"]["points"] == [[10.1, 20.2], [30.0, 22.5], [25.3, 40.0]]
    assert poly.meta["value"]["closed"] is True
    x0, y0, x1, y1 = mask_of(poly).bbox
    assert (x0, y0) == (round(10.1 * 19.2), round(20.2 * 10.8)) and x1 <= 576 and y1 <= 432


def test_interactive_brush_decodes_the_rgba_rle(plan):
    (ref,) = parse_context(brush_context(), plan)
    assert ref.kind == "brush_rle" and ref.geometry["rle"] == brush_context()["result"][0]["value"]["rle"]
    assert np.array_equal(mask_of(ref).mask, brush_mask())  # decoded by the worker, not here
    assert ref.meta["value"] == {"format": "rle"}


def test_rotated_rectangle_and_ellipse(plan):
    items = [
        {"id": "r", "from_name": "label", "to_name": "image", "type": "rectanglelabels", "original_width": 100,
         "original_height": 100, "value": {"x": 50, "y": 10, "width": 20, "height": 20, "rotation": 90,
                                           "rectanglelabels": ["Car"]}},
        {"id": "e", "from_name": "ell", "to_name": "image", "type": "ellipselabels", "original_width": 100,
         "original_height": 100, "value": {"x": 50, "y": 50, "radiusX": 10, "radiusY": 5, "rotation": 0,
                                           "ellipselabels": ["Cat"]}},
    ]
    rect, ellipse = parse_results(items, plan)
    # 90 degrees clockwise about the top-left corner (50, 10): the box swings to x in [30, 50].
    assert mask_of(rect).bbox == (30, 10, 50, 30)
    assert mask_of(ellipse).bbox == (40, 45, 60, 55)


def test_batch_split_and_merged_labels_and_skipped_items(plan):
    """Plain Rectangle + <Labels>: split (geometry + `labels` with the same id) and merged shapes; per-region
    choices/textarea, image-level choices and relations are not regions."""
    geometry = {"x": 10, "y": 10, "width": 20, "height": 30, "rotation": 0}
    common = {"to_name": "image", "original_width": 200, "original_height": 100, "image_rotation": 0}
    result = [
        {"id": "s1", "from_name": "box", "type": "rectangle", "value": dict(geometry), **common},
        {"id": "s1", "from_name": "kind", "type": "labels", "value": {**geometry, "labels": ["Dog"]}, **common},
        {"id": "s1", "from_name": "color", "type": "choices", "value": {**geometry, "choices": ["red"]}, **common},
        {"id": "s1", "from_name": "caption", "type": "textarea", "value": {**geometry, "text": ["a dog"]}, **common},
        {"id": "m1", "from_name": "kind", "type": "rectanglelabels",
         "value": {**geometry, "rectanglelabels": ["Cat"]}, **common},
        {"id": "q", "from_name": "quality", "to_name": "image", "type": "choices", "value": {"choices": ["good"]}},
        {"from_id": "s1", "to_id": "m1", "type": "relation", "direction": "right", "labels": ["near"]},
    ]
    split, merged = parse_results(result, plan)
    assert (split.id, split.meta["from_name"], split.meta["type"], split.labels) == ("s1", "box", "rectangle", ("Dog",))
    assert (merged.id, merged.meta["from_name"], merged.meta["type"], merged.labels) == (
        "m1", "kind", "rectanglelabels", ("Cat",))
    assert split.categories == ("kind",) and merged.categories == ("kind",)  # split vs merged answer shapes
    assert np.array_equal(mask_of(split).mask, mask_of(merged).mask)
    assert mask_of(split).bbox == (20, 10, 60, 40)


def test_job_payload_round_trip_is_json_and_exact(plan):
    refs = parse_context(brush_context(), plan) + parse_context(RECTANGLE, plan) + parse_context(KEYPOINT, plan)
    for ref in refs:
        payload = json.loads(json.dumps(ref.to_dict()))
        assert len(json.dumps(payload)) < 2000  # compact: geometry, never a raster
        back = RegionSpec.from_dict(payload)
        assert back == ref
        assert mask_of(back) == mask_of(ref)
    with pytest.raises(TaskError, match="malformed region payload"):
        RegionSpec.from_dict({"id": "x"})


# ---- batch selection -------------------------------------------------------------------------------


def keypoint_item(region_id, x):
    return {"id": region_id, "from_name": "tag2", "to_name": "image", "type": "keypointlabels",
            "original_width": 100, "original_height": 100, "value": {"x": x, "y": 50, "keypointlabels": ["Apple"]}}


def batch_task():
    return {
        "id": 7, "data": {"image": "/data/upload/1/400ce61f-red.png"},
        "annotations": [
            {"id": 1, "created_at": "2026-01-01T10:00:00.000000Z", "updated_at": "2026-01-03T10:00:00.000000Z",
             "was_cancelled": False, "result": [keypoint_item("old", 10)]},
            {"id": 2, "created_at": "2026-01-02T10:00:00.000000Z", "updated_at": "2026-01-04T10:00:00.000000Z",
             "was_cancelled": False, "result": [keypoint_item("latest", 20), keypoint_item("latest2", 30)]},
            {"id": 3, "created_at": "2026-01-05T10:00:00.000000Z", "updated_at": "2026-01-05T10:00:00.000000Z",
             "was_cancelled": True, "result": []},
        ],
        "predictions": [
            {"id": 9, "created_at": "2026-01-01T09:00:00Z", "result": [keypoint_item("p-old", 40)]},
            {"id": 10, "created_at": "2026-01-02T09:00:00+02:00", "result": [keypoint_item("p-new", 50)]},
        ],
    }


def test_select_latest_annotation_skipping_cancelled(plan):
    refs = select_regions(batch_task(), plan)
    assert [r.id for r in refs] == ["latest", "latest2"] and not any(r.interactive for r in refs)
    assert [r.id for r in select_regions(batch_task(), plan, "predictions")] == ["p-new"]
    assert [r.id for r in select_regions(batch_task(), plan, "both")] == ["latest", "latest2"]
    only_predictions = {**batch_task(), "annotations": []}
    assert [r.id for r in select_regions(only_predictions, plan, "both")] == ["p-new"]
    assert select_regions(only_predictions, plan, "annotations") == []
    assert select_result({"id": 1, "data": {}}, "both") == []


def test_select_breaks_timestamp_ties_by_id(plan):
    task = batch_task()
    for a in task["annotations"]:
        a["updated_at"] = a["created_at"] = "2026-01-01T00:00:00Z"
    assert [r.id for r in select_regions(task, plan)] == ["latest", "latest2"]  # id 2 > id 1
    with pytest.raises(ValueError, match="regions source must be one of"):
        select_result(task, "drafts")


def test_task_image_url(plan):
    assert task_image_url(batch_task(), plan) == "/data/upload/1/400ce61f-red.png"
    with pytest.raises(TaskDataError, match=r"task 7 has no image URL under data\['image'\].*data keys: text"):
        task_image_url({"id": 7, "data": {"text": "hi"}}, plan)
    with pytest.raises(TaskDataError, match="no 'data' object"):
        task_image_url({"id": 7}, plan)
    with pytest.raises(TaskDataError, match="must be an object"):
        task_image_url(["image"], plan)


# ---- malformed items -------------------------------------------------------------------------------


def broken(context, path, value):
    """A copy of `context` with one field replaced (path into the first item); `...` deletes it."""
    ctx = copy.deepcopy(context)
    target = ctx["result"][0]
    for key in path[:-1]:
        target = target[key]
    if value is ...:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return ctx


def short_rle():
    return Region(brush_mask(32, 24)).to_ls_brush()  # an RLE of a 32x24 image sent as 64x48


@pytest.mark.parametrize(
    ("context", "message"),
    [
        (lambda: broken(brush_context(), ["value", "rle"], short_rle()), r"Br55uu11aa.*width\*height\*4"),
        (lambda: broken(brush_context(), ["value", "rle"], [1, 2, 300]), "Br55uu11aa.*0..255"),
        (lambda: broken(brush_context(), ["value", "rle"], ...), r"Br55uu11aa.*value\.rle is missing"),
        (lambda: broken(brush_context(), ["value", "format"], "png"), "Br55uu11aa.*format 'png'"),
        (lambda: broken(RECTANGLE, ["from_name"], "nope"), "Xy12ab34cd.*unknown control from_name='nope'"),
        (lambda: broken(RECTANGLE, ["to_name"], "other_image"), "Xy12ab34cd.*to_name='other_image' is not the image"),
        (lambda: broken(RECTANGLE, ["type"], "polygonlabels"), "Xy12ab34cd.*type 'polygonlabels' does not match"),
        (lambda: broken(RECTANGLE, ["value", "height"], ...), r"Xy12ab34cd.*value\.height is missing"),
        (lambda: broken(RECTANGLE, ["value", "x"], 130.0), r"Xy12ab34cd.*x=130.0% out of range"),
        (lambda: broken(RECTANGLE, ["value", "width"], math.nan), "Xy12ab34cd.*finite"),
        (lambda: broken(RECTANGLE, ["value", "y"], "20"), "Xy12ab34cd.*must be a number"),
        (lambda: broken(RECTANGLE, ["value"], None), "Xy12ab34cd.*'value' must be an object"),
        (lambda: broken(RECTANGLE, ["original_width"], ...), "Xy12ab34cd.*original_width is missing"),
        (lambda: broken(RECTANGLE, ["original_height"], -5), "Xy12ab34cd.*original_height must be a positive"),
        (lambda: broken(POLYGON, ["value", "points"], [[1, 2], [3, 4]]), "Pq98zx76wv.*at least 3 points"),
        (lambda: broken(POLYGON, ["value", "points"], [[1, 2], [3, math.inf], [5, 6]]), "Pq98zx76wv.*point 1"),
        (lambda: broken(KEYPOINT, ["value", "y"], -3), r"fBWv1t0S2L.*y=-3.0% out of range"),
        (lambda: broken(KEYPOINT, ["id"], {"x": 1}), "id must be a non-empty string"),
        (lambda: {"result": "not a list"}, "result must be a list"),
        (lambda: {"result": [42]}, "result item 0 must be an object"),
        (lambda: "context", "context must be an object"),
    ],
)
def test_malformed_items_raise_region_error_naming_the_item(plan, context, message):
    with pytest.raises(RegionError, match=message):
        parse_context(context(), plan)


def test_duplicate_geometry_for_one_id_is_an_error(plan):
    item = RECTANGLE["result"][0]
    with pytest.raises(RegionError, match="Xy12ab34cd.*2 geometry results share this id"):
        parse_results([item, {**item, "from_name": "box", "type": "rectangle"}], plan)


def test_empty_context_gives_no_regions(plan):
    assert parse_context(None, plan) == [] and parse_context({}, plan) == []
    assert parse_context({"result": []}, plan) == []


# ---- SAM refinement --------------------------------------------------------------------------------


class FakeSam:
    """Stands in for SAM: no SAM checkpoint can be downloaded here. Records its prompts and answers a
    fixed, recognisable mask (the box shrunk by 2 px; a square around the positive clicks)."""

    def __init__(self, empty=False):
        self.calls = []
        self.empty = empty

    def _region(self, image, x0, y0, x1, y1):
        h, w = image.shape[:2]
        mask = np.zeros((h, w), dtype=bool)
        if not self.empty:
            mask[int(y0):int(y1), int(x0):int(x1)] = True
        return Region(mask, allow_empty=True)

    def box_to_mask(self, image, box_xyxy):
        self.calls.append(("box", tuple(box_xyxy)))
        x0, y0, x1, y1 = box_xyxy
        return self._region(image, x0 + 2, y0 + 2, x1 - 2, y1 - 2)

    def points_to_mask(self, image, points, labels):
        self.calls.append(("points", [tuple(p) for p in points], list(labels)))
        pos = np.array([p for p, lab in zip(points, labels, strict=True) if lab == 1])
        return self._region(image, *(pos.min(axis=0) - 5), *(pos.max(axis=0) + 5))


def clicks(*specs):
    """Smart keypoint clicks on a 100x100 image: (id, x%, y%, positive)."""
    return {"result": [
        {"original_width": 100, "original_height": 100, "image_rotation": 0,
         "value": {"x": x, "y": y, "width": 0.5, "keypointlabels": ["Banana"]}, "is_positive": positive,
         "id": rid, "from_name": "tag2", "to_name": "image", "type": "keypointlabels", "origin": "manual"}
        for rid, x, y, positive in specs]}


def test_smart_clicks_become_one_brush_region(plan):
    image = np.zeros((100, 100, 3), dtype=np.uint8)
    refs = parse_context(clicks(("a", 20, 30, True), ("b", 40, 50, True), ("n", 60, 60, False)), plan)
    sam = FakeSam()
    (brush,) = refine_regions(image, plan, refs, sam)
    assert sam.calls == [("points", [(20.0, 30.0), (40.0, 50.0), (60.0, 60.0)], [1, 1, 0])]
    assert brush.replaced and brush.categories == ("brush",) and brush.tags == ("brush",)  # the BrushLabels tool
    assert plan.to_plan().mask_target.meta == {"from_name": "brush", "type": "brushlabels"}
    assert brush.id.startswith("sam-") and brush.region.id == brush.id and brush.labels == ("Banana",)
    assert brush.sources == ("a", "b", "n")
    assert brush.region.bbox == (15, 25, 45, 55)
    # Same clicks -> same id; another click set -> another id (a new suggestion, not a clash).
    again = refine_regions(image, plan, parse_context(clicks(("a", 20, 30, True), ("b", 40, 50, True),
                                                             ("n", 60, 60, False)), plan), FakeSam())
    other = refine_regions(image, plan, parse_context(clicks(("a", 20, 30, True)), plan), FakeSam())
    assert again[0].id == brush.id != other[0].id


def test_smart_rectangle_becomes_brush_and_batch_rectangle_keeps_geometry(plan):
    image = np.zeros((100, 200, 3), dtype=np.uint8)
    item = {"original_width": 200, "original_height": 100, "image_rotation": 0, "id": "R1", "from_name": "label",
            "to_name": "image", "type": "rectanglelabels",
            "value": {"x": 10, "y": 10, "width": 20, "height": 40, "rotation": 0, "rectanglelabels": ["Car"]}}
    sam = FakeSam()
    (smart,) = refine_regions(image, plan, parse_context({"result": [item]}, plan), sam)
    assert sam.calls == [("box", (20, 10, 60, 50))]
    assert smart.replaced and smart.categories == ("brush",) and smart.region.bbox == (22, 12, 58, 48)
    (batch,) = refine_regions(image, plan, parse_results([item], plan), FakeSam())
    assert (batch.id, batch.replaced, batch.categories) == ("R1", False, ("label",))
    assert batch.region.bbox == (22, 12, 58, 48)  # the model sees the SAM mask, LS gets its box back


def test_without_sam_negative_clicks_are_dropped_and_empty_sam_falls_back(plan):
    image = np.zeros((100, 100, 3), dtype=np.uint8)
    refs = parse_context(clicks(("a", 20, 30, True), ("n", 60, 60, False)), plan)
    assert [r.id for r in refine_regions(image, plan, refs, None)] == ["a"]
    assert [r.id for r in refine_regions(image, plan, refs, FakeSam(empty=True))] == ["a"]
    only_negative = parse_context(clicks(("n", 60, 60, False)), plan)
    assert refine_regions(image, plan, only_negative, FakeSam()) == []


def test_without_a_brush_tool_sam_keeps_the_drawn_region():
    plan = parse_label_config("""<View><Image name="image" value="$image"/>
      <KeyPointLabels name="kp" toName="image"><Label value="a"/><Label value="b"/></KeyPointLabels></View>""")
    image = np.zeros((100, 100, 3), dtype=np.uint8)
    refs = parse_context({"result": [{**clicks(("a", 20, 30, True))["result"][0], "from_name": "kp",
                                      "value": {"x": 20, "y": 30, "keypointlabels": ["a"]}}]}, plan)
    assert plan.to_plan().mask_target is None
    (ref,) = refine_regions(image, plan, refs, FakeSam())
    assert (ref.id, ref.replaced, ref.categories) == ("a", False, ("kp",)) and ref.region.bbox == (15, 25, 25, 35)
