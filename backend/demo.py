"""`osprey demo` (`make demo`): Label Studio 1.23.2 + the backend + a ready project, in one command.

It writes synthetic shape images (training/synthetic.py), starts Label Studio from `.venv-ls` with a fresh
data directory, starts `osprey run` (embedded Redis, workers, schedule, server) pointed at it, creates a
project from `deploy/labelstudio/demo_shapes.xml`, imports the images with their regions pre-drawn (no
labels: the model fills them in), connects the backend (basic auth, interactive on) and puts the webhook
secret on the webhook Label Studio created, then prints the URL and login. Ctrl-C stops everything it
started. Nothing is downloaded.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from backend.labelstudio import devserver
from backend.settings import Settings

logger = logging.getLogger(__name__)

CONFIG = devserver.REPO / "deploy" / "labelstudio" / "demo_shapes.xml"
DEMO_TOKEN = "osprey-demo-token-0123456789abcdef"  # Label Studio's legacy token for this local demo only
DEMO_USER, DEMO_PASSWORD = "osprey", "osprey-demo-pass"
DEMO_WEBHOOK_SECRET = "osprey-demo-webhook-secret"
REGIONS_VERSION = "drawn-regions"


@dataclass
class Demo:
    """What a running demo consists of (the screenshot script drives it)."""

    ls: devserver.LabelStudio
    backend: subprocess.Popen
    backend_url: str
    project: int
    workdir: Path
    # What an annotator fixing every suggestion would submit, one result per imported task in import order
    # (the generator's truth: each region's label, colour and caption); the screenshot script submits it.
    answers: list[list[dict[str, Any]]] = field(default_factory=list)

    def stop(self) -> None:
        if self.backend.poll() is None:
            self.backend.send_signal(signal.SIGINT)
            try:
                self.backend.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.backend.kill()
        self.ls.stop()


def unlabeled_tasks(tasks: list[dict[str, Any]], files_root: Path) -> list[dict[str, Any]]:
    """The generator's tasks with only the brush regions kept, unlabeled, and image URLs made relative to
    Label Studio's LOCAL_FILES_DOCUMENT_ROOT (`/data/local-files/?d=<relative path>`)."""
    root = str(files_root.resolve()).rstrip("/") + "/"
    out = []
    for task in tasks:
        url = task["data"]["image"].replace("?d=" + root, "?d=", 1)
        regions = []
        for prediction in task.get("predictions", []):
            for item in prediction["result"]:
                if item["type"] == "brushlabels":
                    regions.append({**item, "value": {**item["value"], "brushlabels": []}})
        out.append({"data": {"image": url},
                    "predictions": [{"model_version": REGIONS_VERSION, "result": regions}] if regions else []})
    return out


