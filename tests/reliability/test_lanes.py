"""Fair lanes and backpressure on the real Redis, without HTTP (the HTTP side is in test_backpressure.py).

- Batch jobs of several projects are fed into the batch queue round-robin: a small batch of one project
  starts next to a large one of another, not after it.
- The batch queue is kept a few jobs deep; the rest waits in the projects' hold queues, counted in the
  batch depth and recovered like any queued job.
- Batch slots: at most all live workers but OSPREY_INTERACTIVE_RESERVED_WORKERS run batch jobs.
- Bounds: batch and write-back backlogs past their bound are refused with Retry-After.
"""

from __future__ import annotations

import pytest
from rq.job import Job
from rq.serializers import JSONSerializer

from backend.queue.jobs import BATCH, Backlogged, JobQueue, JobSpec, QueueBusy, batch_group


def batch_spec(q: JobQueue, task_id: int, project: str) -> JobSpec:
    return JobSpec(BATCH, task_id, "/data/local-files/?d=imgs/a.png", [{"id": f"r{task_id}"}], {"image": "image"},
                   "tiny-abc", q.keys.prefix, group=batch_group(project))


def drain(q: JobQueue, n: int) -> list[int]:
    """Pop `n` jobs off the batch queue as workers would (feeding before each pop); their task ids."""
    order = []
    for _ in range(n):
        q.feed(target=2)
        job_id = q.connection.lpop(q.batch.key)
        if job_id is None:
            break
        job = Job.fetch(job_id.decode(), connection=q.connection, serializer=JSONSerializer)
        assert job.origin == q.batch.name  # retries and registries use the batch queue from now on
        order.append(job.args[0]["task_id"])
    return order


def test_batches_of_several_projects_are_served_round_robin(queue):
    for task in range(1000, 1040):  # a big batch of project 1 first ...
        queue.submit(batch_spec(queue, task, "1.1795681025"))
    for task in range(2000, 2004):  # ... then a small one of project 2
        queue.submit(batch_spec(queue, task, "2"))
    assert queue.connection.llen(queue.batch.key) <= 2  # only a few jobs deep: the rest waits in holds
    assert queue.depths()[BATCH] == 44  # everything counted
    order = drain(queue, 44)
    assert sorted(order) == sorted([*range(1000, 1040), *range(2000, 2004)])  # nothing lost or duplicated
    small = [order.index(t) for t in range(2000, 2004)]
    assert max(small) < 12, order  # project 2 interleaved near the front, not after all 40 of project 1
    assert queue.depths()[BATCH] == 0 and queue.connection.llen(queue.keys.batch_ring) == 0


def test_a_duplicate_batch_request_is_deduplicated_inside_a_hold_queue(queue):
    first = batch_spec(queue, 7, "3")
    for _ in range(3):  # Label Studio retries the same batch
        queue.submit(batch_spec(queue, 7, "3"))
    queue.submit(batch_spec(queue, 8, "3"))
    assert queue.depths()[BATCH] == 2
    assert drain(queue, 5) == [7, 8]
    assert Job.fetch(first.job_id, connection=queue.connection, serializer=JSONSerializer).origin == queue.batch.name


def test_a_job_waiting_in_a_hold_queue_is_not_taken_for_lost(queue):
    for task in range(10):
        queue.submit(batch_spec(queue, task, "4"))
    for _ in range(3):  # several reaper passes past the grace period
        queue._recover_lost(grace_s=0)
        queue.connection.delete(queue.keys.reaper_lock)
    assert queue.connection.llen(queue.interactive.key) == 0  # nothing moved into the wrong lane
    assert sorted(drain(queue, 20)) == list(range(10))


def test_batch_slots_leave_workers_for_interactive_work(queue):
    for name in ("w1", "w2", "w3"):
        queue.heartbeat_worker(name, 30)
    queue._live_cache = (0.0, 0)
    granted = [queue.acquire_batch_slot(name, 30) for name in ("w1", "w2", "w3")]
    assert granted == [True, True, False]  # 3 live workers, 1 reserved for interactive
    assert queue.acquire_batch_slot("w1", 30)  # a holder keeps its slot
    queue.release_batch_slot("w1")
    assert queue.acquire_batch_slot("w3", 30)  # a freed slot goes to a waiting worker


