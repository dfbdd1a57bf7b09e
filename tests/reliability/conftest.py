"""Fixtures of the fault suite: the backend suite's real-process helpers (tests/backend/conftest.py), reused.

Everything is real: Redis (the shared server with a unique key prefix, or a `redis-server` a test starts on a
free port), `osprey serve` / `osprey worker` / `osprey run` subprocesses with the tiny model, real HTTP.
Label Studio is the in-memory fake of the backend suite (its write-back endpoints), which a test can stop
and start again on the same port to play an outage.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from backend.queue.jobs import JobQueue
from backend.settings import Settings
from tests.backend.conftest import (  # noqa: F401 - fixtures shared with the backend suite
    LOCAL_REDIS,
    FakeLabelStudio,
    Stack,
    configs,
    fake_ls,
    free_port,
    helpers,
    make_stack,
    payloads,
    purge_prefix,
    wait_for,
)


@pytest.fixture()
def queue() -> Iterator[JobQueue]:
    """A JobQueue on the shared Redis under a fresh prefix (no worker, no HTTP)."""
    settings = Settings(osprey_redis_prefix=f"rel{uuid.uuid4().hex[:10]}", osprey_job_retries=1,
                        osprey_result_ttl_s=120)
    connection = redis.Redis.from_url(LOCAL_REDIS)
    q = JobQueue(connection, settings)
    yield q
    purge_prefix(connection, q.keys.prefix)


class RedisServer:
    """A real `redis-server` on a free port, production-like: AOF (everysec), noeviction, a password.

    `restart()` stops it (SIGTERM: Redis fsyncs its AOF on a clean shutdown; `kill=True` is a SIGKILL)
    and starts it again on the same port and data dir, as a restarted container would. `fsync="always"`
    fsyncs the AOF on every write, so even a SIGKILL loses no acknowledged write."""

    def __init__(self, workdir: Path, password: str = "r3dis-pass-xyz", appendonly: bool = True,
                 fsync: str = "everysec"):
        self.dir = workdir / "redis"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.password = password
        self.appendonly = appendonly
        self.fsync = fsync
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=5)

    def start(self) -> None:
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
                "--requirepass", self.password, "--maxmemory", "256mb", "--maxmemory-policy", "noeviction",
                "--save", ""]
        args += ["--appendonly", "yes", "--appendfsync", self.fsync] if self.appendonly else ["--appendonly", "no"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: self.client().ping(), 15, "redis-server")

    def stop(self, kill: bool = False) -> None:
        if self.proc is not None and self.proc.poll() is None:
            (self.proc.kill if kill else self.proc.terminate)()
            self.proc.wait(timeout=15)

    def restart(self, kill: bool = False) -> None:
        self.stop(kill)
        self.start()


@pytest.fixture()
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    yield server
    server.stop()


# ---- `osprey run` (embedded Redis unless REDIS_URL is given) ------------------------------------------------

REPO = Path(__file__).resolve().parents[2]


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


class OspreyRun:
    """`osprey run` in a subprocess (its own session), open auth, the tiny model, 1 s heartbeats."""

    def __init__(self, workdir: Path, **env: str):
        import os
        import sys

        synthetic = workdir / "files" / "imgs" / "a.png"
        if not synthetic.exists():
            from tests.backend.conftest import synthetic_png

            synthetic_png(synthetic)
        base = {k: v for k, v in os.environ.items()
                if not k.startswith(("OSPREY_", "LABEL_STUDIO_", "BASIC_AUTH_")) and k != "REDIS_URL"}
        self.env = base | {"MODEL_DIR": str(workdir / "data"), "LOCAL_FILES_DOCUMENT_ROOT": str(workdir / "files"),
                           "OSPREY_MODEL": "tiny", "OSPREY_WORKER_HEARTBEAT_S": "1", "OSPREY_MAX_NEW_TOKENS": "8",
                           "PYTHONUNBUFFERED": "1",
                           "OSPREY_REDIS_PREFIX": f"run{uuid.uuid4().hex[:8]}", **env}
        self.port = free_port()
        self.log_path = workdir / f"run-{self.port}.log"
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "backend.cli", "run", "--host", "127.0.0.1", "--port",
                                      str(self.port)], cwd=REPO, env=self.env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.base_url = f"http://127.0.0.1:{self.port}"

    def health(self, **params: str):
        import httpx

        return httpx.get(self.base_url + "/health", params=params, timeout=5)

    def wait_up(self, timeout: float = 180) -> None:
        wait_for(lambda: self.proc.poll() is None and self.health().status_code == 200, timeout, "osprey run UP")

    def post(self, path: str, body: dict, timeout: float = 120):
        import httpx

        return httpx.post(self.base_url + path, json=body, timeout=timeout)

    def worker_pids(self) -> set[int]:
        """The prediction worker(s) among the children (not the write-back or training worker, not Redis)."""
        found = set()
        for pid in _children(self.proc.pid):
            try:
                cmdline = (Path("/proc") / str(pid) / "cmdline").read_bytes()
            except OSError:
                continue
            if b"backend.cli\x00worker" in cmdline and b"interactive" in cmdline:
                found.add(pid)
        return found

    def tail(self, chars: int = 6000) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        import os
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


@pytest.fixture()
def osprey_run(tmp_path: Path):
    """A factory of `OspreyRun`s, all stopped (and their logs printed on failure) at the end."""
    runs: list[OspreyRun] = []

    def start(**env: str) -> OspreyRun:
        run = OspreyRun(tmp_path, **env)
        runs.append(run)
        return run

    yield start
    for run in runs:
        run.stop()


class RestartableLabelStudio(FakeLabelStudio):
    """The backend suite's fake Label Studio, which can go down (`stop`) and come back (`start`) on its port,
    keeping the predictions it stored."""

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def start(self) -> None:
        import threading
        from http.server import ThreadingHTTPServer

        handler = self.server.RequestHandlerClass
        port = int(self.url.rsplit(":", 1)[1])
        self.server = wait_for(lambda: ThreadingHTTPServer(("127.0.0.1", port), handler), 30, "the port again")
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def posts(self) -> int:
        with self.lock:
            return sum(1 for method, path in self.calls if method == "POST")


@pytest.fixture()
def flaky_ls() -> Iterator[RestartableLabelStudio]:
    fake = RestartableLabelStudio()
    yield fake
    try:
        fake.close()
    except OSError:
        pass


def batch_body(builders, label_configs, task_ids, project: str = "1.1795681025") -> dict:
    """A Retrieve-Predictions batch: one annotated polygon per task (so every task has a region)."""
    tasks = [builders.task(t, annotations=[builders.annotation([builders.polygon(f"p{t}")])]) for t in task_ids]
    body = builders.predict(tasks, label_configs["polygon_rectangle"])
    body["project"] = project
    return body


def written_once(fake: FakeLabelStudio, task_ids) -> bool:
    """Every task has exactly one prediction in the fake Label Studio (for wait_for)."""
    return all(len(fake.for_task(t)) == 1 for t in task_ids)
