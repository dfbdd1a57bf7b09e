"""Auto-labeling an image nobody drew on: proposals -> neutral regions -> the neutral predict path -> answers.

Why here: Label Studio batch tasks without regions, `osprey autolabel` (COCO), CVAT's detection function and
nuclio handler all need the same thing -- "every object of this image, classified, with attributes and
descriptions" -- so the proposals become ordinary `RegionSpec`s (COCO RLE, or Label Studio brush RLE with
the adapter's `meta`) and go through `backend.service.predict.predict_regions` like drawn regions. For a
tool that draws shapes, not masks, `shape` adds the mask's outline (`backend.service.geometry.outline`: a
polygon or box in pixels) as `meta["shape"]`; the model still sees the exact mask, so a region's answers do
not depend on the tool that shows it. Nothing here knows a tool's wire format; adapters pass what they need
through `AutolabelOptions.meta`, `categories` and `tags`.

Interactive `keep` mode (`apply_label_mode`) lives here too because it is the same kind of step: a
pre-pass on the specs and a post-pass on the answers around the one predict path.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from backend.errors import InputError
from backend.service import labels as scoring
from backend.service.geometry import OUTLINES, outline, rasterise
from backend.service.predict import image_size, predict_regions
from backend.service.tasks import Plan, RegionAnswer, RegionSpec
from osprey_core.proposals import Proposal, ProposalFilter, Proposer, build_proposer, filter_proposals
from osprey_core.regions import Region

LABEL_MODES = ("suggest", "keep")
SHAPES = ("mask", *OUTLINES)


class AutolabelError(InputError):
    """Auto-labeling options are malformed (an `extra_params` value, a CLI flag)."""


@dataclass(frozen=True)
class AutolabelOptions:
    """How region-less images are auto-labeled (JSON-safe: it rides inside a job's plan).

    `enabled`: whether region-less tasks are auto-labeled at all; `max_regions`, `min_area`, `max_area`
    (fractions of the image), `min_score`, `max_overlap`: the proposal filter; `geometry`: `rle` (COCO) or
    `brush_rle` (Label Studio); `shape`: `mask` (the tool shows the mask itself), `polygon` or `box` (its
    outline goes into `meta["shape"]`); `meta`: the adapter's fields copied into every proposal's
    `RegionSpec.meta`; `categories` / `tags`: those of every proposal (None: the plan's mask target's, else
    every category of the plan).
    """

    enabled: bool = True
    max_regions: int = 32
    min_area: float = 0.003
    max_area: float = 0.5
    min_score: float = 0.0
    max_overlap: float = 0.7
    geometry: Literal["rle", "brush_rle"] = "rle"
    shape: Literal["mask", "polygon", "box"] = "mask"
    meta: dict[str, Any] = field(default_factory=dict)
    categories: list[str] | None = None
    tags: list[str] | None = None

    def __post_init__(self) -> None:
        if self.geometry not in ("rle", "brush_rle"):
            raise AutolabelError(f"autolabel geometry must be 'rle' or 'brush_rle', got {self.geometry!r}")
        if self.shape not in SHAPES:
            raise AutolabelError(f"autolabel shape must be one of {', '.join(SHAPES)}, got {self.shape!r}")
        for name in ("categories", "tags"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value)):
                raise AutolabelError(f"autolabel {name} must be a list of names or null, got {value!r}")
        try:
            self.filter()
        except ValueError as exc:
            raise AutolabelError(f"autolabel: {exc}") from exc

    def filter(self) -> ProposalFilter:
        return ProposalFilter(min_area=self.min_area, max_area=self.max_area, min_score=self.min_score,
                              max_overlap=self.max_overlap, max_regions=self.max_regions)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> AutolabelOptions:
        if not isinstance(data, dict):
            raise AutolabelError(f"autolabel options must be an object, got {type(data).__name__}")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise AutolabelError(f"unknown autolabel option(s) {unknown}; known: {sorted(known)}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise AutolabelError(f"malformed autolabel options: {exc}") from exc

    @classmethod
    def from_settings(cls, settings: Any, extra_params: dict[str, Any] | None = None, **overrides: Any
                      ) -> AutolabelOptions:
        """Settings (`OSPREY_AUTOLABEL*`), then a project's `extra_params["autolabel"]` (a bool or an
        object of these fields), then `overrides` from the adapter."""
        base: dict[str, Any] = {
            "enabled": bool(getattr(settings, "osprey_autolabel", True)),
            "max_regions": int(getattr(settings, "osprey_autolabel_max_regions", 32)),
        }
        per_project = (extra_params or {}).get("autolabel")
        if isinstance(per_project, bool):
            base["enabled"] = per_project
        elif isinstance(per_project, dict):
            base.update(per_project)
        elif per_project is not None:
            raise AutolabelError("extra_params.autolabel must be true, false or an object of autolabel options")
        base.update(overrides)
        return cls.from_dict(base)


@dataclass
class AutolabelResult:
    """The proposals of one image, the regions made of them, the answers, and seconds per stage."""

    proposals: list[Proposal]
    specs: list[RegionSpec]
    answers: list[RegionAnswer]
    timings: dict[str, float] = field(default_factory=dict)


def proposal_specs(proposals: Sequence[Proposal], plan: Plan, options: AutolabelOptions,
                   prefix: str = "auto") -> list[RegionSpec]:
    """Proposals as neutral regions: the options' categories and tags (else the plan's mask target's, else
    every category of the plan), the proposal's score in `meta`, and its outline there for shape tools."""
    target = plan.mask_target
    categories = target.categories if target is not None else tuple(c.name for c in plan.categories)
    tags = target.tags if target is not None else ()
    if options.categories is not None:
        categories = tuple(options.categories)
    if options.tags is not None:
        tags = tuple(options.tags)
    specs = []
    for k, p in enumerate(proposals):
        region: Region = p.region
        if options.geometry == "brush_rle":
            geometry: dict[str, Any] = {"kind": "brush_rle", "rle": region.to_ls_brush()}
        else:
            rle = region.to_coco_rle()
            geometry = {"kind": "rle", "size": list(rle["size"]), "counts": rle["counts"]}
        meta = {**options.meta, "proposal_score": float(p.score), "proposal_source": p.source}
        if options.shape != "mask":
            meta["shape"] = outline(region, options.shape)
        specs.append(RegionSpec(id=f"{prefix}-{k}", geometry=geometry, width=region.width, height=region.height,
                                categories=categories, tags=tags, meta=meta))
    return specs


