"""Label Studio result items -> neutral `RegionSpec`s (backend/service/tasks.py), without rasterising.

Inputs (protocol notes §2.5, §3):
- interactive: `params.context.result`, the region just drawn plus the other "dynamic" regions of the
  same control and label (keypoint clicks accumulate, Alt+click sends `is_positive: false`);
- batch: `task.annotations[].result` or `task.predictions[].result`, picked by `select_regions`.

Results that share an `id` form one region. A region comes from a region tool (`rectanglelabels`,
`rectangle`, ...), optionally with a `labels` companion (split format), or from a `<Labels>` control with
a geometry type such as `rectanglelabels` (merged format). Per-region choices/textarea/taxonomy results,
relations and results of controls we do not predict are skipped; a `from_name` that is not in the
labeling config at all, a `to_name` other than the image, or a malformed value raises `RegionError`
naming the result id.

The web process only validates and converts: percent coordinates become pixels of `original_width` x
`original_height` (the same arithmetic as `osprey_core.regions`' Label Studio constructors, so the worker's
masks are identical), a brush RLE is checked (header, byte range, length) and shipped as is. Nothing is
rasterised here, whatever size a request claims; the worker compares that size with the real image first.
What the answer needs (from_name, to_name, type, the geometry `value` as received, image_rotation) rides
in `RegionSpec.meta`; backend/labelstudio/results.py reads it back.
"""

from __future__ import annotations

import logging
import math
import numbers
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

from backend.errors import InputError
from backend.labelstudio.config import GEOMETRIES, PredictionPlan
from backend.service.geometry import MAX_REGIONS, check_geometry
from backend.service.tasks import RegionSpec
from osprey_core.errors import RegionError
from osprey_core.regions import PERCENT_TOLERANCE

logger = logging.getLogger(__name__)

SOURCES = ("annotations", "predictions", "both")
MAX_URL_CHARS = 4096  # longer image URLs are refused (servers and file systems refuse them anyway)
MAX_FILE_NAME_BYTES = 255  # one path component of a /data/local-files/?d= path (NAME_MAX)
# Keys of `value` that make up each geometry (everything else is labels/choices/text).
GEOMETRY_KEYS = {
    "brush": ("format",),
    "polygon": ("points", "closed"),
    "rectangle": ("x", "y", "width", "height", "rotation"),
    "ellipse": ("x", "y", "radiusX", "radiusY", "rotation"),
    "keypoint": ("x", "y", "width"),
}


class TaskDataError(InputError):
    """A batch task lacks what the labeling config needs (e.g. the image URL in `task["data"]`)."""


# ---- parsing ------------------------------------------------------------------------------------


def parse_context(context: Any, plan: PredictionPlan) -> list[RegionSpec]:
    """Regions of an interactive request (`params.context`); None or no `result` -> []."""
    if context is None:
        return []
    if not isinstance(context, dict):
        raise RegionError(f"context must be an object with a 'result' list, got {type(context).__name__}")
    return parse_results(context.get("result") or [], plan, smart=True)


def parse_results(result: Any, plan: PredictionPlan, *, smart: bool = False) -> list[RegionSpec]:
    """Regions of one result list, in order of first appearance of each region id."""
    if not isinstance(result, list):
        raise RegionError(f"result must be a list of result items, got {type(result).__name__}")
    groups: dict[str, list[dict]] = {}
    for index, item in enumerate(result):
        if not isinstance(item, dict):
            raise RegionError(f"result item {index} must be an object, got {type(item).__name__}")
        if item.get("type") == "relation" or "from_id" in item:
            continue
        from_name = item.get("from_name")
        region_id = _item_id(item, index)
        if plan.tool(from_name) is None and plan.label_set(from_name) is None:
            if from_name in plan.other_controls or _is_per_region(plan, from_name):
                continue
            raise RegionError(
                f"region {region_id!r}: unknown control from_name={from_name!r}; the labeling config has no "
                "such control (was the config changed after the annotation was made?)"
            )
        groups.setdefault(region_id, []).append(item)
    if len(groups) > MAX_REGIONS:
        raise RegionError(f"{len(groups)} regions in one result, above the limit of {MAX_REGIONS}")
    return [_region(region_id, items, plan, smart) for region_id, items in groups.items()]


