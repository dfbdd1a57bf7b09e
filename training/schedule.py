"""When training runs, and that only one runs at a time.

- Queue: training jobs (syncs from the annotation tool, training runs, schedule ticks) go to the RQ queue
  ``<prefix>:training`` with RQ's JSONSerializer, served by ``osprey worker --queues training`` -- never by
  a prediction worker, so a 10-minute run never delays a region drawn in the editor.
- Coalescing: job ids are deterministic (``<prefix>-sync-<project>-<task>``, ``<prefix>-train-<project>``);
  a burst of webhooks for one task while its sync waits in the queue enqueues nothing new, and an event that
  arrives while the sync runs queues exactly one follow-up (``...-next``).
- Schedule: RQ's own ``CronScheduler`` (``osprey schedule``) enqueues a ``tick`` every OSPREY_TRAIN_TICK_S
  and a project sync every OSPREY_SYNC_PERIOD_S; the tick enqueues a run for a project with at least
  OSPREY_TRAIN_MIN_CORRECTIONS new corrections since its last run, or with any new correction once
  OSPREY_TRAIN_PERIOD_S passed. Each finished sync checks the same rule at once, so the N-th correction
  starts a run without waiting for the next tick.
- One run at a time: ``TrainingLock`` is a Redis key with a token, a TTL of OSPREY_TRAIN_LOCK_TTL_S and a
  heartbeat thread that extends it. A SIGKILLed run stops beating, its lock expires, the next run takes it.
  A run that lost its lock (a long pause) does not promote.
- Status: every run's outcome (promoted, refused with the gate's numbers, failed, skipped) is kept in
  Redis (``record_run``), so /versions can show it without the web process reading the model directory.

This module is light (no torch): the web process imports it to enqueue and to report.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from redis import Redis
from rq import Queue
from rq.cron import CronJob, CronScheduler
from rq.exceptions import DuplicateJobError, NoSuchJobError
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

logger = logging.getLogger(__name__)

TRAINING = "training"
TRAIN_FUNC = "training.jobs.train_job"
TICK_FUNC = "training.jobs.tick_job"
_RUNS_KEPT = 100
_WAITING = (JobStatus.QUEUED, JobStatus.DEFERRED, JobStatus.SCHEDULED)


class TrainingSettings(BaseSettings):
    """The learning loop's knobs (environment variables, like backend/settings.py)."""

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    osprey_train_min_corrections: int = Field(50, description="New corrections that start a run.")
    osprey_train_period_s: int = Field(24 * 3600, description="A run also starts this long after the last one "
                                                              "when any correction arrived since.")
    osprey_train_tick_s: int = Field(60, description="How often the schedule checks the rule above.")
    osprey_sync_period_s: int = Field(3600, description="Full project sync period (repairs missed webhooks).")
    osprey_train_lock_ttl_s: int = Field(30, description="Training lock TTL; the run's heartbeat extends it.")
    osprey_train_job_timeout_s: int = Field(6 * 3600, description="RQ timeout of one training run.")
    osprey_max_queued_syncs: int = Field(10_000, description="Jobs waiting on the training queue beyond which a "
                                                             "task's sync is folded into its project's full sync "
                                                             "(one per project): the lane stays bounded, no "
                                                             "correction is lost.")
    osprey_train_mode: str = Field("lora", description="lora or full fine-tuning.")
    osprey_train_steps: int | None = Field(None, description="Optimizer steps per run (default: from epochs).")
    osprey_train_epochs: float = Field(3.0, description="Epochs over the project's training split.")
    osprey_train_lr: float | None = Field(None, description="Learning rate (default by mode).")
    osprey_train_batch_size: int = Field(8, description="Micro-batch size.")
    osprey_train_vision: bool = Field(False, description="Also train the vision tower (frozen in every Osprey "
                                                         "stage; for a tower that was never trained).")
    osprey_train_tasks: str = Field("category,attributes,short,detailed",
                                    description="Conversations built from corrections (dataset.TASKS).")
    osprey_train_held_out: float = Field(0.2, description="Share of images held out for the gate.")
    osprey_train_seed: int = Field(0, description="Seed of the split and of training.")
    osprey_gate_margin: float = Field(0.0, description="Accuracy the candidate must beat the current by.")
    osprey_gate_max_label_drop: float = Field(0.02, description="Largest per-label accuracy drop allowed.")
    osprey_train_descriptions: bool = Field(False, description="Also score SS/S-IoU in the gate's evaluation.")


