"""`Region`: the one region type of the core, a binary mask at image resolution.

Every annotation shape (mask, COCO RLE/polygon, Label Studio brush/polygon/rectangle/ellipse/keypoint,
scribble) becomes a mask here, so the model only ever sees masks (Osprey is a mask-level model).

Pixel convention: pixel (row r, column c) covers [c, c+1) x [r, r+1) and is inside a shape when its
centre (c+0.5, r+0.5) is; shape edges are half-open (left/top inclusive, right/bottom exclusive), so a
box from 0 to 10 covers exactly pixels 0..9. Label Studio geometry is in percent of the original image
size (protocol notes §4) and is converted to pixels first. COCO polygons go through pycocotools so they
match the masks Osprey was trained on.

This module must stay light: numpy, PIL, pycocotools and the Label Studio SDK only, never torch.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import InitVar, dataclass, field
from functools import cached_property
from typing import Any, Protocol

import numpy as np
from label_studio_sdk.converter.brush import decode_rle, mask2rle
from PIL import Image
from pycocotools import mask as coco_mask

from .errors import RegionError

logger = logging.getLogger(__name__)

# Largest image a region may cover; also keeps the 32-bit Label Studio brush header (W*H*4) valid.
MAX_PIXELS = 1 << 28
# Label Studio rounds percent coordinates in float; accept this much overshoot outside [0, 100].
PERCENT_TOLERANCE = 1e-3


class MaskRefiner(Protocol):
    """Turns a box or click prompt into a mask given the image (implemented by `sam.SamRefiner`)."""

    def box_to_mask(self, image: Any, box_xyxy: Sequence[float]) -> Region: ...

    def points_to_mask(
        self, image: Any, points: Sequence[Sequence[float]], labels: Sequence[int]
    ) -> Region: ...


@dataclass(frozen=True, eq=False)
class Region:
    """A binary HxW mask at image resolution plus an optional id (e.g. the Label Studio region id).

    The mask is copied on construction and made read-only, so a Region can be shared between threads
    and cached safely. An empty mask raises `RegionError` (it cannot be classified) unless
    `allow_empty=True`.
    """

    mask: np.ndarray = field(repr=False)
    id: str | None = None
    allow_empty: InitVar[bool] = False

    def __post_init__(self, allow_empty: bool) -> None:
        object.__setattr__(self, "mask", _as_bool_mask(self.mask))
        if self.id is not None and not isinstance(self.id, str):
            raise RegionError(f"region id must be a string or None, got {type(self.id).__name__}")
        if not allow_empty and not self.mask.any():
            raise RegionError("region is empty (no pixel inside the image)")

    # ------------------------------------------------------------------ properties

    @property
    def height(self) -> int:
        return int(self.mask.shape[0])

    @property
    def width(self) -> int:
        return int(self.mask.shape[1])

    @property
    def size(self) -> tuple[int, int]:
        """(width, height), like `PIL.Image.size`."""
        return self.width, self.height

    @cached_property
    def area(self) -> int:
        return int(np.count_nonzero(self.mask))

    @cached_property
    def bbox(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) in pixels, x1/y1 exclusive; (0, 0, 0, 0) for an empty region."""
        cols = np.flatnonzero(self.mask.any(axis=0))
        if cols.size == 0:
            return 0, 0, 0, 0
        rows = np.flatnonzero(self.mask.any(axis=1))
        return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1

    def with_id(self, id: str | None) -> Region:
        """The same (already immutable) mask under another id, without copying it."""
        if id is not None and not isinstance(id, str):
            raise RegionError(f"region id must be a string or None, got {type(id).__name__}")
        region = object.__new__(Region)
        object.__setattr__(region, "mask", self.mask)
        object.__setattr__(region, "id", id)
        return region

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Region):
            return NotImplemented
        return self.id == other.id and np.array_equal(self.mask, other.mask)

    __hash__ = None  # type: ignore[assignment]  # masks are not hashable; compare with ==

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuild through __init__ so an unpickled mask is read-only again (numpy unpickles writeable).
        return (Region, (self.mask, self.id, True))

    def __repr__(self) -> str:
        return f"Region(id={self.id!r}, size={self.width}x{self.height}, area={self.area}, bbox={self.bbox})"

    # ------------------------------------------------------------------ plain masks

    @classmethod
    def from_mask(
        cls,
        mask: Any,
        image_size: tuple[int, int] | None = None,
        *,
        id: str | None = None,
        allow_empty: bool = False,
    ) -> Region:
        """From an HxW array (bool, 0/1, 0/255, float...: nonzero means inside).

        `image_size` is (width, height) of the image the region belongs to; a mismatch raises.
        """
        m = _as_bool_mask(mask)
        if image_size is not None:
            w, h = _image_dims(*_pair(image_size, "image_size"))
            if m.shape != (h, w):
                raise RegionError(f"mask is {m.shape[1]}x{m.shape[0]} but image is {w}x{h} (width x height)")
        return cls(m, id=id, allow_empty=allow_empty)

    @classmethod
    def from_box(
        cls,
        x0: float,
        y0: float,
        x1: float,
        y1: float,
        width: int,
        height: int,
        *,
        id: str | None = None,
    ) -> Region:
        """Axis-aligned box in pixel coordinates (x1/y1 exclusive), clipped to the image."""
        w, h = _image_dims(width, height)
        x0, y0, x1, y1 = (
            _number(v, n) for v, n in zip((x0, y0, x1, y1), ("x0", "y0", "x1", "y1"), strict=True)
        )
        if x1 <= x0 or y1 <= y0:
            raise RegionError(f"box needs x0 < x1 and y0 < y1, got ({x0}, {y0}, {x1}, {y1})")
        return cls(_box_mask(x0, y0, x1, y1, w, h), id=id)

    @classmethod
    def from_polygon(
        cls,
        points: Sequence[Sequence[float]],
        width: int,
        height: int,
        *,
        id: str | None = None,
    ) -> Region:
        """Closed polygon of (x, y) points in pixel coordinates (even-odd fill, clipped to the image)."""
        w, h = _image_dims(width, height)
        xy = _points(points, "polygon", min_points=3)
        return cls(_fill_polygon(xy[:, 0], xy[:, 1], w, h), id=id)

    # ------------------------------------------------------------------ COCO

    @classmethod
    def from_coco_rle(
        cls,
        rle: Mapping[str, Any],
        height: int | None = None,
        width: int | None = None,
        *,
        id: str | None = None,
        allow_empty: bool = False,
    ) -> Region:
        """COCO RLE dict {"size": [h, w], "counts": ...}: compressed (str/bytes) or uncompressed (list).

        Counts are checked before pycocotools sees them: its decoder does not bounds-check and turns
        a bad string into uninitialised memory instead of an error.
        """
        if not isinstance(rle, Mapping):
            raise RegionError(f"COCO RLE must be a dict with 'size' and 'counts', got {type(rle).__name__}")
        if "size" not in rle or "counts" not in rle:
            raise RegionError(f"COCO RLE needs 'size' and 'counts', got keys {sorted(map(str, rle))}")
        rh, rw = _pair(rle["size"], "RLE size")
        rw, rh = _image_dims(rw, rh)
        if height is not None or width is not None:
            if height is None or width is None:
                raise RegionError("pass both height and width (or neither) to check the RLE size")
            w, h = _image_dims(width, height)
            if (rh, rw) != (h, w):
                raise RegionError(f"RLE is {rw}x{rh} but image is {w}x{h} (width x height)")
        counts = rle["counts"]
        if isinstance(counts, str):
            try:
                counts = counts.encode("ascii")
            except UnicodeEncodeError:
                raise RegionError("compressed RLE counts must be ASCII") from None
        if isinstance(counts, (bytes, bytearray)):
            runs = np.asarray(_parse_compressed_counts(bytes(counts), rh * rw), dtype=np.int64)
            _check_runs(runs, rh, rw)
            compressed = {"size": [rh, rw], "counts": bytes(counts)}
        elif isinstance(counts, (list, tuple, np.ndarray)):
            runs = _int_array(counts, "RLE counts")
            _check_runs(runs, rh, rw)
            compressed = coco_mask.frPyObjects({"size": [rh, rw], "counts": runs.tolist()}, rh, rw)
        else:
            raise RegionError(f"RLE counts must be a string or a list of ints, got {type(counts).__name__}")
        return cls(coco_mask.decode(compressed), id=id, allow_empty=allow_empty)

    @classmethod
    def from_coco_polygons(
        cls,
        polygons: Sequence[Sequence[float]],
        height: int,
        width: int,
        *,
        id: str | None = None,
    ) -> Region:
        """COCO polygon segmentation [[x1, y1, x2, y2, ...], ...] in pixels (frPyObjects + merge).

        Parts outside the image are clipped, as in COCO itself.
        """
        w, h = _image_dims(width, height)
        if not isinstance(polygons, (list, tuple)) or len(polygons) == 0:
            raise RegionError("COCO polygons must be a non-empty list of [x1, y1, x2, y2, ...] lists")
        flat = []
        for i, poly in enumerate(polygons):
            where = f" of polygon {i}" if len(polygons) > 1 else ""
            if not isinstance(poly, (list, tuple, np.ndarray)):
                raise RegionError(f"polygon {i} must be a list of coordinates, got {type(poly).__name__}")
            if not all(_is_number(v) for v in poly):
                raise RegionError(f"polygon {i} must be a flat list of numbers [x1, y1, x2, y2, ...]")
            if len(poly) % 2:
                raise RegionError(f"polygon {i} has an odd number of coordinates ({len(poly)})")
            pairs = [poly[j : j + 2] for j in range(0, len(poly), 2)]
            xy = _points(pairs, "polygon", min_points=3, where=where)
            flat.append(xy.ravel().tolist())
        rles = coco_mask.frPyObjects(flat, h, w)
        return cls(coco_mask.decode(coco_mask.merge(rles)), id=id)

    @classmethod
    def from_coco_segmentation(
        cls, segmentation: Any, height: int, width: int, *, id: str | None = None
    ) -> Region:
        """Any COCO `segmentation` field: polygon list, uncompressed or compressed RLE (spec §9.3)."""
        if isinstance(segmentation, Mapping):
            return cls.from_coco_rle(segmentation, height, width, id=id)
        return cls.from_coco_polygons(segmentation, height, width, id=id)

    def to_coco_rle(self) -> dict[str, Any]:
        """Compressed COCO RLE with `counts` as str: JSON-safe, for job payloads and COCO export."""
        rle = coco_mask.encode(np.asfortranarray(self.mask, dtype=np.uint8))
        return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}

    # ------------------------------------------------------------------ Label Studio

    @classmethod
    def from_ls_brush(
        cls,
        rle: Sequence[int],
        width: int,
        height: int,
        *,
        id: str | None = None,
        allow_empty: bool = False,
    ) -> Region:
        """Label Studio brush RLE (`value.rle`) of an image of `original_width` x `original_height`.

        The RLE packs an RGBA raster (H x W x 4); a pixel is inside when its alpha is nonzero, which is
        what the Label Studio frontend paints.
        """
        w, h = _image_dims(width, height)
        data = _int_array(rle, "brush RLE")
        if data.size and (data.min() < 0 or data.max() > 255):
            raise RegionError("brush RLE must be a list of byte values 0..255")
        if data.size < 7:  # 32-bit count + 5-bit word size + 4x4-bit run sizes
            raise RegionError(f"brush RLE is too short ({data.size} bytes) to hold its header")
        header = data[:7].astype(np.uint8).tobytes()
        num = int.from_bytes(header[:4], "big")
        if num != w * h * 4:
            raise RegionError(
                f"brush RLE decodes to {num} values but width*height*4 = {w * h * 4} "
                f"(image {w}x{h}); is original_width/original_height the natural image size?"
            )
        word_size = (header[4] >> 3) + 1
        if word_size != 8:
            raise RegionError(f"brush RLE word size is {word_size} bits, expected 8")
        try:
            flat = decode_rle(data.tolist())
        except (ValueError, IndexError, OverflowError) as e:
            raise RegionError("brush RLE is truncated or corrupt") from e
        alpha = flat.reshape(h, w, 4)[:, :, 3]
        return cls(alpha != 0, id=id, allow_empty=allow_empty)

    def to_ls_brush(self) -> list[int]:
        """Label Studio brush RLE of this mask (alpha 255 inside; 0/1 masks would be near-invisible)."""
        return [int(v) for v in mask2rle(self.mask.astype(np.uint8) * np.uint8(255))]

    @classmethod
    def from_ls_polygon(
        cls,
        points: Sequence[Sequence[float]],
        width: int,
        height: int,
        *,
        id: str | None = None,
    ) -> Region:
        """Label Studio polygon: `points` is [[x%, y%], ...] of the original image size."""
        w, h = _image_dims(width, height)
        xy = _points(points, "polygon", min_points=3)
        _check_percent(xy[:, 0], "x")
        _check_percent(xy[:, 1], "y")
        xy = _snap(xy * np.array([w, h]) / 100)
        return cls(_fill_polygon(xy[:, 0], xy[:, 1], w, h), id=id)

    @classmethod
    def from_ls_rectangle(
        cls,
        x: float,
        y: float,
        w: float,
        h: float,
        rotation: float,
        width: int,
        height: int,
        *,
        refiner: MaskRefiner | None = None,
        image: Any = None,
        id: str | None = None,
    ) -> Region:
        """Label Studio rectangle: top-left (x%, y%), size (w%, h%), `rotation` degrees clockwise about
        the top-left corner. With a `refiner` (SAM) and the `image`, the box prompt becomes an object mask;
        without one the rectangle itself is the mask.
        """
        iw, ih = _image_dims(width, height)
        x, y = _number(x, "x"), _number(y, "y")
        _check_percent(np.array([x]), "x")
        _check_percent(np.array([y]), "y")
        w, h = _number(w, "width"), _number(h, "height")
        for name, v in (("width", w), ("height", h)):
            if not 0 < v <= 100 + PERCENT_TOLERANCE:
                raise RegionError(f"rectangle {name}={v}% out of range (0,100]")
        theta = math.radians(_number(rotation, "rotation") % 360)
        X, Y, W, H = _snap(np.array([x * iw, y * ih, w * iw, h * ih]) / 100)
        c, s = math.cos(theta), math.sin(theta)
        corners = _snap(
            np.array(
                [
                    [X, Y],
                    [X + W * c, Y + W * s],
                    [X + W * c - H * s, Y + W * s + H * c],
                    [X - H * s, Y + H * c],
                ]
            )
        )
        x0, y0 = corners.min(axis=0)
        x1, y1 = corners.max(axis=0)
        if theta == 0:
            shape = _box_mask(x0, y0, x1, y1, iw, ih)
        else:
            shape = _fill_polygon(corners[:, 0], corners[:, 1], iw, ih)
        if refiner is not None:
            box = (max(x0, 0.0), max(y0, 0.0), min(x1, float(iw)), min(y1, float(ih)))
            refined = _refine(lambda: refiner.box_to_mask(image, box), image, iw, ih)
            if refined is not None:
                return refined.with_id(id)
        return cls(shape, id=id)

    @classmethod
    def from_ls_ellipse(
        cls,
        x: float,
        y: float,
        radius_x: float,
        radius_y: float,
        rotation: float,
        width: int,
        height: int,
        *,
        id: str | None = None,
    ) -> Region:
        """Label Studio ellipse: centre (x%, y%), radii in percent of width/height, `rotation` degrees
        clockwise about the centre."""
        iw, ih = _image_dims(width, height)
        x, y = _number(x, "x"), _number(y, "y")
        _check_percent(np.array([x]), "x")
        _check_percent(np.array([y]), "y")
        rx, ry = _number(radius_x, "radiusX"), _number(radius_y, "radiusY")
        for name, v in (("radiusX", rx), ("radiusY", ry)):
            if not 0 < v <= 100 + PERCENT_TOLERANCE:
                raise RegionError(f"ellipse {name}={v}% out of range (0,100]")
        theta = math.radians(_number(rotation, "rotation") % 360)
        cx, cy, rx, ry = _snap(np.array([x * iw, y * ih, rx * iw, ry * ih]) / 100)
        return cls(_ellipse_mask(cx, cy, rx, ry, theta, iw, ih), id=id)

    @classmethod
    def from_ellipse(
        cls,
        cx: float,
        cy: float,
        radius_x: float,
        radius_y: float,
        rotation: float,
        width: int,
        height: int,
        *,
        id: str | None = None,
    ) -> Region:
        """Ellipse in pixel coordinates: centre, radii, `rotation` degrees clockwise about the centre
        (CVAT's ellipse; `from_ls_ellipse` converts Label Studio percentages to these)."""
        iw, ih = _image_dims(width, height)
        cx, cy = _number(cx, "cx"), _number(cy, "cy")
        rx, ry = _number(radius_x, "radius_x"), _number(radius_y, "radius_y")
        if rx <= 0 or ry <= 0:
            raise RegionError(f"ellipse radii must be > 0, got ({rx}, {ry})")
        theta = math.radians(_number(rotation, "rotation") % 360)
        return cls(_ellipse_mask(cx, cy, rx, ry, theta, iw, ih), id=id)

    @classmethod
    def from_ls_keypoint(
        cls,
        x: float,
        y: float,
        width: int,
        height: int,
        radius_px: float | None = None,
        *,
        refiner: MaskRefiner | None = None,
        image: Any = None,
        id: str | None = None,
    ) -> Region:
        """Label Studio keypoint at (x%, y%). With a `refiner` (SAM) and the `image` the click becomes an
        object mask; otherwise a disk of `radius_px` (default: 1% of the short side, at least 3 px)."""
        iw, ih = _image_dims(width, height)
        x, y = _number(x, "x"), _number(y, "y")
        _check_percent(np.array([x]), "x")
        _check_percent(np.array([y]), "y")
        px, py = _snap(np.clip([x, y], 0.0, 100.0) * np.array([iw, ih]) / 100)
        if refiner is not None:
            refined = _refine(
                lambda: refiner.points_to_mask(image, [(float(px), float(py))], [1]), image, iw, ih
            )
            if refined is not None:
                return refined.with_id(id)
        return cls(_disk_mask(px, py, _radius(radius_px, iw, ih), iw, ih), id=id)

    @classmethod
    def from_point(
        cls,
        x: float,
        y: float,
        width: int,
        height: int,
        radius_px: float | None = None,
        *,
        id: str | None = None,
    ) -> Region:
        """A disk around a click in pixel coordinates (the no-SAM stand-in for a point prompt)."""
        iw, ih = _image_dims(width, height)
        x, y = _number(x, "x"), _number(y, "y")
        if not (0 <= x <= iw and 0 <= y <= ih):
            raise RegionError(f"point ({x}, {y}) is outside the {iw}x{ih} image")
        return cls(_disk_mask(x, y, _radius(radius_px, iw, ih), iw, ih), id=id)

    @classmethod
    def from_scribble(
        cls,
        polylines: Sequence[Sequence[Sequence[float]]],
        width: int,
        height: int,
        thickness: float,
        *,
        percent: bool = False,
        id: str | None = None,
    ) -> Region:
        """Union of scribble strokes, each a list of (x, y) points, drawn `thickness` pixels wide with
        round ends and joints. Points are pixel coordinates, or percent of the image size with
        `percent=True`. A one-point stroke is a dot of diameter `thickness`."""
        iw, ih = _image_dims(width, height)
        t = _number(thickness, "thickness")
        if not t > 0:
            raise RegionError(f"scribble thickness must be > 0 pixels, got {t}")
        if not isinstance(polylines, (list, tuple)) or len(polylines) == 0:
            raise RegionError("scribble needs at least one stroke (a list of [x, y] points)")
        mask = np.zeros((ih, iw), dtype=bool)
        for i, stroke in enumerate(polylines):
            xy = _points(stroke, "stroke", min_points=1, where=f" of stroke {i}")
            if percent:
                _check_percent(xy[:, 0], "x")
                _check_percent(xy[:, 1], "y")
                xy = _snap(xy * np.array([iw, ih]) / 100)
            _paint_stroke(mask, xy, t / 2)
        return cls(mask, id=id)