def _is_per_region(plan: PredictionPlan, name: Any) -> bool:
    return any(c.name == name for c in (*plan.attributes, *plan.descriptions, *plan.taxonomies))


def _item_id(item: dict, index: int) -> str:
    region_id = item.get("id")
    if region_id is None:
        return f"result-{index}"  # imported predictions may omit ids; LS always sets them
    if isinstance(region_id, bool) or not isinstance(region_id, (str, int)) or str(region_id) == "":
        raise RegionError(f"result item {index}: id must be a non-empty string, got {region_id!r}")
    return str(region_id)


def _region(region_id: str, items: list[dict], plan: PredictionPlan, smart: bool) -> RegionSpec:
    where = f"region {region_id!r}"
    geometry_items = [it for it in items if plan.tool(it.get("from_name")) is not None]
    labels_items = [it for it in items if plan.label_set(it.get("from_name")) is not None]
    if len(geometry_items) > 1:
        raise RegionError(f"{where}: {len(geometry_items)} geometry results share this id (expected one)")
    labels: list[str] = []
    if geometry_items:
        item = geometry_items[0]
        tool = plan.tool(item["from_name"])
        type_ = _type(item, where)
        if type_ != tool.type:
            raise RegionError(f"{where}: type {type_!r} does not match control {tool.name!r} ({tool.type})")
        from_name = tool.name
    else:
        # A <Labels> result that carries the geometry itself (merged "rectanglelabels" or bare "labels").
        item = labels_items[0]
        type_ = _type(item, where)
        geometry = type_.removesuffix("labels") or _guess_geometry(item.get("value"))
        if geometry not in GEOMETRIES:
            raise RegionError(f"{where}: result type {type_!r} of <Labels> control {item['from_name']!r} is not an image region")
        if plan.tool_for_geometry(geometry) is None:
            raise RegionError(f"{where}: the labeling config has no {geometry} tool for {item['from_name']!r} labels")
        type_, from_name = geometry + "labels", item["from_name"]
    for it in items:
        value = it.get("value")
        if isinstance(value, dict):
            key = str(it.get("type") or "").lower()
            labels += [str(v) for v in _as_list(value.get(key) or value.get("labels"))]

    to_name = item.get("to_name")
    if to_name != plan.image:
        raise RegionError(f"{where}: to_name={to_name!r} is not the image {plan.image!r} this backend labels")
    value = item.get("value")
    if not isinstance(value, dict):
        raise RegionError(f"{where}: 'value' must be an object with the region geometry")
    width = _dimension(item, "original_width", where)
    height = _dimension(item, "original_height", where)
    geometry = type_.removesuffix("labels")
    try:
        neutral = _neutral_geometry(geometry, value, width, height)
    except RegionError as e:
        raise RegionError(f"{where} ({from_name}, {geometry}): {e}") from e
    rotation = item.get("image_rotation", 0) or 0
    labels_t = tuple(dict.fromkeys(labels))
    is_click = geometry == "keypoint"
    if is_click:
        neutral["positive"] = [item.get("is_positive", True) is not False]
    return RegionSpec(
        id=region_id,
        geometry=neutral,
        width=width,
        height=height,
        labels=labels_t,
        categories=tuple(c.control for c in plan.categories(from_name, type_)),
        tags=(from_name,),
        interactive=smart,
        group="\x1f".join((from_name, *labels_t)) if smart and is_click else None,
        meta={
            "from_name": from_name,
            "to_name": to_name,
            "type": type_,
            "value": _geometry_value(geometry, value),
            "image_rotation": float(rotation) if _is_number(rotation) else 0.0,
        },
    )


def _type(item: dict, where: str) -> str:
    type_ = item.get("type")
    if not isinstance(type_, str) or not type_:
        raise RegionError(f"{where}: result has no 'type'")
    return type_.lower()


