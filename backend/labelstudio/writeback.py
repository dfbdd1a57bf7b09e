"""Write-back: batch predictions that missed Label Studio's time budget reach Label Studio through its API.

Label Studio waits at most 100 s (``ML_TIMEOUT_PREDICT``) for one "Retrieve Predictions" request, for all
its tasks together. /predict waits up to OSPREY_BATCH_BUDGET_S (default 60 s) and then answers with what
finished; the rest keep running and are written with ``POST /api/predictions`` when they are done.

What Label Studio receives for an unfinished task: a placeholder *without* a ``result`` key, e.g.
``{"model_version": "...", "score": null, "osprey_status": "pending", "message": "..."}``. Label Studio
1.23 skips such an entry (it logs it, with our message) and stores no prediction, so the task is not marked
as predicted with an empty result; ``len(results) == len(tasks)`` still holds, so the other tasks are kept.
An empty ``result`` list would be stored as a real (empty) prediction and the task would never be asked
for again -- we never send one, neither in a response nor by write-back.

Guarantees, and how they are met:

1. *Exactly one deliverer per output.* The web process and the job decide atomically in Redis who
   delivers a batch output (``backend/queue.py``: ``publish`` / ``claim`` Lua scripts). An output that
   existed when /predict looked goes into the response; one that did not is handed off, and the job that
   produces it enqueues ``writeback_job``. No output goes both ways.
2. *No duplicate predictions.* Label Studio keeps at most one prediction of ours per (task, model_version):
   - an idempotency record ``<prefix>:wb:<task>:<model_version>`` in Redis (30 days) is written after a
     successful POST, and a write-back that finds it does nothing;
   - a Redis lock per (task, model_version) serialises concurrent write-backs of the same task;
   - before POSTing, Label Studio's own predictions of the task are listed; if one with this model_version
     exists (a crash between POST and the record, or Label Studio stored one from a response), it is
     adopted instead of creating a second one.
3. *No empty predictions.* An output without result items is never POSTed.
4. *No task silently without prediction.* Jobs are retried when their worker dies (StartedJobRegistry
   cleanup + ``Retry``) and write-back jobs are retried when Label Studio is unreachable (backoff inside
   the job, then RQ's ``Retry``; their failure callback records the task after the last one). A task that still
   ends without a prediction (its image is gone, its regions yield nothing, all retries failed) is logged
   at ERROR, counted (``osprey_worker_events_total{event="writeback_undeliverable"}``) and recorded with
   its reason in the ``<prefix>:wb:failed`` hash. It has no prediction of this model_version, so Label
   Studio asks for it again at the next "Retrieve Predictions" -- never an empty placeholder that stops that.
Without LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY there is no write-back: /predict then returns placeholders
for unfinished tasks without handing them off; their jobs keep running, and the next request for the same
tasks gets the finished outputs at once (deterministic job ids).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

from backend.queue.jobs import JobQueue, RedisKeys, canonical_json

logger = logging.getLogger(__name__)

RECORD_TTL_S = 30 * 24 * 3600
_ATTEMPTS = 4  # tries per write-back job (1, 2, 4 s apart) before RQ's own retry takes over


def _field(obj: Any, name: str) -> Any:
    """Read a field of a Label Studio prediction, whether a plain dict or an SDK model."""
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)


class WriteBack:
    """Delivers handed-off outputs to Label Studio, at most one prediction per (task, model_version)."""

    def __init__(self, queue: JobQueue, client_factory: Callable[[], Any], lock_timeout_s: float = 120.0):
        self.queue = queue
        self.connection = queue.connection
        self.keys = queue.keys
        self._client_factory = client_factory
        self._client: Any = None
        self.lock_timeout_s = lock_timeout_s

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = self._client_factory()
        return self._client

    def deliver_job_output(self, job_id: str, task_id: int) -> str:
        output = self.queue.outputs([job_id]).get(job_id)
        if output is None:
            return self._undeliverable(task_id, job_id, "its output expired before the write-back ran")
        if not output.get("ok"):
            return self._undeliverable(task_id, job_id, output["error"]["message"])
        return self.deliver(task_id, output["prediction"], job_id)

    def deliver(self, task_id: int, prediction: dict, job_id: str) -> str:
        """POST `prediction` for `task_id` unless Label Studio already has one of its model_version.

        Returns "created", "exists" (adopted an existing prediction), "already_written" or "undeliverable".
        """
        if not prediction.get("result"):
            return self._undeliverable(task_id, job_id, "the model suggested nothing (empty predictions are never stored)")
        model_version = prediction["model_version"]
        record_key = self.keys.writeback_record(task_id, model_version)
        lock = self.connection.lock(self.keys.writeback_lock(task_id, model_version),
                                    timeout=self.lock_timeout_s, blocking_timeout=self.lock_timeout_s)
        with lock:
            if self.connection.exists(record_key):
                return "already_written"
            prediction_id, outcome = self._post_once(task_id, prediction, model_version)
            self.connection.set(record_key, canonical_json(
                {"prediction_id": prediction_id, "job_id": job_id, "outcome": outcome, "at": time.time()}),
                ex=RECORD_TTL_S)
        self.queue.bump(f"writeback_{outcome}")
        logger.info("write-back of task %s (model %s): %s prediction %s", task_id, model_version, outcome,
                    prediction_id)
        return outcome

    def _post_once(self, task_id: int, prediction: dict, model_version: str) -> tuple[Any, str]:
        """List, then create only if absent; every retry lists again, so a POST whose answer was lost
        (read timeout, 500) is found and adopted instead of being sent twice."""
        for attempt in range(_ATTEMPTS):
            try:
                existing = [p for p in self.client.list_predictions(task_id)
                            if _field(p, "model_version") == model_version]
                if existing:
                    return _field(existing[0], "id"), "exists"
                created = self.client.create_prediction(task_id, prediction["result"], prediction.get("score"),
                                                        model_version)
                return _field(created, "id"), "created"
            except Exception as exc:  # noqa: BLE001 - any client error is retried the same way
                if attempt == _ATTEMPTS - 1:
                    raise  # RQ retries the write-back job
                logger.warning("write-back of task %s failed (%s); retrying", task_id, exc)
                time.sleep(2**attempt)
        raise AssertionError("unreachable")

    def _undeliverable(self, task_id: int, job_id: str, reason: str) -> str:
        record_undeliverable(self.connection, self.keys, task_id, job_id, reason)
        return "undeliverable"


def record_undeliverable(connection: Any, keys: RedisKeys, task_id: Any, job_id: str, reason: str) -> None:
    """A handed-off task that gets no prediction: log, count and keep the reason (guarantee 4)."""
    logger.error("task %s gets no prediction (job %s): %s", task_id, job_id, reason)
    connection.hset(keys.writeback_failed, str(task_id),
                    json.dumps({"job_id": job_id, "reason": reason, "at": time.time()}))
    connection.hincrby(keys.stats, "writeback_undeliverable", 1)
