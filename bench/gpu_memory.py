"""GPU memory and speed per deployment configuration: the 7B in bf16, 8-bit and 4-bit NF4, alone and
next to SAM ViT-B / ViT-H, with classification regions/s, description tokens/s and the 8/4-bit top-1
agreement with bf16. The numbers behind docs/gpu.md (run by bench/gpu_check.sh).

Random weights of the official shapes (nothing downloads): memory and speed are those of the real
checkpoint; the agreement is measured with the region embeddings amplified as in tests/core/test_gpu.py
(random weights otherwise answer the same label for every region, which would agree trivially).

    python bench/gpu_memory.py               # needs CUDA and bitsandbytes for 8bit/4bit
    python bench/gpu_memory.py --json --modes bf16,4bit --sam none,vit_b
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from osprey_core import conversation as conv  # noqa: E402
from osprey_core.engine import RegionEngine  # noqa: E402
from osprey_core.factory import build_model  # noqa: E402
from osprey_core.tokenizer import build_tiny_tokenizer  # noqa: E402

LABELS = ["person", "car", "dog", "cat", "bicycle", "bus", "truck", "traffic light", "tree", "building",
          "sky", "road", "grass", "bird", "horse", "boat", "chair", "table", "bottle", "red cup"]
GIB = 2**30


def regions_512(k: int, seed: int = 0):
    """A 512x512 image and k boxes on a grid (each region sees different features)."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 255, (512, 512, 3), dtype=np.uint8)
    side = int(np.ceil(np.sqrt(k)))
    cell = 512 // side
    masks = []
    for i in range(k):
        x0 = (i % side) * cell + int(rng.integers(0, cell // 4))
        y0 = (i // side) * cell + int(rng.integers(0, cell // 4))
        m = np.zeros((512, 512), bool)
        m[y0 : y0 + int(rng.integers(cell // 4, cell // 2)), x0 : x0 + int(rng.integers(cell // 4, cell // 2))] = True
        masks.append(m)
    return image, masks


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return min(times)


def load(mode: str):
    model = build_model("osprey-7b", device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():  # see the module docstring
        model.mask_extractor.feat_linear.weight.mul_(60)
        model.mask_extractor.mask_linear.layers[2].weight.mul_(60)
    if mode != "bf16":
        from osprey_core.quantize import quantize_model

        quantize_model(model, mode, "cuda")
    gc.collect()
    torch.cuda.empty_cache()
    return model


def measure(mode: str, sams: list[str], args, bf16_labels: list[str] | None) -> tuple[dict, list[str]]:
    torch.cuda.reset_peak_memory_stats()
    model = load(mode)
    tok = build_tiny_tokenizer(model.cfg.text.vocab_size)
    engine = RegionEngine(model, tok, model_version=f"7b-{mode}")
    weights = torch.cuda.memory_allocated() / GIB
    image, masks = regions_512(args.regions)
    labels = LABELS[: args.labels]
    engine.classify(image, masks, labels)  # warm-up

    def classify(engine=engine):
        engine.clear_caches()
        return engine.classify(image, masks, labels)

    torch.cuda.reset_peak_memory_stats()
    t_cls = best_of(classify, args.repeats)
    res = classify()
    answers = [r.label for r in res]
    question = conv.description_question("short")
    engine.clear_caches()
    torch.cuda.synchronize()
    t = time.perf_counter()
    texts = engine.generate(image, masks, question, max_new_tokens=args.max_new_tokens)
    torch.cuda.synchronize()
    t_gen = time.perf_counter() - t
    tokens = sum(min(args.max_new_tokens, len(tok.encode(x, add_special_tokens=False)) + 1) for x in texts)
    peak_osprey = torch.cuda.max_memory_allocated() / GIB
    row = {
        "mode": mode, "weights_gib": round(weights, 2), "peak_gib": round(peak_osprey, 2),
        # what the GPU shows in use (allocator reserve + CUDA context), the number a card must hold
        "device_used_gib": round(_device_used_gib(torch), 2),
        "classify_regions": len(masks), "classify_labels": len(labels),
        "classify_s": round(t_cls, 4), "regions_per_s": round(len(masks) / t_cls, 1),
        "describe_regions": len(masks), "describe_tokens": tokens, "describe_s": round(t_gen, 3),
        "tokens_per_s": round(tokens / t_gen, 1), "distinct_labels": len(set(answers)),
        "max_packed_tokens": engine.max_packed_tokens,
    }
    if bf16_labels is not None:
        row["top1_agreement_with_bf16"] = round(float(np.mean([a == b for a, b in zip(answers, bf16_labels,
                                                                                        strict=True)])), 3)
    row["with_sam"] = {}
    for sam_type in sams:
        if sam_type == "none":
            continue
        from osprey_core.sam import SamRefiner, build_sam

        torch.cuda.reset_peak_memory_stats()
        sam = build_sam(sam_type).to("cuda").eval()
        refiner = SamRefiner.from_model(sam)
        refiner.box_to_mask(np.zeros((768, 1024, 3), np.uint8) + 127, (100, 100, 400, 300))
        classify()  # Osprey's peak while SAM is resident
        total = torch.cuda.max_memory_allocated() / GIB
        row["with_sam"][sam_type] = {"peak_gib": round(total, 2), "device_used_gib": round(_device_used_gib(torch), 2),
                                     "sam_weights_gib": round(sum(p.numel() * p.element_size()
                                                                  for p in sam.parameters()) / GIB, 2)}
        del refiner, sam
        gc.collect()
        torch.cuda.empty_cache()
    del classify, engine, model
    gc.collect()
    torch.cuda.empty_cache()
    return row, answers


def _device_used_gib(torch) -> float:
    """Memory in use on the device as the driver counts it (nvidia-smi's number: every process on it)."""
    free, total = torch.cuda.mem_get_info()
    return (total - free) / GIB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default="bf16,8bit,4bit")
    ap.add_argument("--sam", default="none,vit_b,vit_h")
    ap.add_argument("--regions", type=int, default=16)
    ap.add_argument("--labels", type=int, default=20)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/gpu_memory.py needs a CUDA GPU")
    torch.set_grad_enabled(False)
    modes = args.modes.split(",")
    sams = args.sam.split(",")
    rows, bf16_labels = [], None
    for mode in modes:
        try:
            row, answers = measure(mode, sams, args, bf16_labels if mode != "bf16" else None)
        except Exception as e:  # e.g. bitsandbytes missing: report it, measure the rest
            row, answers = {"mode": mode, "error": f"{type(e).__name__}: {e}"}, None
        if mode == "bf16":
            bf16_labels = answers
        rows.append(row)
        if not args.json:
            print(json.dumps(row), flush=True)
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d", time.gmtime()), "rows": rows}
    try:
        import bitsandbytes

        result["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        result["bitsandbytes"] = None
    print(json.dumps(result))


if __name__ == "__main__":
    main()
