"""RQ queues, deterministic job ids, and the hand-off protocol between the web process and the workers.

Queues. Two RQ queues, ``<prefix>:interactive`` and ``<prefix>:batch``. Workers listen on both in that
order, so a region drawn in the editor never waits behind a 10,000-task pre-labelling run. Jobs use RQ's
``JSONSerializer`` (never pickle: whoever can write to Redis must not get code execution in a GPU worker)
and carry references only -- task id, image URL, region encodings, the prediction plan -- never image bytes.

Job ids are a hash of (kind, model_version, task id, image URL, regions, plan), so the same request twice
(Label Studio retries, or a task opened twice) finds the existing job instead of doing the work again;
enqueueing uses RQ's atomic ``unique=True``. A job that failed, or whose output expired, is started afresh.

Outputs. A job does not return its prediction through RQ; it *publishes* it with one Lua script:

    out:<job_id>      JSON output (a prediction, or an error with an HTTP status), TTL = OSPREY_RESULT_TTL_S
    done:<job_id>     a one-entry stream written with ``out``; waiters block on it with XREAD (no polling)
    handoff:<job_id>  set when a batch /predict stopped waiting for this job; the output then goes to
                      Label Studio through the API (backend/writeback.py)

``publish`` (worker) and ``claim`` (web) are Lua scripts, so Redis orders them: a batch output is either
claimed for the HTTP response (it existed, no hand-off) or handed off (it did not exist yet), never both
and never neither. See backend/writeback.py for what happens after a hand-off.

Reliability. Jobs are enqueued with ``Retry(max=OSPREY_JOB_RETRIES)``. Workers heartbeat their running job
every OSPREY_WORKER_HEARTBEAT_S; if a worker dies (SIGKILL, OOM, power), its StartedJobRegistry entry
expires after three missed beats and another worker's reaper (``reap``) retries the job. ``reap`` also
re-queues a job that was popped by a worker killed before it registered the job as started.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from redis import Redis
from rq import Callback, Queue, Retry
from rq.exceptions import DuplicateJobError, NoSuchJobError
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer
from rq.timeouts import TimerDeathPenalty

logger = logging.getLogger(__name__)

PREDICT_FUNC = "backend.queue.handlers.predict_job"
WRITEBACK_FUNC = "backend.queue.handlers.writeback_job"
FAILURE_CALLBACK = "backend.queue.handlers.on_job_failure"
WRITEBACK_FAILURE_CALLBACK = "backend.queue.handlers.on_writeback_failure"

INTERACTIVE = "interactive"
BATCH = "batch"
KINDS = (INTERACTIVE, BATCH)

_PREFIX_RE = re.compile(r"[A-Za-z0-9_.-]+")
_XREAD_CHUNK = 256  # streams per XREAD call
ERROR_TTL_S = 30  # error outputs expire fast: the same request after a fix (file uploaded...) runs again

# KEYS: out, done, handoff, pending, stats. ARGV: output json, ttl, job id, counter to bump.
# Returns 1 when the job was handed off.
PUBLISH_LUA = """
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('XADD', KEYS[2], 'MAXLEN', '1', '*', 'done', '1')
redis.call('EXPIRE', KEYS[2], ARGV[2])
redis.call('ZREM', KEYS[4], ARGV[3])
redis.call('HINCRBY', KEYS[5], ARGV[4], 1)
return redis.call('EXISTS', KEYS[3])
"""

# KEYS: out, handoff. ARGV: ttl, allow_handoff (1/0).
# Returns 'handoff' (the job delivers by write-back), 'response' (the caller delivers) or 'pending'.
CLAIM_LUA = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 'handoff' end
if redis.call('EXISTS', KEYS[1]) == 1 then return 'response' end
if ARGV[2] == '1' then
  redis.call('SET', KEYS[2], '1', 'EX', ARGV[1])
  return 'handoff'
end
return 'pending'
"""


