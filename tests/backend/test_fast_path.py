"""The round trips the interactive path no longer makes, proven by what they used to guarantee.

- The done message carries a small output: a waiter gets it from the message alone (no read of the
  output key), a large one is only announced and read from its key.
- `submit_and_wait` registers its waiter before it enqueues, so an output published right after the
  enqueue is never missed although nothing is read before the first wake-up.
- A worker sends RQ's start bookkeeping, our run count and model-source read in one pipeline before the job
  function runs: inside the function the job is already started, registered, counted and the worker busy.
- Heartbeats less than a second apart are coalesced, but a pending "idle" state always goes out.

Real Redis on 127.0.0.1:6379; the worker runs in this process (a SimpleWorker, as `osprey worker` runs it).
"""

from __future__ import annotations

import json
import threading
import uuid
from typing import Any

import pytest
import redis
from rq import Queue
from rq.job import Job
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer
from rq.worker import WorkerStatus

from backend.queue.jobs import INTERACTIVE, JobQueue, JobSpec, ok_output
from backend.queue.listener import MESSAGE_OUTPUT_MAX, parse_message
from backend.settings import Settings


@pytest.fixture()
def queue(helpers):
    settings = Settings(osprey_redis_prefix=f"f{uuid.uuid4().hex[:10]}", osprey_result_ttl_s=60)
    connection = redis.Redis.from_url("redis://127.0.0.1:6379/0")
    q = JobQueue(connection, settings)
    yield q
    helpers.purge_prefix(connection, q.keys.prefix)


def _spec(q: JobQueue, task_id: int = 1) -> JobSpec:
    return JobSpec(INTERACTIVE, task_id, "/data/local-files/?d=a.png", [{"id": "r1"}], {"image": "image"},
                   "tiny-abc", q.keys.prefix)


def _output(size: int = 10) -> dict:
    return ok_output({"result": [{"id": "r1", "pad": "x" * size}], "score": 0.5, "model_version": "v"}, 0.01, "w")


def test_a_small_output_travels_in_the_done_message_and_a_large_one_is_announced(queue):
    pubsub = queue.connection.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(queue.keys.done_channel)
    pubsub.get_message(timeout=1)
    small, large = _output(), _output(MESSAGE_OUTPUT_MAX + 1)
    queue.publish("job-small", small)
    queue.publish("job-large", large)
    messages = []
    while len(messages) < 2:
        message = pubsub.get_message(timeout=5)
        assert message is not None, "no done message"
        messages.append(parse_message(message["data"]))
    pubsub.close()
    assert messages[0] == ("job-small", json.loads(json.dumps(small)))
    assert messages[1] == ("job-large", None)  # too large for the message: read from its key
    assert queue.outputs(["job-large"])["job-large"] == json.loads(json.dumps(large))


def test_a_waiter_takes_the_output_from_the_message_without_reading_the_key(queue):
    """The message's output is what the waiter returns, even though no output key exists at all."""
    job_id = "job-only-in-message"
    listener = queue.listener()
    waiter = listener.watch([job_id])
    try:
        timer = threading.Timer(0.2, queue.connection.publish,
                                args=(queue.keys.done_channel, job_id + "\n" + json.dumps({"ok": True, "n": 7})))
        timer.start()
        found = queue.wait([job_id], 30, waiter=waiter, read_first=False)
        timer.join()
    finally:
        listener.unwatch([job_id], waiter)
    assert found == {job_id: {"ok": True, "n": 7}}
    assert not queue.connection.exists(queue.keys.out(job_id))


def test_a_large_output_is_read_from_its_key_after_the_announcement(queue):
    s = _spec(queue)
    big = _output(MESSAGE_OUTPUT_MAX + 1)
    queue.live_worker_count = lambda cached=False: 1  # type: ignore[method-assign] - no worker in this test
    threading.Timer(0.3, queue.publish, args=(s.job_id, big)).start()
    fresh, output = queue.submit_and_wait(s, 30)
    assert fresh is True and output == json.loads(json.dumps(big))


