"""Quantized loading on a CPU-only machine: the clear errors, and which layers get swapped.

The quantized forward itself needs CUDA (tests/core/test_gpu.py, bench/gpu_check.sh); here we check
what can be checked without it: a CPU device or an unknown mode fails before any weight is read, a
missing bitsandbytes names the extra to install, and the swap touches the decoder linears only (the
mask extractor stays fp32, lm_head / projector / vision stay in the model dtype) and keeps their values.
"""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from osprey_core import load_engine
from osprey_core.config import tiny
from osprey_core.errors import ConfigError
from osprey_core.factory import build_model, load_model
from osprey_core.quantize import (
    QuantizationError,
    check_quantization,
    quantizable_linears,
    quantization_of,
    quantize_model,
    replace_linears,
)


@pytest.mark.parametrize("mode", ["8bit", "4bit"])
def test_cpu_is_a_clear_error_before_loading(mode, tmp_path):
    # A directory that is not a checkpoint: the quantization check must fire first.
    with pytest.raises(QuantizationError, match="needs a CUDA GPU"):
        load_model(str(tmp_path), device="cpu", quantization=mode)
    with pytest.raises(QuantizationError, match="needs a CUDA GPU"):
        load_engine("tiny", device="cpu", quantization=mode)


def test_unknown_mode_and_float32_are_refused():
    with pytest.raises(QuantizationError, match="unknown quantization '3bit'"):
        check_quantization("3bit", "cuda")
    assert issubclass(QuantizationError, ConfigError)  # the backend maps ConfigError to a clear 4xx/exit
    assert check_quantization(None, "cpu") is None and check_quantization("none", "cpu") is None
    model = build_model("tiny")  # float32 on CPU
    with pytest.raises(QuantizationError):
        quantize_model(model, "4bit", "cpu")
    assert quantization_of(model) is None


def test_missing_bitsandbytes_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import now raises ImportError
    with pytest.raises(QuantizationError, match=r"osprey-labeling\[gpu\]"):
        check_quantization("4bit", "cuda")


@pytest.mark.parametrize("mode", ["8bit", "4bit"])
def test_swap_touches_the_decoder_linears_only(mode):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is in the test extra; install '.[test]'")
    cfg = tiny()
    model = build_model(cfg, dtype=torch.bfloat16)
    before = {f"{id(p)}.{n}": lin.weight.detach().clone() for p, n, lin in quantizable_linears(model)}
    per_layer = 7  # q, k, v, o, gate, up, down
    assert len(before) == per_layer * cfg.text.num_hidden_layers
    keep = {name: p.detach().clone() for name, p in model.named_parameters() if not name.startswith("model.layers.")}

    n = replace_linears(model, mode, torch.bfloat16)

    assert n == len(before)
    assert quantization_of(model) == mode
    assert not quantizable_linears(model)  # no plain nn.Linear left in the decoder layers
    swapped = [m for layer in model.model.layers for m in layer.modules()
               if type(m).__name__ in ("Linear4bit", "Linear8bitLt")]
    assert len(swapped) == n
    for m in swapped:  # still unquantized: bitsandbytes quantizes on the move to CUDA
        assert m.weight.device.type == "cpu" and not m.weight.requires_grad
    originals = list(before.values())
    for m, w in zip(swapped, originals, strict=True):
        torch.testing.assert_close(m.weight.data.to(torch.bfloat16), w, rtol=0, atol=0)
    for name, p in model.named_parameters():
        if not name.startswith("model.layers."):
            torch.testing.assert_close(p, keep[name], rtol=0, atol=0)
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.mask_extractor.parameters())
    projector = [m for m in model.model.mm_projector.modules() if isinstance(m, nn.Linear)]
    assert projector and all(type(m) is nn.Linear and m.weight.dtype == torch.bfloat16 for m in projector)


@pytest.mark.parametrize("mode, max_diff", [("8bit", 0.1), ("4bit", 0.5)])
def test_quantized_forward_stays_close_to_bf16(mode, max_diff, image, masks):
    """The swapped model really runs quantized and answers like bf16.

    bitsandbytes quantizes on a device move and has CPU kernels, so moving the swapped model to the CPU
    (which `quantize_model` refuses for users) exercises the real path end to end: the weights become
    int8 / packed NF4, torch's module move keeps the bitsandbytes parameter types, and the engine's packed
    forward runs on them. Label log-likelihoods move a little (quantization noise); an answer changes only where bf16's
    top two labels were closer than that noise.
    """
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is in the test extra; install '.[test]'")
    from osprey_core.engine import RegionEngine
    from osprey_core.tokenizer import build_tiny_tokenizer

    labels = ["cat", "dog", "red car", "person", "tree"]
    cfg = tiny()
    cfg.vision.image_size = 64
    cfg.mask.mask_shape = 16
    model = build_model(cfg, dtype=torch.bfloat16)
    tok = build_tiny_tokenizer(cfg.text.vocab_size)
    ref = RegionEngine(model, tok, model_version="bf16").classify(image, masks, labels)

    replace_linears(model, mode, torch.bfloat16)
    model.to("cpu")
    weight = model.model.layers[0].self_attn.q_proj.weight
    assert weight.dtype == (torch.int8 if mode == "8bit" else torch.uint8)
    got = RegionEngine(model, tok, model_version=mode).classify(image, masks, labels)

    diffs = [abs(a.logprobs[x] - b.logprobs[x]) for a, b in zip(ref, got, strict=True) for x in labels]
    assert 0 < max(diffs) < max_diff, f"{mode}: largest log-likelihood change {max(diffs):.4f}"
    for a, b in zip(ref, got, strict=True):  # an answer may only flip where bf16 had a near-tie
        margin = a.logprobs[a.label] - a.logprobs[b.label]
        assert b.label == a.label or margin < 2 * max(diffs), (a.label, b.label, margin)


def test_the_worker_and_osprey_predict_pass_quantization_and_the_vision_tower_file(monkeypatch, tmp_path):
    """OSPREY_QUANTIZATION / OSPREY_VISION_TOWER_FILE reach the worker's load_engine (they used to be
    dropped: no setting read them), and `osprey predict --quantization` on a CPU is a clear error, exit 2."""
    import subprocess
    import uuid

    import numpy as np
    import redis
    from PIL import Image

    import osprey_core
    from backend.queue.worker import WorkerRuntime
    from backend.settings import Settings

    seen: dict = {}
    monkeypatch.setattr(osprey_core, "load_engine", lambda source, **kw: seen.update(kw, source=source) or "engine")
    monkeypatch.setenv("OSPREY_QUANTIZATION", "4bit")
    monkeypatch.setenv("OSPREY_VISION_TOWER_FILE", str(tmp_path / "clip.bin"))
    settings = Settings(osprey_redis_prefix=f"q{uuid.uuid4().hex[:8]}")
    runtime = WorkerRuntime(settings, redis.Redis.from_url("redis://127.0.0.1:6379/0"), "w-q", origins=[])
    assert runtime._load_engine("/models/osprey-7b") == "engine"
    assert seen["quantization"] == "4bit" and str(seen["vision_tower_file"]) == str(tmp_path / "clip.bin")

    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "a.png")
    done = subprocess.run([sys.executable, "-m", "backend.cli", "predict", str(tmp_path / "a.png"), "--box",
                           "2,2,20,20", "--labels", "a,b", "--quantization", "4bit"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "CUDA" in done.stderr, done.stderr
