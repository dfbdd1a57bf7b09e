"""A cvat-sdk auto-annotation detection function: proposals + Osprey labels, attributes and a description.

Works wherever cvat-sdk functions run: `cvat-cli task auto-annotate TASK --function-module
backend.cvat.function -p labels=str:car,person -p attributes=str:"color=red|blue;size=small|large"`
(immediate mode, Community CVAT), and `cvat-cli function create-native` / `run-agent` (CVAT Online /
Enterprise). CVAT functions only receive the frame (peers-and-cvat.md §0.1), so objects come from the
proposer (SAM with `sam_checkpoint`, else the classical one); shapes drawn in CVAT are labeled by
`osprey cvat relabel` instead (backend/cvat/relabel.py).

Spec: one `mask` label per category, each with a `select` attribute per `attributes` entry and a `text`
attribute `description` (the short description; CVAT stores attribute values up to 4,096 characters).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from backend.service.autolabel import AutolabelError, AutolabelOptions, autolabel_image
from backend.service.tasks import Attribute, Category, Description, Plan

DESCRIPTION_ATTRIBUTE = "description"
CVAT_ATTRIBUTE_MAX_CHARS = 4096
CATEGORY = "category"


def parse_attributes(text: str) -> list[Attribute]:
    """`"color=red|blue;size=small|large"` -> attributes (`|` between values, `;` between attributes)."""
    out = []
    for part in (p.strip() for p in text.split(";")):
        if not part:
            continue
        name, sep, values = part.partition("=")
        choices = tuple(dict.fromkeys(v.strip() for v in values.split("|") if v.strip()))
        if not sep or not name.strip() or len(choices) < 2:
            raise AutolabelError(f"attribute {part!r}: expected name=v1|v2[|...] with at least two values")
        out.append(Attribute(name.strip(), choices))
    return out


class OspreyDetectionFunction:
    """`spec` + `detect(context, image)` as cvat-sdk's `DetectionFunction` protocol asks."""

    def __init__(self, engine: Any, proposer: Any, labels: Sequence[str], attributes: Sequence[Attribute] = (),
                 describe: bool = True, max_regions: int = 32, min_area: float = 0.003) -> None:
        import cvat_sdk.auto_annotation as cvataa

        labels = list(dict.fromkeys(label.strip() for label in labels if label.strip()))
        if not labels:
            raise AutolabelError("a CVAT function needs at least one label")
        names = [a.name for a in attributes]
        if DESCRIPTION_ATTRIBUTE in names and describe:
            raise AutolabelError(f"attribute name {DESCRIPTION_ATTRIBUTE!r} is reserved for the description")
        self.engine, self.proposer, self.labels = engine, proposer, labels
        self.attributes, self.describe = list(attributes), describe
        self.options = AutolabelOptions(max_regions=max_regions, min_area=min_area)
        self.plan = Plan(categories=(Category(CATEGORY, tuple(labels)),), attributes=tuple(attributes),
                         descriptions=(Description(DESCRIPTION_ATTRIBUTE, "short"),) if describe else ())
        self._attr_ids = {a.name: j for j, a in enumerate(self.attributes)}
        self._desc_id = len(self.attributes)

        def label_attributes() -> list[Any]:
            specs = [cvataa.select_attribute_spec(a.name, j, list(a.choices)) for j, a in enumerate(self.attributes)]
            if describe:
                specs.append(cvataa.text_attribute_spec(DESCRIPTION_ATTRIBUTE, self._desc_id))
            return specs

        self.spec = cvataa.DetectionFunctionSpec(
            labels=[cvataa.label_spec(name, i, type="mask", attributes=label_attributes())
                    for i, name in enumerate(labels)]
        )

    def detect(self, context: Any, image: Any) -> list[Any]:
        import cvat_sdk.auto_annotation as cvataa
        from cvat_sdk import models
        from cvat_sdk.masks import encode_mask

        rgb = np.asarray(image.convert("RGB"))
        result = autolabel_image(self.engine, rgb, self.plan, self.proposer, self.options, prefix="cvat")
        masks = {s.id: p.region for s, p in zip(result.specs, result.proposals, strict=True)}
        threshold = getattr(context, "conf_threshold", None)
        to_poly = bool(getattr(context, "conv_mask_to_poly", False))
        out = []
        for answer in result.answers:
            cat = next((c for c in answer.categories if c[0] == CATEGORY), None)
            if cat is None or (threshold is not None and cat[2] < threshold):
                continue
            region = masks[answer.sources[0]]
            attrs = [models.AttributeValRequest(spec_id=self._attr_ids[n], value=str(v[0]))
                     for n, v, _ in answer.attributes if v]
            attrs += [models.AttributeValRequest(spec_id=self._desc_id, value=text[:CVAT_ATTRIBUTE_MAX_CHARS])
                      for n, text in answer.descriptions if n == DESCRIPTION_ATTRIBUTE]
            label_id = self.labels.index(cat[1])
            if to_poly:
                points = mask_polygon(region.mask)
                if points:
                    out.append(cvataa.polygon(label_id, points, attributes=attrs))
            else:
                out.append(cvataa.mask(label_id, encode_mask(region.mask, bbox=list(region.bbox)), attributes=attrs))
        return out


def mask_polygon(mask: np.ndarray) -> list[float]:
    """The outline of a mask's largest part as flat [x1, y1, x2, y2, ...] (for `conv_mask_to_poly`)."""
    from skimage.measure import approximate_polygon, find_contours

    padded = np.pad(mask.astype(np.uint8), 1)
    contours = find_contours(padded, 0.5)
    if not contours:
        return []
    contour = approximate_polygon(max(contours, key=len), tolerance=0.5)
    pts = [(float(c - 1), float(r - 1)) for r, c in contour[:-1]]
    if len(pts) < 3:
        return []
    return [v for p in pts for v in p]


def create(labels: str, attributes: str = "", describe: bool = True, model: str = "tiny", device: str = "cpu",
           sam_checkpoint: str = "", sam_model_type: str = "vit_b", max_regions: int = 32,
           max_new_tokens: int = 64) -> OspreyDetectionFunction:
    """cvat-cli's factory (`-p name=type:value`): `labels` comma-separated, `attributes` as
    `parse_attributes` reads them, `model` a preset, checkpoint directory or Hugging Face repo id."""
    from osprey_core import load_engine
    from osprey_core.proposals import build_proposer

    engine = load_engine(model, device=device, max_new_tokens=max_new_tokens)
    proposer = build_proposer(sam_checkpoint or None, sam_model_type, device)
    return OspreyDetectionFunction(engine, proposer, labels.split(","), parse_attributes(attributes),
                                   describe=describe, max_regions=max_regions)