def _guess_geometry(value: Any) -> str:
    """Geometry of a bare `labels` result, from its value keys (older split-format exports)."""
    if not isinstance(value, dict):
        return ""
    for key, geometry in (("rle", "brush"), ("points", "polygon"), ("radiusX", "ellipse"), ("height", "rectangle")):
        if key in value:
            return geometry
    return "keypoint" if "x" in value and "y" in value else ""


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))


def _dimension(item: dict, key: str, where: str) -> int:
    v = item.get(key)
    if v is None:
        raise RegionError(f"{where}: {key} is missing (needed to place percent coordinates on the image)")
    if not _is_number(v) or not float(v).is_integer() or v <= 0:
        raise RegionError(f"{where}: {key} must be a positive integer, got {v!r}")
    return int(v)


def _need(value: dict, key: str, default: Any = None) -> Any:
    if key not in value or value[key] is None:
        if default is not None:
            return default
        raise RegionError(f"value.{key} is missing")
    return value[key]


def _percent(value: dict, key: str, default: Any = None) -> float:
    v = _need(value, key, default)
    if not _is_real(v):
        raise RegionError(f"{key} must be a number, got {v!r}")
    f = float(v)
    if not math.isfinite(f):
        raise RegionError(f"{key} must be finite, got {f}")
    return f


def _in_range(v: float, name: str, at: str = "") -> None:
    if not -PERCENT_TOLERANCE <= v <= 100 + PERCENT_TOLERANCE:
        raise RegionError(f"{name}={v}% out of range [0,100]{at}")


def _extent(v: float, name: str, what: str) -> None:
    if not 0 < v <= 100 + PERCENT_TOLERANCE:
        raise RegionError(f"{what} {name}={v}% out of range (0,100]")


def _neutral_geometry(geometry: str, value: dict, width: int, height: int) -> dict[str, Any]:
    """Label Studio percent geometry -> neutral pixel geometry, validated, never rasterised."""
    if geometry == "brush":
        fmt = value.get("format", "rle")
        if fmt != "rle":
            raise RegionError(f"brush format {fmt!r} is not supported (expected 'rle')")
        out: dict[str, Any] = {"kind": "brush_rle", "rle": _need(value, "rle")}
    elif geometry == "polygon":
        points = _need(value, "points")
        check_geometry({"kind": "polygon", "points": points}, width, height)
        for i, (x, y) in enumerate(points):
            _in_range(float(x), "x", f" at point {i}")
            _in_range(float(y), "y", f" at point {i}")
        out = {"kind": "polygon", "points": [[float(x) * width / 100, float(y) * height / 100] for x, y in points]}
    elif geometry == "rectangle":
        x, y, w, h = (_percent(value, k) for k in ("x", "y", "width", "height"))
        _in_range(x, "x")
        _in_range(y, "y")
        _extent(w, "width", "rectangle")
        _extent(h, "height", "rectangle")
        out = {"kind": "box", "x": x * width / 100, "y": y * height / 100, "width": w * width / 100,
               "height": h * height / 100, "rotation": _percent(value, "rotation", 0)}
    elif geometry == "ellipse":
        x, y, rx, ry = (_percent(value, k) for k in ("x", "y", "radiusX", "radiusY"))
        _in_range(x, "x")
        _in_range(y, "y")
        _extent(rx, "radiusX", "ellipse")
        _extent(ry, "radiusY", "ellipse")
        out = {"kind": "ellipse", "cx": x * width / 100, "cy": y * height / 100, "rx": rx * width / 100,
               "ry": ry * height / 100, "rotation": _percent(value, "rotation", 0)}
    elif geometry == "keypoint":
        x, y = _percent(value, "x"), _percent(value, "y")
        _in_range(x, "x")
        _in_range(y, "y")
        px, py = min(max(x, 0.0), 100.0) * width / 100, min(max(y, 0.0), 100.0) * height / 100
        out = {"kind": "points", "points": [[px, py]], "positive": [True]}
    else:
        raise RegionError(f"unsupported region type {geometry!r}")
    check_geometry(out, width, height)
    return out


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _geometry_value(geometry: str, value: dict) -> dict[str, Any]:
    out = {k: value[k] for k in GEOMETRY_KEYS[geometry] if k in value}
    if geometry == "brush":
        out["format"] = "rle"
    if geometry in ("rectangle", "ellipse"):
        out.setdefault("rotation", 0)
    return out


