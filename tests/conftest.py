"""Shared fixtures: the tiny random-weight Osprey and synthetic images (nothing downloads)."""

from __future__ import annotations

import numpy as np
import pytest
import torch


def synthetic_image(width: int = 80, height: int = 48, seed: int = 0) -> np.ndarray:
    """A noisy image with a few coloured rectangles, so regions see different features."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 60, (height, width, 3), dtype=np.uint8)
    img[4:20, 6:30] = (220, 30, 30)
    img[24:44, 40:76] = (30, 200, 40)
    img[10:40, 50:60] = (40, 40, 230)
    return img


def box_mask(width: int, height: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    m = np.zeros((height, width), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


@pytest.fixture(scope="session")
def image() -> np.ndarray:
    return synthetic_image()


@pytest.fixture(scope="session")
def masks() -> list[np.ndarray]:
    return [
        box_mask(80, 48, 6, 4, 30, 20),
        box_mask(80, 48, 40, 24, 76, 44),
        box_mask(80, 48, 50, 10, 60, 40),
        box_mask(80, 48, 0, 0, 80, 48),
        box_mask(80, 48, 33, 2, 37, 6),
    ]


@pytest.fixture(scope="session")
def engine():
    """The tiny engine at 64 px (16 image tokens) with region embeddings amplified.

    With random weights and the preset's 1,024 image tokens a region barely moves the answer, which
    would make region-mixing bugs invisible to the equality tests; the mechanics under test do not
    depend on the image size.
    """
    from osprey_core.config import tiny
    from osprey_core.engine import RegionEngine
    from osprey_core.factory import build_model
    from osprey_core.tokenizer import build_tiny_tokenizer

    cfg = tiny()
    cfg.vision.image_size = 64
    cfg.mask.mask_shape = 16
    model = build_model(cfg)
    with torch.no_grad():
        model.mask_extractor.feat_linear.weight.mul_(60)
        model.mask_extractor.mask_linear.layers[2].weight.mul_(60)
    return RegionEngine(model, build_tiny_tokenizer(cfg.text.vocab_size), model_version="tiny-test")
