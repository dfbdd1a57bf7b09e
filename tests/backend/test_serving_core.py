"""Serving-core defects of issue 6 against the real server subprocess, real Redis, real workers:
a batch output that outlives OSPREY_RESULT_TTL_S in the queue (1), write-back retries (10), model swap (12),
slowloris (13), /health and 503 without workers (2). Label Studio is a stub (Label Studio itself is not
installed here): a stdlib HTTP server answering the two prediction endpoints as scripted per test.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import redis

from backend.settings import Settings
from tests.backend.conftest import JsonHandler


class ScriptedLabelStudio:
    """`GET/POST /api/predictions/`; POSTs are answered with the next status of `post_statuses` (then 201)."""

    def __init__(self) -> None:
        self.post_statuses: list[int] = []
        self.posts: list[dict] = []
        self.stored: list[dict] = []
        self.lock = threading.Lock()
        ls = self

        class Handler(JsonHandler):
            def do_GET(self) -> None:
                if urlsplit(self.path).path.rstrip("/") != "/api/predictions":
                    return self._send(404, {"detail": "Not found."})
                with ls.lock:
                    self._send(200, list(ls.stored))

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with ls.lock:
                    ls.posts.append(body)
                    status = ls.post_statuses.pop(0) if ls.post_statuses else 201
                    if status == 201:
                        ls.stored.append({"id": len(ls.stored) + 1, **body})
                if status == 201:
                    return self._send(201, ls.stored[-1])
                self._send(status, {"detail": f"scripted {status}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def scripted_ls() -> Iterator[ScriptedLabelStudio]:
    ls = ScriptedLabelStudio()
    yield ls
    ls.close()


def _batch(payloads: Any, configs: dict, task_id: int, region_id: str) -> dict:
    task = payloads.task(task_id, annotations=[payloads.annotation([payloads.polygon(region_id)])])
    return payloads.predict([task], configs["polygon_rectangle"])


def _failed(s: Any, task_id: int) -> dict | None:
    raw = s.redis().hget(f"{s.prefix}:wb:failed", str(task_id))
    return json.loads(raw) if raw else None


# ---- defect 1 ------------------------------------------------------------------------------------------
def test_a_batch_job_waiting_longer_than_the_result_ttl_is_still_written_back(tmp_path, fake_ls, payloads,
                                                                             configs, helpers):
    """The hand-off key used to expire after OSPREY_RESULT_TTL_S while the job waited in the queue; the job
    then published to nothing and no write-back was queued, with nothing recorded as failed."""
    s = helpers.make_stack(tmp_path, ls_url=fake_ls.url, OSPREY_RESULT_TTL_S="2", OSPREY_BATCH_BUDGET_S="1")
    try:
        first = s.start_worker()  # announces the model version, then goes away: the job will wait
        s.start_server()
        s.stop(first)
        response = s.post("/predict", _batch(payloads, configs, 811, "ttl1"))
        assert response.status_code == 200, response.text
        [entry] = response.json()["results"]
        assert entry["osprey_status"] == "pending" and "written to Label Studio" in entry["message"]
        time.sleep(3)  # the job waits in the queue longer than OSPREY_RESULT_TTL_S
        assert s.redis().exists(f"{s.prefix}:handoff:" + s.redis().lindex(f"rq:queue:{s.prefix}:batch", 0).decode())
        s.start_worker()
        [written] = helpers.wait_for(lambda: fake_ls.for_task(811), 90, "the write-back after the wait")
        assert {i["id"] for i in written["result"]} == {"ttl1"}
        assert _failed(s, 811) is None
    except BaseException:
        print(s.tail())
        raise
    finally:
        s.close()


# ---- defect 10 -----------------------------------------------------------------------------------------
@pytest.fixture()
def slow_stack(tmp_path, scripted_ls, helpers):
    """A worker that needs 3 s per job and a 1 s batch budget: every batch task is handed off."""
    with helpers.running(helpers.make_stack(tmp_path, ls_url=scripted_ls.url, OSPREY_BATCH_BUDGET_S="1",
                                            OSPREY_WRITEBACK_BACKOFF_S="1", OSPREY_WRITEBACK_RETRIES="3"), 3) as s:
        yield s


def test_a_write_back_refused_with_4xx_is_recorded_after_one_attempt(slow_stack, scripted_ls, payloads, configs,
                                                                    helpers):
    """Retries used to stack three deep (client x write-back attempts x RQ), 4xx included: up to 64 calls."""
    s = slow_stack
    scripted_ls.post_statuses = [400] * 50
    response = s.post("/predict", _batch(payloads, configs, 821, "bad1"))
    assert "result" not in response.json()["results"][0]
    failure = helpers.wait_for(lambda: _failed(s, 821), 90, "the refused write-back to be recorded")
    assert "refused" in failure["reason"] and "400" in failure["reason"]
    time.sleep(3)  # room for any (wrong) retry to show up
    assert len(scripted_ls.posts) == 1
    assert scripted_ls.stored == []


def test_a_write_back_answered_503_is_retried_later_by_the_queue(slow_stack, scripted_ls, payloads, configs,
                                                                helpers):
    s = slow_stack
    scripted_ls.post_statuses = [503, 503]
    s.post("/predict", _batch(payloads, configs, 822, "retry1"))
    [stored] = helpers.wait_for(lambda: list(scripted_ls.stored), 120, "the retried write-back")
    assert {i["id"] for i in stored["result"]} == {"retry1"}
    assert len(scripted_ls.posts) == 3  # one attempt per run: 503, 503 (RQ retries after 1 s, 3 s), 201
    runs = s.job_runs()
    assert [v for k, v in runs.items() if k.endswith("-wb")] == [3]
    assert _failed(s, 822) is None


# ---- defect 12 -----------------------------------------------------------------------------------------
class _Engine:
    def __init__(self, source: str):
        self.model_version = f"v-{source}"


def test_a_model_swap_frees_the_old_model_first_and_a_failed_swap_is_recorded(helpers):
    """The worker used to load the new version while the old one was still referenced (two 14 GB models on
    a 24 GB GPU), and a failed swap was only logged."""
    from backend.queue.worker import WorkerRuntime

    settings = Settings(osprey_redis_prefix=f"sw{uuid.uuid4().hex[:8]}", osprey_model="a")
    connection = redis.Redis.from_url("redis://127.0.0.1:6379/0")
    alive: list[weakref.ref] = []
    alive_at_load: list[int] = []

    def loader(source: str) -> _Engine:
        alive_at_load.append(sum(r() is not None for r in alive))
        if source == "broken":
            raise RuntimeError("checkpoint is truncated")
        engine = _Engine(source)
        alive.append(weakref.ref(engine))
        return engine

    runtime = WorkerRuntime(settings, connection, "w-swap", loader=loader, origins=[])
    try:
        runtime.load("a")
        runtime.queue.announce_model_source("b")
        runtime.refresh_model()
        assert runtime.engine.model_version == "v-b"
        assert alive_at_load == [0, 0]  # "a" was gone before "b" loaded
        assert runtime.queue.last_swap()["ok"] is True

        runtime.queue.announce_model_source("broken")
        runtime.refresh_model()  # fails: "b" is loaded again, and the failure is kept in Redis
        assert runtime.engine.model_version == "v-b" and runtime.source == "b"
        swap = runtime.queue.last_swap()
        assert swap["ok"] is False and swap["source"] == "broken" and "checkpoint is truncated" in swap["error"]
        assert max(alive_at_load) == 0
    finally:
        helpers.purge_prefix(connection, settings.osprey_redis_prefix)


def test_a_swap_waits_for_the_job_holding_the_engine(helpers):
    """The engine is not thread-safe: a swap asked for from another thread (a promotion) waits until the
    job using the engine lets go of `engine_lock` (predict_job holds it), and only then replaces it."""
    import threading

    from backend.queue.worker import WorkerRuntime

    settings = Settings(osprey_redis_prefix=f"lk{uuid.uuid4().hex[:8]}", osprey_model="a")
    connection = redis.Redis.from_url("redis://127.0.0.1:6379/0")
    runtime = WorkerRuntime(settings, connection, "w-lock", loader=_Engine, origins=[])
    try:
        runtime.load("a")
        runtime.engine_lock.acquire()  # a job is predicting
        swapper = threading.Thread(target=runtime.load, args=("b",))
        swapper.start()
        swapper.join(0.5)
        assert swapper.is_alive() and runtime.engine.model_version == "v-a"  # still the job's engine
        runtime.engine_lock.release()
        swapper.join(10)
        assert not swapper.is_alive() and runtime.engine.model_version == "v-b"
    finally:
        if runtime.engine_lock._is_owned():  # type: ignore[attr-defined]
            runtime.engine_lock.release()
        helpers.purge_prefix(connection, settings.osprey_redis_prefix)


# ---- defect 13 -----------------------------------------------------------------------------------------
def test_half_open_connections_are_closed_and_the_server_keeps_serving(tmp_path, helpers):
    """2,000 half-open connections used to stay open 30 s and more (uvicorn has no header or body deadline)."""
    s = helpers.make_stack(tmp_path, OSPREY_HEADER_TIMEOUT_S="2", OSPREY_BODY_TIMEOUT_S="3")
    sockets: list[socket.socket] = []
    try:
        s.start_server()
        for i in range(300):
            sock = socket.create_connection(("127.0.0.1", s.port), timeout=30)
            if i % 3 == 0:
                sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"ta")  # slow body
            elif i % 3 == 1:
                sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # headers never end
            sockets.append(sock)  # (and one in three sends nothing at all)
        assert httpx.get(s.base_url + "/health", timeout=10).status_code in (200, 503)  # answered, not hung
        for sock in sockets:
            try:
                data = sock.recv(65536)
                while data:  # a 4xx/408 answer before the close is fine too
                    data = sock.recv(65536)
            except ConnectionResetError:
                pass  # closed hard: also closed
        assert s.server.poll() is None
        assert httpx.get(s.base_url + "/health", timeout=10).status_code in (200, 503)
    except BaseException:
        print(s.tail())
        raise
    finally:
        for sock in sockets:
            sock.close()
        s.close()
