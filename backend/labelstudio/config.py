"""What to predict for a Label Studio project, read from its labeling config.

The labeling config decides everything; we parse it with label-studio-sdk's `LabelInterface` into a
`PredictionPlan`, a small JSON-safe description that the web process builds once (at `/setup` and per
`/predict`) and ships to workers inside job payloads.

Conventions (also in the README, "Label config conventions"):

- **Image**: the first `<Image>` tag that a region tool points at. Its `value` must be a task-data
  variable (`value="$image"`); the key (`image`) is where the URL is found in `task["data"]`.
  Other object tags (a second image, text, audio) are ignored.
- **Regions and their category**: `BrushLabels`, `PolygonLabels`, `RectangleLabels`, `EllipseLabels`
  and `KeyPointLabels` regions get a category chosen from that control's own labels, with a score.
  Plain `Brush`, `Polygon`, `Rectangle`, `Ellipse` and `KeyPoint` tools get theirs from every `<Labels>`
  control on the same image (the "split" result format: a geometry result plus a `labels` result with
  the same `id`).
- **Attributes**: a per-region `<Choices perRegion="true">`. The control name is the attribute, its
  choices are the candidates; `choice="multiple"` may give several values.
- **Descriptions**: a per-region `<TextArea perRegion="true">` gets a *detailed* description when its
  name contains "detail" (case-insensitive, e.g. `detailed_description`) and a *short* one otherwise
  (e.g. `caption`, `description`).
- **Taxonomy**: a per-region `<Taxonomy perRegion="true">` gets one path from a root to a leaf, chosen
  level by level.
- Conditions on per-region controls are honoured: `whenLabelValue` against the region's predicted
  label (or its own when none is predicted), `whenChoiceValue` against the values predicted for the
  region's other per-region Choices, and a lone `whenTagName` against the region's tool or `<Labels>`
  control.
- Not predicted: image-level (not per-region) `Choices`/`TextArea`/`Taxonomy`, choices that come from
  task data (`value="$options"`), `Number`, `Rating`, `DateTime`, `Relations`.

A config with no image, no region tool or nothing to predict, one nested deeper than `MAX_XML_DEPTH`, a
taxonomy deeper than `MAX_TAXONOMY_DEPTH` or a label set above `backend.service.labels.MAX_LABELS` labels
raises `LabelConfigError`, which `/setup` and `/predict` turn into a 422 with the message.

`PredictionPlan` is the Label Studio view of a config (controls, result types, the image's data key);
`to_plan()` gives the neutral `backend.service.tasks.Plan` that workers predict with.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from label_studio_sdk._legacy.exceptions import (
    LabelStudioValidationErrorSentryIgnored,
    LabelStudioXMLSyntaxErrorSentryIgnored,
    LSConfigParseException,
)
from lxml import etree

from backend.errors import InputError
from backend.service.labels import MAX_LABEL_CHARS, MAX_LABELS
from backend.service.tasks import (
    Attribute,
    Category,
    Condition,
    Description,
    MaskTarget,
    Plan,
    TaskError,
    Taxonomy,
    TaxonomyNode,
)

__all__ = ["Attribute", "Condition", "Description", "Taxonomy", "TaxonomyNode"]  # re-exported neutral types

# Geometry tools we turn into masks, by the lowercase tag of their plain form.
GEOMETRIES = ("brush", "polygon", "rectangle", "ellipse", "keypoint")
DETAIL_MARKER = "detail"
MAX_XML_DEPTH = 64  # element nesting of a whole config (LabelInterface and our walks recurse over it)
MAX_TAXONOMY_DEPTH = 32  # levels of one Taxonomy
MAX_TAXONOMY_NODES = 20_000
MAX_EXTRA_PARAMS_DEPTH = 32  # nesting of a project's extra_params (json.loads recurses; 10^5 levels crash it)
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_SDK_CONFIG_ERRORS = (LabelStudioValidationErrorSentryIgnored, LabelStudioXMLSyntaxErrorSentryIgnored,
                      LSConfigParseException, etree.LxmlError)


class LabelConfigError(InputError):
    """The labeling config is not valid XML or has nothing this backend can predict."""


@dataclass(frozen=True)
class RegionTool:
    """A control that draws regions: `BrushLabels`, `Rectangle`, ...; `labels` is () for plain tools."""

    name: str
    type: str  # lowercase tag = the result's "type": "brushlabels", "rectangle", ...
    labels: tuple[str, ...] = ()

    @property
    def geometry(self) -> str:
        return self.type.removesuffix("labels")

    @property
    def is_labels_tool(self) -> bool:
        return self.type.endswith("labels")


@dataclass(frozen=True)
class LabelSet:
    """A `<Labels>` control that labels the regions of plain tools on the image."""

    name: str
    labels: tuple[str, ...]


@dataclass(frozen=True)
class CategorySource:
    """Where a region's category goes: the control, the result type and the candidate labels."""

    control: str
    type: str
    labels: tuple[str, ...]