class RedisKeys:
    """Every Redis key and queue name of one deployment, under one prefix (tests use a unique one)."""

    def __init__(self, prefix: str):
        if not _PREFIX_RE.fullmatch(prefix):
            raise ValueError(f"OSPREY_REDIS_PREFIX must match [A-Za-z0-9_.-]+, got {prefix!r}")
        self.prefix = prefix

    def queue_name(self, kind: str) -> str:
        return f"{self.prefix}:{kind}"

    def out(self, job_id: str) -> str:
        return f"{self.prefix}:out:{job_id}"

    def done(self, job_id: str) -> str:
        return f"{self.prefix}:done:{job_id}"

    def handoff(self, job_id: str) -> str:
        return f"{self.prefix}:handoff:{job_id}"

    def writeback_record(self, task_id: int, model_version: str) -> str:
        return f"{self.prefix}:wb:{task_id}:{model_version}"

    def writeback_lock(self, task_id: int, model_version: str) -> str:
        return f"{self.prefix}:wblock:{task_id}:{model_version}"

    @property
    def writeback_failed(self) -> str:
        return f"{self.prefix}:wb:failed"

    @property
    def pending(self) -> str:
        """Sorted set of enqueued-but-unpublished job ids (score = enqueue time), for lost-job recovery."""
        return f"{self.prefix}:pending"

    @property
    def lost(self) -> str:
        return f"{self.prefix}:lost"

    @property
    def job_runs(self) -> str:
        """Hash job id -> number of executions started (retries and duplicates show up here)."""
        return f"{self.prefix}:job_runs"

    @property
    def stats(self) -> str:
        """Hash of worker-side counters (exported by /metrics)."""
        return f"{self.prefix}:stats"

    @property
    def reaper_lock(self) -> str:
        return f"{self.prefix}:reaper_lock"

    @property
    def model_source(self) -> str:
        """What workers should serve: a preset name or model directory. Promotion writes it."""
        return f"{self.prefix}:model:source"

    @property
    def model_current(self) -> str:
        """JSON {source, version, worker, at} of the model a worker last loaded (what /setup reports)."""
        return f"{self.prefix}:model:current"

    @property
    def model_versions(self) -> str:
        """Sorted set version -> first time a worker served it (GET /versions)."""
        return f"{self.prefix}:model:versions"

    @property
    def events(self) -> str:
        """Stream of Label Studio webhook events (consumed by training)."""
        return f"{self.prefix}:events"


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def make_job_id(prefix: str, kind: str, model_version: str, task_id: Any, image_url: str,
                regions: Sequence[dict], plan: dict) -> str:
    """Deterministic job id: the same work always maps to the same id (no ':' -- RQ splits on it)."""
    digest = hashlib.sha256(
        canonical_json([kind, model_version, task_id, image_url, list(regions), plan]).encode()
    ).hexdigest()[:40]
    return f"{prefix}-{kind}-{digest}"


