"""`osprey-7b` on the meta device has exactly the state-dict inventory of the released checkpoints
(spec §6.1, §3.1, §4), so the official shards load by name with no renaming."""

from __future__ import annotations

import json

import torch

from osprey_core import build_model
from osprey_core.config import OspreyConfig, get_preset
from osprey_core.modeling import OspreyForCausalLM

VISION = "model.vision_tower.vision_tower.visual."

# spec §1.2: the verbatim config.json of sunshine-lwt/Osprey-7b-stage2 (model_type differs for Osprey-7b).
OFFICIAL_CONFIG = {
    "_name_or_path": "Osprey",
    "architectures": ["OspreyLlamaForCausalLM"],
    "model_type": "osprey",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-05,
    "hidden_act": "silu",
    "vocab_size": 32000,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "tie_word_embeddings": False,
    "rope_scaling": None,
    "pretraining_tp": 1,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.31.0",
    "mm_vision_tower": "open_clip_pytorch_model.bin",
    "mm_projector_type": "mlp2x_gelu",
    "mm_use_im_start_end": False,
    "mm_use_im_patch_token": False,
    "use_mm_proj": True,
    "image_aspect_ratio": "pad",
    "image_grid_pinpoints": None,
    "tune_mm_mlp_adapter": False,
    "freeze_mm_mlp_adapter": False,
}


def llama_inventory() -> dict[str, tuple[int, ...]]:
    """Vicuna-7B v1.5 with standard HF names: 32 layers of 4096 width, MLP 11008, vocab 32000, untied head."""
    inv = {
        "model.embed_tokens.weight": (32000, 4096),
        "lm_head.weight": (32000, 4096),
        "model.norm.weight": (4096,),
    }
    for i in range(32):
        p = f"model.layers.{i}."
        for proj in ("q", "k", "v", "o"):
            inv[p + f"self_attn.{proj}_proj.weight"] = (4096, 4096)
        inv[p + "mlp.gate_proj.weight"] = (11008, 4096)
        inv[p + "mlp.up_proj.weight"] = (11008, 4096)
        inv[p + "mlp.down_proj.weight"] = (4096, 11008)
        inv[p + "input_layernorm.weight"] = (4096,)
        inv[p + "post_attention_layernorm.weight"] = (4096,)
    return inv


def projector_inventory() -> dict[str, tuple[int, ...]]:
    """§4: mlp2x_gelu, res4 width 768 -> 4096 -> 4096."""
    return {
        "model.mm_projector.0.weight": (4096, 768),
        "model.mm_projector.0.bias": (4096,),
        "model.mm_projector.2.weight": (4096, 4096),
        "model.mm_projector.2.bias": (4096,),
    }


def mask_extractor_inventory() -> dict[str, tuple[int, ...]]:
    """§3.1: per-level Linear to 1024, feat_linear 1024 -> 4096, position MLP 112*112 -> 1024 -> 1024 -> 4096."""
    inv = {}
    for level, c in zip(("res2", "res3", "res4", "res5"), (192, 384, 768, 1536), strict=True):
        inv[f"mask_extractor.{level}.weight"] = (1024, c)
        inv[f"mask_extractor.{level}.bias"] = (1024,)
    inv["mask_extractor.feat_linear.weight"] = (4096, 1024)
    inv["mask_extractor.feat_linear.bias"] = (4096,)
    for i, (o, n) in enumerate([(1024, 112 * 112), (1024, 1024), (4096, 1024)]):
        inv[f"mask_extractor.mask_linear.layers.{i}.weight"] = (o, n)
        inv[f"mask_extractor.mask_linear.layers.{i}.bias"] = (o,)
    return inv