def test_a_single_worker_may_still_run_batch_jobs(queue):
    queue.heartbeat_worker("only", 30)
    queue._live_cache = (0.0, 0)
    assert queue.acquire_batch_slot("only", 30)  # it checks the interactive queue first between jobs instead


def test_a_dead_workers_batch_slot_expires(queue):
    for name in ("w1", "w2"):
        queue.heartbeat_worker(name, 30)
    queue._live_cache = (0.0, 0)
    assert queue.acquire_batch_slot("w1", 0.05)
    assert not queue.acquire_batch_slot("w2", 30)
    queue.connection.zadd(queue.keys.batch_slots, {"w1": 0})  # its deadline passed (SIGKILL: no release)
    assert queue.acquire_batch_slot("w2", 30)


def test_the_batch_lane_is_bounded(queue):
    queue.settings = queue.settings.model_copy(update={"osprey_max_queued_batch": 5})
    for task in range(5):
        queue.submit(batch_spec(queue, task, "5"))
    with pytest.raises(QueueBusy) as busy:
        queue.submit(batch_spec(queue, 99, "6"))
    assert busy.value.status_code == 429 and busy.value.retry_after_s > 0
    assert "5 batch jobs are already queued" in busy.value.message
    drain(queue, 1)
    assert queue.submit(batch_spec(queue, 99, "6"))  # room again: accepted


def test_a_write_back_backlog_refuses_new_batches_with_503(queue):
    queue.settings = queue.settings.model_copy(update={"osprey_max_queued_writeback": 3})
    for i in range(3):
        queue.enqueue_delivery("backend.labelstudio.writeback.writeback_job", f"{queue.keys.prefix}-job{i}", i,
                               {"ok": True})  # job ids carry the prefix: RQ's job keys are global
    with pytest.raises(Backlogged) as backlog:
        queue.submit(batch_spec(queue, 1, "7"))
    assert backlog.value.status_code == 503 and "is Label Studio reachable" in backlog.value.message


def test_interactive_jobs_time_out_sooner_than_batch_jobs():
    """A hung interactive job used to hold its worker for OSPREY_JOB_TIMEOUT_S (600 s) + the hang grace,
    like a batch job; the annotator waits seconds, so the interactive lane has its own, shorter timeout
    (which the worker's hang watchdog adds its grace to: backend/queue/worker.py)."""
    import uuid

    import redis

    from backend.queue.jobs import INTERACTIVE, WRITEBACK
    from backend.settings import Settings
    from tests.backend.conftest import purge_prefix

    settings = Settings(osprey_redis_prefix=f"to{uuid.uuid4().hex[:8]}", osprey_interactive_job_timeout_s=7)
    connection = redis.Redis.from_url("redis://127.0.0.1:6379/0")
    q = JobQueue(connection, settings)
    try:
        jobs = {kind: q.queues[kind].enqueue_call("builtins.len", args=([],)) for kind in (INTERACTIVE, BATCH, WRITEBACK)}
        timeouts = {kind: job.timeout for kind, job in jobs.items()}
        for job in jobs.values():
            job.delete()  # RQ's job keys are global, not under the prefix
        assert timeouts == {INTERACTIVE: 7, BATCH: 600, WRITEBACK: 600}, timeouts
        assert Settings().osprey_interactive_job_timeout_s < Settings().osprey_job_timeout_s
        lowered = JobQueue(connection, Settings(osprey_redis_prefix=settings.osprey_redis_prefix, osprey_job_timeout_s=8))
        job = lowered.queues[INTERACTIVE].enqueue_call("builtins.len", args=([],))
        job.delete()
        assert job.timeout == 8  # never longer than the general timeout
    finally:
        purge_prefix(connection, settings.osprey_redis_prefix)
