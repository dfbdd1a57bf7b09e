"""`osprey cvat relabel --task ID | --job ID [--dry-run]`: label the shapes already drawn in CVAT.

CVAT cannot send an existing shape to a model (cvat-ai/cvat #7902, #7721: functions get only the frame,
or points and a box), so this runs beside CVAT through cvat-sdk: read the task's (or job's) labels and
shapes, fetch each frame once, turn every mask / polygon / rectangle / ellipse into a mask, classify it
among the task's labels with the engine, then choose the new label's `select`/`radio` attributes and fill
its `text` attribute named `description` (the short description), and PATCH the changed shapes back
(`action=update`). `--dry-run` prints the changes and writes nothing. Points, skeletons and tracks are
left alone (a point is not a region). Shapes whose label the annotator already set can be kept with
`--keep-labels` (attributes and descriptions are still filled for the label they have).

Auth is cvat-cli's: CVAT_ACCESS_TOKEN (a personal access token) or `--auth user:password`; the server
is `--server-host` or CVAT_URL.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from backend.errors import InputError
from backend.service.predict import predict_regions
from backend.service.tasks import Attribute, Category, Description, Plan, RegionSpec
from osprey_core.errors import RegionError
from osprey_core.regions import Region

DESCRIPTION_ATTRIBUTE = "description"
CATEGORY = "category"
SHAPE_TYPES = ("mask", "polygon", "rectangle", "ellipse")


class RelabelError(InputError):
    """The task/job cannot be relabeled as asked (no labels, bad arguments)."""


@dataclass
class Change:
    """What relabeling does to one shape (printed by --dry-run, applied otherwise)."""

    shape_id: int
    frame: int
    old_label: str
    new_label: str
    score: float
    attributes: dict[str, tuple[str | None, str]] = field(default_factory=dict)  # name -> (old, new)

    @property
    def changed(self) -> bool:
        return self.old_label != self.new_label or any(o != n for o, n in self.attributes.values())

    def describe(self) -> str:
        parts = [f"frame {self.frame} shape {self.shape_id}: {self.old_label} -> {self.new_label} ({self.score:.2f})"]
        parts += [f"{n}: {o!r} -> {v!r}" for n, (o, v) in self.attributes.items() if o != v]
        return "; ".join(parts)


def shape_region(shape: Any, width: int, height: int) -> Region | None:
    """A CVAT shape as a mask at image size; None for shapes that are not regions (points, skeletons)."""
    from cvat_sdk.masks import decode_mask

    kind = str(shape.type.value if hasattr(shape.type, "value") else shape.type)
    pts = [float(p) for p in shape.points]
    rotation = float(getattr(shape, "rotation", 0.0) or 0.0)
    if kind == "mask":
        return Region(decode_mask([int(p) for p in pts], image_width=width, image_height=height), allow_empty=True)
    if kind == "polygon":
        return Region.from_polygon(np.asarray(pts, dtype=np.float64).reshape(-1, 2), width, height)
    if kind == "rectangle":
        x0, y0, x1, y1 = pts[:4]
        if rotation % 360 == 0:
            return Region.from_box(x0, y0, x1, y1, width, height)
        # CVAT rotates a rectangle about its centre, clockwise in image coordinates.
        cx, cy, t = (x0 + x1) / 2, (y0 + y1) / 2, np.radians(rotation)
        corners = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]]) - [cx, cy]
        rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
        return Region.from_polygon(corners @ rot.T + [cx, cy], width, height)
    if kind == "ellipse":
        # CVAT: [cx, cy, right x, top y]; rotation clockwise about the centre.
        cx, cy, rx_x, ty = pts[:4]
        return Region.from_ellipse(cx, cy, abs(rx_x - cx), abs(cy - ty), rotation, width, height)
    return None


def _label_attributes(label: Any) -> tuple[list[Attribute], Any]:
    """A CVAT label's choice attributes and its `description` text attribute (or None)."""
    attrs, text = [], None
    for a in getattr(label, "attributes", []) or []:
        kind = str(a.input_type.value if hasattr(a.input_type, "value") else a.input_type)
        if kind in ("select", "radio") and len(a.values) >= 2:
            attrs.append(Attribute(a.name, tuple(a.values)))
        elif kind == "text" and a.name == DESCRIPTION_ATTRIBUTE:
            text = a
    return attrs, text


