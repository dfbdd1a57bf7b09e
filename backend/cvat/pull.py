"""`osprey cvat pull --task ID`: the shapes people drew or fixed in CVAT, into the corrections store.

The learning loop trains on the corrections store (training/store.py); Label Studio feeds it through its
webhook and sync, CVAT through this pull (CVAT has webhooks too, but a pull repairs anything a missed event
lost, so it is the one path). Each frame of the task becomes one store task (`<task>/<frame>`, its image
kept content-addressed by the store), each mask / polygon / rectangle / ellipse one region at frame size
with its label, its `select`/`radio`/`checkbox` attributes and the text attribute named `description` as
the short description. A shape whose `source` is "auto" came from a model function (auto-annotation,
ours included) and is what the model said, not a correction: it is skipped unless `--include-auto`. A pull
makes the store match CVAT: shapes deleted in CVAT go, frames left without shapes go.
"""

from __future__ import annotations

import argparse
import io
from typing import Any

from backend.cvat.relabel import DESCRIPTION_ATTRIBUTE, SHAPE_TYPES, make_client, shape_region

MODEL_SOURCES = ("auto",)  # a model's shape; "semi-auto" is a person guiding a tool (clicks), kept


def _value(x: Any) -> str:
    return str(x.value if hasattr(x, "value") else x)


def shape_record(shape: Any, label: Any, width: int, height: int, task_id: int) -> dict[str, Any] | None:
    """One CVAT shape as the store's region dict; None when it is not a region or covers nothing."""
    region = shape_region(shape, width, height)
    if region is None or not region.mask.any():
        return None
    specs = {a.id: a for a in (label.attributes or [])}
    attributes: dict[str, list[str]] = {}
    short = None
    for given in shape.attributes or []:
        spec = specs.get(given.spec_id)
        if spec is None or given.value in (None, ""):
            continue
        if spec.name == DESCRIPTION_ATTRIBUTE:
            short = str(given.value)
        elif _value(spec.input_type) in ("select", "radio", "checkbox"):
            attributes.setdefault(spec.name, []).append(str(given.value))
    return {"annotation_id": f"cvat-task-{task_id}", "region_id": f"shape-{shape.id}",
            "rle": region.to_coco_rle(), "labels": [label.name], "attributes": attributes, "short": short}


def pull(client: Any, store: Any, task_id: int, *, project: str | None = None,
         include_auto: bool = False) -> dict[str, Any]:
    """Make the store's project (default `cvat-<task>`) hold exactly the task's shapes; returns counts."""
    from PIL import Image

    project = project or f"cvat-{task_id}"
    task = client.tasks.retrieve(task_id)
    labels = {lab.id: lab for lab in task.get_labels()}
    shapes = [s for s in task.get_annotations().shapes if _value(s.type) in SHAPE_TYPES
              and (include_auto or _value(getattr(s, "source", "manual")) not in MODEL_SOURCES)]
    by_frame: dict[int, list[Any]] = {}
    for s in shapes:
        by_frame.setdefault(int(s.frame), []).append(s)
    totals = {"project": project, "frames": 0, "regions": 0, "inserted": 0, "updated": 0, "deleted": 0,
              "skipped": 0}
    kept: list[str] = []
    for frame, frame_shapes in sorted(by_frame.items()):
        data = task.get_frame(frame, quality="original").read()
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
        regions = []
        for s in frame_shapes:
            label = labels.get(s.label_id)
            record = shape_record(s, label, width, height, task_id) if label is not None else None
            if record is None:
                totals["skipped"] += 1
            else:
                regions.append(record)
        if not regions:
            continue
        put = store.images().put_bytes(data)
        store_task = f"{task_id}/{frame}"
        result = store.upsert_task(project, store_task, image_ref=f"cvat://task/{task_id}/frame/{frame}",
                                   image_sha256=put.sha256, image_path=str(put.path), regions=regions,
                                   width=width, height=height)
        kept.append(store_task)
        totals["frames"] += 1
        totals["regions"] += len(regions)
        totals["inserted"] += result.inserted
        totals["updated"] += result.updated
        totals["deleted"] += result.deleted
    totals["frames_removed"] = store.prune_tasks(project, kept)
    return totals


def register(csub: Any) -> None:
    """Add `cvat pull` under `osprey cvat`."""
    p = csub.add_parser("pull", help="copy a CVAT task's shapes (the corrections) into the corrections store")
    p.add_argument("--task", type=int, required=True, help="CVAT task id")
    p.add_argument("--project", help="store project id (default: cvat-<task>)")
    p.add_argument("--include-auto", action="store_true",
                   help="also take the shapes a model function made (CVAT source 'auto')")
    p.add_argument("--server-host", help="CVAT URL (CVAT_URL)")
    p.add_argument("--auth", help="user:password (default: CVAT_ACCESS_TOKEN)")


def run(args: argparse.Namespace, settings: Any) -> int:
    import json
    import os

    from training.store import Store

    store = Store(model_dir=settings.model_dir)  # DATABASE_URL when set, like the Label Studio sync
    try:
        with make_client(args.server_host or os.environ.get("CVAT_URL"), args.auth) as client:
            print(json.dumps(pull(client, store, args.task, project=args.project, include_auto=args.include_auto)))
    finally:
        store.close()
    return 0

