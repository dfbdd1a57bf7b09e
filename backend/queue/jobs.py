"""RQ queues, deterministic job ids, and the hand-off protocol between the web process and the workers.

Queues. Three RQ queues: ``<prefix>:interactive`` and ``<prefix>:batch`` for predictions (workers serve
them in that order, so a region drawn in the editor never waits behind a 10,000-task pre-labelling run)
and ``<prefix>:writeback`` for deliveries to annotation tools, so no GPU worker sleeps on an HTTP retry.
Jobs use RQ's ``JSONSerializer`` (never pickle: whoever can write to Redis must not get code execution in
a GPU worker) and carry references only -- task id, image URL, regions, the plan -- never image bytes.

Job ids are a hash of (kind, model_version, task id, image URL, regions, plan), so the same request twice
(Label Studio retries, or a task opened twice) finds the existing job instead of doing the work again;
enqueueing uses RQ's atomic ``unique=True``. A job that failed, or whose output expired, is started afresh.

Outputs. A job does not return its output through RQ; it *publishes* it with one Lua script:

    out:<job_id>      JSON output (a prediction, or an error with an HTTP status), TTL = OSPREY_RESULT_TTL_S
    PUBLISH done      the job id on ``<prefix>:done``; each web process has one listener (listener.py)
    handoff:<job_id>  set, without expiry, when a batch request stopped waiting for this job; it names the
                      delivery function (e.g. the Label Studio write-back) that the job enqueues on the
                      ``writeback`` queue with its output. Because it never expires while the job waits,
                      a job that starts hours later still delivers (it used to expire with the output TTL).

``publish`` (worker) and ``claim`` (web) are Lua scripts, so Redis orders them: a batch output is either
claimed for the HTTP response (it existed, no hand-off) or handed off (it did not exist yet), never both
and never neither. A handed-off job that ends without a deliverable output is recorded in
``<prefix>:wb:failed`` (``record_undeliverable``): every handed-off task ends delivered or visibly failed.

Reliability. Jobs are enqueued with ``Retry(max=OSPREY_JOB_RETRIES)``. Workers heartbeat their running job
every OSPREY_WORKER_HEARTBEAT_S; if a worker dies (SIGKILL, OOM, power), its StartedJobRegistry entry
expires after three missed beats and another worker's reaper (``reap``) retries the job. ``reap`` also
re-queues a job that was popped by a worker killed before it registered the job as started. Prediction
workers also keep a liveness entry (``heartbeat_worker``); ``live_workers()`` is what /health and the
interactive path read, so a dead worker gives DOWN and 503 instead of silent timeouts.

Admission. A web process answers 429 with Retry-After (``QueueBusy``) instead of queueing without bound:
more than OSPREY_MAX_WAITING requests waiting in this process, more than OSPREY_MAX_QUEUED_INTERACTIVE
interactive or OSPREY_MAX_QUEUED_BATCH batch jobs queued; 503 when OSPREY_MAX_QUEUED_WRITEBACK write-backs
wait (the annotation tool is down) and for an interactive request when no worker is alive (``NoWorker``).

Fair lanes. Batch jobs of one group (a project) wait in their own RQ queue ``<prefix>:batch-<group>`` that
no worker reads; ``feed`` (a Lua script run after each batch submit and before each worker dequeue) moves
them round-robin across groups into ``<prefix>:batch``, keeping it a few jobs deep, so a 10-task batch of
one project starts next to another project's 10,000-task run instead of after it. A worker takes a batch
job only while it holds one of the batch slots (``acquire_batch_slot``): all live workers but
OSPREY_INTERACTIVE_RESERVED_WORKERS, so the batch lane never takes every worker, and every worker looks at
the interactive queue first between jobs.

Hangs. A worker whose job runs OSPREY_JOB_HANG_GRACE_S past its timeout (stuck in native code, where RQ's
SIGALRM cannot interrupt it) records the job in ``<prefix>:hung`` and kills its own process; the job is
retried on a fresh process, and after its retries it fails with a 504 that says so (``on_job_failure``).
An interactive waiter gets that 504 as soon as the first hang is recorded.
"""

from __future__ import annotations

import json
import logging
import re
import threading
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

