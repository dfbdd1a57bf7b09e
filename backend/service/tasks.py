"""The neutral vocabulary between annotation tools and the model: what to look at, what to predict, answers.

Adapters (backend/labelstudio/, backend/cvat/) translate their tool's payloads into these types at the edge;
the queue ships them as JSON (`to_dict` / `from_dict`, plain dicts and lists only) and the worker predicts
on them (backend/service/predict.py). Nothing here knows a tool's wire format.

- `ImageRef`: where the image is (a URL the media layer can fetch) and, when known, its size and hash.
- `RegionSpec`: one region as drawn, in a geometry the worker rasterises after checking the image size
  (backend/service/geometry.py lists the kinds), plus what the annotator said (labels) and `meta`, an
  opaque dict that only the adapter that made it reads when it answers.
- `Plan`: what to predict for every region: named category label sets, attributes, descriptions,
  taxonomies (with the conditions under which each applies), and where SAM masks go.
- `RegionAnswer`: what the model said about one region.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from backend.errors import InputError


class TaskError(InputError):
    """A neutral task, region or plan payload is malformed (a JSON job that did not come from an adapter)."""


# ---- images ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageRef:
    """An image by reference (never bytes): `url` as the media layer fetches it."""

    url: str
    width: int | None = None
    height: int | None = None
    sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"url": self.url, "width": self.width, "height": self.height, "sha256": self.sha256}

    @classmethod
    def from_dict(cls, data: Any) -> ImageRef:
        data = _mapping(data, "image")
        url = data.get("url")
        if not isinstance(url, str) or not url:
            raise TaskError("image.url must be a non-empty string")
        return cls(url, _opt_int(data.get("width"), "image.width"), _opt_int(data.get("height"), "image.height"),
                   _opt_str(data.get("sha256"), "image.sha256"))


# ---- the plan -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Condition:
    """When a per-region question applies: `tag` (the region's tags or category names), `label` (its
    predicted or given label) or `choice` (a value predicted for another attribute of the region)."""

    kind: Literal["tag", "label", "choice"]
    value: str

    def values(self) -> set[str]:
        # Label Studio (and others) allow a comma-separated list of values.
        return {v.strip() for v in self.value.split(",")} | {self.value}


@dataclass(frozen=True)
class Category:
    """A named label set a region's category is chosen from (one answer per category a region names)."""

    name: str
    labels: tuple[str, ...]


@dataclass(frozen=True)
class Attribute:
    name: str
    choices: tuple[str, ...]
    multiple: bool = False
    condition: Condition | None = None


@dataclass(frozen=True)
class Description:
    name: str
    detail: Literal["short", "detailed"] = "short"
    condition: Condition | None = None


@dataclass(frozen=True)
class TaxonomyNode:
    value: str
    children: tuple[TaxonomyNode, ...] = ()


@dataclass(frozen=True)
class Taxonomy:
    name: str
    roots: tuple[TaxonomyNode, ...]
    condition: Condition | None = None