def test_submit_and_wait_misses_no_output_published_right_after_the_enqueue(queue):
    """The waiter is registered before the enqueue: a job finished before `wait` even starts is seen."""
    queue.live_worker_count = lambda cached=False: 1  # type: ignore[method-assign]
    original = queue.submit

    def submit_then_finish(spec: JobSpec, admit: bool = True) -> bool:
        enqueued = original(spec, admit=admit)
        queue.publish(spec.job_id, _output())  # the worker was faster than this request
        return enqueued

    queue.submit = submit_then_finish  # type: ignore[method-assign]
    fresh, output = queue.submit_and_wait(_spec(queue, 2), 30)
    assert fresh is True and output is not None and output["ok"]
    # Asked again, the same work is found finished (deduplicated), read from its key.
    queue.submit = original  # type: ignore[method-assign]
    fresh, again = queue.submit_and_wait(_spec(queue, 2), 30)
    assert fresh is False and again == output


# ---- the worker's start of a job --------------------------------------------------------------------


def probe_started_state(prefix: str) -> dict[str, Any]:
    """A job function that reports what Redis says about this job while it runs."""
    from rq import get_current_job

    job = get_current_job()
    connection = job.connection
    worker_key = f"rq:worker:{job.worker_name}"
    return {
        "status": connection.hget(job.key, "status").decode(),
        "registered": job.id in StartedJobRegistry(job.origin, connection=connection).get_job_ids(),
        "worker_state": connection.hget(worker_key, "state").decode(),
        "runs": int(connection.hget(f"{prefix}:job_runs", job.id) or 0),
    }


def _worker(q: JobQueue, queues: list[Queue]):
    from backend.queue.worker import OspreyWorker, WorkerRuntime

    runtime = WorkerRuntime(q.settings, q.connection, f"w-{uuid.uuid4().hex[:6]}", loader=lambda source: None,
                            origins=[])
    return OspreyWorker(queues, runtime=runtime, heartbeat_s=5, connection=q.connection,
                        name=f"{q.keys.prefix}-w{uuid.uuid4().hex[:4]}")


def test_a_job_is_started_registered_and_counted_before_its_function_runs(queue):
    rq_queue = Queue(queue.interactive.name, connection=queue.connection, serializer=JSONSerializer)
    job = rq_queue.enqueue_call("tests.backend.test_fast_path.probe_started_state", args=(queue.keys.prefix,))
    worker = _worker(queue, [rq_queue])
    try:
        worker.work(burst=True, with_scheduler=False)
    finally:
        worker.register_death()
    job = Job.fetch(job.id, connection=queue.connection, serializer=JSONSerializer)
    assert job.get_status() == "finished", job.exc_info
    assert job.return_value() == {"status": "started", "registered": True, "worker_state": WorkerStatus.BUSY,
                                  "runs": 1}
    assert queue.connection.hget(worker.key, "state").decode() == WorkerStatus.IDLE  # and idle again after


def test_heartbeats_a_moment_apart_are_coalesced_but_idle_always_goes_out(queue):
    worker = _worker(queue, [queue.interactive])
    worker.register_birth()
    try:
        worker.heartbeat()
        first = queue.connection.hget(worker.key, "last_heartbeat")
        worker.heartbeat()  # less than a second later: nothing sent
        assert queue.connection.hget(worker.key, "last_heartbeat") == first
        worker.set_state(WorkerStatus.BUSY)
        assert queue.connection.hget(worker.key, "state").decode() == WorkerStatus.BUSY
        worker.set_state(WorkerStatus.IDLE)  # pending: goes out with the next heartbeat, coalesced or not
        worker.heartbeat()
        assert queue.connection.hget(worker.key, "state").decode() == WorkerStatus.IDLE
        assert queue.connection.hget(worker.key, "last_heartbeat") != first
    finally:
        worker.register_death()
