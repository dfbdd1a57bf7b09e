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


# --- quantized loading (bitsandbytes): memory and agreement with bf16 -------------------------------

QUANT_LABELS = ["person", "car", "dog", "cat", "bicycle", "bus", "truck", "traffic light", "tree", "building",
                "sky", "road", "grass", "bird", "horse", "boat", "chair", "table", "bottle", "red cup"]


def _regions_512(k: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 255, (512, 512, 3), dtype=np.uint8)
    masks = []
    for i in range(k):  # a 4x4 grid of boxes of varied size: every region sees different features
        x0, y0 = (i % 4) * 128 + int(rng.integers(0, 32)), (i // 4) * 128 + int(rng.integers(0, 32))
        m = np.zeros((512, 512), bool)
        m[y0 : y0 + int(rng.integers(32, 96)), x0 : x0 + int(rng.integers(32, 96))] = True
        masks.append(m)
    return image, masks


def _amplified_7b():
    """The 7B shapes with random weights, region embeddings amplified as in `cuda_engine` so that the
    answer depends on the region (random weights otherwise give every region the same label)."""
    model = build_model("osprey-7b", device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        model.mask_extractor.feat_linear.weight.mul_(60)
        model.mask_extractor.mask_linear.layers[2].weight.mul_(60)
    return model


@pytest.fixture(scope="module")
def bf16_7b_answers():
    image, masks = _regions_512()
    model = _amplified_7b()
    engine = RegionEngine(model, build_tiny_tokenizer(model.cfg.text.vocab_size), model_version="7b-bf16")
    res = engine.classify(image, masks, QUANT_LABELS)
    answers = [r.label for r in res], np.array([[r.logprobs[x] for x in QUANT_LABELS] for r in res])
    del engine, model
    torch.cuda.empty_cache()
    return answers


# "Most regions": more than half for 4-bit (the bar), more for 8-bit.
@pytest.mark.parametrize("mode, min_agreement, max_gib", [("8bit", 0.75, 10.0), ("4bit", 0.51, 8.0)])
def test_quantized_7b_agrees_with_bf16(bf16_7b_answers, mode, min_agreement, max_gib, record_property):
    pytest.importorskip("bitsandbytes", reason="needs bitsandbytes (pip install '.[gpu]')")
    from osprey_core.quantize import quantization_of, quantize_model

    labels_bf16, logp_bf16 = bf16_7b_answers
    image, masks = _regions_512()
    model = quantize_model(_amplified_7b(), mode, "cuda")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    gib = torch.cuda.memory_allocated() / 2**30
    assert quantization_of(model) == mode
    assert all(p.dtype == torch.float32 for p in model.mask_extractor.parameters())
    engine = RegionEngine(model, build_tiny_tokenizer(model.cfg.text.vocab_size), model_version=f"7b-{mode}")
    res = engine.classify(image, masks, QUANT_LABELS)
    labels_q = [r.label for r in res]
    logp_q = np.array([[r.logprobs[x] for x in QUANT_LABELS] for r in res])
    agreement = float(np.mean([a == b for a, b in zip(labels_q, labels_bf16, strict=True)]))
    corr = float(np.corrcoef(logp_q.ravel(), logp_bf16.ravel())[0, 1])
    peak = torch.cuda.max_memory_allocated() / 2**30
    record_property(f"{mode}_agreement", agreement)
    print(f"\n{mode}: top-1 agreement with bf16 {agreement:.3f} over {len(masks)} regions "
          f"({len(set(labels_bf16))} distinct bf16 labels), logprob correlation {corr:.3f}, "
          f"weights {gib:.2f} GiB, peak while classifying {peak:.2f} GiB")
    assert gib < max_gib
    assert agreement >= min_agreement, f"{mode} agrees with bf16 on {agreement:.0%} of regions only"
    del engine, model
    torch.cuda.empty_cache()