def plan_changes(engine: Any, frames: dict[int, Any], shapes: Sequence[Any], labels: Sequence[Any],
                 keep_labels: bool = False) -> list[Change]:
    """Classify every region shape among `labels`, then predict its label's attributes and description."""
    by_id = {lab.id: lab for lab in labels}
    names = [lab.name for lab in labels]
    if not names:
        raise RelabelError("the task has no labels to choose from")
    changes: list[Change] = []
    for frame in sorted({s.frame for s in shapes}):
        image = frames[frame]
        width, height = image.size
        specs, kept = [], {}
        for s in shapes:
            if s.frame != frame:
                continue
            try:
                region = shape_region(s, width, height)
            except (RegionError, ValueError) as exc:  # degenerate or outside the frame: left alone
                print(f"shape {s.id} on frame {frame} skipped: {exc}", file=sys.stderr)
                continue
            if region is None or region.area == 0:
                continue
            rle = region.to_coco_rle()
            specs.append(RegionSpec(str(s.id), {"kind": "rle", **rle}, width, height,
                                    categories=() if keep_labels else (CATEGORY,)))
            kept[str(s.id)] = s
        if not specs:
            continue
        plan = Plan(categories=(Category(CATEGORY, tuple(names)),))
        answers = predict_regions(engine, image, plan, specs)
        new_label = {}
        for a in answers:
            shape = kept[a.sources[0]]
            cat = next((c for c in a.categories if c[0] == CATEGORY), None)
            if cat is None:
                new_label[a.sources[0]] = (by_id[shape.label_id].name, 1.0)
            else:
                new_label[a.sources[0]] = (cat[1], cat[2])
        # Attributes and descriptions of the label each shape ends up with, one predict per label.
        for name in dict.fromkeys(v[0] for v in new_label.values()):
            label = next(lab for lab in labels if lab.name == name)
            attrs, text = _label_attributes(label)
            members = [s for s in specs if new_label[s.id][0] == name]
            plan = Plan(attributes=tuple(attrs),
                        descriptions=(Description(DESCRIPTION_ATTRIBUTE, "short"),) if text is not None else ())
            answers = predict_regions(engine, image, plan, members) if (attrs or text is not None) else []
            answered = {a.sources[0]: a for a in answers}
            for spec in members:
                shape = kept[spec.id]
                old = {v.spec_id: v.value for v in shape.attributes}
                change = Change(shape.id, frame, by_id[shape.label_id].name, name, new_label[spec.id][1])
                a = answered.get(spec.id)
                if a is not None:
                    ids = {x.name: x.id for x in label.attributes}
                    for attr_name, values, _ in a.attributes:
                        prev = old.get(ids[attr_name]) if by_id[shape.label_id].name == name else None
                        change.attributes[attr_name] = (prev, values[0])
                    for attr_name, desc in a.descriptions:
                        prev = old.get(ids[attr_name]) if by_id[shape.label_id].name == name else None
                        change.attributes[attr_name] = (prev, desc[:4096])
                changes.append(change)
    return changes


def apply_changes(shapes: Sequence[Any], labels: Sequence[Any], changes: Sequence[Change]) -> list[Any]:
    """The changed shapes as full `LabeledShapeRequest`s (CVAT's update replaces the whole shape); other
    attribute values of a shape whose label did not change are kept."""
    from cvat_sdk import models

    by_name = {lab.name: lab for lab in labels}
    by_id = {s.id: s for s in shapes}
    out = []
    for change in changes:
        if not change.changed:
            continue
        shape = by_id[change.shape_id]
        label = by_name[change.new_label]
        ids = {a.name: a.id for a in (label.attributes or [])}
        values: dict[int, str] = {}
        if change.old_label == change.new_label:
            values = {v.spec_id: v.value for v in shape.attributes}
        for name, (_, value) in change.attributes.items():
            values[ids[name]] = value
        out.append(models.LabeledShapeRequest(
            id=shape.id, type=shape.type, frame=shape.frame, label_id=label.id, points=list(shape.points),
            occluded=bool(getattr(shape, "occluded", False)), outside=bool(getattr(shape, "outside", False)),
            z_order=int(getattr(shape, "z_order", 0) or 0), rotation=float(getattr(shape, "rotation", 0.0) or 0.0),
            group=getattr(shape, "group", None) or 0, source=str(getattr(shape, "source", "manual") or "manual"),
            attributes=[models.AttributeValRequest(spec_id=k, value=v) for k, v in values.items()],
        ))
    return out


