"""The frozen ConvNeXt CLIP vision tower (open_clip `convnext_large_d_320`, timm 0.6.13 layout).

Written out here instead of instantiated through timm/open_clip so that the parameter names are the
official checkpoint's (`...trunk.stages.S.blocks.B.gamma`, spec §6.1) on any timm version, and so the
four feature levels res2..res5 come out of one plain forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VisionConfig


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over channels of an NCHW tensor (timm's LayerNorm2d)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, out: int | None = None, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, out or dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ConvNeXtBlock(nn.Module):
    """x + gamma * fc2(GELU(fc1(LN(dwconv7x7(x))))), LN and MLP channels-last (conv_mlp=False)."""

    def __init__(self, dim: int, ls_init: float, eps: float):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, 4 * dim)
        self.gamma = nn.Parameter(torch.full((dim,), ls_init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.conv_dw(x).permute(0, 2, 3, 1)
        x = self.mlp(self.norm(x)) * self.gamma
        return shortcut + x.permute(0, 3, 1, 2)


class ConvNeXtStage(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, depth: int, downsample: bool, ls_init: float, eps: float):
        super().__init__()
        if downsample:
            self.downsample = nn.Sequential(LayerNorm2d(in_dim, eps=eps), nn.Conv2d(in_dim, out_dim, 2, stride=2))
        else:
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(*[ConvNeXtBlock(out_dim, ls_init, eps) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class NormHead(nn.Module):
    """timm's `head.norm` (kept for key parity; Osprey never runs it)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.norm = LayerNorm2d(dim, eps=eps)


class ConvNeXtTrunk(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d = cfg.dims
        self.stem = nn.Sequential(nn.Conv2d(3, d[0], kernel_size=4, stride=4), LayerNorm2d(d[0], eps=cfg.ln_eps))
        self.stages = nn.Sequential(
            *[
                ConvNeXtStage(d[max(i - 1, 0)], d[i], cfg.depths[i], i > 0, cfg.layer_scale_init, cfg.ln_eps)
                for i in range(len(d))
            ]
        )
        self.head = NormHead(d[-1], cfg.ln_eps)


class OpenClipHead(nn.Module):
    """open_clip's `timm_proj='mlp'` head (`visual.head.mlp`); in the checkpoint, unused by Osprey."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.mlp = Mlp(cfg.dims[-1], cfg.head_hidden_dim, cfg.head_embed_dim, bias=cfg.head_bias)


class TimmVisual(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.trunk = ConvNeXtTrunk(cfg)
        self.head = OpenClipHead(cfg)


class OpenClipWrapper(nn.Module):
    """open_clip's CLIP object: only `.visual` exists (the text tower keys are ignored)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.visual = TimmVisual(cfg)


class CLIPConvNeXtTower(nn.Module):
    """`model.vision_tower` of the official model: its weights live under `vision_tower.visual.`."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_tower = OpenClipWrapper(cfg)
        self.requires_grad_(False)

    @property
    def trunk(self) -> ConvNeXtTrunk:
        return self.vision_tower.visual.trunk

    @property
    def trainable(self) -> bool:
        """Whether its weights are being trained (`TrainConfig.train_vision`); frozen everywhere else."""
        return self.trunk.stem[0].weight.requires_grad

    def forward(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """pixel_values (B,3,S,S) -> res2..res5 feature maps at strides 4, 8, 16, 32.

        Without gradients, as in the original (the tower is frozen in every Osprey stage), unless its
        weights were made trainable (training a never-trained tower: `TrainConfig.train_vision`)."""
        trunk = self.trunk
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.trainable):
            x = trunk.stem(pixel_values.to(trunk.stem[1].bias.dtype))
            feats = {}
            for i, stage in enumerate(trunk.stages):
                x = stage(x)
                feats[f"res{i + 2}"] = x
        return feats
