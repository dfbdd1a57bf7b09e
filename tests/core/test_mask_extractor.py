"""The mask extractor against a direct computation of the spec's formulas (spec §3.3)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from osprey_core import build_model
from osprey_core.modeling.mask_extractor import LEVELS, mask_pool


def _direct(extractor, feats, masks):
    """Spec §3.3 written out with loops and explicit means, no einsum."""
    q = masks.shape[0]
    summed = torch.zeros(q, extractor.feat_linear.in_features)
    for level in LEVELS:
        f = feats[level].float()  # (C,h,w)
        c, h, w = f.shape
        m = F.interpolate(masks[None].float(), size=(h, w), mode="bilinear", align_corners=False)[0]
        m = (m > 0).float()
        for i in range(q):
            cells = m[i] > 0
            pooled = f[:, cells].mean(dim=1) if cells.any() else torch.zeros(c)
            lin = getattr(extractor, level)
            summed[i] += pooled @ lin.weight.T + lin.bias
    mask_tok = summed @ extractor.feat_linear.weight.T + extractor.feat_linear.bias
    s = extractor.mask_shape
    p = F.interpolate(masks[None].float(), size=(s, s), mode="bilinear", align_corners=False)[0].reshape(q, -1)
    l0, l1, l2 = extractor.mask_linear.layers
    pos_tok = torch.relu(torch.relu(p @ l0.weight.T + l0.bias) @ l1.weight.T + l1.bias) @ l2.weight.T + l2.bias
    return mask_tok, pos_tok


def test_extractor_matches_spec_formulas(image, masks):
    model = build_model("tiny")
    from osprey_core.image_processing import preprocess, to_pil

    feats = model.encode_images(preprocess(to_pil(image), model.cfg.vision)[None])[0]
    m = torch.from_numpy(np.stack(masks))
    got_mask, got_pos = model.region_embeddings(feats, m)
    want_mask, want_pos = _direct(model.mask_extractor, feats.levels, m)
    assert got_mask.shape == (len(masks), model.cfg.text.hidden_size)
    assert got_pos.shape == (len(masks), model.cfg.text.hidden_size)
    torch.testing.assert_close(got_mask, want_mask, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_pos, want_pos, rtol=1e-5, atol=1e-5)


def test_mask_pool_counts_partially_covered_cells():
    """Bilinear downsampling then `>0`: a 1-pixel mask still selects its cell, and an empty one pools zeros."""
    feats = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(2, 4, 4)
    m = torch.zeros(2, 16, 16)
    m[0, 5, 5] = 1
    pooled = mask_pool(feats, m)
    assert pooled.shape == (2, 2)
    assert torch.all(pooled[1] == 0)
    assert pooled[0, 0] > 0


def test_extractor_output_fp32_with_bf16_features(image, masks):
    model = build_model("tiny")
    from osprey_core.image_processing import preprocess, to_pil

    feats = model.encode_images(preprocess(to_pil(image), model.cfg.vision)[None])[0]
    feats.levels = {k: v.bfloat16() for k, v in feats.levels.items()}
    mask_tok, pos_tok = model.region_embeddings(feats, torch.from_numpy(np.stack(masks)))
    assert mask_tok.dtype == torch.float32 and pos_tok.dtype == torch.float32
