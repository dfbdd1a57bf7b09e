"""Region construction and export: round trips against pycocotools and the Label Studio SDK, geometry
of every Label Studio tool, and a clear RegionError for every malformed input."""

from __future__ import annotations

import json
import math
import pickle
import subprocess
import sys

import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle, encode_rle, mask2rle
from pycocotools import mask as coco_mask

from osprey_core.errors import RegionError
from osprey_core.regions import MAX_PIXELS, Region


def blob(h: int, w: int, seed: int) -> np.ndarray:
    """A random mask with a few rectangles and noise: many runs, holes and edges."""
    rng = np.random.default_rng(seed)
    m = np.zeros((h, w), dtype=bool)
    for _ in range(4):
        y0, x0 = rng.integers(0, h - 2), rng.integers(0, w - 2)
        m[y0 : y0 + rng.integers(1, h // 2), x0 : x0 + rng.integers(1, w // 2)] = True
    m ^= rng.random((h, w)) < 0.05
    m[0, 0] = True
    return m


def column_major_runs(m: np.ndarray) -> list[int]:
    """Uncompressed COCO counts computed independently of pycocotools: runs of the Fortran-order
    flattening, starting with a (possibly empty) run of zeros."""
    flat = m.ravel(order="F").astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    edges = np.r_[0, change, flat.size]
    runs = np.diff(edges).tolist()
    return ([0] + runs) if flat[0] else runs


# ---------------------------------------------------------------------- plain masks and properties


@pytest.mark.parametrize(
    "mask",
    [
        np.array([[0, 1], [1, 0]], dtype=np.uint8),
        np.array([[0, 255], [255, 0]], dtype=np.uint8),
        np.array([[0.0, 0.3], [-2.0, 0.0]]),
        np.array([[False, True], [True, False]]),
        [[0, 1], [1, 0]],
    ],
)
def test_from_mask_nonzero_is_inside(mask):
    r = Region.from_mask(mask, (2, 2))
    assert r.mask.dtype == bool
    assert r.mask.tolist() == [[False, True], [True, False]]


def test_mask_is_a_read_only_copy():
    src = np.zeros((4, 5), dtype=bool)
    src[1:3, 1:4] = True
    r = Region.from_mask(src, id="a")
    src[:] = False
    assert r.area == 6
    with pytest.raises(ValueError):
        r.mask[0, 0] = True
    with pytest.raises(AttributeError):
        r.id = "b"  # frozen


def test_properties():
    m = np.zeros((30, 40), dtype=bool)
    m[5:20, 10:30] = True
    r = Region(m, id="r1")
    assert (r.height, r.width, r.size) == (30, 40, (40, 30))
    assert r.area == 300
    assert r.bbox == (10, 5, 30, 20)
    assert "r1" in repr(r) and "40x30" in repr(r)
    assert r == Region(m.copy(), id="r1")
    assert r != Region(m, id="other")
    assert r.with_id("x").id == "x" and r.with_id("x").mask is r.mask
    assert Region(np.zeros((3, 3)), allow_empty=True).bbox == (0, 0, 0, 0)


def test_pickle_keeps_mask_read_only():
    r = Region.from_box(1, 1, 4, 4, 6, 6, id="p")
    back = pickle.loads(pickle.dumps(r))
    assert back == r
    assert not back.mask.flags.writeable


def test_from_mask_errors():
    with pytest.raises(RegionError, match="mask is 10x10 but image is 20x20"):
        Region.from_mask(np.ones((10, 10)), (20, 20))
    with pytest.raises(RegionError, match="region is empty"):
        Region.from_mask(np.zeros((10, 10)))
    assert Region.from_mask(np.zeros((10, 10)), allow_empty=True).area == 0
    with pytest.raises(RegionError, match="must be 2-D"):
        Region.from_mask(np.ones((4, 4, 3)))
    with pytest.raises(RegionError, match="NaN"):
        Region.from_mask(np.array([[1.0, np.nan]]))
    with pytest.raises(RegionError, match="boolean or numeric"):
        Region.from_mask(np.array([["a", "b"]]))
    with pytest.raises(RegionError, match="zero-size"):
        Region.from_mask(np.ones((0, 4)))
    with pytest.raises(RegionError, match="image_size must be a pair"):
        Region.from_mask(np.ones((4, 4)), 4)
    with pytest.raises(RegionError, match="id must be a string"):
        Region(np.ones((2, 2)), id=3)


@pytest.mark.parametrize(
    ("width", "height", "match"),
    [
        (0, 10, "width must be a positive integer"),
        (10.5, 10, "width must be a positive integer"),
        ("10", 10, "width must be a positive integer"),
        (10, -1, "height must be a positive integer"),
        (True, 10, "width must be a positive integer"),
        (1 << 15, 1 << 15, "pixel limit"),
    ],
)
def test_bad_image_dimensions(width, height, match):
    assert (1 << 30) > MAX_PIXELS
    with pytest.raises(RegionError, match=match):
        Region.from_ls_rectangle(10, 10, 20, 20, 0, width, height)


# ---------------------------------------------------------------------- COCO


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_coco_rle_round_trip_against_pycocotools(seed):
    m = blob(37, 53, seed)
    ours = Region.from_mask(m).to_coco_rle()
    theirs = coco_mask.encode(np.asfortranarray(m.astype(np.uint8)))
    assert ours == {"size": [37, 53], "counts": theirs["counts"].decode()}
    json.dumps(ours)  # JSON-safe for job payloads
    assert np.array_equal(Region.from_coco_rle(ours).mask, m)
    assert np.array_equal(Region.from_coco_rle(theirs, 37, 53).mask, m)  # bytes counts
    uncompressed = {"size": [37, 53], "counts": column_major_runs(m)}
    assert np.array_equal(Region.from_coco_rle(uncompressed, 37, 53).mask, m)


def test_coco_uncompressed_rle_starting_inside():
    m = np.zeros((4, 3), dtype=bool)
    m[:, 0] = True  # the first run (of zeros) is empty
    rle = {"size": [4, 3], "counts": [0, 4, 8]}
    assert np.array_equal(Region.from_coco_rle(rle).mask, m)


@pytest.mark.parametrize(
    ("rle", "match"),
    [
        ([1, 2], "must be a dict"),
        ({"counts": "5:3"}, "needs 'size' and 'counts'"),
        ({"size": [20], "counts": "5:3"}, "RLE size must be a pair"),
        ({"size": [0, 20], "counts": "5:3"}, "height must be a positive integer"),
        ({"size": [20, 20], "counts": "5:3"}, "RLE counts sum to 18 but height\\*width = 400"),
        ({"size": [20, 20], "counts": "5:Q<Q<"}, "sum to 795"),
        (
            {"size": [20, 20], "counts": "O"},
            "RLE count -1 at index 0 is outside \\[0, height\\*width = 400\\]",
        ),
        ({"size": [20, 20], "counts": ""}, "sum to 0"),
        ({"size": [20, 20], "counts": "5:Q"}, "truncated"),
        ({"size": [20, 20], "counts": "5:\x7f"}, "invalid character"),
        ({"size": [20, 20], "counts": "5:é"}, "ASCII"),
        ({"size": [20, 20], "counts": [5, 10, 3]}, "RLE counts sum to 18 but height\\*width = 400"),
        ({"size": [20, 20], "counts": [500, -100]}, "must not be negative"),
        ({"size": [20, 20], "counts": [5, 10.5, 385]}, "must contain integers"),
        ({"size": [20, 20], "counts": [401]}, "exceeds height\\*width"),
        ({"size": [20, 20], "counts": 400}, "must be a string or a list"),
        ({"size": [20, 20], "counts": [400]}, "region is empty"),
    ],
)
def test_bad_coco_rle(rle, match):
    with pytest.raises(RegionError, match=match):
        Region.from_coco_rle(rle)


def test_coco_rle_size_must_match_image():
    rle = Region.from_box(0, 0, 5, 5, 20, 10).to_coco_rle()
    with pytest.raises(RegionError, match="RLE is 20x10 but image is 10x20"):
        Region.from_coco_rle(rle, height=20, width=10)
    with pytest.raises(RegionError, match="both height and width"):
        Region.from_coco_rle(rle, height=10)


def test_coco_polygons_match_pycocotools():
    polys = [[10.5, 4.0, 60.0, 8.0, 40.0, 35.5], [70, 30, 90, 30, 90, 45, 70, 45]]
    expected = coco_mask.decode(coco_mask.merge(coco_mask.frPyObjects(polys, 48, 96))).astype(bool)
    r = Region.from_coco_polygons(polys, 48, 96)
    assert np.array_equal(r.mask, expected)
    assert r == Region.from_coco_segmentation(polys, 48, 96)
    assert Region.from_coco_segmentation(r.to_coco_rle(), 48, 96) == r


@pytest.mark.parametrize(
    ("polygons", "match"),
    [
        ([], "non-empty list"),
        ("0,0,1,1", "non-empty list"),
        ([[0, 0, 5, 5]], "polygon needs at least 3 points, got 2"),
        ([[0, 0, 5, 5, 9]], "odd number of coordinates \\(5\\)"),
        ([[0, 0, 5, 0, 5, 5, float("nan"), 4]], "coordinate NaN at point 3"),
        ([[0, 0, 5, 0, 5, 5], [1, 1, 2, float("inf"), 3, 3]], "coordinate inf at point 1 of polygon 1"),
        ([[[0, 0], [5, 0], [5, 5]]], "flat list of numbers"),
        ([[0, 0, 5, 0, "5", 5]], "flat list of numbers"),
        ([[200, 200, 300, 200, 300, 300]], "region is empty"),
    ],
)
def test_bad_coco_polygons(polygons, match):
    with pytest.raises(RegionError, match=match):
        Region.from_coco_polygons(polygons, 48, 96)


# ---------------------------------------------------------------------- Label Studio brush


@pytest.mark.parametrize("seed", [0, 1])
def test_brush_round_trip_against_label_studio_sdk(seed):
    m = blob(31, 47, seed)
    sdk_rle = mask2rle(m.astype(np.uint8) * 255)
    assert np.array_equal(Region.from_ls_brush(sdk_rle, 47, 31).mask, m)
    ours = Region.from_mask(m).to_ls_brush()
    assert all(isinstance(v, int) and 0 <= v <= 255 for v in ours)
    rgba = decode_rle(ours).reshape(31, 47, 4)
    assert np.array_equal(rgba[:, :, 3], np.where(m, 255, 0))  # alpha 255: visible in the frontend


def test_brush_uses_alpha_channel_of_rgba():
    """The frontend stores coloured RGBA; only alpha decides membership, any nonzero alpha counts."""
    h, w = 6, 9
    rgba = np.zeros((h, w, 4), dtype=np.uint8)
    rgba[..., 0] = 200  # colour everywhere, even outside the region
    rgba[1:4, 2:7, 3] = 255
    rgba[5, 8, 3] = 1  # a 0/1-style mask pixel still belongs to the region
    r = Region.from_ls_brush(encode_rle(rgba.ravel()), w, h)
    expected = rgba[..., 3] > 0
    assert np.array_equal(r.mask, expected)


def test_bad_brush_rle():
    rle = mask2rle(np.full((20, 15), 255, dtype=np.uint8))  # 15 wide, 20 high
    with pytest.raises(RegionError, match="brush RLE decodes to 1200 values but width\\*height\\*4 = 1600"):
        Region.from_ls_brush(rle, 20, 20)
    with pytest.raises(RegionError, match="too short"):
        Region.from_ls_brush(rle[:3], 15, 20)
    with pytest.raises(RegionError, match="truncated or corrupt"):
        Region.from_ls_brush(rle[:8], 15, 20)
    with pytest.raises(RegionError, match="byte values 0..255"):
        Region.from_ls_brush([*rle[:-1], 256], 15, 20)
    with pytest.raises(RegionError, match="must contain integers"):
        Region.from_ls_brush([*rle[:-1], 1.5], 15, 20)
    with pytest.raises(RegionError, match="must be a list of integers"):
        Region.from_ls_brush("abc", 15, 20)
    bad_word = list(rle)
    bad_word[4] = (15 << 3) | (bad_word[4] & 0b111)  # word size 16
    with pytest.raises(RegionError, match="word size is 16 bits, expected 8"):
        Region.from_ls_brush(bad_word, 15, 20)
    empty = mask2rle(np.zeros((20, 15), dtype=np.uint8))
    with pytest.raises(RegionError, match="region is empty"):
        Region.from_ls_brush(empty, 15, 20)
    assert Region.from_ls_brush(empty, 15, 20, allow_empty=True).area == 0


# ---------------------------------------------------------------------- Label Studio shapes


def test_ls_polygon_in_percent():
    # a square 10%..60% of a 200x100 image is pixels x 20..120, y 10..60
    r = Region.from_ls_polygon([[10, 10], [60, 10], [60, 60], [10, 60]], 200, 100, id="p")
    assert r == Region.from_box(20, 10, 120, 60, 200, 100, id="p")
    tri = Region.from_ls_polygon([[10, 10], [90, 10], [50, 90]], 400, 300)
    assert tri.area == pytest.approx(0.5 * 320 * 240, rel=0.01)
    coco = Region.from_coco_polygons([[40, 30, 360, 30, 200, 270]], 300, 400)
    iou = (tri.mask & coco.mask).sum() / (tri.mask | coco.mask).sum()
    assert iou > 0.99


def test_polygon_even_odd_fill():
    # a pentagram: its inner pentagon is outside under the even-odd rule
    angles = np.radians(-90 + 144 * np.arange(5))
    pts = np.stack([50 + 45 * np.cos(angles), 50 + 45 * np.sin(angles)], axis=1)
    r = Region.from_polygon(pts.tolist(), 100, 100)
    assert r.mask[15, 50]  # a tip
    assert not r.mask[52, 50]  # the centre


def test_rectangle_rotation_zero_is_the_box_mask():
    r = Region.from_ls_rectangle(25, 10, 50, 40, 0, 200, 100)
    m = np.zeros((100, 200), dtype=bool)
    m[10:50, 50:150] = True
    assert np.array_equal(r.mask, m)
    assert r == Region.from_ls_rectangle(25, 10, 50, 40, 360, 200, 100)
    assert r == Region.from_polygon([[50, 10], [150, 10], [150, 50], [50, 50]], 200, 100)


def test_rectangle_rotation_90_turns_about_the_top_left_corner():
    # 40x20 px box at (100, 50) turned 90 deg clockwise: it now spans x 80..100, y 50..90
    r = Region.from_ls_rectangle(50, 25, 20, 10, 90, 200, 200)
    assert r.area == 40 * 20
    assert r.bbox == (80, 50, 100, 90)
    assert r == Region.from_box(80, 50, 100, 90, 200, 200)
    assert Region.from_ls_rectangle(50, 25, 20, 10, -270, 200, 200) == r


def test_rectangle_rotation_45_keeps_area():
    r = Region.from_ls_rectangle(40, 20, 20, 10, 45, 400, 400)
    assert r.area == pytest.approx(80 * 40, rel=0.03)
    x0, y0, x1, y1 = r.bbox
    assert x0 >= 160 - 40 / math.sqrt(2) - 1 and y1 <= 80 + 120 / math.sqrt(2) + 1


def test_ellipse_area_and_rotation():
    e = Region.from_ls_ellipse(50, 50, 20, 10, 0, 1000, 1000)  # rx=200 px, ry=100 px
    assert e.area == pytest.approx(math.pi * 200 * 100, rel=0.005)
    assert e.bbox == (300, 400, 700, 600)
    turned = Region.from_ls_ellipse(50, 50, 20, 10, 90, 1000, 1000)
    assert turned == Region.from_ls_ellipse(50, 50, 10, 20, 0, 1000, 1000)
    tilted = Region.from_ls_ellipse(50, 50, 20, 10, 30, 1000, 1000)
    assert tilted.area == pytest.approx(math.pi * 200 * 100, rel=0.005)
    # clockwise (y down): the major axis of a +30 deg ellipse points to lower right
    dx, dy = 150 * math.cos(math.radians(30)), 150 * math.sin(math.radians(30))
    assert tilted.mask[int(500 + dy), int(500 + dx)] and not tilted.mask[int(500 - dy), int(500 + dx)]


def test_keypoint_disk():
    k = Region.from_ls_keypoint(50, 25, 400, 200, radius_px=10)
    assert k.area == pytest.approx(math.pi * 100, rel=0.05)
    assert k.mask[50, 200]
    assert Region.from_ls_keypoint(50, 25, 400, 200).area >= 25  # default radius >= 3 px
    tiny = Region.from_ls_keypoint(100, 100, 50, 40, radius_px=0.1)  # bottom-right corner
    assert tiny.area == 1 and tiny.mask[39, 49]
    assert Region.from_point(200, 50, 400, 200, 10) == k


def test_scribble_strokes():
    s = Region.from_scribble([[(20, 50), (180, 50)]], 200, 100, thickness=10)
    assert s.area == pytest.approx(160 * 10 + math.pi * 25, rel=0.05)
    assert s.bbox == (15, 45, 185, 55)
    # a bent stroke equals "pixel centres within thickness/2 of the polyline", computed directly
    pts = np.array([(10.0, 10.0), (90.0, 80.0), (30.0, 95.0)])
    bent = Region.from_scribble([pts.tolist()], 100, 100, thickness=7)
    yy, xx = np.mgrid[:100, :100] + 0.5
    dist = np.full((100, 100), np.inf)
    for a, b in zip(pts[:-1], pts[1:], strict=True):
        t = np.clip(((xx - a[0]) * (b - a)[0] + (yy - a[1]) * (b - a)[1]) / ((b - a) ** 2).sum(), 0, 1)
        dist = np.minimum(dist, np.hypot(xx - a[0] - t * (b - a)[0], yy - a[1] - t * (b - a)[1]))
    assert (bent.mask ^ (dist <= 3.5)).sum() <= 2  # at most boundary ties differ
    two = Region.from_scribble([[(20, 50), (180, 50)], [(100, 80)]], 200, 100, thickness=10)
    assert two.area == pytest.approx(s.area + math.pi * 25, rel=0.05)
    pct = Region.from_scribble([[(10, 50), (90, 50)]], 200, 100, thickness=10, percent=True)
    assert pct == s


# ---------------------------------------------------------------------- malformed Label Studio input


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (
            lambda: Region.from_ls_polygon([[1, 1], [5, 5]], 100, 100),
            "polygon needs at least 3 points, got 2",
        ),
        (
            lambda: Region.from_ls_polygon([[1, 1], [5, 5], [9, 1], [float("nan"), 3]], 100, 100),
            "coordinate NaN at point 3",
        ),
        (
            lambda: Region.from_ls_polygon([[1, 1], [140, 5], [9, 1]], 100, 100),
            "x=140.0% out of range \\[0,100\\] at point 1",
        ),
        (lambda: Region.from_ls_polygon([[1, 1], [5, -3], [9, 1]], 100, 100), "y=-3.0% out of range"),
        (
            lambda: Region.from_ls_polygon([[1, 1], [5, "a"], [9, 1]], 100, 100),
            "'a' at point 1 is not a number",
        ),
        (lambda: Region.from_ls_polygon([[1, 1], [5], [9, 1]], 100, 100), "point 1 must be \\[x, y\\]"),
        (lambda: Region.from_ls_polygon("1,1", 100, 100), "must be a list of \\[x, y\\] points"),
        (lambda: Region.from_ls_polygon([[1, 1], [1.2, 1], [1.4, 1]], 100, 100), "region is empty"),
        (lambda: Region.from_ls_rectangle(140, 10, 10, 10, 0, 100, 100), "x=140.0% out of range \\[0,100\\]"),
        (lambda: Region.from_ls_rectangle(10, 10, 0, 10, 0, 100, 100), "width=0.0% out of range"),
        (lambda: Region.from_ls_rectangle(10, 10, 10, 130, 0, 100, 100), "height=130.0% out of range"),
        (lambda: Region.from_ls_rectangle(float("nan"), 10, 10, 10, 0, 100, 100), "x must be finite"),
        (lambda: Region.from_ls_rectangle(10, 10, 10, 10, None, 100, 100), "rotation must be a number"),
        (lambda: Region.from_ls_rectangle(10, 10, 0.1, 0.1, 0, 100, 100), "region is empty"),
        (lambda: Region.from_ls_ellipse(50, 50, 0, 10, 0, 100, 100), "radiusX=0.0% out of range"),
        (lambda: Region.from_ls_ellipse(50, 50, 10, -1, 0, 100, 100), "radiusY=-1.0% out of range"),
        (lambda: Region.from_ls_ellipse(50, 101, 10, 10, 0, 100, 100), "y=101.0% out of range"),
        (lambda: Region.from_ls_keypoint(-5, 50, 100, 100), "x=-5.0% out of range"),
        (lambda: Region.from_ls_keypoint(5, 50, 100, 100, radius_px=0), "radius_px must be > 0"),
        (lambda: Region.from_point(150, 50, 100, 100), "outside the 100x100 image"),
        (lambda: Region.from_box(10, 10, 5, 20, 100, 100), "x0 < x1"),
        (lambda: Region.from_box(200, 200, 300, 300, 100, 100), "region is empty"),
        (lambda: Region.from_scribble([], 100, 100, 5), "at least one stroke"),
        (lambda: Region.from_scribble([[(1, 1)]], 100, 100, 0), "thickness must be > 0"),
        (lambda: Region.from_scribble([[]], 100, 100, 5), "stroke of stroke 0 needs at least 1 point, got 0"),
        (
            lambda: Region.from_scribble([[(1, 1), (2, float("inf"))]], 100, 100, 5),
            "coordinate inf at point 1 of stroke 0",
        ),
        (
            lambda: Region.from_scribble([[(1, 1), (200, 2)]], 100, 100, 5, percent=True),
            "x=200.0% out of range",
        ),
        (lambda: Region.from_scribble([[(500, 500), (600, 600)]], 100, 100, 5), "region is empty"),
    ],
)
def test_malformed_shapes_raise_region_error(build, match):
    with pytest.raises(RegionError, match=match):
        build()


def test_percent_tolerance_for_float_noise():
    r = Region.from_ls_rectangle(0, 0, 100.0000000001, 100, 0, 20, 10)
    assert r.area == 200
    p = Region.from_ls_polygon([[-1e-9, 0], [100.0000001, 0], [100, 100]], 20, 10)
    assert p.area > 0


# ---------------------------------------------------------------------- scale and lightness


def test_large_image_round_trips():
    """A 4000x3000 ellipse through COCO RLE and brush RLE (speed matters here; no timing assert)."""
    r = Region.from_ls_ellipse(50, 50, 40, 30, 15, 4000, 3000)
    assert r.size == (4000, 3000)
    assert Region.from_coco_rle(r.to_coco_rle(), 3000, 4000) == r
    assert Region.from_ls_brush(r.to_ls_brush(), 4000, 3000) == r


def test_regions_module_does_not_import_torch():
    code = "import sys, osprey_core.regions, osprey_core.sam; assert 'torch' not in sys.modules, 'torch imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
