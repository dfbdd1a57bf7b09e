"""The queue protocol and write-back against the real Redis on 127.0.0.1:6379, without HTTP: who delivers a
batch output (response or write-back), job deduplication, lost-job recovery, write-back idempotency.
Label Studio is the in-process fake of conftest.py (Label Studio itself is not installed here)."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
import redis
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from backend.labelstudio.client import LabelStudioClient
from backend.labelstudio.writeback import WriteBack
from backend.queue.jobs import BATCH, INTERACTIVE, JobQueue, JobSpec, error_output, ok_output
from backend.settings import Settings


@pytest.fixture()
def queue(helpers):
    settings = Settings(osprey_redis_prefix=f"q{uuid.uuid4().hex[:10]}", osprey_job_retries=2, osprey_result_ttl_s=60)
    connection = redis.Redis.from_url("redis://127.0.0.1:6379/0")
    q = JobQueue(connection, settings)
    yield q
    helpers.purge_prefix(connection, q.keys.prefix)


def spec(q: JobQueue, task_id: int = 1, kind: str = BATCH, regions: list | None = None) -> JobSpec:
    return JobSpec(kind, task_id, "/data/local-files/?d=imgs/a.png", regions or [{"id": "r1"}], {"image": "image"},
                   "tiny-abc", q.keys.prefix)


def prediction(result: list | None = None) -> dict:
    return {"result": result if result is not None else [{"id": "r1", "type": "labels"}], "score": 0.5,
            "model_version": "tiny-abc"}


def test_job_ids_are_deterministic_and_cover_every_input(queue):
    a = spec(queue)
    assert a.job_id == spec(queue).job_id
    assert ":" not in a.job_id  # RQ splits composite keys on ':'
    variants = [spec(queue, task_id=2), spec(queue, kind=INTERACTIVE), spec(queue, regions=[{"id": "r2"}]),
                JobSpec(BATCH, 1, "/other.png", [{"id": "r1"}], {"image": "image"}, "tiny-abc", queue.keys.prefix),
                JobSpec(BATCH, 1, a.image_url, a.regions, {"image": "img"}, "tiny-abc", queue.keys.prefix),
                JobSpec(BATCH, 1, a.image_url, a.regions, a.plan, "tiny-def", queue.keys.prefix)]
    assert len({a.job_id, *(v.job_id for v in variants)}) == 7


def test_output_existing_before_the_claim_goes_into_the_response(queue):
    s = spec(queue)
    assert queue.publish(s.job_id, ok_output(prediction(), 0.1, "w")) is False
    assert queue.claim(s.job_id, allow_handoff=True) == "response"
    assert queue.claim(s.job_id, allow_handoff=True) == "response"  # stays so: never handed off later


def test_claim_before_the_output_hands_off_and_the_job_learns_it(queue):
    s = spec(queue)
    assert queue.claim(s.job_id, allow_handoff=True) == "handoff"
    assert queue.publish(s.job_id, ok_output(prediction(), 0.1, "w")) is True  # the job must write back
    assert queue.claim(s.job_id, allow_handoff=True) == "handoff"  # and no later request returns it too


def test_without_write_back_nothing_is_handed_off(queue):
    s = spec(queue)
    assert queue.claim(s.job_id, allow_handoff=False) == "pending"
    assert queue.publish(s.job_id, ok_output(prediction(), 0.1, "w")) is False
    assert queue.claim(s.job_id, allow_handoff=False) == "response"  # the next request gets it


def test_racing_claims_and_publishes_deliver_exactly_once(queue):
    """Many jobs, each published by one thread while another claims it: one deliverer per job."""
    specs = [spec(queue, task_id=i) for i in range(200)]
    claims: dict[str, str] = {}
    handed: dict[str, bool] = {}
    barrier = threading.Barrier(2)

    def claimer():
        barrier.wait()
        for s in specs:
            claims[s.job_id] = queue.claim(s.job_id, allow_handoff=True)

    def publisher():
        barrier.wait()
        for s in reversed(specs):
            handed[s.job_id] = queue.publish(s.job_id, ok_output(prediction(), 0.0, "w"))

    threads = [threading.Thread(target=claimer), threading.Thread(target=publisher)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in specs:
        assert (claims[s.job_id] == "response") != handed[s.job_id]  # exactly one of them delivers


def test_wait_wakes_up_when_a_job_publishes_and_times_out_otherwise(queue):
    s, other = spec(queue, 1), spec(queue, 2)
    queue.submit(s)
    queue.submit(other)
    assert queue.wait([s.job_id], 0.3) == {}  # queued, no worker: nothing yet
    timer = threading.Timer(0.2, queue.publish, args=(s.job_id, ok_output(prediction(), 0.1, "w")))
    timer.start()
    found = queue.wait([s.job_id], 30)
    timer.join()
    assert set(found) == {s.job_id} and found[s.job_id]["ok"]
    partial = queue.wait([s.job_id, other.job_id], 0.3)  # returns what finished when the time is up
    assert set(partial) == {s.job_id}


def test_submit_dedupes_and_starts_failed_jobs_afresh(queue):
    s = spec(queue)
    assert queue.submit(s) is True
    assert queue.submit(s) is False  # queued: reused
    job = Job.fetch(s.job_id, connection=queue.connection, serializer=JSONSerializer)
    assert job.args == [s.payload()]  # JSON payload with references only
    assert queue.connection.hget(Job.key_for(s.job_id), "data")[:1] != b"\x80"  # not a pickle
    job.set_status(JobStatus.FAILED)
    queue.publish(s.job_id, error_output(502, "boom"))
    assert queue.submit(s) is True  # failed: started again, its old output dropped
    assert queue.outputs([s.job_id]) == {}
    assert queue.connection.lrange(queue.batch.key, 0, -1) == [s.job_id.encode()]


def test_wait_reports_a_job_that_vanished_from_redis(queue):
    output = queue.wait([spec(queue).job_id], 5)  # never enqueued (or lost with a Redis restart)
    [error] = output.values()
    assert error["error"]["status"] == 503 and "disappeared" in error["error"]["message"]


def test_wait_reports_a_job_that_failed_without_output(queue):
    s = spec(queue)
    queue.submit(s)
    Job.fetch(s.job_id, connection=queue.connection, serializer=JSONSerializer).set_status(JobStatus.FAILED)
    output = queue.wait([s.job_id], 5)[s.job_id]
    assert output["ok"] is False and output["error"]["status"] == 502


def test_reaper_requeues_a_job_lost_between_dequeue_and_start(queue):
    s = spec(queue)
    queue.submit(s)
    queue.connection.zadd(queue.keys.pending, {s.job_id: time.time() - 10})
    assert queue.connection.lpop(queue.batch.key) == s.job_id.encode()  # a worker popped it, then died
    queue.reap(lost_grace_s=0.2)  # first sighting: maybe a healthy worker about to start it
    assert queue.connection.lpos(queue.batch.key, s.job_id) is None
    time.sleep(1.1)  # the reaper lock lasts 1 s
    queue.reap(lost_grace_s=0.2)
    assert queue.connection.lpos(queue.batch.key, s.job_id) == 0
    queue.publish(s.job_id, ok_output(prediction(), 0.1, "w"))
    assert queue.connection.zscore(queue.keys.pending, s.job_id) is None


@pytest.fixture()
def writeback(queue, fake_ls):
    return WriteBack(queue, lambda: LabelStudioClient(fake_ls.url, "legacytoken1234567890abcdef", backoff_s=0.01))


def test_write_back_posts_once_per_job_content(writeback, fake_ls):
    assert writeback.deliver(9001, prediction(), "job-a") == "created"
    assert writeback.deliver(9001, prediction(), "job-a") == "already_written"  # a retried job
    assert writeback.deliver(9001, prediction(), "job-b") == "exists"  # same result already there: adopted
    [stored] = fake_ls.for_task(9001)
    assert stored["model_version"] == "tiny-abc" and stored["result"] == prediction()["result"]
    assert stored["score"] == 0.5


def test_a_re_prediction_after_edited_regions_is_written_too(writeback, fake_ls):
    """Defect 11: dedup used to be per (task, model_version) and adopted any prediction of that version,
    so a task whose regions were edited never got a new prediction."""
    first = prediction([{"id": "r1", "type": "labels", "value": {"labels": ["cat"]}}])
    edited = prediction([{"id": "r1", "type": "labels", "value": {"labels": ["cat"]}},
                         {"id": "r2", "type": "labels", "value": {"labels": ["dog"]}}])
    assert writeback.deliver(9005, first, "job-first") == "created"
    assert writeback.deliver(9005, edited, "job-edited") == "created"
    assert [p["result"] for p in fake_ls.for_task(9005)] == [first["result"], edited["result"]]


def test_write_back_adopts_a_prediction_whose_answer_was_lost(writeback, fake_ls, queue):
    """One attempt per run (RQ retries the job): a POST answered 500 raises, and the retry finds the
    prediction Label Studio stored anyway instead of posting it twice."""
    from backend.labelstudio.client import LabelStudioError

    fake_ls.lose_next_answers = 1  # Label Studio stores it but answers 500
    with pytest.raises(LabelStudioError) as info:
        writeback.deliver(9002, prediction(), "job-c")
    assert info.value.status == 500
    assert writeback.deliver(9002, prediction(), "job-c") == "exists"
    assert len(fake_ls.for_task(9002)) == 1
    assert [c for c in fake_ls.calls if c[0] == "POST"].count(("POST", "/api/predictions/")) >= 1
    assert queue.connection.exists(queue.keys.writeback_record(9002, "job-c"))


def test_write_back_never_posts_an_empty_prediction(writeback, fake_ls, queue):
    assert writeback.deliver(9003, prediction(result=[]), "job-d") == "undeliverable"
    assert fake_ls.for_task(9003) == []
    assert b"9003" in queue.connection.hkeys(queue.keys.writeback_failed)


def test_write_back_posts_the_empty_answer_of_an_image_without_objects(writeback, fake_ls, queue):
    """An auto-labeling job whose proposer found nothing: its empty prediction is the answer (written,
    so Label Studio marks the task predicted); drawn regions answered with nothing stay undeliverable."""
    plan = {"categories": [], "autolabel": {"enabled": True, "shape": "polygon"}}
    found_nothing = {"ok": True, "answers": [], "regions": [], "plan": plan, "model_version": "tiny-abc"}
    assert writeback.deliver_output("job-e", 9006, found_nothing) == "created"
    [stored] = fake_ls.for_task(9006)
    assert (stored["result"], stored.get("score"), stored["model_version"]) == ([], None, "tiny-abc")
    from backend.service.tasks import RegionSpec

    box = RegionSpec("r1", {"kind": "box", "x": 1, "y": 1, "width": 4, "height": 4}, 10, 10).to_dict()
    drawn = {**found_nothing, "regions": [box], "plan": {"categories": []}}
    assert writeback.deliver_output("job-f", 9007, drawn) == "undeliverable"
    assert fake_ls.for_task(9007) == []


def test_the_hand_off_outlives_the_output_ttl(queue):
    """Defect 1: the hand-off key expired with OSPREY_RESULT_TTL_S while the job still waited in the queue,
    so a job that started later published to nothing and no write-back was queued."""
    s = spec(queue, task_id=4141)
    queue.submit(s)
    assert queue.claim(s.job_id, allow_handoff=True) == "handoff"
    assert queue.connection.ttl(queue.keys.handoff(s.job_id)) == -1  # no expiry while the job waits
    output = ok_output(prediction(), 0.1, "w")
    assert queue.finish(s.payload(), output) is True
    assert 0 < queue.connection.ttl(queue.keys.handoff(s.job_id)) <= queue.result_ttl
    [delivery] = queue.writeback.get_jobs()
    assert delivery.func_name == "backend.labelstudio.writeback.writeback_job"
    assert delivery.args[0] == {"job_id": s.job_id, "task_id": 4141, "output": output}  # the output travels along
    assert delivery.retry_intervals and delivery.retries_left == 5


def test_a_handed_off_job_that_fails_is_recorded_not_dropped(queue):
    """RQ's failure callback after the last retry: the handed-off task is logged, counted and kept in
    <prefix>:wb:failed with the reason (its task stays without prediction, so LS asks again)."""
    from backend.queue.handlers import on_job_failure

    s = spec(queue, task_id=4242)
    queue.submit(s)
    assert queue.claim(s.job_id, allow_handoff=True) == "handoff"
    job = Job.fetch(s.job_id, connection=queue.connection, serializer=JSONSerializer)
    job.retries_left = 1
    on_job_failure(job, queue.connection, RuntimeError, RuntimeError("boom"), None)
    assert queue.outputs([s.job_id]) == {}  # a retry is coming: nothing published yet
    job.retries_left = 0
    on_job_failure(job, queue.connection, RuntimeError, RuntimeError("boom"), None)
    assert queue.outputs([s.job_id])[s.job_id]["error"]["status"] == 502
    reason = queue.connection.hget(queue.keys.writeback_failed, "4242")
    assert b"RuntimeError: boom" in reason
    assert int(queue.connection.hget(queue.keys.stats, "writeback_undeliverable")) == 1


def test_a_write_back_that_keeps_failing_is_recorded(queue):
    """Label Studio unreachable through every retry of the write-back job: the task is recorded, not lost."""
    from backend.queue.handlers import on_delivery_failure

    predict_job_id = spec(queue, task_id=4343).job_id
    queue.enqueue_delivery("backend.labelstudio.writeback.writeback_job", predict_job_id, 4343,
                           ok_output(prediction(), 0.1, "w"))
    job = Job.fetch(f"{predict_job_id}-wb", connection=queue.connection, serializer=JSONSerializer)
    assert job.failure_callback is on_delivery_failure
    assert job.origin == queue.writeback.name  # its own queue: no GPU worker sleeps on it
    job.retries_left = 0
    on_delivery_failure(job, queue.connection, ConnectionError, ConnectionError("refused"), None)
    reason = queue.connection.hget(queue.keys.writeback_failed, "4343")
    assert b"write-back failed after its retries: ConnectionError: refused" in reason


def test_many_waiters_share_one_listener_instead_of_a_connection_each(helpers):
    """Defect 8: each waiting request used to block in its own XREAD, holding a pooled connection for the
    whole wait; 200 concurrent editors exhausted the pool (503 "Redis unavailable" while Redis was idle).
    Here 120 requests wait at once on a pool of 8 connections, and every one gets its output."""
    from backend.queue.redis import connect

    settings = Settings(osprey_redis_prefix=f"q{uuid.uuid4().hex[:10]}", osprey_result_ttl_s=60)
    connection = connect("redis://127.0.0.1:6379/0", max_connections=8, pool_timeout_s=20)
    q = JobQueue(connection, settings)
    publisher = JobQueue(redis.Redis.from_url("redis://127.0.0.1:6379/0"), settings)
    specs = [spec(q, task_id=i) for i in range(120)]
    for s in specs:
        q.submit(s)  # queued (no worker): a waiter must wait, not report a vanished job
    results: dict[str, dict] = {}
    errors: list[BaseException] = []
    started = threading.Barrier(len(specs) + 1)

    def waiter(s: JobSpec) -> None:
        started.wait()
        try:
            results.update(q.wait([s.job_id], 60))
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=waiter, args=(s,)) for s in specs]
    try:
        for t in threads:
            t.start()
        started.wait()
        helpers.wait_for(lambda: len(q.listener()) == len(specs), 60, "every request to wait")
        for s in specs:
            publisher.publish(s.job_id, ok_output(prediction(), 0.0, "w"))
        for t in threads:
            t.join(timeout=60)
        assert errors == []
        assert set(results) == {s.job_id for s in specs}
        assert all(output["ok"] for output in results.values())
        assert len(q.listener()) == 0  # waiters unregistered
    finally:
        helpers.purge_prefix(publisher.connection, settings.osprey_redis_prefix)


def test_overload_is_answered_429_with_a_reason_and_no_worker_503(queue):
    from backend.queue.jobs import NoWorker, QueueBusy

    interactive = spec(queue, kind=INTERACTIVE)
    with pytest.raises(NoWorker) as info:  # nobody beats: an interactive request cannot be answered
        queue.submit(interactive)
    assert info.value.status_code == 503 and "no worker is alive" in info.value.message
    queue.heartbeat_worker("w-test", 30)
    assert queue.live_workers() == ["w-test"]
    queue.settings = queue.settings.model_copy(update={"osprey_max_queued_interactive": 2})
    queue._live_cache = (0.0, 0)
    assert queue.submit(spec(queue, 1, kind=INTERACTIVE)) and queue.submit(spec(queue, 2, kind=INTERACTIVE))
    with pytest.raises(QueueBusy) as busy:
        queue.submit(spec(queue, 3, kind=INTERACTIVE))
    assert busy.value.status_code == 429 and busy.value.retry_after_s > 0
    assert "2 interactive jobs are already queued" in busy.value.message
    queue.forget_worker("w-test")
    assert queue.live_workers() == []


def test_a_waiter_gets_503_when_the_last_worker_dies(queue):
    s = spec(queue, kind=INTERACTIVE)
    queue.heartbeat_worker("w-dying", 30)
    queue.submit(s)
    timer = threading.Timer(0.3, queue.forget_worker, args=("w-dying",))
    timer.start()
    output = queue.wait([s.job_id], 30, require_worker=True)[s.job_id]
    timer.join()
    assert output["error"]["status"] == 503 and "no worker is alive" in output["error"]["message"]
