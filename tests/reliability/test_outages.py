"""Outages of what the backend depends on, each during a batch whose predictions are written back later.

- Label Studio down during write-back (and the write-back worker restarted meanwhile), then back; down
  for less than OSPREY_WRITEBACK_RETRY_FOR_S (delivered) and for longer (recorded in `<prefix>:wb:failed`).
- Redis restarted mid-batch: a production-like `redis-server` (AOF everysec, noeviction, a password) that
  the test starts on a free port and restarts as a container would be; and SIGKILLed (AOF fsync always).
- Redis unreachable: /health says DOWN within Label Studio's 1 s health-check timeout.
- The web process restarted (SIGKILL) while batch jobs are in flight.
- `osprey run` restarted mid-batch: its embedded Redis stops with it and reloads its AOF.

Outcome asserted every time: nothing lost (every task ends with its prediction in Label Studio, or
recorded as undeliverable where the outage outlasts the retries), nothing duplicated (at most one
prediction per task), and the service recovers by itself (a later request works).
"""

from __future__ import annotations

import json
import os
import signal

import httpx
import pytest
import redis

from backend.queue.retry import RetryPolicy
from backend.settings import Settings
from tests.backend.conftest import LS_TOKEN, PASSWORD, USER, Stack, free_port, make_stack, running, wait_for
from tests.reliability.conftest import RedisServer, batch_body, written_once

SLOW = "1"  # seconds every job sleeps first (OSPREY_TEST_JOB_DELAY_S): the batch is still running when we strike


def test_label_studio_down_during_write_back_then_back(tmp_path, flaky_ls, payloads, configs):
    s = make_stack(tmp_path, ls_url=flaky_ls.url, OSPREY_BATCH_BUDGET_S="1", OSPREY_WRITEBACK_BACKOFF_S="1",
                   OSPREY_WRITEBACK_RETRIES="8")
    tasks = list(range(7001, 7005))
    try:
        s.start_worker(delay_s=2.0)  # longer than the 1 s budget: no task can be answered inline
        s.start_server()
        flaky_ls.stop()  # Label Studio goes away before anything is written
        response = s.post("/predict", batch_body(payloads, configs, tasks))
        assert response.status_code == 200, response.text
        assert all(e.get("osprey_status") == "pending" for e in response.json()["results"])
        r = s.redis()
        wait_for(lambda: r.zcard(f"rq:scheduled:{s.prefix}:writeback") >= 1, 60,
                 "write-backs waiting for a retry")
        s.stop(s.workers[0])  # the backend restarts while Label Studio is down: the retries live in Redis
        s.start_worker()
        flaky_ls.start()
        wait_for(lambda: written_once(flaky_ls, tasks), 120, "every prediction written once Label Studio is back")
        assert r.hlen(f"{s.prefix}:wb:failed") == 0
        wait_for(lambda: r.zcard(f"rq:scheduled:{s.prefix}:writeback") == 0
                 and r.llen(f"rq:queue:{s.prefix}:writeback") == 0, 30, "the write-back lane to drain")
        assert written_once(flaky_ls, tasks)  # no duplicate from a late retry
    except BaseException:
        print(s.tail())
        raise
    finally:
        s.close()


def test_the_write_back_retry_schedule_covers_the_configured_period():
    """OSPREY_WRITEBACK_RETRY_FOR_S names the period; the retries are derived from it (x3 backoff, capped)."""
    assert Settings().osprey_writeback_retries == 5  # 5+15+45+135+405 s: the default 600 s period
    assert RetryPolicy.covering(12, 1).intervals() == [1, 3, 9]
    day = RetryPolicy.covering(24 * 3600, 5)
    assert sum(day.intervals()) >= 24 * 3600 and max(day.intervals()) == 600  # capped, yet the day is covered
    assert sum(day.intervals()[:-1]) < 24 * 3600  # and no retry more than it takes
    derived = Settings(osprey_writeback_retry_for_s=3600, osprey_writeback_backoff_s=2)
    assert sum(RetryPolicy(derived.osprey_writeback_retries, 2.0).intervals()) >= 3600
    assert Settings(osprey_writeback_retries=8).osprey_writeback_retries == 8  # an explicit count wins


