"""Region proposals for images nobody has drawn on yet: "every object of this image" as scored masks.

Two proposers behind one `propose(image) -> list[Proposal]`:

- `SamProposals`: SAM's automatic mask generator ("segment everything", `sam.SamProposer`) when a SAM
  checkpoint is configured; its score is SAM's predicted IoU, its stability score is kept.
- `ClassicalProposer`: needs no weights, so the embedded default auto-labels too. Felzenszwalb's
  graph-based over-segmentation (scikit-image), then a region adjacency graph on mean colour whose
  edges below `merge_threshold` are merged (textures such as stripes, checkers or noise fold back into
  one background segment), then each merged segment is a candidate. Chosen by measured recall on the
  synthetic demo images (tests/core/test_proposals.py holds the floor; docs/autolabel.md the numbers):
  plain colour-connected components and unmerged Felzenszwalb reach the same recall but propose every
  texture cell too (precision ~0.15 vs ~0.99).

Both go through the same `filter_proposals` (area, stability, overlap, a cap per image). This module
needs numpy, scipy and scikit-image only; torch is reached only through SAM.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from PIL import Image

from .errors import ConfigError, ImageError
from .regions import Region


@dataclass(frozen=True)
class Proposal:
    """One proposed object: its mask, a score in [0, 1] (SAM: predicted IoU; classical: compactness),
    a stability score (SAM's; classical: 1.0) and which proposer made it."""

    region: Region
    score: float
    stability: float = 1.0
    source: str = "classical"


@dataclass(frozen=True)
class ProposalFilter:
    """What survives: `min_area` / `max_area` as fractions of the image, `min_score`, `min_stability`,
    at most `max_overlap` mask IoU with a better-scored kept proposal, and at most `max_regions`."""

    min_area: float = 0.003
    max_area: float = 0.5
    min_score: float = 0.0
    min_stability: float = 0.0
    max_overlap: float = 0.7
    max_regions: int = 32

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_area <= self.max_area <= 1.0:
            raise ConfigError(f"need 0 <= min_area <= max_area <= 1 (fractions of the image), got "
                              f"{self.min_area}, {self.max_area}")
        if not 0.0 <= self.max_overlap <= 1.0:
            raise ConfigError(f"max_overlap must be a mask IoU in [0, 1], got {self.max_overlap}")
        if self.max_regions < 1:
            raise ConfigError(f"max_regions must be >= 1, got {self.max_regions}")


class Proposer(Protocol):
    def propose(self, image: Any) -> list[Proposal]: ...


def filter_proposals(proposals: Sequence[Proposal], flt: ProposalFilter) -> list[Proposal]:
    """Best score first; drops too small / too large / low-score / unstable ones and near duplicates
    (greedy mask NMS), then keeps the first `max_regions`."""
    kept: list[Proposal] = []
    for p in sorted(proposals, key=lambda p: (-p.score, -p.region.area)):
        frac = p.region.area / float(p.region.width * p.region.height)
        if not flt.min_area <= frac <= flt.max_area:
            continue
        if p.score < flt.min_score or p.stability < flt.min_stability:
            continue
        if any(mask_iou(p.region.mask, k.region.mask) > flt.max_overlap for k in kept):
            continue
        kept.append(p)
        if len(kept) == flt.max_regions:
            break
    return kept


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    inter = np.count_nonzero(a & b)
    if inter == 0:
        return 0.0
    return inter / float(np.count_nonzero(a | b))


def to_rgb(image: Any) -> np.ndarray:
    """PIL image or HxW / HxWx3 / HxWx4 uint8 array -> HxWx3 uint8."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise ImageError("image must be a PIL image or a uint8 HxWx3 array")
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    if image.ndim != 3 or image.shape[2] not in (3, 4) or min(image.shape[:2]) == 0:
        raise ImageError(f"image array must be HxWx3 (RGB), got shape {tuple(image.shape)}")
    return np.ascontiguousarray(image[:, :, :3])


class ClassicalProposer:
    """Felzenszwalb superpixels merged on mean colour into object-like segments (see the module doc).

    `max_side`: images are segmented at most this large (masks are scaled back to full size), which
    bounds the cost on big photos; `scale`/`sigma` are Felzenszwalb's; `merge_threshold` is the RGB
    distance (0-441) under which adjacent segments merge; `max_aspect` and `min_solidity` drop thin
    strips and ragged leftovers that are rarely objects.
    """

    def __init__(
        self,
        *,
        filter: ProposalFilter | None = None,
        max_side: int = 512,
        scale: float = 100.0,
        sigma: float = 0.5,
        merge_threshold: float = 70.0,
        max_aspect: float = 6.0,
        min_solidity: float = 0.45,
    ) -> None:
        if max_side < 16:
            raise ConfigError(f"max_side must be >= 16 pixels, got {max_side}")
        if merge_threshold < 0 or scale <= 0 or sigma < 0:
            raise ConfigError("merge_threshold and sigma must be >= 0 and scale > 0")
        self.filter = filter or ProposalFilter()
        self.max_side = max_side
        self.scale = scale
        self.sigma = sigma
        self.merge_threshold = merge_threshold
        self.max_aspect = max_aspect
        self.min_solidity = min_solidity

    def segments(self, rgb: np.ndarray) -> np.ndarray:
        """HxW int labels of the merged segments at working resolution."""
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components
        from skimage.segmentation import felzenszwalb

        seg = felzenszwalb(rgb, scale=self.scale, sigma=self.sigma, min_size=20).astype(np.int64)
        n = int(seg.max()) + 1
        counts = np.bincount(seg.ravel(), minlength=n).astype(np.float64)
        means = np.stack([np.bincount(seg.ravel(), weights=rgb[..., c].ravel().astype(np.float64), minlength=n)
                          for c in range(3)], axis=1) / np.maximum(counts, 1)[:, None]
        pairs = np.concatenate([
            np.stack([seg[:, :-1].ravel(), seg[:, 1:].ravel()], axis=1),
            np.stack([seg[:-1, :].ravel(), seg[1:, :].ravel()], axis=1),
        ])
        pairs = pairs[pairs[:, 0] != pairs[:, 1]]
        if len(pairs):
            pairs = np.unique(np.sort(pairs, axis=1), axis=0)
            dist = np.linalg.norm(means[pairs[:, 0]] - means[pairs[:, 1]], axis=1)
            pairs = pairs[dist < self.merge_threshold]
        graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])) if len(pairs) else ([], ([], [])),
                           shape=(n, n))
        _, merged = connected_components(graph, directed=False)
        return merged[seg]

    def propose(self, image: Any) -> list[Proposal]:
        from scipy import ndimage

        rgb = to_rgb(image)
        h, w = rgb.shape[:2]
        factor = min(1.0, self.max_side / max(h, w))
        work = rgb
        if factor < 1.0:
            size = (max(1, round(w * factor)), max(1, round(h * factor)))
            work = np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR))
        labels = self.segments(work)
        total = float(labels.size)
        areas = np.bincount(labels.ravel())
        # Cheap pre-filter at working resolution (filter_proposals re-checks at full size).
        wanted = np.flatnonzero((areas >= self.filter.min_area * total * 0.8)
                                & (areas <= self.filter.max_area * total * 1.2))
        boxes = ndimage.find_objects(labels + 1)
        out: list[Proposal] = []
        for j in wanted:
            box = boxes[j]
            if box is None:
                continue
            crop = labels[box] == j
            bh, bw = crop.shape
            if max(bh, bw) / max(1, min(bh, bw)) > self.max_aspect:
                continue
            solidity = _solidity(crop)
            if solidity < self.min_solidity:
                continue
            small = np.zeros(labels.shape, dtype=bool)
            small[box] = crop
            mask = small if factor == 1.0 else _upscale(small, w, h)
            if not mask.any():
                continue
            out.append(Proposal(Region(mask), score=float(solidity), stability=1.0, source="classical"))
        return filter_proposals(out, self.filter)


class SamProposals:
    """SAM "segment everything" through `sam.SamProposer`'s generator, keeping SAM's scores."""

    def __init__(self, sam_proposer: Any, filter: ProposalFilter | None = None) -> None:
        self.sam = sam_proposer
        self.filter = filter or ProposalFilter()

    def propose(self, image: Any) -> list[Proposal]:
        rgb = to_rgb(image)
        with self.sam._lock:
            records = self.sam.generator.generate(rgb)
        out = [
            Proposal(Region.from_coco_rle(r["segmentation"]), score=float(np.clip(r["predicted_iou"], 0.0, 1.0)),
                     stability=float(r["stability_score"]), source="sam")
            for r in records if r["area"] > 0
        ]
        return filter_proposals(out, self.filter)


def build_proposer(
    sam_checkpoint: str | None = None,
    sam_model_type: str = "vit_b",
    device: str = "cpu",
    filter: ProposalFilter | None = None,
    **options: Any,
) -> Proposer:
    """SAM's proposer when a checkpoint is configured, else the classical one. `options` go to the
    chosen proposer (SamProposer's generator knobs, or ClassicalProposer's)."""
    if sam_checkpoint is not None and str(sam_checkpoint).strip():
        from .sam import SamProposer

        return SamProposals(SamProposer(sam_checkpoint, sam_model_type, device, min_area=0, **options), filter)
    return ClassicalProposer(filter=filter, **options)


def _solidity(crop: np.ndarray) -> float:
    """Area / convex-hull area of a boolean crop (1.0 for convex shapes)."""
    from skimage.morphology import convex_hull_image

    area = np.count_nonzero(crop)
    if area < 3:
        return 1.0
    hull = np.count_nonzero(convex_hull_image(crop))
    return min(1.0, area / float(max(hull, area)))


def _upscale(mask: np.ndarray, width: int, height: int) -> np.ndarray:
    img = Image.fromarray(mask.astype(np.uint8) * 255).resize((width, height), Image.Resampling.NEAREST)
    return np.asarray(img) > 127
