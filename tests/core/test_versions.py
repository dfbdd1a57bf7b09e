"""Content-addressed model versions: every weight, the config (temperature included), the tokenizer and
an adapter change the version; the same content keeps it; a directory's files are hashed once."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from osprey_core import load_engine, model_version, versioning
from osprey_core.checkpoint import save_checkpoint
from osprey_core.config import OspreyConfig
from osprey_core.factory import build_model, load_versioned, weights_fingerprint
from osprey_core.tokenizer import build_tiny_tokenizer

VERSION = re.compile(r"tiny-[0-9a-f]{16}")


def swap_two_ids(tokenizer_json: str) -> str:
    """The same tokenizer with two vocabulary entries' ids exchanged (other ids for the same text)."""
    data = json.loads(tokenizer_json)
    vocab = data["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    return json.dumps(data)


@pytest.fixture(scope="module")
def tiny_model():
    return build_model("tiny")


@pytest.fixture()
def checkpoint_dir(tiny_model, tmp_path):
    return save_checkpoint(tiny_model, build_tiny_tokenizer(tiny_model.cfg.text.vocab_size), tmp_path / "ckpt")


@pytest.fixture()
def hash_calls(monkeypatch):
    calls: list[str] = []
    real = versioning._sha256_file

    def counting(path):
        calls.append(path.name)
        return real(path)

    monkeypatch.setattr(versioning, "_sha256_file", counting)
    return calls


def test_changing_any_single_tensor_changes_the_version(tiny_model):
    tok = build_tiny_tokenizer(tiny_model.cfg.text.vocab_size)
    sd = tiny_model.state_dict()
    base = versioning.version_of_model(tiny_model, tok)
    assert VERSION.fullmatch(base)
    seen = {versioning.tensor_digest(sd)}
    for name in sd:
        changed = dict(sd)
        t = sd[name].clone()
        t.view(-1)[t.numel() // 2] += 1
        changed[name] = t
        seen.add(versioning.tensor_digest(changed))
    assert len(seen) == len(sd) + 1, "every tensor's change gave a new digest"


def test_weights_fingerprint_sees_every_tensor(tiny_model):
    """The old fingerprint missed 90 of 108 tensors; now any change shows (and it has 64 bits)."""
    fp = weights_fingerprint(tiny_model)
    assert re.fullmatch(r"[0-9a-f]{16}", fp)
    other = build_model("tiny")
    with torch.no_grad():
        other.model.layers[1].mlp.down_proj.weight[3, 5] += 1e-3
    assert weights_fingerprint(other) != fp
    assert weights_fingerprint(build_model("tiny")) == fp


def test_in_memory_version_covers_temperature_and_tokenizer(tiny_model):
    tok = build_tiny_tokenizer(tiny_model.cfg.text.vocab_size)
    base = versioning.version_of_model(tiny_model, tok)
    warm = OspreyConfig.from_dict(tiny_model.cfg.to_dict())
    warm.score_temperature = 1.5
    assert versioning.version_of_model(tiny_model, tok, warm) != base
    normalized = OspreyConfig.from_dict(tiny_model.cfg.to_dict())
    normalized.score_length_normalized = True
    assert versioning.version_of_model(tiny_model, tok, normalized) != base
    from tokenizers import Tokenizer

    other = type(tok)(tokenizer_object=Tokenizer.from_str(swap_two_ids(tok.backend_tokenizer.to_str())),
                      bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>")
    assert other("red car").input_ids != tok("red car").input_ids or other.get_vocab() != tok.get_vocab()
    assert versioning.version_of_model(tiny_model, other) != base


def test_same_directory_twice_same_version_and_files_hashed_once(checkpoint_dir, hash_calls):
    first = load_engine(str(checkpoint_dir)).model_version
    hashed = sorted(hash_calls)
    assert "model.safetensors" in hashed and "tokenizer.json" in hashed and "osprey_config.json" in hashed
    hash_calls.clear()
    second = load_engine(str(checkpoint_dir)).model_version
    assert first == second and VERSION.fullmatch(first)
    assert hash_calls == [], "the second load used the cached sha256"
    assert (checkpoint_dir / versioning.CACHE_FILE).is_file()
    assert model_version(str(checkpoint_dir)) == first  # without loading the weights
    # a touched file (new mtime, same bytes) is re-hashed, alone, and the version stays
    (checkpoint_dir / "tokenizer.json").write_bytes((checkpoint_dir / "tokenizer.json").read_bytes())
    assert versioning.version_of_directory(checkpoint_dir) == first
    assert hash_calls == ["tokenizer.json"]


def test_directory_version_changes_with_one_tensor_temperature_or_tokenizer(checkpoint_dir):
    base = versioning.version_of_directory(checkpoint_dir)
    # one value of one tensor
    weights = checkpoint_dir / "model.safetensors"
    sd = load_file(str(weights))
    original = weights.read_bytes()
    sd["model.norm.weight"][0] += 0.5
    save_file(sd, str(weights), metadata={"format": "pt"})
    assert versioning.version_of_directory(checkpoint_dir) != base
    weights.write_bytes(original)
    assert versioning.version_of_directory(checkpoint_dir) == base
    # the temperature (a fitted calibration is a new version)
    cfg_file = checkpoint_dir / "osprey_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["score_temperature"] = 1.25
    cfg_file.write_text(json.dumps(cfg))
    assert versioning.version_of_directory(checkpoint_dir) != base
    cfg["score_temperature"] = 1.0
    cfg_file.write_text(json.dumps(cfg, indent=2))  # same config, other bytes: the file hash changes
    # the config actually in effect also counts (same files, other temperature)
    loaded = OspreyConfig.load(cfg_file)
    loaded.score_temperature = 3.0
    assert versioning.version_of_directory(checkpoint_dir, loaded) != versioning.version_of_directory(checkpoint_dir)
    # the tokenizer
    before = versioning.version_of_directory(checkpoint_dir)
    tok_file = checkpoint_dir / "tokenizer.json"
    tok_file.write_text(swap_two_ids(tok_file.read_text()))
    assert versioning.version_of_directory(checkpoint_dir) != before


def test_files_written_later_do_not_change_the_version(checkpoint_dir):
    base = versioning.version_of_directory(checkpoint_dir)
    (checkpoint_dir / "metrics.json").write_text('{"accuracy": 0.9}')
    (checkpoint_dir / "README.md").write_text("notes")
    assert versioning.version_of_directory(checkpoint_dir) == base


def test_adapter_directory_covers_its_weights_and_its_base(checkpoint_dir, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for name in ("osprey_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (checkpoint_dir / name).exists():
            shutil.copy(checkpoint_dir / name, adapter / name)
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 4}))
    (adapter / "osprey_base.json").write_text(json.dumps({"source": str(checkpoint_dir)}))
    lora = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(4, 64)}
    save_file(lora, str(adapter / "adapter_model.safetensors"))
    first = versioning.version_of_directory(adapter)
    assert first == versioning.version_of_directory(adapter)
    lora["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"][0, 0] = 2.0
    save_file(lora, str(adapter / "adapter_model.safetensors"))
    second = versioning.version_of_directory(adapter)
    assert second != first
    sd = load_file(str(checkpoint_dir / "model.safetensors"))
    sd["lm_head.weight"][0, 0] += 1.0
    save_file(sd, str(checkpoint_dir / "model.safetensors"), metadata={"format": "pt"})
    assert versioning.version_of_directory(adapter) != second, "a new base is a new version of the adapter"


def test_read_only_directory_caches_elsewhere(checkpoint_dir, tmp_path, monkeypatch, hash_calls):
    monkeypatch.setenv("OSPREY_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(versioning.os, "access", lambda path, mode: False)
    first = versioning.version_of_directory(checkpoint_dir)
    assert not (checkpoint_dir / versioning.CACHE_FILE).exists()
    assert list((tmp_path / "cache" / "sha256").glob("*.json"))
    hash_calls.clear()
    assert versioning.version_of_directory(checkpoint_dir) == first and hash_calls == []


def test_presets_get_content_versions():
    model, tok, cfg, version = load_versioned("tiny")
    assert VERSION.fullmatch(version) and version == versioning.version_of_model(model, tok, cfg)
    assert load_engine("tiny").model_version == version


def test_a_separate_vision_tower_file_is_part_of_the_version(checkpoint_dir, tmp_path, hash_calls):
    """Weights from outside the directory (`vision_tower_file`) change what is served: in the version."""
    prefix = "model.vision_tower.vision_tower."
    sd = load_file(str(checkpoint_dir / "model.safetensors"))
    clip = {k[len(prefix):]: v.clone() for k, v in sd.items() if k.startswith(prefix)}
    torch.save(clip, tmp_path / "clip.bin")
    plain = load_versioned(checkpoint_dir)[3]
    same_weights = load_versioned(checkpoint_dir, vision_tower_file=tmp_path / "clip.bin")[3]
    assert same_weights != plain  # another source of weights, another version
    gamma = "visual.trunk.stages.0.blocks.0.gamma"
    clip[gamma] = clip[gamma] * 2
    torch.save(clip, tmp_path / "clip.bin")
    other = load_versioned(checkpoint_dir, vision_tower_file=tmp_path / "clip.bin")[3]
    assert other not in (plain, same_weights)
    hash_calls.clear()
    assert load_versioned(checkpoint_dir, vision_tower_file=tmp_path / "clip.bin")[3] == other
    assert hash_calls == []
