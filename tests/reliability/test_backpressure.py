"""The queue filled past its bound, and the interactive lane while a batch runs, through the real server,
two real workers and the real Redis; plus /health (cheap and honest) and /health?detail=1 (authenticated).

Outcome asserted: past the bound a batch request gets 429 with Retry-After and the reason; interactive
requests are still answered while batch jobs wait; no more than all workers but one ever hold a batch
slot; once the backlog drains, the same request is accepted again (it recovers by itself).
"""

from __future__ import annotations

import threading

import httpx
import pytest

from tests.backend.conftest import make_stack, running, wait_for
from tests.reliability.conftest import batch_body


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory, fake_ls):
    with running(make_stack(tmp_path_factory.mktemp("lanes"), ls_url=fake_ls.url, OSPREY_MAX_QUEUED_BATCH="6",
                            OSPREY_BATCH_BUDGET_S="1", OSPREY_INTERACTIVE_TIMEOUT_S="60"), 0.5, 0.5) as s:
        yield s


def test_a_batch_past_the_bound_gets_429_and_interactive_work_still_flows(two_workers, payloads, configs, fake_ls):
    s = two_workers
    r = s.redis()
    slots_seen: list[int] = []
    stop = threading.Event()

    def sample_slots() -> None:
        while not stop.wait(0.05):
            slots_seen.append(r.zcard(f"{s.prefix}:batch_slots"))

    sampler = threading.Thread(target=sample_slots, daemon=True)
    sampler.start()
    try:
        refused = s.post("/predict", batch_body(payloads, configs, range(8001, 8021), project="11"))
        assert refused.status_code == 429, refused.text
        assert int(refused.headers["retry-after"]) > 0
        assert "OSPREY_MAX_QUEUED_BATCH=6" in refused.json()["detail"]

        # The interactive lane is not behind the batch backlog: answered while batch jobs still wait.
        click = payloads.predict([payloads.task(8100)], configs["keypoint_sam"],
                                 {"result": [payloads.keypoint(region_id="click1")]})
        answered = s.post("/predict", click)
        assert answered.status_code == 200, answered.text
        assert {i["id"] for i in answered.json()["results"][0]["result"]} == {"click1"}
        assert s.get("/health", params={"detail": 1}).json()["detail"]["queues"]["depths"]["batch"] > 0

        wait_for(lambda: r.llen(f"rq:queue:{s.prefix}:batch") == 0
                 and s.get("/health", params={"detail": 1}).json()["detail"]["queues"]["depths"]["batch"] == 0,
                 120, "the admitted part of the batch to finish")
    finally:
        stop.set()
        sampler.join()
    assert slots_seen and max(slots_seen) <= 1  # two live workers: one is always free for interactive work

    small = batch_body(payloads, configs, range(8201, 8204), project="12")
    accepted = s.post("/predict", small)  # room again: accepted without anyone intervening
    assert accepted.status_code == 200, accepted.text
    later = [t for t, e in zip(range(8201, 8204), accepted.json()["results"], strict=True) if "result" not in e]
    wait_for(lambda: all(len(fake_ls.for_task(t)) == 1 for t in later), 120, "the rest of it written back")


def test_plain_health_is_open_and_detail_needs_credentials(two_workers):
    s = two_workers
    plain = httpx.get(s.base_url + "/health", timeout=5)
    assert plain.status_code == 200 and plain.json()["status"] == "UP" and plain.json()["workers"] == 2
    assert "detail" not in plain.json()
    assert httpx.get(s.base_url + "/health", params={"detail": 1}, timeout=5).status_code == 401
    detail = s.get("/health", params={"detail": 1}).json()["detail"]
    assert set(detail) == {"redis", "workers", "queues", "models", "training"}
    assert detail["redis"]["ping_ms"] >= 0 and "password" not in detail["redis"]["url"]
    assert len(detail["workers"]["live"]) == 2
    assert {"interactive", "batch", "writeback"} <= set(detail["queues"]["depths"])
    assert "oldest_pending_age_s" in detail["queues"]
    assert detail["models"]["current"]["version"] == s.model_version()
    assert "last_run" in detail["training"]


def test_health_answers_while_every_request_thread_is_waiting():
    """/health runs on threads of its own: with all of the server's request threads blocked (waiting on
    jobs under load), Label Studio's 1 s health check is still answered instead of queueing behind them."""
    import threading
    import uuid

    import anyio
    from fastapi.testclient import TestClient

    from backend.app import create_app
    from backend.settings import Settings

    app = create_app(Settings(redis_url="redis://127.0.0.1:6379/0", osprey_redis_prefix=f"hl{uuid.uuid4().hex[:8]}"))
    release = threading.Event()
    with TestClient(app) as client:
        async def one_request_thread() -> None:
            anyio.to_thread.current_default_thread_limiter().total_tokens = 1

        client.portal.call(one_request_thread)
        blocker = client.portal.start_task_soon(anyio.to_thread.run_sync, release.wait)  # holds the one thread
        answers: list[int] = []
        asker = threading.Thread(target=lambda: answers.append(client.get("/health").status_code), daemon=True)
        try:
            asker.start()
            asker.join(10)
            assert answers and answers[0] in (200, 503), "GET /health queued behind the busy request threads"
        finally:
            release.set()
            blocker.result(10)
            asker.join(10)
