"""End to end against a real Label Studio 1.23.2: projects, media, connection, batch and interactive
predictions, write-back of late batch jobs and webhooks, all through Label Studio's own REST API.

Label Studio runs with prediction validation on (`fflag_feat_utc_210_prediction_validation_15082025`),
so every prediction it stores -- from a /predict answer or from our write-back -- has passed its check
against the labeling config; the interactive answers (never stored) are checked with the same validator
from label-studio-sdk. The model is the tiny random-weight Osprey: labels are meaningless, so the tests
check where they come from (the config's label sets) and how they are shaped, never which one wins.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle, mask2rle
from label_studio_sdk.label_interface import LabelInterface
from prometheus_client.parser import text_string_to_metric_families

from tests.backend.conftest import WEBHOOK_SECRET, Stack, wait_for
from tests.e2e.conftest import LabelStudio, start_stack, write_png

CONFIGS = Path(__file__).resolve().parents[2] / "deploy" / "labelstudio"
UPLOAD_SIZE = (80, 60)  # two sizes, so a mix-up of the tasks' original_width/height would show
LOCAL_SIZE = (64, 48)


# ---- helpers ------------------------------------------------------------------------------------------


def control_values(config: str) -> dict[str, set[str]]:
    """Control name -> its <Label>/<Choice> values (empty for TextArea), read from the labeling config."""
    return {el.attrib["name"]: {c.attrib["value"] for c in el.iter() if c.tag in ("Label", "Choice")}
            for el in ET.fromstring(config).iter() if "toName" in el.attrib}


def per_region_controls(config: str) -> set[str]:
    return {el.attrib["name"] for el in ET.fromstring(config).iter() if el.attrib.get("perRegion") == "true"}


def box_mask(size: tuple[int, int], x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    w, h = size
    mask = np.zeros((h, w), dtype=np.uint8)
    mask[y0:y1, x0:x1] = 1
    return mask


def brush(region_id: str, size: tuple[int, int], mask: np.ndarray, label: str) -> dict:
    """A BrushLabels region as the editor saves it: RGBA RLE of the natural image size, alpha 255."""
    w, h = size
    return {"original_width": w, "original_height": h, "image_rotation": 0,
            "value": {"format": "rle", "rle": [int(v) for v in mask2rle(mask * 255)], "brushlabels": [label]},
            "id": region_id, "from_name": "category", "to_name": "image", "type": "brushlabels", "origin": "manual"}


def item(type_: str, from_name: str, value: dict, region_id: str, size: tuple[int, int]) -> dict:
    w, h = size
    return {"original_width": w, "original_height": h, "image_rotation": 0, "value": value, "id": region_id,
            "from_name": from_name, "to_name": "image", "type": type_, "origin": "manual"}


def brush_mask(value: dict, size: tuple[int, int]) -> np.ndarray:
    w, h = size
    return decode_rle(value["rle"]).reshape(h, w, 4)[:, :, 3] > 0


def metric(stack: Stack, name: str, **labels: str) -> float:
    """One sample of our backend's /metrics (0 when absent)."""
    for family in text_string_to_metric_families(stack.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def events(stack: Stack, action: str) -> list[dict]:
    """Webhook events our backend recorded in the Redis stream `<prefix>:events`."""
    found = []
    for _, fields in stack.redis().xrange(f"{stack.prefix}:events"):
        if fields[b"action"].decode() == action:
            found.append({"project_id": fields[b"project_id"].decode(), **json.loads(fields[b"payload"])})
    return found


def annotation_ids_seen(stack: Stack, project: int) -> set[int]:
    return {e["annotation"]["id"] for e in events(stack, "ANNOTATION_CREATED") if e["project_id"] == str(project)}


def worker_stats(stack: Stack) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in stack.redis().hgetall(f"{stack.prefix}:stats").items()}


def backend_idle(stack: Stack) -> bool:
    """No job of this deployment is queued or running."""
    return (sum(metric(stack, "osprey_queue_depth", queue=q) for q in ("interactive", "batch")) == 0
            and sum(metric(stack, "osprey_jobs_running", queue=q) for q in ("interactive", "batch")) == 0)


def assert_valid(config: str, prediction: dict) -> None:
    """Label Studio's own prediction validator (label-studio-sdk), the one behind the validation flag."""
    errors = LabelInterface(config).validate_prediction(prediction, return_errors=True)
    assert not errors, errors


