"""Neutral region geometry: cheap structural checks anywhere, rasterising only in the worker.

A `RegionSpec.geometry` is one of (pixel units of the `width` x `height` image the region was drawn on):

    {"kind": "rle", "size": [h, w], "counts": "..." | [ints]}      COCO RLE
    {"kind": "brush_rle", "rle": [bytes]}                           Label Studio's RGBA brush RLE (not decoded
                                                                    before the worker, see below)
    {"kind": "polygon", "points": [[x, y], ...]}
    {"kind": "box", "x", "y", "width", "height", "rotation": deg}  top-left corner, clockwise about it
    {"kind": "ellipse", "cx", "cy", "rx", "ry", "rotation": deg}   clockwise about the centre
    {"kind": "points", "points": [[x, y], ...], "positive": [bool]} clicks (a SAM prompt; else small disks)

Why two steps: a request of a few KB can claim a 16384x16384 image; rasterising at the claimed size is
gigabytes. `check_geometry` validates structure in O(payload) without allocating a raster (the web process
calls it while parsing); `rasterise` runs in the worker after `check_size` compared the claimed size with
the real image, so masks never exceed the image that was actually fetched (and the media limits).
`outline` goes the other way, mask -> polygon or box, for tools that cannot show a mask (auto-labeling
proposals for a Polygon or Rectangle tool); it too runs only in the worker.
Coordinates are snapped to 1e-9 px before filling, exactly as `osprey_core.regions` does for Label Studio
shapes, so a shape converted to pixels gives the same mask as the core's percent constructors.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np

from backend.service.tasks import RegionSpec
from osprey_core.errors import RegionError
from osprey_core.regions import MAX_PIXELS, Region

KINDS = ("rle", "brush_rle", "polygon", "box", "ellipse", "points")
OUTLINES = ("polygon", "box")  # what `outline` makes of a mask
OUTLINE_TOLERANCE_PX = 1.0  # polygon simplification: no vertex moves the outline by more than this
MAX_POINTS = 100_000  # vertices of one polygon / clicks of one prompt
MAX_RLE_VALUES = 4_000_000  # values of one brush RLE or uncompressed COCO RLE (a request limit bounds it too)
MAX_RLE_CHARS = 8_000_000  # length of a compressed COCO RLE string
MAX_REGIONS = 1_000  # regions of one task


def check_size(spec: RegionSpec, image_size: tuple[int, int]) -> None:
    """The region must have been drawn on this image (checked before anything is rasterised)."""
    width, height = image_size
    if spec.size != (width, height):
        raise RegionError(
            f"region {spec.id!r} was drawn on a {spec.width}x{spec.height} image but the task's image is "
            f"{width}x{height} (was the image replaced or EXIF-rotated?)"
        )


def check_geometry(geometry: Any, width: int, height: int) -> None:
    """Structural validation without a raster: kinds, numbers, counts and RLE headers; `RegionError`."""
    if isinstance(width, bool) or isinstance(height, bool) or not isinstance(width, int) or not isinstance(height, int):
        raise RegionError(f"image size must be integers, got {width!r}x{height!r}")
    if width <= 0 or height <= 0:
        raise RegionError(f"image size must be positive, got {width}x{height}")
    if width * height > MAX_PIXELS:
        raise RegionError(f"image {width}x{height} exceeds the {MAX_PIXELS}-pixel limit")
    if not isinstance(geometry, dict):
        raise RegionError(f"geometry must be an object, got {type(geometry).__name__}")
    kind = geometry.get("kind")
    if kind == "brush_rle":
        _check_brush(geometry.get("rle"), width, height)
    elif kind == "rle":
        _check_coco(geometry, width, height)
    elif kind == "polygon":
        _points(geometry.get("points"), "polygon", 3)
    elif kind == "box":
        for key in ("x", "y", "rotation"):
            number(geometry.get(key, 0), key)
        for key in ("width", "height"):
            if number(geometry.get(key), key) <= 0:
                raise RegionError(f"box {key} must be > 0, got {geometry.get(key)!r}")
    elif kind == "ellipse":
        for key in ("cx", "cy", "rotation"):
            number(geometry.get(key, 0), key)
        for key in ("rx", "ry"):
            if number(geometry.get(key), key) <= 0:
                raise RegionError(f"ellipse {key} must be > 0, got {geometry.get(key)!r}")
    elif kind == "points":
        points = _points(geometry.get("points"), "points", 1)
        positive = geometry.get("positive", [True] * len(points))
        if not isinstance(positive, list) or len(positive) != len(points) or not all(isinstance(p, bool) for p in positive):
            raise RegionError("points.positive must be a list of booleans, one per point")
    else:
        raise RegionError(f"unknown geometry kind {kind!r}; expected one of {', '.join(KINDS)}")


def positive(spec: RegionSpec) -> bool:
    """False for a prompt made only of negative clicks (it only steers SAM, nothing to label)."""
    if spec.kind != "points":
        return True
    return any(spec.geometry.get("positive", [True]))


def click_prompt(spec: RegionSpec) -> tuple[list[tuple[float, float]], list[int]]:
    """A points geometry as SAM's (points, labels), clicks clamped onto the image."""
    pts = [(min(max(float(x), 0.0), float(spec.width)), min(max(float(y), 0.0), float(spec.height)))
           for x, y in spec.geometry["points"]]
    flags = spec.geometry.get("positive", [True] * len(pts))
    return pts, [int(bool(f)) for f in flags]


