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
    and starts it again on the same port and data dir, as a restarted container would."""

    def __init__(self, workdir: Path, password: str = "r3dis-pass-xyz", appendonly: bool = True):
        self.dir = workdir / "redis"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.password = password
        self.appendonly = appendonly
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
        args += ["--appendonly", "yes", "--appendfsync", "everysec"] if self.appendonly else ["--appendonly", "no"]
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
