"""Property tests of every region decoder (hypothesis): hostile input raises only `RegionError`, never
another exception, a hang or a mask of the wrong size; valid input round-trips exactly.

Image sizes stay small so each example is cheap; the pixel limit itself is checked separately.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from osprey_core.errors import RegionError
from osprey_core.regions import MAX_PIXELS, Region

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

dims = st.integers(min_value=1, max_value=48)
# Anything JSON can carry, plus the floats JSON cannot (NaN, inf) that Python clients still send.
scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=6),
                                                             st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                           max_leaves=20)
numbers = st.one_of(st.floats(min_value=-150, max_value=250, allow_nan=False), st.integers(-150, 250))
percent_points = st.lists(st.tuples(numbers, numbers).map(list), min_size=0, max_size=12)


def masks(h: int, w: int):
    return arrays(np.bool_, (h, w))


def _check(region: Region, w: int, h: int) -> None:
    assert region.mask.shape == (h, w)
    assert region.mask.dtype == np.bool_


def _only_region_errors(call, w: int, h: int) -> None:
    try:
        region = call()
    except RegionError as e:
        assert str(e)  # a message a user can read
        return
    _check(region, w, h)


# ---- round trips -----------------------------------------------------------------------------------


@FUZZ
@given(data=st.data(), h=dims, w=dims)
def test_coco_rle_round_trip(data, h, w):
    mask = data.draw(masks(h, w))
    if not mask.any():
        mask[0, 0] = True
    rle = Region.from_mask(mask).to_coco_rle()
    back = Region.from_coco_rle(rle, h, w)
    assert np.array_equal(back.mask, mask)


@FUZZ
@given(data=st.data(), h=dims, w=dims)
def test_ls_brush_round_trip(data, h, w):
    mask = data.draw(masks(h, w))
    if not mask.any():
        mask[-1, -1] = True
    rle = Region.from_mask(mask).to_ls_brush()
    back = Region.from_ls_brush(rle, w, h)
    assert np.array_equal(back.mask, mask)


@FUZZ
@given(data=st.data(), h=dims, w=dims)
def test_uncompressed_coco_rle_round_trip(data, h, w):
    mask = data.draw(masks(h, w))
    if not mask.any():
        mask[0, -1] = True
    flat = mask.ravel(order="F").astype(np.int8)
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [2]])))  # run boundaries, first run is 0s
    counts = np.diff(np.concatenate([[0], changes])).tolist()
    counts = [int(c) for c in counts]
    assert sum(counts) == h * w
    back = Region.from_coco_rle({"size": [h, w], "counts": counts}, h, w)
    assert np.array_equal(back.mask, mask)


# ---- hostile input ---------------------------------------------------------------------------------


@FUZZ
@given(rle=json_values, h=dims, w=dims)
def test_coco_rle_garbage(rle, h, w):
    _only_region_errors(lambda: Region.from_coco_rle(rle, h, w), w, h)


@FUZZ
@given(counts=st.one_of(st.text(max_size=40), st.binary(max_size=40), st.lists(st.integers(-5, 3000), max_size=30)),
       h=dims, w=dims)
def test_coco_rle_counts_garbage(counts, h, w):
    _only_region_errors(lambda: Region.from_coco_rle({"size": [h, w], "counts": counts}, h, w), w, h)


@FUZZ
@given(data=st.data(), h=dims, w=dims)
def test_coco_rle_mutated_counts(data, h, w):
    mask = data.draw(masks(h, w))
    mask[0, 0] = True
    counts = bytearray(Region.from_mask(mask).to_coco_rle()["counts"].encode())
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        i = data.draw(st.integers(0, max(0, len(counts) - 1)))
        if op == "flip" and counts:
            counts[i] = data.draw(st.integers(0, 255))
        elif op == "cut":
            del counts[i:]
        else:
            counts.insert(i, data.draw(st.integers(0, 255)))
    _only_region_errors(lambda: Region.from_coco_rle({"size": [h, w], "counts": bytes(counts)}, h, w), w, h)


@FUZZ
@given(rle=st.one_of(json_values, st.lists(st.integers(-3, 300), max_size=60)), h=dims, w=dims)
def test_ls_brush_garbage(rle, h, w):
    _only_region_errors(lambda: Region.from_ls_brush(rle, w, h), w, h)


@FUZZ
@given(data=st.data(), h=dims, w=dims)
def test_ls_brush_mutated(data, h, w):
    mask = data.draw(masks(h, w))
    mask[h // 2, w // 2] = True
    rle = Region.from_mask(mask).to_ls_brush()
    i = data.draw(st.integers(0, len(rle) - 1))
    op = data.draw(st.sampled_from(["flip", "cut", "extend"]))
    if op == "flip":
        rle[i] = data.draw(st.integers(0, 255))
    elif op == "cut":
        rle = rle[:i]
    else:
        rle = rle + data.draw(st.lists(st.integers(0, 255), min_size=1, max_size=20))
    _only_region_errors(lambda: Region.from_ls_brush(rle, w, h), w, h)


@FUZZ
@given(points=st.one_of(percent_points, json_values), h=dims, w=dims)
def test_ls_polygon(points, h, w):
    _only_region_errors(lambda: Region.from_ls_polygon(points, w, h), w, h)


@FUZZ
@given(polygons=st.one_of(st.lists(st.lists(numbers, max_size=14), max_size=4), json_values), h=dims, w=dims)
def test_coco_polygons(polygons, h, w):
    _only_region_errors(lambda: Region.from_coco_polygons(polygons, h, w), w, h)


@FUZZ
@given(x=st.one_of(numbers, scalars), y=st.one_of(numbers, scalars), bw=st.one_of(numbers, scalars),
       bh=st.one_of(numbers, scalars), rotation=st.one_of(st.floats(-1e6, 1e6), scalars), h=dims, w=dims)
def test_ls_rectangle(x, y, bw, bh, rotation, h, w):
    _only_region_errors(lambda: Region.from_ls_rectangle(x, y, bw, bh, rotation, w, h), w, h)


@FUZZ
@given(x=st.one_of(numbers, scalars), y=st.one_of(numbers, scalars), rx=st.one_of(numbers, scalars),
       ry=st.one_of(numbers, scalars), rotation=st.one_of(st.floats(-1e6, 1e6), scalars), h=dims, w=dims)
def test_ls_ellipse(x, y, rx, ry, rotation, h, w):
    _only_region_errors(lambda: Region.from_ls_ellipse(x, y, rx, ry, rotation, w, h), w, h)


@FUZZ
@given(x=st.one_of(numbers, scalars), y=st.one_of(numbers, scalars), h=dims, w=dims)
def test_ls_keypoint(x, y, h, w):
    _only_region_errors(lambda: Region.from_ls_keypoint(x, y, w, h), w, h)


@FUZZ
@given(width=st.one_of(scalars, st.integers(-5, 10**7)), height=st.one_of(scalars, st.integers(-5, 10**7)))
def test_image_sizes_are_checked_before_any_allocation(width, height):
    def whole(v) -> bool:  # Label Studio may send 480.0: an integral number is a size, a bool is not
        return (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                and float(v).is_integer() and v > 0)

    ok = whole(width) and whole(height) and int(width) * int(height) <= MAX_PIXELS
    if ok and int(width) * int(height) > 4_000_000:
        return  # a legal but large image: not worth rasterising in a property test
    try:
        region = Region.from_ls_rectangle(10, 10, 20, 20, 0, width, height)
    except RegionError:
        assert not ok
        return
    assert ok and region.mask.shape == (int(height), int(width))


def test_claimed_giant_image_is_refused_without_allocating():
    with pytest.raises(RegionError, match="pixel limit"):
        Region.from_ls_rectangle(0, 0, 100, 100, 0, 1 << 20, 1 << 20)
    # A brush header claiming a 1 GiB raster for a small image is refused by its header alone.
    with pytest.raises(RegionError, match="decodes to"):
        Region.from_ls_brush([64, 0, 0, 0, 56, 0, 0, 0, 0, 0], 16, 16)


def test_rotated_rectangle_stays_inside_the_image():
    for angle in (0, 45, 90, 135, 180, 270, 359.9, -30, 1e5):
        region = Region.from_ls_rectangle(40, 40, 20, 10, angle, 64, 48)
        assert region.mask.shape == (48, 64) and region.area > 0
        assert math.isfinite(region.area)


# ---- geometry round trips (exact) ------------------------------------------------------------------


@st.composite
def pixel_boxes(draw):
    w, h = draw(dims), draw(dims)
    x0, y0 = draw(st.integers(0, w - 1)), draw(st.integers(0, h - 1))
    return w, h, x0, y0, draw(st.integers(1, w - x0)), draw(st.integers(1, h - y0))


@FUZZ
@given(box=pixel_boxes())
def test_pixel_aligned_rectangle_and_its_polygon_are_exactly_that_box(box):
    """Label Studio's percent coordinates of a box on pixel edges give exactly its pixels, as a rectangle
    and as the polygon of its corners; a keypoint at a pixel's centre covers that pixel."""
    w, h, x0, y0, bw, bh = box
    want = np.zeros((h, w), dtype=bool)
    want[y0:y0 + bh, x0:x0 + bw] = True
    px, py = (lambda v: 100 * v / w), (lambda v: 100 * v / h)
    rect = Region.from_ls_rectangle(px(x0), py(y0), px(bw), py(bh), 0, w, h)
    assert np.array_equal(rect.mask, want)
    corners = [[px(x0), py(y0)], [px(x0 + bw), py(y0)], [px(x0 + bw), py(y0 + bh)], [px(x0), py(y0 + bh)]]
    assert np.array_equal(Region.from_ls_polygon(corners, w, h).mask, want)
    assert Region.from_ls_keypoint(px(x0 + 0.5), py(y0 + 0.5), w, h).mask[y0, x0]


