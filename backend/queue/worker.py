"""``osprey worker``: one process per GPU that holds the model and runs prediction jobs from Redis.

Why a SimpleWorker: RQ's default worker forks a work horse per job, which would either reload the model per
job or inherit a CUDA context across fork ("Cannot re-initialize CUDA in forked subprocess"). A
SimpleWorker runs jobs in its own process, so the model is loaded once and stays on the GPU; the engine's
image-encoding cache (keyed by image content) then lets consecutive jobs on the same image -- the regions
an annotator draws one after another -- share one image encoding.

What RQ's SimpleWorker (rq 3.0) lacks, and this class adds:
- *Heartbeats during a job.* A SimpleWorker registers a running job for ``timeout + 60`` s and never
  refreshes it, so a killed worker's job would wait minutes to be noticed (and RQ's cleanup of such jobs
  runs in its maintenance pass: every 10 minutes, and only between jobs or after a 405 s idle wait). Here a thread refreshes the
  job's StartedJobRegistry entry every OSPREY_WORKER_HEARTBEAT_S with a TTL of three beats.
- *A reaper.* Every beat, one worker (a Redis lock) runs ``JobQueue.reap``: expired entries of dead workers
  are retried on another worker (RQ's StartedJobRegistry cleanup + ``Retry``), and jobs lost between
  dequeue and start are re-queued.
- *Model reload.* Before each job the worker compares the model source announced in Redis
  (``<prefix>:model:source``, written by promotion) with what it holds, and reloads when it changed;
  it re-announces what it serves every beat, so /setup knows the version even after a Redis restart.
- *Liveness.* Prediction workers write ``<prefix>:workers:live`` every beat (``JobQueue.heartbeat_worker``);
  ``live_workers()`` is what /health and interactive requests read, so a dead worker means DOWN and 503.
- *Scheduled retries.* A worker serving the ``writeback`` queue moves due retries of write-back jobs back
  into the queue every beat (RQ's scheduler, run in the beat thread: no forked process, no sleeping).
- *Model swap.* The old model is freed *before* the new one loads (two 14 GB models do not fit one GPU);
  if the new one fails, the old one is loaded again and the failure is recorded (``<prefix>:model:swap``,
  shown by GET /versions), not only logged.
- *Light workers.* A worker serving only ``writeback`` loads no model (``osprey run`` starts one).
- *Redis outages.* Reconnection waits at most 2 s between tries; if RQ's loop gives up, a new worker
  object takes over with the same loaded model.

- *Fair lanes.* Before each dequeue the worker feeds the batch queue round-robin from the projects' hold
  queues and takes a batch job only while it holds a batch slot (``JobQueue.acquire_batch_slot``: all
  live workers but OSPREY_INTERACTIVE_RESERVED_WORKERS); without one it serves interactive and write-back
  only, re-checking every beat. Interactive comes first in every dequeue, so between two batch jobs a
  worker always takes a waiting click first.
- *Hang watchdog.* A job still running OSPREY_JOB_HANG_GRACE_S past its timeout is stuck where RQ's
  SIGALRM cannot reach (native code). The beat thread records it (``JobQueue.record_hang``) and kills
  this process with SIGKILL; its registry entry expires, the reaper retries the job, and the supervisor
  (``osprey run``, or the container's restart policy) starts a fresh process. A hang that holds the GIL
  stops the beat thread too: then ``osprey run``'s supervisor kills the process when its liveness expires.

Test-only hooks (read once at start): OSPREY_TEST_JOB_DELAY_S (default 0) sleeps that long at the start of
every job, after the job is registered as started, so fault tests can SIGKILL a worker mid-job;
OSPREY_TEST_NATIVE_HANG_TASK=<task id>[,<task id>:gil...] makes jobs of those tasks call libc ``sleep``
for OSPREY_TEST_NATIVE_HANG_S (default 3600) with SIGALRM blocked (a C call RQ's timeout cannot interrupt;
``:gil`` holds the GIL during it). Nothing else behaves differently under test.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from redis import Redis
from redis.exceptions import RedisError
from rq.executions import Execution
from rq.job import Job
from rq.queue import Queue
from rq.scheduler import RQScheduler
from rq.serializers import JSONSerializer
from rq.utils import import_attribute, now
from rq.worker import SimpleWorker, WorkerStatus

from backend.queue import handlers as jobs
from backend.queue.jobs import BATCH, INTERACTIVE, KINDS, WRITEBACK, JobQueue

logger = logging.getLogger(__name__)

TEST_DELAY_ENV = "OSPREY_TEST_JOB_DELAY_S"
TEST_HANG_TASK_ENV = "OSPREY_TEST_NATIVE_HANG_TASK"
DEFAULT_QUEUES = (INTERACTIVE, BATCH, WRITEBACK)
_HEARTBEAT_COALESCE_S = 1.0


def media_origins(settings: Any) -> list[Any]:
    """The trusted media origins, from the adapter function named by OSPREY_MEDIA_ORIGINS (by name: the
    queue imports no adapter)."""
    name = getattr(settings, "osprey_media_origins", "") or ""
    if not name:
        return []
    return list(import_attribute(name)(settings))


class WorkerRuntime:
    """What jobs need in the worker process: the engine (loaded once), media fetcher and queue.

    The engine is not thread-safe (its caches mutate on every call): `engine_lock` is held around every
    use of the engine (a job's predictions) and every swap (load, refresh), so a model can never be
    replaced under a running prediction whichever thread asks for it. The beat thread never takes it: it
    only reads the (engine, source) pair, so a long job cannot stall heartbeats."""

    def __init__(self, settings: Any, connection: Redis, name: str, loader: Callable[[str], Any] | None = None,
                 origins: Sequence[Any] | None = None):
        from backend.media.fetch import MediaFetcher

        self.settings = settings
        self.connection = connection
        self.name = name
        self.queue = JobQueue(connection, settings)
        self.media = MediaFetcher(settings, media_origins(settings) if origins is None else origins)
        self.engine: Any = None
        self.refiner: Any = None  # SAM, when SAM_CHECKPOINT is set: boxes and clicks become object masks
        self.source: str | None = None
        self._failed_source: str | None = None
        self._loader = loader
        self.engine_lock = threading.RLock()

    def _load_engine(self, source: str) -> Any:
        if self._loader is not None:
            return self._loader(source)
        from osprey_core import load_engine

        s = self.settings
        return load_engine(source, device=s.osprey_device, dtype=s.osprey_dtype, max_new_tokens=s.osprey_max_new_tokens,
                           quantization=s.osprey_quantization, vision_tower_file=s.osprey_vision_tower_file)

    def _release(self) -> None:
        """Drop the held model and give its memory back before another one is loaded."""
        self.engine = None
        gc.collect()
        _empty_cuda_cache()

    def load(self, source: str) -> None:
        """Serve `source`. The old model is freed first; if `source` fails to load, the old one is loaded
        again (and the failure recorded) before the error is raised."""
        with self.engine_lock:
            self._load(source)

    def _load(self, source: str) -> None:
        started = time.perf_counter()
        previous = self.source if self.engine is not None else None
        self._release()
        try:
            engine = self._load_engine(source)
        except Exception as exc:
            self._record_swap(False, source, f"{type(exc).__name__}: {exc}")
            if previous is not None and previous != source:
                logger.error("could not load model %r (%s); loading %r again", source, exc, previous)
                self.engine, self.source = self._load_engine(previous), previous
                self.announce()
            raise
        if self.refiner is None and self.settings.sam_checkpoint is not None:
            from osprey_core.sam import build_refiner

            s = self.settings
            self.refiner = build_refiner(s.sam_checkpoint, s.sam_model_type, s.osprey_device)
        self.engine, self.source = engine, source
        self._record_swap(True, source)
        self.announce()
        logger.info("worker %s serves %s (version %s), loaded in %.1f s", self.name, source,
                    engine.model_version, time.perf_counter() - started)

    def _record_swap(self, ok: bool, source: str, error: str = "") -> None:
        try:
            self.queue.record_swap(ok, source, self.name, error)
        except RedisError as exc:
            logger.warning("could not record the model swap in Redis: %s", exc)

    def refresh_model(self, wanted: str | None = None) -> None:
        """Load the announced model source (`wanted`, else read from Redis) if it differs from the one held
        (a promotion happened)."""
        if wanted is None:
            wanted = self.queue.wanted_model_source(self.settings.osprey_model)
        if wanted == self.source or wanted == self._failed_source:
            return
        try:
            self.load(wanted)
            self._failed_source = None
        except Exception:
            if self.engine is None:
                raise
            self._failed_source = wanted
            logger.exception("could not load announced model %r; keeping %r", wanted, self.source)

    def announce(self) -> None:
        engine, source = self.engine, self.source  # no lock: called from the beat thread too
        if engine is not None and source is not None:
            score = engine.score_info() if hasattr(engine, "score_info") else None
            self.queue.record_loaded_model(source, engine.model_version, self.name, score)


def _empty_cuda_cache() -> None:
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


class OspreyWorker(SimpleWorker):
    """A SimpleWorker with job heartbeats, a beat thread (liveness, reaper, retries) and model reload."""

    max_connection_wait_time = 2.0  # seconds between reconnection tries when Redis is down

    def __init__(self, queues: list[Queue], runtime: WorkerRuntime, heartbeat_s: int,
                 test_job_delay_s: float = 0.0, live_name: str | None = None, **kwargs: Any):
        super().__init__(queues, serializer=JSONSerializer, job_monitoring_interval=heartbeat_s, **kwargs)
        self.runtime = runtime
        self.heartbeat_s = max(1, int(heartbeat_s))
        self.test_job_delay_s = test_job_delay_s
        self.stopping = False
        self.live_name = live_name  # set for prediction workers: their liveness entry
        self._reaper_stop = threading.Event()
        writeback = [q for q in queues if q.name.endswith(f":{WRITEBACK}")]
        self._retry_scheduler = (RQScheduler(writeback, connection=runtime.connection, serializer=JSONSerializer)
                                 if writeback else None)
        self._all_queues = list(self._ordered_queues)
        self._batch_queue = next((q for q in queues if q.name == runtime.queue.batch.name), None)
        self.hang_grace_s = float(getattr(runtime.settings, "osprey_job_hang_grace_s", 60.0) or 60.0)
        self._native_hang = _native_hang_hook()
        self._slot_to_release = False  # an interactive job came while holding a batch slot
        self._idle_pending = False  # the "idle" state goes out with the next heartbeat
        self._beat_at = float("-inf")  # monotonic time of the last heartbeat sent
        self._sent_state: str | None = None  # the state last written to Redis
        self._start_pipe: Any = None  # prepare_execution's commands, sent with prepare_job_execution's
        self._release_on_start = False

    # RQ writes the worker's heartbeat as three commands and its "idle" state as a fourth, each a round trip,
    # up to three times per job; here each heartbeat is one pipeline that also carries a pending "idle",
    # and a heartbeat less than a second after the last one is skipped (the worker key lives >= 3 beats).
    def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
        if pipeline is not None:
            super().heartbeat(timeout, pipeline)
            self._beat_at = time.monotonic()
            return
        if not self._idle_pending and time.monotonic() - self._beat_at < _HEARTBEAT_COALESCE_S:
            return
        with self.connection.pipeline() as pipe:
            if self._idle_pending:
                super().set_state(WorkerStatus.IDLE, pipe)
            super().heartbeat(timeout, pipe)
            pipe.execute()
        if self._idle_pending:
            self._sent_state = WorkerStatus.IDLE
        self._idle_pending = False
        self._beat_at = time.monotonic()

    def set_state(self, state: str, pipeline: Any = None) -> None:
        """RQ follows every "idle" with a heartbeat (after a job, and before each dequeue): send them together,
        and only once between two jobs."""
        if state == WorkerStatus.IDLE and pipeline is None:
            self._state = state
            self._idle_pending = self._sent_state != WorkerStatus.IDLE
            return
        self._idle_pending = False
        super().set_state(state, pipeline)
        self._sent_state = state

    def dequeue_job_and_maintain_ttl(self, timeout: int | None,
                                     max_idle_time: int | None = None) -> tuple[Job, Queue] | None:
        """RQ's dequeue, with the fair batch lane: feed it, and take batch jobs only with a batch slot."""
        if self._batch_queue is None:
            return super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)
        while True:
            queue = self.runtime.queue
            try:
                may_batch = queue.feed_and_acquire(self.name, 3 * self.heartbeat_s)
            except RedisError:
                may_batch = True  # RQ's own loop below waits for Redis to come back
            self._ordered_queues = [q for q in self._all_queues if may_batch or q is not self._batch_queue]
            if timeout is None:  # burst: one non-blocking look
                result = super().dequeue_job_and_maintain_ttl(None, max_idle_time)
            else:  # short blocking waits: the slot (and the feed) are looked at again every beat
                wait = min(int(timeout), self.heartbeat_s)
                result = super().dequeue_job_and_maintain_ttl(wait, wait)
            if may_batch and (result is None or result[1].name != self._batch_queue.name):
                if result is None:
                    self._release_slot()
                else:  # freed in the same round trip that starts the job (perform_job)
                    self._slot_to_release = True
            if result is not None or timeout is None or self._stop_requested:
                return result

    def _release_slot(self) -> None:
        try:
            self.runtime.queue.release_batch_slot(self.name)
        except RedisError:
            pass  # it expires after three beats

    def request_stop(self, signum: Any, frame: Any) -> None:
        """SIGINT/SIGTERM: RQ's warm shutdown (finish the running job), and no restart afterwards."""
        self.stopping = True
        super().request_stop(signum, frame)

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        """A running job's registry entry lives three beats; the beat thread keeps it alive."""
        return 3 * self.heartbeat_s

    def prepare_execution(self, job: Job) -> Any:
        """RQ's execution record and "busy" state, queued on a pipeline that `prepare_job_execution` sends
        with its own commands: one round trip from dequeue to start instead of three."""
        pipe = self.connection.pipeline()
        execution = Execution.create(job, self.get_heartbeat_ttl(job), pipeline=pipe, worker_name=self.name)
        self.executions[execution.id] = execution
        self.set_state(WorkerStatus.BUSY, pipeline=pipe)
        self._start_pipe = pipe
        return execution

    def perform_job(self, job: Job, queue: Queue, execution: Any) -> bool:
        stop = threading.Event()
        beat = threading.Thread(target=self._beat, args=(job, execution, stop), daemon=True,
                                name="osprey-heartbeat")
        beat.start()
        self._release_on_start, self._slot_to_release = self._slot_to_release, False
        try:
            return super().perform_job(job, queue, execution)
        finally:
            stop.set()
            beat.join()
            if self._batch_queue is not None and queue.name == self._batch_queue.name:
                self._release_slot()

    def prepare_job_execution(self, job: Job, remove_from_intermediate_queue: bool = False) -> None:
        """RQ marks the job started here (its commands as in rq 3.0's ``prepare_job_execution``), in the
        same round trip as `prepare_execution`'s and ours: count the run, read the announced model source,
        free a batch slot. Then the model is swapped if a promotion happened, and the test hooks run."""
        pipe, self._start_pipe = self._start_pipe, None
        if pipe is None:
            pipe = self.connection.pipeline()
        release = self.name if self._release_on_start else None
        with pipe:
            ttl = self.get_heartbeat_ttl(job)
            self.heartbeat(ttl, pipeline=pipe)
            job.heartbeat(now(), ttl, pipeline=pipe)
            job.prepare_for_execution(self.name, pipeline=pipe)
            pipe.persist(job.key)
            if remove_from_intermediate_queue:
                pipe.lrem(Queue(job.origin, connection=self.connection).intermediate_queue_key, 1, job.id)
            first = len(pipe)
            self.runtime.queue.job_starting(job.id, release_slot_of=release, pipeline=pipe)
            results = pipe.execute()
        wanted = self.runtime.queue.started_source(results[first:], self.runtime.settings.osprey_model)
        if self.runtime.engine is not None:
            self.runtime.refresh_model(wanted)
        if self.test_job_delay_s:
            time.sleep(self.test_job_delay_s)
        if self._native_hang is not None:
            self._native_hang(job)

    def _beat(self, job: Job, execution: Any, stop: threading.Event) -> None:
        started = time.monotonic()
        batch = job.origin == (self._batch_queue.name if self._batch_queue is not None else None)
        while not stop.wait(self.heartbeat_s):
            running_s = time.monotonic() - started
            if job.timeout and job.timeout > 0 and running_s > job.timeout + self.hang_grace_s:
                self._kill_hung(job, running_s)
                return
            try:
                self.maintain_heartbeats(job, execution)
                if batch:
                    self.runtime.queue.acquire_batch_slot(self.name, 3 * self.heartbeat_s)
            except RedisError as exc:
                logger.warning("heartbeat of job %s failed: %s", job.id, exc)

    def _kill_hung(self, job: Job, running_s: float) -> None:
        """The job is stuck where no Python exception reaches it: give its work to a fresh process."""
        logger.error("job %s still runs %.0f s after it started (timeout %s s + OSPREY_JOB_HANG_GRACE_S %g s): "
                     "stuck in native code; killing this worker process so that it is replaced and the job "
                     "retried", job.id, running_s, job.timeout, self.hang_grace_s)
        try:
            self.runtime.queue.record_hang(job.id, self.live_name or self.name, running_s)
            if self.live_name is not None:
                self.runtime.queue.forget_worker(self.live_name)
        except RedisError as exc:
            logger.warning("could not record the hang of job %s: %s", job.id, exc)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    def beat_once(self) -> None:
        """Liveness, model announcement, reaping and due write-back retries: one pass."""
        queue = self.runtime.queue
        if self.live_name is not None:
            queue.heartbeat_worker(self.live_name, 3 * self.heartbeat_s)
        self.runtime.announce()
        queue.reap(lost_grace_s=2 * self.heartbeat_s)
        if self._retry_scheduler is not None:
            self._retry_scheduler.acquire_locks()
            if self._retry_scheduler.acquired_locks:
                try:
                    self._retry_scheduler.enqueue_scheduled_jobs()
                finally:
                    self._retry_scheduler.release_locks()

    def start_reaper(self) -> None:
        try:
            self.beat_once()  # alive before the first job can arrive
        except RedisError as exc:
            logger.warning("first beat failed: %s", exc)
        thread = threading.Thread(target=self._reap_loop, daemon=True, name="osprey-reaper")
        thread.start()

    def stop_reaper(self) -> None:
        self._reaper_stop.set()

    def _reap_loop(self) -> None:
        redis_down = False
        while not self._reaper_stop.wait(self.heartbeat_s):
            try:
                self.beat_once()
                if redis_down:
                    logger.info("reaper: Redis is back")
                redis_down = False
            except RedisError as exc:
                if not redis_down:  # once per outage, not every beat
                    logger.warning("reaper: Redis unavailable (%s)", exc)
                redis_down = True
            except Exception:
                logger.exception("reaper pass failed")