# ---------------------------------------------------------------------- validation helpers


def _as_bool_mask(mask: Any) -> np.ndarray:
    """Copy to a read-only C-contiguous HxW bool array (nonzero = inside)."""
    if isinstance(mask, Image.Image):
        mask = np.asarray(mask)
    if not isinstance(mask, np.ndarray):
        try:
            mask = np.asarray(mask)
        except (ValueError, TypeError) as e:
            raise RegionError(f"mask must be an HxW array, got {type(mask).__name__}") from e
    if mask.ndim != 2:
        raise RegionError(f"mask must be 2-D (height, width), got shape {tuple(mask.shape)}")
    if mask.shape[0] == 0 or mask.shape[1] == 0:
        raise RegionError(f"mask has a zero-size side: shape {tuple(mask.shape)}")
    if mask.size > MAX_PIXELS:
        raise RegionError(f"mask of {mask.shape[1]}x{mask.shape[0]} exceeds the {MAX_PIXELS}-pixel limit")
    if mask.dtype == bool:
        out = np.array(mask, dtype=bool, order="C", copy=True)
    elif mask.dtype.kind in "iu":
        out = mask != 0
    elif mask.dtype.kind == "f":
        if np.isnan(mask).any():
            raise RegionError("mask contains NaN values")
        out = mask != 0
    else:
        raise RegionError(f"mask must be boolean or numeric, got dtype {mask.dtype}")
    out = np.ascontiguousarray(out)
    out.flags.writeable = False
    return out


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _number(v: Any, name: str) -> float:
    if not _is_number(v):
        raise RegionError(f"{name} must be a number, got {v!r}")
    f = float(v)
    if not math.isfinite(f):
        raise RegionError(f"{name} must be finite, got {f}")
    return f


