"""What one retrain on the new class (the cross) does to the shipped demo model, without the stack: the
learning loop's 50 corrected images (tests/demo/test_demo_loop.py's seed 4242), the pipeline's own split,
`training.finetune.train` with the given settings (default: `DEMO_TRAINING_ENV`, what `osprey run` retrains the
demo model with), then the gate's per-label accuracy on the held-out corrections and the per-shape accuracy on
held-out seed 7001 with crosses. The numbers in docs/demo.md ("The learning loop on the demo") come from this
script; `--model DIR` measures another base (e.g. one built by `osprey demo-model --out DIR`).

    .venv/bin/python bench/demo_retrain.py [--steps N] [--lr X] [--replay 0] [--repeat 1] [--vision] [--json]

--replay N adds the base world's first N training images (seed 0, no crosses) to the training samples;
--repeat K repeats the corrections' samples K times; --vision also trains the vision tower.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from training import demo_model, synthetic  # noqa: E402

ENV = demo_model.DEMO_TRAINING_ENV
TASKS = tuple(ENV["OSPREY_TRAIN_TASKS"].split(","))
CONFUSED = (demo_model.NEW_CLASS, "circle", "heart", "star")  # shown by size


def corrections(out: Path, n: int = 50, seed: int = 4242) -> list:
    scenes = demo_model.new_class_scenes(n, seed)
    return [dataclasses.replace(e, attributes={"color": e.attributes["color"]})
            for scene, path, sha in synthetic.write_images(scenes, out)
            for e in synthetic.region_examples(scene, path, sha)]


def confusion(engine, examples: list, labels) -> dict[str, dict[str, int]]:
    """true shape (size) -> {answered label: count}, for the CONFUSED shapes."""
    from training.evaluate import _load, _region

    by_image: dict[str, list] = defaultdict(list)
    for e in examples:
        if e.category in CONFUSED:
            by_image[e.image].append(e)
    out: dict[str, Counter] = defaultdict(Counter)
    for group in by_image.values():
        answers = engine.classify(_load(group[0]), [_region(e) for e in group], list(labels.categories))
        for e, c in zip(group, answers, strict=True):
            out[f"{e.category} ({e.attributes['size'][0]})"][c.label] += 1
    return {k: dict(v) for k, v in sorted(out.items())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(demo_model.SHIPPED_DIR), help="base model directory")
    parser.add_argument("--steps", type=int, default=int(ENV["OSPREY_TRAIN_STEPS"]))
    parser.add_argument("--lr", type=float, default=float(ENV["OSPREY_TRAIN_LR"]))
    parser.add_argument("--batch-size", type=int, default=int(ENV["OSPREY_TRAIN_BATCH_SIZE"]))
    parser.add_argument("--replay", type=int, default=0, help="base-world images mixed in")
    parser.add_argument("--repeat", type=int, default=1, help="times each correction sample is repeated")
    parser.add_argument("--vision", action="store_true", help="also train the vision tower")
    parser.add_argument("--train-fit", action="store_true", help="also report accuracy on the trained-on split")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()

    import torch

    from osprey_core import load_engine
    from training.dataset import build_samples, split_by_image
    from training.evaluate import evaluate
    from training.finetune import TrainConfig, train

    torch.manual_seed(0)
    labels = demo_model.label_space()
    with tempfile.TemporaryDirectory(prefix="osprey-retrain-") as tmp:
        work = Path(tmp)
        train_ex, held = split_by_image(corrections(work / "corrections"), float(ENV["OSPREY_TRAIN_HELD_OUT"]), 0)
        samples = build_samples(train_ex, labels, tasks=TASKS, seed=0) * args.repeat
        if args.replay:
            samples += build_samples(demo_model.world_examples(work / "replay", args.replay, 0), labels,
                                     tasks=TASKS, seed=0)
        started = time.perf_counter()
        result = train(args.model, samples, work / "candidate", TrainConfig(
            mode="full", lr=args.lr, steps=args.steps, batch_size=args.batch_size, seed=0, save_every=0,
            train_vision=args.vision), device="cpu", progress=not args.json)
        seconds = time.perf_counter() - started

        def per_label(engine, examples: list) -> dict[str, float]:
            metrics = evaluate(engine, examples, labels, descriptions=False).to_dict()
            return {k: v["accuracy"] for k, v in metrics["per_label"].items()}

        candidate = load_engine(str(work / "candidate"), device="cpu")
        gate = {"current": per_label(load_engine(args.model, device="cpu"), held), "candidate": per_label(candidate, held)}
        if args.train_fit:
            gate["candidate_on_train_split"] = per_label(candidate, train_ex)
        seven = demo_model.world_examples(work / "held", 40, demo_model.HELD_OUT_SEED, demo_model.WORLD_SHAPES,
                                          ("color", "size"))
        report = demo_model.accuracy(candidate, seven, labels, descriptions=False)
        out = {"settings": vars(args), "train_regions": len(train_ex), "held_regions": len(held),
               "samples": len(samples), "train_seconds": round(seconds, 1),
               "loss": [round(result.losses[0], 3), round(result.final_loss, 3)], "gate": gate,
               "seed_7001": {k: v["category"] for k, v in report["per_shape"].items()},
               "seed_7001_confusion": confusion(candidate, seven, labels)}
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"{out['train_regions']} regions trained on, {out['held_regions']} held out; {out['samples']} samples; "
          f"{out['train_seconds']} s; loss {out['loss'][0]} -> {out['loss'][1]}")
    if "candidate_on_train_split" in gate:
        print("candidate on its training split:", {k: round(v, 2) for k, v in gate["candidate_on_train_split"].items()})
    print(f"{'label':<10} {'gate current':>12} {'gate cand.':>10} {'seed 7001':>9}")
    for label in labels.categories:
        cur, cand, seven_acc = gate["current"].get(label), gate["candidate"].get(label), out["seed_7001"].get(label)
        cells = ["-" if v is None else f"{v:.0%}" for v in (cur, cand, seven_acc)]
        print(f"{label:<10} {cells[0]:>12} {cells[1]:>10} {cells[2]:>9}")
    for shape, answers in out["seed_7001_confusion"].items():
        print(f"  {shape}: {answers}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
