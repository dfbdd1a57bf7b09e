"""`osprey train` and `osprey eval`: argparse wiring for fine-tuning and held-out evaluation
(`osprey demo-data` is training/demo_model.py's).

`register(subparsers)` adds the subcommands to the `osprey` CLI; `run(args)` executes one and returns the
exit status. `python -m training.cli train ...` works alone too, which is what
`accelerate launch --config_file deploy/accelerate/zero2.yaml -m training.cli train ...` runs on each GPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .records import LabelSpace


def register(subparsers) -> None:
    t = subparsers.add_parser("train", help="fine-tune a model on region data (LoRA or full)",
                              description="Fine-tune an Osprey model on region examples; writes a model "
                                          "directory that `load_engine` and the workers can serve.")
    t.add_argument("--base", default="demo", help="preset, model directory or adapter directory (default: demo)")
    t.add_argument("--data", action="append", required=True, metavar="FILE",
                   help="regions.jsonl (RegionExamples) or an Osprey-724K-style .json; repeatable")
    t.add_argument("--labels", metavar="FILE", help="label_space.json (categories + attributes)")
    t.add_argument("--image-root", help="folder of the images named in Osprey-724K-style JSON")
    t.add_argument("--style", default="conversation", choices=["conversation", "part_level", "short_form", "posneg"],
                   help="prompt style of the Osprey-724K-style files")
    t.add_argument("--out", required=True, help="output model directory (rerun to resume a killed run)")
    t.add_argument("--mode", choices=["lora", "full"], default="lora")
    t.add_argument("--train-vision", action="store_true",
                   help="also train the vision tower (Osprey keeps it frozen; for a tower that was never trained)")
    t.add_argument("--tasks", default="category,attributes,short,detailed,posneg",
                   help="comma-separated: category, attributes, short, detailed, posneg")
    t.add_argument("--held-out", type=float, default=0.2, help="fraction of images kept out of training")
    t.add_argument("--template-mix", type=float, default=0.0,
                   help="chance of a paper instruction template instead of the serving prompt")
    t.add_argument("--system", choices=["osprey_v1", "vicuna_v1"], default="osprey_v1")
    t.add_argument("--lr", type=float)
    t.add_argument("--steps", type=int)
    t.add_argument("--epochs", type=float, default=2.0)
    t.add_argument("--batch-size", type=int, default=4)
    t.add_argument("--grad-accum", type=int, default=1)
    t.add_argument("--warmup-ratio", type=float, default=0.03)
    t.add_argument("--lora-r", type=int, default=16)
    t.add_argument("--lora-alpha", type=int, default=32)
    t.add_argument("--save-every", type=int, default=50)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(training_command="train")

    e = subparsers.add_parser("eval", help="measure a model on held-out regions (metrics.json)",
                              description="Evaluate a model on region examples: accuracy, macro-F1, per-label "
                                          "accuracy, ECE/NLL before and after fitting the score temperature, "
                                          "both scoring rules side by side, attribute accuracy, SS and S-IoU "
                                          "of descriptions. Writes metrics.json.")
    e.add_argument("model", help="preset, model directory, adapter directory or registry version directory")
    e.add_argument("--data", action="append", required=True, metavar="FILE", help="regions.jsonl; repeatable")
    e.add_argument("--labels", metavar="FILE", help="label_space.json (default: the labels the data shows)")
    e.add_argument("--split", choices=["held-out", "all"], default="held-out",
                   help="held-out: the images `osprey train` with the same --held-out/--seed kept out (default)")
    e.add_argument("--held-out", type=float, default=0.2, help="fraction of images held out (as in train)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--no-descriptions", action="store_true", help="skip SS / S-IoU (generation is the slow part)")
    e.add_argument("--out", help="metrics.json path or folder (default: print only)")
    e.add_argument("--apply-temperature", action="store_true",
                   help="store the fitted temperature in the model directory's config (calibrated scores; "
                        "the model gets a new version id)")
    e.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(training_command="eval")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return _eval(args) if getattr(args, "training_command", "train") == "eval" else _train(args)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _train(args) -> int:
    from . import dataset, finetune, synthetic

    labels = LabelSpace.from_dict(json.loads(Path(args.labels).read_text())) if args.labels else None
    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    samples: list[dataset.Sample] = []
    held_keys: list[str] = []
    for file in args.data:
        path = Path(file)
        if path.suffix == ".jsonl":
            examples = synthetic.read_region_examples(path)
            train, held = dataset.split_by_image(examples, args.held_out, args.seed)
            held_keys += sorted({e.image_sha256 or e.image for e in held})
            samples += dataset.build_samples(train, labels, tasks, args.seed, args.template_mix)
        else:
            samples += dataset.read_osprey_json(path, args.image_root, args.style, args.seed)
    cfg = finetune.TrainConfig(
        mode=args.mode, lr=args.lr, steps=args.steps, epochs=args.epochs, batch_size=args.batch_size,
        grad_accum=args.grad_accum, warmup_ratio=args.warmup_ratio, lora_r=args.lora_r,
        lora_alpha=args.lora_alpha, system=args.system, seed=args.seed, save_every=args.save_every,
        train_vision=args.train_vision,
    )
    result = finetune.train(args.base, samples, args.out, cfg, device=args.device,
                            progress=not args.no_progress, metadata={"held_out_images": held_keys})
    print(json.dumps({"out": str(result.out_dir), "steps": result.steps, "final_loss": result.final_loss,
                      "resumed_from": result.resumed_from, "encode": result.encode}, indent=2))
    return 0


def _eval(args) -> int:
    from tqdm import tqdm

    from osprey_core import load_engine

    from . import dataset, synthetic
    from .evaluate import apply_temperature, better_scoring, evaluate, write_metrics
    from .pipeline import label_space_of

    examples = [e for file in args.data for e in synthetic.read_region_examples(file)]
    if args.split == "held-out":
        _, examples = dataset.split_by_image(examples, args.held_out, args.seed)
    labels = (LabelSpace.from_dict(json.loads(Path(args.labels).read_text())) if args.labels
              else label_space_of(examples))
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    engine = load_engine(args.model, device=device)
    bar = tqdm(desc="evaluating", unit="image", disable=args.no_progress)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    metrics = evaluate(engine, examples, labels, descriptions=not args.no_descriptions, progress=progress)
    bar.close()
    report = {"model_version": metrics.model_version, "regions": metrics.n, "accuracy": metrics.accuracy,
              "macro_f1": metrics.macro_f1, "ece_before": metrics.ece_before, "ece_after": metrics.ece_after,
              "temperature": metrics.temperature, "scoring": metrics.scoring,
              "better_scoring": better_scoring(metrics.scoring),
              "attributes": metrics.attributes, "descriptions": metrics.descriptions}
    if args.out:
        out = Path(args.out)
        report["metrics"] = str(write_metrics(metrics, out))
    if args.apply_temperature:
        report["config"] = str(apply_temperature(args.model, metrics))
    print(json.dumps(report, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="osprey")
    register(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