def _pair(v: Any, name: str) -> tuple[Any, Any]:
    if not isinstance(v, (list, tuple)) or len(v) != 2:
        raise RegionError(f"{name} must be a pair of integers, got {v!r}")
    return v[0], v[1]


def _image_dims(width: Any, height: Any) -> tuple[int, int]:
    dims = []
    for name, v in (("width", width), ("height", height)):
        if not _is_number(v) or not float(v).is_integer() or v <= 0:
            raise RegionError(f"image {name} must be a positive integer, got {v!r}")
        dims.append(int(v))
    w, h = dims
    if w * h > MAX_PIXELS:
        raise RegionError(f"image {w}x{h} exceeds the {MAX_PIXELS}-pixel limit")
    return w, h


def _int_array(values: Any, name: str) -> np.ndarray:
    if not isinstance(values, (list, tuple, np.ndarray)):
        raise RegionError(f"{name} must be a list of integers, got {type(values).__name__}")
    if isinstance(values, np.ndarray):
        arr = values.ravel()
        if arr.size and arr.dtype.kind not in "iu":
            raise RegionError(f"{name} must contain integers, got dtype {arr.dtype}")
        return arr.astype(np.int64)
    bad = next(
        (i for i, v in enumerate(values) if not isinstance(v, numbers.Integral) or isinstance(v, bool)), None
    )
    if bad is not None:
        raise RegionError(f"{name} must contain integers, got {values[bad]!r} at index {bad}")
    try:
        return np.asarray(values, dtype=np.int64)
    except OverflowError:
        raise RegionError(f"{name} contains an integer too large for 64 bits") from None


