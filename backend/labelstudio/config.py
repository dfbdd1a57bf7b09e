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

A config with no image, no region tool or nothing to predict raises `LabelConfigError` (a ValueError),
which `/setup` turns into a 4xx with the message.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from lxml import etree

from backend.errors import InputError

# Geometry tools we turn into masks, by the lowercase tag of their plain form.
GEOMETRIES = ("brush", "polygon", "rectangle", "ellipse", "keypoint")
DETAIL_MARKER = "detail"


class LabelConfigError(InputError):
    """The labeling config is not valid XML or has nothing this backend can predict."""


@dataclass(frozen=True)
class Condition:
    """A per-region control's visibility condition (`whenTagName` / `whenLabelValue` / `whenChoiceValue`)."""

    kind: Literal["tag", "label", "choice"]
    value: str

    def values(self) -> set[str]:
        # Label Studio allows a comma-separated list of values.
        return {v.strip() for v in self.value.split(",")} | {self.value}


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
class CategorySource:
    """Where a region's category goes: the control, the result type and the candidate labels."""

    control: str
    type: str
    labels: tuple[str, ...]


@dataclass(frozen=True)
class PredictionPlan:
    """Everything the backend predicts for one labeling config; JSON-safe via `to_dict`/`from_dict`."""

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

    # ---- lookups used by ls_regions / inference -----------------------------------------------
    def tool(self, name: str) -> RegionTool | None:
        return next((t for t in self.tools if t.name == name), None)

    def label_set(self, name: str) -> LabelSet | None:
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
    def predicts_anything(self) -> bool:
        has_category = any(t.labels for t in self.tools) or (
            any(not t.is_labels_tool for t in self.tools) and any(s.labels for s in self.label_sets)
        )
        return has_category or bool(self.attributes or self.descriptions or self.taxonomies)

    # ---- JSON ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return _lists(asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PredictionPlan:
        try:
            return cls(
                image=str(data["image"]),
                image_key=str(data["image_key"]),
                tools=tuple(RegionTool(t["name"], t["type"], tuple(t.get("labels", ()))) for t in data["tools"]),
                label_sets=tuple(LabelSet(s["name"], tuple(s["labels"])) for s in data.get("label_sets", ())),
                attributes=tuple(
                    Attribute(a["name"], tuple(a["choices"]), bool(a.get("multiple")), _condition(a.get("condition")))
                    for a in data.get("attributes", ())
                ),
                descriptions=tuple(
                    Description(d["name"], d.get("detail", "short"), _condition(d.get("condition")))
                    for d in data.get("descriptions", ())
                ),
                taxonomies=tuple(
                    Taxonomy(t["name"], tuple(_node(n) for n in t["roots"]), _condition(t.get("condition")))
                    for t in data.get("taxonomies", ())
                ),
                other_controls=tuple(str(n) for n in data.get("other_controls", ())),
            )
        except (KeyError, TypeError, AttributeError) as e:
            raise LabelConfigError(f"malformed prediction plan: {e!r}") from e


def _lists(value: Any) -> Any:
    """Tuples to lists, so `to_dict()` equals its own JSON round trip."""
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_lists(v) for v in value]
    return value


def _condition(data: dict | None) -> Condition | None:
    return Condition(data["kind"], data["value"]) if data else None


def _node(data: dict) -> TaxonomyNode:
    return TaxonomyNode(data["value"], tuple(_node(c) for c in data.get("children", ())))


# ---- parsing ------------------------------------------------------------------------------------


def parse_label_config(config: str) -> PredictionPlan:
    """Parse a labeling config XML into a `PredictionPlan`; `LabelConfigError` says what is missing."""
    root = _parse_xml(config)
    from label_studio_sdk.label_interface import LabelInterface

    if config.lstrip().startswith("<?xml"):  # lxml refuses str input with an encoding declaration
        config = config.lstrip().split("?>", 1)[1]
    try:
        interface = LabelInterface(config)
    except Exception as e:  # the SDK raises bare Exception subclasses for bad configs
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
    return root


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
            return _choices_below(element)
    return ()


def _choices_below(element: etree._Element) -> tuple[TaxonomyNode, ...]:
    nodes = []
    for child in element:
        if not isinstance(child.tag, str) or child.tag.lower() != "choice":
            continue
        value = child.get("alias") or child.get("value")
        if value:
            nodes.append(TaxonomyNode(value, _choices_below(child)))
    return tuple(nodes)