def delivery_job(r: redis.Redis, s: Stack, task_id: int) -> dict[str, str] | None:
    """The RQ hash of the write-back job of `task_id` (its job id is the predict job's id + "-wb")."""
    for key in r.scan_iter(f"rq:job:{s.prefix}-batch-*-wb"):
        job = {k.decode(): v.decode(errors="replace") for k, v in r.hgetall(key).items()}
        if job.get("description") == f"deliver task {task_id}":
            return job
    return None


def test_write_back_outlasts_an_outage_shorter_than_its_period_and_records_a_longer_one(tmp_path, flaky_ls,
                                                                                         payloads, configs):
    period, backoff = 12, 1  # retries 1, 3, 9 s apart: 13 s >= the period
    s = make_stack(tmp_path, ls_url=flaky_ls.url, OSPREY_BATCH_BUDGET_S="1", OSPREY_WRITEBACK_BACKOFF_S=str(backoff),
                   OSPREY_WRITEBACK_RETRY_FOR_S=str(period))
    short, long_ = 7601, 7602
    try:
        s.start_worker(delay_s=2.0)  # longer than the 1 s budget: every task is handed to write-back
        s.start_server()
        r = s.redis()

        # Down for longer than one backoff, shorter than the period: delivered once it is back.
        flaky_ls.stop()
        assert s.post("/predict", batch_body(payloads, configs, [short])).status_code == 200
        job = wait_for(lambda: delivery_job(r, s, short), 60, "the write-back job")
        assert json.loads(job["retry_intervals"]) == RetryPolicy.covering(period, backoff).intervals()
        assert sum(json.loads(job["retry_intervals"])) >= period
        wait_for(lambda: int(delivery_job(r, s, short)["retries_left"]) <= 1, 60,
                 "two failed attempts (the outage outlasted the first backoff)")
        flaky_ls.start()
        wait_for(lambda: written_once(flaky_ls, [short]), 60, "the prediction delivered on a later retry")
        assert r.hlen(f"{s.prefix}:wb:failed") == 0

        # Down for longer than the period: every retry fails, and the task is recorded, not dropped.
        flaky_ls.stop()
        assert s.post("/predict", batch_body(payloads, configs, [long_])).status_code == 200
        failed = wait_for(lambda: r.hget(f"{s.prefix}:wb:failed", str(long_)), 120, "the task recorded as failed")
        assert "after its retries" in json.loads(failed)["reason"]
        assert int(delivery_job(r, s, long_)["retries_left"]) == 0  # it took every retry of the period
        flaky_ls.start()
        wait_for(lambda: r.zcard(f"rq:scheduled:{s.prefix}:writeback") == 0
                 and r.llen(f"rq:queue:{s.prefix}:writeback") == 0, 30, "the write-back lane to be empty")
        assert flaky_ls.for_task(long_) == []  # nothing comes late after the failure was recorded
        assert written_once(flaky_ls, [short])
    except BaseException:
        print(s.tail())
        raise
    finally:
        s.close()