from backend.errors import InputError
from backend.queue.keys import (  # noqa: F401 - re-exported: callers import these names from here
    ALL_QUEUES,
    BATCH,
    INTERACTIVE,
    KINDS,
    WRITEBACK,
    RedisKeys,
    canonical_json,
    content_digest,
)
from backend.queue.listener import MESSAGE_OUTPUT_MAX, DoneListener, Waiter
from backend.queue.retry import RetryPolicy

logger = logging.getLogger(__name__)

PREDICT_FUNC = "backend.queue.handlers.predict_job"
FAILURE_CALLBACK = "backend.queue.handlers.on_job_failure"
DELIVERY_FAILURE_CALLBACK = "backend.queue.handlers.on_delivery_failure"
WRITEBACK_FAILURE_CALLBACK = DELIVERY_FAILURE_CALLBACK

ERROR_TTL_S = 30  # error outputs expire fast: the same request after a fix (file uploaded...) runs again
_SWEEP_S = 1.0  # how often a waiter re-reads on its own (lost pub/sub messages, failed jobs, dead workers)
_LIVE_CACHE_S = 0.5

# KEYS: out, handoff, pending, stats. ARGV: output json, ttl, job id, counter to bump, done channel, the
# largest output the done message carries (listener.py: "<job id>" or "<job id>\n<output>").
# Returns the delivery function named by the hand-off, or nil when the job was not handed off.
PUBLISH_LUA = """
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('ZREM', KEYS[3], ARGV[3])
redis.call('HINCRBY', KEYS[4], ARGV[4], 1)
if string.len(ARGV[1]) <= tonumber(ARGV[6]) then
  redis.call('PUBLISH', ARGV[5], ARGV[3] .. '\\n' .. ARGV[1])
else
  redis.call('PUBLISH', ARGV[5], ARGV[3])
end
local delivery = redis.call('GET', KEYS[2])
if delivery then
  redis.call('EXPIRE', KEYS[2], ARGV[2])
  return delivery
end
return false
"""

# KEYS: out, handoff. ARGV: delivery function name ('' = no hand-off).
# Returns 'handoff' (the job delivers), 'response' (the caller delivers) or 'pending'.
CLAIM_LUA = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 'handoff' end
if redis.call('EXISTS', KEYS[1]) == 1 then return 'response' end
if ARGV[1] ~= '' then
  redis.call('SET', KEYS[2], ARGV[1])
  return 'handoff'
end
return 'pending'
"""


# Moves up to ARGV[1] - LLEN(batch) job ids from the groups' hold queues into the batch queue, one group
# after another (round-robin), rewriting each job's origin so retries and registries use the batch queue.
# KEYS: batch queue list, ring. ARGV: target depth, RQ queue-key prefix of holds, batch queue name.
FEED_LUA = """
local depth = redis.call('LLEN', KEYS[1])
local target = tonumber(ARGV[1])
local moved = 0
local turns = redis.call('LLEN', KEYS[2])
while depth < target and turns > 0 do
  local group = redis.call('LPOP', KEYS[2])
  if not group then break end
  local hold = ARGV[2] .. group
  local job_id = redis.call('LPOP', hold)
  if job_id then
    redis.call('HSET', 'rq:job:' .. job_id, 'origin', ARGV[3])
    redis.call('RPUSH', KEYS[1], job_id)
    depth = depth + 1
    moved = moved + 1
  end
  if redis.call('LLEN', hold) > 0 then
    redis.call('RPUSH', KEYS[2], group)
  else
    turns = turns - 1
  end
end
return moved
"""

# KEYS: ring. ARGV: group. Adds the group to the round-robin ring unless it is there.
RING_ADD_LUA = """
if not redis.call('LPOS', KEYS[1], ARGV[1]) then redis.call('RPUSH', KEYS[1], ARGV[1]) end
return 1
"""

# KEYS: slots. ARGV: worker, capacity, now, deadline. 1 if the worker holds (or now took) a batch slot.
SLOT_LUA = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[3])
if redis.call('ZSCORE', KEYS[1], ARGV[1]) or redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], ARGV[4], ARGV[1])
  return 1
end
return 0
"""

_GROUP_RE = re.compile(r"[A-Za-z0-9_.]{1,48}")


def batch_group(project: Any) -> str:
    """The fairness group of a batch job: its project, as a safe queue-name part ('' = no project)."""
    if project is None or project == "":
        return ""
    text = str(project)
    return text if _GROUP_RE.fullmatch(text) else content_digest(text, 16)


