"""Classification throughput: the engine against the original code path, measured side by side.

plain  = per region: preprocess + encode the image, splice the full category prompt, greedy-generate
         the answer with a KV cache (the original `generate()` loop; capped at the longest label's
         token count + 1 so a random model cannot run to 1,024 tokens).
engine = RegionEngine.classify(image, K regions, L labels) from a cold cache (the image is encoded
         inside the timed call), every region × label scored on one cached prefix.

    python bench/engine_throughput.py                    # tiny preset, CPU
    python bench/engine_throughput.py --json
    python bench/engine_throughput.py --preset osprey-7b --random-weights --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
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
from osprey_core.reference import plain_generate  # noqa: E402
from osprey_core.tokenizer import build_tiny_tokenizer, continuation_ids, tokenizer_image_token  # noqa: E402

LABELS = ["person", "car", "dog", "cat", "bicycle", "bus", "truck", "traffic light", "tree", "building",
          "sky", "road", "grass", "bird", "horse", "boat", "chair", "table", "bottle", "red cup"]


def make_inputs(k: int, width: int = 640, height: int = 480, seed: int = 0):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    masks = []
    for _ in range(k):
        x0, y0 = rng.integers(0, width - 64), rng.integers(0, height - 64)
        w, h = rng.integers(16, 64), rng.integers(16, 64)
        m = np.zeros((height, width), bool)
        m[y0 : y0 + h, x0 : x0 + w] = True
        masks.append(m)
    return image, masks


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int) -> float:
    """Best of `repeats` (as timeit does): the least disturbed run on a shared machine, same rule both sides."""
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--random-weights", action="store_true",
                    help="random weights of the preset's real shapes (required for osprey-7b; tiny is always random)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--regions", default="1,4,16,64")
    ap.add_argument("--labels", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--plain-max-regions", type=int, default=16,
                    help="plain path: time at most this many regions and extrapolate linearly (it is per-region)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    if args.preset != "tiny" and not args.random_weights:
        ap.error(f"--preset {args.preset} has no weights here: pass --random-weights (same shapes, same cost)")
    device = torch.device(args.device)
    torch.set_grad_enabled(False)
    engine = random_engine(args.preset, device, args.dtype)
    model, tokenizer = engine.model, engine.tokenizer
    labels = LABELS[: args.labels]
    question = conv.category_question()
    text = conv.chat_prompt(question)
    ids = tokenizer_image_token(text, tokenizer)
    cap = max(len(continuation_ids(tokenizer, ids, text, lab)) for lab in labels)

    rows = []
    image, masks = make_inputs(1)
    engine.classify(image, masks, labels)  # warm-up (allocator, kernels)
    plain_generate(model, tokenizer, image, masks[0], question, cap)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for k in [int(x) for x in args.regions.split(",")]:
        image, masks = make_inputs(k, seed=k)

        n_plain = min(k, args.plain_max_regions)

        def run_engine(image=image, masks=masks):
            engine.clear_caches()
            engine.classify(image, masks, labels)

        def run_plain(image=image, masks=masks[:n_plain]):
            for m in masks:
                plain_generate(model, tokenizer, image, m, question, cap)

        t_engine = timed(run_engine, device, args.repeats)
        t_plain = timed(run_plain, device, args.repeats) * k / n_plain
        rows.append({"regions": k, "labels": len(labels), "plain_s": t_plain, "engine_s": t_engine,
                     "plain_regions_per_s": k / t_plain, "engine_regions_per_s": k / t_engine,
                     "speedup": t_plain / t_engine, "plain_extrapolated": n_plain < k})
    result = {"preset": args.preset, "device": str(device), "dtype": str(model.dtype), "plain_max_new_tokens": cap,
              "rows": rows, "torch": torch.__version__, "threads": torch.get_num_threads()}
    if device.type == "cuda":
        result["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        result["gpu"] = torch.cuda.get_device_name()
    if args.json:
        print(json.dumps(result))
        return
    print(f"preset={args.preset} device={device} dtype={model.dtype} labels={len(labels)} plain cap={cap} tokens")
    print(f"{'K':>4} {'plain reg/s':>12} {'engine reg/s':>13} {'speedup':>8}")
    for r in rows:
        star = "*" if r["plain_extrapolated"] else ""
        print(f"{r['regions']:>4} {r['plain_regions_per_s']:>12.2f}{star:1} {r['engine_regions_per_s']:>12.2f} "
              f"{r['speedup']:>8.1f}x")
    if any(r["plain_extrapolated"] for r in rows):
        print(f"* plain timed on {args.plain_max_regions} regions, per-region cost extrapolated")
    if "peak_gpu_memory_gib" in result:
        print(f"peak GPU memory {result['peak_gpu_memory_gib']:.2f} GiB on {result['gpu']}")


def random_engine(preset: str, device: str | torch.device, dtype: str | None = None,
                  max_new_tokens: int = 64) -> RegionEngine:
    """An engine over random weights of `preset`'s real shapes (no download; same cost as the real model)."""
    model = build_model(preset, device=torch.device(device), dtype=dtype)
    tokenizer = build_tiny_tokenizer(model.cfg.text.vocab_size) if preset == "tiny" else _llama_like_tokenizer(model)
    # random weights of a fixed seed: a label, not a content hash (hashing the 7B would add ~1 min here)
    return RegionEngine(model, tokenizer, model_version=f"{preset}-random-seed0", max_new_tokens=max_new_tokens)


def _llama_like_tokenizer(model):
    """The 7B benchmark needs 32000-id text: the tiny BPE grown to the LLaMA vocabulary size (random
    weights make the actual words irrelevant; sequence lengths match the real prompt within a few %)."""
    return build_tiny_tokenizer(model.cfg.text.vocab_size)


if __name__ == "__main__":
    main()
