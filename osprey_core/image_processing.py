"""Image preprocessing as in every official script (spec §2.3): short side to S with bicubic, rescale,
CLIP normalise, then a bilinear stretch to S×S (no crop, no pad). Masks stay at image resolution."""

from __future__ import annotations

import hashlib

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .config import VisionConfig
from .errors import ImageError


def to_pil(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB") if image.mode != "RGB" else image
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = np.stack([image] * 3, axis=-1)
        if image.ndim != 3 or image.shape[2] not in (3, 4) or image.size == 0:
            raise ImageError(f"expected an HxWx3 array, got shape {image.shape}")
        if image.dtype != np.uint8:
            raise ImageError(f"expected uint8 pixels, got {image.dtype}")
        return Image.fromarray(image[..., :3])
    raise ImageError(f"unsupported image type {type(image).__name__}")


def image_hash(image) -> str:
    """Content hash (pixels + size + mode), the key of the engine's image cache.

    Arrays are hashed from their own buffer (no PIL round trip); an RGB array and the same pixels as a
    PIL RGB image get the same key.
    """
    if isinstance(image, np.ndarray):
        arr = np.ascontiguousarray(image)
        if arr.ndim == 3 and arr.shape[2] == 4:
            arr = np.ascontiguousarray(arr[..., :3])
        size, mode, data = (arr.shape[1], arr.shape[0]), f"array{arr.dtype}{arr.shape[2:]}", arr.data
    else:
        image = to_pil(image)
        size, mode, data = image.size, f"array{np.dtype(np.uint8)}{(3,)}", image.tobytes()
    h = hashlib.sha1(usedforsecurity=False)
    h.update(f"{size}{mode}".encode())
    h.update(data)
    return h.hexdigest()


def preprocess(image: Image.Image, cfg: VisionConfig) -> torch.Tensor:
    """PIL RGB -> (3,S,S) float32 normalised tensor."""
    w, h = image.size
    if w < 1 or h < 1:
        raise ImageError("image is empty")
    size = cfg.image_size
    scale = size / min(w, h)
    resized = image.resize((max(1, int(w * scale)), max(1, int(h * scale))), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(cfg.image_mean).view(3, 1, 1)
    std = torch.tensor(cfg.image_std).view(3, 1, 1)
    x = (x - mean) / std
    return F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False)[0]