def _points(points: Any, what: str, *, min_points: int, where: str = "") -> np.ndarray:
    """Validate a list of (x, y) pairs into an Nx2 float array, naming the first bad point."""
    if isinstance(points, np.ndarray) and points.dtype != object:
        points = points.tolist()
    if not isinstance(points, (list, tuple, np.ndarray)):
        raise RegionError(f"{what}{where} must be a list of [x, y] points, got {type(points).__name__}")
    if len(points) < min_points:
        plural = "s" if min_points > 1 else ""
        raise RegionError(f"{what}{where} needs at least {min_points} point{plural}, got {len(points)}")
    out = np.empty((len(points), 2), dtype=np.float64)
    for i, p in enumerate(points):
        if not isinstance(p, (list, tuple, np.ndarray)) or len(p) != 2:
            raise RegionError(f"point {i}{where} must be [x, y], got {p!r}")
        for j, v in enumerate(p):
            if not _is_number(v):
                raise RegionError(f"coordinate {v!r} at point {i}{where} is not a number")
            f = float(v)
            if not math.isfinite(f):
                shown = "NaN" if math.isnan(f) else str(f)
                raise RegionError(f"coordinate {shown} at point {i}{where} is not finite")
            out[i, j] = f
    return out


def _snap(values: np.ndarray) -> np.ndarray:
    """Round pixel coordinates to 1e-9 so float noise (cos 90 deg, 10% of 640) cannot move an edge
    across a pixel centre."""
    return np.round(np.asarray(values, dtype=np.float64), 9)


