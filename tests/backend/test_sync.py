"""Label Studio -> corrections store: webhooks trigger syncs through the real server and a real training
worker; replays and duplicates add nothing, deletes are honoured, a missed webhook is repaired by
`osprey sync`; on SQLite and on the PostgreSQL at 127.0.0.1:5432 (database `test`, a schema per test).

Label Studio's API is `FakeLabelStudioAPI`, a stdlib HTTP server holding projects, tasks, annotations,
predictions, ML backends, webhooks and uploaded files in memory, shaped as Label Studio 1.23 answers
(protocol notes §6, §8). It is a fake because these tests must run where Label Studio is not installed;
tests/e2e/test_training_loop.py runs the same path against the real Label Studio 1.23.2.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import numpy as np
import pytest
import sqlalchemy as sa
from PIL import Image

from backend.labelstudio.client import LabelStudioClient
from backend.labelstudio.config import parse_label_config
from backend.labelstudio.sync import LabelStudioSync, task_regions
from backend.labelstudio.webhook_setup import configure_webhook
from tests.backend.conftest import LS_TOKEN, WEBHOOK_SECRET, JsonHandler, make_stack, wait_for
from training.store import Store

REPO = Path(__file__).resolve().parents[2]
CONFIG = (REPO / "deploy" / "labelstudio" / "demo_shapes.xml").read_text()
PG_URL = os.environ.get("OSPREY_TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


class FakeLabelStudioAPI:
    """The Label Studio 1.23 API calls a sync makes, in memory; checks the legacy-token header."""

    def __init__(self, label_config: str = CONFIG) -> None:
        self.lock = threading.Lock()
        self.projects: dict[int, dict] = {1: {"id": 1, "title": "shapes", "label_config": label_config}}
        self.tasks: dict[int, dict] = {}
        self.files: dict[str, bytes] = {}
        self.ml: list[dict] = []
        self.webhooks: list[dict] = []
        self.gets: list[str] = []
        self._next = {"task": 1, "annotation": 1, "prediction": 1}
        fake = self

        class Handler(JsonHandler):
            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                path, query = parts.path.rstrip("/"), parse_qs(parts.query)
                with fake.lock:
                    fake.gets.append(self.path)
                if not self._authorized():
                    return
                with fake.lock:
                    if path.startswith("/data/upload/"):
                        data = fake.files.get(parts.path)
                        return self._send(404, {"detail": "Not found."}) if data is None else \
                            self._send(200, None, raw=data, ctype="image/png")
                    if path.startswith("/api/projects/"):
                        project = fake.projects.get(int(path.split("/")[3]))
                        return self._send(200 if project else 404, project or {"detail": "Not found."})
                    if path == "/api/tasks":
                        pid = int(query["project"][0])
                        page, size = int(query.get("page", ["1"])[0]), int(query.get("page_size", ["100"])[0])
                        ids = sorted(t for t, task in fake.tasks.items() if task["project"] == pid)
                        chunk = ids[(page - 1) * size: page * size]
                        if page > 1 and not chunk:
                            return self._send(404, {"detail": "Invalid page."})
                        return self._send(200, {"tasks": [{"id": t} for t in chunk], "total": len(ids)})
                    if path.startswith("/api/tasks/"):
                        task = fake.tasks.get(int(path.split("/")[3]))
                        return self._send(200 if task else 404, json.loads(json.dumps(task)) if task else {"detail": "Not found."})
                    if path == "/api/ml":
                        return self._send(200, [m for m in fake.ml if str(m["project"]) == query["project"][0]])
                    if path == "/api/webhooks":
                        return self._send(200, [w for w in fake.webhooks if str(w["project"]) == query["project"][0]])
                self._send(404, {"detail": "Not found."})

            def do_PATCH(self) -> None:
                path = urlsplit(self.path).path.rstrip("/")
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                if not self._authorized():
                    return
                with fake.lock:
                    if path.startswith("/api/webhooks/"):
                        hook = next((w for w in fake.webhooks if w["id"] == int(path.split("/")[3])), None)
                        if hook is not None:
                            hook.update(body)
                            return self._send(200, hook)
                self._send(404, {"detail": "Not found."})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _id(self, kind: str) -> int:
        self._next[kind] += 1
        return self._next[kind] - 1

    def add_task(self, image: bytes, project: int = 1, predictions: list[dict] | None = None) -> int:
        with self.lock:
            tid = self._id("task")
            url = f"/data/upload/{project}/{uuid.uuid4().hex[:8]}-t{tid}.png"
            self.files[url] = image
            preds = [{"id": self._id("prediction"), "task": tid, **p} for p in predictions or []]
            self.tasks[tid] = {"id": tid, "project": project, "data": {"image": url}, "annotations": [],
                               "predictions": preds}
            return tid

    def annotate(self, task_id: int, result: list[dict], parent_prediction: int | None = None) -> int:
        with self.lock:
            aid = self._id("annotation")
            self.tasks[task_id]["annotations"].append({
                "id": aid, "result": result, "was_cancelled": False, "ground_truth": False, "task": task_id,
                "project": self.tasks[task_id]["project"], "completed_by": 7, "parent_prediction": parent_prediction,
                "created_at": "2026-12-01T10:00:00.000000Z", "updated_at": "2026-12-01T10:00:00.000000Z"})
            return aid

    def delete_annotation(self, annotation_id: int) -> None:
        with self.lock:
            for task in self.tasks.values():
                task["annotations"] = [a for a in task["annotations"] if a["id"] != annotation_id]

    def image_gets(self) -> int:
        with self.lock:
            return sum(1 for g in self.gets if g.startswith("/data/upload/"))

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def png(seed: int, w: int = 32, h: int = 24) -> bytes:
    img = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def brush_result(region_id: str, label: str, box: tuple[int, int, int, int], w: int = 32, h: int = 24,
                 color: str | None = "red", caption: str | None = None) -> list[dict]:
    """A brush region (Label Studio RLE of a box mask) with its per-region colour and caption."""
    from osprey_core.regions import Region

    mask = np.zeros((h, w), dtype=bool)
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = True
    rle = Region.from_mask(mask).to_ls_brush()
    common = {"id": region_id, "to_name": "image", "original_width": w, "original_height": h, "image_rotation": 0}
    out = [{**common, "from_name": "category", "type": "brushlabels",
            "value": {"format": "rle", "rle": rle, "brushlabels": [label]}}]
    if color:
        out.append({**common, "from_name": "color", "type": "choices", "value": {"choices": [color]}})
    if caption:
        out.append({**common, "from_name": "caption", "type": "textarea", "value": {"text": [caption]}})
    return out


@pytest.fixture
def fake() -> Iterator[FakeLabelStudioAPI]:
    f = FakeLabelStudioAPI()
    yield f
    f.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path: Path) -> Iterator[str]:
    """A database URL for the store: a SQLite file, or a fresh PostgreSQL schema (search_path in the URL,
    so subprocesses that read DATABASE_URL use it too)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'corrections.sqlite'}"
        return
    schema = f"osprey_sync_{uuid.uuid4().hex[:10]}"
    engine = sa.create_engine(PG_URL)
    with engine.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield f"{PG_URL}?options=-csearch_path%3D{schema}"
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        engine.dispose()