@pytest.fixture(scope="module")
def prod_redis(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("prod-redis"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def prod_stack(tmp_path_factory, prod_redis, fake_ls):
    """Server + one slow worker on the password-protected AOF Redis."""
    with running(make_stack(tmp_path_factory.mktemp("prod"), redis_url=prod_redis.url, ls_url=fake_ls.url,
                            OSPREY_BATCH_BUDGET_S="1"), float(SLOW)) as s:
        yield s


def test_production_redis_is_what_the_deploy_config_says(prod_redis):
    info = prod_redis.client().config_get("*")
    assert info["appendonly"] == "yes" and info["maxmemory-policy"] == "noeviction"
    with pytest.raises(Exception, match="(?i)auth"):
        __import__("redis").Redis(port=prod_redis.port, socket_timeout=5).set("x", 1)  # no password: refused


def test_redis_restarted_mid_batch_loses_and_duplicates_nothing(prod_stack, prod_redis, payloads, configs, fake_ls):
    s = prod_stack
    tasks = list(range(7101, 7107))
    response = s.post("/predict", batch_body(payloads, configs, tasks))
    assert response.status_code == 200, response.text
    wait_for(lambda: sum(s.job_runs().values()) >= 2, 60, "the batch to be running")
    prod_redis.restart()  # SIGTERM: Redis writes its AOF and stops; then it comes back with it
    wait_for(lambda: written_once(fake_ls, tasks), 180, "every task written back after the Redis restart")
    r = s.redis()
    assert r.hlen(f"{s.prefix}:wb:failed") == 0
    wait_for(lambda: httpx.get(s.base_url + "/health", timeout=5).status_code == 200, 30, "/health UP again")
    assert written_once(fake_ls, tasks)


def test_redis_sigkilled_mid_batch_with_fsync_always_loses_and_duplicates_nothing(tmp_path, payloads, configs,
                                                                                  fake_ls):
    """SIGKILL gives Redis no chance to flush: with `appendfsync always` every acknowledged write is on disk
    (with `everysec`, up to ~1 s of writes can be lost: see docs/reliability.md)."""
    server = RedisServer(tmp_path, fsync="always")
    s = make_stack(tmp_path / "stack", redis_url=server.url, ls_url=fake_ls.url, OSPREY_BATCH_BUDGET_S="1")
    tasks = list(range(7451, 7457))
    try:
        s.start_worker(delay_s=float(SLOW))
        s.start_server()
        response = s.post("/predict", batch_body(payloads, configs, tasks))
        assert response.status_code == 200, response.text
        later = [t for t, e in zip(tasks, response.json()["results"], strict=True) if "result" not in e]
        assert later  # most of the batch is still to run
        wait_for(lambda: sum(s.job_runs().values()) >= 2, 60, "the batch to be running")
        assert not written_once(fake_ls, later)  # struck mid-batch
        server.restart(kill=True)  # SIGKILL, then the same port and data dir, as a restarted container
        r = s.redis()

        def settled() -> bool:
            failed = {int(k) for k in r.hkeys(f"{s.prefix}:wb:failed")}
            return all(len(fake_ls.for_task(t)) == 1 or t in failed for t in later)

        wait_for(settled, 180, "every task delivered or recorded as failed")
        wait_for(lambda: httpx.get(s.base_url + "/health", timeout=5).status_code == 200, 30, "/health UP again")
        wait_for(lambda: r.llen(f"rq:queue:{s.prefix}:batch") == 0 and r.llen(f"rq:queue:{s.prefix}:writeback") == 0
                 and r.zcard(f"rq:scheduled:{s.prefix}:writeback") == 0, 60, "the lanes to drain")
        assert all(len(fake_ls.for_task(t)) <= 1 for t in tasks)  # none delivered twice
        assert r.hlen(f"{s.prefix}:wb:failed") == 0  # fsync always: nothing even had to be given up
        assert written_once(fake_ls, later)
    except BaseException:
        print(s.tail())
        raise
    finally:
        s.close()
        server.stop()


def test_web_process_restarted_while_batch_jobs_are_in_flight(prod_stack, payloads, configs, fake_ls):
    s = prod_stack
    tasks = list(range(7201, 7207))
    response = s.post("/predict", batch_body(payloads, configs, tasks))
    assert response.status_code == 200, response.text
    os.kill(s.server.pid, signal.SIGKILL)  # the jobs are handed off: they no longer need the web process
    s.server.wait()
    s.start_server()  # on a new port: a new client
    s._client, client = None, s._client
    client.close()
    again = s.post("/predict", batch_body(payloads, configs, tasks))  # Label Studio asks again meanwhile
    assert again.status_code == 200
    wait_for(lambda: written_once(fake_ls, tasks), 180, "every task written back after the web restart")
    wait_for(lambda: s.redis().llen(f"rq:queue:{s.prefix}:batch") == 0, 30, "an empty batch queue")
    assert written_once(fake_ls, tasks)


def test_osprey_run_restarted_mid_batch_with_its_embedded_redis(osprey_run, payloads, configs, fake_ls):
    env = {"OSPREY_BATCH_BUDGET_S": "1", "OSPREY_TEST_JOB_DELAY_S": SLOW, "LABEL_STUDIO_URL": fake_ls.url,
           "LABEL_STUDIO_API_KEY": LS_TOKEN}
    first = osprey_run(**env)
    tasks = list(range(7301, 7309))
    try:
        first.wait_up()
        response = first.post("/predict", batch_body(payloads, configs, tasks))
        assert response.status_code == 200, response.text
        assert any(e.get("osprey_status") == "pending" for e in response.json()["results"])
    except BaseException:
        print(first.tail())
        raise
    first.stop()  # Ctrl-C: workers finish their job, the embedded Redis stops (AOF on disk)
    assert not written_once(fake_ls, tasks)  # some of the batch was still queued
    second = osprey_run(**env, OSPREY_REDIS_PREFIX=first.env["OSPREY_REDIS_PREFIX"])
    try:
        wait_for(lambda: written_once(fake_ls, tasks), 240, "the rest of the batch written after the restart")
        second.wait_up()
        assert written_once(fake_ls, tasks)
    except BaseException:
        print(second.tail())
        raise


@pytest.mark.parametrize("detail", [False, True])
def test_health_is_down_within_label_studios_timeout_when_redis_is_unreachable(tmp_path, detail):
    """Label Studio checks /health with a 1 s timeout: a Redis that refuses connections must give DOWN
    with the reason inside it, not a hang that Label Studio reports as "backend unreachable"."""
    s = make_stack(tmp_path, redis_url=f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    try:
        s.start_server()
        with httpx.Client(base_url=s.base_url, timeout=1.0, auth=(USER, PASSWORD)) as client:
            for _ in range(3):  # each one, not only the first (no cached answer hides a slow one)
                answer = client.get("/health", params={"detail": 1} if detail else None)
                assert answer.status_code == 503, answer.text
                body = answer.json()
                assert body["status"] == "DOWN" and "Redis" in body["reason"], body
                if detail:
                    assert "error" in body["detail"]["redis"], body["detail"]
    except BaseException:
        print(s.tail())
        raise
    finally:
        s.close()


def test_health_is_down_within_label_studios_timeout_when_redis_stops_answering(tmp_path, redis_server):
    """A Redis that accepts connections but answers nothing (stalled, partitioned; here SIGSTOPped) used to
    hold /health for the pool's 10 s command timeout: /health has its own client that gives up in time."""
    s = make_stack(tmp_path / "stack", redis_url=redis_server.url)  # no worker: DOWN for that reason at first
    try:
        s.start_server()
        with httpx.Client(base_url=s.base_url, timeout=1.0) as client:
            assert "no worker" in client.get("/health").json()["reason"]
            os.kill(redis_server.proc.pid, signal.SIGSTOP)
            try:
                for _ in range(3):
                    answer = client.get("/health")
                    assert answer.status_code == 503, answer.text
                    assert answer.json()["status"] == "DOWN" and "Redis" in answer.json()["reason"], answer.text
            finally:
                os.kill(redis_server.proc.pid, signal.SIGCONT)
            recovered = wait_for(lambda: "no worker" in (r := client.get("/health")).json()["reason"] and r, 30,
                                 "/health reading Redis again")
            assert recovered.status_code == 503  # honest again: Redis answers, no worker is alive
    except BaseException:
        print(s.tail())
        raise
    finally:
        s.close()
