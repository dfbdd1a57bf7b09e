"""Label Studio result items -> `RegionRef`s: a `Region` (the mask the model sees) plus what is needed to
answer on that region (its id, control, geometry and image size).

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

The web process parses (no image needed: geometry is in percent of `original_width`/`original_height`)
and ships `RegionRef.to_job()` dicts; the worker rebuilds them with `RegionRef.from_job()` and, when SAM
is configured, `refine_regions` turns boxes and clicks into object masks.
"""

from __future__ import annotations

import hashlib
import logging
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from backend.errors import InputError
from backend.labelstudio.config import GEOMETRIES, PredictionPlan
from osprey_core.errors import RegionError
from osprey_core.regions import MaskRefiner, Region

logger = logging.getLogger(__name__)

SOURCES = ("annotations", "predictions", "both")
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


@dataclass(frozen=True, eq=False)
class RegionRef:
    """One region of a Label Studio result, ready for the engine and for answering on it."""

    id: str
    from_name: str
    to_name: str
    type: str  # e.g. "brushlabels", "rectangle", or "rectanglelabels" from a <Labels> control
    original_width: int
    original_height: int
    region: Region
    value: dict[str, Any]  # geometry as received; for brush only {"format": "rle"} (re-encoded on output)
    labels: tuple[str, ...] = ()  # labels the annotator gave the region
    image_rotation: float = 0.0
    smart: bool = False  # drawn with a smart tool (interactive context)
    positive: bool = True  # keypoint polarity; negative clicks only steer SAM

    @property
    def geometry(self) -> str:
        return self.type.removesuffix("labels")

    @property
    def size(self) -> tuple[int, int]:
        return self.original_width, self.original_height

    def to_job(self) -> dict[str, Any]:
        """Compact JSON for RQ payloads: the mask as compressed COCO RLE, never image bytes."""
        return {
            "id": self.id,
            "from_name": self.from_name,
            "to_name": self.to_name,
            "type": self.type,
            "original_width": self.original_width,
            "original_height": self.original_height,
            "image_rotation": self.image_rotation,
            "value": self.value,
            "labels": list(self.labels),
            "smart": self.smart,
            "positive": self.positive,
            "mask": self.region.to_coco_rle(),
        }

    @classmethod
    def from_job(cls, data: dict[str, Any]) -> RegionRef:
        try:
            width, height = int(data["original_width"]), int(data["original_height"])
            region = Region.from_coco_rle(data["mask"], height, width, id=str(data["id"]))
            return cls(
                id=str(data["id"]),
                from_name=str(data["from_name"]),
                to_name=str(data["to_name"]),
                type=str(data["type"]),
                original_width=width,
                original_height=height,
                region=region,
                value=dict(data["value"]),
                labels=tuple(data.get("labels", ())),
                image_rotation=float(data.get("image_rotation", 0.0)),
                smart=bool(data.get("smart", False)),
                positive=bool(data.get("positive", True)),
            )
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, RegionError):
                raise
            raise RegionError(f"malformed region job payload: {e!r}") from e


# ---- parsing ------------------------------------------------------------------------------------


def parse_context(context: Any, plan: PredictionPlan) -> list[RegionRef]:
    """Regions of an interactive request (`params.context`); None or no `result` -> []."""
    if context is None:
        return []
    if not isinstance(context, dict):
        raise RegionError(f"context must be an object with a 'result' list, got {type(context).__name__}")
    return parse_results(context.get("result") or [], plan, smart=True)


def parse_results(result: Any, plan: PredictionPlan, *, smart: bool = False) -> list[RegionRef]:
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