def _wait(check: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if check():
                return
        except (httpx.HTTPError, OSError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.5)


def answers(tasks: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Per generator task, the annotation an annotator submits after correcting it: every region's label,
    colour and caption (also what tests/demo/test_demo_loop.py submits)."""
    return [[r for p in task.get("predictions", [])[:1] for r in p["result"]
             if r["from_name"] in ("category", "color", "caption")] for task in tasks]


def start_demo(settings: Settings, *, ls_port: int = 8080, backend_port: int = 9090, images: int = 12,
               seed: int = 1001, backend_env: dict[str, str] | None = None) -> Demo:
    """`backend_env`: extra environment for `osprey run` (the screenshot script's training settings)."""
    from training.demo_model import WORLD, WORLD_SHAPES
    from training.synthetic import demo_data

    workdir = Path(settings.model_dir).resolve() / "demo"
    if workdir.exists():
        shutil.rmtree(workdir)  # a fresh Label Studio database every time: the demo is disposable
    files_root = workdir / "files"
    print(f"writing {images} demo images under {files_root} ...", flush=True)
    # The demo model's world (crosses included: the class it has to learn from the annotator).
    paths = demo_data(files_root / "shapes", images=images, seed=seed, shapes=WORLD_SHAPES, **WORLD)
    generated = json.loads(paths["labelstudio"].read_text())
    tasks = unlabeled_tasks(generated, files_root)
    # devserver makes data/ and files/ itself: move the images aside and back.
    staged = workdir.parent / "demo-staging"
    shutil.rmtree(staged, ignore_errors=True)
    shutil.move(str(files_root), staged)

    print(f"starting Label Studio {devserver.LS_VERSION} on http://127.0.0.1:{ls_port} ...", flush=True)
    ls = devserver.start_label_studio(workdir, DEMO_TOKEN, port=ls_port)
    ls.backend_auth = (DEMO_USER, DEMO_PASSWORD)
    shutil.rmtree(ls.files_root)
    shutil.move(str(staged), ls.files_root)

    backend_url = f"http://127.0.0.1:{backend_port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO_", "BASIC_AUTH_"))}
    env |= {
        "PORT": str(backend_port), "HOST": "127.0.0.1", "MODEL_DIR": str(Path(settings.model_dir).resolve()),
        "BASIC_AUTH_USER": DEMO_USER, "BASIC_AUTH_PASS": DEMO_PASSWORD,
        "OSPREY_WEBHOOK_SECRET": DEMO_WEBHOOK_SECRET,
        "LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": DEMO_TOKEN,
        "LOCAL_FILES_DOCUMENT_ROOT": str(ls.files_root), "OSPREY_REGIONS_FROM": "both",
    } | (backend_env or {})
    print(f"starting the backend (`osprey run`) on {backend_url} ...", flush=True)
    backend = subprocess.Popen([sys.executable, "-m", "backend.cli", "run"], env=env)
    demo = Demo(ls=ls, backend=backend, backend_url=backend_url, project=0, workdir=workdir,
                answers=answers(generated))
    try:
        _wait(lambda: httpx.get(backend_url + "/health", timeout=2).status_code == 200, 600, "the backend")
        _wait(lambda: httpx.post(backend_url + "/setup", auth=(DEMO_USER, DEMO_PASSWORD), timeout=10,
                                 json={"schema": CONFIG.read_text()}).status_code == 200, 900,
              "a worker with the model loaded")
        demo.project = ls.create_project("Osprey demo: shapes", CONFIG.read_text())
        # Label Studio serves /data/local-files/ only from a Local Files storage of the project; it is
        # not synced (that would add every image again, without its regions).
        ls.call("POST", "/api/storages/localfiles", json={
            "project": demo.project, "path": str(ls.files_root / "shapes" / "images"), "use_blob_urls": True,
            "regex_filter": r".*\.png", "title": "demo images"})
        ls.call("POST", f"/api/projects/{demo.project}/import", json=tasks)
        ls.connect_backend(demo.project, backend_url)
        for hook in ls.webhooks(demo.project):
            if hook["url"].startswith(backend_url):
                ls.call("PATCH", f"/api/webhooks/{hook['id']}",
                        json={"headers": {"X-Osprey-Webhook-Secret": DEMO_WEBHOOK_SECRET}})
    except BaseException:
        demo.stop()
        raise
    return demo


def run_demo(settings: Settings, **kwargs: Any) -> int:
    try:
        demo = start_demo(settings, **kwargs)
    except FileNotFoundError as exc:
        print(f"osprey demo: {exc}", file=sys.stderr)
        return 2
    print(
        f"\nLabel Studio: {demo.ls.url}/projects/{demo.project}  login {devserver.LS_EMAIL} / "
        f"{devserver.LS_PASSWORD}\nBackend: {demo.backend_url} (basic auth {DEMO_USER} / {DEMO_PASSWORD}), "
        "connected with interactive pre-annotations on and the webhook secret set.\n"
        "Open a task, select a region (or draw one with Auto-Annotation on), correct what is wrong, submit; "
        "`Start Training` on the model card retrains. Ctrl-C stops everything.\n", flush=True)
    try:
        while demo.backend.poll() is None and demo.ls.proc.poll() is None:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        print("stopping ...", flush=True)
        demo.stop()
    return 0
