"""Faults, with real processes: a worker SIGKILLed in the middle of a job, Redis going away and coming back.

The slow worker uses the documented test hook OSPREY_TEST_JOB_DELAY_S (backend/worker.py): it sleeps at
the start of each job, after the job is registered as started, so it can be killed mid-job for sure.
Heartbeats are 1 s here, so a dead worker's job is retried after about 3 s.
"""

from __future__ import annotations

import os
import signal
import subprocess
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import redis


@pytest.fixture(scope="module")
def fault_stack(tmp_path_factory, fake_ls, helpers):
    """A server with a short batch budget and no worker yet; each test starts the workers it needs."""
    with helpers.running(helpers.make_stack(tmp_path_factory.mktemp("faults"), ls_url=fake_ls.url,
                                            OSPREY_BATCH_BUDGET_S="3", OSPREY_INTERACTIVE_TIMEOUT_S="90")) as s:
        yield s


def _kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def test_without_a_live_worker_health_is_down_and_interactive_requests_get_503(fault_stack, payloads, configs,
                                                                              helpers):
    """Defect 2: /health said UP with no worker, and interactive requests timed out (504) instead."""
    s = fault_stack
    worker = s.start_worker()  # announces the model version (requests need it), then goes away
    assert httpx.get(s.base_url + "/health", timeout=5).json()["status"] == "UP"
    s.stop(worker)
    down = helpers.wait_for(lambda: (r := httpx.get(s.base_url + "/health", timeout=5)).status_code == 503 and r,
                            30, "/health to say DOWN")
    assert down.json()["status"] == "DOWN" and "no worker is alive" in down.json()["reason"]
    body = payloads.predict([payloads.task(401)], configs["keypoint_sam"],
                            {"result": [payloads.keypoint(x=10.0, y=10.0, region_id="nw1")]})
    refused = s.post("/predict", body)
    assert refused.status_code == 503, refused.text
    assert "no worker is alive" in refused.json()["detail"] and int(refused.headers["retry-after"]) > 0


def test_worker_killed_mid_job_the_job_completes_on_another_worker(fault_stack, payloads, configs, helpers):
    s, wait_for = fault_stack, helpers.wait_for
    slow = s.start_worker(delay_s=120)
    body = payloads.predict([payloads.task(501)], configs["keypoint_sam"],
                            {"result": [payloads.keypoint(x=40.0, y=30.0, region_id="kill1")]})
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(s.post, "/predict", body)
        wait_for(lambda: sum(s.job_runs().values()) == 1, 60, "the slow worker to start the job")
        helper = s.start_worker()
        _kill(slow)
        response = pending.result(timeout=120)
    try:
        assert response.status_code == 200, response.text + s.tail()
        [prediction] = response.json()["results"]
        assert {i["id"] for i in prediction["result"]} == {"kill1"}
        assert prediction["model_version"] == s.model_version()
        assert list(s.job_runs().values()) == [2]  # started on the killed worker, finished on the other
    finally:
        s.stop(helper)


def test_worker_killed_past_the_budget_the_prediction_is_written_back_once(fault_stack, payloads, configs, fake_ls,
                                                                          helpers):
    s, wait_for = fault_stack, helpers.wait_for
    slow = s.start_worker(delay_s=120)
    task = payloads.task(601, annotations=[payloads.annotation([payloads.polygon("wb1")])])
    body = payloads.predict([task], configs["polygon_rectangle"])
    response = s.post("/predict", body)  # returns after the 3 s budget while the slow worker holds the job
    assert response.status_code == 200, response.text
    [entry] = response.json()["results"]
    assert "result" not in entry  # Label Studio stores nothing now ...
    assert entry["osprey_status"] == "pending" and "written to Label Studio" in entry["message"]

    helper = s.start_worker()
    _kill(slow)
    try:
        written = wait_for(lambda: fake_ls.for_task(601), 90, "the write-back to Label Studio")
        [prediction] = written  # ... and exactly one prediction arrives later through its API
        assert prediction["model_version"] == s.model_version()
        assert {i["id"] for i in prediction["result"]} == {"wb1"}
        runs = s.job_runs()
        assert [v for k, v in runs.items() if "-batch-" in k and not k.endswith("-wb")] == [2]  # killed, retried
        assert [v for k, v in runs.items() if k.endswith("-wb")] == [1]  # one write-back job

        again = s.post("/predict", body)  # the same request again: the task is already handed off
        assert again.status_code == 200
        assert "result" not in again.json()["results"][0]
        wait_for(lambda: s.redis().llen(f"rq:queue:{s.prefix}:batch") == 0, 10, "an empty batch queue")
        assert len(fake_ls.for_task(601)) == 1  # no duplicate
    finally:
        s.stop(helper)