def _settings(fake: FakeLabelStudioAPI, tmp_path: Path):
    from backend.settings import Settings

    return Settings(label_studio_url=fake.url, label_studio_api_key=LS_TOKEN, model_dir=tmp_path)


def _syncer(fake: FakeLabelStudioAPI, store: Store, tmp_path: Path) -> LabelStudioSync:
    from backend.labelstudio.client import media_origins
    from backend.media.fetch import MediaFetcher

    settings = _settings(fake, tmp_path)
    return LabelStudioSync(LabelStudioClient(fake.url, LS_TOKEN), store, MediaFetcher(settings, media_origins(settings)))


def _count(store: Store) -> int:
    from training.store import regions_table

    with store.engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(regions_table)).scalar_one())


# --- the conversion -----------------------------------------------------------------------------------


def test_task_regions_carry_labels_choices_texts_and_the_prediction_seen():
    plan = parse_label_config(CONFIG)
    predicted = brush_result("r1", "circle", (2, 2, 10, 10))
    predicted[0]["score"] = 0.8
    task = {"id": 5, "data": {"image": "/data/upload/1/a.png"},
            "predictions": [{"id": 3, "model_version": "demo-abc", "score": 0.7, "result": predicted}],
            "annotations": [
                {"id": 9, "was_cancelled": False, "completed_by": 4, "parent_prediction": 3,
                 "created_at": "2026-12-01T10:00:00Z", "updated_at": "2026-12-01T10:05:00Z",
                 "result": brush_result("r1", "hexagon", (2, 2, 10, 10), caption="a red hexagon")
                 + brush_result("r2", "square", (12, 4, 20, 20), color="blue")},
                {"id": 10, "was_cancelled": True, "result": brush_result("r9", "star", (0, 0, 4, 4))},
            ]}
    regions = task_regions(task, plan)
    assert [(r["annotation_id"], r["region_id"], r["labels"]) for r in regions] == [
        ("9", "r1", ["hexagon"]), ("9", "r2", ["square"])]
    first = regions[0]
    assert first["attributes"] == {"color": ["red"]}
    assert first["short"] == "a red hexagon"
    assert first["annotator"] == "4"
    assert first["prediction"] == {"model_version": "demo-abc", "label": "circle", "score": 0.8}
    assert regions[1]["prediction"] is None  # the prediction said nothing about r2
    from pycocotools import mask as coco_mask

    decoded = coco_mask.decode({"size": first["rle"]["size"], "counts": first["rle"]["counts"].encode()})
    assert decoded.shape == (24, 32) and int(decoded.sum()) == 8 * 8


