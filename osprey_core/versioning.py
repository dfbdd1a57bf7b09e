"""Model versions are content addresses: `<name>-<16 hex>` (64 bits of sha256) over every weight, the
config (score temperature and scoring options included) and the tokenizer, plus a LoRA adapter and
its base when one is applied.

The version keys job ids, dedup and what Label Studio shows, so anything that can change an output
must change it. For a checkpoint directory we hash files, not tensors: the sha256 of every weight and
tokenizer file, computed once and cached beside the files (`.osprey_sha256.json`, keyed by size and
mtime; in ~/.cache/osprey when the directory is read-only), so a 14 GB checkpoint is read once, not at
every start. In-memory models (presets, a model being trained) hash every tensor's bytes instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .errors import CheckpointError

CACHE_FILE = ".osprey_sha256.json"
DIGEST_HEX = 16  # 64 bits
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# Files that decide the ids or the model besides the weights (metrics or READMEs written into a version
# directory later must not change its version).
MODEL_FILES = (
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "config.json", "osprey_config.json", "adapter_config.json", "osprey_base.json",
    "model.safetensors.index.json", "pytorch_model.bin.index.json",
)
_CHUNK = 16 << 20


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _cache_location(directory: Path) -> Path:
    if os.access(directory, os.W_OK):
        return directory / CACHE_FILE
    key = hashlib.sha256(str(directory.resolve()).encode()).hexdigest()[:32]
    return Path(os.environ.get("OSPREY_CACHE_DIR", Path.home() / ".cache" / "osprey")) / "sha256" / f"{key}.json"


def _read_cache(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(file: Path, data: dict[str, Any]) -> None:
    """Atomic replace; a cache that cannot be written only costs a re-hash next time."""
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=".osprey_sha256.")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, file)
    except OSError:
        pass


def versioned_files(directory: str | Path) -> list[Path]:
    """The files of a checkpoint directory that a version covers: every weight file and MODEL_FILES."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"no checkpoint directory at {directory}")
    return sorted(p for p in directory.iterdir()
                  if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or p.name in MODEL_FILES))


def file_hashes(directory: str | Path) -> dict[str, str]:
    """{file name: sha256} of `versioned_files`, re-hashing only files whose size or mtime changed."""
    return _cached_hashes(Path(directory), versioned_files(directory), prune=True)


def file_hash(path: str | Path) -> str:
    """sha256 of one file (e.g. a separate vision-tower file), cached like a directory's files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no file at {path}")
    return _cached_hashes(path.parent, [path], prune=False)[path.name]


def _cached_hashes(directory: Path, paths: list[Path], prune: bool) -> dict[str, str]:
    cache_file = _cache_location(directory)
    cache = _read_cache(cache_file)
    out: dict[str, str] = {}
    fresh: dict[str, Any] = {} if prune else dict(cache)
    for path in paths:
        st = path.stat()
        entry = cache.get(path.name)
        if not (isinstance(entry, dict) and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns
                and isinstance(entry.get("sha256"), str)):
            entry = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": _sha256_file(path)}
        fresh[path.name] = entry
        out[path.name] = entry["sha256"]
    if fresh != cache:
        _write_cache(cache_file, fresh)
    return out


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:DIGEST_HEX]


def version_of_directory(path: str | Path, cfg=None, base_version: str | None = None,
                         extra: dict[str, Any] | None = None) -> str:
    """Version of a checkpoint (or adapter) directory: its files' sha256 + the config in effect.

    `cfg` (an OspreyConfig) is the config the model runs with (default: the directory's own); for an
    adapter directory `base_version` is its base's version (default: computed from osprey_base.json);
    `extra`: load options that change outputs (e.g. {"quantization": "4bit"}).
    """
    from .factory import read_config

    path = Path(path)
    cfg = read_config(path) if cfg is None else cfg
    payload: dict[str, Any] = {"files": file_hashes(path), "config": cfg.to_dict()}
    if extra:
        payload["extra"] = extra
    if (path / "adapter_config.json").is_file() and (path / "osprey_base.json").is_file():  # a LoRA adapter
        payload["base"] = base_version if base_version is not None else _adapter_base_version(path)
    return f"{cfg.name}-{_digest(payload)}"


def _adapter_base_version(path: Path) -> str:
    try:
        ref = json.loads((path / "osprey_base.json").read_text())
        source = ref.get("relative") and (path / ref["relative"]).is_dir() and str(path / ref["relative"])
        source = source or str(ref["source"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path / 'osprey_base.json'} does not name the adapter's base: {e}") from e
    return version_of_source(source)


def version_of_source(source: str | Path) -> str:
    """Version of what `load_model(source)` loads, without loading a checkpoint directory's weights."""
    from .config import PRESETS
    from .factory import OFFICIAL_WEIGHTS, load_model

    source = OFFICIAL_WEIGHTS.get(str(source), str(source))
    if source in PRESETS:
        model, tokenizer, cfg = load_model(source)
        return version_of_model(model, tokenizer, cfg)
    from .checkpoint import resolve_source

    return version_of_directory(resolve_source(source))


def tensor_digest(state_dict) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes (in key order)."""
    import torch

    h = hashlib.sha256()
    for name, t in state_dict.items():
        if t.device.type == "meta":
            raise CheckpointError(f"cannot version a model whose {name} is on the meta device (no weights)")
        t = t.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(state_dict[name].shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def tokenizer_digest(tokenizer) -> str:
    """sha256 of the tokenizer's full definition (vocabulary, merges, normalizer, added tokens)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        text = backend.to_str()
    else:
        text = json.dumps(sorted(tokenizer.get_vocab().items()))
    specials = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id, tokenizer.pad_token_id]
    return hashlib.sha256((text + json.dumps(specials)).encode()).hexdigest()


def version_of_model(model, tokenizer, cfg=None, extra: dict[str, Any] | None = None) -> str:
    """Version of an in-memory model (every tensor), its tokenizer and its config (default model.cfg).

    For training code: the version a model will have once loaded is what `version_of_directory` gives
    for the directory it is saved to; this one is for models that never touch a directory."""
    cfg = model.cfg if cfg is None else cfg
    payload = {"weights": tensor_digest(model.state_dict()), "tokenizer": tokenizer_digest(tokenizer),
               "config": cfg.to_dict()}
    if extra:
        payload["extra"] = extra
    return f"{cfg.name}-{_digest(payload)}"