def relabel(client: Any, engine: Any, *, task_id: int | None = None, job_id: int | None = None,
            dry_run: bool = False, keep_labels: bool = False, out: Any = None) -> list[Change]:
    """Relabel the shapes of a task or a job (exactly one of them); returns the planned changes."""
    from cvat_sdk import models
    from PIL import Image

    out = out or sys.stdout
    if (task_id is None) == (job_id is None):
        raise RelabelError("give exactly one of --task or --job")
    entity = client.tasks.retrieve(task_id) if task_id is not None else client.jobs.retrieve(job_id)
    labels = entity.get_labels()
    data = entity.get_annotations()
    shapes = [s for s in data.shapes if str(s.type.value) in SHAPE_TYPES]
    frames = {}
    for frame in sorted({s.frame for s in shapes}):
        with Image.open(entity.get_frame(frame, quality="original")) as im:
            frames[frame] = im.convert("RGB")
    changes = plan_changes(engine, frames, shapes, labels, keep_labels=keep_labels)
    for change in changes:
        if change.changed:
            print(("would change " if dry_run else "") + change.describe(), file=out)
    if not dry_run:
        updated = apply_changes(shapes, labels, changes)
        if updated:
            entity.update_annotations(models.PatchedLabeledDataRequest(shapes=updated))
        print(f"updated {len(updated)} of {len(shapes)} shape(s)", file=out)
    else:
        print(f"dry run: {sum(c.changed for c in changes)} of {len(shapes)} shape(s) would change", file=out)
    return changes


# ---- CLI -----------------------------------------------------------------------------------------------------


def register(sub: Any) -> None:
    """Add `cvat relabel` to the `osprey` sub-commands."""
    p = sub.add_parser("cvat", help="CVAT: relabel a task's shapes with Osprey, or pull them into the store")
    csub = p.add_subparsers(dest="cvat_command", required=True)
    r = csub.add_parser("relabel", help="classify existing CVAT shapes and write labels/attributes back")
    which = r.add_mutually_exclusive_group(required=True)
    which.add_argument("--task", type=int, help="CVAT task id")
    which.add_argument("--job", type=int, help="CVAT job id")
    r.add_argument("--dry-run", action="store_true", help="print the changes, write nothing")
    r.add_argument("--keep-labels", action="store_true", help="keep labels, fill attributes/descriptions")
    r.add_argument("--server-host", default=os.environ.get("CVAT_URL"), help="CVAT URL (CVAT_URL)")
    r.add_argument("--auth", help="user:password (default: CVAT_ACCESS_TOKEN)")
    r.add_argument("--model", help="model source (OSPREY_MODEL)")
    r.add_argument("--device", help="torch device (OSPREY_DEVICE)")
    from backend.cvat import pull

    pull.register(csub)  # osprey cvat pull --task ID: the corrections into the store


def make_client(server: str | None, auth: str | None) -> Any:
    from cvat_sdk import make_client as sdk_client

    if not server:
        raise RelabelError("no CVAT server: pass --server-host or set CVAT_URL")
    if auth:
        user, sep, password = auth.partition(":")
        if not sep:
            raise RelabelError("--auth must be user:password")
        return sdk_client(server, credentials=(user, password))
    token = os.environ.get("CVAT_ACCESS_TOKEN")
    if not token:
        raise RelabelError("no CVAT credentials: set CVAT_ACCESS_TOKEN or pass --auth user:password")
    return sdk_client(server, access_token=token)


def run(args: argparse.Namespace, settings: Any, engine: Any = None) -> int:
    if engine is None:
        from osprey_core import load_engine

        engine = load_engine(args.model or settings.osprey_model, device=args.device or settings.osprey_device,
                             max_new_tokens=settings.osprey_max_new_tokens)
    with make_client(args.server_host, args.auth) as client:
        relabel(client, engine, task_id=args.task, job_id=args.job, dry_run=args.dry_run,
                keep_labels=args.keep_labels)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m backend.cvat.relabel ...` (the same as `osprey cvat relabel ...`)."""
    from backend.settings import get_settings

    parser = argparse.ArgumentParser(prog="osprey")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(["cvat", "relabel", *(sys.argv[1:] if argv is None else argv)])
    try:
        return run(args, get_settings())
    except (RelabelError, ValueError) as exc:
        print(f"osprey cvat relabel: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