@dataclass(frozen=True)
class TrainingKeys:
    """Redis names of the learning loop, under the deployment's prefix."""

    prefix: str

    @property
    def queue(self) -> str:
        return f"{self.prefix}:{TRAINING}"

    @property
    def lock(self) -> str:
        return f"{self.prefix}:training:lock"

    @property
    def runs(self) -> str:
        """List of JSON run records, newest first (capped)."""
        return f"{self.prefix}:training:runs"

    def last(self, project: str) -> str:
        """JSON of the last finished run of a project (its cutoff decides what counts as new)."""
        return f"{self.prefix}:training:last:{project}"

    @property
    def projects(self) -> str:
        """Set of project ids the loop knows (webhooks and `osprey sync` add them)."""
        return f"{self.prefix}:training:projects"

    def sync_id(self, project: str, task: str | None) -> str:
        return f"{self.prefix}-sync-{_safe(project)}-{_safe(task) if task is not None else 'all'}"

    def train_id(self, project: str) -> str:
        return f"{self.prefix}-train-{_safe(project)}"


def _safe(value: Any) -> str:
    return "".join(c if c.isalnum() or c in "_.-" else "_" for c in str(value))[:64]


def training_queue(connection: Redis, prefix: str, timeout_s: int | None = None) -> Queue:
    return Queue(TrainingKeys(prefix).queue, connection=connection, serializer=JSONSerializer,
                 default_timeout=timeout_s or TrainingSettings().osprey_train_job_timeout_s)


# --- enqueueing ---------------------------------------------------------------------------------------


def enqueue_coalesced(queue: Queue, func: str, payload: dict, job_id: str, timeout_s: int | None = None,
                      description: str = "") -> tuple[str, bool]:
    """Enqueue `func(payload)` as `job_id` unless that job still waits in the queue (then it covers this
    request too). A job that runs already gets one follow-up, `<job_id>-next`. Returns (job id, enqueued)."""
    for candidate in (job_id, f"{job_id}-next"):
        for _ in range(3):
            try:
                queue.enqueue_call(func, args=(payload,), job_id=candidate, unique=True, timeout=timeout_s,
                                   result_ttl=24 * 3600, failure_ttl=7 * 24 * 3600, description=description)
                return candidate, True
            except DuplicateJobError:
                try:
                    job = Job.fetch(candidate, connection=queue.connection, serializer=JSONSerializer)
                except NoSuchJobError:
                    continue  # gone in between: try again
                status = job.get_status(refresh=False)
                if status in _WAITING:
                    return candidate, False
                if status == JobStatus.STARTED:
                    break  # runs now: the follow-up id
                job.delete()  # finished, failed, stopped: this request starts a fresh one
    raise RuntimeError(f"could not enqueue {job_id}: it keeps changing state")


def enqueue_sync(connection: Redis, prefix: str, func: str, project: Any, task: Any | None = None,
                 extra: dict | None = None, project_func: str | None = None) -> tuple[str, bool]:
    """Queue `func` (an adapter's sync job) for one task, or with `task=None` the whole project.

    With `project_func` (the adapter's whole-project sync) a task's sync becomes that project's sync when
    the training queue is past OSPREY_MAX_QUEUED_SYNCS."""
    keys = TrainingKeys(prefix)
    project = str(project)
    connection.sadd(keys.projects, project)
    queue = training_queue(connection, prefix)
    if task is not None and project_func and queue.count >= TrainingSettings().osprey_max_queued_syncs:
        # A flood of events (a bulk import, a replay): one coalesced full sync of the project reads the
        # same tasks, so the queue grows by projects, not by events.
        logger.warning("training queue holds %d jobs (OSPREY_MAX_QUEUED_SYNCS): the sync of task %s is folded "
                       "into a full sync of project %s", queue.count, task, project)
        task, func = None, project_func
    payload = {"prefix": prefix, "project": project, "task": None if task is None else str(task), **(extra or {})}
    return enqueue_coalesced(queue, func, payload, keys.sync_id(project, payload["task"]),
                             timeout_s=3600, description=f"sync project {project} task {task}")


def enqueue_training(connection: Redis, prefix: str, project: Any, reason: str) -> tuple[str, bool]:
    """Queue a training run of `project` (one waiting run per project; the lock serialises runs)."""
    keys = TrainingKeys(prefix)
    project = str(project)
    connection.sadd(keys.projects, project)
    payload = {"prefix": prefix, "project": project, "reason": reason, "requested_at": time.time()}
    job_id, fresh = enqueue_coalesced(training_queue(connection, prefix), TRAIN_FUNC, payload, keys.train_id(project),
                                      timeout_s=TrainingSettings().osprey_train_job_timeout_s,
                                      description=f"train project {project} ({reason})")
    logger.info("training run of project %s %s as %s (%s)", project, "queued" if fresh else "already queued",
                job_id, reason)
    return job_id, fresh


