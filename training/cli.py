"""`osprey train`: argparse wiring for the fine-tuning command (`osprey demo-data` is training/demo_model.py's).

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


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return _train(args)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="osprey")
    register(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