def _native_hang_hook() -> Callable[[Job], None] | None:
    """The test-only native hang (module docstring): None unless OSPREY_TEST_NATIVE_HANG_TASK is set."""
    spec = os.environ.get(TEST_HANG_TASK_ENV, "").strip()
    if not spec:
        return None
    tasks = dict(item.partition(":")[::2] for item in spec.split(",") if item.strip())  # task id -> "" | "gil"
    seconds = int(float(os.environ.get("OSPREY_TEST_NATIVE_HANG_S", "3600") or 3600))
    logger.warning("%s=%s: jobs of these tasks hang in native code (test hook)", TEST_HANG_TASK_ENV, spec)

    def hang(job: Job) -> None:
        payload = job.args[0] if job.args else {}
        mode = tasks.get(str((payload or {}).get("task_id")))
        if mode is None:
            return
        libc = ctypes.PyDLL(None) if mode == "gil" else ctypes.CDLL(None)  # PyDLL keeps the GIL held
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})  # what RQ's timeout uses
        try:
            libc.sleep(seconds)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGALRM})

    return hang


def run_worker(settings: Any, burst: bool = False, name: str | None = None,
               queues: Sequence[str] = DEFAULT_QUEUES) -> None:
    """Load the model once (unless only the writeback queue is served), then serve `queues` until stopped."""
    from backend.queue.redis import connect_for

    connection = connect_for(settings)
    base_name = name or f"osprey-{socket.gethostname()}-{os.getpid()}"
    runtime = WorkerRuntime(settings, connection, base_name)
    ordered = runtime.queue.ordered_queues(queues)
    predicts = any(q in KINDS for q in queues)
    if predicts:
        runtime.load(runtime.queue.init_model_source(settings.osprey_model))
    jobs.set_runtime(runtime)
    delay = float(os.environ.get(TEST_DELAY_ENV, "0") or 0)
    if delay:
        logger.warning("%s=%s: every job sleeps first (test hook)", TEST_DELAY_ENV, delay)

    try:
        while True:
            worker = None
            try:
                worker = OspreyWorker(ordered, runtime=runtime, heartbeat_s=settings.osprey_worker_heartbeat_s,
                                      test_job_delay_s=delay, live_name=base_name if predicts else None,
                                      connection=connection, name=f"{base_name}-{uuid.uuid4().hex[:6]}")
                worker.start_reaper()
                worker.work(burst=burst, logging_level=settings.log_level.upper(), with_scheduler=False)
            except RedisError as exc:
                logger.warning("Redis unavailable (%s)", exc)
            finally:
                if worker is not None:
                    worker.stop_reaper()
            if burst or (worker is not None and worker.stopping):
                return
            # RQ's loop quits on errors such as a Redis outage in the middle of a job: start over, model kept.
            logger.warning("worker loop ended unexpectedly; restarting in 1 s")
            time.sleep(1.0)
    finally:
        if predicts:
            try:
                runtime.queue.forget_worker(base_name)
            except RedisError:
                pass