@dataclass
class Project:
    """A Label Studio project with an uploaded and a local-files image task, connected to one backend."""

    id: int
    config: str
    ml: dict
    tasks: dict[str, dict]  # "upload" / "local" -> task as Label Studio lists it
    sizes: dict[int, tuple[int, int]]  # task id -> image (width, height)
    annotations: dict[int, dict] | None = None  # task id -> annotation as Label Studio stored it

    def region_ids(self, task_id: int) -> set[str]:
        return {r["id"] for r in self.annotations[task_id]["result"]}


def new_project(ls: LabelStudio, stack: Stack, workdir: Path, config_file: str, slug: str,
                local: bool = True) -> Project:
    """Create the project, import its images (upload, and a local-files storage sync) and connect `stack`."""
    config = (CONFIGS / config_file).read_text()
    pid = ls.create_project(f"osprey e2e {slug}", config)
    upload = workdir / f"{slug}-upload.png"
    write_png(upload, *UPLOAD_SIZE, seed=1)
    ls.upload_image(pid, upload)
    if local:
        write_png(ls.files_root / slug / "a.png", *LOCAL_SIZE, seed=2)
        ls.add_local_storage(pid, ls.files_root / slug)
    tasks = {}
    for task in ls.tasks(pid):
        kind = "upload" if task["data"]["image"].startswith("/data/upload/") else "local"
        tasks[kind] = task
    sizes = {t["id"]: UPLOAD_SIZE if kind == "upload" else LOCAL_SIZE for kind, t in tasks.items()}
    ml = ls.connect_backend(pid, stack.base_url)
    return Project(pid, config, ml, tasks, sizes)


# ---- fixtures -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def backend(label_studio: LabelStudio, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Server + worker with the tiny model; local files are read from Label Studio's document root on disk."""
    stack = start_stack(tmp_path_factory.mktemp("backend"), label_studio)
    yield stack
    stack.close()


