"""The worker-side step of a prediction: a `Plan` + the `RegionSpec`s of one image -> `RegionAnswer`s.

Pure computation on neutral types (backend/service/tasks.py): the caller (an RQ job) has fetched the image;
nothing here touches media, Redis, HTTP or a tool's formats, and torch is only reached through the engine.

Order of work: every region's claimed image size is checked against the real image first, then regions are
rasterised (backend/service/geometry.py), then SAM (when configured) turns boxes and clicks into object
masks, then the engine is called, batched by what calls share: one `classify` per distinct label set (all
regions with those labels together), one `attributes` call per distinct set of applicable attributes, one
`describe` call per detail level, one `classify` per taxonomy node being expanded. Label sets are scored in
bounded chunks with neutralised text (backend/service/labels.py).

Rules: multiple-choice attributes take the top value plus every value more likely than a uniform guess
(p > 1/n); single choice takes the top value. Taxonomy paths are chosen top-down, one level at a time; their
score is the product of the chosen probabilities. Conditions: `tag` matches the region's tags and category
names, `label` its predicted labels (else the annotator's), `choice` the values predicted for its other
attributes (those attributes are predicted first).

SAM (a `MaskRefiner`): interactive clicks of one `group` are one prompt (positive and negative together),
an interactive box one box prompt; the mask becomes a new region `sam-<hash>` answered with `mask` set, when
the plan has a `mask_target` (else the drawn region is answered, the SAM mask being what the model sees).
Batch clicks and boxes keep their id and shape; only the mask the model sees improves. An empty SAM mask
falls back to the drawn shape; without SAM, negative clicks are dropped.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from backend.service import labels as scoring
from backend.service.geometry import (
    MAX_REGIONS,
    check_geometry,
    check_size,
    click_prompt,
    positive,
    rasterise,
)
from backend.service.tasks import (
    Attribute,
    Category,
    Condition,
    Plan,
    RegionAnswer,
    RegionSpec,
    Taxonomy,
    TaxonomyNode,
)
from osprey_core.errors import ImageError, RegionError
from osprey_core.regions import MaskRefiner, Region

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedRegion:
    """A region ready for the engine: its mask, and what is needed to answer on it."""

    id: str
    sources: tuple[str, ...]
    region: Region
    labels: tuple[str, ...]
    categories: tuple[str, ...]
    tags: tuple[str, ...]
    replaced: bool = False  # SAM's mask replaces the drawn shape(s)


def predict_regions(
    engine: Any,
    image: Any,
    plan: Plan,
    specs: Sequence[RegionSpec],
    refiner: MaskRefiner | None = None,
) -> list[RegionAnswer]:
    """Answers for `specs` drawn on `image` (PIL image or HxWx3 uint8 array), in order of the regions."""
    size = image_size(image)
    if len(specs) > MAX_REGIONS:
        raise RegionError(f"{len(specs)} regions in one task, above the limit of {MAX_REGIONS}")
    for spec in specs:
        check_size(spec, size)  # before anything is rasterised
        check_geometry(spec.geometry, spec.width, spec.height)
    items = refine_regions(image, plan, specs, refiner)
    if not items:
        return []
    masks = [it.region for it in items]
    sources = [[c for c in (plan.category(n) for n in it.categories) if c is not None and c.labels] for it in items]
    categories = _categories(engine, image, masks, sources)
    given = [{c[1] for c in cats} or set(it.labels) for it, cats in zip(items, categories, strict=True)]
    tags = [set(it.tags) | {c.name for c in srcs} for it, srcs in zip(items, sources, strict=True)]

    def applies(condition: Condition | None, i: int, chosen: set[str]) -> bool:
        if condition is None:
            return True
        wanted = condition.values()
        if condition.kind == "tag":
            return bool(wanted & tags[i])
        if condition.kind == "label":
            return bool(wanted & given[i])
        return bool(wanted & chosen)

    chosen: list[set[str]] = [set() for _ in items]
    attributes: list[list[tuple[str, list[str], float]]] = [[] for _ in items]
    # Attributes conditioned on another attribute's value go second, once those values are known.
    for first_pass in (True, False):
        todo = [a for a in plan.attributes if (a.condition is None or a.condition.kind != "choice") == first_pass]
        wanted = [[a for a in todo if applies(a.condition, i, chosen[i])] for i in range(len(items))]
        for i, values in _attributes(engine, image, masks, wanted).items():
            for name, picked, score in values:
                attributes[i].append((name, picked, score))
                chosen[i].update(picked)

    descriptions: list[list[tuple[str, str]]] = [[] for _ in items]
    for detail in ("short", "detailed"):
        controls = [d for d in plan.descriptions if d.detail == detail]
        members = [i for i in range(len(items)) if any(applies(d.condition, i, chosen[i]) for d in controls)]
        if members:
            texts = engine.describe(image, [masks[i] for i in members], detail=detail)
            for i, text in zip(members, texts, strict=True):
                descriptions[i] += [(d.name, text) for d in controls if applies(d.condition, i, chosen[i])]

    paths: list[list[tuple[str, list[str], float]]] = [[] for _ in items]
    for taxonomy in plan.taxonomies:
        members = [i for i in range(len(items)) if applies(taxonomy.condition, i, chosen[i])]
        for i, (path, score) in _taxonomy(engine, image, masks, taxonomy, members).items():
            paths[i].append((taxonomy.name, path, score))

    return [
        RegionAnswer(
            id=it.id, sources=it.sources, categories=[(c.name, label, score) for c, label, score in categories[i]],
            attributes=attributes[i], descriptions=descriptions[i], taxonomy=paths[i],
            mask=it.region.to_coco_rle() if it.replaced else None,
        )
        for i, it in enumerate(items)
    ]


def image_size(image: Any) -> tuple[int, int]:
    """(width, height) of a PIL image or an HxWx3 array."""
    if hasattr(image, "size") and isinstance(image.size, tuple):  # PIL
        return int(image.size[0]), int(image.size[1])
    shape = getattr(image, "shape", None)
    if shape is not None and len(shape) >= 2:
        return int(shape[1]), int(shape[0])
    raise ImageError(f"image must be a PIL image or an HxWx3 array, got {type(image).__name__}")


# ---- regions and SAM ------------------------------------------------------------------------------


def _item(spec: RegionSpec, region: Region) -> PreparedRegion:
    return PreparedRegion(spec.id, (spec.id,), region.with_id(spec.id), spec.labels, spec.categories, spec.tags)


def refine_regions(image: Any, plan: Plan, specs: Sequence[RegionSpec],
                   refiner: MaskRefiner | None) -> list[PreparedRegion]:
    """Rasterised regions (sizes checked), boxes and clicks turned into SAM masks (module docstring)."""
    size = image_size(image)
    if refiner is None:
        return [_item(s, rasterise(s, size)) for s in specs if positive(s)]
    items: list[PreparedRegion] = []
    prompted: set[str] = set()
    for spec in specs:
        if spec.kind == "points" and spec.interactive:
            key = spec.group or spec.id
            if key not in prompted:
                prompted.add(key)
                group = [s for s in specs if s.kind == "points" and s.interactive and (s.group or s.id) == key]
                items.extend(_refine_clicks(image, plan, group, refiner, size))
        elif spec.kind == "points" and positive(spec):
            points, flags = click_prompt(spec)
            mask = _sam(lambda p=points, f=flags: refiner.points_to_mask(image, p, f), spec)
            items.append(_item(spec, rasterise(spec, size) if mask is None else mask))
        elif spec.kind == "box":
            drawn = rasterise(spec, size)
            mask = _sam(lambda d=drawn: refiner.box_to_mask(image, d.bbox), spec)
            if mask is None:
                items.append(_item(spec, drawn))
            elif spec.interactive:
                items.append(_as_mask(plan, [spec], mask))
            else:
                items.append(_item(spec, mask))
        elif positive(spec):
            items.append(_item(spec, rasterise(spec, size)))
    return items


def _refine_clicks(image: Any, plan: Plan, group: list[RegionSpec], refiner: MaskRefiner,
                   size: tuple[int, int]) -> list[PreparedRegion]:
    positives = [s for s in group if positive(s)]
    if not positives:
        return []  # only negative clicks: nothing to segment yet
    points: list[tuple[float, float]] = []
    flags: list[int] = []
    for spec in group:
        p, f = click_prompt(spec)
        points += p
        flags += f
    mask = _sam(lambda: refiner.points_to_mask(image, points, flags), group[0])
    if mask is None:
        return [_item(s, rasterise(s, size)) for s in positives]
    return [_as_mask(plan, group, mask)]


def _sam(call: Callable[[], Region], spec: RegionSpec) -> Region | None:
    region = call()
    if region.size != spec.size:
        raise RegionError(
            f"region {spec.id!r}: SAM mask is {region.width}x{region.height} but the region's image is "
            f"{spec.width}x{spec.height}"
        )
    if region.area == 0:
        logger.warning("SAM found nothing for region %s; using the drawn shape", spec.id)
        return None
    return region


def _as_mask(plan: Plan, group: list[RegionSpec], mask: Region) -> PreparedRegion:
    first = group[0]
    target = plan.mask_target
    if target is None:
        return _item(first, mask)
    digest = hashlib.sha1("|".join(s.id for s in group).encode()).hexdigest()[:10]
    new_id = f"sam-{digest}"
    return PreparedRegion(new_id, tuple(s.id for s in group), mask.with_id(new_id), first.labels, target.categories,
                 target.tags, replaced=True)


# ---- engine calls ---------------------------------------------------------------------------------


def _categories(
    engine: Any, image: Any, masks: list, sources: list[list[Category]]
) -> list[list[tuple[Category, str, float]]]:
    """One (chunked) `classify` per distinct label set, covering every region that needs it."""
    out: list[list[tuple[Category, str, float]]] = [[] for _ in masks]
    groups: dict[tuple[str, ...], list[tuple[int, Category]]] = {}
    for i, cats in enumerate(sources):
        for category in cats:
            groups.setdefault(category.labels, []).append((i, category))
    for labels, members in groups.items():
        what = f"category {members[0][1].name!r}"
        results = scoring.classify(engine, image, [masks[i] for i, _ in members], list(labels), what)
        for (i, category), cls in zip(members, results, strict=True):
            out[i].append((category, cls.label, cls.score))
    return out


def _pick(attribute: Attribute, cls: scoring.Scored) -> list[str]:
    if not attribute.multiple:
        return [cls.label]
    floor = 1.0 / len(set(attribute.choices))
    return [c for c in dict.fromkeys(attribute.choices) if c == cls.label or cls.scores.get(c, 0.0) > floor]


def _attributes(
    engine: Any, image: Any, masks: list, wanted: list[list[Attribute]]
) -> dict[int, list[tuple[str, list[str], float]]]:
    """One `attributes` call per distinct set of applicable attributes."""
    groups: dict[tuple[str, ...], list[int]] = {}
    by_name: dict[str, Attribute] = {}
    for i, attrs in enumerate(wanted):
        if attrs:
            groups.setdefault(tuple(a.name for a in attrs), []).append(i)
            by_name.update({a.name: a for a in attrs})
    out: dict[int, list[tuple[str, list[str], float]]] = {}
    for names, members in groups.items():
        questions = {n: list(by_name[n].choices) for n in names}
        results = scoring.attributes(engine, image, [masks[i] for i in members], questions)
        for i, per_region in zip(members, results, strict=True):
            out[i] = [(n, _pick(by_name[n], per_region[n]), per_region[n].score) for n in names]
    return out


def _taxonomy(
    engine: Any, image: Any, masks: list, taxonomy: Taxonomy, members: list[int]
) -> dict[int, tuple[list[str], float]]:
    """Top-down: classify among a node's children, descend into the winner, until a leaf."""
    done: dict[int, tuple[list[str], float]] = {}
    frontier: dict[int, tuple[tuple[TaxonomyNode, ...], list[str], float]] = {
        i: (taxonomy.roots, [], 1.0) for i in members
    }
    while frontier:
        groups: dict[int, list[int]] = {}
        for i, (children, _, _) in frontier.items():
            groups.setdefault(id(children), []).append(i)
        next_frontier = {}
        for group in groups.values():
            children = frontier[group[0]][0]
            nodes = {n.value: n for n in reversed(children)}  # first of duplicate siblings wins
            names = [n.value for n in children if nodes[n.value] is n]
            if len(names) == 1:
                picks = [(names[0], 1.0)] * len(group)
            else:
                results = scoring.classify(engine, image, [masks[i] for i in group], names,
                                           f"taxonomy {taxonomy.name!r}")
                picks = [(c.label, c.score) for c in results]
            for i, (label, score) in zip(group, picks, strict=True):
                _, path, prob = frontier[i]
                node = nodes[label]
                state = (node.children, [*path, label], prob * score)
                if node.children:
                    next_frontier[i] = state
                else:
                    done[i] = (state[1], state[2])
        frontier = next_frontier
    return done
