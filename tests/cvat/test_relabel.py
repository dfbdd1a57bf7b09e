"""`osprey cvat relabel` against the fake CVAT (fake_cvat.py: a CVAT server needs Docker and several
services, so only the HTTP endpoints cvat-sdk touches are implemented there); the classification is the
real (tiny) engine, and the expected labels are computed here with the engine directly."""

from __future__ import annotations

import io

import numpy as np
import pytest
from cvat_sdk.masks import encode_mask

from backend.cvat.relabel import RelabelError, relabel, shape_region
from backend.service import labels as scoring
from osprey_core.proposals import ClassicalProposer
from tests.cvat.conftest import COLORS, LABELS, cvat_labels, frame
from tests.cvat.fake_cvat import TOKEN, FakeCvat


def shapes_for(frames: list[np.ndarray]) -> list[dict]:
    """Each frame's objects drawn in CVAT as a mask, a polygon and a rectangle, all labeled 'circle' with
    color 'red', plus an ellipse and a point (points are not regions and must be left alone)."""
    shapes, ident = [], 1
    for f, img in enumerate(frames):
        regions = [p.region for p in ClassicalProposer().propose(img)]
        for k, r in enumerate(regions):
            x0, y0, x1, y1 = r.bbox
            if k == 0:
                kind, points = "mask", encode_mask(r.mask, bbox=[x0, y0, x1, y1])
            elif k == 1:
                kind, points = "polygon", [x0, y0, x1, y0, x1, y1, x0, y1]
            else:
                kind, points = "rectangle", [x0, y0, x1, y1]
            shapes.append({"id": ident, "type": kind, "frame": f, "label_id": 1, "points": [float(p) for p in points],
                           "attributes": [{"spec_id": 10, "value": "red"}]})
            ident += 1
        shapes.append({"id": ident, "type": "ellipse", "frame": f, "label_id": 1, "points": [48.0, 80.0, 56.0, 74.0],
                       "attributes": [{"spec_id": 10, "value": "red"}]})
        shapes.append({"id": ident + 1, "type": "points", "frame": f, "label_id": 1, "points": [5.0, 5.0],
                       "attributes": []})
        ident += 2
    from tests.cvat.fake_cvat import _shape_defaults

    return [_shape_defaults(s) for s in shapes]


def sdk_client(fake: FakeCvat):
    from cvat_sdk import make_client

    return make_client(fake.url, access_token=TOKEN)


def expected(engine, frames, shapes) -> dict[int, str]:
    from cvat_sdk import models

    out = {}
    for s in shapes:
        if s["type"] == "points":
            continue
        model = models.LabeledShape._from_openapi_data(**{k: v for k, v in s.items() if k != "elements"})
        region = shape_region(model, 96, 96)
        [scored] = scoring.classify(engine, frames[s["frame"]], [region], LABELS)
        out[s["id"]] = scored.label
    return out


def test_dry_run_prints_and_writes_nothing(engine):
    frames = [frame(0)]
    shapes = shapes_for(frames)
    with FakeCvat(frames, cvat_labels(), shapes) as fake, sdk_client(fake) as client:
        out = io.StringIO()
        changes = relabel(client, engine, task_id=1, dry_run=True, out=out)
        assert not [r for r in fake.requests if r[0] == "PATCH"]
        assert fake.annotations["shapes"] == shapes
        assert len(changes) == 4  # the point is not a region
        assert "would change frame 0 shape" in out.getvalue()
        assert "dry run:" in out.getvalue()


def test_relabel_task_writes_engine_labels_attributes_and_descriptions(engine):
    frames = [frame(0), frame(1)]
    shapes = shapes_for(frames)
    want = expected(engine, frames, shapes)
    labels = {lab["id"]: lab for lab in cvat_labels()}
    with FakeCvat(frames, cvat_labels(), shapes) as fake, sdk_client(fake) as client:
        relabel(client, engine, task_id=1, out=io.StringIO())
        patches = [b for b in fake.bodies if b[0] == "PATCH"]
        assert len(patches) == 1 and patches[0][1] == "/api/tasks/1/annotations/" and patches[0][2]["action"] == "update"
        after = {s["id"]: s for s in fake.annotations["shapes"]}
        before = {s["id"]: s for s in shapes}
    assert set(after) == set(before)
    for ident, label in want.items():
        s = after[ident]
        lab = labels[s["label_id"]]
        assert lab["name"] == label
        assert s["points"] == before[ident]["points"] and s["type"] == before[ident]["type"]
        values = {a["spec_id"]: a["value"] for a in s["attributes"]}
        ids = {a["name"]: a["id"] for a in lab["attributes"]}
        assert values[ids["color"]] in COLORS and isinstance(values[ids["description"]], str)
    point = next(s for s in shapes if s["type"] == "points")
    assert after[point["id"]] == point


def test_relabel_job_and_keep_labels(engine):
    frames = [frame(2)]
    shapes = shapes_for(frames)
    with FakeCvat(frames, cvat_labels(), shapes) as fake, sdk_client(fake) as client:
        changes = relabel(client, engine, job_id=7, keep_labels=True, out=io.StringIO())
        assert ("GET", "/api/jobs/7/annotations/") in fake.requests
        assert all(c.new_label == c.old_label == "circle" for c in changes)
        assert all(s["label_id"] == 1 for s in fake.annotations["shapes"])
        described = [s for s in fake.annotations["shapes"] if any(a["spec_id"] == 11 for a in s["attributes"])]
        assert len(described) == 4


def test_exactly_one_of_task_or_job(engine):
    with pytest.raises(RelabelError, match="exactly one"):
        relabel(None, engine, task_id=1, job_id=7)
    with pytest.raises(RelabelError, match="exactly one"):
        relabel(None, engine)
