"""Model configuration: one dataclass for every size, so the official 7B layout and the tiny test
presets run through the same code (like open_clip's model configs)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError


@dataclass
class VisionConfig:
    """ConvNeXt trunk of open_clip's `convnext_large_d_320` (timm names, `gamma` layer scale)."""

    depths: tuple[int, ...] = (3, 3, 27, 3)
    dims: tuple[int, ...] = (192, 384, 768, 1536)
    image_size: int = 512
    layer_scale_init: float = 1e-6
    ln_eps: float = 1e-6
    # open_clip's projection head (`visual.head.mlp`): stored in the checkpoint, never used by Osprey.
    head_embed_dim: int = 768
    head_hidden_dim: int = 1536
    head_bias: bool = True
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class TextConfig:
    """LLaMA decoder sizes (Vicuna-7B v1.5 by default)."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0


@dataclass
class MaskConfig:
    """Mask-Aware Visual Extractor sizes (spec §3)."""

    embed_dim: int = 1024
    mask_shape: int = 112


@dataclass
class OspreyConfig:
    name: str = "osprey-7b"
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    mm_projector_type: str = "mlp2x_gelu"
    # Scores are softmax(loglik / score_temperature) over the candidates' sequence log-likelihoods
    # (docs/scores-and-versions.md). 1.0 is the raw model distribution; only a temperature fitted on
    # held-out data (training sets `score_temperature_fitted`) makes the scores "calibrated".
    score_temperature: float = 1.0
    score_temperature_fitted: bool = False
    # Mean per-token log-likelihood instead of the sum (longer labels are not penalised per token).
    score_length_normalized: bool = False
    # How the temperature was fitted, for people to read: e.g. {"method": "nll", "examples": 400,
    # "ece_before": 0.12, "ece_after": 0.03, "fitted_on": "<version>"}.
    score_calibration: dict[str, Any] | None = None
    # Ids of the two added tokens; never embedded (spec §1.3).
    mask_token_id: int = 32000
    pos_token_id: int = 32001

    def __post_init__(self) -> None:
        if not (isinstance(self.score_temperature, (int, float)) and self.score_temperature > 0):
            raise ConfigError(f"score_temperature must be a positive number, got {self.score_temperature!r}")

    @property
    def mm_hidden_size(self) -> int:
        """Projector input: res4 channels (the config of released checkpoints omits it; default 768)."""
        return self.vision.dims[2]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OspreyConfig:
        try:
            data = dict(data)
            vision = VisionConfig(**_tuples(data.pop("vision", {})))
            text = TextConfig(**data.pop("text", {}))
            mask = MaskConfig(**data.pop("mask", {}))
            return cls(vision=vision, text=text, mask=mask, **data)
        except TypeError as e:
            raise ConfigError(f"invalid Osprey config: {e}") from e

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> OspreyConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> OspreyConfig:
        """Map an official `config.json` (LLaMA fields + mm_* fields) onto our config; vision sizes are
        fixed by the official recipe (convnext_large at 512 px)."""
        text = TextConfig(
            **{k: hf[k] for k in dataclasses.asdict(TextConfig()) if k in hf and hf[k] is not None}
        )
        cfg = cls(name=str(hf.get("_name_or_path", "osprey")), text=text)
        cfg.mm_projector_type = hf.get("mm_projector_type", "mlp2x_gelu")
        if hf.get("mm_hidden_size") not in (None, cfg.mm_hidden_size):
            raise ConfigError(f"mm_hidden_size={hf['mm_hidden_size']} does not match res4 width {cfg.mm_hidden_size}")
        cfg.score_temperature = float(hf.get("osprey_score_temperature", 1.0))
        cfg.score_temperature_fitted = bool(hf.get("osprey_score_temperature_fitted", False))
        cfg.score_length_normalized = bool(hf.get("osprey_score_length_normalized", False))
        cfg.score_calibration = hf.get("osprey_score_calibration")
        cfg.mask_token_id = text.vocab_size
        cfg.pos_token_id = text.vocab_size + 1
        return cfg


def _tuples(d: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def osprey_7b() -> OspreyConfig:
    return OspreyConfig(name="osprey-7b")


def tiny() -> OspreyConfig:
    """A sub-million-parameter Osprey for tests, built in well under a second. Widths and depths shrink;
    the token layout does not: 512 px input, 1,024 image tokens, a ~1,090-token prompt prefix and the
    112×112 position mask, so costs split between image, prefix and regions as on the 7B."""
    return OspreyConfig(
        name="tiny",
        vision=VisionConfig(depths=(1, 1, 2, 1), dims=(8, 16, 32, 64), image_size=512, head_embed_dim=32,
                            head_hidden_dim=64),
        text=TextConfig(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048),
        mask=MaskConfig(embed_dim=32, mask_shape=112),
        mask_token_id=1024,
        pos_token_id=1025,
    )


def demo() -> OspreyConfig:
    """The small Osprey the demo model is trained from (synthetic shapes, CPU): the official token layout
    (`<mask><pos>`, image tokens from res4) at 128 px input, so the image prefix is 64 tokens and a training
    step takes milliseconds. The position mask is 64×64 into a 128-wide MLP (the official: 112×112 into
    1024): at 32×32 a 20 px hexagon and circle differ by a pixel (a probe on the raw masks: hexagon 91 %,
    circle 85 %; at 64×64: 98 %, 93 %), and with 112×112 into 64 wide the category never left the prior."""
    return OspreyConfig(
        name="demo",
        vision=VisionConfig(depths=(1, 1, 2, 1), dims=(16, 32, 64, 128), image_size=128, head_embed_dim=64,
                            head_hidden_dim=128),
        text=TextConfig(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048),
        mask=MaskConfig(embed_dim=128, mask_shape=64),
        mask_token_id=1024,
        pos_token_id=1025,
    )


PRESETS = {"osprey-7b": osprey_7b, "tiny": tiny, "demo": demo}


def get_preset(name: str) -> OspreyConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]()
