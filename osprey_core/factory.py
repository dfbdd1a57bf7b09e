"""Builders (segment-anything's registry style): a preset name, a config, a local checkpoint directory
or a Hugging Face repo id -> model, tokenizer, engine."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import OspreyConfig, get_preset
from .errors import CheckpointError, ConfigError
from .modeling import OspreyForCausalLM

DEFAULT_SEED = 0
# Preset names whose weights are published: `load_engine("osprey-7b")` means the released checkpoint
# (downloaded when the machine has internet); `build_model("osprey-7b")` gives random weights.
OFFICIAL_WEIGHTS = {"osprey-7b": "sunshine-lwt/Osprey-7b", "osprey-chat-7b": "sunshine-lwt/Osprey-Chat-7b"}


def default_dtype(device: str | torch.device) -> torch.dtype:
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def parse_dtype(dtype: str | torch.dtype | None, device: str | torch.device) -> torch.dtype:
    if dtype is None:
        return default_dtype(device)
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ConfigError(f"unknown dtype {dtype!r}; use one of {', '.join(names)}")
    return names[dtype]


def cast_model(model: OspreyForCausalLM, dtype: torch.dtype) -> OspreyForCausalLM:
    """Everything in `dtype` except the mask extractor, which the original computes in fp32."""
    model.to(dtype)
    model.mask_extractor.float()
    return model


def build_model(
    preset_or_config: str | OspreyConfig,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    seed: int | None = DEFAULT_SEED,
) -> OspreyForCausalLM:
    """A bare model with random weights (seeded), or shapes only on the `meta` device (7B in seconds)."""
    cfg = get_preset(preset_or_config) if isinstance(preset_or_config, str) else preset_or_config
    device = torch.device(device)
    if device.type == "meta":
        with torch.device("meta"):
            model = OspreyForCausalLM(cfg)
    elif device.type != "cpu":
        # Large models: shapes on meta, cast there, memory straight on the device in its final dtype
        # (the 7B never exists in fp32 on the GPU), then a cheap random init there.
        with torch.device("meta"):
            model = OspreyForCausalLM(cfg)
        cast_model(model, parse_dtype(dtype, device))
        model.to_empty(device=device)
        random_init_(model, seed if seed is not None else DEFAULT_SEED)
        materialize_buffers(model)
    else:
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            model = OspreyForCausalLM(cfg)
    return cast_model(model, parse_dtype(dtype, device)).to(device).eval()


@torch.no_grad()
def random_init_(model: OspreyForCausalLM, seed: int) -> None:
    """Random weights for benchmarks of the real shapes (same cost as real weights, no download)."""
    gen = torch.Generator(device=model.device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("gamma"):
            p.fill_(model.cfg.vision.layer_scale_init)
        elif p.ndim >= 2:
            p.normal_(0.0, 0.02, generator=gen)
        elif "norm" in name or name.endswith(("stem.1.weight", "downsample.0.weight")):
            p.fill_(1.0)
        else:
            p.zero_()


def materialize_buffers(model: OspreyForCausalLM) -> None:
    """Non-persistent buffers (RoPE frequencies) are not in checkpoints: rebuild them on the model's device
    after a meta-device construction."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    model.model.rotary_emb = LlamaRotaryEmbedding(model.model.config).to(model.lm_head.weight.device)


def weights_fingerprint(model: OspreyForCausalLM) -> str:
    """64-bit hex digest over every weight tensor (versioning.tensor_digest): any changed value shows.
    A full model version also covers config and tokenizer: `versioning.version_of_model`."""
    from .versioning import DIGEST_HEX, tensor_digest

    return tensor_digest(model.state_dict())[:DIGEST_HEX]


def load_versioned(source: str | Path, quantization: str | None = None, **kwargs):
    """`load_model` plus the loaded model's content-addressed version -> (model, tokenizer, cfg, version).

    A checkpoint (or adapter) directory is versioned by its files' cached sha256, so a large checkpoint
    is read once for hashing, not at every start; a preset by its tensors. A quantized load gets its
    own version (`...-4bit`): its outputs differ."""
    from . import versioning
    from .config import PRESETS

    name = OFFICIAL_WEIGHTS.get(str(source), str(source))
    if name in PRESETS:
        model, tokenizer, cfg = load_model(name, quantization=quantization, **kwargs)
        version = versioning.version_of_model(model, tokenizer, cfg)
    else:
        from .checkpoint import resolve_source

        path = resolve_source(name)
        model, tokenizer, cfg = load_model(path, quantization=quantization, **kwargs)
        vision = kwargs.get("vision_tower_file")  # weights from outside the directory are part of it too
        extra = {"vision_tower_file": versioning.file_hash(vision)} if vision is not None else None
        version = versioning.version_of_directory(path, cfg, extra=extra)
    return model, tokenizer, cfg, version + (f"-{quantization}" if quantization else "")


def load_model(
    source: str | Path,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    vision_tower_file: str | Path | None = None,
    quantization: str | None = None,
):
    """Preset name, local directory (official layout or ours) or HF repo id -> (model, tokenizer, config).

    `quantization`: None, "8bit" or "4bit" (NF4) for the LLM's linear layers (CUDA only, `quantize.py`).
    """
    from .config import PRESETS
    from .quantize import check_quantization, quantize_model
    from .tokenizer import build_tiny_tokenizer, load_tokenizer

    quantization = check_quantization(quantization, device)  # before any weight is read
    source = OFFICIAL_WEIGHTS.get(str(source), str(source))
    if source in PRESETS:
        model = build_model(source, device=device, dtype=dtype)
        if quantization:
            quantize_model(model, quantization, device)
        return model, build_tiny_tokenizer(model.cfg.text.vocab_size), model.cfg
    from . import checkpoint

    path = checkpoint.resolve_source(source)
    from . import adapters

    if adapters.is_adapter_dir(path):  # a LoRA version: its base with the adapter merged in
        return adapters.load_adapter(path, device=device, dtype=dtype, vision_tower_file=vision_tower_file)
    cfg = read_config(path)
    with torch.device("meta"):
        model = OspreyForCausalLM(cfg)
    checkpoint.load_checkpoint(model, path, vision_tower_file=vision_tower_file)
    cast_model(model, parse_dtype(dtype, device))
    if quantization:  # quantized on the way to the GPU: the bf16 decoder never sits in GPU memory
        quantize_model(model, quantization, device)
    else:
        model.to(device).eval()
    if not checkpoint.has_tokenizer(path):
        raise CheckpointError(f"{path} has no tokenizer (tokenizer.json, tokenizer.model or tokenizer_config.json)")
    tokenizer = load_tokenizer(path)
    ids = tokenizer.convert_tokens_to_ids(["<mask>", "<pos>"])
    if ids != [cfg.mask_token_id, cfg.pos_token_id]:
        raise CheckpointError(f"tokenizer in {path} maps <mask>/<pos> to {ids}, the model expects "
                              f"{[cfg.mask_token_id, cfg.pos_token_id]}")
    return model, tokenizer, cfg


def read_config(path: Path) -> OspreyConfig:
    """Our `osprey_config.json` when present, else the official `config.json` (LLaMA + mm_* fields)."""
    ours = path / "osprey_config.json"
    if ours.exists():
        return OspreyConfig.load(ours)
    official = path / "config.json"
    if not official.exists():
        raise ConfigError(f"{path} has neither osprey_config.json nor config.json")
    try:
        return OspreyConfig.from_hf_config(json.loads(official.read_text()))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{official} is not valid JSON: {e}") from e
