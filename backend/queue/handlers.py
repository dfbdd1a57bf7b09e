"""The functions RQ workers run.

RQ imports these by name (``backend.queue.handlers.predict_job``) and calls them with one JSON payload of references:
task id, image URL, region encodings and the prediction plan -- never image bytes. They run inside
``osprey worker`` (a SimpleWorker, no fork), which installs the loaded model with ``set_runtime`` once;
the engine and its image-encoding cache live across jobs, so jobs on the same image share the encoding.

Outcomes of ``predict_job``:
- success: publishes ``{"ok": true, "prediction": {...}}``;
- bad input (an unreachable or disallowed image, a malformed region...): publishes an error with a 4xx
  status and returns normally -- retrying would not help;
- anything else raises, so RQ retries the job (``Retry``); after the last retry ``on_job_failure``
  publishes a 502 error so nobody waits for it in vain.
If a batch request handed the job off (it missed the time budget), the output is written to Label Studio
by ``writeback_job`` -- see backend/writeback.py.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from backend.labelstudio.writeback import record_undeliverable
from backend.queue.jobs import (
    BATCH,
    ERROR_TTL_S,
    PUBLISH_LUA,
    JobQueue,
    RedisKeys,
    canonical_json,
    error_output,
    ok_output,
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
    """Predict the regions of one task and publish the output (see the module docstring)."""
    from backend.labelstudio.config import PredictionPlan
    from backend.labelstudio.regions import RegionRef
    from backend.labelstudio.results import prediction
    from backend.service.predict import predict_regions

    rt = get_runtime()
    queue: JobQueue = rt.queue
    job_id = payload["job_id"]
    started = time.perf_counter()
    try:
        image = rt.media.load_image(payload["image_url"])
        plan = PredictionPlan.from_dict(payload["plan"])
        regions = [RegionRef.from_job(r) for r in payload["regions"]]
        items = predict_regions(rt.engine, image, plan, regions, refiner=rt.refiner)
    except ValueError as exc:  # MediaError, RegionError, ImageError, LabelConfigError...: the input is at fault
        status = getattr(exc, "status_code", None) or 422
        output = error_output(status, str(exc), worker=rt.name)
    else:
        output = ok_output(prediction(items, rt.engine.model_version), time.perf_counter() - started, worker=rt.name)

    handed_off = queue.publish(job_id, output)
    if handed_off:
        if output["ok"] and output["prediction"]["result"]:
            queue.enqueue_writeback(job_id, payload["task_id"], output["prediction"]["model_version"])
        else:
            record_undeliverable(queue.connection, queue.keys, payload.get("task_id"), job_id, _reason(output))
    return {"ok": output["ok"], "handed_off": handed_off}


def writeback_job(payload: dict) -> str:
    """Write a handed-off output to Label Studio (idempotent; see backend/writeback.py)."""
    rt = get_runtime()
    writer = rt.writeback()
    return writer.deliver_job_output(payload["job_id"], int(payload["task_id"]))


def on_job_failure(job: Any, connection: Any, exc_type: Any, exc_value: Any, tb: Any) -> None:
    """RQ failure callback: after the last retry, publish an error so waiters stop waiting.

    RQ calls it on every failed attempt (and for jobs of dead workers, from another worker's reaper)
    before deciding about a retry, so only act when no retry is left.
    """
    if job.retries_left:
        return
    prefix = job.origin.rsplit(":", 1)[0]
    keys = RedisKeys(prefix)
    name = getattr(exc_type, "__name__", str(exc_type))
    output = error_output(502, f"prediction failed after its retries: {name}: {exc_value}")
    result_ttl = min(job.result_ttl, ERROR_TTL_S) if job.result_ttl and job.result_ttl > 0 else ERROR_TTL_S
    script = connection.register_script(PUBLISH_LUA)
    handed_off = script(keys=[keys.out(job.id), keys.done(job.id), keys.handoff(job.id), keys.pending, keys.stats],
                        args=[canonical_json(output), result_ttl, job.id, "jobs_failed"])
    if handed_off and job.origin.endswith(f":{BATCH}"):
        task_id = (job.args[0] or {}).get("task_id") if job.args else None
        record_undeliverable(connection, keys, task_id, job.id, _reason(output))


def on_writeback_failure(job: Any, connection: Any, exc_type: Any, exc_value: Any, tb: Any) -> None:
    """RQ failure callback of write-back jobs: after the last retry, record the task (guarantee 4)."""
    if job.retries_left:
        return
    payload = (job.args[0] if job.args else None) or {}
    name = getattr(exc_type, "__name__", str(exc_type))
    record_undeliverable(connection, RedisKeys(job.origin.rsplit(":", 1)[0]), payload.get("task_id"),
                         str(payload.get("job_id")), f"write-back to Label Studio failed: {name}: {exc_value}")


def _reason(output: dict) -> str:
    if output.get("ok"):
        return "the model suggested nothing for its regions (empty predictions are never stored)"
    return output["error"]["message"]
