"""Could a pretrained demo tower learn the hexagon from 50 corrections? (Why the demo world has no hexagons
and the learning loop teaches the cross instead: docs/demo.md, "Why not hexagons".) Stage 0
(training/demo_tower.py) on on-the-fly hexagon-free scenes, then a logistic probe on the frozen region
features (the mask extractor's summed level projections) fitted on the base world plus the first 70 % of the
loop's corrections (tests/demo/test_demo_loop.py's seed 4242: 35 of 50 images, as many as the pipeline trains
on; not its hash split), measured per shape on held-out
seed 7001 with hexagons, circle and hexagon split by plain and textured backgrounds. `--with-hexagon`
pretrains with hexagons too: the upper bound a tower of this size reaches in the same steps.
The numbers in docs/demo.md ("Why the loop fails") come from this script.

    .venv/bin/python bench/demo_tower.py [--steps 1500] [--with-hexagon] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from training import demo_model, synthetic  # noqa: E402

HEXAGON = "hexagon"


def features(model, scenes) -> tuple[list, list[str], list[bool]]:
    import numpy as np
    import torch

    from training.demo_tower import region_features, region_pixels

    xs, ys, textured = [], [], []
    with torch.no_grad():
        for scene in scenes:
            masks = torch.from_numpy(np.stack([o.mask for o in scene.objects]))
            xs.append(region_features(model, region_pixels(scene, model.cfg.vision), masks).numpy())
            ys += [o.shape for o in scene.objects]
            textured += [not scene.background.startswith("a plain")] * len(scene.objects)
    return xs, ys, textured


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500, help="stage-0 steps")
    parser.add_argument("--with-hexagon", action="store_true", help="pretrain on all eight shapes (upper bound)")
    parser.add_argument("--base-images", type=int, default=300, help="base-world images the probe is fitted on")
    parser.add_argument("--test-images", type=int, default=150, help="held-out images (seed 7001)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()

    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression

    from osprey_core.factory import load_model
    from training.demo_tower import TowerRecipe, pretrain_tower

    torch.set_num_threads(2)
    torch.manual_seed(0)
    seven = tuple(s for s in synthetic.SHAPES if s != HEXAGON)  # the eight shapes but the hexagon
    shapes = synthetic.SHAPES if args.with_hexagon else seven
    model, _, _ = load_model("demo", device="cpu", dtype=torch.float32)
    held = list(synthetic.generate(40, seed=demo_model.HELD_OUT_SEED, shapes=shapes, **demo_model.WORLD))
    started = time.perf_counter()
    _, report = pretrain_tower(model, TowerRecipe(steps=args.steps), shapes, demo_model.WORLD, held,
                               progress=not args.json)
    stage0_s = time.perf_counter() - started
    scenes = demo_model.new_class_scenes(50, 4242, shape=HEXAGON, shapes=synthetic.SHAPES)
    corrections = scenes[: int(round((1 - float(demo_model.DEMO_TRAINING_ENV["OSPREY_TRAIN_HELD_OUT"])) * len(scenes)))]
    base = list(synthetic.generate(args.base_images, seed=0, shapes=seven, **demo_model.WORLD))
    test = list(synthetic.generate(args.test_images, seed=demo_model.HELD_OUT_SEED, **demo_model.WORLD))
    xb, yb, _ = features(model, base + corrections)
    xt, yt, tt = features(model, test)
    x_fit, x_test = np.concatenate(xb), np.concatenate(xt)
    mu, sd = x_fit.mean(0), x_fit.std(0) + 1e-6
    probe = LogisticRegression(max_iter=3000).fit((x_fit - mu) / sd, yb)
    pred = probe.predict((x_test - mu) / sd)
    per: dict[str, list[bool]] = defaultdict(list)
    split: dict[str, list[bool]] = defaultdict(list)
    for p, y, t in zip(pred, yt, tt, strict=True):
        per[y].append(p == y)
        if y in ("circle", "hexagon"):
            split[f"{y} {'textured' if t else 'plain'}"].append(p == y)
    mean = lambda v: round(float(np.mean(v)), 3)  # noqa: E731
    out = {"stage0_steps": args.steps, "stage0_seconds": round(stage0_s, 1), "with_hexagon": args.with_hexagon,
           "stage0_held_out_shape_accuracy": round(report["held_out_shape_accuracy"], 3),
           "probe_regions": len(yb), "probe_hexagons": yb.count("hexagon"), "test_regions": len(yt),
           "per_shape": {s: mean(v) for s, v in sorted(per.items())},
           "round_by_background": {k: {"accuracy": mean(v), "n": len(v)} for k, v in sorted(split.items())}}
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"stage 0: {args.steps} steps in {stage0_s:.0f} s on {'all eight' if args.with_hexagon else 'seven'} "
          f"shapes, readout {out['stage0_held_out_shape_accuracy']:.1%} on held-out seed {demo_model.HELD_OUT_SEED}")
    print(f"probe fitted on {len(yb)} regions ({out['probe_hexagons']} hexagons), tested on {len(yt)}:")
    for s, acc in out["per_shape"].items():
        print(f"  {s:<10} {acc:6.1%}")
    for k, row in out["round_by_background"].items():
        print(f"  {k:<18} {row['accuracy']:6.1%} (n={row['n']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
