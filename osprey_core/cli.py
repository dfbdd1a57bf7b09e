"""`osprey predict`: category, attributes and descriptions for regions of one image, from the shell."""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
from PIL import Image

from .errors import OspreyError


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="osprey predict", description=__doc__)
    p.add_argument("image", help="image file")
    p.add_argument("--mask", action="append", default=[], help="mask PNG at image size (nonzero = region); repeatable")
    p.add_argument("--box", action="append", default=[], help="x0,y0,x1,y1 in pixels; SAM-refined when --sam is set")
    p.add_argument("--point", action="append", default=[], help="x,y in pixels; SAM-refined when --sam is set")
    p.add_argument("--labels", help="comma-separated label set for classification")
    p.add_argument("--attribute", action="append", default=[], help="name=value1,value2 (repeatable)")
    p.add_argument("--describe", choices=["short", "detailed"], help="generate a description")
    p.add_argument("--ask", help="free question; <region> marks the region")
    p.add_argument("--model", default="tiny", help="preset, checkpoint directory or Hugging Face repo id")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None)
    p.add_argument("--quantization", choices=["8bit", "4bit"], help="bitsandbytes 8-bit / 4-bit NF4 (CUDA only)")
    p.add_argument("--vision-tower-file", help="open_clip ConvNeXt-L weights for a checkpoint that lacks them")
    p.add_argument("--sam", default=None, help="SAM checkpoint for --box/--point")
    p.add_argument("--sam-type", default="vit_b")
    p.add_argument("--max-new-tokens", type=int, default=64)
    return p


def _regions(args, image: Image.Image):
    from .regions import Region

    w, h = image.size
    refiner = None
    if args.sam and (args.box or args.point):
        from .sam import build_refiner

        refiner = build_refiner(args.sam, args.sam_type, args.device)
    regions = []
    for path in args.mask:
        m = np.asarray(Image.open(path).convert("L"))
        regions.append(Region.from_mask(m, image_size=(w, h), id=path))
    for box in args.box:
        x0, y0, x1, y1 = _floats(box, 4, "--box")
        if refiner is not None:
            regions.append(refiner.box_to_mask(image, (x0, y0, x1, y1)).with_id(box))
        else:
            regions.append(Region.from_box(x0, y0, x1, y1, w, h, id=box))
    for point in args.point:
        x, y = _floats(point, 2, "--point")
        if refiner is not None:
            regions.append(refiner.points_to_mask(image, [(x, y)], [1]).with_id(point))
        else:
            regions.append(Region.from_point(x, y, w, h, id=point))
    if not regions:
        raise SystemExit("give at least one --mask, --box or --point")
    return regions


def _floats(text: str, n: int, flag: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != n:
        raise SystemExit(f"{flag} expects {n} comma-separated numbers, got {text!r}")
    return values


def predict_main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from . import load_engine

    try:
        image = Image.open(args.image).convert("RGB")
    except (OSError, ValueError) as e:
        print(f"error: cannot read image {args.image}: {e}", file=sys.stderr)
        return 2
    try:
        regions = _regions(args, image)
        engine = load_engine(args.model, device=args.device, dtype=args.dtype, max_new_tokens=args.max_new_tokens,
                             quantization=args.quantization, vision_tower_file=args.vision_tower_file)
        out = [{"region": r.id, "area": r.area, "bbox": list(r.bbox)} for r in regions]
        if args.labels:
            labels = [s.strip() for s in args.labels.split(",") if s.strip()]
            for o, c in zip(out, engine.classify(image, regions, labels), strict=True):
                o.update(label=c.label, score=round(c.score, 4), scores={k: round(v, 4) for k, v in c.scores.items()})
        if args.attribute:
            spec = {}
            for a in args.attribute:
                name, _, values = a.partition("=")
                spec[name.strip()] = [v.strip() for v in values.split(",") if v.strip()]
            for o, attrs in zip(out, engine.attributes(image, regions, spec), strict=True):
                o["attributes"] = {k: {"value": c.label, "score": round(c.score, 4)} for k, c in attrs.items()}
        if args.describe:
            for o, text in zip(out, engine.describe(image, regions, detail=args.describe), strict=True):
                o[f"{args.describe}_description"] = text
        if args.ask:
            for o, text in zip(out, engine.ask(image, regions, args.ask), strict=True):
                o["answer"] = text
    except (OspreyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"model_version": engine.model_version, "regions": out}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(predict_main())
