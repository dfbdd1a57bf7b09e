"""Auto-labeling throughput by stage: proposals, classification (category + attributes), descriptions.

Images are the synthetic shapes scenes (training/synthetic.py, exact masks), so the proposer's recall and
precision at IoU >= 0.5 are printed too. The model is the tiny random-weight preset on CPU by default
(`--model osprey-7b --random-weights --device cuda --dtype bfloat16` for the 7B shapes on a GPU: random
weights of the real shapes, no download; `bench/gpu_check.sh` runs it). Stages are timed separately on the same
proposals: `proposals` (proposer + filter), `classify` (category + attribute scoring), `describe`
(short descriptions). Prints a table; `--json` prints one JSON object instead.

    .venv/bin/python bench/autolabel.py --images 8 --threads 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2, help="torch threads on CPU (default 2)")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--random-weights", action="store_true",
                    help="random weights of --model's real shapes, e.g. osprey-7b on a GPU (no download)")
    ap.add_argument("--dtype", default=None, help="model dtype, e.g. bfloat16 on a GPU")
    ap.add_argument("--sam-checkpoint", help="use SAM's automatic mask generator for proposals")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import torch

    from backend.service.predict import predict_regions
    from backend.service.tasks import Attribute, Category, Description, Plan, RegionSpec
    from osprey_core import load_engine
    from osprey_core.proposals import build_proposer, mask_iou
    from training.synthetic import COLOURS, SHAPES, SIZES, generate

    torch.set_num_threads(args.threads)
    if args.random_weights:
        from engine_throughput import random_engine

        engine = random_engine(args.model, args.device, args.dtype, args.max_new_tokens)
    else:
        engine = load_engine(args.model, device=args.device, dtype=args.dtype, max_new_tokens=args.max_new_tokens)
    proposer = build_proposer(args.sam_checkpoint, device=args.device)
    scenes = list(generate(args.images, seed=3, image_size=args.size))
    classify_plan = Plan(categories=(Category("category", SHAPES),),
                         attributes=(Attribute("color", tuple(COLOURS)), Attribute("size", SIZES)))
    describe_plan = Plan(descriptions=(Description("caption", "short"),))

    # Warm-up on a first image (model kernels, caches) so the stages measure steady state.
    warm = scenes[0].image
    props = proposer.propose(warm)
    if props:
        spec = [RegionSpec("w", {"kind": "rle", **props[0].region.to_coco_rle()}, args.size, args.size,
                           categories=("category",))]
        predict_regions(engine, warm, classify_plan, spec)
        engine.clear_caches()

    t = {"proposals": 0.0, "classify": 0.0, "describe": 0.0}
    regions = hits = truths = good = 0
    for scene in scenes:
        img = scene.image
        s0 = time.perf_counter()
        props = proposer.propose(img)
        s1 = time.perf_counter()
        specs = [RegionSpec(f"r{k}", {"kind": "rle", **p.region.to_coco_rle()}, args.size, args.size,
                            categories=("category",)) for k, p in enumerate(props)]
        if specs:
            predict_regions(engine, img, classify_plan, specs)
        s2 = time.perf_counter()
        if specs:
            predict_regions(engine, img, describe_plan, specs)
        s3 = time.perf_counter()
        t["proposals"] += s1 - s0
        t["classify"] += s2 - s1
        t["describe"] += s3 - s2
        regions += len(props)
        truths += len(scene.objects)
        hits += sum(any(mask_iou(o.mask, p.region.mask) >= 0.5 for p in props) for o in scene.objects)
        good += sum(any(mask_iou(o.mask, p.region.mask) >= 0.5 for o in scene.objects) for p in props)
    n = len(scenes)
    total = sum(t.values())
    out = {
        "model": args.model + (" (random weights)" if args.random_weights else ""), "device": args.device,
        "dtype": str(engine.model.dtype), "threads": args.threads, "images": n, "image_size": args.size,
        "proposer": "sam" if args.sam_checkpoint else "classical", "regions": regions,
        "regions_per_image": regions / n, "recall_iou50": hits / max(truths, 1), "precision_iou50": good / max(regions, 1),
        "stages": {k: {"seconds": v, "images_per_s": n / v if v else None,
                       "regions_per_s": regions / v if v else None} for k, v in t.items()},
        "total": {"seconds": total, "images_per_s": n / total, "regions_per_s": regions / total},
    }
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"{n} images {args.size}px, {regions} regions ({regions / n:.1f}/image), proposer {out['proposer']}, "
          f"model {args.model} on {args.device} ({args.threads} threads)")
    print(f"proposal recall@IoU0.5 {out['recall_iou50']:.3f}  precision {out['precision_iou50']:.3f}")
    print(f"{'stage':<10} {'seconds':>8} {'images/s':>9} {'regions/s':>10}")
    for k, v in {**out["stages"], "total": out["total"]}.items():
        print(f"{k:<10} {v['seconds']:>8.2f} {v['images_per_s']:>9.2f} {v['regions_per_s']:>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
