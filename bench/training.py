"""Training throughput: samples/s of LoRA and full fine-tuning on synthetic shapes (CPU by default).

    .venv/bin/python bench/training.py                     # tiny and demo presets, LoRA and full
    .venv/bin/python bench/training.py --presets demo --steps 30 --json
    python3 bench/training.py --presets osprey-7b --random-weights --modes lora --device cuda --json  # a GPU

Each run trains `--steps` optimizer steps of `--batch-size` category/attribute samples after one warm-up
step (which also fills the vision-feature cache), and reports samples/s, seconds per step and, on a GPU,
peak GPU memory. `--random-weights` first writes a checkpoint of the preset's real shapes with random
weights (bf16 on a GPU; the 7B takes ~14 GB of disk) and trains from it: same cost as the real weights.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def random_checkpoint(preset: str, device: str, out_dir: Path) -> Path:
    """A checkpoint directory of `preset`'s shapes with (seeded) random weights, for presets that mean
    released weights (osprey-7b): built on `device` in its default dtype, then saved in our format."""
    import torch

    from osprey_core.checkpoint import save_checkpoint
    from osprey_core.factory import build_model, default_dtype
    from osprey_core.tokenizer import build_tiny_tokenizer

    with torch.no_grad():
        model = build_model(preset, device=torch.device(device), dtype=default_dtype(device))
    tokenizer = build_tiny_tokenizer(model.cfg.text.vocab_size)  # LLaMA-sized ids; words are irrelevant
    save_checkpoint(model, tokenizer, out_dir)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out_dir


def bench_one(preset: str, mode: str, steps: int, batch: int, image_size: int, threads: int, device: str,
              random_weights: bool = False) -> dict:
    import torch

    from training import dataset, finetune, synthetic

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        base = str(random_checkpoint(preset, device, Path(tmp) / "base")) if random_weights else preset
        cuda = device.startswith("cuda")
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        scenes = list(synthetic.generate(8, seed=0, image_size=image_size, objects=(3, 5)))
        written = synthetic.write_images(scenes, tmp)
        exs = [r for sc, p, sha in written for r in synthetic.region_examples(sc, p, sha)]
        samples = dataset.build_samples(exs, synthetic.label_space(), tasks=("category", "attributes"), seed=0)
        times: list[float] = []
        last = [time.perf_counter()]

        def tick(step: int, total: int, loss: float) -> None:
            now = time.perf_counter()
            times.append(now - last[0])
            last[0] = now

        cfg = finetune.TrainConfig(mode=mode, steps=steps + 1, batch_size=batch, save_every=0)
        finetune.train(base, samples, Path(tmp) / "out", cfg, device=device, progress=False, on_step=tick)
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    timed = times[1:]  # the first step encodes the images
    per_step = sum(timed) / len(timed)
    return {"preset": preset, "mode": mode, "device": device, "batch_size": batch, "steps": len(timed),
            "image_size": image_size, "threads": threads, "seconds_per_step": round(per_step, 4),
            "samples_per_s": round(batch / per_step, 2), "random_weights": random_weights,
            "peak_gpu_gib": round(peak, 2) if peak is not None else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="tiny,demo")
    ap.add_argument("--modes", default="lora,full")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--random-weights", action="store_true",
                    help="train from a random-weight checkpoint of the preset's shapes (required for osprey-7b)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = [bench_one(p, m, args.steps, args.batch_size, args.image_size, args.threads, args.device,
                      args.random_weights)
            for p in args.presets.split(",") for m in args.modes.split(",")]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"{'preset':9} {'mode':5} {'device':6} {'batch':>5} {'s/step':>8} {'samples/s':>10} {'peak GiB':>9}")
        for r in rows:
            peak = "-" if r["peak_gpu_gib"] is None else f"{r['peak_gpu_gib']:.2f}"
            print(f"{r['preset']:9} {r['mode']:5} {r['device']:6} {r['batch_size']:>5} {r['seconds_per_step']:>8.4f} "
                  f"{r['samples_per_s']:>10.2f} {peak:>9}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