@dataclass(frozen=True)
class MaskTarget:
    """Where a mask that SAM made from an interactive box or clicks goes: it replaces the drawn shape as
    a new region with these categories and tags; `meta` is the adapter's (e.g. LS's brush control)."""

    categories: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Plan:
    """What to predict for the regions of a task; JSON-safe via `to_dict` / `from_dict`.

    `mask_target` None: the tool cannot show masks, so SAM only improves what the model sees and the drawn
    region is answered in place.
    """

    categories: tuple[Category, ...] = ()
    attributes: tuple[Attribute, ...] = ()
    descriptions: tuple[Description, ...] = ()
    taxonomies: tuple[Taxonomy, ...] = ()
    mask_target: MaskTarget | None = None

    def category(self, name: str) -> Category | None:
        return next((c for c in self.categories if c.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "categories": [{"name": c.name, "labels": list(c.labels)} for c in self.categories],
            "attributes": [{"name": a.name, "choices": list(a.choices), "multiple": a.multiple,
                            "condition": _condition_dict(a.condition)} for a in self.attributes],
            "descriptions": [{"name": d.name, "detail": d.detail, "condition": _condition_dict(d.condition)}
                             for d in self.descriptions],
            "taxonomies": [{"name": t.name, "roots": nodes_to_list(t.roots), "condition": _condition_dict(t.condition)}
                           for t in self.taxonomies],
            "mask_target": None if self.mask_target is None else {
                "categories": list(self.mask_target.categories), "tags": list(self.mask_target.tags),
                "meta": dict(self.mask_target.meta)},
        }

    @classmethod
    def from_dict(cls, data: Any) -> Plan:
        data = _mapping(data, "plan")
        try:
            target = data.get("mask_target")
            return cls(
                categories=tuple(Category(_str(c["name"]), _strs(c["labels"])) for c in data.get("categories", ())),
                attributes=tuple(
                    Attribute(_str(a["name"]), _strs(a["choices"]), bool(a.get("multiple")),
                              condition_from_dict(a.get("condition")))
                    for a in data.get("attributes", ())
                ),
                descriptions=tuple(
                    Description(_str(d["name"]), _detail(d.get("detail", "short")), condition_from_dict(d.get("condition")))
                    for d in data.get("descriptions", ())
                ),
                taxonomies=tuple(
                    Taxonomy(_str(t["name"]), nodes_from_list(t["roots"]), condition_from_dict(t.get("condition")))
                    for t in data.get("taxonomies", ())
                ),
                mask_target=None if target is None else MaskTarget(
                    _strs(target.get("categories", ())), _strs(target.get("tags", ())),
                    dict(_mapping(target.get("meta") or {}, "mask_target.meta"))),
            )
        except (KeyError, TypeError, AttributeError) as e:
            raise TaskError(f"malformed plan payload: {type(e).__name__}: {e}") from e


def _condition_dict(condition: Condition | None) -> dict[str, str] | None:
    return None if condition is None else {"kind": condition.kind, "value": condition.value}


def condition_from_dict(data: Any) -> Condition | None:
    if not data:
        return None
    kind = data["kind"]
    if kind not in ("tag", "label", "choice"):
        raise TaskError(f"condition kind must be tag, label or choice, got {kind!r}")
    return Condition(kind, _str(data["value"]))


def nodes_to_list(nodes: tuple[TaxonomyNode, ...]) -> list[dict[str, Any]]:
    """Taxonomy nodes -> JSON, iteratively (a deep tree must not exhaust Python's recursion limit)."""
    out: list[dict[str, Any]] = []
    stack: list[tuple[tuple[TaxonomyNode, ...], list]] = [(nodes, out)]
    while stack:
        level, target = stack.pop()
        for node in level:
            children: list[dict[str, Any]] = []
            target.append({"value": node.value, "children": children})
            if node.children:
                stack.append((node.children, children))
    return out


def nodes_from_list(data: Any) -> tuple[TaxonomyNode, ...]:
    """JSON -> taxonomy nodes, iteratively (children first, so frozen nodes can be built bottom-up)."""
    if not isinstance(data, list):
        raise TaskError("taxonomy roots must be a list")
    order: list[tuple[dict, int]] = []  # (node dict, depth), parents before children
    stack = [(d, 0) for d in reversed(data)]
    while stack:
        node, depth = stack.pop()
        if not isinstance(node, dict):
            raise TaskError("a taxonomy node must be an object with 'value' and 'children'")
        order.append((node, depth))
        children = node.get("children") or []
        if not isinstance(children, list):
            raise TaskError("taxonomy children must be a list")
        stack.extend((c, depth + 1) for c in reversed(children))
    built: dict[int, TaxonomyNode] = {}
    for node, _ in reversed(order):
        kids = tuple(built[id(c)] for c in node.get("children") or [])
        built[id(node)] = TaxonomyNode(_str(node["value"]), kids)
    return tuple(built[id(d)] for d in data)


# ---- regions --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RegionSpec:
    """One region as the annotator drew it, not yet rasterised.

    `geometry` is a tool-neutral shape in pixels of a `width` x `height` image (backend/service/geometry.py);
    `categories` names the `Plan.categories` it gets a label from; `tags` are the names `tag` conditions
    match (e.g. the drawing tool); `interactive` marks a region just drawn with a smart tool (SAM may replace
    it); clicks that form one SAM prompt share a `group`; `meta` belongs to the adapter.
    """

    id: str
    geometry: dict[str, Any]
    width: int
    height: int
    labels: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    interactive: bool = False
    group: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return str(self.geometry.get("kind"))

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "geometry": self.geometry, "width": self.width, "height": self.height,
                "labels": list(self.labels), "categories": list(self.categories), "tags": list(self.tags),
                "interactive": self.interactive, "group": self.group, "meta": self.meta}

    @classmethod
    def from_dict(cls, data: Any) -> RegionSpec:
        data = _mapping(data, "region")
        try:
            geometry = _mapping(data["geometry"], "region.geometry")
            return cls(
                id=_str(data["id"]),
                geometry=dict(geometry),
                width=_int(data["width"], "region.width"),
                height=_int(data["height"], "region.height"),
                labels=_strs(data.get("labels", ())),
                categories=_strs(data.get("categories", ())),
                tags=_strs(data.get("tags", ())),
                interactive=bool(data.get("interactive", False)),
                group=_opt_str(data.get("group"), "region.group"),
                meta=dict(_mapping(data.get("meta") or {}, "region.meta")),
            )
        except (KeyError, TypeError) as e:
            raise TaskError(f"malformed region payload: {type(e).__name__}: {e}") from e


