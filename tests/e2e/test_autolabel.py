"""End to end: "Retrieve Predictions" on tasks nobody drew on, against a real Label Studio 1.23.2 (prediction
validation on) and our real server + worker (tiny model, classical proposer).

Before auto-labeling, such tasks got a placeholder that Label Studio logged as an error while reporting
them "retrieved". Now every region-less task must end with exactly one stored, validated prediction of
brush regions with scores, and Label Studio's log must show no prediction error for them. Per project,
`extra_params: {"autolabel": false}` at /setup turns it off again (the task then gets a placeholder that
says why; posted to our backend directly, as Label Studio posts /setup).

A config without a brush (polygon_rectangle.xml: PolygonLabels, Rectangle + Labels) gets the proposals as
polygons; an image without objects gets a real empty prediction, which Label Studio stores without an
error; a `keep`-mode region item with the model's view in `meta` passes Label Studio's validation.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle
from label_studio_sdk.label_interface import LabelInterface
from PIL import Image

from osprey_core.regions import Region
from tests.backend.conftest import Stack
from tests.e2e.conftest import LabelStudio, start_stack

CONFIGS = Path(__file__).resolve().parents[2] / "deploy" / "labelstudio"
CONFIG = (CONFIGS / "brush_attributes.xml").read_text()
POLYGON_CONFIG = (CONFIGS / "polygon_rectangle.xml").read_text()
SIZES = [(96, 72), (80, 64), (64, 64)]


def shapes_png(path: Path, size: tuple[int, int], seed: int) -> int:
    """Flat blocks on grey (a different layout per task); returns how many objects were drawn."""
    w, h = size
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 190, np.uint8)
    colours = [(220, 30, 30), (30, 70, 220), (30, 160, 50)][: 2 + seed % 2]
    for k, colour in enumerate(colours):
        x = int(rng.integers(2, w // 2 - 14)) + (k % 2) * (w // 2)
        y = int(rng.integers(2, h // 3 - 12)) + k * (h // 3)
        img[y:y + 14, x:x + 14] = colour
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)
    return len(colours)


def log_errors(ls: LabelStudio, start: int) -> list[str]:
    text = ls.log.read_text(errors="replace")[start:]
    return [line for line in text.splitlines() if "ERROR" in line or "Traceback" in line]


@pytest.fixture(scope="module")
def backend(label_studio: LabelStudio, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = start_stack(tmp_path_factory.mktemp("autolabel-backend"), label_studio)
    yield stack
    stack.close()


def project_with_images(ls: LabelStudio, stack: Stack, workdir: Path, slug: str, config: str = CONFIG,
                        blank: bool = False) -> tuple[int, dict[int, int]]:
    """A project of shape images (and, with `blank`, one flat grey image: no objects); task id -> objects."""
    pid = ls.create_project(f"osprey autolabel {slug}", config)
    objects = {}
    for seed, size in enumerate(SIZES):
        path = workdir / f"{slug}-{seed}.png"
        n = shapes_png(path, size, seed)
        ls.upload_image(pid, path)
        objects[path.name] = n
    if blank:
        path = workdir / f"{slug}-blank.png"
        Image.new("RGB", (72, 56), (190, 190, 190)).save(path)
        ls.upload_image(pid, path)
        objects[path.name] = 0
    ls.connect_backend(pid, stack.base_url)
    counts = {}
    for task in ls.tasks(pid):
        name = next(k for k in objects if task["data"]["image"].endswith(k))
        counts[task["id"]] = objects[name]
    return pid, counts


def test_region_less_tasks_get_one_validated_prediction_each(label_studio: LabelStudio, backend: Stack,
                                                             tmp_path: Path) -> None:
    ls = label_studio
    pid, objects = project_with_images(ls, backend, tmp_path, "on")
    assert len(objects) == 3
    start = len(ls.log.read_text(errors="replace"))
    answer = ls.retrieve_predictions(pid)
    assert answer["processed_items"] == 3, answer
    interface = LabelInterface(CONFIG)
    labels = {"cat", "dog", "car", "tree", "person"}
    version = backend.model_version()
    for task_id, n in objects.items():
        predictions = ls.predictions(task_id)
        assert len(predictions) == 1, predictions
        prediction = predictions[0]
        assert prediction["model_version"] == version
        errors = interface.validate_prediction(prediction, return_errors=True)
        assert not errors, errors
        regions = [r for r in prediction["result"] if r["type"] == "brushlabels"]
        assert len(regions) == n  # one brush region per object on the image
        for r in regions:
            w, h = r["original_width"], r["original_height"]
            mask = decode_rle(r["value"]["rle"]).reshape(h, w, 4)[:, :, 3] > 0
            assert 100 <= mask.sum() <= 14 * 14 + 30  # the drawn 14x14 block, not the background
            assert r["value"]["brushlabels"][0] in labels and 0.0 < r["score"] <= 1.0
            per_region = {i["from_name"] for i in prediction["result"] if i["id"] == r["id"]}
            assert per_region == {"category", "color", "size", "caption", "detailed_description"}
        assert prediction["score"] is not None
    assert log_errors(ls, start) == []


def test_polygon_config_gets_polygons_and_an_empty_image_an_empty_prediction(label_studio: LabelStudio,
                                                                             backend: Stack, tmp_path: Path) -> None:
    ls = label_studio
    pid, objects = project_with_images(ls, backend, tmp_path, "poly", POLYGON_CONFIG, blank=True)
    assert sorted(objects.values()) == [0, 2, 2, 3]
    start = len(ls.log.read_text(errors="replace"))
    answer = ls.retrieve_predictions(pid)
    assert answer["processed_items"] == 4, answer
    interface = LabelInterface(POLYGON_CONFIG)
    version = backend.model_version()
    for task_id, n in objects.items():
        [prediction] = ls.predictions(task_id)
        assert prediction["model_version"] == version
        assert not interface.validate_prediction(prediction, return_errors=True)
        if n == 0:  # stored as a real, empty prediction: the task counts as predicted
            assert prediction["result"] == [] and not prediction["score"]
            continue
        polygons = [r for r in prediction["result"] if r["type"] == "polygonlabels"]
        assert len(polygons) == n  # one polygon per object on the image
        for r in polygons:
            w, h = r["original_width"], r["original_height"]
            points = r["value"]["points"]
            assert r["from_name"] == "part" and r["value"]["closed"] is True and len(points) >= 3
            drawn = Region.from_ls_polygon(points, w, h)
            assert 100 <= drawn.area <= 14 * 14 + 30  # the drawn 14x14 block, not the background
            assert r["value"]["polygonlabels"][0] in {"wheel", "window", "door"} and 0.0 < r["score"] <= 1.0
            per_region = {i["from_name"] for i in prediction["result"] if i["id"] == r["id"]}
            assert per_region == {"part", "occluded", "description"}
        assert prediction["score"] is not None
    assert log_errors(ls, start) == []


def test_keep_mode_meta_passes_label_studio_validation(label_studio: LabelStudio, backend: Stack,
                                                       tmp_path: Path) -> None:
    """The `meta` our keep mode puts on the kept label's item: Label Studio (validation on) stores it."""
    ls = label_studio
    pid, objects = project_with_images(ls, backend, tmp_path, "keep", POLYGON_CONFIG)
    task = next(t for t in ls.tasks(pid) if objects[t["id"]])
    w, h = next(s for s in SIZES if task["data"]["image"].endswith(f"keep-{SIZES.index(s)}.png"))
    backend.post("/setup", {"project": f"{pid}.0", "schema": POLYGON_CONFIG,
                            "extra_params": json.dumps({"label_mode": "keep"})})
    drawn = {"id": "kept1", "from_name": "part", "to_name": "image", "type": "polygonlabels",
             "original_width": w, "original_height": h, "image_rotation": 0, "origin": "manual",
             "value": {"points": [[5, 5], [60, 8], [30, 60]], "closed": True, "polygonlabels": ["door"]}}
    body = {"tasks": [task], "project": f"{pid}.0", "label_config": POLYGON_CONFIG,
            "params": {"context": {"result": [drawn]}}}
    [answer] = backend.post("/predict", body).json()["results"]
    kept = next(i for i in answer["result"] if i["from_name"] == "part")
    assert kept["value"]["polygonlabels"] == ["door"] and kept["meta"]["model_label"] in {"wheel", "window", "door"}
    ls.call("POST", "/api/predictions", json={"task": task["id"], "result": answer["result"],
                                              "score": answer["score"], "model_version": "keep-meta"})
    [stored] = [p for p in ls.predictions(task["id"]) if p["model_version"] == "keep-meta"]
    assert next(i for i in stored["result"] if i["from_name"] == "part")["meta"] == kept["meta"]


