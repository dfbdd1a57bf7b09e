"""`osprey run`'s worker supervisor: a worker that dies (OOM killer, SIGKILL, crash) is started again.

Restarts wait OSPREY_WORKER_RESTART_BACKOFF_S, doubled for every fast crash in a row (a run shorter than
OSPREY_WORKER_FAST_CRASH_S), at most 60 s. After OSPREY_WORKER_MAX_FAST_CRASHES fast crashes in a row the
supervisor gives up on that worker: it logs an ERROR with the exit code and records ``gave_up`` with the
reason in ``<prefix>:supervisor``, which /health and the 503 of interactive requests show. When a child
exits, its liveness entry is removed at once, so /health is DOWN from that moment until a new worker beats.

A child that is alive but whose liveness expired ``stale_after_s`` ago (after it had beaten once, while
Redis answered) is hung with the GIL held -- its beat thread cannot run -- and is killed (SIGKILL), then
restarted like any dead worker; its job is retried by the reaper (see backend/queue/worker.py).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import RedisError

logger = logging.getLogger(__name__)

_POLL_S = 0.2
_MAX_BACKOFF_S = 60.0


@dataclass
class Child:
    """One supervised worker process: `name` is its liveness name (passed as `osprey worker --name`)."""

    name: str
    args: list[str]
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    fast_crashes: int = 0
    restart_at: float | None = None
    gave_up: bool = False
    restarts: int = 0
    exit_codes: list[int] = field(default_factory=list)
    seen_live: bool = False  # it has beaten since its start (a model load before the first beat is not a hang)
    hang_kills: int = 0
    next_liveness_check: float = 0.0


class Supervisor:
    """Starts `children` with `spawn(args)`, restarts them with backoff, gives up loudly (see module doc)."""

    def __init__(self, children: Sequence[Child], spawn: Callable[[list[str]], subprocess.Popen],
                 stop: Callable[[subprocess.Popen], None], queue: Any = None, *, backoff_s: float = 1.0,
                 max_fast_crashes: int = 5, fast_crash_s: float = 60.0, stale_after_s: float | None = None):
        self.children = list(children)
        self._spawn = spawn
        self._stop_process = stop
        self.queue = queue  # a JobQueue, for liveness and the supervisor state (None: Redis-free tests)
        self.backoff_s = backoff_s
        self.max_fast_crashes = max(1, int(max_fast_crashes))
        self.fast_crash_s = fast_crash_s
        self.stale_after_s = stale_after_s
        self._redis_ok_since: float | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._record("running", "")
        for child in self.children:
            self._start(child)
        self._thread = threading.Thread(target=self._watch, daemon=True, name="osprey-supervisor")
        self._thread.start()

    def stop(self) -> None:
        """Stop watching, then stop every child (warm shutdown, then SIGKILL)."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            for child in self.children:
                if child.process is not None:
                    self._stop_process(child.process)
                    self._forget(child)

    def pids(self) -> list[int]:
        return [c.process.pid for c in self.children if c.process is not None and c.process.poll() is None]

    # ---- internals ------------------------------------------------------------------------------
    def _start(self, child: Child) -> None:
        child.process = self._spawn(child.args)
        child.started_at = time.monotonic()
        child.restart_at = None
        child.seen_live = False
        logger.info("worker %s started (pid %d)", child.name, child.process.pid)

    def _watch(self) -> None:
        while not self._stopping.wait(_POLL_S):
            with self._lock:
                if self._stopping.is_set():
                    return
                for child in self.children:
                    self._check(child)

    def _check(self, child: Child) -> None:
        now = time.monotonic()
        if child.gave_up:
            return
        if child.restart_at is not None:
            if now >= child.restart_at:
                child.restarts += 1
                self._start(child)
            return
        if child.process is None:
            return
        if child.process.poll() is None:
            self._check_liveness(child)
            return
        code = child.process.returncode
        child.exit_codes.append(code)
        self._forget(child)  # DOWN now, not three heartbeats later
        ran_s = now - child.started_at
        child.fast_crashes = child.fast_crashes + 1 if ran_s < self.fast_crash_s else 1
        if child.fast_crashes >= self.max_fast_crashes:
            child.gave_up = True
            reason = (f"worker {child.name} exited {child.fast_crashes} times in a row within "
                      f"{self.fast_crash_s:g} s of its start (last exit code {code}); `osprey run` stopped "
                      "restarting it: see its log above, fix the cause and restart `osprey run`")
            logger.error(reason)
            self._record("gave_up", reason)
            return
        delay = min(_MAX_BACKOFF_S, self.backoff_s * 2 ** (child.fast_crashes - 1))
        logger.error("worker %s exited with code %s after %.1f s; restarting it in %.1f s", child.name, code,
                     ran_s, delay)
        child.restart_at = now + delay

    def _check_liveness(self, child: Child) -> None:
        """Kill a child that is alive but stopped beating (a native hang holding the GIL)."""
        if self.queue is None or self.stale_after_s is None:
            return
        now = time.time()
        if now < child.next_liveness_check:
            return
        child.next_liveness_check = now + min(1.0, self.stale_after_s / 3)
        try:
            deadline = self.queue.connection.zscore(self.queue.keys.live_workers, child.name)
        except RedisError:
            self._redis_ok_since = None
            return
        if self._redis_ok_since is None:
            self._redis_ok_since = now
        if deadline is None:
            return
        if deadline > now:
            child.seen_live = True
            return
        redis_steady = now - self._redis_ok_since >= self.stale_after_s  # not just back from an outage
        if child.seen_live and redis_steady and now - deadline >= self.stale_after_s:
            child.hang_kills += 1
            logger.error("worker %s (pid %d) is alive but sent no heartbeat for %.0f s: hung (in native code "
                         "holding the GIL?); killing it so that it is replaced", child.name, child.process.pid,
                         now - deadline + self.stale_after_s)
            try:
                os.kill(child.process.pid, signal.SIGKILL)
                self.queue.bump("workers_killed_hung")
            except (OSError, RedisError):
                pass

    def _forget(self, child: Child) -> None:
        if self.queue is None:
            return
        try:
            self.queue.forget_worker(child.name)
        except RedisError as exc:
            logger.warning("could not clear the liveness of %s: %s", child.name, exc)

    def _record(self, state: str, reason: str) -> None:
        if self.queue is None:
            return
        try:
            self.queue.set_supervisor_state(state, reason)
        except RedisError as exc:
            logger.warning("could not record the supervisor state: %s", exc)