class QueueBusy(Exception):
    """The service sheds load instead of queueing without bound; answered with `status_code` + Retry-After."""

    status_code = 429

    def __init__(self, message: str, retry_after_s: int = 5) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s


class NoWorker(QueueBusy):
    """No prediction worker has a live heartbeat: an interactive request cannot be answered (503)."""

    status_code = 503


class Backlogged(QueueBusy):
    """Deliveries to the annotation tool pile up (it is down): new batch work is refused (503) until they drain."""

    status_code = 503


def publish_output(connection: Redis, keys: RedisKeys, job_id: str, output: dict, ttl: int,
                   counter: str) -> str | None:
    """Store `output`, wake its waiters, bump `counter`; returns the hand-off's delivery function or None."""
    script = connection.register_script(PUBLISH_LUA)
    delivery = script(keys=[keys.out(job_id), keys.handoff(job_id), keys.pending, keys.stats],
                      args=[canonical_json(output), ttl, job_id, counter, keys.done_channel, MESSAGE_OUTPUT_MAX])
    if delivery is None:
        return None
    return delivery.decode() if isinstance(delivery, bytes) else str(delivery)


def record_undeliverable(connection: Any, keys: RedisKeys, task_id: Any, job_id: str, reason: str) -> None:
    """A handed-off task that gets no prediction: log, count and keep the reason (visible, never silent)."""
    logger.error("task %s gets no prediction (job %s): %s", task_id, job_id, reason)
    connection.hset(keys.writeback_failed, str(task_id),
                    json.dumps({"job_id": job_id, "reason": reason[:2000], "at": time.time()}))
    connection.hincrby(keys.stats, "writeback_undeliverable", 1)


def make_job_id(prefix: str, kind: str, model_version: str, task_id: Any, image_url: str,
                regions: Sequence[dict], plan: dict) -> str:
    """Deterministic job id: the same work always maps to the same id (no ':' -- RQ splits on it)."""
    digest = content_digest([kind, model_version, task_id, image_url, list(regions), plan])
    return f"{prefix}-{kind}-{digest}"


@dataclass
class JobSpec:
    """One unit of work: predict the regions of one task. Becomes the JSON payload of an RQ job.

    `regions` and `plan` are JSON-able and opaque here (the service layer defines their shape)."""

    kind: str
    task_id: int | None
    image_url: str
    regions: list[dict]
    plan: dict
    model_version: str
    prefix: str
    group: str = ""  # batch fairness group (the project); not part of the job id
    job_id: str = field(init=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InputError(f"unknown job kind {self.kind!r}")
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
            "group": self.group,
        }


def ok_output(prediction: dict, elapsed_s: float, worker: str) -> dict:
    return {"ok": True, "prediction": prediction, "elapsed_s": elapsed_s, "worker": worker}


def error_output(status: int, message: str, worker: str = "", retry_after_s: int | None = None) -> dict:
    error: dict[str, Any] = {"status": int(status), "message": message}
    if retry_after_s is not None:
        error["retry_after_s"] = int(retry_after_s)
    return {"ok": False, "error": error, "worker": worker}


def _setting(settings: Any, name: str, default: Any) -> Any:
    value = getattr(settings, name, None)
    return default if value is None else value


