"""The functions RQ workers run.

RQ imports these by name (``backend.queue.handlers.predict_job``) and calls them with one JSON payload of references:
task id, image URL, region encodings and the prediction plan -- never image bytes. They run inside
``osprey worker`` (a SimpleWorker, no fork), which installs the loaded model with ``set_runtime`` once;
the engine and its image-encoding cache live across jobs, so jobs on the same image share the encoding.

Outcomes of ``predict_job``:
- success: publishes ``{"ok": true, "answers": [...], "regions", "plan", "model_version"}``;
- bad input (an unreachable or disallowed image, a malformed region...): publishes an error with a 4xx
  status and returns normally -- retrying would not help;
- anything else raises, so RQ retries the job (``Retry``); after the last retry ``on_job_failure``
  publishes a 502 error so nobody waits for it in vain.
If a batch request handed the job off (it missed the time budget), ``JobQueue.finish`` enqueues the
delivery function the hand-off names (Label Studio: ``backend.labelstudio.writeback.writeback_job``) on
the ``writeback`` queue, or records the task as undeliverable; this module imports no adapter.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from backend.queue.jobs import (
    BATCH,
    ERROR_TTL_S,
    JobQueue,
    RedisKeys,
    error_output,
    hang_reason,
    publish_output,
    record_undeliverable,
)

logger = logging.getLogger(__name__)

_runtime: Any = None


def set_runtime(runtime: Any) -> None:
    """Install the worker's runtime (engine, media fetcher, queue, write-back); see backend/worker.py."""
    global _runtime
    _runtime = runtime


def get_runtime() -> Any:
    if _runtime is None:
        raise RuntimeError("no worker runtime: jobs run inside `osprey worker`, which loads the model first")
    return _runtime


def predict_job(payload: dict) -> dict:
    """Predict the regions of one task and publish the output (see the module docstring).

    The output carries the neutral answers with the regions and plan they answer, so an adapter can turn
    it into its tool's format wherever it is delivered (backend/labelstudio/results.py).
    """
    rt = get_runtime()
    queue: JobQueue = rt.queue
    started = time.perf_counter()
    with rt.engine_lock:  # the engine is not thread-safe, and a swap must not happen under this job
        output = _predict(rt, payload, started)
    handed_off = queue.finish(payload, output)
    return {"ok": output["ok"], "handed_off": handed_off}


def _predict(rt: Any, payload: dict, started: float) -> dict:
    """The job's output: the answers, or a bad-input error (anything else raises: a bug, retried)."""
    from backend.errors import INPUT_ERRORS, input_status
    from backend.service.predict import predict_regions
    from backend.service.tasks import Plan, RegionSpec

    try:
        plan = Plan.from_dict(payload["plan"])
        specs = [RegionSpec.from_dict(r) for r in payload["regions"]]
        image = rt.media.load_image(payload["image_url"])
        regions = payload["regions"]
        if not specs and payload["plan"].get("autolabel"):  # a region-less task: propose its regions
            from backend.service.autolabel import worker_specs

            specs = worker_specs(rt, image, plan, payload["plan"]["autolabel"])
            regions = [s.to_dict() for s in specs]
        disagreements: list[dict] = []
        if payload["plan"].get("label_mode") == "keep":  # the annotator's label stays (backend/service/autolabel.py)
            from dataclasses import asdict

            from backend.service.autolabel import predict_keep

            answers, kept = predict_keep(rt.engine, image, plan, specs, refiner=rt.refiner)
            disagreements = [asdict(d) for d in kept]
        else:
            answers = predict_regions(rt.engine, image, plan, specs, refiner=rt.refiner)
    except INPUT_ERRORS as exc:  # the project's own bad-input errors only: anything else is a bug, retried
        output = error_output(input_status(exc), str(exc), worker=rt.name)
    else:
        output = {"ok": True, "answers": [a.to_dict() for a in answers], "regions": regions,
                  "plan": payload["plan"], "model_version": rt.engine.model_version,
                  "elapsed_s": time.perf_counter() - started, "worker": rt.name}
        if disagreements:
            output["disagreements"] = disagreements
    return output


def on_job_failure(job: Any, connection: Any, exc_type: Any, exc_value: Any, tb: Any) -> None:
    """RQ failure callback: after the last retry, publish an error so waiters stop waiting.

    RQ calls it on every failed attempt (and for jobs of dead workers, from another worker's reaper)
    before deciding about a retry, so only act when no retry is left.
    """
    if job.retries_left:
        return
    keys = RedisKeys.from_queue_name(job.origin)
    name = getattr(exc_type, "__name__", str(exc_type))
    hung = connection.hget(keys.hung, job.id)
    if hung is not None:  # its worker was killed for hanging in native code (worker.py watchdog)
        output = error_output(504, hang_reason(json.loads(hung)))
    elif name == "AbandonedJobError":  # its worker died (SIGKILL, OOM, a hang holding the GIL) every time
        output = error_output(503, "the worker running this prediction died on every attempt (killed, out of "
                                   "memory, or hung); see the worker log", retry_after_s=30)
    else:
        output = error_output(502, f"prediction failed after its retries: {name}: {exc_value}")
    result_ttl = min(job.result_ttl, ERROR_TTL_S) if job.result_ttl and job.result_ttl > 0 else ERROR_TTL_S
    delivery = publish_output(connection, keys, job.id, output, result_ttl, "jobs_failed")
    if delivery is not None and job.origin.endswith(f":{BATCH}"):
        task_id = (job.args[0] or {}).get("task_id") if job.args else None
        record_undeliverable(connection, keys, task_id, job.id, _reason(output))


def on_delivery_failure(job: Any, connection: Any, exc_type: Any, exc_value: Any, tb: Any) -> None:
    """RQ failure callback of delivery (write-back) jobs: after the last retry, record the task."""
    if job.retries_left:
        return
    payload = (job.args[0] if job.args else None) or {}
    name = getattr(exc_type, "__name__", str(exc_type))
    record_undeliverable(connection, RedisKeys.from_queue_name(job.origin), payload.get("task_id"),
                         str(payload.get("job_id")), f"write-back failed after its retries: {name}: {exc_value}")


on_writeback_failure = on_delivery_failure  # the name jobs enqueued before the rename carry


def _reason(output: dict) -> str:
    if output.get("ok"):
        return "the model suggested nothing for the regions drawn (such an empty prediction is not stored)"
    return output["error"]["message"]
