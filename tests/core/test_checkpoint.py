"""Checkpoint loading and saving against synthetic checkpoints written here in the official layout.

The synthetic directories use the official key names, file names and `config.json` fields with tiny
sizes. Because `config.json` can only describe the LLaMA part (the official vision sizes are fixed by
the recipe), each one also carries our `osprey_config.json`, which `read_config` prefers; the mapping of
the real 7B `config.json` is covered in test_inventory.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from osprey_core import checkpoint
from osprey_core.checkpoint import (
    load_checkpoint,
    read_state_dict,
    resolve_source,
    save_checkpoint,
    write_official_layout,
)
from osprey_core.config import tiny
from osprey_core.errors import CheckpointError
from osprey_core.factory import build_model, load_model
from osprey_core.modeling import OspreyForCausalLM
from osprey_core.modeling.modeling_osprey import IMAGE_TOKEN_INDEX
from osprey_core.tokenizer import build_tiny_tokenizer

VISION = checkpoint.VISION_PREFIX


class NotATensor:
    """Any class: a pickle holding it is what `weights_only=True` must refuse."""


@pytest.fixture(scope="module")
def source() -> OspreyForCausalLM:
    """Tiny model with random weights and non-trivial layer scale (so a dropped `gamma` would show)."""
    model = build_model("tiny", seed=123)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".gamma"):
                p.uniform_(0.5, 1.5)
    return model


def official_state_dict(model: OspreyForCausalLM) -> dict[str, torch.Tensor]:
    """The model's weights plus the transformers-4.31 `rotary_emb.inv_freq` buffers the real shards hold."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    head_dim = model.cfg.text.hidden_size // model.cfg.text.num_attention_heads
    for i in range(model.cfg.text.num_hidden_layers):
        sd[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.rand(head_dim // 2)
    return sd


def official_config_json(model: OspreyForCausalLM) -> dict:
    """The fields of the released config.json (spec §1.2), with this model's LLaMA sizes."""
    t = model.cfg.text
    return {
        "_name_or_path": "Osprey",
        "architectures": ["OspreyLlamaForCausalLM"],
        "model_type": "osprey",
        "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_hidden_layers,
        "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_key_value_heads,
        "max_position_embeddings": t.max_position_embeddings,
        "rms_norm_eps": t.rms_norm_eps,
        "hidden_act": "silu",
        "vocab_size": t.vocab_size,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "mm_vision_tower": "open_clip_pytorch_model.bin",
        "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
    }


def write_official_dir(
    path: Path,
    model: OspreyForCausalLM,
    fmt: str = "bin",
    n_shards: int = 3,
    sd: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Shards + index + config.json + osprey_config.json + tokenizer files + added_tokens.json."""
    sd = official_state_dict(model) if sd is None else sd
    write_official_layout(sd, path, n_shards=n_shards, fmt=fmt, config_json=official_config_json(model))
    model.cfg.save(path / "osprey_config.json")
    build_tiny_tokenizer(model.cfg.text.vocab_size).save_pretrained(str(path))
    (path / "added_tokens.json").write_text(
        json.dumps({"<mask>": model.cfg.mask_token_id, "<pos>": model.cfg.pos_token_id})
    )
    (path / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"})
    )
    return path


@torch.no_grad()
def outputs(model: OspreyForCausalLM) -> torch.Tensor:
    """Logits of one prompt with an image and two regions: exercises vision, projector, extractor, LLM."""
    g = torch.Generator().manual_seed(0)
    s = model.cfg.vision.image_size
    pixels = torch.randn(1, 3, s, s, generator=g)
    masks = torch.zeros(2, 48, 40)
    masks[0, :20, :25] = 1
    masks[1, 20:, 10:] = 1
    feats = model.encode_images(pixels)[0]
    mask_tokens, pos_tokens = model.region_embeddings(feats, masks)
    m, p = model.cfg.mask_token_id, model.cfg.pos_token_id
    ids = torch.tensor([1, 5, IMAGE_TOKEN_INDEX, 7, m, p, 9, m, p, 3])
    logits, _ = model(model.splice(ids, feats.tokens, mask_tokens, pos_tokens)[None])
    return logits


def meta_tiny() -> OspreyForCausalLM:
    with torch.device("meta"):
        return OspreyForCausalLM(tiny())


def assert_same_weights(model: OspreyForCausalLM, reference: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert set(got) == set(reference)
    for k, v in reference.items():
        assert torch.equal(got[k], v.to(got[k].dtype)), k


# --- loading the official layout ------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_official_sharded_layout_loads_every_key(tmp_path, source, fmt):
    ckpt = write_official_dir(tmp_path, source, fmt=fmt, n_shards=3)
    index = json.loads(
        (ckpt / (checkpoint.BIN_INDEX if fmt == "bin" else checkpoint.SAFETENSORS_INDEX)).read_text()
    )
    assert len(set(index["weight_map"].values())) == 3

    model, tokenizer, cfg = load_model(str(ckpt))
    assert_same_weights(model, source.state_dict())
    assert torch.equal(outputs(model), outputs(source))
    assert tokenizer.convert_tokens_to_ids(["<mask>", "<pos>"]) == [cfg.mask_token_id, cfg.pos_token_id]
    assert model.model.embed_tokens.weight.shape[0] == cfg.text.vocab_size  # never resized
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])


def test_layer_scale_gamma_lands(tmp_path, source):
    """The 36 (here 5) `...blocks.B.gamma` keys are loaded as they are, not renamed and dropped."""
    ckpt = write_official_dir(tmp_path, source)
    on_disk = read_state_dict(ckpt)
    model = meta_tiny()
    load_checkpoint(model, ckpt)
    gammas = {k: v for k, v in model.state_dict().items() if k.endswith(".gamma")}
    assert len(gammas) == sum(model.cfg.vision.depths)
    for k, v in gammas.items():
        assert torch.equal(v, on_disk[k]), k
        assert not torch.allclose(v, torch.full_like(v, model.cfg.vision.layer_scale_init))


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_single_file_layout_and_single_file_path(tmp_path, source, fmt):
    ckpt = write_official_dir(tmp_path, source, fmt=fmt, n_shards=1)
    single = ckpt / (checkpoint.BIN_SINGLE if fmt == "bin" else checkpoint.SAFETENSORS_SINGLE)
    assert single.is_file() and not list(ckpt.glob("*.index.json"))
    model, _, _ = load_model(str(ckpt))
    assert torch.equal(outputs(model), outputs(source))
    assert read_state_dict(single).keys() == read_state_dict(ckpt).keys()


def test_bf16_shards_load_and_mask_extractor_stays_fp32(tmp_path, source):
    """Released weights are bf16; the mask extractor is computed in fp32 whatever the model dtype."""
    sd16 = {k: v.to(torch.bfloat16) for k, v in official_state_dict(source).items()}
    ckpt = write_official_dir(tmp_path, source, sd=sd16)
    model, _, _ = load_model(str(ckpt), dtype="bfloat16")
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert {p.dtype for p in model.mask_extractor.parameters()} == {torch.float32}
    model32, _, _ = load_model(str(ckpt), dtype="float32")
    assert_same_weights(model32, {k: v for k, v in sd16.items() if "inv_freq" not in k})


def test_vision_tower_from_open_clip_file(tmp_path, source):
    """A checkpoint without vision keys (like the stage-1 repos) + open_clip's file; text tower ignored."""
    sd = official_state_dict(source)
    vision = {k: sd.pop(k) for k in list(sd) if k.startswith(VISION)}
    ckpt = write_official_dir(tmp_path / "ckpt", source, sd=sd)
    clip_file = tmp_path / "open_clip_pytorch_model.bin"
    open_clip_sd = {k[len(VISION) :]: v for k, v in vision.items()}
    open_clip_sd.update(
        {
            "token_embedding.weight": torch.randn(10, 4),
            "logit_scale": torch.tensor(4.6),
            "transformer.resblocks.0.attn.in_proj_weight": torch.randn(12, 4),
        }
    )
    # legacy (pre-zip) serialization cannot be mmapped: the loader must fall back, still weights_only
    torch.save(open_clip_sd, clip_file, _use_new_zipfile_serialization=False)

    with pytest.raises(
        CheckpointError, match=r"missing, expected in .*ckpt: model\.vision_tower\..*vision_tower_file"
    ):
        load_checkpoint(meta_tiny(), ckpt)
    model = meta_tiny()
    load_checkpoint(model, ckpt, vision_tower_file=clip_file)
    model.eval()
    assert torch.equal(outputs(model), outputs(source))
    assert_same_weights(model, source.state_dict())


def test_vision_tower_file_overrides_checkpoint_vision_keys(tmp_path, source):
    ckpt = write_official_dir(tmp_path / "ckpt", source)
    vision = {
        k[len(VISION) :]: torch.randn_like(v) for k, v in source.state_dict().items() if k.startswith(VISION)
    }
    torch.save(vision, tmp_path / "clip.bin")
    model = meta_tiny()
    load_checkpoint(model, ckpt, vision_tower_file=tmp_path / "clip.bin")
    gamma = "visual.trunk.stages.0.blocks.0.gamma"
    assert torch.equal(model.state_dict()[VISION + gamma], vision[gamma])


def test_open_clip_file_without_visual_keys_is_an_error(tmp_path, source):
    ckpt = write_official_dir(tmp_path / "ckpt", source)
    torch.save({"token_embedding.weight": torch.zeros(2, 2)}, tmp_path / "text_only.bin")
    with pytest.raises(CheckpointError, match=r"text_only\.bin has no visual"):
        load_checkpoint(meta_tiny(), ckpt, vision_tower_file=tmp_path / "text_only.bin")


def test_open_clip_head_bias_may_be_absent(tmp_path, source):
    """open_clip versions differ on `head.mlp.fc2.bias`; that head is unused, so absent = zeros."""
    sd = official_state_dict(source)
    key = VISION + "visual.head.mlp.fc2.bias"
    del sd[key]
    ckpt = write_official_dir(tmp_path, source, sd=sd)
    model = meta_tiny()
    load_checkpoint(model, ckpt)
    assert torch.equal(model.state_dict()[key], torch.zeros(source.cfg.vision.head_embed_dim))


# --- our own saves ---------------------------------------------------------------------------------------


def test_save_checkpoint_round_trip(tmp_path, source):
    tokenizer = build_tiny_tokenizer(source.cfg.text.vocab_size)
    out = save_checkpoint(source, tokenizer, tmp_path / "saved")
    assert (out / "model.safetensors").is_file() and (out / "osprey_config.json").is_file()
    assert json.loads((out / "added_tokens.json").read_text()) == {
        "<mask>": source.cfg.mask_token_id,
        "<pos>": source.cfg.pos_token_id,
    }
    model, tok2, cfg = load_model(str(out))
    assert cfg == source.cfg
    assert_same_weights(model, source.state_dict())
    assert torch.equal(outputs(model), outputs(source))
    text = "What is <mask><pos>?"
    assert tok2(text).input_ids == tokenizer(text).input_ids


def test_save_checkpoint_refuses_a_tokenizer_with_other_added_ids(tmp_path, source):
    tokenizer = build_tiny_tokenizer(256)  # <mask> = 256, the model splices at 1024
    with pytest.raises(CheckpointError, match="<mask>"):
        save_checkpoint(source, tokenizer, tmp_path)


def test_save_checkpoint_refuses_meta_weights(tmp_path):
    with pytest.raises(CheckpointError, match="meta device"):
        save_checkpoint(meta_tiny(), build_tiny_tokenizer(), tmp_path)


# --- errors: each names the file and, where there is one, the key ----------------------------------------


def shards(ckpt: Path, fmt: str) -> list[Path]:
    return sorted(ckpt.glob("pytorch_model-*.bin" if fmt == "bin" else "model-*.safetensors"))


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_missing_shard(tmp_path, source, fmt):
    ckpt = write_official_dir(tmp_path, source, fmt=fmt)
    gone = shards(ckpt, fmt)[1]
    gone.unlink()
    with pytest.raises(CheckpointError, match=rf"missing shard {gone.name}.* for key "):
        load_model(str(ckpt))


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_truncated_shard(tmp_path, source, fmt):
    ckpt = write_official_dir(tmp_path, source, fmt=fmt)
    cut = shards(ckpt, fmt)[0]
    data = cut.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{cut.name}.*(truncated|corrupt)"):
        load_model(str(ckpt))


def test_corrupt_safetensors_header(tmp_path, source):
    ckpt = write_official_dir(tmp_path, source, fmt="safetensors")
    bad = shards(ckpt, "safetensors")[2]
    data = bytearray(bad.read_bytes())
    data[8:24] = b"this is not json"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{bad.name}.*corrupt"):
        read_state_dict(ckpt)


def test_pickled_object_is_refused_by_weights_only(tmp_path, source):
    ckpt = write_official_dir(tmp_path, source, n_shards=1)
    torch.save({"model.norm.weight": torch.zeros(1), "x": NotATensor()}, ckpt / "pytorch_model.bin")
    with pytest.raises(
        CheckpointError, match=r"pytorch_model\.bin is not a plain weights file.*weights_only.*NotATensor"
    ):
        load_model(str(ckpt))


def test_pickle_that_is_not_a_dict_of_tensors(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "list.bin")
    with pytest.raises(CheckpointError, match=r"list\.bin is not a plain weights file.*list"):
        read_state_dict(tmp_path / "list.bin")


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_index_lists_a_key_its_shard_lacks(tmp_path, source, fmt):
    ckpt = write_official_dir(tmp_path, source, fmt=fmt)
    index_file = ckpt / (checkpoint.BIN_INDEX if fmt == "bin" else checkpoint.SAFETENSORS_INDEX)
    index = json.loads(index_file.read_text())
    first, last = shards(ckpt, fmt)[0].name, shards(ckpt, fmt)[-1].name
    index["weight_map"]["lm_head.weight"] = first if index["weight_map"]["lm_head.weight"] != first else last
    index_file.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"key lm_head\.weight in shard .*lacks it"):
        load_model(str(ckpt))


def test_index_that_is_not_json_or_escapes_the_directory(tmp_path, source):
    ckpt = write_official_dir(tmp_path, source)
    index_file = ckpt / checkpoint.BIN_INDEX
    good = index_file.read_text()
    index_file.write_text("{not json")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin\.index\.json is not a readable JSON"):
        read_state_dict(ckpt)
    index = json.loads(good)
    index["weight_map"]["model.norm.weight"] = "../elsewhere.bin"
    index_file.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight.*not a file name"):
        read_state_dict(ckpt)


def test_directory_without_weights(tmp_path):
    with pytest.raises(CheckpointError, match=rf"no weights in {tmp_path}"):
        read_state_dict(tmp_path)


def test_missing_key(tmp_path, source):
    sd = official_state_dict(source)
    del sd["model.layers.1.mlp.down_proj.weight"]
    ckpt = write_official_dir(tmp_path, source, sd=sd)
    with pytest.raises(
        CheckpointError, match=rf"expected in {ckpt}: model\.layers\.1\.mlp\.down_proj\.weight"
    ):
        load_model(str(ckpt))


def test_unexpected_key(tmp_path, source):
    sd = official_state_dict(source)
    sd["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(source.cfg.text.hidden_size)
    ckpt = write_official_dir(tmp_path, source, sd=sd)
    with pytest.raises(
        CheckpointError, match=r"unexpected .*model\.layers\.0\.self_attn\.q_proj\.bias \(in .*pytorch_model-"
    ):
        load_model(str(ckpt))


def test_renamed_gamma_is_unexpected_not_silently_dropped(tmp_path, source):
    """What HF's gamma->weight rename would produce must fail loudly here."""
    sd = official_state_dict(source)
    key = VISION + "visual.trunk.stages.2.blocks.1.gamma"
    sd[key.replace(".gamma", ".weight")] = sd.pop(key)
    ckpt = write_official_dir(tmp_path, source, sd=sd)
    with pytest.raises(CheckpointError, match=r"stages\.2\.blocks\.1\.gamma"):
        load_model(str(ckpt))


def test_wrong_shape(tmp_path, source):
    sd = official_state_dict(source)
    key = "mask_extractor.res3.weight"
    sd[key] = torch.zeros(7, 3)
    ckpt = write_official_dir(tmp_path, source, sd=sd)
    e = source.cfg.mask.embed_dim, source.cfg.vision.dims[1]
    with pytest.raises(
        CheckpointError,
        match=rf"{key} in .*pytorch_model-\d+-of-\d+\.bin has shape \[7, 3\], the model expects \[{e[0]}, {e[1]}\]",
    ):
        load_model(str(ckpt))


@pytest.mark.parametrize("key", ["model.embed_tokens.weight", "lm_head.weight"])
def test_resized_vocabulary_is_an_error(tmp_path, source, key):
    """32002 rows in the real model: the added tokens are never embedded, the vocab stays 32000."""
    sd = official_state_dict(source)
    sd[key] = torch.cat([sd[key], torch.zeros(2, sd[key].shape[1])])
    ckpt = write_official_dir(tmp_path, source, sd=sd)
    rows = source.cfg.text.vocab_size + 2
    with pytest.raises(CheckpointError, match=rf"{key} in .* has {rows} rows.*never resizes"):
        load_model(str(ckpt))


def test_added_tokens_json_must_match_the_config(tmp_path, source):
    ckpt = write_official_dir(tmp_path, source)
    (ckpt / "added_tokens.json").write_text(json.dumps({"<mask>": 514, "<pos>": 515}))
    with pytest.raises(CheckpointError, match=r"added_tokens\.json gives <mask> id 514"):
        load_model(str(ckpt))


def test_parameter_left_on_meta_is_an_error(tmp_path, source):
    """A tensor the checkpoint cannot fill (here a non-persistent buffer) must not survive as meta."""
    ckpt = write_official_dir(tmp_path, source)
    model = meta_tiny()
    model.mask_extractor.register_buffer("scratch", torch.empty(3, device="meta"), persistent=False)
    with pytest.raises(CheckpointError, match=r"meta device .*mask_extractor\.scratch"):
        load_checkpoint(model, ckpt)


# --- locating a checkpoint ---------------------------------------------------------------------------------


def test_resolve_source_local_and_bad_paths(tmp_path):
    assert resolve_source(str(tmp_path)) == tmp_path
    for bad in [tmp_path / "nope", "./no/such/dir", "not a repo"]:
        with pytest.raises(CheckpointError, match="not a Hugging Face repo id"):
            resolve_source(str(bad))
    (tmp_path / "f.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="is a file"):
        resolve_source(str(tmp_path / "f.bin"))


def test_resolve_source_downloads_a_repo_id(tmp_path, monkeypatch):
    """No network: snapshot_download is replaced; we check the repo id branch and the file patterns."""
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, allow_patterns):
        calls.append((repo_id, allow_patterns))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert resolve_source("sunshine-lwt/Osprey-7b") == tmp_path
    assert calls == [("sunshine-lwt/Osprey-7b", ["*.json", "*.bin", "*.safetensors", "tokenizer.model"])]

    def offline(repo_id, allow_patterns):
        raise OSError("no internet")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(CheckpointError, match=r"'sunshine-lwt/Osprey-Chat-7b'.*no internet"):
        resolve_source("sunshine-lwt/Osprey-Chat-7b")


def test_has_tokenizer(tmp_path):
    assert not checkpoint.has_tokenizer(tmp_path)
    build_tiny_tokenizer().save_pretrained(str(tmp_path))
    assert checkpoint.has_tokenizer(tmp_path)


def test_write_official_layout_rejects_unknown_format(tmp_path):
    with pytest.raises(ValueError, match="fmt"):
        write_official_layout({"a": torch.zeros(1)}, tmp_path, fmt="npz")


def test_osprey_7b_name_means_the_released_weights(monkeypatch):
    """`load_engine("osprey-7b")` resolves to the official repo id (no network here: resolution is stubbed)."""
    from osprey_core import factory

    seen = []

    def fake_resolve(source):
        seen.append(source)
        raise CheckpointError("stop here")

    monkeypatch.setattr(checkpoint, "resolve_source", fake_resolve)
    for name, repo in [("osprey-7b", "sunshine-lwt/Osprey-7b"), ("osprey-chat-7b", "sunshine-lwt/Osprey-Chat-7b")]:
        with pytest.raises(CheckpointError, match="stop here"):
            factory.load_model(name)
        assert seen[-1] == repo