# --- the rule -----------------------------------------------------------------------------------------


def due(new_corrections: int, last_run_at: float | None, policy: TrainingSettings, now: float | None = None
        ) -> str | None:
    """Why a run is due now, or None: N new corrections, or any new one after the period."""
    now = time.time() if now is None else now
    if new_corrections >= max(1, policy.osprey_train_min_corrections):
        return f"{new_corrections} new corrections (threshold {policy.osprey_train_min_corrections})"
    if new_corrections > 0 and last_run_at is not None and now - last_run_at >= policy.osprey_train_period_s:
        return f"{new_corrections} new corrections and {policy.osprey_train_period_s} s since the last run"
    return None


def last_run(connection: Redis, prefix: str, project: str) -> dict | None:
    value = connection.get(TrainingKeys(prefix).last(str(project)))
    return json.loads(value) if value else None


def record_run(connection: Redis, prefix: str, record: dict) -> None:
    """Keep a run's outcome: the newest first in `runs`, and per project for the schedule's cutoff."""
    keys = TrainingKeys(prefix)
    data = json.dumps(record, sort_keys=True, default=str)
    pipe = connection.pipeline()
    pipe.lpush(keys.runs, data)
    pipe.ltrim(keys.runs, 0, _RUNS_KEPT - 1)
    if record.get("project") is not None and record.get("status") in ("promoted", "refused"):
        pipe.set(keys.last(str(record["project"])), data)
    pipe.execute()


def recent_runs(connection: Redis, prefix: str, limit: int = 20) -> list[dict]:
    return [json.loads(v) for v in connection.lrange(TrainingKeys(prefix).runs, 0, max(0, limit - 1))]


def training_status(connection: Redis, prefix: str, limit: int = 20) -> dict[str, Any]:
    """What /versions shows of the loop: the last runs (refusals with the gate's numbers) and the lock."""
    runs = recent_runs(connection, prefix, limit)
    holder = connection.get(TrainingKeys(prefix).lock)
    return {
        "running": json.loads(holder) if holder else None,
        "runs": runs,
        "refusals": [r for r in runs if r.get("status") == "refused"],
    }


# --- one run at a time ---------------------------------------------------------------------------------

# KEYS: lock. ARGV: token, ttl ms.
_EXTEND_LUA = """
local v = redis.call('GET', KEYS[1])
if v and cjson.decode(v)['token'] == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE_LUA = """
local v = redis.call('GET', KEYS[1])
if v and cjson.decode(v)['token'] == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class TrainingLock:
    """A Redis lock with a heartbeat: held while its owner beats, gone `ttl_s` after the owner died."""

    def __init__(self, connection: Redis, key: str, ttl_s: float = 30.0, owner: dict | None = None):
        self.connection = connection
        self.key = key
        self.ttl_ms = max(1000, int(ttl_s * 1000))
        self.token = uuid.uuid4().hex
        self.owner = dict(owner or {})
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._extend = connection.register_script(_EXTEND_LUA)
        self._release = connection.register_script(_RELEASE_LUA)

    def acquire(self) -> bool:
        value = json.dumps({"token": self.token, "since": time.time(), **self.owner}, default=str)
        if not self.connection.set(self.key, value, nx=True, px=self.ttl_ms):
            return False
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, daemon=True, name="osprey-training-lock")
        self._thread.start()
        return True

    def _beat(self) -> None:
        interval = self.ttl_ms / 3000.0
        while not self._stop.wait(interval):
            try:
                if not self._extend(keys=[self.key], args=[self.token, self.ttl_ms]):
                    logger.error("training lock %s was lost (expired or taken over)", self.key)
                    self.lost.set()
                    return
            except Exception as exc:  # Redis blip: try again next beat; the TTL covers 3 beats
                logger.warning("training lock heartbeat failed: %s", exc)

    def holds(self) -> bool:
        """Whether this lock is still ours (checked again right before a promotion)."""
        if self.lost.is_set():
            return False
        value = self.connection.get(self.key)
        return bool(value) and json.loads(value).get("token") == self.token

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            self._release(keys=[self.key], args=[self.token])
        except Exception as exc:
            logger.warning("could not release training lock (it expires by itself): %s", exc)

    def __enter__(self) -> TrainingLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# --- RQ's scheduler -----------------------------------------------------------------------------------