def trunk_inventory() -> dict[str, tuple[int, ...]]:
    """§6.1 vision: timm convnext_large, depths (3,3,27,3), dims (192,384,768,1536), `gamma` layer scale."""
    dims, depths = (192, 384, 768, 1536), (3, 3, 27, 3)
    t = VISION + "trunk."
    inv = {
        t + "stem.0.weight": (192, 3, 4, 4),
        t + "stem.0.bias": (192,),
        t + "stem.1.weight": (192,),
        t + "stem.1.bias": (192,),
    }
    for s, (c, depth) in enumerate(zip(dims, depths, strict=True)):
        if s > 0:
            prev = dims[s - 1]
            inv[t + f"stages.{s}.downsample.0.weight"] = (prev,)
            inv[t + f"stages.{s}.downsample.0.bias"] = (prev,)
            inv[t + f"stages.{s}.downsample.1.weight"] = (c, prev, 2, 2)
            inv[t + f"stages.{s}.downsample.1.bias"] = (c,)
        for b in range(depth):
            p = t + f"stages.{s}.blocks.{b}."
            inv[p + "conv_dw.weight"] = (c, 1, 7, 7)
            inv[p + "conv_dw.bias"] = (c,)
            inv[p + "norm.weight"] = (c,)
            inv[p + "norm.bias"] = (c,)
            inv[p + "mlp.fc1.weight"] = (4 * c, c)
            inv[p + "mlp.fc1.bias"] = (4 * c,)
            inv[p + "mlp.fc2.weight"] = (c, 4 * c)
            inv[p + "mlp.fc2.bias"] = (c,)
            inv[p + "gamma"] = (c,)
    inv[t + "head.norm.weight"] = (1536,)
    inv[t + "head.norm.bias"] = (1536,)
    return inv


def open_clip_head_inventory() -> dict[str, tuple[int, ...]]:
    """open_clip `timm_proj='mlp'` head (unused by Osprey), with the fc2 bias of the open_clip that made it."""
    h = VISION + "head.mlp."
    return {
        h + "fc1.weight": (1536, 1536),
        h + "fc1.bias": (1536,),
        h + "fc2.weight": (768, 1536),
        h + "fc2.bias": (768,),
    }


def numel(inv: dict[str, tuple[int, ...]]) -> int:
    return sum(torch.Size(s).numel() for s in inv.values())


def expected_inventory() -> dict[str, tuple[int, ...]]:
    return {
        **llama_inventory(),
        **projector_inventory(),
        **mask_extractor_inventory(),
        **trunk_inventory(),
        **open_clip_head_inventory(),
    }


def shapes(model: OspreyForCausalLM) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_component_sizes_match_spec_totals():
    """The programmatic inventory reproduces the parameter counts that spec §3.1, §4 and §6 state."""
    assert numel(llama_inventory()) == 6_738_415_616
    assert numel(trunk_inventory()) == 196_230_336
    assert numel(open_clip_head_inventory()) == 3_540_480 + 768
    assert numel(projector_inventory()) == 19_931_136
    assert numel(mask_extractor_inventory()) == 25_245_696
    assert len([k for k in trunk_inventory() if k.endswith(".gamma")]) == 36


def test_osprey_7b_state_dict_equals_official_inventory():
    model = build_model("osprey-7b", device="meta")
    got, want = shapes(model), expected_inventory()
    assert sorted(set(want) - set(got)) == []  # missing from the model
    assert sorted(set(got) - set(want)) == []  # the model has extra keys
    assert {k: v for k, v in got.items() if want[k] != v} == {}
    assert sum(p.numel() for p in model.state_dict().values()) == 6_983_363_264 + 768
    assert all(p.is_meta for p in model.parameters())


def test_official_config_json_builds_the_same_inventory(tmp_path):
    """The released config.json (no mm_hidden_size, vocab 32000) maps onto the osprey-7b shapes."""
    from osprey_core.factory import read_config

    (tmp_path / "config.json").write_text(json.dumps(OFFICIAL_CONFIG))
    cfg = read_config(tmp_path)
    assert cfg.text == get_preset("osprey-7b").text
    assert cfg.mm_hidden_size == 768 and (cfg.mask_token_id, cfg.pos_token_id) == (32000, 32001)
    with torch.device("meta"):
        model = OspreyForCausalLM(cfg)
    assert shapes(model) == expected_inventory()


def test_config_round_trips_through_json(tmp_path):
    cfg = get_preset("osprey-7b")
    cfg.save(tmp_path / "osprey_config.json")
    assert OspreyConfig.load(tmp_path / "osprey_config.json") == cfg