# --- the sync against the API, both databases ---------------------------------------------------------------


def test_sync_is_idempotent_honours_deletes_and_fetches_images_once(fake, database, tmp_path):
    store = Store(database, model_dir=tmp_path)
    t1 = fake.add_task(png(1))
    a1 = fake.annotate(t1, brush_result("r1", "circle", (1, 1, 9, 9)) + brush_result("r2", "square", (10, 2, 20, 12)))
    sync = _syncer(fake, store, tmp_path)
    first = sync.sync_task(1, t1)
    assert (first["inserted"], first["deleted"]) == (2, 0)
    again = sync.sync_task(1, t1)  # a replayed webhook: nothing changes
    assert (again["inserted"], again["updated"], again["unchanged"]) == (0, 0, 2)
    assert _count(store) == 2 and fake.image_gets() == 1
    assert store.count_since(1) == 2

    with fake.lock:  # the annotator corrects r2's label in Label Studio
        fake.tasks[t1]["annotations"][0]["result"] = (brush_result("r1", "circle", (1, 1, 9, 9))
                                                      + brush_result("r2", "hexagon", (10, 2, 20, 12)))
    assert sync.sync_task(1, t1)["updated"] == 1
    assert sorted(e.category for e in store.examples(1)) == ["circle", "hexagon"]

    fake.delete_annotation(a1)
    gone = sync.sync_task(1, t1)
    assert gone["deleted"] == 2 and _count(store) == 0

    with fake.lock:
        del fake.tasks[t1]  # the task itself deleted: a 404 removes what is left
    assert sync.sync_task(1, t1)["gone"] is True
    assert fake.image_gets() == 1
    store.close()


# --- webhooks through the real server and a real training worker ----------------------------------------