def autolabel_image(engine: Any, image: Any, plan: Plan, proposer: Proposer, options: AutolabelOptions | None = None,
                    prefix: str = "auto") -> AutolabelResult:
    """Propose, filter (the proposer's filter, then `options`' cap), predict."""
    options = options or AutolabelOptions()
    t0 = time.perf_counter()
    proposals = filter_proposals(proposer.propose(image), options.filter())
    t1 = time.perf_counter()
    specs = proposal_specs(proposals, plan, options, prefix)
    answers = predict_regions(engine, image, plan, specs) if specs else []
    t2 = time.perf_counter()
    return AutolabelResult(proposals, specs, answers, {"proposals_s": t1 - t0, "predict_s": t2 - t1})


# ---- the worker side of Label Studio batch tasks without regions -------------------------------------------


def runtime_proposer(runtime: Any) -> Proposer:
    """The worker's proposer, built once: SAM's generator on the refiner's model when SAM is configured
    (no second copy of SAM in memory), else the classical proposer."""
    proposer = getattr(runtime, "_osprey_proposer", None)
    if proposer is None:
        refiner = getattr(runtime, "refiner", None)
        if refiner is not None and getattr(refiner, "model", None) is not None:
            from osprey_core.proposals import SamProposals
            from osprey_core.sam import SamProposer

            proposer = SamProposals(SamProposer.from_model(refiner.model, min_area=0))
        else:
            settings = getattr(runtime, "settings", None)
            proposer = build_proposer(getattr(settings, "sam_checkpoint", None),
                                      getattr(settings, "sam_model_type", "vit_b"),
                                      getattr(settings, "osprey_device", "cpu"))
        runtime._osprey_proposer = proposer
    return proposer