def _check_percent(values: np.ndarray, name: str) -> None:
    bad = np.flatnonzero((values < -PERCENT_TOLERANCE) | (values > 100 + PERCENT_TOLERANCE))
    if bad.size:
        i = int(bad[0])
        at = f" at point {i}" if values.size > 1 else ""
        raise RegionError(f"{name}={float(values[i])}% out of range [0,100]{at}")


def _parse_compressed_counts(s: bytes, total: int) -> list[int]:
    """Decode COCO's compressed counts string (5-bit groups from '0', continuation bit 0x20, sign bit
    0x10, counts after the third stored as the difference to the count two before); every run must
    lie in [0, total]."""
    runs: list[int] = []
    p, n = 0, len(s)
    while p < n:
        x, k = 0, 0
        while True:
            if p >= n:
                raise RegionError("compressed RLE counts are truncated")
            c = s[p] - 48
            if not 0 <= c < 64:
                raise RegionError(f"compressed RLE counts contain invalid character {chr(s[p])!r} at {p}")
            if k > 12:
                raise RegionError("compressed RLE counts contain a run longer than 64 bits")
            x |= (c & 0x1F) << (5 * k)
            p += 1
            k += 1
            if not c & 0x20:
                if c & 0x10:
                    x |= -1 << (5 * k)
                break
        if len(runs) > 2:
            x += runs[-2]
        if not 0 <= x <= total:
            raise RegionError(f"RLE count {x} at index {len(runs)} is outside [0, height*width = {total}]")
        runs.append(x)
    return runs