# ---- answers --------------------------------------------------------------------------------------


@dataclass
class RegionAnswer:
    """What the model said about one region (or about the mask SAM made from several clicks).

    `sources` are the ids of the `RegionSpec`s it answers (one, or a click group); `mask` is a COCO RLE
    when SAM replaced the drawn shape (the answer then has a new `id`), else None.
    """

    id: str
    sources: tuple[str, ...]
    categories: list[tuple[str, str, float]] = field(default_factory=list)  # (category, label, score)
    attributes: list[tuple[str, list[str], float]] = field(default_factory=list)  # (name, values, top score)
    descriptions: list[tuple[str, str]] = field(default_factory=list)  # (name, text)
    taxonomy: list[tuple[str, list[str], float]] = field(default_factory=list)  # (name, path, path prob.)
    mask: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "sources": list(self.sources),
            "categories": [[c, label, float(s)] for c, label, s in self.categories],
            "attributes": [[n, list(v), float(s)] for n, v, s in self.attributes],
            "descriptions": [[n, t] for n, t in self.descriptions],
            "taxonomy": [[n, list(p), float(s)] for n, p, s in self.taxonomy],
            "mask": self.mask,
        }

    @classmethod
    def from_dict(cls, data: Any) -> RegionAnswer:
        data = _mapping(data, "answer")
        try:
            return cls(
                id=_str(data["id"]),
                sources=_strs(data["sources"]),
                categories=[(str(c), str(label), float(s)) for c, label, s in data.get("categories", ())],
                attributes=[(str(n), [str(x) for x in v], float(s)) for n, v, s in data.get("attributes", ())],
                descriptions=[(str(n), str(t)) for n, t in data.get("descriptions", ())],
                taxonomy=[(str(n), [str(x) for x in p], float(s)) for n, p, s in data.get("taxonomy", ())],
                mask=data.get("mask"),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise TaskError(f"malformed answer payload: {type(e).__name__}: {e}") from e


# ---- small validators -----------------------------------------------------------------------------


def _mapping(value: Any, what: str) -> dict:
    if not isinstance(value, dict):
        raise TaskError(f"{what} must be an object, got {type(value).__name__}")
    return value


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TaskError(f"expected a string, got {type(value).__name__}")
    return value


def _strs(values: Any) -> tuple[str, ...]:
    if not isinstance(values, (list, tuple)):
        raise TaskError(f"expected a list of strings, got {type(values).__name__}")
    return tuple(_str(v) for v in values)


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise TaskError(f"{what} must be a positive integer, got {value!r}")
    return value


def _opt_int(value: Any, what: str) -> int | None:
    return None if value is None else _int(value, what)


def _opt_str(value: Any, what: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise TaskError(f"{what} must be a string or null, got {type(value).__name__}")
    return value


def _detail(value: Any) -> Literal["short", "detailed"]:
    if value not in ("short", "detailed"):
        raise TaskError(f"description detail must be 'short' or 'detailed', got {value!r}")
    return value
