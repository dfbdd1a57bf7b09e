"""Outages of what the backend depends on, each during a batch whose predictions are written back later.

- Label Studio down during write-back (and the write-back worker restarted meanwhile), then back.
- Redis restarted mid-batch: a production-like `redis-server` (AOF everysec, noeviction, a password) that
  the test starts on a free port and restarts as a container would be.
- The web process restarted (SIGKILL) while batch jobs are in flight.
- `osprey run` restarted mid-batch: its embedded Redis stops with it and reloads its AOF.

Outcome asserted every time: nothing lost (every task ends with its prediction in Label Studio), nothing
duplicated (exactly one prediction per task), and the service recovers by itself (a later request works).
"""

from __future__ import annotations

import os
import signal

import httpx
import pytest

from tests.backend.conftest import LS_TOKEN, make_stack, wait_for
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


@pytest.fixture(scope="module")
def prod_redis(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("prod-redis"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def prod_stack(tmp_path_factory, prod_redis, fake_ls):
    """Server + one slow worker on the password-protected AOF Redis."""
    s = make_stack(tmp_path_factory.mktemp("prod"), redis_url=prod_redis.url, ls_url=fake_ls.url,
                   OSPREY_BATCH_BUDGET_S="1")
    try:
        s.start_worker(delay_s=float(SLOW))
        s.start_server()
        yield s
    except BaseException:
        print(s.tail())
        raise
    finally:
        s.close()


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
