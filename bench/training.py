"""Training throughput: samples/s of LoRA and full fine-tuning on synthetic shapes (CPU by default).

    .venv/bin/python bench/training.py                     # tiny and demo presets, LoRA and full
    .venv/bin/python bench/training.py --presets demo --steps 30 --json

Each run trains `--steps` optimizer steps of `--batch-size` category/attribute samples after one warm-up
step (which also fills the vision-feature cache), and reports samples/s and seconds per step.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def bench_one(preset: str, mode: str, steps: int, batch: int, image_size: int, threads: int, device: str) -> dict:
    import torch

    from training import dataset, finetune, synthetic

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
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
        finetune.train(preset, samples, Path(tmp) / "out", cfg, device=device, progress=False, on_step=tick)
    timed = times[1:]  # the first step encodes the images
    per_step = sum(timed) / len(timed)
    return {"preset": preset, "mode": mode, "device": device, "batch_size": batch, "steps": len(timed),
            "image_size": image_size, "threads": threads, "seconds_per_step": round(per_step, 4),
            "samples_per_s": round(batch / per_step, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="tiny,demo")
    ap.add_argument("--modes", default="lora,full")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = [bench_one(p, m, args.steps, args.batch_size, args.image_size, args.threads, args.device)
            for p in args.presets.split(",") for m in args.modes.split(",")]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"{'preset':8} {'mode':5} {'device':6} {'batch':>5} {'s/step':>8} {'samples/s':>10}")
        for r in rows:
            print(f"{r['preset']:8} {r['mode']:5} {r['device']:6} {r['batch_size']:>5} {r['seconds_per_step']:>8.4f} "
                  f"{r['samples_per_s']:>10.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
