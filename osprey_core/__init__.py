"""Osprey region understanding: `load_engine(source)` -> RegionEngine (classify, attributes, describe, ask).

Usable alone: knows nothing of HTTP, Label Studio, CVAT or Redis.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .config import OspreyConfig, get_preset
from .errors import CheckpointError, ConfigError, ImageError, OspreyError, PromptError, RegionError

if TYPE_CHECKING:
    from .engine import Classification, RegionEngine
    from .regions import Region

__all__ = [
    "CheckpointError", "Classification", "ConfigError", "ImageError", "OspreyConfig", "OspreyError",
    "PromptError", "Region", "RegionEngine", "RegionError", "build_model", "get_preset", "load_engine",
    "model_version",
]


def build_model(preset_or_config, device="cpu", dtype=None, seed: int | None = 0):
    """The bare model: random weights (seeded) or, on device='meta', shapes only."""
    from .factory import build_model as _build

    return _build(preset_or_config, device=device, dtype=dtype, seed=seed)


def load_engine(
    source: str = "tiny", device: str = "cpu", dtype=None, vision_tower_file=None, quantization=None,
    **engine_kwargs,
) -> RegionEngine:
    """A preset name (`tiny`), a local checkpoint directory or a Hugging Face repo id -> RegionEngine.

    `vision_tower_file`: an open_clip `.bin` for checkpoints that lack the vision weights.
    `quantization`: None, "8bit" or "4bit" (CUDA + bitsandbytes; the version names it).
    """
    from .engine import RegionEngine
    from .factory import load_versioned

    model, tokenizer, _, version = load_versioned(source, device=device, dtype=dtype,
                                                  vision_tower_file=vision_tower_file, quantization=quantization)
    return RegionEngine(model, tokenizer, model_version=version, **engine_kwargs)


def model_version(source: str) -> str:
    """The version `load_engine(source)` would serve, without loading a directory's weights."""
    from .versioning import version_of_source

    return version_of_source(source)


def __getattr__(name: str):
    # Lazy exports keep `import osprey_core` free of torch for light processes.
    if name in ("Classification", "RegionEngine"):
        from . import engine

        return getattr(engine, name)
    if name == "Region":
        from .regions import Region

        return Region
    raise AttributeError(name)
