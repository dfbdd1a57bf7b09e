"""`osprey autolabel IMAGES... --out coco.json`: label and describe every object of a folder of images.

Proposals (SAM with `--sam-checkpoint`/SAM_CHECKPOINT, else the classical proposer) -> categories from
`--labels`, attributes from `--attribute name=v1,v2`, short / detailed descriptions (`--describe`) through
the one neutral predict path -> COCO JSON with RLE masks; each annotation carries `score` (category
probability), `attributes` (+ `attribute_scores`), `caption` / `description` and `proposal_score`.

Resumable: every finished image is appended (and fsynced) to `<out>.partial.jsonl` before the next one
starts; a rerun after an interruption (Ctrl-C, SIGKILL, a crash) skips the images recorded there and
only writes `<out>` (atomically) when all are done. A bad image (unreadable, not an image) is reported,
recorded as skipped and does not stop the run. Images are decoded ahead in a thread while the model works
on the current one, and the regions of each image are scored in one batch.

`--labelstudio-project ID` writes the answers as predictions (brush, polygon or box regions with scores) into the tasks of
a Label Studio project instead (LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY), skipping tasks that already
have regions.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from backend.service.autolabel import AutolabelError, AutolabelOptions, autolabel_image
from backend.service.tasks import Attribute, Category, Description, Plan

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
CATEGORY = "category"
CAPTION = "caption"
DETAILED = "description"


def register(sub: Any) -> None:
    """Add `autolabel` to the `osprey` sub-commands."""
    p = sub.add_parser("autolabel", help="propose, classify and describe every object of images -> COCO JSON")
    p.add_argument("images", nargs="*", help="image files or folders (searched recursively)")
    p.add_argument("--out", help="COCO JSON to write (required unless --labelstudio-project)")
    p.add_argument("--labels", help="categories: comma-separated, or @file with one label per line (required "
                                    "unless --labelstudio-project, whose labeling config says what to predict)")
    p.add_argument("--attribute", action="append", default=[], metavar="NAME=V1,V2",
                   help="an attribute and its values (repeatable)")
    p.add_argument("--describe", choices=("none", "short", "detailed", "both"), default="short",
                   help="descriptions per object (default short)")
    p.add_argument("--labelstudio-project", type=int, help="write predictions into this Label Studio project")
    p.add_argument("--model", help="model source (OSPREY_MODEL)")
    p.add_argument("--device", help="torch device (OSPREY_DEVICE)")
    p.add_argument("--sam-checkpoint", help="SAM checkpoint for proposals (SAM_CHECKPOINT); else classical")
    p.add_argument("--max-regions", type=int, default=32, help="cap of objects per image (default 32)")
    p.add_argument("--min-area", type=float, default=0.003, help="smallest object, fraction of the image")
    p.add_argument("--max-new-tokens", type=int, help="cap on description tokens (OSPREY_MAX_NEW_TOKENS)")
    p.add_argument("--prefetch", type=int, default=4, help="images decoded ahead of the model (default 4)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def parse_labels(value: str) -> list[str]:
    if value.startswith("@"):
        text = Path(value[1:]).read_text(encoding="utf-8")
        labels = [line.strip() for line in text.splitlines()]
    else:
        labels = [v.strip() for v in value.split(",")]
    labels = list(dict.fromkeys(v for v in labels if v))
    if not labels:
        raise AutolabelError("--labels gave no label")
    return labels


def parse_attribute(value: str) -> Attribute:
    name, sep, values = value.partition("=")
    choices = tuple(dict.fromkeys(v.strip() for v in values.split(",") if v.strip()))
    if not sep or not name.strip() or len(choices) < 2:
        raise AutolabelError(f"--attribute {value!r}: expected NAME=V1,V2[,...] with at least two values")
    return Attribute(name.strip(), choices)


def build_plan(labels: Sequence[str], attributes: Sequence[Attribute], describe: str) -> Plan:
    descriptions = []
    if describe in ("short", "both"):
        descriptions.append(Description(CAPTION, "short"))
    if describe in ("detailed", "both"):
        descriptions.append(Description(DETAILED, "detailed"))
    return Plan(categories=(Category(CATEGORY, tuple(labels)),), attributes=tuple(attributes),
                descriptions=tuple(descriptions))


def find_images(paths: Sequence[str]) -> list[Path]:
    """Files as given (any suffix: a bad one is reported later), folders searched for image suffixes."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        else:
            out.append(p)
    return list(dict.fromkeys(out))


