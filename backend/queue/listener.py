"""One listener per web process that wakes every waiting request: waiting costs a thread, not a Redis connection.

Workers PUBLISH the id of every job they finish on ``<prefix>:done`` (in the same Lua script that stores the
output). One thread here holds the only SUBSCRIBE connection and sets the `threading.Event` of each request
waiting for that id. A waiter registers *before* it reads the outputs, so a publish lands either before its
read (it sees the output) or after its registration (its event is set): no lost wake-ups. Pub/sub messages
are lost while the subscription is down (a Redis restart), so after a reconnect every waiter is woken to
read again, and waiters re-check on their own every `sweep_s` anyway.

Before this, each waiter blocked in its own XREAD and held a pooled connection for the whole wait: 200
concurrent editors exhausted redis-py's pool of 100 and got 503s while Redis was idle.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable

from redis import Redis

logger = logging.getLogger(__name__)

_RECONNECT_S = 0.5
_SUBSCRIBE_WAIT_S = 5.0


class DoneListener:
    """Wakes waiters of finished job ids; `watch` returns an Event set when any of the ids may be done."""

    def __init__(self, connection: Redis, channel: str):
        self.connection = connection
        self.channel = channel
        self._lock = threading.Lock()
        self._waiters: dict[str, set[threading.Event]] = {}
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()  # subscribed now
        self._first = threading.Event()  # subscribed at least once
        self._stop = threading.Event()

    def __len__(self) -> int:
        """How many requests wait right now (the admission limit reads it)."""
        with self._lock:
            return len({id(e) for events in self._waiters.values() for e in events})

    def watch(self, job_ids: Iterable[str]) -> threading.Event:
        """Register a waiter for `job_ids`; subscribed on return. Call `unwatch` with the event when done."""
        self._ensure_running()
        event = threading.Event()
        with self._lock:
            for job_id in job_ids:
                self._waiters.setdefault(job_id, set()).add(event)
        return event

    def unwatch(self, job_ids: Iterable[str], event: threading.Event) -> None:
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
                        data = message["data"]
                        self._wake(data.decode() if isinstance(data, bytes) else str(data))
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

    def _wake(self, job_id: str) -> None:
        with self._lock:
            events = list(self._waiters.get(job_id, ()))
        for event in events:
            event.set()

    def _wake_all(self) -> None:
        with self._lock:
            events = {e for events in self._waiters.values() for e in events}
        for event in events:
            event.set()
