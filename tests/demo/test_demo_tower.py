"""Stage 0 of the demo build (training/demo_tower.py): the tower and the mask extractor's level projections
learn regions' shapes and colours from on-the-fly scenes, nothing else in the model moves, and the
pretrained base is a model directory stage 1 loads. A few steps on the real demo preset (128 px)."""

from __future__ import annotations

import torch

from osprey_core.factory import load_model
from training import demo_model, synthetic
from training.demo_tower import TowerRecipe, pretrain_tower

LEVEL_PREFIXES = tuple(f"mask_extractor.{lv}." for lv in ("res2", "res3", "res4", "res5"))


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_stage_0_trains_the_tower_and_level_projections_only():
    torch.manual_seed(0)
    model, _, _ = load_model("demo", device="cpu", dtype=torch.float32)
    before = _snapshot(model)
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    held = list(synthetic.generate(4, seed=demo_model.HELD_OUT_SEED, shapes=demo_model.TRAIN_SHAPES,
                                   **demo_model.WORLD))
    head, report = pretrain_tower(model, TowerRecipe(steps=40, images_per_step=4), demo_model.TRAIN_SHAPES,
                                  demo_model.WORLD, held, progress=False)
    assert report["final_loss"] < report["first_loss"] - 0.5, report  # ln 7 + ln 6 = 3.7 at the start
    assert 0.0 <= report["held_out_shape_accuracy"] <= 1.0
    assert head.shapes == len(demo_model.TRAIN_SHAPES)  # no output for the new class: it stays unseen
    after = model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("model.vision_tower.") for k in moved)
    assert all(k.startswith(("model.vision_tower.", *LEVEL_PREFIXES)) for k in moved), sorted(moved)
    for prefix in LEVEL_PREFIXES:
        assert any(k.startswith(prefix) for k in moved), prefix
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads  # the tower frozen again
    assert not model.model.vision_tower.training


def test_the_pretrained_base_loads_with_its_tower_and_the_presets_language_model(tmp_path):
    recipe = demo_model.Recipe(tower_steps=2, tower_images_per_step=1, train_vision=False)
    path = demo_model.pretrained_tower_base(recipe, tmp_path / "stage0", progress=False, log=lambda _: None)
    loaded, tokenizer, cfg = load_model(str(path), device="cpu", dtype=torch.float32)
    fresh, _, _ = load_model("demo", device="cpu", dtype=torch.float32)
    assert cfg.name == "demo" and tokenizer.convert_tokens_to_ids("<mask>") == cfg.mask_token_id
    new, old = loaded.state_dict(), fresh.state_dict()
    assert set(new) == set(old)
    tower = [k for k in new if k.startswith("model.vision_tower.")]
    assert any(not torch.equal(new[k], old[k]) for k in tower)
    rest = [k for k in new if not k.startswith(("model.vision_tower.", *LEVEL_PREFIXES))]
    assert rest and all(torch.equal(new[k], old[k]) for k in rest)
