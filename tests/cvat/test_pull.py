"""`osprey cvat pull`: a CVAT task's shapes into the corrections store, against the fake CVAT (fake_cvat.py:
a CVAT server needs Docker and several services, so only the endpoints cvat-sdk touches are implemented),
with the real store (SQLite here; the store itself is tested on PostgreSQL too in tests/training)."""

from __future__ import annotations

import numpy as np
from PIL import Image
from pycocotools import mask as coco_mask

from backend.cvat.pull import pull
from tests.cvat.conftest import cvat_labels, frame
from tests.cvat.fake_cvat import TOKEN, FakeCvat, _shape_defaults
from training.store import Store


def _shapes() -> list[dict]:
    """Frame 0: a corrected square (colour + description), an untouched model shape, a point; frame 1: a
    polygon triangle."""
    return [_shape_defaults(s) for s in [
        {"id": 1, "type": "rectangle", "frame": 0, "label_id": 2, "points": [10.0, 10.0, 30.0, 30.0],
         "attributes": [{"spec_id": 20, "value": "green"}, {"spec_id": 21, "value": "a green square"}]},
        {"id": 2, "type": "rectangle", "frame": 0, "label_id": 1, "points": [50.0, 50.0, 70.0, 70.0],
         "source": "auto", "attributes": [{"spec_id": 10, "value": "red"}]},
        {"id": 3, "type": "points", "frame": 0, "label_id": 1, "points": [5.0, 5.0]},
        {"id": 4, "type": "polygon", "frame": 1, "label_id": 3, "points": [40.0, 10.0, 60.0, 40.0, 20.0, 40.0],
         "attributes": [{"spec_id": 30, "value": "blue"}]},
    ]]


def test_pull_copies_corrections_and_follows_deletes(tmp_path):
    from cvat_sdk import make_client

    frames = [frame(0), frame(1)]
    store = Store(f"sqlite:///{tmp_path / 'c.sqlite'}", model_dir=tmp_path)
    try:
        with FakeCvat(frames, cvat_labels(), _shapes()) as fake, make_client(fake.url, access_token=TOKEN) as client:
            first = pull(client, store, 1)
            assert (first["frames"], first["regions"], first["inserted"]) == (2, 2, 2), first
            examples = {e.region_id.split("/")[-1]: e for e in store.examples("cvat-1")}
            assert set(examples) == {"shape-1", "shape-4"}  # no model shape, no point
            square = examples["shape-1"]
            assert square.category == "square" and square.attributes == {"color": ("green",)}
            assert square.short == "a green square"
            mask = coco_mask.decode(square.rle)
            assert mask.shape == (96, 96) and mask[10:30, 10:30].all() and mask.sum() <= 21 * 21
            assert np.array_equal(np.asarray(Image.open(square.image).convert("RGB")), frames[0])

            again = pull(client, store, 1)  # a replay changes nothing
            assert (again["inserted"], again["updated"], again["deleted"]) == (0, 0, 0), again

            fake.annotations["shapes"] = [s for s in fake.annotations["shapes"] if s["id"] != 4]
            fake.annotations["shapes"][0]["label_id"] = 3  # the square re-labelled a triangle in CVAT
            third = pull(client, store, 1)
            assert third["updated"] == 1 and third["frames_removed"] == 1, third
            [only] = store.examples("cvat-1")
            assert only.category == "triangle"
            with_auto = pull(client, store, 1, include_auto=True)
            assert with_auto["inserted"] == 1, with_auto
    finally:
        store.close()