def _check_runs(runs: np.ndarray, h: int, w: int) -> None:
    if runs.size and runs.min() < 0:
        raise RegionError("RLE counts must not be negative")
    if runs.size and runs.max() > h * w:  # also keeps the sum below from overflowing
        raise RegionError(f"RLE count {int(runs.max())} exceeds height*width = {h * w}")
    total = int(runs.sum())
    if total != h * w:
        raise RegionError(f"RLE counts sum to {total} but height*width = {h * w}")


def _radius(radius_px: Any, w: int, h: int) -> float:
    if radius_px is None:
        return max(3.0, min(w, h) / 100)
    r = _number(radius_px, "radius_px")
    if r <= 0:
        raise RegionError(f"radius_px must be > 0, got {r}")
    return r


def _refine(call: Any, image: Any, w: int, h: int) -> Region | None:
    """Run a refiner; its mask must fit the image. None when SAM found nothing (geometry is used)."""
    if image is None:
        raise RegionError("a refiner needs the image: pass image=... along with refiner=...")
    region = call()
    if not isinstance(region, Region):
        raise RegionError(f"refiner returned {type(region).__name__}, expected a Region")
    if region.size != (w, h):
        raise RegionError(
            f"refined mask is {region.width}x{region.height} but image is {w}x{h} (width x height)"
        )
    if region.area == 0:
        logger.warning("SAM returned an empty mask; using the drawn shape instead")
        return None
    return region


