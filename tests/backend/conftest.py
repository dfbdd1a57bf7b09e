"""Integration fixtures for the backend: real Redis, real `osprey worker` subprocesses with the tiny model,
the real server (`osprey serve`) in a subprocess, real HTTP.

- Redis: the shared server on 127.0.0.1:6379, isolated per stack by a unique OSPREY_REDIS_PREFIX (our
  keys, RQ queue names and job ids all carry it); the embedded Redis is exercised by `osprey run`
  (test_server_run.py) and the Redis-outage test starts its own `redis-server` on a free port.
- Label Studio: write-back goes to `FakeLabelStudio`, a stdlib HTTP server implementing the two
  endpoints the backend writes to (`GET/POST /api/predictions/`, shaped as in the protocol notes §8).
  It is a fake because Label Studio itself is not part of this project's environment (the e2e suite
  against a real Label Studio lives apart); everything else in these tests is real.

Stacks are started once per module (a worker loads the tiny model in a few seconds on 2 cores).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import numpy as np
import pytest
import redis
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
LOCAL_REDIS = "redis://127.0.0.1:6379/0"
USER, PASSWORD = "ls-backend", "s3cret-pass-123"
WEBHOOK_SECRET = "hook-secret-456"
LS_TOKEN = "legacytoken1234567890abcdef"
IMAGE_W, IMAGE_H = 64, 48


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except (httpx.HTTPError, redis.RedisError, OSError):
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def synthetic_png(path: Path) -> None:
    img = np.zeros((IMAGE_H, IMAGE_W, 3), dtype=np.uint8)
    img[8:30, 10:40] = (200, 40, 40)
    img[28:46, 36:60] = (30, 30, 220)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)


# ---- a fake Label Studio for write-back -------------------------------------------------------------


class JsonHandler(BaseHTTPRequestHandler):
    """What the local fake HTTP APIs of these tests share: quiet logs, JSON (or raw) answers, LS token auth."""

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, status: int, body: Any, raw: bytes | None = None, ctype: str = "application/json") -> None:
        data = raw if raw is not None else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _authorized(self) -> bool:
        if self.headers.get("Authorization") != f"Token {LS_TOKEN}":
            self._send(401, {"detail": "Authentication credentials were not provided."})
            return False
        return True


class FakeLabelStudio:
    """`GET/POST /api/predictions/` of Label Studio, in memory; checks the legacy-token header.

    `lose_next_answers` makes the next N POSTs store the prediction but answer 500 (the outcome of the
    request is unknown to the client), to check that write-back reconciles instead of duplicating.
    """

    def __init__(self) -> None:
        self.predictions: list[dict] = []
        self.calls: list[tuple[str, str]] = []
        self.lose_next_answers = 0
        self.lock = threading.Lock()
        fake = self

        class Handler(JsonHandler):
            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                with fake.lock:
                    fake.calls.append(("GET", self.path))
                if not self._authorized():
                    return
                if parts.path.rstrip("/") != "/api/predictions":
                    return self._send(404, {"detail": "Not found."})
                task = parse_qs(parts.query).get("task", [None])[0]
                with fake.lock:
                    found = [p for p in fake.predictions if task is None or str(p["task"]) == task]
                self._send(200, found)

            def do_POST(self) -> None:
                parts = urlsplit(self.path)
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with fake.lock:
                    fake.calls.append(("POST", self.path))
                if not self._authorized():
                    return
                if parts.path.rstrip("/") != "/api/predictions":
                    return self._send(404, {"detail": "Not found."})
                with fake.lock:
                    prediction = {"id": len(fake.predictions) + 1, **body}
                    fake.predictions.append(prediction)
                    lose = fake.lose_next_answers > 0
                    fake.lose_next_answers -= int(lose)
                if lose:
                    return self._send(500, {"detail": "Internal server error"})
                self._send(201, prediction)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def for_task(self, task_id: int) -> list[dict]:
        with self.lock:
            return [p for p in self.predictions if p["task"] == task_id]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# ---- server + workers ----------------------------------------------------------------------------


@dataclass
class Stack:
    """One deployment under test: a server subprocess and worker subprocesses sharing one Redis prefix."""

    workdir: Path
    redis_url: str
    prefix: str
    env: dict[str, str]
    port: int = 0
    server: subprocess.Popen | None = None
    workers: list[subprocess.Popen] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)
    _client: httpx.Client | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def files(self) -> Path:
        return self.workdir / "files"

    def _spawn(self, args: list[str], name: str, env: dict[str, str]) -> subprocess.Popen:
        log = self.workdir / f"{name}.log"
        self.logs.append(log)
        handle = open(log, "ab")  # noqa: SIM115 - owned by the process for its lifetime
        return subprocess.Popen([sys.executable, "-m", "backend.cli", *args], cwd=REPO, env=env,
                                stdout=handle, stderr=subprocess.STDOUT)

    def start_server(self, **env: str) -> None:
        self.port = free_port()
        self.server = self._spawn(["serve", "--host", "127.0.0.1", "--port", str(self.port)], "server",
                                  {**self.env, **env})
        wait_for(lambda: httpx.get(self.base_url + "/health", timeout=1).status_code in (200, 503), 30,
                 "the server")  # 503: up, but DOWN until a worker beats

    def start_worker(self, delay_s: float = 0.0, wait: bool = True) -> subprocess.Popen:
        env = {**self.env, "OSPREY_TEST_JOB_DELAY_S": str(delay_s)}
        proc = self._spawn(["worker", "--name", f"{self.prefix}-w{len(self.workers)}"], f"worker{len(self.workers)}", env)
        self.workers.append(proc)
        if wait:
            self.wait_worker_ready(proc)
        return proc

    def wait_worker_ready(self, proc: subprocess.Popen, timeout: float = 90) -> None:
        """Until this worker is registered on the queues (it loaded the model first)."""
        names_before = self.worker_names()

        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"worker exited with {proc.returncode}:\n{self.tail()}")
            return bool(self.worker_names() - names_before) or self._registered(proc.pid)

        wait_for(ready, timeout, "a worker to load the model and register")

    def worker_names(self) -> set[str]:
        r = self.redis()
        return {m.decode() for m in r.smembers(f"rq:workers:{self.prefix}:interactive")}

    def _registered(self, pid: int) -> bool:
        r = self.redis()
        for name in self.worker_names():
            if r.hget(f"rq:worker:{name}", "pid") == str(pid).encode():
                return True
        return False

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url, socket_timeout=5)

    def client(self) -> httpx.Client:
        if self._client is None:
            self._client = httpx.Client(base_url=self.base_url, auth=(USER, PASSWORD), timeout=120)
        return self._client

    def post(self, path: str, body: Any = None, **kwargs: Any) -> httpx.Response:
        return self.client().post(path, json=body, **kwargs)

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.client().get(path, **kwargs)

    def job_runs(self) -> dict[str, int]:
        raw = self.redis().hgetall(f"{self.prefix}:job_runs")
        return {k.decode(): int(v) for k, v in raw.items()}

    def model_version(self) -> str:
        current = self.redis().get(f"{self.prefix}:model:current")
        return json.loads(current)["version"]

    def tail(self, lines: int = 40) -> str:
        out = []
        for log in self.logs:
            if log.exists():
                out.append(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(out)

    def stop(self, proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        for proc in [*self.workers, *([self.server] if self.server else [])]:
            self.stop(proc)
        try:
            purge_prefix(self.redis(), self.prefix)
        except redis.RedisError:
            pass


def purge_prefix(r: redis.Redis, prefix: str) -> None:
    """Delete every key of one test deployment, including its entries in RQ's global sets."""
    for name in r.smembers("rq:workers"):
        if prefix in name.decode():
            r.srem("rq:workers", name)
    for name in r.smembers("rq:queues"):
        if f"rq:queue:{prefix}:" in name.decode():
            r.srem("rq:queues", name)
    keys = list(r.scan_iter(f"{prefix}*")) + list(r.scan_iter(f"rq:*{prefix}*"))
    if keys:
        r.delete(*keys)