def test_autolabel_off_per_project(label_studio: LabelStudio, backend: Stack, tmp_path: Path) -> None:
    ls = label_studio
    pid, objects = project_with_images(ls, backend, tmp_path, "off")
    body = {"tasks": [{"id": t, "data": {"image": "/data/upload/none.png"}} for t in objects],
            "project": f"{pid}.0", "label_config": CONFIG, "params": {}}
    backend.post("/setup", {"project": f"{pid}.0", "schema": CONFIG, "extra_params": json.dumps({"autolabel": False})})
    results = backend.post("/predict", body).json()["results"]
    assert [r["osprey_status"] for r in results] == ["no_regions"] * 3
    assert "auto-labeling is off" in results[0]["message"]


def test_cli_writes_predictions_into_a_project_and_resumes(label_studio: LabelStudio, tmp_path: Path) -> None:
    """`osprey autolabel --labelstudio-project ID`: one validated prediction per task; a rerun skips them."""
    import os
    import subprocess
    import sys

    from tests.backend.conftest import LS_TOKEN

    ls = label_studio
    pid = ls.create_project("osprey autolabel cli", CONFIG)
    for seed, size in enumerate(SIZES[:2]):
        path = tmp_path / f"cli-{seed}.png"
        shapes_png(path, size, seed)
        ls.upload_image(pid, path)
    env = {**os.environ, "LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": LS_TOKEN, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    cmd = [sys.executable, "-m", "backend.cli_autolabel", "--labelstudio-project", str(pid), "--model", "tiny",
           "--max-new-tokens", "3", "--no-progress"]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "2 task(s) predicted" in first.stderr
    interface = LabelInterface(CONFIG)
    for task in ls.tasks(pid):
        [prediction] = ls.predictions(task["id"])
        assert not interface.validate_prediction(prediction, return_errors=True)
        assert [r for r in prediction["result"] if r["type"] == "brushlabels" and r["score"] > 0]
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "0 task(s) predicted, 2 skipped" in again.stderr, again.stderr[-3000:]
    assert all(len(ls.predictions(t["id"])) == 1 for t in ls.tasks(pid))