# ---------------------------------------------------------------------- rasterisers


def _span(lo: float, hi: float, n: int) -> tuple[int, int]:
    """Indices i in [0, n) whose pixel centre i + 0.5 lies in [lo, hi)."""
    a = min(max(math.ceil(lo - 0.5), 0), n)
    b = min(max(math.ceil(hi - 0.5), 0), n)
    return a, max(a, b)


def _box_mask(x0: float, y0: float, x1: float, y1: float, w: int, h: int) -> np.ndarray:
    mask = np.zeros((h, w), dtype=bool)
    c0, c1 = _span(x0, x1, w)
    r0, r1 = _span(y0, y1, h)
    mask[r0:r1, c0:c1] = True
    return mask


def _fill_polygon(xs: np.ndarray, ys: np.ndarray, w: int, h: int) -> np.ndarray:
    mask = np.zeros((h, w), dtype=bool)
    _paint_polygon(mask, xs, ys)
    return mask


def _ellipse_mask(cx: float, cy: float, rx: float, ry: float, theta: float, w: int, h: int) -> np.ndarray:
    mask = np.zeros((h, w), dtype=bool)
    _paint_ellipse(mask, cx, cy, rx, ry, theta)
    return mask


def _disk_mask(x: float, y: float, r: float, w: int, h: int) -> np.ndarray:
    mask = _ellipse_mask(x, y, r, r, 0.0, w, h)
    mask[min(int(y), h - 1), min(int(x), w - 1)] = True  # the clicked pixel itself, even for tiny radii
    return mask


def _fill_spans(out: np.ndarray, rows: np.ndarray, starts: np.ndarray, stops: np.ndarray) -> None:
    """Set out[row, start:stop] for every span, in O(area) with bounded temporary memory (flat
    indices are built for chunks of about 4M pixels at a time)."""
    h, w = out.shape
    starts = np.clip(starts, 0, w).astype(np.int64)
    lengths = np.clip(stops, 0, w).astype(np.int64) - starts
    keep = lengths > 0
    rows, starts, lengths = rows[keep].astype(np.int64), starts[keep], lengths[keep]
    if rows.size == 0:
        return
    flat = out.reshape(-1)  # a view: masks here are always freshly allocated C-contiguous arrays
    ends = np.cumsum(lengths)
    bounds = np.searchsorted(ends, np.arange(1 << 22, int(ends[-1]), 1 << 22), side="right")
    for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, rows.size], strict=True):
        if lo == hi:
            continue
        n = lengths[lo:hi]
        offset = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
        flat[np.repeat(rows[lo:hi] * w + starts[lo:hi], n) + offset] = True