@contextmanager
def running(s: Stack, *worker_delays: float) -> Iterator[Stack]:
    """`s` with one worker per entry of `worker_delays` (its OSPREY_TEST_JOB_DELAY_S; none: no worker) and
    the server started; the logs are printed when starting fails, and everything is stopped at the end."""
    try:
        for delay in worker_delays:
            s.start_worker(delay_s=delay)
        s.start_server()
        yield s
    except BaseException:
        print(s.tail())
        raise
    finally:
        s.close()


def make_stack(workdir: Path, redis_url: str = LOCAL_REDIS, ls_url: str | None = None, **env: str) -> Stack:
    prefix = f"t{uuid.uuid4().hex[:10]}"
    files = workdir / "files"
    synthetic_png(files / "imgs" / "a.png")
    base = {k: v for k, v in os.environ.items() if not k.startswith(("OSPREY_", "LABEL_STUDIO_", "BASIC_AUTH_"))}
    base.pop("REDIS_URL", None)
    settings_env = {
        "REDIS_URL": redis_url,
        "OSPREY_REDIS_PREFIX": prefix,
        "MODEL_DIR": str(workdir / "data"),
        "LOCAL_FILES_DOCUMENT_ROOT": str(files),
        "BASIC_AUTH_USER": USER,
        "BASIC_AUTH_PASS": PASSWORD,
        "OSPREY_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "OSPREY_WORKER_HEARTBEAT_S": "1",
        "OSPREY_MAX_NEW_TOKENS": "8",
        "OSPREY_JOB_TIMEOUT_S": "120",
        "LOG_LEVEL": "INFO",
        "PYTHONUNBUFFERED": "1",
    }
    if ls_url:
        settings_env |= {"LABEL_STUDIO_URL": ls_url, "LABEL_STUDIO_API_KEY": LS_TOKEN}
    return Stack(workdir=workdir, redis_url=redis_url, prefix=prefix, env={**base, **settings_env, **env})