class JSONCronJob(CronJob):
    """RQ's CronJob enqueues with the default (pickle) serializer; ours uses JSON like every queue here."""

    def enqueue(self, connection: Redis) -> Job:
        from rq import cron_job_registry

        queue = Queue(self.queue_name, connection=connection, serializer=JSONSerializer)
        job = queue.enqueue_call(self.func_name, args=self.args, kwargs=self.kwargs,
                                 timeout=self.job_options.get("job_timeout"),
                                 result_ttl=self.job_options.get("result_ttl"),
                                 failure_ttl=self.job_options.get("failure_ttl"))
        cron_job_registry.add(self.name, connection, enqueue_timestamp=time.time())
        return job


def build_scheduler(connection: Redis, prefix: str, policy: TrainingSettings | None = None,
                    periodic: dict[str, int] | None = None) -> CronScheduler:
    """The CronScheduler `osprey schedule` runs: the training tick, plus `periodic` {job function: interval
    s} from the adapters (e.g. the Label Studio project sync that repairs missed webhooks)."""
    policy = policy or TrainingSettings()
    scheduler = CronScheduler(connection, name=f"{prefix}-schedule-{uuid.uuid4().hex[:6]}")
    queue = TrainingKeys(prefix).queue
    entries = {TICK_FUNC: policy.osprey_train_tick_s, **(periodic or {})}
    for func, interval in entries.items():
        name = f"{prefix}-{func.rsplit('.', 1)[-1]}"
        job = JSONCronJob(queue_name=queue, func_name=func, args=({"prefix": prefix},), interval=max(1, int(interval)),
                          job_timeout=3600, result_ttl=600, failure_ttl=24 * 3600, name=name)
        scheduler._cron_jobs.append(job)
        logger.info("schedule: %s every %d s on %s", func, interval, queue)
    return scheduler


def run_schedule(settings: Any, periodic: dict[str, int] | None = None) -> None:
    """`osprey schedule`: RQ's CronScheduler loop until SIGINT/SIGTERM."""
    from backend.queue.redis import connect, redis_url

    connection = connect(redis_url(settings))
    build_scheduler(connection, settings.osprey_redis_prefix, periodic=periodic).start()


def start_schedule_thread(connection: Redis, prefix: str, periodic: dict[str, int] | None = None
                          ) -> tuple[threading.Thread, threading.Event]:
    """The same CronScheduler driven from a thread (its `start()` wants the main thread for signals):
    `osprey worker --queues training --schedule`, which is how `osprey run` embeds the schedule."""
    scheduler = build_scheduler(connection, prefix, periodic=periodic)
    stop = threading.Event()

    def loop() -> None:
        scheduler.register_birth()
        try:
            while not stop.is_set():
                try:
                    if scheduler.enqueue_jobs():
                        scheduler.save()
                    scheduler.heartbeat()
                except Exception:
                    logger.exception("schedule: enqueueing failed; trying again")
                stop.wait(max(0.5, min(scheduler.calculate_sleep_interval(), 5.0)))
        finally:
            try:
                scheduler.register_death()
            except Exception:
                pass

    thread = threading.Thread(target=loop, daemon=True, name="osprey-schedule")
    thread.start()
    return thread, stop


def run_training_worker(settings: Any, burst: bool = False, name: str | None = None, schedule: bool = False,
                        periodic: dict[str, int] | None = None, preload: tuple[str, ...] = ()) -> None:
    """`osprey worker --queues training [--schedule]`: an RQ worker for syncs and training runs (no model
    held between jobs), optionally with the schedule in a thread; `preload`: modules of the job functions
    (an adapter's sync) to import before forking.

    A forking worker: each job runs in a child process, so a run killed by the OOM killer or SIGKILL
    takes only that child (the lock expires, the next run succeeds) and memory is returned after each run.
    """
    import importlib
    import os
    import socket

    from rq.worker import Worker

    from backend.queue.redis import connect, redis_url

    # Imported once here, so every forked job starts with them loaded (a sync job takes ~0.1 s, not ~2 s).
    for module in ("training.jobs", "training.pipeline", "training.store", *preload):
        importlib.import_module(module)
    connection = connect(redis_url(settings))
    queue = training_queue(connection, settings.osprey_redis_prefix)
    stop = None
    if schedule:
        _, stop = start_schedule_thread(connection, settings.osprey_redis_prefix, periodic)
    # worker_ttl 20 s -> RQ's blocking dequeue waits 5 s, well inside the connection's 10 s socket timeout
    # (RQ's default 405 s wait would time the socket out and log "could not connect" every few seconds).
    worker = Worker([queue], connection=connection, serializer=JSONSerializer, worker_ttl=20,
                    name=name or f"osprey-training-{socket.gethostname()}-{os.getpid()}")
    try:
        worker.work(burst=burst, logging_level=settings.log_level.upper(), with_scheduler=False)
    finally:
        if stop is not None:
            stop.set()
