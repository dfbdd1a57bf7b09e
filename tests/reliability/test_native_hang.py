"""A job stuck inside a C call, where RQ's SIGALRM timeout cannot reach it (the worker's test hook calls libc
``sleep`` with SIGALRM blocked, backend/queue/worker.py).

Outcome asserted: the worker process is replaced (the beat thread kills it, or -- when the hang holds the
GIL and no thread of the worker runs -- `osprey run`'s supervisor does), the job is retried a bounded number
of times, then fails with a reason the user sees: a 504 saying it hung for an interactive request, a
recorded failure for a batch task; the service then answers a good request by itself.
"""

from __future__ import annotations

import json

from tests.backend.conftest import LS_TOKEN, wait_for

HUNG_CLICK, HUNG_BATCH = 13, 14


def test_a_native_hang_replaces_the_worker_and_fails_the_job_with_a_reason(osprey_run, payloads, configs, fake_ls,
                                                                            tmp_path):
    run = osprey_run(OSPREY_JOB_TIMEOUT_S="8", OSPREY_JOB_HANG_GRACE_S="1", OSPREY_JOB_RETRIES="1",
                     OSPREY_TEST_NATIVE_HANG_TASK=f"{HUNG_CLICK},{HUNG_BATCH}:gil", OSPREY_INTERACTIVE_TIMEOUT_S="60",
                     OSPREY_BATCH_BUDGET_S="2", OSPREY_WORKER_RESTART_BACKOFF_S="0.5", OSPREY_WORKER_MAX_FAST_CRASHES="10",
                     LABEL_STUDIO_URL=fake_ls.url, LABEL_STUDIO_API_KEY=LS_TOKEN)
    import redis

    try:
        run.wait_up()
        r = redis.Redis.from_url(f"unix://{tmp_path / 'data' / 'redis' / 'redis.sock'}")
        prefix = run.env["OSPREY_REDIS_PREFIX"]
        [first_worker] = run.worker_pids()

        # Interactive, hang with the GIL released: the worker's own watchdog kills it; the click gets a 504.
        click = payloads.predict([payloads.task(HUNG_CLICK)], configs["keypoint_sam"],
                                 {"result": [payloads.keypoint(region_id="hang1")]})
        hung = run.post("/predict", click)
        assert hung.status_code == 504, hung.text
        assert "hung" in hung.json()["detail"] and "replaced" in hung.json()["detail"]

        # Batch, hang holding the GIL: the supervisor sees its liveness expire and kills it.
        task = payloads.task(HUNG_BATCH, annotations=[payloads.annotation([payloads.polygon("hang2")])])
        pending = run.post("/predict", payloads.predict([task], configs["polygon_rectangle"]))
        assert pending.status_code == 200 and pending.json()["results"][0]["osprey_status"] == "pending"
        failed = wait_for(lambda: r.hget(f"{prefix}:wb:failed", str(HUNG_BATCH)), 150,
                          "the hung batch task to be recorded as failed")
        assert "died on every attempt" in json.loads(failed)["reason"]
        assert fake_ls.for_task(HUNG_BATCH) == []  # nothing written for it ...

        # Bounded: each job ran OSPREY_JOB_RETRIES + 1 times, no more.
        runs = {k.decode(): int(v) for k, v in r.hgetall(f"{prefix}:job_runs").items()}
        assert sorted(v for k, v in runs.items() if "-interactive-" in k or "-batch-" in k) == [2, 2], runs
        wait_for(lambda: int(r.hget(f"{prefix}:stats", "workers_killed_hung") or 0) == 2, 30,
                 "the supervisor to kill the second GIL-holding worker too")
        assert int(r.hget(f"{prefix}:stats", "jobs_hung") or 0) == 2  # the watchdog's, recorded before the kill

        # ... and the service recovers by itself: a fresh worker answers a good click.
        run.wait_up(120)
        good = run.post("/predict", payloads.predict([payloads.task(1)], configs["keypoint_sam"],
                                                     {"result": [payloads.keypoint(region_id="fine")]}))
        assert good.status_code == 200, good.text
        assert {i["id"] for i in good.json()["results"][0]["result"]} == {"fine"}
        assert first_worker not in run.worker_pids()
    except BaseException:
        print(run.tail())
        raise