@pytest.fixture(scope="session")
def fake_ls() -> Iterator[FakeLabelStudio]:
    fake = FakeLabelStudio()
    yield fake
    fake.close()


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory, fake_ls: FakeLabelStudio) -> Iterator[Stack]:
    """Server + one worker on the Redis at 127.0.0.1:6379 (shared by test_server_api and test_malformed)."""
    with running(make_stack(tmp_path_factory.mktemp("stack"), ls_url=fake_ls.url,
                            OSPREY_MAX_REQUEST_BYTES=str(2 * 1024 * 1024)), 0.0) as s:
        yield s


@pytest.fixture(scope="session")
def configs() -> dict[str, str]:
    root = REPO / "deploy" / "labelstudio"
    return {p.stem: p.read_text() for p in root.glob("*.xml")}


@pytest.fixture(scope="session")
def payloads() -> Any:
    """Builders of request bodies shaped exactly as Label Studio 1.23 sends them (protocol notes §2)."""
    return Payloads()


class Payloads:
    project = "1.1795681025"
    image_url = "/data/local-files/?d=imgs/a.png"

    def task(self, task_id: int = 1, image: str | None = None, annotations: list | None = None) -> dict:
        """A task as TaskSimpleSerializer sends it (§2.4)."""
        return {
            "id": task_id, "data": {"image": image or self.image_url}, "meta": {},
            "created_at": "2026-11-26T08:00:00.000000Z", "updated_at": "2026-11-26T08:00:00.000000Z",
            "is_labeled": bool(annotations), "overlap": 1, "inner_id": task_id, "total_annotations": len(annotations or []),
            "cancelled_annotations": 0, "total_predictions": 0, "comment_count": 0, "unresolved_comment_count": 0,
            "last_comment_updated_at": None, "project": 1, "updated_by": None, "file_upload": 1,
            "comment_authors": [], "annotations": annotations or [], "predictions": [],
        }

    def annotation(self, result: list[dict], annotation_id: int = 1) -> dict:
        return {"id": annotation_id, "result": result, "was_cancelled": False, "ground_truth": False,
                "created_at": "2026-11-26T08:01:00.000000Z", "updated_at": "2026-11-26T08:01:00.000000Z",
                "lead_time": 3.2, "task": 1, "project": 1, "completed_by": 1}

    def predict(self, tasks: list[dict], config: str, context: dict | None = None) -> dict:
        return {"tasks": tasks, "project": self.project, "label_config": config,
                "params": {"login": None, "password": None, "context": context}}

    def setup(self, config: str, extra_params: Any = None) -> dict:
        return {"project": self.project, "schema": config, "hostname": "http://localhost:8080",
                "access_token": "legacytoken1234567890abcdef", "extra_params": extra_params}

    @staticmethod
    def item(type_: str, from_name: str, value: dict, region_id: str, **extra: Any) -> dict:
        return {"original_width": IMAGE_W, "original_height": IMAGE_H, "image_rotation": 0, "value": value,
                "id": region_id, "from_name": from_name, "to_name": "image", "type": type_, "origin": "manual", **extra}

    def keypoint(self, x: float = 30.0, y: float = 40.0, region_id: str = "fBWv1t0S2L", positive: bool = True) -> dict:
        return self.item("keypointlabels", "point",
                         {"x": x, "y": y, "width": 0.32, "keypointlabels": ["cat"], "labels": ["cat"]},
                         region_id, is_positive=positive)

    def rectangle(self, region_id: str = "Xy12ab34cd") -> dict:
        return self.item("rectanglelabels", "rect",
                         {"x": 12.5, "y": 20.0, "width": 30.1, "height": 25.4, "rotation": 0, "rectanglelabels": ["car"]},
                         region_id)

    def polygon(self, region_id: str = "Pq98zx76wv") -> dict:
        return self.item("polygonlabels", "part",
                         {"points": [[10.1, 20.2], [30.0, 22.5], [25.3, 40.0]], "closed": True, "polygonlabels": ["door"]},
                         region_id)

    def brush(self, region_id: str = "Br55uu11aa", rle: list[int] | None = None) -> dict:
        if rle is None:
            from label_studio_sdk.converter.brush import mask2rle

            mask = np.zeros((IMAGE_H, IMAGE_W), dtype=np.uint8)
            mask[8:30, 10:40] = 255
            rle = [int(v) for v in mask2rle(mask)]
        return self.item("brushlabels", "category", {"format": "rle", "rle": rle, "brushlabels": ["cat"]}, region_id)

    def split_rectangle(self, region_id: str = "r1") -> list[dict]:
        """A plain Rectangle region with its <Labels> companion (polygon_rectangle.xml)."""
        geometry = {"x": 10, "y": 20, "width": 30, "height": 40, "rotation": 0}
        return [self.item("rectangle", "box", geometry, region_id),
                self.item("labels", "object", {**geometry, "labels": ["car"]}, region_id)]



@pytest.fixture(scope="session")
def helpers() -> Any:
    """The helpers above, for test modules (importing from a conftest is fragile)."""
    from types import SimpleNamespace

    return SimpleNamespace(free_port=free_port, make_stack=make_stack, running=running, wait_for=wait_for,
                           synthetic_png=synthetic_png, purge_prefix=purge_prefix)
