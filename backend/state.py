"""What every route of the web process shares: settings, the Redis job queue (made lazily), metrics.

The web process never loads the model: it parses requests, enqueues jobs with references only and waits
for their outputs. Adapters (Label Studio, CVAT) get this object from the app factory.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from fastapi import HTTPException
from fastapi.responses import JSONResponse

from backend.auth import redact
from backend.metrics import Metrics
from backend.queue.jobs import JobQueue
from backend.queue.redis import QueueUnavailable, connect, connect_for, redis_url
from backend.settings import Settings

HEALTH_REDIS_TIMEOUT_S = 0.4  # each connect or command of the plain /health: inside Label Studio's 1 s check


class AppState:
    """Per-app state; the Redis connection is made on first use, so the server starts while Redis is down."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.url = redis_url(settings)
        self.metrics = Metrics()
        self.metrics.watch_queue(self._snapshot)
        self._queue: JobQueue | None = None
        self._health_queue: JobQueue | None = None
        self._lock = threading.Lock()
        self.last_model: dict | None = None
        self._model_read_at = 0.0

    def queue(self) -> JobQueue:
        if self._queue is None:
            with self._lock:
                if self._queue is None:
                    self._queue = JobQueue(connect_for(self.settings), self.settings)
        return self._queue

    def health_queue(self) -> JobQueue:
        """The plain /health's own client: connects and commands give up after HEALTH_REDIS_TIMEOUT_S, no
        retries. The shared pool waits up to 10 s per command (right for jobs); a Redis that stops answering
        (stalled, partitioned, SIGSTOPped) would then hold /health past Label Studio's 1 s timeout, and
        Label Studio would report the backend unreachable instead of DOWN with the reason."""
        if self._health_queue is None:
            with self._lock:
                if self._health_queue is None:
                    t = HEALTH_REDIS_TIMEOUT_S
                    connection = connect(self.url, socket_timeout=t, connect_timeout=t, pool_timeout_s=t,
                                         max_connections=8, retries=0)  # /health runs on 4 threads of its own
                    self._health_queue = JobQueue(connection, self.settings)
        return self._health_queue

    def _snapshot(self) -> dict[str, Any] | None:
        return self.queue().snapshot()

    def unavailable(self, exc: Exception) -> JSONResponse:
        if isinstance(exc, QueueUnavailable):
            message = str(exc)
        else:
            message = (f"the job queue is unavailable: Redis at {redact(self.url)} does not answer "
                       f"({type(exc).__name__}: {exc}); requests work again as soon as it is back")
        return JSONResponse({"detail": message}, status_code=503, headers={"Retry-After": "5"})

    def model_version(self, wait_s: float = 0.0, max_age_s: float = 0.0) -> str:
        """The version workers serve, as announced in Redis; waits up to `wait_s` for the first worker.

        `max_age_s`: a version read that long ago is still good (/predict: it only names the job, whose
        output carries the version that really answered; a promotion shows up at most that late)."""
        if max_age_s > 0 and self.last_model and time.monotonic() - self._model_read_at < max_age_s:
            return self.last_model["version"]
        deadline = time.monotonic() + wait_s
        while True:
            current = self.queue().current_model()
            if current:
                self.last_model = current
                self._model_read_at = time.monotonic()
                return current["version"]
            if time.monotonic() >= deadline:
                raise HTTPException(
                    503,
                    "no worker has loaded a model yet: start `osprey worker` (or `osprey run`) with the same "
                    "REDIS_URL and OSPREY_REDIS_PREFIX as this server",
                )
            time.sleep(0.1)
