"""The worker-side step of a prediction: regions of one image + the plan -> Label Studio result items.

Pure computation: the caller (an RQ job) has fetched the image and rebuilt the `RegionRef`s; nothing
here touches media, Redis or HTTP, and torch is only reached through the engine.

Engine calls are batched by what they share: one `classify` per distinct label set (all regions of
all controls with those labels together), one `attributes` call per distinct set of applicable
attributes, one `describe` call per detail level, and one `classify` per taxonomy node being expanded.

Multiple-choice attributes (`choice="multiple"`) take the top value plus every value more likely than
a uniform guess (p > 1/n); single choice takes the top value. Taxonomy paths are chosen top-down, one
level at a time; their score is the product of the chosen probabilities.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from backend.labelstudio.config import (
    Attribute,
    CategorySource,
    Condition,
    PredictionPlan,
    Taxonomy,
    TaxonomyNode,
)
from backend.labelstudio.regions import RegionRef, refine_regions
from backend.labelstudio.results import RegionResults
from osprey_core.errors import RegionError
from osprey_core.regions import MaskRefiner


def predict_regions(
    engine: Any,
    image: Any,
    plan: PredictionPlan,
    regions: Sequence[RegionRef],
    refiner: MaskRefiner | None = None,
) -> list[dict[str, Any]]:
    """Label Studio result items for `regions` of `image` (PIL image or HxWx3 uint8 array)."""
    width, height = _image_size(image)
    for ref in regions:
        if ref.size != (width, height):
            raise RegionError(
                f"region {ref.id!r} was drawn on a {ref.original_width}x{ref.original_height} image but the "
                f"task's image is {width}x{height} (was the image replaced or EXIF-rotated?)"
            )
    refs = refine_regions(image, plan, regions, refiner)
    if not refs:
        return []
    masks = [r.region for r in refs]
    sources = [plan.categories(r.from_name, r.type) for r in refs]
    categories = _categories(engine, image, masks, sources)
    labels = [{c[1] for c in cats} or set(r.labels) for r, cats in zip(refs, categories, strict=True)]
    tags = [{r.from_name} | {s.control for s in srcs} for r, srcs in zip(refs, sources, strict=True)]

    def applies(condition: Condition | None, i: int, chosen: set[str]) -> bool:
        if condition is None:
            return True
        wanted = condition.values()
        if condition.kind == "tag":
            return bool(wanted & tags[i])
        if condition.kind == "label":
            return bool(wanted & labels[i])
        return bool(wanted & chosen)

    chosen: list[set[str]] = [set() for _ in refs]
    attributes: list[list[tuple[str, list[str], float]]] = [[] for _ in refs]
    # Attributes conditioned on another attribute's value go second, once those values are known.
    for first_pass in (True, False):
        todo = [a for a in plan.attributes if (a.condition is None or a.condition.kind != "choice") == first_pass]
        wanted = [[a for a in todo if applies(a.condition, i, chosen[i])] for i in range(len(refs))]
        for i, values in _attributes(engine, image, masks, wanted).items():
            for name, picked, score in values:
                attributes[i].append((name, picked, score))
                chosen[i].update(picked)

    descriptions: list[dict[str, str]] = [{} for _ in refs]
    for detail in ("short", "detailed"):
        controls = [d for d in plan.descriptions if d.detail == detail]
        members = [i for i in range(len(refs)) if any(applies(d.condition, i, chosen[i]) for d in controls)]
        if members:
            texts = engine.describe(image, [masks[i] for i in members], detail=detail)
            for i, text in zip(members, texts, strict=True):
                for d in controls:
                    if applies(d.condition, i, chosen[i]):
                        descriptions[i][d.name] = text

    paths: list[list[tuple[str, list[str], float]]] = [[] for _ in refs]
    for taxonomy in plan.taxonomies:
        members = [i for i in range(len(refs)) if applies(taxonomy.condition, i, chosen[i])]
        for i, (path, score) in _taxonomy(engine, image, masks, taxonomy, members).items():
            paths[i].append((taxonomy.name, path, score))

    result: list[dict[str, Any]] = []
    for i, ref in enumerate(refs):
        out = RegionResults(ref)
        out.region(categories[i])
        for name, picked, score in attributes[i]:
            out.choices(name, picked, score)
        for name, text in descriptions[i].items():
            out.text(name, [text])
        for name, path, score in paths[i]:
            out.taxonomy(name, path, score)
        result.extend(out.items)
    return result


def _image_size(image: Any) -> tuple[int, int]:
    if hasattr(image, "size") and isinstance(image.size, tuple):  # PIL
        return int(image.size[0]), int(image.size[1])
    shape = getattr(image, "shape", None)
    if shape is not None and len(shape) >= 2:
        return int(shape[1]), int(shape[0])
    raise TypeError(f"image must be a PIL image or an HxWx3 array, got {type(image).__name__}")


def _categories(
    engine: Any, image: Any, masks: list, sources: list[list[CategorySource]]
) -> list[list[tuple[CategorySource, str, float]]]:
    """One `classify` call per distinct label set, covering every region that needs it."""
    out: list[list[tuple[CategorySource, str, float]]] = [[] for _ in masks]
    groups: dict[tuple[str, ...], list[tuple[int, CategorySource]]] = {}
    for i, srcs in enumerate(sources):
        for source in srcs:
            groups.setdefault(source.labels, []).append((i, source))
    for labels, members in groups.items():
        results = engine.classify(image, [masks[i] for i, _ in members], list(labels))
        for (i, source), cls in zip(members, results, strict=True):
            out[i].append((source, cls.label, float(cls.score)))
    return out


def _pick(attribute: Attribute, cls: Any) -> list[str]:
    if not attribute.multiple:
        return [cls.label]
    floor = 1.0 / len(attribute.choices)
    return [c for c in attribute.choices if c == cls.label or cls.scores.get(c, 0.0) > floor]


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
        question = {n: list(by_name[n].choices) for n in names}
        results = engine.attributes(image, [masks[i] for i in members], question)
        for i, per_region in zip(members, results, strict=True):
            out[i] = [(n, _pick(by_name[n], per_region[n]), float(per_region[n].score)) for n in names]
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
                results = engine.classify(image, [masks[i] for i in group], names)
                picks = [(c.label, float(c.score)) for c in results]
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
