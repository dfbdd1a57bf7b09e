"""The schedule and the one-run-at-a-time lock, on the real Redis at 127.0.0.1:6379 (a unique key prefix per
test) with RQ's own CronScheduler; the store is a real SQLite file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from rq.job import Job
from rq.serializers import JSONSerializer

from tests.backend.conftest import LOCAL_REDIS, purge_prefix, wait_for
from training.jobs import maybe_train
from training.schedule import (
    TICK_FUNC,
    TrainingKeys,
    TrainingLock,
    TrainingSettings,
    build_scheduler,
    due,
    enqueue_coalesced,
    enqueue_training,
    record_run,
    training_queue,
    training_status,
)
from training.store import Store

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def conn() -> Iterator[tuple[redis.Redis, str]]:
    r = redis.Redis.from_url(LOCAL_REDIS)
    prefix = f"t{uuid.uuid4().hex[:10]}"
    yield r, prefix
    purge_prefix(r, prefix)
    for key in r.scan_iter("rq:cron*"):  # RQ's global cron registries: drop this test's entries
        if r.type(key) == b"zset":
            mine = [m for m in r.zrange(key, 0, -1) if prefix.encode() in m]
            if mine:
                r.zrem(key, *mine)


def test_the_rule():
    policy = TrainingSettings(osprey_train_min_corrections=50, osprey_train_period_s=3600)
    assert due(49, None, policy) is None
    assert "50 new corrections" in due(50, None, policy)
    assert due(0, 0.0, policy, now=10_000.0) is None  # the period alone, with nothing new: no run
    assert due(3, 1_000.0, policy, now=2_000.0) is None
    assert "3600 s since the last run" in due(3, 1_000.0, policy, now=5_000.0)


def test_lock_is_exclusive_kept_alive_by_its_heartbeat_and_released(conn):
    r, prefix = conn
    key = TrainingKeys(prefix).lock
    first = TrainingLock(r, key, ttl_s=1.0, owner={"job": "a"})
    assert first.acquire()
    second = TrainingLock(r, key, ttl_s=1.0)
    assert not second.acquire()
    time.sleep(2.5)  # longer than the TTL: only the heartbeat keeps it
    assert first.holds() and not second.acquire()
    assert json.loads(r.get(key))["job"] == "a"
    first.release()
    assert r.get(key) is None
    assert second.acquire()
    second.release()


def test_a_killed_holder_loses_the_lock_by_expiry(conn):
    r, prefix = conn
    key = TrainingKeys(prefix).lock
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time, redis\n"
        "from training.schedule import TrainingLock\n"
        f"lock = TrainingLock(redis.Redis.from_url({LOCAL_REDIS!r}), {key!r}, ttl_s=1.5)\n"
        "assert lock.acquire()\nprint('held', flush=True)\ntime.sleep(600)\n")],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        time.sleep(2.0)
        assert r.get(key) is not None  # alive: beating
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        wait_for(lambda: r.get(key) is None, 5, "the dead holder's lock to expire")
        again = TrainingLock(r, key, ttl_s=1.5)
        assert again.acquire()
        again.release()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_bursts_coalesce_and_a_running_job_gets_one_follow_up(conn):
    r, prefix = conn
    queue = training_queue(r, prefix)
    ids = {enqueue_coalesced(queue, "training.jobs.tick_job", {"n": i}, f"{prefix}-x")[0] for i in range(5)}
    assert ids == {f"{prefix}-x"} and queue.count == 1
    job = Job.fetch(f"{prefix}-x", connection=r, serializer=JSONSerializer)
    job.set_status("started")  # a worker runs it now: an event must not be lost, one follow-up waits
    follow = {enqueue_coalesced(queue, "training.jobs.tick_job", {"n": i}, f"{prefix}-x") for i in range(3)}
    assert follow == {(f"{prefix}-x-next", True), (f"{prefix}-x-next", False)}
    job.set_status("finished")
    assert enqueue_coalesced(queue, "training.jobs.tick_job", {}, f"{prefix}-x") == (f"{prefix}-x", True)


def _region(i: int, label: str) -> dict:
    import numpy as np

    from training.synthetic import coco_rle

    mask = np.zeros((8, 8), dtype=bool)
    mask[: 1 + i % 7, :4] = True
    return {"annotation_id": "1", "region_id": f"r{i}", "rle": coco_rle(mask), "labels": [label]}


def test_maybe_train_counts_corrections_since_the_last_run(conn, tmp_path):
    r, prefix = conn
    store = Store(f"sqlite:///{tmp_path / 'c.sqlite'}", model_dir=tmp_path)
    policy = TrainingSettings(osprey_train_min_corrections=5, osprey_train_period_s=10_000)
    sha = "ab" * 32
    store.upsert_task("7", "1", image_ref="/data/upload/1/a.png", image_sha256=sha, image_path="/x",
                      regions=[_region(i, "circle") for i in range(4)])
    assert maybe_train(r, prefix, store, "7", policy) is None  # 4 < 5
    store.upsert_task("7", "2", image_ref="/data/upload/1/b.png", image_sha256=sha, image_path="/x",
                      regions=[_region(i, "square") for i in range(2)])
    job_id = maybe_train(r, prefix, store, "7", policy)
    assert job_id == f"{prefix}-train-7"
    assert maybe_train(r, prefix, store, "7", policy) == job_id  # still one queued run
    assert training_queue(r, prefix).count == 1
    store.record_training("7", "v1", store.now())
    assert maybe_train(r, prefix, store, "7", policy, now=time.time()) is None  # nothing new since v1
    store.upsert_task("7", "1", image_ref="/data/upload/1/a.png", image_sha256=sha, image_path="/x",
                      regions=[_region(i, "hexagon") for i in range(4)])  # 4 corrected: under the threshold
    assert maybe_train(r, prefix, store, "7", policy, now=time.time()) is None
    assert maybe_train(r, prefix, store, "7", policy, now=time.time() + 20_000) == job_id  # the period passed
    store.close()


def test_rq_cron_scheduler_enqueues_json_jobs_on_the_training_queue(conn):
    r, prefix = conn
    scheduler = build_scheduler(r, prefix, TrainingSettings(osprey_train_tick_s=60),
                                periodic={"backend.labelstudio.sync.sync_all_job": 3600})
    enqueued = scheduler.enqueue_jobs()  # interval jobs run at once the first time, then every interval
    assert sorted(j.func_name for j in enqueued) == ["backend.labelstudio.sync.sync_all_job", TICK_FUNC]
    assert scheduler.enqueue_jobs() == []  # not due again yet
    queue = training_queue(r, prefix)
    assert queue.count == 2
    for job_id in queue.job_ids:
        data = json.loads(zlib.decompress(r.hget(f"rq:job:{job_id}", "data")))  # JSON, never pickle
        assert data[2] == [{"prefix": prefix}]


def test_osprey_schedule_and_a_training_worker_run_the_tick(conn, tmp_path):
    """`osprey schedule` (RQ's CronScheduler) enqueues the tick every second; `osprey worker --queues
    training` runs it; the tick queues a run for the project whose corrections passed the threshold."""
    r, prefix = conn
    store = Store(model_dir=tmp_path)
    store.upsert_task("3", "1", image_ref="/data/upload/1/a.png", image_sha256="cd" * 32, image_path="/x",
                      regions=[_region(i, "circle") for i in range(3)])
    store.close()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("OSPREY_", "LABEL_STUDIO_"))},
           "REDIS_URL": LOCAL_REDIS, "OSPREY_REDIS_PREFIX": prefix, "MODEL_DIR": str(tmp_path),
           "OSPREY_TRAIN_TICK_S": "1", "OSPREY_TRAIN_MIN_CORRECTIONS": "3"}
    env.pop("DATABASE_URL", None)
    schedule = subprocess.Popen([sys.executable, "-m", "backend.cli", "schedule"], cwd=REPO, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        queue = training_queue(r, prefix)
        wait_for(lambda: queue.count >= 1, 30, "the schedule to enqueue a tick")
    finally:
        schedule.terminate()
        schedule.wait(timeout=20)
    proc = subprocess.run([sys.executable, "-m", "backend.cli", "worker", "--queues", "training", "--burst"],
                          cwd=REPO, env={**env, "OSPREY_TRAIN_STEPS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The tick ran and queued a run of project 3; the burst worker then ran it: with 3 regions on one
    # image there is no held-out split, so the run fails with that reason and is recorded.
    runs = training_status(r, prefix)["runs"]
    assert runs and runs[0]["project"] == "3" and runs[0]["status"] == "failed"
    assert "held-out split" in runs[0]["message"] and "3 new corrections" in runs[0]["reason"]


def test_status_keeps_refusals_with_their_numbers(conn):
    r, prefix = conn
    record_run(r, prefix, {"project": "1", "status": "promoted", "version": "v2"})
    record_run(r, prefix, {"project": "1", "status": "refused", "version": "v3",
                           "decision": {"candidate": 0.31, "current": 0.95, "reasons": ["accuracy drops"]}})
    status = training_status(r, prefix)
    assert [x["version"] for x in status["runs"]] == ["v3", "v2"]
    assert status["refusals"][0]["decision"]["current"] == 0.95
    assert json.loads(r.get(TrainingKeys(prefix).last("1")))["version"] == "v3"
    job_id, fresh = enqueue_training(r, prefix, "1", "test")
    assert fresh and job_id == f"{prefix}-train-1"


def test_a_flood_of_task_syncs_folds_into_one_project_sync(conn, monkeypatch):
    """The training lane is bounded: past OSPREY_MAX_QUEUED_SYNCS waiting jobs, a task's sync becomes its
    project's full sync (coalesced, one per project), so a bulk import's events cannot grow the queue
    without bound, and the full sync still reads every task (nothing lost)."""
    from training.schedule import enqueue_sync

    r, prefix = conn
    monkeypatch.setenv("OSPREY_MAX_QUEUED_SYNCS", "3")
    ids = [enqueue_sync(r, prefix, "tests.task_sync", 5, task, project_func="tests.project_sync")[0]
           for task in range(1, 40)]
    queue = training_queue(r, prefix)
    jobs = [Job.fetch(j, connection=r, serializer=JSONSerializer) for j in queue.job_ids]
    assert queue.count == 4, queue.job_ids  # three task syncs, then one project sync for the other 36
    assert [j.func_name for j in jobs] == ["tests.task_sync"] * 3 + ["tests.project_sync"]
    assert jobs[-1].args[0]["task"] is None and set(ids[3:]) == {jobs[-1].id}
    for j in jobs:
        j.delete()