def image_key(path: Path) -> str:
    """What identifies a finished image in the journal: its resolved path, size and mtime."""
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{int(st.st_mtime_ns)}"


# ---- the journal -----------------------------------------------------------------------------------------


class Journal:
    """Append-only JSON lines, one per finished image, fsynced; a torn last line (killed mid-write) is
    ignored on reading, so the image it was about is simply done again."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.done: dict[str, dict[str, Any]] = {}
        if path.exists():
            with path.open("rb") as fh:
                for line in fh:
                    try:
                        record = json.loads(line)
                    except (json.JSONDecodeError, UnicodeDecodeError):
                        continue
                    if isinstance(record, dict) and "key" in record:
                        self.done[record["key"]] = record
        self._fh = path.open("ab")

    def add(self, record: dict[str, Any]) -> None:
        self._fh.write((json.dumps(record, separators=(",", ":")) + "\n").encode())
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self.done[record["key"]] = record

    def close(self) -> None:
        self._fh.close()


# ---- COCO ------------------------------------------------------------------------------------------------


def image_record(path: Path, key: str, result: Any, plan: Plan) -> dict[str, Any]:
    """One finished image: its size and its annotations (category name, not yet an id)."""
    anns = []
    proposals = {spec.id: p for spec, p in zip(result.specs, result.proposals, strict=True)}
    for answer in result.answers:
        proposal = proposals[answer.sources[0]]
        region = proposal.region
        x0, y0, x1, y1 = region.bbox
        cat = next((c for c in answer.categories if c[0] == CATEGORY), None)
        ann: dict[str, Any] = {
            "segmentation": region.to_coco_rle(),
            "area": int(region.area),
            "bbox": [x0, y0, x1 - x0, y1 - y0],
            "iscrowd": 0,
            "category": cat[1] if cat else None,
            "score": float(cat[2]) if cat else None,
            "proposal_score": float(proposal.score),
            "proposal_source": proposal.source,
            "attributes": {n: (v if len(v) != 1 else v[0]) for n, v, _ in answer.attributes},
            "attribute_scores": {n: float(s) for n, _, s in answer.attributes},
        }
        for name, text in answer.descriptions:
            ann[name] = text
        anns.append(ann)
    return {"key": key, "file_name": str(path), "width": result.specs[0].width if result.specs else None,
            "height": result.specs[0].height if result.specs else None, "annotations": anns,
            "timings": result.timings}


def coco_document(records: Sequence[dict[str, Any]], labels: Sequence[str], plan: Plan,
                  model_version: str) -> dict[str, Any]:
    cat_ids = {name: i + 1 for i, name in enumerate(labels)}
    images, annotations = [], []
    for image_id, rec in enumerate(records, start=1):
        images.append({"id": image_id, "file_name": rec["file_name"], "width": rec["width"],
                       "height": rec["height"]})
        for ann in rec["annotations"]:
            out = {k: v for k, v in ann.items() if k != "category"}
            out.update(id=len(annotations) + 1, image_id=image_id, category_id=cat_ids.get(ann["category"], 0))
            annotations.append(out)
    return {
        "info": {"description": "osprey autolabel", "model_version": model_version,
                 "date_created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i, "name": n, "supercategory": ""} for n, i in cat_ids.items()],
        "attributes": [{"name": a.name, "values": list(a.choices)} for a in plan.attributes],
    }


def write_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        json.dump(data, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


# ---- running ---------------------------------------------------------------------------------------------


def _load(path: Path) -> Any:
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        return im.convert("RGB")


def _prefetched(paths: Sequence[Path], ahead: int) -> Iterator[tuple[Path, Any, Exception | None]]:
    """(path, image, error) in order, decoding up to `ahead` images in a thread while the caller works."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        futures: list[Any] = []
        for i, path in enumerate(paths):
            while len(futures) < min(len(paths), i + 1 + max(0, ahead)):
                futures.append(pool.submit(_load, paths[len(futures)]))
            try:
                yield path, futures[i].result(), None
            except Exception as exc:  # reported per image: PIL raises many types for bad files
                yield path, None, exc
            futures[i] = None  # the decoded image is the caller's now