def rasterise(spec: RegionSpec, image_size: tuple[int, int]) -> Region:
    """The mask of `spec` on an image of `image_size` (width, height); checks the size first."""
    check_size(spec, image_size)
    check_geometry(spec.geometry, spec.width, spec.height)
    g, w, h = spec.geometry, spec.width, spec.height
    kind = g["kind"]
    if kind == "brush_rle":
        return Region.from_ls_brush(g["rle"], w, h, id=spec.id)
    if kind == "rle":
        return Region.from_coco_rle({"size": g["size"], "counts": g["counts"]}, h, w, id=spec.id)
    if kind == "polygon":
        return Region.from_polygon(_snap(np.asarray(g["points"], dtype=np.float64)), w, h, id=spec.id)
    if kind == "box":
        return _box(g, w, h, spec.id)
    if kind == "ellipse":
        cx, cy, rx, ry = _snap(np.array([g["cx"], g["cy"], g["rx"], g["ry"]], dtype=np.float64))
        return Region.from_ellipse(cx, cy, rx, ry, g.get("rotation", 0), w, h, id=spec.id)
    # points: the no-SAM stand-in, a small disk at every positive click
    pts, flags = click_prompt(spec)
    disks = [Region.from_point(*_snap(np.array(p)), w, h) for p, f in zip(pts, flags, strict=True) if f]
    if not disks:
        raise RegionError(f"region {spec.id!r} has only negative clicks: nothing to label")
    if len(disks) == 1:
        return disks[0].with_id(spec.id)
    return Region(np.logical_or.reduce([d.mask for d in disks]), id=spec.id)


def _box(g: dict, w: int, h: int, region_id: str) -> Region:
    """As `Region.from_ls_rectangle`, in pixels: rotated about the top-left corner."""
    X, Y, W, H = _snap(np.array([g["x"], g["y"], g["width"], g["height"]], dtype=np.float64))
    theta = math.radians(float(g.get("rotation", 0)) % 360)
    c, s = math.cos(theta), math.sin(theta)
    corners = _snap(np.array([[X, Y], [X + W * c, Y + W * s], [X + W * c - H * s, Y + W * s + H * c],
                              [X - H * s, Y + H * c]]))
    if theta == 0:
        x0, y0 = corners.min(axis=0)
        x1, y1 = corners.max(axis=0)
        if x1 <= x0 or y1 <= y0:
            raise RegionError(f"region {region_id!r}: the box is thinner than a pixel")
        return Region.from_box(x0, y0, x1, y1, w, h, id=region_id)
    return Region.from_polygon(corners, w, h, id=region_id)


def _snap(values: np.ndarray) -> np.ndarray:
    return np.round(np.asarray(values, dtype=np.float64), 9)


def number(v: Any, name: str) -> float:
    if not isinstance(v, numbers.Real) or isinstance(v, bool):
        raise RegionError(f"{name} must be a number, got {v!r}")
    f = float(v)
    if not math.isfinite(f):
        raise RegionError(f"{name} must be finite, got {f}")
    return f


def _points(points: Any, what: str, min_points: int) -> Sequence:
    if not isinstance(points, list):
        raise RegionError(f"{what} must be a list of [x, y] points, got {type(points).__name__}")
    if len(points) < min_points:
        plural = "s" if min_points > 1 else ""
        raise RegionError(f"{what} needs at least {min_points} point{plural}, got {len(points)}")
    if len(points) > MAX_POINTS:
        raise RegionError(f"{what} has {len(points)} points, above the limit of {MAX_POINTS}")
    for i, p in enumerate(points):
        if not isinstance(p, list) or len(p) != 2:
            raise RegionError(f"point {i} must be [x, y], got {p!r}")
        for v in p:
            if not isinstance(v, numbers.Real) or isinstance(v, bool):
                raise RegionError(f"coordinate {v!r} at point {i} is not a number")
            if not math.isfinite(float(v)):
                raise RegionError(f"coordinate {v} at point {i} is not finite")
    return points