@pytest.fixture(scope="module")
def slow_backend(label_studio: LabelStudio, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A deployment whose batch budget (0.05 s) is shorter than every job (OSPREY_TEST_JOB_DELAY_S=1), so all
    batch outputs go to Label Studio by write-back. It has no LOCAL_FILES_DOCUMENT_ROOT: local files are
    downloaded from Label Studio's /data/local-files/ with the API key."""
    stack = start_stack(tmp_path_factory.mktemp("slow-backend"), label_studio, worker_delay_s=1.0,
                        local_files=False, OSPREY_BATCH_BUDGET_S="0.05")
    yield stack
    stack.close()


@pytest.fixture(scope="module")
def brush_project(label_studio: LabelStudio, backend: Stack, tmp_path_factory: pytest.TempPathFactory) -> Project:
    """brush_attributes.xml; webhook secret in the webhook URL; brush annotations on both tasks."""
    ls = label_studio
    project = new_project(ls, backend, tmp_path_factory.mktemp("brush"), "brush_attributes.xml", "brush")
    hook = ls.backend_webhook(project.id, backend.base_url)
    ls.call("PATCH", f"/api/webhooks/{hook['id']}", json={"url": f"{backend.base_url}/webhook?secret={WEBHOOK_SECRET}"})
    up, lo = project.tasks["upload"]["id"], project.tasks["local"]["id"]
    project.annotations = {
        up: ls.annotate(up, [brush("up-cat", UPLOAD_SIZE, box_mask(UPLOAD_SIZE, 10, 8, 40, 30), "cat"),
                             brush("up-car", UPLOAD_SIZE, box_mask(UPLOAD_SIZE, 40, 30, 76, 58), "car")]),
        lo: ls.annotate(lo, [brush("lo-dog", LOCAL_SIZE, box_mask(LOCAL_SIZE, 5, 5, 30, 25), "dog")]),
    }
    return project


@pytest.fixture(scope="module")
def writeback_project(label_studio: LabelStudio, slow_backend: Stack,
                      tmp_path_factory: pytest.TempPathFactory) -> Project:
    """polygon_rectangle.xml on the slow backend; webhook secret as a header; a polygon and a plain
    rectangle + <Labels> region (the split format) on each task."""
    ls = label_studio
    project = new_project(ls, slow_backend, tmp_path_factory.mktemp("poly"), "polygon_rectangle.xml", "poly")
    hook = ls.backend_webhook(project.id, slow_backend.base_url)
    ls.call("PATCH", f"/api/webhooks/{hook['id']}", json={"headers": {"X-Osprey-Webhook-Secret": WEBHOOK_SECRET}})
    project.annotations = {}
    for kind, task in project.tasks.items():
        size = project.sizes[task["id"]]
        box = {"x": 50.0, "y": 40.0, "width": 40.0, "height": 50.0, "rotation": 0}
        project.annotations[task["id"]] = ls.annotate(task["id"], [
            item("polygonlabels", "part", {"points": [[10, 10], [45, 12], [30, 45]], "closed": True,
                                           "polygonlabels": ["door"]}, f"{kind}-poly", size),
            item("rectangle", "box", box, f"{kind}-box", size),
            item("labels", "object", {**box, "labels": ["car"]}, f"{kind}-box", size),
        ])
    return project


# ---- tests ----------------------------------------------------------------------------------------------


def test_tasks_reference_uploaded_and_local_files(label_studio: LabelStudio, brush_project: Project) -> None:
    """The two media paths the backend must read: an upload and a Local Files storage file, both of which
    Label Studio serves only to an authenticated client."""
    upload, local = brush_project.tasks["upload"], brush_project.tasks["local"]
    assert upload["data"]["image"].startswith(f"/data/upload/{brush_project.id}/")
    assert local["data"]["image"] == "/data/local-files/?d=brush/a.png"
    for task in (upload, local):
        anonymous = httpx.get(label_studio.url + task["data"]["image"], timeout=30, trust_env=False)
        assert anonymous.status_code == 401, anonymous.text[:300]
        assert label_studio.api.get(task["data"]["image"]).headers["content-type"] == "image/png"


def test_connect_reports_backend_model_version(label_studio: LabelStudio, backend: Stack,
                                               brush_project: Project) -> None:
    """LS connected the backend with basic auth, and its model_version is what our /setup answers."""
    ml = label_studio.call("GET", f"/api/ml/{brush_project.ml['id']}")
    assert ml["state"] == "CO", ml
    assert (ml["auth_method"], ml["basic_auth_user"], ml["is_interactive"]) == ("BASIC_AUTH", "ls-backend", True)
    setup = backend.post("/setup", {"project": f"{brush_project.id}.0", "schema": brush_project.config})
    assert setup.status_code == 200, setup.text
    assert ml["model_version"] == setup.json()["model_version"] == backend.model_version()

    # Wrong basic-auth password: our /setup answers 401 and Label Studio refuses the connection.
    refused = label_studio.connect_backend(brush_project.id, backend.base_url, password="wrong-password",
                                           expect=(400,))
    assert "401" in json.dumps(refused), refused
    assert [b["id"] for b in label_studio.backends(brush_project.id)] == [brush_project.ml["id"]]


def test_batch_predictions_stored_by_label_studio(label_studio: LabelStudio, backend: Stack,
                                                  brush_project: Project) -> None:
    """Retrieve Predictions: one validated prediction per task with our model_version, built on the
    annotation's regions (same ids, same masks) with labels from the config and their scores."""
    ls, config = label_studio, brush_project.config
    upload_task = brush_project.tasks["upload"]["id"]
    # The validation flag is on: a label outside the config is refused, so what is stored was checked.
    bad = brush("bad", UPLOAD_SIZE, box_mask(UPLOAD_SIZE, 0, 0, 4, 4), "unicorn")
    refused = ls.call("POST", "/api/predictions", expect=(400,),
                      json={"task": upload_task, "result": [bad], "model_version": "bad"})
    assert "unicorn" in json.dumps(refused), refused

    answer = ls.retrieve_predictions(brush_project.id)
    assert answer["processed_items"] == 2, answer

    values = control_values(config)
    expected_controls = {"category"} | per_region_controls(config)
    version = backend.model_version()
    for task_id, annotation in brush_project.annotations.items():
        predictions = ls.predictions(task_id)
        assert len(predictions) == 1, predictions
        prediction = predictions[0]
        assert prediction["model_version"] == version
        assert_valid(config, prediction)
        result = prediction["result"]
        assert {r["id"] for r in result} == brush_project.region_ids(task_id)
        scores = []
        for drawn in annotation["result"]:
            items = {r["from_name"]: r for r in result if r["id"] == drawn["id"]}
            assert set(items) == expected_controls, sorted(items)
            for control, got in items.items():
                assert (got["original_width"], got["original_height"]) == brush_project.sizes[task_id]
                assert got["to_name"] == "image"
                # Every per-region result carries the region's mask, and it is the drawn one.
                assert np.array_equal(brush_mask(got["value"], brush_project.sizes[task_id]),
                                      brush_mask(drawn["value"], brush_project.sizes[task_id])), control
            category = items["category"]
            assert category["type"] == "brushlabels" and len(category["value"]["brushlabels"]) == 1
            assert category["value"]["brushlabels"][0] in values["category"]
            for attribute in ("color", "size"):
                assert items[attribute]["type"] == "choices"
                assert set(items[attribute]["value"]["choices"]) <= values[attribute]
                assert len(items[attribute]["value"]["choices"]) == 1  # single-radio
            for description in ("caption", "detailed_description"):
                texts = items[description]["value"]["text"]
                assert items[description]["type"] == "textarea" and len(texts) == 1 and isinstance(texts[0], str)
            for scored in ("category", "color", "size"):
                assert 0.0 < items[scored]["score"] <= 1.0
                scores.append(items[scored]["score"])
        assert prediction["score"] == pytest.approx(min(scores))

    # Retrieving again asks for nothing new: the tasks already hold a prediction of this model_version.
    ls.retrieve_predictions(brush_project.id)
    assert [len(ls.predictions(t)) for t in brush_project.annotations] == [1, 1]


def test_interactive_fills_the_drawn_region(label_studio: LabelStudio, backend: Stack,
                                            tmp_path: Path) -> None:
    """Auto-Annotation: a smart rectangle and a smart keypoint come back with a label from their own
    control, a score and the per-region caption, under the region id the editor gave them; nothing stored."""
    ls = label_studio
    project = new_project(ls, backend, tmp_path, "keypoint_sam.xml", "interactive", local=False)
    task_id = project.tasks["upload"]["id"]
    values = control_values(project.config)
    rectangle = item("rectanglelabels", "rect", {"x": 12.5, "y": 20.0, "width": 30.0, "height": 25.0, "rotation": 0,
                                                 "rectanglelabels": ["car"]}, "Xy12ab34cd", UPLOAD_SIZE)
    keypoint = {**item("keypointlabels", "point", {"x": 30.0, "y": 40.0, "width": 0.5, "keypointlabels": ["cat"],
                                                   "labels": ["cat"]}, "fBWv1t0S2L", UPLOAD_SIZE), "is_positive": True}
    for drawn, geometry in ((rectangle, ("x", "y", "width", "height", "rotation")), (keypoint, ("x", "y"))):
        answer = ls.interactive(project.ml["id"], task_id, {"result": [drawn]})
        assert "errors" not in answer, answer
        data = answer["data"]
        assert data["model_version"] == backend.model_version()
        assert_valid(project.config, data)
        assert {r["id"] for r in data["result"]} == {drawn["id"]}
        items = {r["from_name"]: r for r in data["result"]}
        assert set(items) == {drawn["from_name"], "caption"}, sorted(items)
        region = items[drawn["from_name"]]
        label_key = drawn["type"]
        assert region["type"] == label_key and len(region["value"][label_key]) == 1
        assert region["value"][label_key][0] in values[drawn["from_name"]]
        assert {k: region["value"][k] for k in geometry} == {k: drawn["value"][k] for k in geometry}
        assert (region["original_width"], region["original_height"]) == UPLOAD_SIZE
        assert 0.0 < region["score"] <= 1.0 and data["score"] == pytest.approx(region["score"])
        assert items["caption"]["type"] == "textarea" and len(items["caption"]["value"]["text"]) == 1
    assert ls.predictions(task_id) == []  # interactive suggestions are shown in the editor, never stored


def test_late_batch_jobs_are_written_back_once(label_studio: LabelStudio, slow_backend: Stack,
                                               writeback_project: Project) -> None:
    """Jobs longer than the batch budget: /predict answers placeholders, Label Studio stores nothing from
    them, and each task gets exactly one prediction through write-back -- also when "Retrieve
    Predictions" is pressed again while the jobs run and after they are done."""
    ls, project, stack = label_studio, writeback_project, slow_backend
    task_ids = list(project.annotations)

    first = ls.retrieve_predictions(project.id)
    assert first["processed_items"] == len(task_ids), first
    assert metric(stack, "osprey_jobs_total", queue="batch", outcome="handed_off") == len(task_ids)
    ls.retrieve_predictions(project.id)  # while the jobs still run (each sleeps 1 s first)

    wait_for(lambda: all(ls.predictions(t) for t in task_ids), 120, "the written-back predictions")
    wait_for(lambda: worker_stats(stack).get("writeback_created", 0) >= len(task_ids) and backend_idle(stack),
             60, "the write-back jobs to finish")
    ls.retrieve_predictions(project.id)  # once they are all there
    wait_for(lambda: backend_idle(stack), 60, "the backend to be idle")

    version = stack.model_version()
    values = control_values(project.config)
    for task_id in task_ids:
        predictions = ls.predictions(task_id)
        assert len(predictions) == 1, predictions
        prediction = predictions[0]
        assert prediction["model_version"] == version
        assert prediction["result"] and prediction["score"] is not None
        assert_valid(project.config, prediction)
        assert {r["id"] for r in prediction["result"]} == project.region_ids(task_id)
        by_control = {(r["id"], r["from_name"]): r for r in prediction["result"]}
        kind = "upload" if task_id == project.tasks["upload"]["id"] else "local"
        assert by_control[(f"{kind}-poly", "part")]["value"]["polygonlabels"][0] in values["part"]
        assert by_control[(f"{kind}-box", "object")]["value"]["labels"][0] in values["object"]
        assert by_control[(f"{kind}-box", "box")]["type"] == "rectangle"
        for r in prediction["result"]:
            assert (r["original_width"], r["original_height"]) == project.sizes[task_id]
    stats = worker_stats(stack)
    assert stats.get("writeback_created") == len(task_ids), stats
    assert "writeback_undeliverable" not in stats, stack.redis().hgetall(f"{stack.prefix}:wb:failed")
    assert all(runs == 1 for runs in stack.job_runs().values()), stack.job_runs()


def test_webhook_events_recorded_with_secret(backend: Stack, slow_backend: Stack, brush_project: Project,
                                             writeback_project: Project) -> None:
    """ANNOTATION_CREATED reaches /webhook and lands in `<prefix>:events`, with the secret in the webhook
    URL (brush project) or in an X-Osprey-Webhook-Secret header (write-back project)."""
    for stack, project in ((backend, brush_project), (slow_backend, writeback_project)):
        created = {a["id"] for a in project.annotations.values()}
        wait_for(lambda s=stack, p=project, c=created: annotation_ids_seen(s, p.id) >= c, 10,
                 "the ANNOTATION_CREATED events")
        assert annotation_ids_seen(stack, project.id) == created
        event = next(e for e in events(stack, "ANNOTATION_CREATED") if e["annotation"]["id"] in created)
        # Only ids are kept (Label Studio stays the source of truth; the sync re-reads the annotation).
        assert event["project"]["id"] == project.id and event["task"]["id"] in project.annotations
        assert set(event) <= {"action", "project", "project_id", "task", "annotation", "annotations", "tasks",
                              "sync_project"}


def test_webhook_without_secret_is_refused(label_studio: LabelStudio, backend: Stack, tmp_path: Path) -> None:
    """The webhook Label Studio creates carries no credentials: our backend answers 401 and records
    nothing, until the secret is added to it. (With LABEL_STUDIO_API_KEY set, /setup adds the secret header
    itself -- backend/labelstudio/webhook_setup.py; this test takes it off again to see the refusal.)"""
    ls = label_studio
    project = new_project(ls, backend, tmp_path, "keypoint_sam.xml", "webhook", local=False)
    task_id = project.tasks["upload"]["id"]
    hook = ls.backend_webhook(project.id, backend.base_url)
    # A /setup now (the webhook exists) configures it once; afterwards the backend leaves it alone.
    setup = backend.post("/setup", {"project": project.id, "schema": (CONFIGS / "keypoint_sam.xml").read_text()})
    assert setup.status_code == 200, setup.text
    wait_for(lambda: ls.backend_webhook(project.id, backend.base_url).get("headers"), 30,
             "/setup adding the secret header to the webhook")
    ls.call("PATCH", f"/api/webhooks/{hook['id']}", json={"headers": {}})
    point = item("keypointlabels", "point", {"x": 50.0, "y": 50.0, "width": 0.5, "keypointlabels": ["dog"]},
                 "kp1", UPLOAD_SIZE)
    def refused() -> float:
        return metric(backend, "osprey_http_requests_total", method="POST", path="/webhook", status="401")

    refused_before = refused()
    unsigned = ls.annotate(task_id, [point])
    wait_for(lambda: refused() > refused_before, 10, "Label Studio's unsigned webhook call")

    ls.call("PATCH", f"/api/webhooks/{hook['id']}", json={"headers": {"X-Osprey-Webhook-Secret": WEBHOOK_SECRET}})
    signed = ls.annotate(task_id, [{**point, "id": "kp2"}])
    wait_for(lambda: signed["id"] in annotation_ids_seen(backend, project.id), 10, "the signed webhook event")
    assert unsigned["id"] not in annotation_ids_seen(backend, project.id)