def _mask_or_none(call):
    try:
        return call().mask
    except RegionError:  # turned out of the image entirely
        return None


@FUZZ
@given(box=pixel_boxes(), turn=st.floats(-720, 720, allow_nan=False))
def test_a_full_turn_changes_no_rectangle_pixel(box, turn):
    w, h, x0, y0, bw, bh = box
    px, py = (lambda v: 100 * v / w), (lambda v: 100 * v / h)
    a = _mask_or_none(lambda: Region.from_ls_rectangle(px(x0), py(y0), px(bw), py(bh), turn, w, h))
    b = _mask_or_none(lambda: Region.from_ls_rectangle(px(x0), py(y0), px(bw), py(bh), turn + 360, w, h))
    assert (a is None and b is None) or (a is not None and b is not None and np.array_equal(a, b))


# ---- Label Studio result lists (the parser in front of the decoders) -------------------------------------

_TYPES = st.sampled_from(["brushlabels", "brush", "polygonlabels", "polygon", "rectanglelabels", "rectangle",
                          "ellipselabels", "keypointlabels", "choices", "textarea", "labels", "taxonomy", "x"])
_VALUE_KEYS = st.sampled_from(["format", "rle", "points", "x", "y", "width", "height", "rotation", "radiusX",
                               "radiusY", "brushlabels", "polygonlabels", "rectanglelabels", "keypointlabels",
                               "choices", "text", "labels"])