def worker_specs(runtime: Any, image: Any, plan: Plan, autolabel: Any, prefix: str = "auto") -> list[RegionSpec]:
    """The regions to predict for a region-less task whose job carries autolabel options."""
    options = AutolabelOptions.from_dict(autolabel)
    proposals = filter_proposals(runtime_proposer(runtime).propose(image), options.filter())
    return proposal_specs(proposals, plan, options, prefix)


# ---- interactive: keep or suggest the annotator's label ----------------------------------------------------


def label_mode(settings: Any, extra_params: dict[str, Any] | None = None) -> str:
    """`suggest` (the model's label replaces the annotator's, default) or `keep`; per project through
    `extra_params["label_mode"]`, else `OSPREY_LABEL_MODE`."""
    mode = (extra_params or {}).get("label_mode", getattr(settings, "osprey_label_mode", "suggest"))
    if mode not in LABEL_MODES:
        raise AutolabelError(f"label_mode must be one of {', '.join(LABEL_MODES)}, got {mode!r}")
    return str(mode)


@dataclass(frozen=True)
class Disagreement:
    """In `keep` mode, what the model would have said about a region the annotator labeled."""

    region: str
    category: str
    kept: str
    kept_score: float  # the model's probability of the annotator's label
    model_label: str
    model_score: float

    @property
    def agrees(self) -> bool:
        return self.kept == self.model_label


def keep_specs(plan: Plan, specs: Sequence[RegionSpec]) -> tuple[list[RegionSpec], dict[str, dict[str, str]]]:
    """Pre-pass of `keep` mode: a category whose labels contain the annotator's label is not predicted (so
    conditions see the annotator's label); returns the specs and, per region, category -> kept label."""
    out, kept = [], {}
    for spec in specs:
        mine: dict[str, str] = {}
        for name in spec.categories:
            cat = plan.category(name)
            given = [label for label in spec.labels if cat is not None and label in cat.labels]
            if given:
                mine[name] = given[0]
        if mine:
            kept[spec.id] = mine
            spec = replace(spec, categories=tuple(c for c in spec.categories if c not in mine))
        out.append(spec)
    return out, kept


def predict_keep(engine: Any, image: Any, plan: Plan, specs: Sequence[RegionSpec], refiner: Any = None
                 ) -> tuple[list[RegionAnswer], list[Disagreement]]:
    """`keep` mode around the one predict path: attributes and descriptions are predicted with the
    annotator's label; the kept label is scored with the model's probability of it (a low score shows the
    disagreement), and each `Disagreement` says what the model would have picked."""
    reduced, kept = keep_specs(plan, specs)
    answers = predict_regions(engine, image, plan, reduced, refiner=refiner)
    if not kept:
        return answers, []
    by_spec = {s.id: s for s in specs}
    disagreements: list[Disagreement] = []
    # One classify per kept category over every region that kept a label in it.
    size = image_size(image)
    jobs: dict[str, list[RegionAnswer]] = {}
    for a in answers:
        for name in kept.get(a.sources[0], {}):
            jobs.setdefault(name, []).append(a)
    for name, members in jobs.items():
        cat = plan.category(name)
        masks = [Region.from_coco_rle(a.mask) if a.mask is not None else rasterise(by_spec[a.sources[0]], size)
                 for a in members]
        scored = scoring.classify(engine, image, masks, list(cat.labels), f"category {name!r}")
        for a, s in zip(members, scored, strict=True):
            label = kept[a.sources[0]][name]
            p = float(s.scores.get(label, 0.0))
            a.categories.append((name, label, p))
            disagreements.append(Disagreement(a.id, name, label, p, s.label, float(s.score)))
    return answers, disagreements
