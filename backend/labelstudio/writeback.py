"""Write-back: batch predictions that missed Label Studio's time budget reach Label Studio through its API.

Label Studio waits at most 100 s (``ML_TIMEOUT_PREDICT``) for one "Retrieve Predictions" request, for all
its tasks together. /predict waits up to OSPREY_BATCH_BUDGET_S (default 60 s) and then answers with what
finished; the rest keep running and are written with ``POST /api/predictions`` when they are done.

What Label Studio receives for an unfinished task: a placeholder *without* a ``result`` key, e.g.
``{"model_version": "...", "score": null, "osprey_status": "pending", "message": "..."}``. Label Studio
1.23 skips such an entry (it logs it, with our message) and stores no prediction, so the task is not marked
as predicted with an empty result; ``len(results) == len(tasks)`` still holds, so the other tasks are kept.
An empty ``result`` list would be stored as a real (empty) prediction and the task would never be asked
for again -- we never send one for drawn regions, neither in a response nor by write-back. The one
exception is an auto-labeled image on which the proposer found nothing: the empty prediction is its true
answer (backend/labelstudio/autolabel.py ``found_nothing``), so it is written like any other.

Guarantees, and how they are met:

1. *Exactly one deliverer per output.* The web process and the job decide atomically in Redis who
   delivers a batch output (``backend/queue/jobs.py``: ``publish`` / ``claim`` Lua scripts). An output that
   existed when /predict looked goes into the response; one that did not is handed off (the hand-off key
   names ``writeback_job`` and never expires while the job waits), and the job that produces it enqueues
   ``writeback_job`` on the ``writeback`` queue *with its output*, so no TTL can lose it on the way.
2. *No duplicate predictions, and re-predictions are kept.* Dedup is keyed on the job's content (its id
   hashes task, image, regions, plan and model version), not on (task, model_version): a task whose
   regions were edited gets a new prediction.
   - an idempotency record ``<prefix>:wb:<task>:<job_id>`` (30 days) is written after a successful POST,
     and a write-back that finds it does nothing; a lock on the same name serialises concurrent ones;
   - before POSTing, Label Studio's predictions of the task are listed; one with the same model_version
     *and the same result* (a crash between POST and the record, a POST whose answer was lost) is adopted
     instead of creating a second one. An older prediction with other regions is never adopted.
3. *No empty predictions* for drawn regions: such an output is never POSTed (an auto-labeled image with
   no objects is, see above).
4. *One retry policy.* Each run of ``writeback_job`` makes one attempt (the client does not retry); a
   failure without an answer or with a 5xx raises, and RQ re-queues the job after growing intervals
   (``backend/queue/retry.py``: from OSPREY_WRITEBACK_BACKOFF_S, x3, capped, as many as add up to
   OSPREY_WRITEBACK_RETRY_FOR_S) from the writeback worker's scheduler -- nothing sleeps in a worker.
   A 4xx is final at once (retrying cannot fix it).
5. *No task silently without prediction.* A task that ends without a prediction (its image is gone, its
   regions yield nothing, a 4xx, all retries failed) is logged at ERROR, counted
   (``osprey_worker_events_total{event="writeback_undeliverable"}``) and recorded with its reason in the
   ``<prefix>:wb:failed`` hash. It has no prediction of this content, so Label Studio asks for it again at
   the next "Retrieve Predictions" -- never an empty placeholder that stops that.
Without LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY there is no write-back: /predict then returns placeholders
for unfinished tasks without handing them off; their jobs keep running, and the next request for the same
tasks gets the finished outputs at once (deterministic job ids).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from backend.labelstudio.client import LabelStudioClient, LabelStudioError
from backend.queue.jobs import record_undeliverable
from backend.queue.keys import RedisKeys, canonical_json
from backend.queue.retry import NO_RETRY, RetryPolicy

logger = logging.getLogger(__name__)

RECORD_TTL_S = 30 * 24 * 3600
DELIVERY_FUNC = "backend.labelstudio.writeback.writeback_job"  # what the LS routes hand off to


def _field(obj: Any, name: str) -> Any:
    """Read a field of a Label Studio prediction, whether a plain dict or an SDK model."""
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)


class _Counters:
    """The bits of the queue a write-back needs: Redis, key names, the stats hash."""

    def __init__(self, connection: Any, keys: RedisKeys):
        self.connection = connection
        self.keys = keys

    def bump(self, counter: str, amount: int = 1) -> None:
        self.connection.hincrby(self.keys.stats, counter, amount)


class WriteBack:
    """Delivers handed-off outputs to Label Studio, at most one prediction per task and job content.

    `queue` is anything with `.connection` and `.keys` (a JobQueue, or the job's own connection)."""

    def __init__(self, queue: Any, client_factory: Callable[[], Any], lock_timeout_s: float = 120.0):
        self.queue = queue if hasattr(queue, "bump") else _Counters(queue.connection, queue.keys)
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

    def deliver_output(self, job_id: str, task_id: int, output: dict | None) -> str:
        """Deliver the output a predict job handed over (an error output is recorded, not POSTed)."""
        if output is None:
            return self._undeliverable(task_id, job_id, "the job handed over no output")
        if not output.get("ok"):
            return self._undeliverable(task_id, job_id, output["error"]["message"])
        from backend.labelstudio.autolabel import found_nothing
        from backend.labelstudio.results import prediction_from_output

        return self.deliver(task_id, prediction_from_output(output), job_id, allow_empty=found_nothing(output))

    def deliver(self, task_id: int, prediction: dict, job_id: str, allow_empty: bool = False) -> str:
        """POST `prediction` for `task_id` unless this content was delivered already.

        Returns "created", "exists" (adopted an identical prediction), "already_written" or "undeliverable".
        Raises LabelStudioError when Label Studio did not accept it (the caller decides about a retry).
        `allow_empty`: an empty result is the answer (an auto-labeled image without objects), not a failure.
        """
        if not prediction.get("result") and not allow_empty:
            return self._undeliverable(task_id, job_id, "the model suggested nothing (empty predictions are never stored)")
        model_version = prediction["model_version"]
        record_key = self.keys.writeback_record(task_id, job_id)
        lock = self.connection.lock(self.keys.writeback_lock(task_id, job_id),
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
        """One attempt: list, then create only if no identical prediction exists, so a POST whose answer
        was lost (read timeout, 500) is found and adopted by the next attempt instead of sent twice."""
        wanted = canonical_json(prediction["result"])
        for existing in self.client.list_predictions(task_id):
            if (_field(existing, "model_version") == model_version
                    and canonical_json(_field(existing, "result")) == wanted):
                return _field(existing, "id"), "exists"
        created = self.client.create_prediction(task_id, prediction["result"], prediction.get("score"),
                                                model_version)
        return _field(created, "id"), "created"

    def _undeliverable(self, task_id: int, job_id: str, reason: str) -> str:
        record_undeliverable(self.connection, self.keys, task_id, job_id, reason)
        return "undeliverable"


_writers: dict[str, WriteBack] = {}


def writeback_job(payload: dict) -> str:
    """RQ job on the writeback queue (enqueued by name by ``JobQueue.finish``): one delivery attempt.

    A failure worth retrying (no answer, 5xx, 408/429) raises, so RQ re-queues the job after the next
    interval of the retry policy; any other 4xx is final and recorded at once."""
    from rq import get_current_job

    from backend.settings import get_settings

    job = get_current_job()
    if job is None:
        raise RuntimeError("writeback_job runs inside an RQ worker")
    keys = RedisKeys.from_queue_name(job.origin)
    writer = _writers.get(keys.prefix)
    if writer is None:
        settings = get_settings()
        if not settings.label_studio_url or settings.label_studio_api_key is None:
            raise RuntimeError("write-back needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY on the worker")
        writer = WriteBack(_Counters(job.connection, keys),
                           lambda: LabelStudioClient.from_settings(settings, retry=NO_RETRY))
        _writers[keys.prefix] = writer
    task_id, job_id = payload["task_id"], str(payload["job_id"])
    try:
        return writer.deliver_output(job_id, task_id, payload.get("output"))
    except LabelStudioError as exc:
        if RetryPolicy.retryable_status(exc.status):
            logger.warning("write-back of task %s failed (%s); RQ retries it later", task_id, exc)
            raise
        return writer._undeliverable(task_id, job_id, f"Label Studio refused the prediction: {exc}")
