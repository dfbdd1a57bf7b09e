"""Stage 0 of the demo build: pretrain the demo vision tower so its mask-pooled region features carry
outlines, the job CLIP's pretraining does for the real Osprey's tower.

Why: trained only through the language model, the demo tower never learns shapes: the position token
(the flattened mask through an MLP) names the seven training shapes where they sit, so the region features
keep colour and position only (a probe on them: 18 % on eight shapes). That position path cannot learn a
new shape from a few corrections, so the learning loop needs a tower whose pooled features separate
outlines. Here the tower and the mask extractor's per-level projections (the same modules the model uses,
shape for shape) learn shape and colour of regions from scenes generated on the fly: a fixed set of a few
hundred images overfits (a tower trained on the 400 build images reaches ~50 % held out; on-the-fly
scenes ~98 %). Hexagons never appear: the shape the learning loop teaches stays out of every stage.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from osprey_core.modeling.mask_extractor import LEVELS

from . import synthetic


@dataclass(frozen=True)
class TowerRecipe:
    """Stage 0's settings (part of the demo recipe)."""

    steps: int = 1500
    images_per_step: int = 16
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    data_seed: int = 100  # the scenes' seed: not the build images' (0) nor the held-out one (7001)


class RegionHead(nn.Module):
    """The training-only readout: the extractor's summed level projections -> shape and colour logits."""

    def __init__(self, width: int, shapes: int, colours: int):
        super().__init__()
        self.shapes = shapes
        self.out = nn.Linear(width, shapes + colours)

    def forward(self, summed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.out(F.gelu(summed))
        return logits[:, : self.shapes], logits[:, self.shapes :]


def region_features(model, pixel_values: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """One image's regions -> the mask extractor's summed per-level projections (before `feat_linear`)."""
    levels = model.model.vision_tower(pixel_values[None])
    return model.mask_extractor.level_sum({k: v[0] for k, v in levels.items()}, masks)


def region_pixels(scene: synthetic.Scene, cfg) -> torch.Tensor:
    """A scene as the tower sees it (the served preprocessing)."""
    from PIL import Image

    from osprey_core.image_processing import preprocess

    return preprocess(Image.fromarray(scene.image), cfg)


def _targets(scene: synthetic.Scene, shapes: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    colours = list(synthetic.COLOURS)
    masks = torch.from_numpy(np.stack([o.mask for o in scene.objects]))
    return (masks, torch.tensor([shapes.index(o.shape) for o in scene.objects]),
            torch.tensor([colours.index(o.colour) for o in scene.objects]))


def shape_accuracy(model, scenes: Sequence[synthetic.Scene], shapes: Sequence[str], head: RegionHead) -> float:
    """Held-out shape accuracy of the readout (what stage 0 reports)."""
    hits: list[bool] = []
    with torch.no_grad():
        for scene in scenes:
            masks, ys, _ = _targets(scene, shapes)
            logits, _ = head(region_features(model, region_pixels(scene, model.cfg.vision), masks))
            hits += (logits.argmax(1) == ys).tolist()
    return float(np.mean(hits)) if hits else 0.0


def pretrain_tower(model, recipe: TowerRecipe, shapes: Sequence[str], world: dict[str, Any],
                   held_out: Sequence[synthetic.Scene] = (), progress: bool = True) -> tuple[RegionHead, dict[str, Any]]:
    """Train `model`'s vision tower and mask-extractor level projections in place on on-the-fly scenes
    of `shapes` in `world`; returns the readout and a report (losses, the readout's accuracy on `held_out`).

    The rest of the model is untouched, and every parameter's `requires_grad` is restored (the tower's:
    frozen, as in every Osprey stage)."""
    from tqdm import tqdm

    from .finetune import cosine_lr

    shapes = list(shapes)
    tower, extractor = model.model.vision_tower, model.mask_extractor
    levels = [getattr(extractor, lv) for lv in LEVELS]
    head = RegionHead(levels[0].out_features, len(shapes), len(synthetic.COLOURS))
    trained = [*tower.parameters(), *(p for lv in levels for p in lv.parameters())]
    was = [p.requires_grad for p in trained]
    for p in trained:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW([*trained, *head.parameters()], lr=recipe.lr, weight_decay=recipe.weight_decay)
    warmup = int(round(recipe.warmup_ratio * recipe.steps))
    losses: list[float] = []
    tower.train()
    cfg = model.cfg.vision
    bar = tqdm(range(recipe.steps), desc="stage 0 (tower)", disable=not progress, unit="step")
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, recipe.steps, warmup, recipe.lr)
        scenes = synthetic.generate(recipe.images_per_step, seed=recipe.data_seed,
                                    start=step * recipe.images_per_step, shapes=shapes, **world)
        loss = torch.zeros(())
        for scene in scenes:
            masks, ys, yc = _targets(scene, shapes)
            shape_logits, colour_logits = head(region_features(model, region_pixels(scene, cfg), masks))
            loss = loss + F.cross_entropy(shape_logits, ys) + F.cross_entropy(colour_logits, yc)
        loss = loss / recipe.images_per_step
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    tower.eval()
    for p, flag in zip(trained, was, strict=True):
        p.requires_grad_(flag)
    accuracy = shape_accuracy(model, held_out, shapes, head) if held_out else None
    return head, {"steps": recipe.steps, "first_loss": losses[0] if losses else None,
            "final_loss": float(np.mean(losses[-20:])) if losses else None, "held_out_shape_accuracy": accuracy}
