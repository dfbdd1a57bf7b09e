"""Mask-Aware Visual Extractor (spec §3): two LLM embeddings per region.

* mask token: average of each feature level inside the (bilinearly resized, then `>0` binarised)
  mask, a per-level Linear to `embed_dim`, summed, then one Linear to the LLM width;
* position token: the mask resized to `mask_shape`² (not binarised) through a 3-layer ReLU MLP.
Computed in fp32; each per-level projection is rounded to the vision dtype, as the original does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import OspreyConfig

LEVELS = ("res2", "res3", "res4", "res5")


class MLP(nn.Module):
    """`layers.0..N-1` Linear with ReLU between (DETR-style MLP, the official class)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        outs = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, outs, strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


def resize_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(Q,H,W) -> (Q,h,w) bilinear, align_corners=False, no antialias (the original's resize).

    Masks go through as a batch of one-channel images: bilinear is per channel, so the values are those
    of the original's (1,Q,H,W) call, while CPU kernels run ~50x faster on this layout.
    """
    m = masks.float()
    if tuple(m.shape[-2:]) == tuple(size):
        return m
    return F.interpolate(m[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def mask_pool(features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """features (C,h,w), masks (Q,H,W) -> (Q,C) mean feature inside each resized, binarised mask."""
    m = (resize_masks(masks, tuple(features.shape[-2:])) > 0).float()
    denorm = m.sum(dim=(-1, -2), keepdim=True) + 1e-8
    return torch.einsum("chw,qhw->qc", features.float(), m / denorm)


class MaskExtractor(nn.Module):
    def __init__(self, cfg: OspreyConfig):
        super().__init__()
        dims = cfg.vision.dims
        embed, out = cfg.mask.embed_dim, cfg.text.hidden_size
        self.mask_shape = cfg.mask.mask_shape
        for level, dim in zip(LEVELS, dims, strict=True):
            setattr(self, level, nn.Linear(dim, embed))
        self.feat_linear = nn.Linear(embed, out)
        self.mask_linear = MLP(self.mask_shape * self.mask_shape, embed, out, 3)

    def forward(self, feats: dict[str, torch.Tensor], masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """feats: one image's levels, each (C,h,w); masks (Q,H,W) at image resolution.

        Returns (mask_tokens, pos_tokens), each (Q, hidden) in fp32: the extractor's parameters stay fp32
        whatever the model's dtype (`factory.cast_model`).
        """
        masks = masks.float()  # once: full-resolution masks are the largest tensors here
        pos = resize_masks(masks, (self.mask_shape, self.mask_shape))
        return self.feat_linear(self.level_sum(feats, masks)), self.mask_linear(pos.reshape(pos.shape[0], -1))

    def level_sum(self, feats: dict[str, torch.Tensor], masks: torch.Tensor) -> torch.Tensor:
        """(Q, embed_dim): each level mask-pooled, projected and summed (the mask token before
        `feat_linear`; also what the demo tower is pretrained through, training/demo_tower.py)."""
        vision_dtype = feats["res4"].dtype
        masks = masks.float()
        summed = None
        for level in LEVELS:
            pooled = mask_pool(feats[level], masks)
            y = getattr(self, level)(pooled).to(vision_dtype).float()  # the original's rounding to the vision dtype
            summed = y if summed is None else summed + y
        return summed
