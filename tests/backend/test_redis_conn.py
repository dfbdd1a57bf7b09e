"""backend/redis_conn.py against real Redis servers: the one on 127.0.0.1:6379 (db 15) and the embedded one."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis

from backend.queue.redis import EmbeddedRedis, QueueUnavailable, connect, redis_url, socket_path
from backend.settings import Settings

LOCAL_REDIS = "redis://127.0.0.1:6379/15"


def _wait_for(predicate, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_redis_url_prefers_redis_url(tmp_path: Path) -> None:
    assert redis_url(Settings(redis_url=LOCAL_REDIS, model_dir=tmp_path)) == LOCAL_REDIS


def test_redis_url_defaults_to_embedded_socket_under_model_dir(tmp_path: Path) -> None:
    url = redis_url(Settings(model_dir=tmp_path))
    assert url == f"unix://{tmp_path.resolve()}/redis/redis.sock?db=0"


def test_socket_path_falls_back_to_short_path_for_deep_dirs(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 120)
    path = socket_path(deep)
    assert len(str(path)) <= 100
    assert path != socket_path(tmp_path / ("e" * 120))  # one socket per data dir


def test_connect_to_local_redis() -> None:
    client = connect(LOCAL_REDIS)
    key = f"osprey-test:{uuid.uuid4().hex}"
    try:
        client.set(key, "value")
        assert client.get(key) == b"value"
    finally:
        client.delete(key)
        client.close()


def test_unreachable_redis_raises_queue_unavailable_without_leaking_password() -> None:
    with pytest.raises(QueueUnavailable) as info:
        connect("redis://:hunter2secret@127.0.0.1:1/0", connect_timeout=0.5)
    message = str(info.value)
    assert "hunter2secret" not in message
    assert "127.0.0.1:1" in message and "REDIS_URL" in message


def test_missing_embedded_redis_hints_at_osprey_run(tmp_path: Path) -> None:
    with pytest.raises(QueueUnavailable, match="osprey run"):
        connect(redis_url(Settings(model_dir=tmp_path)))


def test_embedded_redis_is_shared_across_processes_and_configured_for_a_queue(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path) as embedded:
        assert embedded.owner
        assert embedded.url == redis_url(Settings(model_dir=tmp_path))
        client = connect(embedded.url)
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        assert client.config_get("port") == {"port": "0"}  # no TCP listener

        # a second process writes through the URL; we read it here
        code = "import sys, redis; redis.Redis.from_url(sys.argv[1]).set('from-child', 'hello')"
        subprocess.run([sys.executable, "-c", code, embedded.url], check=True, timeout=60)
        assert client.get("from-child") == b"hello"

        # a second EmbeddedRedis on the same data dir joins the running server and does not stop it
        with EmbeddedRedis(tmp_path) as joined:
            assert not joined.owner and joined.url == embedded.url
        assert client.ping()
        client.close()
        pid = embedded.pid
    assert pid is not None
    assert not embedded.socket.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the server process is gone (and reaped)


def test_embedded_redis_aof_survives_a_crash(tmp_path: Path) -> None:
    """Kill -9 (no shutdown save, stale socket left behind): the queue must come back from the AOF."""
    embedded = EmbeddedRedis(tmp_path).start()
    try:
        client = connect(embedded.url)
        client.rpush("rq:queue:test", "job-1")
        client.close()
        aof = tmp_path / "redis" / "osprey.aof"
        assert _wait_for(lambda: aof.exists() and b"job-1" in aof.read_bytes())  # appendfsync everysec
        assert not (tmp_path / "redis" / "osprey.rdb").exists()  # nothing saved the RDB yet
    finally:
        embedded._kill()  # SIGKILL, like a crash of the machine's Redis
    assert embedded.socket.exists()  # redis-server removes it only on a clean shutdown
    with EmbeddedRedis(tmp_path) as restarted:
        assert restarted.owner
        client = connect(restarted.url)
        assert client.lrange("rq:queue:test", 0, -1) == [b"job-1"]
        client.close()


def test_embedded_redis_start_failure_is_clear(tmp_path: Path) -> None:
    embedded = EmbeddedRedis(tmp_path)
    (tmp_path / "redis").mkdir()
    (tmp_path / "redis" / "osprey.aof").write_bytes(b"this is not an append-only file\n")
    with pytest.raises(QueueUnavailable, match="redis.log"):
        embedded.start()
    assert not embedded.owner


def test_connect_client_reports_errors_as_redis_errors_after_server_stops(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path) as embedded:
        client = connect(embedded.url)
    with pytest.raises(redis.ConnectionError):
        client.ping()


def test_an_exhausted_pool_waits_then_says_so_instead_of_blaming_redis() -> None:
    """A bounded, blocking pool: a caller queues for a free connection; if none frees up in time the error
    is a QueueBusy (answered 503 with Retry-After) naming the limit, not "Redis unavailable"."""
    import threading

    import redis as redis_lib

    from backend.queue.jobs import QueueBusy
    from backend.queue.redis import PoolExhausted

    client = connect("redis://127.0.0.1:6379/0", max_connections=1, pool_timeout_s=0.3)
    held = client.connection_pool.get_connection()
    try:
        with pytest.raises(PoolExhausted) as info:
            client.ping()
        assert isinstance(info.value, QueueBusy) and isinstance(info.value, redis_lib.ConnectionError)
        assert info.value.status_code == 503 and "OSPREY_REDIS_MAX_CONNECTIONS" in str(info.value)
        timer = threading.Timer(0.1, client.connection_pool.release, args=(held,))
        timer.start()
        assert client.ping()  # a connection freed while waiting: the caller got it, no error
        timer.join()
    finally:
        client.close()