@dataclass(frozen=True)
class PredictionPlan:
    """Everything the backend predicts for one labeling config, in Label Studio's terms; JSON via
    `to_dict`/`from_dict`; `to_plan()` is the neutral plan workers use."""

    image: str  # name of the <Image> tag = `to_name` of every region
    image_key: str  # key of the image URL in task["data"]
    tools: tuple[RegionTool, ...]
    label_sets: tuple[LabelSet, ...] = ()
    attributes: tuple[Attribute, ...] = ()
    descriptions: tuple[Description, ...] = ()
    taxonomies: tuple[Taxonomy, ...] = ()
    # Every other control of the config (global Choices, Number, tools on another image, ...): their
    # results are skipped, while a from_name in none of these lists is an error.
    other_controls: tuple[str, ...] = ()

    # ---- lookups used by regions / results ----------------------------------------------------
    def tool(self, name: Any) -> RegionTool | None:
        return next((t for t in self.tools if t.name == name), None)

    def label_set(self, name: Any) -> LabelSet | None:
        return next((s for s in self.label_sets if s.name == name), None)

    def tool_for_geometry(self, geometry: str) -> RegionTool | None:
        """The plain tool of a geometry (for "merged" results whose from_name is a `<Labels>` control)."""
        return next((t for t in self.tools if not t.is_labels_tool and t.geometry == geometry), None)

    def categories(self, from_name: str, type_: str) -> list[CategorySource]:
        """Category targets of a region whose result had this `from_name` and `type`.

        A `*Labels` tool labels its own regions; a plain tool's regions get one `labels` result per
        `<Labels>` control; a merged result (from_name = a `<Labels>` control, type `rectanglelabels`)
        is answered in the same merged shape.
        """
        tool = self.tool(from_name)
        if tool is not None:
            if tool.is_labels_tool:
                return [CategorySource(tool.name, tool.type, tool.labels)] if tool.labels else []
            return [CategorySource(s.name, "labels", s.labels) for s in self.label_sets if s.labels]
        label_set = self.label_set(from_name)
        if label_set is not None and label_set.labels:
            return [CategorySource(label_set.name, type_, label_set.labels)]
        return []

    @property
    def brush_tool(self) -> RegionTool | None:
        """Where SAM masks go: the first `BrushLabels`, else the first plain `Brush`."""
        brushes = [t for t in self.tools if t.geometry == "brush"]
        return next((t for t in brushes if t.is_labels_tool), brushes[0] if brushes else None)

    @property
    def predicts_anything(self) -> bool:
        has_category = any(t.labels for t in self.tools) or (
            any(not t.is_labels_tool for t in self.tools) and any(s.labels for s in self.label_sets)
        )
        return has_category or bool(self.attributes or self.descriptions or self.taxonomies)

    # ---- the neutral plan -----------------------------------------------------------------------
    def to_plan(self) -> Plan:
        """Categories are named after their control (a `*Labels` tool or a `<Labels>` control)."""
        categories = [Category(t.name, t.labels) for t in self.tools if t.is_labels_tool and t.labels]
        categories += [Category(s.name, s.labels) for s in self.label_sets if s.labels]
        brush = self.brush_tool
        target = None
        if brush is not None:
            target = MaskTarget(
                categories=tuple(c.control for c in self.categories(brush.name, brush.type)),
                tags=(brush.name,),
                meta={"from_name": brush.name, "type": brush.type},
            )
        return Plan(tuple(categories), self.attributes, self.descriptions, self.taxonomies, target)

    # ---- JSON ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        neutral = Plan(attributes=self.attributes, descriptions=self.descriptions,
                       taxonomies=self.taxonomies).to_dict()
        return {
            "image": self.image,
            "image_key": self.image_key,
            "tools": [{"name": t.name, "type": t.type, "labels": list(t.labels)} for t in self.tools],
            "label_sets": [{"name": s.name, "labels": list(s.labels)} for s in self.label_sets],
            "attributes": neutral["attributes"],
            "descriptions": neutral["descriptions"],
            "taxonomies": neutral["taxonomies"],
            "other_controls": list(self.other_controls),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PredictionPlan:
        try:
            neutral = Plan.from_dict({k: data.get(k, []) for k in ("attributes", "descriptions", "taxonomies")})
            return cls(
                image=str(data["image"]),
                image_key=str(data["image_key"]),
                tools=tuple(RegionTool(t["name"], t["type"], tuple(t.get("labels", ()))) for t in data["tools"]),
                label_sets=tuple(LabelSet(s["name"], tuple(s["labels"])) for s in data.get("label_sets", ())),
                attributes=neutral.attributes,
                descriptions=neutral.descriptions,
                taxonomies=neutral.taxonomies,
                other_controls=tuple(str(n) for n in data.get("other_controls", ())),
            )
        except (KeyError, TypeError, AttributeError, TaskError) as e:
            raise LabelConfigError(f"malformed prediction plan: {e!r}") from e


# ---- extra_params ---------------------------------------------------------------------------------


def parse_extra_params(extra: Any) -> dict[str, Any]:
    """A project's `extra_params`: v2 sends a JSON string, Label Studio stores whatever it was given, so
    accept both (protocol §10.7); nesting is bounded before anything recursive sees it."""
    if extra is None or extra == "":
        return {}
    if isinstance(extra, str):
        if json_depth(extra) > MAX_EXTRA_PARAMS_DEPTH:
            raise LabelConfigError(f"extra_params nests deeper than {MAX_EXTRA_PARAMS_DEPTH} levels")
        try:
            extra = json.loads(extra)
        except json.JSONDecodeError as exc:
            raise LabelConfigError(f"extra_params is not valid JSON: {exc}") from exc
        if extra is None:
            return {}
    if not isinstance(extra, dict):
        raise LabelConfigError("extra_params must be a JSON object")
    if value_depth(extra) > MAX_EXTRA_PARAMS_DEPTH:
        raise LabelConfigError(f"extra_params nests deeper than {MAX_EXTRA_PARAMS_DEPTH} levels")
    return extra


def json_depth(text: str) -> int:
    """Deepest bracket nesting of a JSON text, without parsing it (strings are skipped)."""
    brackets = np.frombuffer(re.sub(r"[^\[\]{}]", "", _JSON_STRING.sub("", text)).encode("ascii"), dtype=np.uint8)
    if not brackets.size:
        return 0
    steps = np.where((brackets == ord("[")) | (brackets == ord("{")), 1, -1)
    return int(np.cumsum(steps).max())


def value_depth(value: Any) -> int:
    """Deepest nesting of dicts/lists in a parsed JSON value, iteratively."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            v = list(v.values())
        if isinstance(v, list):
            deepest = max(deepest, d)
            if d > MAX_EXTRA_PARAMS_DEPTH:
                break
            stack.extend((x, d + 1) for x in v)
    return deepest


# ---- parsing ------------------------------------------------------------------------------------


def parse_label_config(config: str) -> PredictionPlan:
    """Parse a labeling config XML into a `PredictionPlan`; `LabelConfigError` says what is missing."""
    root = _parse_xml(config)
    from label_studio_sdk.label_interface import LabelInterface

    if config.lstrip().startswith("<?xml"):  # lxml refuses str input with an encoding declaration
        config = config.lstrip().split("?>", 1)[1]
    try:
        interface = LabelInterface(config)
    except _SDK_CONFIG_ERRORS as e:  # the SDK's own exception classes for bad configs
        raise LabelConfigError(f"invalid labeling config: {e}") from e
    controls = list(interface.controls or [])
    objects = list(interface.objects or [])

    images = [o for o in objects if (o.tag or "").lower() == "image"]
    if not images:
        raise LabelConfigError("the labeling config has no <Image> tag: this backend labels image regions")

    def tools_of(image_name: str) -> list:
        return [
            c for c in controls
            if (c.tag or "").lower().removesuffix("labels") in GEOMETRIES and image_name in (c.to_name or [])
        ]

    image = next((o for o in images if tools_of(o.name)), None)
    if image is None:
        names = ", ".join(sorted(g.capitalize() for g in GEOMETRIES))
        raise LabelConfigError(
            f"no region control points at an <Image>: add one of {names} (or their *Labels forms) "
            f'with toName="{images[0].name}"'
        )
    value = image.value or ""
    if not value.startswith("$") or len(value) < 2:
        raise LabelConfigError(
            f'<Image name="{image.name}"> must take its URL from the task data, e.g. value="$image" (got {value!r})'
        )

    tools = tuple(RegionTool(c.name, c.tag.lower(), tuple(c.labels or ())) for c in tools_of(image.name))
    on_image = [c for c in controls if image.name in (c.to_name or [])]
    label_sets = tuple(
        LabelSet(c.name, tuple(c.labels or ())) for c in on_image if c.tag.lower() == "labels"
    )
    per_region = [c for c in on_image if str(c.attr.get("perRegion", "")).lower() == "true"]
    attributes, descriptions, taxonomies = [], [], []
    for c in per_region:
        tag, condition = c.tag.lower(), _read_condition(c.attr)
        if tag == "choices" and c.labels:
            multiple = str(c.attr.get("choice", "single")).lower() == "multiple"
            attributes.append(Attribute(c.name, tuple(c.labels), multiple, condition))
        elif tag == "textarea":
            detail = "detailed" if DETAIL_MARKER in c.name.lower() else "short"
            descriptions.append(Description(c.name, detail, condition))
        elif tag == "taxonomy":
            roots = _taxonomy_roots(root, c.name)
            if roots:
                taxonomies.append(Taxonomy(c.name, roots, condition))

    predicted = {t.name for t in tools} | {s.name for s in label_sets}
    predicted |= {x.name for x in (*attributes, *descriptions, *taxonomies)}
    plan = PredictionPlan(
        image=image.name,
        image_key=value[1:],
        tools=tools,
        label_sets=label_sets,
        attributes=tuple(attributes),
        descriptions=tuple(descriptions),
        taxonomies=tuple(taxonomies),
        other_controls=tuple(c.name for c in controls if c.name not in predicted),
    )
    _check_label_sets(plan)
    if not plan.predicts_anything:
        raise LabelConfigError(
            f'nothing to predict on <Image name="{image.name}">: give the region tools labels '
            "(e.g. <RectangleLabels> with <Label> children, or a <Labels> control next to a plain tool), "
            'or add a perRegion="true" Choices, TextArea or Taxonomy'
        )
    return plan


def _parse_xml(config: str) -> etree._Element:
    if not isinstance(config, str) or not config.strip():
        raise LabelConfigError("the labeling config is empty")
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False)
    try:
        root = etree.fromstring(config.encode("utf-8"), parser=parser)
    except etree.XMLSyntaxError as e:
        raise LabelConfigError(f"the labeling config is not valid XML: {e}") from e
    if root.getroottree().docinfo.doctype:
        raise LabelConfigError("the labeling config must not contain a DOCTYPE")
    depth: dict[etree._Element, int] = {root: 1}
    for element in root.iterdescendants():
        d = depth[element.getparent()] + 1
        if d > MAX_XML_DEPTH:
            raise LabelConfigError(f"the labeling config nests elements more than {MAX_XML_DEPTH} levels deep")
        depth[element] = d
    return root


def _check_label_sets(plan: PredictionPlan) -> None:
    """Every label set can be scored: at most MAX_LABELS labels of at most MAX_LABEL_CHARS characters."""
    sets = [(f"<{t.type}> {t.name!r}", t.labels) for t in plan.tools]
    sets += [(f"<Labels> {s.name!r}", s.labels) for s in plan.label_sets]
    sets += [(f"<Choices> {a.name!r}", a.choices) for a in plan.attributes]
    for name, labels in sets:
        if len(set(labels)) > MAX_LABELS:
            raise LabelConfigError(f"{name} has {len(set(labels))} labels; at most {MAX_LABELS} can be scored")
        long = next((v for v in labels if len(v) > MAX_LABEL_CHARS), None)
        if long is not None:
            raise LabelConfigError(f"{name} has a label of {len(long)} characters; at most {MAX_LABEL_CHARS}")


def _read_condition(attr: dict) -> Condition | None:
    # whenChoiceValue / whenLabelValue come with a whenTagName naming the Choices / Labels control, so
    # the value is the real condition and the tag name alone is only used when it stands alone.
    for key, kind in (("whenChoiceValue", "choice"), ("whenLabelValue", "label"), ("whenTagName", "tag")):
        if attr.get(key):
            return Condition(kind, str(attr[key]))
    return None


def _taxonomy_roots(root: etree._Element, name: str) -> tuple[TaxonomyNode, ...]:
    for element in root.iter():
        if isinstance(element.tag, str) and element.tag.lower() == "taxonomy" and element.get("name") == name:
            return _choices_below(element, name)
    return ()


def _is_choice(element: etree._Element) -> bool:
    return isinstance(element.tag, str) and element.tag.lower() == "choice" and bool(
        element.get("alias") or element.get("value"))


def _choices_below(taxonomy: etree._Element, name: str) -> tuple[TaxonomyNode, ...]:
    """The `<Choice>` tree under a `<Taxonomy>`, built bottom-up without recursion; limits checked first."""
    order: list[tuple[etree._Element, int]] = []
    stack = [(c, 1) for c in reversed(taxonomy) if _is_choice(c)]
    while stack:
        element, depth = stack.pop()
        if depth > MAX_TAXONOMY_DEPTH:
            raise LabelConfigError(f"<Taxonomy> {name!r} is more than {MAX_TAXONOMY_DEPTH} levels deep")
        order.append((element, depth))
        if len(order) > MAX_TAXONOMY_NODES:
            raise LabelConfigError(f"<Taxonomy> {name!r} has more than {MAX_TAXONOMY_NODES} choices")
        stack.extend((c, depth + 1) for c in reversed(element) if _is_choice(c))
    built: dict[etree._Element, TaxonomyNode] = {}
    for element, _ in reversed(order):
        value = element.get("alias") or element.get("value")
        if len(value) > MAX_LABEL_CHARS:
            raise LabelConfigError(f"<Taxonomy> {name!r} has a choice of {len(value)} characters; at most "
                                   f"{MAX_LABEL_CHARS}")
        built[element] = TaxonomyNode(value, tuple(built[c] for c in element if _is_choice(c)))
    nodes = tuple(built[c] for c in taxonomy if _is_choice(c))
    siblings = [n.children for n in built.values()] + [nodes]
    widest = max((len({n.value for n in level}) for level in siblings), default=0)
    if widest > MAX_LABELS:
        raise LabelConfigError(f"<Taxonomy> {name!r} has a level of {widest} choices; at most {MAX_LABELS}")
    return nodes