@dataclass
class JobSpec:
    """One unit of work: predict the regions of one task. Becomes the JSON payload of an RQ job."""

    kind: str
    task_id: int | None
    image_url: str
    regions: list[dict]
    plan: dict
    model_version: str
    prefix: str
    job_id: str = field(init=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown job kind {self.kind!r}")
        self.job_id = make_job_id(self.prefix, self.kind, self.model_version, self.task_id, self.image_url,
                                  self.regions, self.plan)

    def payload(self) -> dict:
        return {
            "job_id": self.job_id,
            "kind": self.kind,
            "task_id": self.task_id,
            "image_url": self.image_url,
            "regions": self.regions,
            "plan": self.plan,
            "model_version": self.model_version,
        }


def ok_output(prediction: dict, elapsed_s: float, worker: str) -> dict:
    return {"ok": True, "prediction": prediction, "elapsed_s": elapsed_s, "worker": worker}


def error_output(status: int, message: str, worker: str = "") -> dict:
    return {"ok": False, "error": {"status": int(status), "message": message}, "worker": worker}


class JobQueue:
    """Enqueue, wait for and hand off prediction jobs; shared by the web process and the workers."""

    def __init__(self, connection: Redis, settings: Any):
        self.connection = connection
        self.settings = settings
        self.keys = RedisKeys(settings.osprey_redis_prefix)
        self.result_ttl = int(settings.osprey_result_ttl_s)
        self.queues = {
            kind: Queue(self.keys.queue_name(kind), connection=connection, serializer=JSONSerializer,
                        default_timeout=int(settings.osprey_job_timeout_s))
            for kind in KINDS
        }
        self._publish = connection.register_script(PUBLISH_LUA)
        self._claim = connection.register_script(CLAIM_LUA)

    @property
    def interactive(self) -> Queue:
        return self.queues[INTERACTIVE]

    @property
    def batch(self) -> Queue:
        return self.queues[BATCH]

    def ordered_queues(self) -> list[Queue]:
        """The order workers serve queues in: interactive first."""
        return [self.queues[INTERACTIVE], self.queues[BATCH]]

    # ---- web side -------------------------------------------------------------------------------

    def _retry(self) -> Retry | None:
        retries = int(self.settings.osprey_job_retries)
        return Retry(max=retries) if retries > 0 else None

    def submit(self, spec: JobSpec) -> bool:
        """Enqueue `spec` unless the same work is queued, running or finished. True if enqueued now."""
        for _ in range(3):
            try:
                self.queues[spec.kind].enqueue_call(
                    PREDICT_FUNC,
                    args=(spec.payload(),),
                    job_id=spec.job_id,
                    unique=True,
                    retry=self._retry(),
                    result_ttl=self.result_ttl,
                    failure_ttl=self.result_ttl,
                    description=f"predict task {spec.task_id} ({spec.kind})",
                    on_failure=Callback(FAILURE_CALLBACK),
                )
                self.connection.zadd(self.keys.pending, {spec.job_id: time.time()})
                return True
            except DuplicateJobError:
                if self._reusable(spec.job_id):
                    return False
        raise RuntimeError(f"could not enqueue job {spec.job_id}: it keeps changing state")

    def _reusable(self, job_id: str) -> bool:
        """Whether an existing job will (or did) produce an output; otherwise delete it for a fresh start."""
        try:
            job = Job.fetch(job_id, connection=self.connection, serializer=JSONSerializer)
        except NoSuchJobError:
            return False  # expired between the enqueue attempt and now: enqueue again
        status = job.get_status(refresh=False)
        if status in (JobStatus.QUEUED, JobStatus.STARTED, JobStatus.DEFERRED, JobStatus.SCHEDULED):
            return True
        if status == JobStatus.FINISHED and self.connection.exists(self.keys.out(job_id)):
            return True
        # Failed, stopped, canceled, or finished with its output expired: start the work again.
        job.delete()
        self.connection.delete(self.keys.out(job_id), self.keys.done(job_id), self.keys.handoff(job_id))
        return False

    def outputs(self, job_ids: Iterable[str]) -> dict[str, dict]:
        ids = list(dict.fromkeys(job_ids))
        if not ids:
            return {}
        values = self.connection.mget([self.keys.out(j) for j in ids])
        return {j: json.loads(v) for j, v in zip(ids, values, strict=True) if v is not None}

    def wait(self, job_ids: Iterable[str], timeout_s: float) -> dict[str, dict]:
        """Block until every job has published an output or `timeout_s` passed; returns what is there."""
        deadline = time.monotonic() + max(0.0, timeout_s)
        pending = list(dict.fromkeys(job_ids))
        found: dict[str, dict] = {}
        first = True
        while pending:
            found.update(self.outputs(pending))
            pending = [j for j in pending if j not in found]
            remaining = deadline - time.monotonic()
            if not pending or remaining <= 0:
                break
            if not first:  # a job RQ gave up on publishes nothing: look for those between waits
                found.update(self._failed_without_output(pending))
                pending = [j for j in pending if j not in found]
                if not pending:
                    break
            first = False
            # Entries in a done stream persist, so an XREAD from 0-0 returns at once for any job that
            # published after the MGET above: no lost wake-ups.
            block_ms = max(1, int(min(remaining, 1.0) * 1000))
            self.connection.xread({self.keys.done(j): "0-0" for j in pending[:_XREAD_CHUNK]}, block=block_ms)
        return found

    def _failed_without_output(self, job_ids: Sequence[str]) -> dict[str, dict]:
        """Jobs RQ gave up on (or that vanished) without publishing: report them instead of waiting."""
        pipe = self.connection.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hget(Job.key_for(job_id), "status")
        statuses = pipe.execute()
        result = {}
        for job_id, status in zip(job_ids, statuses, strict=True):
            if status is None:
                result[job_id] = error_output(503, "the prediction job disappeared from Redis (was Redis restarted "
                                                   "without persistence?); send the request again")
            elif status.decode() in (JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED):
                result[job_id] = error_output(502, f"the prediction job {status.decode()} after its retries; "
                                                   "see the worker log")
        return result

    def claim(self, job_id: str, allow_handoff: bool) -> str:
        """Decide, atomically with the job's publish, who delivers a batch output (see module docstring)."""
        keys = [self.keys.out(job_id), self.keys.handoff(job_id)]
        answer = self._claim(keys=keys, args=[self.result_ttl, "1" if allow_handoff else "0"])
        return answer.decode() if isinstance(answer, bytes) else str(answer)

    def depths(self) -> dict[str, int]:
        return {kind: q.count for kind, q in self.queues.items()}

    def snapshot(self) -> dict[str, Any]:
        """Queue depths, running jobs, registered workers and worker counters (for /metrics and errors)."""
        from rq.worker import Worker

        stats = self.connection.hgetall(self.keys.stats)
        return {
            "depths": self.depths(),
            "running": {kind: q.started_job_registry.get_job_count(cleanup=False) for kind, q in self.queues.items()},
            "workers": Worker.count(queue=self.queues[INTERACTIVE]),
            "events": {k.decode(): int(v) for k, v in stats.items()},
        }

    # ---- worker side ----------------------------------------------------------------------------

    def publish(self, job_id: str, output: dict, counter: str | None = None) -> bool:
        """Store a job's output, wake its waiters and bump `counter` (default jobs_ok / jobs_rejected).
        True if a batch request handed the job off."""
        counter = counter or ("jobs_ok" if output.get("ok") else "jobs_rejected")
        keys = [self.keys.out(job_id), self.keys.done(job_id), self.keys.handoff(job_id), self.keys.pending,
                self.keys.stats]
        ttl = self.result_ttl if output.get("ok") else min(self.result_ttl, ERROR_TTL_S)
        return bool(self._publish(keys=keys, args=[canonical_json(output), ttl, job_id, counter]))

    def count_run(self, job_id: str) -> int:
        pipe = self.connection.pipeline(transaction=False)
        pipe.hincrby(self.keys.job_runs, job_id, 1)
        pipe.expire(self.keys.job_runs, max(self.result_ttl, 3600))
        return int(pipe.execute()[0])

    def bump(self, counter: str, amount: int = 1) -> None:
        self.connection.hincrby(self.keys.stats, counter, amount)

    def enqueue_writeback(self, job_id: str, task_id: int, model_version: str) -> None:
        """Queue the write-back of a handed-off output (idempotent: one write-back job per predict job)."""
        payload = {"job_id": job_id, "task_id": task_id, "model_version": model_version}
        try:
            self.batch.enqueue_call(
                WRITEBACK_FUNC, args=(payload,), job_id=f"{job_id}-wb", unique=True, retry=self._retry(),
                result_ttl=self.result_ttl, failure_ttl=7 * 24 * 3600, description=f"write back task {task_id}",
                at_front=True, on_failure=Callback(WRITEBACK_FAILURE_CALLBACK),
            )
        except DuplicateJobError:
            pass  # a retried predict job: its write-back is already queued or done

    def reap(self, lost_grace_s: float) -> None:
        """Retry jobs of dead workers and re-queue jobs lost between dequeue and start (one reaper at a time)."""
        if not self.connection.set(self.keys.reaper_lock, "1", nx=True, ex=max(1, int(lost_grace_s))):
            return
        for queue in self.queues.values():
            # TimerDeathPenalty: the failure callback may run in a worker's reaper thread (no SIGALRM there).
            StartedJobRegistry(queue=queue, death_penalty_class=TimerDeathPenalty).cleanup()
        self._recover_lost(lost_grace_s)

    def _recover_lost(self, grace_s: float) -> None:
        now = time.time()
        for raw_id, _ in self.connection.zrangebyscore(self.keys.pending, 0, now - grace_s, withscores=True):
            job_id = raw_id.decode()
            try:
                job = Job.fetch(job_id, connection=self.connection, serializer=JSONSerializer)
            except NoSuchJobError:
                self.connection.zrem(self.keys.pending, job_id)
                continue
            status = job.get_status(refresh=False)
            if status in (JobStatus.FINISHED, JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED):
                self.connection.zrem(self.keys.pending, job_id)
                continue
            queue = self.queues[BATCH] if job.origin == self.queues[BATCH].name else self.queues[INTERACTIVE]
            is_lost = (
                status == JobStatus.QUEUED
                and self.connection.lpos(queue.key, job_id) is None
                and job_id not in queue.started_job_registry.get_job_ids(cleanup=False)
            )
            if not is_lost:
                self.connection.hdel(self.keys.lost, job_id)
                continue
            first_seen = self.connection.hget(self.keys.lost, job_id)
            if first_seen is None:
                # A healthy worker holds a popped job for milliseconds before registering it:
                # only act when it is still missing on the next pass.
                self.connection.hset(self.keys.lost, job_id, now)
                continue
            if now - float(first_seen) >= grace_s:
                logger.warning("job %s was dequeued by a worker that died before starting it; re-queueing", job_id)
                self.connection.hdel(self.keys.lost, job_id)
                queue.enqueue_job(job)
                self.bump("jobs_recovered")

    # ---- model versions -------------------------------------------------------------------------

    def wanted_model_source(self, default: str) -> str:
        """The model workers should serve: what promotion announced, else `default`."""
        value = self.connection.get(self.keys.model_source)
        return value.decode() if value is not None else default

    def init_model_source(self, default: str) -> str:
        """At worker start: record `default` unless a source was announced before; return the source."""
        self.connection.set(self.keys.model_source, default, nx=True)
        return self.wanted_model_source(default)

    def announce_model_source(self, source: str) -> None:
        """Ask every worker to (re)load `source` before its next job (model promotion calls this)."""
        self.connection.set(self.keys.model_source, source)

    def record_loaded_model(self, source: str, version: str, worker: str) -> None:
        pipe = self.connection.pipeline(transaction=False)
        pipe.set(self.keys.model_current, canonical_json(
            {"source": source, "version": version, "worker": worker, "at": time.time()}))
        pipe.zadd(self.keys.model_versions, {version: time.time()}, nx=True)
        pipe.execute()

    def current_model(self) -> dict | None:
        value = self.connection.get(self.keys.model_current)
        return json.loads(value) if value is not None else None

    def model_versions(self) -> list[str]:
        return [v.decode() for v in self.connection.zrange(self.keys.model_versions, 0, -1)]