def run_autolabel(args: argparse.Namespace, settings: Any, engine: Any = None, proposer: Any = None,
                  out_stream: Any = None) -> int:
    """The command; `engine` / `proposer` may be given (tests, benches)."""
    err = out_stream or sys.stderr
    options = AutolabelOptions(max_regions=args.max_regions, min_area=args.min_area)
    if args.labelstudio_project is None:
        if not args.labels:
            raise AutolabelError("--labels is required (or --labelstudio-project)")
        labels = parse_labels(args.labels)
        plan = build_plan(labels, [parse_attribute(a) for a in args.attribute], args.describe)
        if not args.out:
            raise AutolabelError("--out is required (or --labelstudio-project)")
    if engine is None:
        from osprey_core import load_engine

        engine = load_engine(args.model or settings.osprey_model, device=args.device or settings.osprey_device,
                             dtype=settings.osprey_dtype,
                             max_new_tokens=args.max_new_tokens or settings.osprey_max_new_tokens)
    if proposer is None:
        from osprey_core.proposals import build_proposer

        sam = args.sam_checkpoint or (str(settings.sam_checkpoint) if settings.sam_checkpoint else None)
        proposer = build_proposer(sam, settings.sam_model_type, args.device or settings.osprey_device,
                                  filter=options.filter())
    if args.labelstudio_project is not None:
        from backend.cli_labelstudio_autolabel import autolabel_project

        return autolabel_project(args, settings, engine, proposer, options, err)
    paths = find_images(args.images)
    if not paths:
        raise AutolabelError("no images given (files or folders of .png/.jpg/...)")
    out = Path(args.out)
    journal = Journal(out.with_name(out.name + ".partial.jsonl"))
    todo, keys = [], {}
    for p in paths:
        try:
            keys[p] = image_key(p)
        except OSError as exc:
            print(f"skipped {p}: {exc}", file=err)
            continue
        if keys[p] not in journal.done:
            todo.append(p)
    skipped_before = len(keys) - len(todo)
    if skipped_before:
        print(f"resuming: {skipped_before} image(s) already done in {journal.path}", file=err)
    from tqdm import tqdm

    bar = tqdm(total=len(keys), initial=skipped_before, unit="image", desc="autolabel",
               disable=args.no_progress or None, file=err)
    failures = 0
    try:
        for path, image, error in _prefetched(todo, args.prefetch):
            key = keys[path]
            if error is None:
                try:
                    result = autolabel_image(engine, image, plan, proposer, options, prefix=f"{path.stem}")
                except ValueError as exc:  # the project's input errors (RegionError, ImageError...)
                    error = exc
            if error is not None:
                failures += 1
                print(f"skipped {path}: {type(error).__name__}: {error}", file=err)
                journal.add({"key": key, "file_name": str(path), "error": f"{type(error).__name__}: {error}"})
            else:
                record = image_record(path, key, result, plan)
                if record["width"] is None:
                    record["width"], record["height"] = image.size
                journal.add(record)
            bar.update(1)
    finally:
        bar.close()
        journal.close()
    records = [journal.done[keys[p]] for p in paths if p in keys and "error" not in journal.done[keys[p]]]
    failed = [journal.done[keys[p]] for p in paths if p in keys and "error" in journal.done[keys[p]]]
    doc = coco_document(records, labels, plan, getattr(engine, "model_version", "unknown"))
    doc["info"]["skipped"] = [{"file_name": r["file_name"], "error": r["error"]} for r in failed]
    write_atomic(out, doc)
    journal.path.unlink(missing_ok=True)
    n = len(doc["annotations"])
    print(f"wrote {out}: {len(records)} image(s), {n} object(s), {len(failed)} skipped", file=err)
    return 1 if failed and not records else 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m backend.cli_autolabel ...` (the same as `osprey autolabel ...`)."""
    from backend.settings import get_settings

    parser = argparse.ArgumentParser(prog="osprey")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(["autolabel", *(sys.argv[1:] if argv is None else argv)])
    try:
        return run_autolabel(args, get_settings())
    except (AutolabelError, ValueError) as exc:
        print(f"osprey autolabel: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