_items = st.fixed_dictionaries(
    {"type": st.one_of(_TYPES, scalars)},
    optional={"id": st.one_of(st.text(max_size=6), scalars), "from_name": st.one_of(st.sampled_from(
        ["category", "color", "caption", "tag", "label", "x"]), scalars), "to_name": st.one_of(st.just("image"),
        scalars), "value": st.one_of(st.dictionaries(_VALUE_KEYS, json_values, max_size=6), json_values),
        "original_width": st.one_of(dims, scalars), "original_height": st.one_of(dims, scalars),
        "image_rotation": st.one_of(numbers, scalars)})


@pytest.fixture(scope="module")
def plans():
    from pathlib import Path

    from backend.labelstudio.config import parse_label_config

    root = Path(__file__).resolve().parents[2] / "deploy" / "labelstudio"
    return [parse_label_config(p.read_text()) for p in sorted(root.glob("*.xml"))]


@FUZZ
@given(result=st.one_of(st.lists(st.one_of(_items, json_values), max_size=6), json_values), smart=st.booleans())
def test_label_studio_result_lists_raise_only_input_errors(plans, result, smart):
    """Whatever a client puts in a task's result list (or an interactive context), the parser answers with
    region specs or one of the project's input errors (a 4xx), never anything else."""
    from backend.errors import INPUT_ERRORS
    from backend.labelstudio.regions import parse_context, parse_results

    for plan in plans:
        try:
            parse_results(result, plan, smart=smart)
            parse_context({"result": result}, plan)
        except INPUT_ERRORS as e:
            assert str(e)
