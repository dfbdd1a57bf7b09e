"""A real Label Studio 1.23.2 on this machine, for the demo (`make demo`) and the end-to-end tests.

Label Studio runs from its own virtualenv (`.venv-ls`, made by `make install-ls`: it pins Django and a
label-studio-sdk that must not mix with ours), headless, with a SQLite data dir, the environment of the
protocol notes §8 (legacy token on, SSRF checks off for 127.0.0.1, local files served from a document
root, prediction validation on), in its own process group so `stop()` reaches every child. `LabelStudio`
wraps the REST calls a user makes in the UI (the "REST recipe" of the notes).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[2]
LS_VERSION = "1.23.2"
LS_BIN = REPO / ".venv-ls" / "bin" / "label-studio"
LS_EMAIL = "admin@example.com"
LS_PASSWORD = "Passw0rd-123"
LS_START_TIMEOUT_S = 480.0  # a fresh database runs all migrations: ~30 s alone, minutes on a busy 2-core machine
# Label Studio passes prefixed variables through (LABEL_STUDIO_x, HEARTEX_x, x): none may leak in from outside.
_LS_ENV_DROP = ("LABEL_STUDIO_", "HEARTEX_", "DJANGO_", "POSTGRE_", "MYSQL_", "REDIS_", "OSPREY_", "BASIC_AUTH_")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LabelStudioError(AssertionError):
    """A Label Studio API call answered something unexpected (the body is in the message)."""


@dataclass
class LabelStudio:
    """A running Label Studio and the REST calls the tests make (protocol notes §8, "REST recipe")."""

    url: str
    proc: subprocess.Popen
    log: Path
    files_root: Path  # LOCAL_FILES_DOCUMENT_ROOT of Label Studio
    api: httpx.Client
    backend_auth: tuple[str, str] = ("", "")  # the basic auth `connect_backend` gives the ML backend

    def call(self, method: str, path: str, expect: tuple[int, ...] = (200, 201), **kwargs: Any) -> Any:
        response = self.api.request(method, path, **kwargs)
        if response.status_code not in expect:
            raise LabelStudioError(f"{method} {path} -> {response.status_code}: {response.text[:2000]}")
        return response.json() if response.content else None

    # ---- projects and tasks ------------------------------------------------------------------------

    def create_project(self, title: str, label_config: str) -> int:
        return self.call("POST", "/api/projects", json={"title": title, "label_config": label_config})["id"]

    def upload_image(self, project: int, path: Path) -> None:
        """Multipart file import: the task gets `{"image": "/data/upload/<project>/<hex>-<name>"}`."""
        with path.open("rb") as f:
            answer = self.call("POST", f"/api/projects/{project}/import", files={"file": (path.name, f, "image/png")})
        assert answer["task_count"] == 1, answer

    def add_local_storage(self, project: int, folder: Path) -> None:
        """Local Files storage on `folder` (under files_root), synced: tasks `/data/local-files/?d=...`."""
        storage = self.call("POST", "/api/storages/localfiles", json={
            "project": project, "path": str(folder), "use_blob_urls": True, "regex_filter": r".*\.png",
            "title": f"local files of project {project}"})
        self.call("POST", f"/api/storages/localfiles/{storage['id']}/sync")

    def tasks(self, project: int) -> list[dict]:
        return self.call("GET", "/api/tasks", params={"project": project, "page_size": 100})["tasks"]

    def annotate(self, task_id: int, result: list[dict]) -> dict:
        """Create an annotation (fires ANNOTATION_CREATED; without Redis, Label Studio sends it before answering)."""
        return self.call("POST", f"/api/tasks/{task_id}/annotations", json={"result": result, "lead_time": 2.5})

    def predictions(self, task_id: int) -> list[dict]:
        return self.call("GET", "/api/predictions", params={"task": task_id})

    # ---- ML backends and webhooks ------------------------------------------------------------------

    def connect_backend(self, project: int, backend_url: str, password: str | None = None,
                        expect: tuple[int, ...] = (201,), user: str | None = None) -> dict:
        """`POST /api/ml` with basic auth and interactive pre-annotations on, as the Connect Model dialog does."""
        return self.call("POST", "/api/ml", expect=expect, json={
            "url": backend_url, "project": project, "title": "osprey", "is_interactive": True,
            "auth_method": "BASIC_AUTH", "basic_auth_user": user or self.backend_auth[0],
            "basic_auth_pass": password or self.backend_auth[1]})

    def backends(self, project: int) -> list[dict]:
        return self.call("GET", "/api/ml", params={"project": project})

    def webhooks(self, project: int) -> list[dict]:
        return self.call("GET", "/api/webhooks", params={"project": project})

    def backend_webhook(self, project: int, backend_url: str) -> dict:
        """The webhook Label Studio created when the backend was connected (`<backend>/webhook`)."""
        hooks = [h for h in self.webhooks(project) if h["url"].startswith(f"{backend_url}/webhook")]
        assert len(hooks) == 1, f"expected one webhook to {backend_url}/webhook, got {self.webhooks(project)}"
        return hooks[0]

    def retrieve_predictions(self, project: int) -> dict:
        """The Data Manager action "Retrieve Predictions" on every task of the project."""
        return self.call("POST", "/api/dm/actions", params={"id": "retrieve_tasks_predictions", "project": project},
                         json={"selectedItems": {"all": True, "excluded": []}})

    def interactive(self, ml_id: int, task_id: int, context: dict) -> dict:
        """What the editor sends when a smart region is drawn with Auto-Annotation on (§2.5)."""
        return self.call("POST", f"/api/ml/{ml_id}/interactive-annotating", json={"task": task_id, "context": context})

    # ---- process ---------------------------------------------------------------------------------

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log.exists() else ""

    def stop(self) -> None:
        """SIGTERM to the whole process group, SIGKILL after 20 s: no process outlives the session."""
        self.api.close()
        if self.proc.poll() is not None:
            return
        for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=wait_s)
                break
            except subprocess.TimeoutExpired:
                continue
        try:  # children that ignored the signal to the leader still get the SIGKILL
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def label_studio_env(data_dir: Path, files_root: Path, token: str) -> dict[str, str]:
    """The environment of the protocol notes §8, verified against Label Studio 1.23.2."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(_LS_ENV_DROP)}
    base.pop("SECRET_KEY", None)
    return {
        **base,
        "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),  # SQLite database and uploads
        "DJANGO_DB": "sqlite",
        "LABEL_STUDIO_USERNAME": LS_EMAIL,
        "LABEL_STUDIO_PASSWORD": LS_PASSWORD,
        "LABEL_STUDIO_USER_TOKEN": token,  # the legacy token the backend is given
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",  # off by default for a new organisation in 1.23
        "SECRET_KEY": "osprey-e2e-fixed-secret",
        "ML_BLOCK_LOCAL_IP": "false",  # 1.23.1+ refuses backends and webhooks on 127.0.0.1 otherwise
        "SSRF_PROTECTION_ENABLED": "false",
        "LOCAL_FILES_SERVING_ENABLED": "true",
        "LOCAL_FILES_DOCUMENT_ROOT": str(files_root),
        "COLLECT_ANALYTICS": "false",
        "SENTRY_DSN": "",  # Label Studio reports errors to sentry.io by default: nothing leaves this machine
        "FRONTEND_SENTRY_DSN": "",
        "LATEST_VERSION_CHECK": "false",
        # Reject predictions whose from_name/to_name/labels/fields do not match the labeling config.
        "fflag_feat_utc_210_prediction_validation_15082025": "true",
        "PYTHONUNBUFFERED": "1",
    }


