"""Our ConvNeXt trunk is timm's ConvNeXt: same parameter names and the same features."""

from __future__ import annotations

import timm
import torch

from osprey_core import build_model


def test_trunk_equals_timm_convnext():
    model = build_model("tiny")
    vc = model.cfg.vision
    trunk = model.model.vision_tower.trunk
    with torch.no_grad():  # non-trivial layer scale so the blocks matter
        for name, p in trunk.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.5, 1.5)
    ref = timm.models.convnext.ConvNeXt(depths=vc.depths, dims=vc.dims, num_classes=0, ls_init_value=1e-6,
                                        head_norm_first=False, conv_mlp=False)
    missing, unexpected = ref.load_state_dict(trunk.state_dict(), strict=False)
    assert not unexpected and not missing
    x = torch.randn(2, 3, vc.image_size, vc.image_size)
    feats = model.model.vision_tower(x)
    with torch.no_grad():
        y = ref.stem(x)
        for i, stage in enumerate(ref.stages):
            y = stage(y)
            torch.testing.assert_close(feats[f"res{i + 2}"], y, rtol=1e-5, atol=1e-5)


def test_feature_shapes_7b_layout():
    """Strides 4/8/16/32 at 512 px: 128, 64, 32 (the 1024 image tokens), 16 (spec §2.2)."""
    model = build_model("osprey-7b", device="meta")
    x = torch.empty(1, 3, 512, 512, device="meta")
    feats = model.model.vision_tower(x)
    assert feats["res2"].shape == (1, 192, 128, 128)
    assert feats["res3"].shape == (1, 384, 64, 64)
    assert feats["res4"].shape == (1, 768, 32, 32)
    assert feats["res5"].shape == (1, 1536, 16, 16)
    tokens = model.encode_images(x)[0].tokens
    assert tokens.shape == (1024, 4096)