def _redis_server(port: int, wait_for) -> subprocess.Popen:
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: redis.Redis(port=port, socket_timeout=1).ping(), 10, "redis-server")
    return proc


def test_redis_down_gives_503_and_the_backend_recovers_without_restart(tmp_path, payloads, configs, helpers):
    wait_for = helpers.wait_for
    port = helpers.free_port()
    server = _redis_server(port, wait_for)
    s = helpers.make_stack(tmp_path, redis_url=f"redis://127.0.0.1:{port}/0")
    config = configs["keypoint_sam"]

    def interactive(task_id: int, x: float) -> httpx.Response:
        context = {"result": [payloads.keypoint(x=x, y=20.0, region_id=f"rd{task_id}")]}
        return s.post("/predict", payloads.predict([payloads.task(task_id)], config, context))

    try:
        s.start_worker()
        s.start_server()
        assert interactive(701, 10.0).status_code == 200

        server.kill()
        server.wait()
        down = interactive(702, 20.0)
        assert down.status_code == 503, down.text
        assert "Redis" in down.json()["detail"] and "unavailable" in down.json()["detail"]
        assert down.headers["retry-after"] == "5"
        assert s.post("/setup", payloads.setup(config)).status_code == 503
        # The process answers, and says why it cannot serve (once its 0.5 s cached worker count is stale).
        health = wait_for(lambda: (r := httpx.get(s.base_url + "/health", timeout=5)).status_code == 503 and r, 10,
                          "/health to say DOWN")
        assert health.json()["status"] == "DOWN" and "Redis" in health.json()["reason"]

        server = _redis_server(port, wait_for)  # an empty Redis on the same port: no restart of server or worker
        recovered = wait_for(lambda: (r := interactive(703, 30.0)).status_code == 200 and r, 60,
                             "predictions to work again")
        wait_for(lambda: httpx.get(s.base_url + "/health", timeout=5).json()["status"] == "UP", 10, "/health UP")
        assert {i["id"] for i in recovered.json()["results"][0]["result"]} == {"rd703"}
        assert all(p.poll() is None for p in [s.server, *s.workers])
    except BaseException:
        print(s.tail())
        raise
    finally:
        s.close()
        server.kill()
        server.wait()


def test_a_crashing_job_is_retried_then_reported_instead_of_waited_on(stack):
    """A job that raises (a bug, not bad input) runs 1 + retries times on the real worker, then its
    failure callback publishes a 502, so the waiting request answers at once instead of timing out."""
    from rq import Callback, Retry

    from backend.queue.jobs import FAILURE_CALLBACK, PREDICT_FUNC, JobQueue
    from backend.settings import Settings

    queue = JobQueue(stack.redis(), Settings(osprey_redis_prefix=stack.prefix))
    job_id = f"{stack.prefix}-interactive-crash"
    queue.interactive.enqueue_call(PREDICT_FUNC, args=({"job_id": job_id},), job_id=job_id, retry=Retry(max=1),
                                   on_failure=Callback(FAILURE_CALLBACK))  # no image_url: KeyError in the job
    output = queue.wait([job_id], 60)[job_id]
    assert output["ok"] is False
    assert output["error"]["status"] == 502 and "KeyError" in output["error"]["message"]
    assert stack.job_runs()[job_id] == 2
    assert stack.workers[0].poll() is None  # the worker lives on