# ---- batch tasks --------------------------------------------------------------------------------


def task_image_url(task: Any, plan: PredictionPlan) -> str:
    """The image URL of a task (`task["data"][plan.image_key]`), or `TaskDataError` saying what is missing."""
    if not isinstance(task, dict):
        raise TaskDataError(f"a task must be an object, got {type(task).__name__}")
    data = task.get("data")
    name = f"task {task.get('id')}" if task.get("id") is not None else "task"
    if not isinstance(data, dict):
        raise TaskDataError(f"{name} has no 'data' object")
    url = data.get(plan.image_key)
    if not isinstance(url, str) or not url.strip():
        keys = ", ".join(sorted(map(str, data))) or "none"
        raise TaskDataError(
            f'{name} has no image URL under data[{plan.image_key!r}] (the config\'s <Image value="${plan.image_key}">); '
            f"data keys: {keys}"
        )
    return _check_url(url, name)


def _check_url(url: str, name: str) -> str:
    """Refuse URLs no media server would serve (control characters, absurd lengths) before any fetch."""
    if len(url) > MAX_URL_CHARS:
        raise TaskDataError(f"{name}: the image URL is {len(url)} characters long, above the limit of {MAX_URL_CHARS}")
    bad = next((c for c in url if ord(c) < 0x20 or ord(c) == 0x7F), None)
    if bad is not None:
        raise TaskDataError(f"{name}: the image URL contains the control character {bad!r} at {url.index(bad)}")
    try:
        parts = urlsplit(url.strip())
    except ValueError as e:  # urlsplit's only failure: a malformed host (e.g. an unclosed IPv6 bracket)
        raise TaskDataError(f"{name}: the image URL is malformed: {e}") from e
    if parts.path.rstrip("/").endswith("/data/local-files"):
        for path in parse_qs(parts.query).get("d", []):
            long = next((seg for seg in path.split("/") if len(seg.encode()) > MAX_FILE_NAME_BYTES), None)
            if long is not None:
                raise TaskDataError(f"{name}: a file name in the local-files path is {len(long.encode())} bytes long, "
                                    f"above the limit of {MAX_FILE_NAME_BYTES}")
    return url


def _when(entry: dict) -> tuple[datetime, int]:
    stamp = entry.get("updated_at") or entry.get("created_at")
    try:
        when = datetime.fromisoformat(stamp) if isinstance(stamp, str) else datetime.min
    except ValueError:
        when = datetime.min
    if when.tzinfo is not None:
        when = when.astimezone(UTC).replace(tzinfo=None)
    entry_id = entry.get("id")
    return when, entry_id if isinstance(entry_id, int) and not isinstance(entry_id, bool) else -1


def select_result(task: dict, source: str = "annotations") -> list:
    """The result list whose regions a batch prediction labels.

    `annotations`: the latest annotation that was not cancelled (skipped), by `updated_at` (else
    `created_at`), then id; `predictions`: the latest prediction, same order; `both`: the annotation when
    there is one, else the prediction. No usable entry -> [] (the task is predicted with no regions).
    """
    if source not in SOURCES:
        raise ValueError(f"regions source must be one of {', '.join(SOURCES)}, got {source!r}")
    if not isinstance(task, dict):
        raise TaskDataError(f"a task must be an object, got {type(task).__name__}")
    if source in ("annotations", "both"):
        usable = [a for a in task.get("annotations") or [] if isinstance(a, dict) and not a.get("was_cancelled")]
        if usable:
            return max(usable, key=_when).get("result") or []
    if source in ("predictions", "both"):
        usable = [p for p in task.get("predictions") or [] if isinstance(p, dict)]
        if usable:
            return max(usable, key=_when).get("result") or []
    return []


def select_regions(task: dict, plan: PredictionPlan, source: str = "annotations") -> list[RegionSpec]:
    """Regions of a batch task from its latest annotation and/or prediction (see `select_result`)."""
    return parse_results(select_result(task, source), plan)