def _region(region_id: str, items: list[dict], plan: PredictionPlan, smart: bool) -> RegionRef:
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
        region = _build_region(geometry, value, width, height, region_id)
    except RegionError as e:
        raise RegionError(f"{where} ({from_name}, {geometry}): {e}") from e
    rotation = item.get("image_rotation", 0) or 0
    return RegionRef(
        id=region_id,
        from_name=from_name,
        to_name=to_name,
        type=type_,
        original_width=width,
        original_height=height,
        region=region,
        value=_geometry_value(geometry, value),
        labels=tuple(dict.fromkeys(labels)),
        image_rotation=float(rotation) if _is_number(rotation) else 0.0,
        smart=smart,
        positive=item.get("is_positive", True) is not False,
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


def _build_region(geometry: str, value: dict, width: int, height: int, region_id: str) -> Region:
    if geometry == "brush":
        fmt = value.get("format", "rle")
        if fmt != "rle":
            raise RegionError(f"brush format {fmt!r} is not supported (expected 'rle')")
        return Region.from_ls_brush(_need(value, "rle"), width, height, id=region_id)
    if geometry == "polygon":
        return Region.from_ls_polygon(_need(value, "points"), width, height, id=region_id)
    if geometry == "rectangle":
        x, y, w, h = (_need(value, k) for k in ("x", "y", "width", "height"))
        return Region.from_ls_rectangle(x, y, w, h, _need(value, "rotation", 0), width, height, id=region_id)
    if geometry == "ellipse":
        x, y, rx, ry = (_need(value, k) for k in ("x", "y", "radiusX", "radiusY"))
        return Region.from_ls_ellipse(x, y, rx, ry, _need(value, "rotation", 0), width, height, id=region_id)
    if geometry == "keypoint":
        return Region.from_ls_keypoint(_need(value, "x"), _need(value, "y"), width, height, id=region_id)
    raise RegionError(f"unsupported region type {geometry!r}")


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


def select_regions(task: dict, plan: PredictionPlan, source: str = "annotations") -> list[RegionRef]:
    """Regions of a batch task from its latest annotation and/or prediction (see `select_result`)."""
    return parse_results(select_result(task, source), plan)


# ---- SAM ----------------------------------------------------------------------------------------


def refine_regions(
    image: Any, plan: PredictionPlan, refs: Sequence[RegionRef], refiner: MaskRefiner | None
) -> list[RegionRef]:
    """Boxes and clicks -> object masks with SAM (worker side; needs the image).

    Without a refiner, negative clicks are dropped and the rest is returned unchanged. With one:
    - smart (interactive) keypoints of one control and label are one SAM prompt (positive and negative
      clicks together), and smart rectangles one box prompt each; the mask comes back as a new brush
      region (id `sam-<hash>`) of the config's brush tool, as SAM backends answer. Without a brush tool
      the drawn region is kept, with the SAM mask as what the model sees;
    - batch keypoints and rectangles keep their geometry and id; only the mask the model sees improves.
    An empty SAM mask falls back to the drawn shape.
    """
    if refiner is None:
        return [r for r in refs if r.positive]
    result: list[RegionRef] = []
    prompted: set[tuple] = set()
    for ref in refs:
        if ref.geometry == "keypoint" and ref.smart:
            key = (ref.from_name, ref.labels)
            if key not in prompted:
                prompted.add(key)
                group = [r for r in refs if r.geometry == "keypoint" and r.smart and (r.from_name, r.labels) == key]
                result.extend(_refine_clicks(image, plan, group, refiner))
        elif ref.geometry == "keypoint" and ref.positive:
            mask = _sam(lambda r=ref: refiner.points_to_mask(image, [_pixel(r)], [1]), ref)
            result.append(ref if mask is None else replace(ref, region=mask.with_id(ref.id)))
        elif ref.geometry == "rectangle":
            mask = _sam(lambda r=ref: refiner.box_to_mask(image, r.region.bbox), ref)
            if mask is None:
                result.append(ref)
            elif ref.smart:
                result.append(_as_brush(plan, [ref], mask))
            else:
                result.append(replace(ref, region=mask.with_id(ref.id)))
        elif ref.positive:
            result.append(ref)
    return result


def _pixel(ref: RegionRef) -> tuple[float, float]:
    x = min(max(float(ref.value["x"]), 0.0), 100.0) * ref.original_width / 100
    y = min(max(float(ref.value["y"]), 0.0), 100.0) * ref.original_height / 100
    return x, y


def _refine_clicks(image: Any, plan: PredictionPlan, group: list[RegionRef], refiner: MaskRefiner) -> list[RegionRef]:
    positives = [r for r in group if r.positive]
    if not positives:
        return []  # only negative clicks: nothing to segment yet
    mask = _sam(lambda: refiner.points_to_mask(image, [_pixel(r) for r in group], [int(r.positive) for r in group]), group[0])
    if mask is None:
        return positives
    return [_as_brush(plan, group, mask)]


def _sam(call: Any, ref: RegionRef) -> Region | None:
    region = call()
    if region.size != ref.size:
        raise RegionError(
            f"region {ref.id!r}: SAM mask is {region.width}x{region.height} but the region's image is "
            f"{ref.original_width}x{ref.original_height}"
        )
    if region.area == 0:
        logger.warning("SAM found nothing for region %s; using the drawn shape", ref.id)
        return None
    return region


def _as_brush(plan: PredictionPlan, group: list[RegionRef], mask: Region) -> RegionRef:
    brushes = [t for t in plan.tools if t.geometry == "brush"]
    first = group[0]
    if not brushes:
        return replace(first, region=mask.with_id(first.id))
    tool = next((t for t in brushes if t.is_labels_tool), brushes[0])
    digest = hashlib.sha1("|".join(r.id for r in group).encode()).hexdigest()[:10]
    new_id = f"sam-{digest}"
    return replace(
        first,
        id=new_id,
        from_name=tool.name,
        type=tool.type,
        region=mask.with_id(new_id),
        value={"format": "rle"},
        positive=True,
    )