def _paint_polygon(out: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> None:
    """OR an even-odd filled polygon into `out`: scanline fill at pixel centres, vectorised over
    edge/row crossings.

    Each edge crosses the rows whose centre lies in [min y, max y) (half-open, so a shared vertex
    counts once and every row has an even number of crossings). A crossing at x starts or ends a run
    at the first pixel whose centre is >= x; sorted crossings pair up into the inside runs of a row.
    """
    h, w = out.shape
    x0, y0 = np.asarray(xs, np.float64), np.asarray(ys, np.float64)
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    first = np.clip(np.ceil(np.minimum(y0, y1) - 0.5), 0, h).astype(np.int64)
    stop = np.clip(np.ceil(np.maximum(y0, y1) - 0.5), 0, h).astype(np.int64)
    n = np.maximum(stop - first, 0)
    total = int(n.sum())
    if total == 0:
        return
    edge = np.repeat(np.arange(len(n)), n)
    rows = first[edge] + np.arange(total) - np.repeat(np.cumsum(n) - n, n)
    xa, ya, xb, yb = x0[edge], y0[edge], x1[edge], y1[edge]
    xc = xa + (rows + 0.5 - ya) * (xb - xa) / (yb - ya)
    cols = np.clip(np.ceil(xc - 0.5), 0, w).astype(np.int64)
    order = np.lexsort((cols, rows))
    rows, cols = rows[order], cols[order]
    _fill_spans(out, rows[0::2], cols[0::2], cols[1::2])


def _paint_ellipse(out: np.ndarray, cx: float, cy: float, rx: float, ry: float, theta: float) -> None:
    """OR into `out` the pixels whose centre lies inside the ellipse (radii rx, ry, rotated by theta
    clockwise). Each row's inside is one run, found by solving the ellipse equation for x."""
    h, w = out.shape
    c, s = math.cos(theta), math.sin(theta)
    ey = math.hypot(rx * s, ry * c)  # half height of the rotated ellipse
    r0, r1 = _span(cy - ey, cy + ey + 1, h)
    if r0 == r1:
        return
    # (u/rx)^2 + (v/ry)^2 <= 1 with u = dx c + dy s, v = -dx s + dy c  ->  a dx^2 + b dx + k <= 0
    rows = np.arange(r0, r1)
    dy = rows + 0.5 - cy
    a = (c / rx) ** 2 + (s / ry) ** 2
    b = 2 * dy * c * s * (1 / rx**2 - 1 / ry**2)
    k = dy**2 * ((s / rx) ** 2 + (c / ry) ** 2) - 1
    disc = b * b - 4 * a * k
    inside = disc >= 0
    root = np.sqrt(disc[inside])
    starts = np.ceil(cx + (-b[inside] - root) / (2 * a) - 0.5)
    stops = np.floor(cx + (-b[inside] + root) / (2 * a) - 0.5) + 1
    _fill_spans(out, rows[inside], np.clip(starts, -1, w + 1), np.clip(stops, -1, w + 1))


def _paint_stroke(out: np.ndarray, xy: np.ndarray, r: float) -> None:
    """OR a polyline of radius r with round joints and ends: one rectangle per segment plus a disk
    at every vertex (their union is the set of points within r of the polyline)."""
    for x, y in xy:
        _paint_ellipse(out, x, y, r, r, 0.0)
    d = np.diff(xy, axis=0)
    length = np.hypot(d[:, 0], d[:, 1])
    for (ax, ay), (dx, dy), n in zip(xy[:-1], d, length, strict=True):
        if n == 0:
            continue
        nx, ny = -dy / n * r, dx / n * r  # unit normal scaled to the radius
        _paint_polygon(
            out,
            np.array([ax + nx, ax + dx + nx, ax + dx - nx, ax - nx]),
            np.array([ay + ny, ay + dy + ny, ay + dy - ny, ay - ny]),
        )
