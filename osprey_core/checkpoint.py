"""Checkpoint I/O: the official Osprey directory layout in, safetensors out.

We never go through `from_pretrained`: shards are read with `torch.load(weights_only=True, mmap=True)`
or safetensors and assigned into a model built on the meta device with an explicit key check. That is
what makes the 36 layer-scale `...blocks.B.gamma` keys land (HF renames `gamma` -> `weight` and drops
them, spec §6.2), and it turns every mismatch into an error that names the file and the key.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .errors import CheckpointError

if TYPE_CHECKING:
    from .modeling import OspreyForCausalLM

# Official layouts, in order of preference (HF repos sometimes carry both formats).
SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"

CONFIG_FILE = "osprey_config.json"
ADDED_TOKENS_FILE = "added_tokens.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
DOWNLOAD_PATTERNS = ["*.json", "*.bin", "*.safetensors", "tokenizer.model"]

VISION_PREFIX = "model.vision_tower.vision_tower."
# transformers-4.31 stored the RoPE inverse frequencies as a persistent buffer; we recompute them.
IGNORED_KEY = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
# open_clip's projection-head output bias exists or not depending on the open_clip version that wrote
# the file (spec §6.1); the head is never used by Osprey, so an absent bias is zero-filled.
OPTIONAL_KEYS = (VISION_PREFIX + "visual.head.mlp.fc2.bias",)
EMBEDDING_KEYS = ("model.embed_tokens.weight", "lm_head.weight")
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
_MAX_LISTED = 8


# --- locating a checkpoint ----------------------------------------------------------------------------


def resolve_source(source: str | Path) -> Path:
    """A local checkpoint directory as is; a Hugging Face repo id ("owner/name") is downloaded (weights,
    configs and tokenizer only) into the HF cache. Anything else is a CheckpointError."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(
            f"{path} is a file; point at the checkpoint directory (weights, config, tokenizer)"
        )
    text = str(source)
    if not _REPO_ID.fullmatch(text) or ".." in text:
        raise CheckpointError(
            f"no checkpoint directory at {text!r}, and it is not a Hugging Face repo id (owner/name)"
        )
    import huggingface_hub

    try:
        local = huggingface_hub.snapshot_download(repo_id=text, allow_patterns=DOWNLOAD_PATTERNS)
    except Exception as e:  # offline, unknown repo, gated repo, disk full...
        raise CheckpointError(
            f"{text!r} is not a local directory and downloading it from the Hugging Face Hub failed: {e}. "
            "Offline: download it on a machine with internet (`hf download`) and pass the directory."
        ) from e
    return Path(local)


def has_tokenizer(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and any((path / name).is_file() for name in TOKENIZER_FILES)


# --- reading weights -----------------------------------------------------------------------------------


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """All tensors of a checkpoint directory (sharded or single, .bin or safetensors) or of one file."""
    return _read_with_sources(Path(path))[0]


def _read_with_sources(path: Path) -> tuple[dict[str, Tensor], dict[str, Path]]:
    """(tensors, file each key came from): the file is what error messages name."""
    if path.is_file():
        sd = _load_file(path)
        return sd, dict.fromkeys(sd, path)
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint at {path}")
    for index in (SAFETENSORS_INDEX, BIN_INDEX):
        if (path / index).is_file():
            return _read_sharded(path / index)
    for single in (SAFETENSORS_SINGLE, BIN_SINGLE):
        if (path / single).is_file():
            return _read_with_sources(path / single)
    raise CheckpointError(
        f"no weights in {path}: expected {SAFETENSORS_INDEX} or {BIN_INDEX} with their shards, "
        f"or a single {SAFETENSORS_SINGLE} / {BIN_SINGLE}"
    )


def _read_sharded(index: Path) -> tuple[dict[str, Tensor], dict[str, Path]]:
    try:
        data = json.loads(index.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{index} is not a readable JSON index: {e}") from e
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index} has no weight_map (key -> shard file)")

    by_shard: dict[str, list[str]] = {}
    for key, name in weight_map.items():
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise CheckpointError(
                f"{index} maps {key} to {name!r}, which is not a file name in {index.parent}"
            )
        if not (index.parent / name).is_file():
            raise CheckpointError(
                f"missing shard {name} (named in {index.name} for key {key}) in {index.parent}"
            )
        by_shard.setdefault(name, []).append(key)

    sd: dict[str, Tensor] = {}
    sources: dict[str, Path] = {}
    for name, keys in by_shard.items():
        shard = index.parent / name
        tensors = _load_file(shard)
        for key in keys:
            if key not in tensors:
                raise CheckpointError(
                    f"{index.name} lists key {key} in shard {shard}, but that shard lacks it"
                )
        for key, t in tensors.items():
            if weight_map.get(key, name) == name:  # the index decides which shard owns a duplicated key
                sd[key] = t
                sources[key] = shard
    return sd, sources


def _load_file(file: Path) -> dict[str, Tensor]:
    """One weights file -> {name: tensor} on the CPU, never unpickling anything but tensors."""
    if file.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(file), device="cpu")
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"cannot read {file}: corrupt or truncated safetensors file ({e})") from e
    try:
        try:
            obj = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap can only be used" not in str(e):
                raise
            obj = torch.load(file, map_location="cpu", weights_only=True)  # legacy (pre-zip) format
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{file} is not a plain weights file: torch.load(weights_only=True) refused it ({_refusal(e)})"
        ) from e
    except Exception as e:  # zip/mmap errors of a cut or damaged file
        raise CheckpointError(f"cannot read {file}: truncated or corrupt ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()
    ):
        raise CheckpointError(
            f"{file} is not a plain weights file: expected a dict of name -> tensor, "
            f"found {type(obj).__name__}"
        )
    return obj


