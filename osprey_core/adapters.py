"""LoRA adapters: a fine-tuned version stored as a small diff of its base, served as base + merged adapter.

An adapter directory holds `adapter_model.safetensors` + `adapter_config.json` (peft's names and
format), `modules.safetensors` (the modules trained in full: mask extractor, projector), `osprey_base.json`
(what it was trained on: the base source and its version), `osprey_config.json` and the tokenizer.
`factory.load_model` recognises such a directory and returns the base with the adapter merged in, so
the engine runs at the base model's speed (no extra LoRA matmuls per token).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .errors import CheckpointError

if TYPE_CHECKING:
    from .modeling import OspreyForCausalLM

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
MODULES_WEIGHTS = "modules.safetensors"
BASE_FILE = "osprey_base.json"
# The LLM's attention and MLP projections (the paper's LoRA targets), never the vision tower's.
LORA_TARGETS = r"model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"


def is_adapter_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / ADAPTER_CONFIG).is_file() and (path / BASE_FILE).is_file()


def lora_config(r: int = 16, alpha: int = 32, dropout: float = 0.0):
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=LORA_TARGETS, bias="none")


def add_lora(model: OspreyForCausalLM, config) -> OspreyForCausalLM:
    """Wrap the target projections with LoRA layers in place (peft); only LoRA weights stay trainable."""
    from peft import inject_adapter_in_model

    return inject_adapter_in_model(config, model)


def lora_state_dict(model: OspreyForCausalLM) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}


@torch.no_grad()
def merge_lora(model: OspreyForCausalLM) -> OspreyForCausalLM:
    """Fold every LoRA layer into its base Linear and put the plain Linear back (peft's own merge)."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if not isinstance(module, LoraLayer):
            continue
        module.merge(safe_merge=True)
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        setattr(parent, name.rsplit(".", 1)[-1], module.get_base_layer())
    return model


def save_adapter(
    model: OspreyForCausalLM,
    tokenizer,
    out_dir: str | Path,
    config,
    base: dict[str, Any],
    module_prefixes: tuple[str, ...] = ("mask_extractor.", "model.mm_projector."),
) -> Path:
    """Write an adapter directory (see the module docstring); `base` = {"source", "version"}."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(lora_state_dict(model), str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config.save_pretrained(str(out))
    modules = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
               if k.startswith(module_prefixes) and "lora_" not in k}
    save_file(modules, str(out / MODULES_WEIGHTS), metadata={"format": "pt"})
    (out / BASE_FILE).write_text(json.dumps(base, indent=2))
    model.cfg.save(out / "osprey_config.json")
    tokenizer.save_pretrained(str(out))
    added = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in ("<mask>", "<pos>")}
    (out / "added_tokens.json").write_text(json.dumps(added, indent=2))
    return out


def base_reference(source: str | Path, version: str, adapter_dir: str | Path | None = None) -> dict[str, Any]:
    """How an adapter names its base: a preset name or repo id as is; a directory both absolute and
    relative to the adapter (so a registry folder can move as a whole)."""
    ref: dict[str, Any] = {"source": str(source), "version": version}
    path = Path(source)
    if path.is_dir():
        ref["source"] = str(path.resolve())
        if adapter_dir is not None:
            ref["relative"] = os.path.relpath(path.resolve(), Path(adapter_dir).resolve())
    return ref


def _base_source(path: Path, ref: dict[str, Any]) -> str:
    rel = ref.get("relative")
    if rel and (path / rel).is_dir():
        return str((path / rel).resolve())
    return str(ref["source"])


def load_adapter(path: str | Path, device: str | torch.device = "cpu", dtype=None, vision_tower_file=None):
    """Adapter directory -> (base model with the adapter merged, tokenizer, config)."""
    from peft import LoraConfig, set_peft_model_state_dict
    from safetensors.torch import load_file

    from .factory import load_model, read_config, weights_fingerprint
    from .tokenizer import load_tokenizer

    path = Path(path)
    try:
        ref = json.loads((path / BASE_FILE).read_text())
        source = _base_source(path, ref)
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path / BASE_FILE} does not name the adapter's base: {e}") from e
    if Path(source).resolve() == path.resolve():
        raise CheckpointError(f"adapter {path} names itself as its base")
    # Merge in fp32 on the CPU (exact), then move: the merged model is what gets served.
    model, _, cfg = load_model(source, device="cpu", dtype=torch.float32, vision_tower_file=vision_tower_file)
    recorded = ref.get("version")
    if recorded and "-" not in recorded:  # adapters written before versions were content-addressed
        version = weights_fingerprint(model)
    else:
        from .versioning import version_of_source

        version = version_of_source(source)  # cached file hashes: a large base is not re-read per start
    if recorded and recorded != version:
        raise CheckpointError(f"adapter {path} was trained on base version {ref['version']}, but {source} "
                              f"is version {version}: point {BASE_FILE} at the right base")
    for name in (ADAPTER_WEIGHTS, MODULES_WEIGHTS):
        if not (path / name).is_file():
            raise CheckpointError(f"adapter {path} lacks {name}")
    config = LoraConfig.from_pretrained(str(path))
    add_lora(model, config)
    result = set_peft_model_state_dict(model, load_file(str(path / ADAPTER_WEIGHTS)))
    if getattr(result, "unexpected_keys", None):
        raise CheckpointError(f"adapter {path}: keys the model has no LoRA layer for: {result.unexpected_keys[:8]}")
    merge_lora(model)
    modules = load_file(str(path / MODULES_WEIGHTS))
    expected = model.state_dict()
    unknown = [k for k in modules if k not in expected]
    wrong = [k for k in modules if k in expected and tuple(expected[k].shape) != tuple(modules[k].shape)]
    if unknown or wrong:
        raise CheckpointError(f"adapter {path}: {MODULES_WEIGHTS} does not fit the base "
                              f"(unknown keys {unknown[:8]}, shape mismatches {wrong[:8]})")
    model.load_state_dict(modules, strict=False)
    from .factory import cast_model, parse_dtype

    cast_model(model, parse_dtype(dtype, device)).to(device).eval()
    # The adapter's own config wins for what is not architecture (its name, the fitted temperature).
    own = read_config(path)
    arch = lambda c: {k: v for k, v in c.to_dict().items() if k != "name" and not k.startswith("score_")}  # noqa: E731
    if arch(own) != arch(cfg):
        raise CheckpointError(f"adapter {path}: its osprey_config.json describes another architecture than "
                              f"its base {source}")
    model.cfg = own
    tokenizer = load_tokenizer(path)
    return model, tokenizer, own
