"""CUDA checks: the same optimised-equals-plain guarantees in bf16 on a GPU, and the 7B shapes there.

These need a GPU; on CPU-only machines (CI) they are skipped with that reason. `bench/gpu_check.sh` runs
them together with the 7B benchmark when a GPU machine is available.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from osprey_core import conversation as conv
from osprey_core.config import tiny
from osprey_core.engine import RegionEngine
from osprey_core.factory import build_model
from osprey_core.reference import plain_generate, plain_option_logliks
from osprey_core.tokenizer import build_tiny_tokenizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run bench/gpu_check.sh)")

LABELS = ["cat", "dog", "red car", "person", "tree"]


@pytest.fixture(scope="module")
def cuda_engine():
    cfg = tiny()
    cfg.vision.image_size = 64
    cfg.mask.mask_shape = 16
    model = build_model(cfg, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        model.mask_extractor.feat_linear.weight.mul_(60)
        model.mask_extractor.mask_linear.layers[2].weight.mul_(60)
    return RegionEngine(model, build_tiny_tokenizer(cfg.text.vocab_size), model_version="tiny-cuda")


def test_bf16_classify_matches_plain(cuda_engine, image, masks):
    res = cuda_engine.classify(image, masks, LABELS)
    for r, mask in enumerate(masks):
        plain = plain_option_logliks(cuda_engine.model, cuda_engine.tokenizer, image, mask, conv.category_question(),
                                     LABELS)
        got = [res[r].logprobs[label] for label in LABELS]
        np.testing.assert_allclose(got, plain, atol=0.1, rtol=0)  # bf16: packed vs plain kernels round differently
        assert res[r].label == LABELS[int(np.argmax(plain))]


def test_bf16_mask_extractor_stays_fp32(cuda_engine):
    assert all(p.dtype == torch.float32 for p in cuda_engine.model.mask_extractor.parameters())
    assert cuda_engine.model.lm_head.weight.dtype == torch.bfloat16


def test_bf16_greedy_runs_batched(cuda_engine, image, masks):
    question = conv.description_question("short")
    out = cuda_engine.generate(image, masks, question, max_new_tokens=6)
    single = [plain_generate(cuda_engine.model, cuda_engine.tokenizer, image, m, question, 6) for m in masks]
    assert len(out) == len(masks)
    agree = sum(a == b for a, b in zip(out, single, strict=True))
    assert agree >= len(masks) - 1  # bf16 ties may flip one greedy step


def test_7b_random_weights_build_on_gpu():
    model = build_model("osprey-7b", device="cuda", dtype=torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    assert n == 6_983_364_032
    assert torch.cuda.max_memory_allocated() < 24 * 2**30
    del model
    torch.cuda.empty_cache()