def _training_worker(stack, env: dict[str, str], timeout: float = 240) -> str:
    """Run `osprey worker --queues training --burst` to completion; returns its log."""
    proc = subprocess.run([sys.executable, "-m", "backend.cli", "worker", "--queues", "training", "--burst"],
                          cwd=REPO, env={**stack.env, **env}, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def _hook(stack, action: str, **body: Any) -> httpx.Response:
    r = httpx.post(f"{stack.base_url}/webhook", json={"action": action, "project": {"id": 1}, **body},
                   headers={"X-Osprey-Webhook-Secret": WEBHOOK_SECRET}, timeout=30)
    assert r.status_code == 201, r.text
    return r


def test_webhooks_sync_through_the_worker_replays_deletes_and_repair(fake, database, tmp_path):
    stack = make_stack(tmp_path / "stack", ls_url=fake.url, DATABASE_URL=database,
                       OSPREY_TRAIN_MIN_CORRECTIONS="100000")
    try:
        stack.start_server()
        tasks = [fake.add_task(png(10 + i)) for i in range(3)]
        annotations = [fake.annotate(t, brush_result("r1", "circle", (1, 1, 9, 9))
                                     + brush_result("r2", "star", (12, 3, 22, 13))) for t in tasks]
        for t, a in zip(tasks, annotations, strict=True):
            for _ in range(3):  # Label Studio retries and duplicates: one sync job per task waits
                _hook(stack, "ANNOTATION_CREATED", task={"id": t}, annotation={"id": a})
        queued = stack.redis().llen(f"rq:queue:{stack.prefix}:training")
        assert queued == 3
        _training_worker(stack, {})
        store = Store(database, model_dir=tmp_path / "stack" / "data")
        assert _count(store) == 6
        _hook(stack, "ANNOTATION_UPDATED", task={"id": tasks[0]}, annotation={"id": annotations[0]})  # a replay
        _training_worker(stack, {})
        assert _count(store) == 6

        fake.delete_annotation(annotations[1])
        _hook(stack, "ANNOTATIONS_DELETED", annotations=[{"id": annotations[1]}])
        _training_worker(stack, {})
        assert _count(store) == 4
        assert {e.task_id for e in store.examples(1)} == {str(tasks[0]), str(tasks[2])}

        # A missed webhook: an annotation Label Studio holds but no event announced; `osprey sync` repairs it.
        t4 = fake.add_task(png(20))
        fake.annotate(t4, brush_result("r1", "hexagon", (3, 3, 13, 13)))
        with fake.lock:
            del fake.tasks[tasks[2]]  # and a task deleted without an event
        proc = subprocess.run([sys.executable, "-m", "backend.cli", "sync", "--project", "1"], cwd=REPO,
                              env=stack.env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        summary = json.loads(proc.stdout.strip().splitlines()[-1])
        assert summary["tasks"] == 3 and summary["pruned"] == 1 and summary["failed"] == 0
        assert sorted(e.category for e in store.examples(1)) == ["circle", "hexagon", "star"]
        store.close()
    except BaseException:
        print(stack.tail())
        raise
    finally:
        stack.close()


def test_start_training_answers_with_the_job_id_of_a_queued_run(fake, tmp_path):
    stack = make_stack(tmp_path / "stack", ls_url=fake.url)
    try:
        stack.start_server()
        first = _hook(stack, "START_TRAINING").json()
        second = _hook(stack, "START_TRAINING").json()  # pressed twice: still one queued run
        assert first["job"] == second["job"] == f"{stack.prefix}-train-1"
        r = stack.redis()
        assert r.lrange(f"rq:queue:{stack.prefix}:training", 0, -1) == [first["job"].encode()]
        stored = json.loads(zlib.decompress(r.hget(f"rq:job:{first['job']}", "data")))  # JSON, never pickle
        assert stored[0] == "training.jobs.train_job" and stored[2][0]["project"] == "1"
    finally:
        stack.close()


def test_webhook_setup_adds_the_secret_header(fake):
    fake.ml.append({"id": 3, "project": 1, "url": "http://backend:9090"})
    fake.webhooks += [{"id": 11, "project": 1, "url": "http://backend:9090/webhook", "headers": {}},
                      {"id": 12, "project": 1, "url": "http://elsewhere/hook", "headers": {}}]
    client = LabelStudioClient(fake.url, LS_TOKEN)
    lines = configure_webhook(client, "1", WEBHOOK_SECRET)
    assert lines == ["added X-Osprey-Webhook-Secret to webhook 11 (http://backend:9090/webhook)"]
    assert fake.webhooks[0]["headers"] == {"X-Osprey-Webhook-Secret": WEBHOOK_SECRET}
    assert fake.webhooks[1]["headers"] == {}  # not ours: untouched
    assert "already carries" in configure_webhook(client, "1", WEBHOOK_SECRET)[0]


def test_webhook_setup_runs_on_setup_in_the_background(fake, tmp_path):
    fake.ml.append({"id": 3, "project": 1, "url": "http://backend:9090"})
    fake.webhooks.append({"id": 11, "project": 1, "url": "http://backend:9090/webhook", "headers": {}})
    stack = make_stack(tmp_path / "stack", ls_url=fake.url)
    try:
        stack.start_server()
        # /setup needs a served model version; announce one as a worker would.
        stack.redis().set(f"{stack.prefix}:model:current", json.dumps({"source": "tiny", "version": "v1",
                                                                        "worker": "w", "at": time.time()}))
        body = {"project": "1.1795681025", "schema": CONFIG, "hostname": "http://localhost:8080",
                "access_token": "x", "extra_params": None}
        assert stack.post("/setup", body).status_code == 200
        wait_for(lambda: fake.webhooks[0]["headers"].get("X-Osprey-Webhook-Secret") == WEBHOOK_SECRET, 10,
                 "the webhook secret header")
    finally:
        stack.close()
