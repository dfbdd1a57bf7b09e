"""One listener per web process that wakes every waiting request: waiting costs a thread, not a Redis connection.

Workers PUBLISH every job they finish on ``<prefix>:done`` (in the same Lua script that stores the output):
the job id, then a newline and the output itself when it is small (``MESSAGE_OUTPUT_MAX`` bytes; a large
output, e.g. autolabel brushes, is read from its key). One thread here holds the only SUBSCRIBE connection
and hands the output (or only a wake-up) to each request waiting for that id, so the usual interactive
answer costs no read after the publish. A waiter registers *before* it reads the outputs, so a publish
lands either before its read (it sees the output) or after its registration (it is woken): no lost
wake-ups. Pub/sub messages
are lost while the subscription is down (a Redis restart), so after a reconnect every waiter is woken to
read again, and waiters re-check on their own every `sweep_s` anyway.

Before this, each waiter blocked in its own XREAD and held a pooled connection for the whole wait: 200
concurrent editors exhausted redis-py's pool of 100 and got 503s while Redis was idle.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterable

from redis import Redis

logger = logging.getLogger(__name__)

_RECONNECT_S = 0.5
_SUBSCRIBE_WAIT_S = 5.0
MESSAGE_OUTPUT_MAX = 65536  # outputs up to this many bytes travel in the done message itself


class Waiter(threading.Event):
    """Set when any watched job may be done; `take` returns the outputs the done messages carried."""

    def __init__(self) -> None:
        super().__init__()
        self._outputs: dict[str, dict] = {}
        self._lock = threading.Lock()

    def deliver(self, job_id: str, output: dict | None) -> None:
        if output is not None:
            with self._lock:
                self._outputs[job_id] = output
        self.set()

    def take(self, job_ids: Iterable[str]) -> dict[str, dict]:
        with self._lock:
            return {j: self._outputs.pop(j) for j in job_ids if j in self._outputs}


def parse_message(data: bytes | str) -> tuple[str, dict | None]:
    """A done message: ``<job id>``, or ``<job id>``, a newline and the output JSON; an unreadable output is
    only a wake-up."""
    text = data.decode() if isinstance(data, bytes) else str(data)
    job_id, _, body = text.partition("\n")
    if not body:
        return job_id, None
    try:
        output = json.loads(body)
    except ValueError:
        return job_id, None
    return job_id, output if isinstance(output, dict) else None


class DoneListener:
    """Wakes waiters of finished job ids; `watch` returns a `Waiter` set when any of the ids may be done."""

    def __init__(self, connection: Redis, channel: str):
        self.connection = connection
        self.channel = channel
        self._lock = threading.Lock()
        self._waiters: dict[str, set[Waiter]] = {}
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()  # subscribed now
        self._first = threading.Event()  # subscribed at least once
        self._stop = threading.Event()

    def __len__(self) -> int:
        """How many requests wait right now (the admission limit reads it)."""
        with self._lock:
            return len({id(e) for events in self._waiters.values() for e in events})

    def watch(self, job_ids: Iterable[str]) -> Waiter:
        """Register a waiter for `job_ids`; subscribed on return. Call `unwatch` with it when done."""
        self._ensure_running()
        event = Waiter()
        with self._lock:
            for job_id in job_ids:
                self._waiters.setdefault(job_id, set()).add(event)
        return event

    def unwatch(self, job_ids: Iterable[str], event: Waiter) -> None:
        with self._lock:
            for job_id in job_ids:
                events = self._waiters.get(job_id)
                if events is not None:
                    events.discard(event)
                    if not events:
                        del self._waiters[job_id]

    def close(self) -> None:
        self._stop.set()

    # ---- the listener thread ------------------------------------------------------------------
    def _ensure_running(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            with self._lock:
                if self._thread is None or not self._thread.is_alive():
                    self._ready.clear()
                    self._thread = threading.Thread(target=self._run, daemon=True, name="osprey-done-listener")
                    self._thread.start()
        # Wait for the first subscription only; while reconnecting later, waiters rely on their re-reads.
        if not self._first.is_set() and not self._first.wait(_SUBSCRIBE_WAIT_S):
            # Redis is unreachable: the waiter still works by its periodic re-reads (and fails there).
            logger.warning("job listener: not subscribed to %s yet; waiters poll until it is", self.channel)

    def _run(self) -> None:
        while not self._stop.is_set():
            pubsub = self.connection.pubsub(ignore_subscribe_messages=False)
            try:
                pubsub.subscribe(self.channel)
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message is None:
                        continue
                    if message["type"] == "subscribe":
                        self._ready.set()
                        self._first.set()
                        self._wake_all()  # anything published while we were not subscribed
                    elif message["type"] == "message":
                        self._wake(*parse_message(message["data"]))
            except Exception as exc:  # noqa: BLE001 - reconnect on anything; waiters re-read meanwhile
                if self._ready.is_set():
                    logger.warning("job listener lost its subscription (%s); reconnecting", exc)
                self._ready.clear()
                self._wake_all()
                time.sleep(_RECONNECT_S)
            finally:
                try:
                    pubsub.close()
                except Exception:  # noqa: BLE001
                    pass

    def _wake(self, job_id: str, output: dict | None = None) -> None:
        with self._lock:
            events = list(self._waiters.get(job_id, ()))
        for event in events:
            event.deliver(job_id, output)

    def _wake_all(self) -> None:
        with self._lock:
            events = {e for events in self._waiters.values() for e in events}
        for event in events:
            event.set()