def _refusal(e: Exception) -> str:
    """The one useful line of torch's weights-only error (which object it refused), not its advice."""
    m = re.search(r"WeightsUnpickler error: ([^\n]*?)(?: was not an allowed global| Please|\n|$)", str(e))
    return m.group(1).strip() if m else type(e).__name__


def read_vision_tower_file(file: str | Path) -> tuple[dict[str, Tensor], dict[str, Path]]:
    """An open_clip checkpoint (`open_clip_pytorch_model.bin`) -> our vision-tower keys.

    `visual.trunk.*` / `visual.head.*` become `model.vision_tower.vision_tower.visual.*`; the text tower
    (`transformer.*`, `token_embedding.weight`, `logit_scale`...) is ignored, as the original does.
    """
    file = Path(file)
    if not file.is_file():
        raise CheckpointError(f"vision tower file {file} does not exist")
    raw = _load_file(file)
    sd = {VISION_PREFIX + k: v for k, v in raw.items() if k.startswith("visual.")}
    if not sd:
        raise CheckpointError(f"{file} has no visual.* keys: not an open_clip checkpoint")
    return sd, dict.fromkeys(sd, file)


# --- loading into a model ------------------------------------------------------------------------------


def load_checkpoint(
    model: OspreyForCausalLM, path: str | Path, vision_tower_file: str | Path | None = None
) -> None:
    """Fill `model` (built on the meta device, or anywhere) from a checkpoint, every key accounted for.

    With `vision_tower_file` (an open_clip .bin) the vision tower comes from that file instead of the
    checkpoint — needed for checkpoints without vision keys (the stage-1 projector repos).
    """
    path = Path(path)
    sd, sources = _read_with_sources(path)
    if vision_tower_file is not None:
        vsd, vsources = read_vision_tower_file(vision_tower_file)
        for key in [k for k in sd if k.startswith(VISION_PREFIX)]:
            del sd[key], sources[key]
        sd.update(vsd)
        sources.update(vsources)
    for key in [k for k in sd if IGNORED_KEY.fullmatch(k)]:
        del sd[key]

    expected = model.state_dict()
    _check_embeddings(sd, sources, expected, model.cfg.text.vocab_size)
    for key in OPTIONAL_KEYS:
        if key in expected and key not in sd:
            sd[key] = torch.zeros(expected[key].shape, dtype=_some_dtype(sd))

    missing = sorted(set(expected) - set(sd))
    if missing:
        hint = ""
        if all(k.startswith(VISION_PREFIX) for k in missing):
            hint = (
                " (no vision tower in this checkpoint: pass vision_tower_file=<open_clip_pytorch_model.bin>)"
            )
        raise CheckpointError(
            f"{len(missing)} model key(s) missing, expected in {path}: {_listed(missing)}{hint}"
        )
    unexpected = sorted(set(sd) - set(expected))
    if unexpected:
        raise CheckpointError(
            f"{len(unexpected)} unexpected key(s) that the model does not have: "
            + "; ".join(f"{k} (in {sources[k]})" for k in unexpected[:_MAX_LISTED])
            + (f"; ... and {len(unexpected) - _MAX_LISTED} more" if len(unexpected) > _MAX_LISTED else "")
        )
    wrong = [k for k in expected if tuple(sd[k].shape) != tuple(expected[k].shape)]
    if wrong:
        raise CheckpointError(
            "shape mismatch: "
            + "; ".join(
                f"{k} in {sources.get(k, path)} has shape {list(sd[k].shape)}, "
                f"the model expects {list(expected[k].shape)}"
                for k in wrong[:_MAX_LISTED]
            )
        )

    result = model.load_state_dict(sd, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:  # cannot happen after the checks above
        raise CheckpointError(
            f"load_state_dict disagreed: missing {result.missing_keys}, unexpected {result.unexpected_keys}"
        )
    if any(b.is_meta for b in model.buffers()):
        from .factory import materialize_buffers  # RoPE frequencies: in no checkpoint, recomputed

        materialize_buffers(model)
    on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if on_meta:
        raise CheckpointError(f"still on the meta device after loading {path}: {_listed(on_meta)}")
    if path.is_dir():
        check_added_tokens(path, model)


def _check_embeddings(
    sd: dict[str, Tensor], sources: dict[str, Path], expected: dict[str, Tensor], vocab: int
) -> None:
    """A resized vocabulary (32002 rows) is the classic mistake: say so plainly (spec §1.3, §6.2)."""
    for key in EMBEDDING_KEYS:
        if key not in sd or key not in expected:
            continue
        rows = sd[key].shape[0]
        if rows != vocab:
            raise CheckpointError(
                f"{key} in {sources[key]} has {rows} rows, the model's vocabulary has {vocab}: Osprey never "
                "resizes its embeddings (<mask>/<pos> are added tokens that are never embedded)"
            )


def _some_dtype(sd: dict[str, Tensor]) -> torch.dtype:
    return next((t.dtype for t in sd.values() if t.is_floating_point()), torch.float32)


def _listed(keys: list[str]) -> str:
    more = len(keys) - _MAX_LISTED
    return ", ".join(keys[:_MAX_LISTED]) + (f", ... and {more} more" if more > 0 else "")


def check_added_tokens(path: str | Path, model: OspreyForCausalLM) -> None:
    """`added_tokens.json` (when present) must give `<mask>`/`<pos>` the ids the model splices at."""
    file = Path(path) / ADDED_TOKENS_FILE
    if not file.is_file():
        return
    try:
        added = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON: {e}") from e
    cfg = model.cfg
    for token, want in (("<mask>", cfg.mask_token_id), ("<pos>", cfg.pos_token_id)):
        if token in added and added[token] != want:
            raise CheckpointError(f"{file} gives {token} id {added[token]}, the model config expects {want}")


# --- writing -------------------------------------------------------------------------------------------


def save_checkpoint(model: OspreyForCausalLM, tokenizer, out_dir: str | Path) -> Path:
    """Our own save: `model.safetensors`, `osprey_config.json`, the tokenizer and `added_tokens.json`."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    added = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in ("<mask>", "<pos>")}
    if added != {"<mask>": cfg.mask_token_id, "<pos>": cfg.pos_token_id}:
        raise CheckpointError(
            f"the tokenizer gives {added}, the model config expects "
            f"<mask>={cfg.mask_token_id} <pos>={cfg.pos_token_id}"
        )
    sd = model.state_dict()
    on_meta = [k for k, t in sd.items() if t.is_meta]
    if on_meta:
        raise CheckpointError(f"cannot save weights that are on the meta device: {_listed(on_meta)}")
    save_file(
        {k: t.detach().cpu().contiguous() for k, t in sd.items()},
        str(out / SAFETENSORS_SINGLE),
        metadata={"format": "pt"},
    )
    cfg.save(out / CONFIG_FILE)
    tokenizer.save_pretrained(str(out))
    (out / ADDED_TOKENS_FILE).write_text(json.dumps(added, indent=2))
    return out


def write_official_layout(
    state_dict: dict[str, Tensor],
    out_dir: str | Path,
    n_shards: int = 2,
    fmt: str = "bin",
    config_json: dict | None = None,
) -> Path:
    """Write weights as the released checkpoints are laid out: `pytorch_model-0000i-of-0000N.bin` +
    `pytorch_model.bin.index.json` (or the safetensors equivalent); one shard = a single file, no index.

    Shards are balanced by bytes, in key order. `config_json`, when given, is written as `config.json`.
    """
    if fmt not in ("bin", "safetensors"):
        raise ValueError(f"fmt must be 'bin' or 'safetensors', not {fmt!r}")
    if n_shards < 1:
        raise ValueError(f"n_shards must be >= 1, not {n_shards}")
    if not state_dict:
        raise ValueError("state_dict is empty: nothing to write")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: _own_storage(t) for k, t in state_dict.items()}
    total = sum(t.nbytes for t in tensors.values())
    chunks: list[list[str]] = [[] for _ in range(n_shards)]
    seen = 0
    for key, t in tensors.items():
        chunks[min(n_shards - 1, seen * n_shards // max(total, 1))].append(key)
        seen += t.nbytes
    chunks = [c for c in chunks if c]

    n = len(chunks)
    weight_map = {}
    for i, keys in enumerate(chunks, start=1):
        if fmt == "bin":
            name = BIN_SINGLE if n == 1 else f"pytorch_model-{i:05d}-of-{n:05d}.bin"
        else:
            name = SAFETENSORS_SINGLE if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
        shard = {k: tensors[k] for k in keys}
        if fmt == "bin":
            torch.save(shard, out / name)
        else:
            from safetensors.torch import save_file

            save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, name))
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / (BIN_INDEX if fmt == "bin" else SAFETENSORS_INDEX)).write_text(json.dumps(index, indent=2))
    if config_json is not None:
        (out / "config.json").write_text(json.dumps(config_json, indent=2))
    return out


def _own_storage(t: Tensor) -> Tensor:
    """Contiguous and not a view into a larger storage (torch.save would write the whole storage)."""
    t = t.detach().cpu().contiguous()
    return t if t.untyped_storage().nbytes() == t.nbytes else t.clone()