class JobQueue:
    """Enqueue, wait for and hand off prediction jobs; shared by the web process and the workers."""

    def __init__(self, connection: Redis, settings: Any):
        self.connection = connection
        self.settings = settings
        self.keys = RedisKeys(settings.osprey_redis_prefix)
        self.result_ttl = int(settings.osprey_result_ttl_s)
        timeout = int(settings.osprey_job_timeout_s)
        # never longer than the general timeout (lowering OSPREY_JOB_TIMEOUT_S lowers both)
        interactive_timeout = min(timeout, int(_setting(settings, "osprey_interactive_job_timeout_s", timeout)))
        self.queues = {
            kind: Queue(self.keys.queue_name(kind), connection=connection, serializer=JSONSerializer,
                        default_timeout=interactive_timeout if kind == INTERACTIVE else timeout)
            for kind in ALL_QUEUES
        }
        self.writeback_retry = RetryPolicy(
            retries=int(_setting(settings, "osprey_writeback_retries", 5)),
            first_s=float(_setting(settings, "osprey_writeback_backoff_s", 5.0)),
        )
        self._publish = connection.register_script(PUBLISH_LUA)
        self._feed = connection.register_script(FEED_LUA)
        self._ring_add = connection.register_script(RING_ADD_LUA)
        self._slot = connection.register_script(SLOT_LUA)
        self._claim = connection.register_script(CLAIM_LUA)
        self._listener: DoneListener | None = None
        self._listener_lock = threading.Lock()
        self._live_cache: tuple[float, int] = (0.0, 0)

    @property
    def interactive(self) -> Queue:
        return self.queues[INTERACTIVE]

    @property
    def batch(self) -> Queue:
        return self.queues[BATCH]

    @property
    def writeback(self) -> Queue:
        return self.queues[WRITEBACK]

    def ordered_queues(self, names: Sequence[str] = (INTERACTIVE, BATCH, WRITEBACK)) -> list[Queue]:
        """The queues a worker serves, in the order it serves them: interactive first, then deliveries (one
        quick HTTP call each, so finished batch tasks reach the tool while a long batch runs), then batch."""
        unknown = [n for n in names if n not in self.queues]
        if unknown:
            raise InputError(f"unknown queue(s) {', '.join(unknown)}; choose from {', '.join(ALL_QUEUES)}")
        return [self.queues[n] for n in (INTERACTIVE, WRITEBACK, BATCH) if n in names]

    # ---- web side -------------------------------------------------------------------------------

    def _retry(self) -> Retry | None:
        retries = int(self.settings.osprey_job_retries)
        return Retry(max=retries) if retries > 0 else None

    def listener(self) -> DoneListener:
        if self._listener is None:
            with self._listener_lock:
                if self._listener is None:
                    self._listener = DoneListener(self.connection, self.keys.done_channel)
        return self._listener

    def admit(self, kind: str) -> None:
        """Raise QueueBusy/NoWorker instead of accepting work that cannot be answered in time."""
        max_waiting = int(_setting(self.settings, "osprey_max_waiting", 512))
        waiting = len(self._listener) if self._listener is not None else 0
        if waiting >= max_waiting:
            raise QueueBusy(f"this server already has {waiting} requests waiting for workers "
                            f"(OSPREY_MAX_WAITING={max_waiting}); retry shortly or add workers")
        if kind == BATCH:
            self._admit_batch()
            return
        if kind != INTERACTIVE:
            return
        if self.live_worker_count(cached=True) == 0:
            raise NoWorker(self.no_worker_reason(), retry_after_s=10)
        max_queued = int(_setting(self.settings, "osprey_max_queued_interactive", 256))
        queued = int(self.connection.llen(self.interactive.key))
        if queued >= max_queued:
            raise QueueBusy(f"{queued} interactive jobs are already queued (OSPREY_MAX_QUEUED_INTERACTIVE="
                            f"{max_queued}); the workers cannot keep up: retry shortly or add workers")

    def _admit_batch(self) -> None:
        max_batch = int(_setting(self.settings, "osprey_max_queued_batch", 100_000))
        queued = self.batch_depth()
        if queued >= max_batch:
            raise QueueBusy(f"{queued} batch jobs are already queued (OSPREY_MAX_QUEUED_BATCH={max_batch}); "
                            "retry when the running batches have progressed", retry_after_s=30)
        max_wb = int(_setting(self.settings, "osprey_max_queued_writeback", 10_000))
        backlog = int(self.connection.llen(self.writeback.key))
        backlog += self.writeback.scheduled_job_registry.get_job_count(cleanup=False)
        if backlog >= max_wb:
            raise Backlogged(f"{backlog} write-backs to the annotation tool are waiting (OSPREY_MAX_QUEUED_WRITEBACK="
                             f"{max_wb}): is Label Studio reachable? batch requests resume when they drain",
                             retry_after_s=60)

    def hold_queue(self, group: str) -> Queue:
        """The RQ queue where one group's batch jobs wait for the feeder (see the module docstring)."""
        return Queue(self.keys.batch_hold(group), connection=self.connection, serializer=JSONSerializer,
                     default_timeout=int(self.settings.osprey_job_timeout_s))

    def _lane(self, spec: JobSpec) -> Queue:
        if spec.kind == BATCH and spec.group:
            return self.hold_queue(spec.group)
        return self.queues[spec.kind]

    def feed(self, target: int | None = None, client: Any = None) -> int:
        """Top the batch queue up to `target` jobs (default twice the live workers, at least 2), taking
        one job per group in turn. Cheap when nothing waits; returns the number of jobs moved
        (with a pipeline as `client`, the command is only queued on it)."""
        if target is None:
            target = max(2, 2 * self.live_worker_count(cached=True))
        moved = self._feed(keys=[self.batch.key, self.keys.batch_ring],
                           args=[target, "rq:queue:" + self.keys.batch_hold(""), self.batch.name], client=client)
        return int(moved or 0) if client is None else 0

    def hold_depth(self) -> int:
        """Batch jobs still waiting in the groups' hold queues."""
        groups = [g.decode() for g in self.connection.lrange(self.keys.batch_ring, 0, -1)]
        if not groups:
            return 0
        pipe = self.connection.pipeline(transaction=False)
        for group in groups:
            pipe.llen("rq:queue:" + self.keys.batch_hold(group))
        return sum(int(n) for n in pipe.execute())

    def batch_depth(self) -> int:
        return int(self.connection.llen(self.batch.key)) + self.hold_depth()

    def acquire_batch_slot(self, worker: str, ttl_s: float, client: Any = None) -> bool:
        """Whether `worker` may take a batch job now; holding a slot for `ttl_s` (refresh while running).

        Slots = live prediction workers minus OSPREY_INTERACTIVE_RESERVED_WORKERS, at least one.
        (With a pipeline as `client`, the command is only queued on it.)"""
        reserved = int(_setting(self.settings, "osprey_interactive_reserved_workers", 1))
        capacity = max(1, self.live_worker_count(cached=True) - max(0, reserved))
        now = time.time()
        granted = self._slot(keys=[self.keys.batch_slots], args=[worker, capacity, now, now + ttl_s], client=client)
        return bool(granted) if client is None else False

    def feed_and_acquire(self, worker: str, ttl_s: float) -> bool:
        """`feed` then `acquire_batch_slot`, in one round trip: what a worker does before every dequeue."""
        pipe = self.connection.pipeline(transaction=False)
        self.feed(client=pipe)
        self.acquire_batch_slot(worker, ttl_s, client=pipe)
        return bool(pipe.execute()[-1])

    def release_batch_slot(self, worker: str) -> None:
        self.connection.zrem(self.keys.batch_slots, worker)

    def submit(self, spec: JobSpec, admit: bool = True) -> bool:
        """Enqueue `spec` unless the same work is queued, running or finished. True if enqueued now.

        Raises QueueBusy (429) or NoWorker (503) when the request should be shed (see `admit`)."""
        if admit:
            self.admit(spec.kind)
        for _ in range(3):
            # RQ registers the queue name (SADD) on the pipeline it is given, and runs its atomic unique
            # enqueue on its own; the registration and our pending entry then share one round trip.
            pipe = self.connection.pipeline(transaction=False)
            try:
                self._lane(spec).enqueue_call(
                    PREDICT_FUNC,
                    args=(spec.payload(),),
                    job_id=spec.job_id,
                    unique=True,
                    retry=self._retry(),
                    result_ttl=self.result_ttl,
                    failure_ttl=self.result_ttl,
                    description=f"predict task {spec.task_id} ({spec.kind})",
                    on_failure=Callback(FAILURE_CALLBACK),
                    pipeline=pipe,
                )
            except DuplicateJobError:
                pipe.execute()
                if self._reusable(spec.job_id):
                    return False
                continue
            pipe.zadd(self.keys.pending, {spec.job_id: time.time()})
            pipe.execute()
            if spec.kind == BATCH and spec.group:
                self._ring_add(keys=[self.keys.batch_ring], args=[spec.group])
                self.feed()
            return True
        raise RuntimeError(f"could not enqueue job {spec.job_id}: it keeps changing state")

    def submit_and_wait(self, spec: JobSpec, timeout_s: float, require_worker: bool = False) -> tuple[bool, dict | None]:
        """`submit` then `wait` for that one job: (enqueued now, its output or None on timeout).

        The waiter is registered before the enqueue, so the output of a job enqueued here arrives by its
        done message alone: no read before the wait, and none after it for an output the message carries."""
        self.admit(spec.kind)
        listener = self.listener()
        waiter = listener.watch([spec.job_id])
        try:
            fresh = self.submit(spec, admit=False)
            found = self.wait([spec.job_id], timeout_s, require_worker, waiter=waiter, read_first=not fresh)
        finally:
            listener.unwatch([spec.job_id], waiter)
        return fresh, found.get(spec.job_id)

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

    def wait(self, job_ids: Iterable[str], timeout_s: float, require_worker: bool = False,
             waiter: Waiter | None = None, read_first: bool = True) -> dict[str, dict]:
        """Block until every job has published an output or `timeout_s` passed; returns what is there.

        Holds no Redis connection while blocked (one listener per process wakes it, and hands over the
        outputs its done messages carry). With `require_worker`, a wait during which no worker is alive
        ends with a 503 output for each job. `waiter`: one the caller registered (`listener().watch`)
        before enqueueing; with `read_first=False` the outputs are not read before the first wake-up (the
        caller enqueued the jobs after registering, so nothing can be there that no message announces)."""
        deadline = time.monotonic() + max(0.0, timeout_s)
        pending = list(dict.fromkeys(job_ids))
        found: dict[str, dict] = {}
        if not pending:
            return found
        listener = self.listener()
        event = waiter if waiter is not None else listener.watch(pending)
        try:
            first = True
            read = read_first
            while pending:
                event.clear()  # before reading: a publish after this read sets it again
                found.update(event.take(pending))
                pending = [j for j in pending if j not in found]
                if pending and read:
                    found.update(self.outputs(pending))
                    pending = [j for j in pending if j not in found]
                read = True
                remaining = deadline - time.monotonic()
                if not pending or remaining <= 0:
                    break
                if not first:  # a job RQ gave up on publishes nothing: look for those between waits
                    found.update(self._failed_without_output(pending))
                    pending = [j for j in pending if j not in found]
                    if not pending:
                        break
                    if require_worker:
                        found.update(self.hung_outputs(pending))
                        pending = [j for j in pending if j not in found]
                        if not pending:
                            break
                    if require_worker and self.live_worker_count(cached=True) == 0:
                        reason = self.no_worker_reason()
                        found.update({j: error_output(503, reason, retry_after_s=10) for j in pending})
                        break
                first = False
                event.wait(min(remaining, _SWEEP_S))
        finally:
            if waiter is None:
                listener.unwatch(list(dict.fromkeys(job_ids)), event)
        return found

    def record_hang(self, job_id: str, worker: str, after_s: float) -> None:
        """A worker is about to kill itself because `job_id` hangs; keep why (see ``hung_outputs``)."""
        previous = self.connection.hget(self.keys.hung, job_id)
        attempts = (json.loads(previous).get("attempts", 0) if previous else 0) + 1
        pipe = self.connection.pipeline(transaction=False)
        pipe.hset(self.keys.hung, job_id, canonical_json({"worker": worker, "after_s": round(after_s, 1),
                                                          "attempts": attempts, "at": time.time()}))
        pipe.expire(self.keys.hung, max(self.result_ttl, 3600))
        pipe.hincrby(self.keys.stats, "jobs_hung", 1)
        pipe.execute()

    def hung_outputs(self, job_ids: Sequence[str]) -> dict[str, dict]:
        """504 outputs for jobs a worker was killed for (an interactive click is not retried for minutes)."""
        ids = list(job_ids)
        if not ids:
            return {}
        values = self.connection.hmget(self.keys.hung, ids)
        return {j: error_output(504, hang_reason(json.loads(v))) for j, v in zip(ids, values, strict=True)
                if v is not None}

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

    def claim(self, job_id: str, allow_handoff: bool, delivery: str | None = None) -> str:
        """Decide, atomically with the job's publish, who delivers a batch output (see module docstring).

        With `allow_handoff`, an unfinished job is handed off to `delivery` (a dotted function name run on
        the writeback queue; default OSPREY_HANDOFF_DELIVERY)."""
        if allow_handoff:
            delivery = delivery or _setting(self.settings, "osprey_handoff_delivery", "")
            if not delivery:
                raise RuntimeError("hand-off needs a delivery function (OSPREY_HANDOFF_DELIVERY)")
        keys = [self.keys.out(job_id), self.keys.handoff(job_id)]
        answer = self._claim(keys=keys, args=[delivery if allow_handoff else ""])
        return answer.decode() if isinstance(answer, bytes) else str(answer)

    def depths(self) -> dict[str, int]:
        """Jobs waiting per lane (batch includes the groups' hold queues)."""
        depths = {kind: q.count for kind, q in self.queues.items()}
        depths[BATCH] += self.hold_depth()
        return depths

    def oldest_pending_age_s(self) -> float | None:
        """Age of the oldest enqueued job without an output yet (None when nothing is pending)."""
        oldest = self.connection.zrange(self.keys.pending, 0, 0, withscores=True)
        return max(0.0, time.time() - oldest[0][1]) if oldest else None

    def snapshot(self) -> dict[str, Any]:
        """Queue depths, running jobs, registered workers and worker counters (for /metrics and errors)."""
        from rq.worker import Worker

        stats = self.connection.hgetall(self.keys.stats)
        return {
            "depths": self.depths(),
            "running": {kind: q.started_job_registry.get_job_count(cleanup=False) for kind, q in self.queues.items()},
            "workers": Worker.count(queue=self.queues[INTERACTIVE]),
            "live_workers": len(self.live_workers()),
            "waiting": len(self._listener) if self._listener is not None else 0,
            "events": {k.decode(): int(v) for k, v in stats.items()},
        }

    # ---- worker liveness ------------------------------------------------------------------------

    def heartbeat_worker(self, name: str, ttl_s: float) -> None:
        """A prediction worker says it is alive for the next `ttl_s` seconds (its reaper thread beats)."""
        now = time.time()
        pipe = self.connection.pipeline(transaction=False)
        pipe.zadd(self.keys.live_workers, {name: now + ttl_s})
        pipe.zremrangebyscore(self.keys.live_workers, "-inf", now - 3600)  # long-dead names
        pipe.execute()

    def forget_worker(self, name: str) -> None:
        """A worker that exited (or was seen dead by its supervisor) is not alive any more."""
        self.connection.zrem(self.keys.live_workers, name)

    def live_workers(self) -> list[str]:
        """Names of prediction workers whose liveness has not expired (what /health reports)."""
        names = self.connection.zrangebyscore(self.keys.live_workers, time.time(), "+inf")
        return [n.decode() for n in names]

    def live_worker_count(self, cached: bool = False) -> int:
        now = time.monotonic()
        if cached and now - self._live_cache[0] < _LIVE_CACHE_S:
            return self._live_cache[1]
        count = int(self.connection.zcount(self.keys.live_workers, time.time(), "+inf"))
        self._live_cache = (now, count)
        return count

    def supervisor_state(self) -> dict | None:
        value = self.connection.get(self.keys.supervisor)
        return json.loads(value) if value is not None else None

    def set_supervisor_state(self, state: str, reason: str = "") -> None:
        self.connection.set(self.keys.supervisor, canonical_json({"state": state, "reason": reason,
                                                                  "at": time.time()}))

    def no_worker_reason(self) -> str:
        """Why nothing can be predicted now, in words an operator can act on."""
        state = self.supervisor_state()
        if state and state.get("state") == "gave_up":
            return f"no worker is alive: {state.get('reason')}"
        return ("no worker is alive (none has sent a heartbeat within three OSPREY_WORKER_HEARTBEAT_S periods): "
                "start `osprey worker` with the same REDIS_URL and OSPREY_REDIS_PREFIX, or wait for `osprey run` "
                "to restart it")

    # ---- worker side ----------------------------------------------------------------------------

    def publish(self, job_id: str, output: dict, counter: str | None = None) -> bool:
        """Store a job's output, wake its waiters and bump `counter` (default jobs_ok / jobs_rejected).
        True if a batch request handed the job off."""
        return self.publish_delivery(job_id, output, counter) is not None

    def publish_delivery(self, job_id: str, output: dict, counter: str | None = None) -> str | None:
        """`publish`, returning the hand-off's delivery function name (None when not handed off)."""
        counter = counter or ("jobs_ok" if output.get("ok") else "jobs_rejected")
        ttl = self.result_ttl if output.get("ok") else min(self.result_ttl, ERROR_TTL_S)
        return publish_output(self.connection, self.keys, job_id, output, ttl, counter)

    def finish(self, payload: dict, output: dict) -> bool:
        """What a prediction job does with its output: publish it and, if a batch request handed the job
        off, enqueue its delivery (ok) or record the task as undeliverable (error). True if handed off."""
        job_id = payload["job_id"]
        delivery = self.publish_delivery(job_id, output)
        if delivery is None:
            return False
        if output.get("ok"):
            self.enqueue_delivery(delivery, job_id, payload.get("task_id"), output)
        else:
            record_undeliverable(self.connection, self.keys, payload.get("task_id"), job_id,
                                 output["error"]["message"])
        return True

    def job_starting(self, job_id: str, release_slot_of: str | None = None, pipeline: Any = None) -> None:
        """At the start of a job, queued on the worker's start `pipeline`: count its run, read the announced
        model source (`wanted_model_source`) and, with `release_slot_of`, free that worker's batch slot.
        `started_source` reads the source from the pipeline's results from here on."""
        pipeline.hincrby(self.keys.job_runs, job_id, 1)
        pipeline.expire(self.keys.job_runs, max(self.result_ttl, 3600))
        pipeline.get(self.keys.model_source)
        if release_slot_of is not None:
            pipeline.zrem(self.keys.batch_slots, release_slot_of)

    @staticmethod
    def started_source(results: Sequence[Any], default_source: str) -> str:
        """The model source from the results of `job_starting`'s commands."""
        source = results[2]
        return source.decode() if source is not None else default_source

    def bump(self, counter: str, amount: int = 1) -> None:
        self.connection.hincrby(self.keys.stats, counter, amount)

    def enqueue_delivery(self, func: str, job_id: str, task_id: Any, output: dict) -> None:
        """Queue the delivery of a handed-off output on the writeback queue (one per predict job).

        The output travels in the job itself, so a delivery that waits longer than OSPREY_RESULT_TTL_S
        still has it. Retries follow `writeback_retry` (RQ's scheduler re-queues; no worker sleeps)."""
        payload = {"job_id": job_id, "task_id": task_id, "output": output}
        policy = self.writeback_retry
        try:
            self.writeback.enqueue_call(
                func, args=(payload,), job_id=f"{job_id}-wb", unique=True,
                retry=Retry(max=policy.retries, interval=policy.intervals()) if policy.retries else None,
                result_ttl=self.result_ttl, failure_ttl=7 * 24 * 3600, description=f"deliver task {task_id}",
                on_failure=Callback(DELIVERY_FAILURE_CALLBACK),
            )
        except DuplicateJobError:
            pass  # a retried predict job: its delivery is already queued or done

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
            queue = self._queue_of(job.origin)
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

    def _queue_of(self, origin: str) -> Queue:
        """The RQ queue a job belongs to: one of ours, or a group's hold queue."""
        for queue in self.queues.values():
            if queue.name == origin:
                return queue
        if origin.startswith(self.keys.batch_hold("")):
            return self.hold_queue(origin[len(self.keys.batch_hold("")):])
        return self.queues[INTERACTIVE]

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

    def record_loaded_model(self, source: str, version: str, worker: str, score: dict | None = None) -> None:
        """What a worker serves: source, version and what its scores mean (engine.score_info)."""
        record: dict[str, Any] = {"source": source, "version": version, "worker": worker, "at": time.time()}
        if score is not None:
            record["score"] = score
        pipe = self.connection.pipeline(transaction=False)
        pipe.set(self.keys.model_current, canonical_json(record))
        pipe.zadd(self.keys.model_versions, {version: time.time()}, nx=True)
        pipe.execute()

    def current_model(self) -> dict | None:
        value = self.connection.get(self.keys.model_current)
        return json.loads(value) if value is not None else None

    def model_versions(self) -> list[str]:
        return [v.decode() for v in self.connection.zrange(self.keys.model_versions, 0, -1)]

    def record_swap(self, ok: bool, source: str, worker: str, error: str = "") -> None:
        """The outcome of a model swap, kept so a failed one is visible (GET /versions), not only logged."""
        self.connection.set(self.keys.model_swap, canonical_json(
            {"ok": ok, "source": source, "error": error[:2000], "worker": worker, "at": time.time()}))

    def last_swap(self) -> dict | None:
        value = self.connection.get(self.keys.model_swap)
        return json.loads(value) if value is not None else None


def hang_reason(record: dict) -> str:
    return (f"the prediction hung (no result {record.get('after_s')} s after it started, stuck in native code); "
            f"the worker process was killed and replaced ({record.get('attempts', 1)} time(s)); a hang that "
            "repeats is a bug or a GPU fault: see the worker log")


def live_workers(connection: Redis, prefix: str) -> list[str]:
    """Names of the prediction workers of deployment `prefix` with a live heartbeat (for /health)."""
    keys = RedisKeys(prefix)
    return [n.decode() for n in connection.zrangebyscore(keys.live_workers, time.time(), "+inf")]