def start_label_studio(workdir: Path, token: str, port: int | None = None) -> LabelStudio:
    """Start Label Studio on `port` (a free one by default) with its data under `workdir`; wait until up."""
    if not LS_BIN.exists():
        raise FileNotFoundError(
            f"Label Studio {LS_VERSION} is not installed at {LS_BIN}: run `make install-ls` (it creates .venv-ls "
            f"with `pip install label-studio=={LS_VERSION}`)")
    data_dir, files_root = workdir / "data", workdir / "files"
    data_dir.mkdir(parents=True)
    files_root.mkdir(parents=True)
    port = port or free_port()
    log = workdir / "label-studio.log"
    with log.open("ab") as handle:
        proc = subprocess.Popen(
            [str(LS_BIN), "start", "--no-browser", "--port", str(port)], cwd=workdir,
            env=label_studio_env(data_dir, files_root, token), stdout=handle, stderr=subprocess.STDOUT,
            start_new_session=True)  # its own process group, so stop() reaches every child
    url = f"http://127.0.0.1:{port}"
    ls = LabelStudio(url=url, proc=proc, log=log, files_root=files_root,
                     api=httpx.Client(base_url=url, headers={"Authorization": f"Token {token}"},
                                      timeout=120, trust_env=False))

    def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"label-studio exited with {proc.returncode}:\n{ls.tail()}")
        return httpx.get(f"{url}/health", timeout=2, trust_env=False).status_code == 200

    try:
        deadline = time.monotonic() + LS_START_TIMEOUT_S
        while not _quietly(up):
            if time.monotonic() > deadline:
                raise TimeoutError(f"Label Studio did not answer on {url}/health within {LS_START_TIMEOUT_S:.0f} s")
            time.sleep(0.5)
        version = ls.call("GET", "/api/version")["release"]
        assert version == LS_VERSION, f"expected Label Studio {LS_VERSION}, {LS_BIN} is {version}"
    except BaseException:
        print(ls.tail())
        ls.stop()
        raise
    return ls




def _quietly(check: Any) -> bool:
    try:
        return bool(check())
    except (httpx.HTTPError, OSError):
        return False