def _check_brush(rle: Any, width: int, height: int) -> None:
    """Header and byte range of a Label Studio brush RLE; the body is only decoded in the worker."""
    if not isinstance(rle, list):
        raise RegionError(f"brush RLE must be a list of integers, got {type(rle).__name__}")
    if len(rle) > MAX_RLE_VALUES:
        raise RegionError(f"brush RLE has {len(rle)} values, above the limit of {MAX_RLE_VALUES}")
    for i, v in enumerate(rle):
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 255:
            raise RegionError(f"brush RLE must be a list of byte values 0..255, got {v!r} at index {i}")
    if len(rle) < 7:  # 32-bit count + 5-bit word size + 4x4-bit run sizes
        raise RegionError(f"brush RLE is too short ({len(rle)} bytes) to hold its header")
    num = int.from_bytes(bytes(rle[:4]), "big")
    if num != width * height * 4:
        raise RegionError(
            f"brush RLE decodes to {num} values but width*height*4 = {width * height * 4} "
            f"(image {width}x{height}); is original_width/original_height the natural image size?"
        )
    if (rle[4] >> 3) + 1 != 8:
        raise RegionError(f"brush RLE word size is {(rle[4] >> 3) + 1} bits, expected 8")


def _check_coco(g: dict, width: int, height: int) -> None:
    size = g.get("size")
    if size != [height, width]:
        raise RegionError(f"COCO RLE size {size!r} does not match the region's image [height, width] = "
                          f"{[height, width]}")
    counts = g.get("counts")
    if isinstance(counts, str):
        if len(counts) > MAX_RLE_CHARS:
            raise RegionError(f"COCO RLE counts have {len(counts)} characters, above the limit of {MAX_RLE_CHARS}")
    elif isinstance(counts, list):
        if len(counts) > MAX_RLE_VALUES:
            raise RegionError(f"COCO RLE has {len(counts)} counts, above the limit of {MAX_RLE_VALUES}")
    else:
        raise RegionError(f"COCO RLE counts must be a string or a list of ints, got {type(counts).__name__}")


# ---- mask -> shape (worker only) ----------------------------------------------------------------------


def outline(region: Region, kind: str, tolerance: float = OUTLINE_TOLERANCE_PX) -> dict[str, Any]:
    """A mask as a `polygon` (the outer contour of its largest part, simplified to `tolerance` px) or a
    `box` (its bounding box), neutral geometry in pixels; for tools that draw shapes, not masks."""
    if kind == "box":
        x0, y0, x1, y1 = region.bbox
        if x1 <= x0:
            raise RegionError(f"region {region.id!r} is empty: it has no bounding box")
        return {"kind": "box", "x": float(x0), "y": float(y0), "width": float(x1 - x0), "height": float(y1 - y0),
                "rotation": 0.0}
    if kind != "polygon":
        raise RegionError(f"outline kind must be one of {', '.join(OUTLINES)}, got {kind!r}")
    return {"kind": "polygon", "points": _outer_contour(region, tolerance)}


def _outer_contour(region: Region, tolerance: float) -> list[list[float]]:
    """Contour at level 0.5 between pixel centres (so a w-pixel run spans exactly w), the one enclosing
    the most area (a hole's contour always encloses less than its part's), then Douglas-Peucker."""
    from skimage.measure import approximate_polygon, find_contours

    x0, y0, x1, y1 = region.bbox
    if x1 <= x0:
        raise RegionError(f"region {region.id!r} is empty: it has no outline")
    # The bounding box only (a small object on a large image), padded so contours at its edge close.
    padded = np.pad(region.mask[y0:y1, x0:x1], 1).astype(np.uint8)
    best = max(find_contours(padded, 0.5), key=_enclosed_area)
    simple = approximate_polygon(best, tolerance=tolerance)[:-1]  # closed contour: last point == first
    if len(simple) < 3:  # a sliver thinner than the tolerance: its box corners
        return [[float(x0), float(y0)], [float(x1), float(y0)], [float(x1), float(y1)], [float(x0), float(y1)]]
    # (row, col) of the padded crop -> (x, y) with pixel (c, r) covering [c, c + 1) x [r, r + 1)
    return [[x0 + float(c) - 0.5, y0 + float(r) - 0.5] for r, c in simple]


def _enclosed_area(contour: np.ndarray) -> float:
    y, x = contour[:, 0], contour[:, 1]
    return abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))) / 2
