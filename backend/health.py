"""What ``GET /health?detail=1`` reports (authenticated): enough for an operator to see why it is DOWN or slow.

Kept apart from the plain /health, which stays one cached Redis read for Label Studio's 1 s timeout. Every
part is read independently, so a part that fails shows its error instead of hiding the others.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from redis.exceptions import RedisError

from backend.auth import redact
from backend.queue.redis import QueueUnavailable


def _part(read: Callable[[], Any]) -> Any:
    try:
        return read()
    except (QueueUnavailable, RedisError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


def _redis(state: Any) -> dict[str, Any]:
    queue = state.queue()
    started = time.perf_counter()
    info = queue.connection.info()
    return {"url": redact(state.url), "ping_ms": round(1000 * (time.perf_counter() - started), 2),
            "version": info.get("redis_version"), "used_memory": info.get("used_memory"),
            "maxmemory_policy": info.get("maxmemory_policy"), "aof_enabled": bool(info.get("aof_enabled"))}


def _workers(state: Any) -> dict[str, Any]:
    queue = state.queue()
    return {"live": queue.live_workers(), "supervisor": queue.supervisor_state(),
            "batch_slots": [n.decode() for n in queue.connection.zrangebyscore(queue.keys.batch_slots, time.time(),
                                                                                "+inf")]}


def _queues(state: Any) -> dict[str, Any]:
    queue = state.queue()
    from backend.queue.keys import WRITEBACK

    depths = queue.depths()
    depths[f"{WRITEBACK}_scheduled"] = queue.writeback.scheduled_job_registry.get_job_count(cleanup=False)
    try:
        from training.schedule import training_queue

        depths["training"] = training_queue(queue.connection, queue.keys.prefix).count
    except ImportError:  # the training package is optional for the web process
        pass
    oldest = queue.oldest_pending_age_s()
    return {"depths": depths, "oldest_pending_age_s": round(oldest, 3) if oldest is not None else None,
            "undeliverable": int(queue.connection.hlen(queue.keys.writeback_failed)),
            "hung_jobs": int(queue.connection.hlen(queue.keys.hung))}


def _models(state: Any) -> dict[str, Any]:
    queue = state.queue()
    return {"current": queue.current_model(), "versions": queue.model_versions(), "last_swap": queue.last_swap()}


def _training(state: Any) -> dict[str, Any]:
    queue = state.queue()
    try:
        from training.schedule import training_status
    except ImportError:
        return {"error": "the training package is not installed"}
    status = training_status(queue.connection, queue.keys.prefix, limit=1)
    return {"running": status["running"], "last_run": status["runs"][0] if status["runs"] else None}


def health_detail(state: Any) -> dict[str, Any]:
    """Redis, workers, model versions, queue depth per lane, oldest job age and the last training run."""
    return {"redis": _part(lambda: _redis(state)), "workers": _part(lambda: _workers(state)),
            "queues": _part(lambda: _queues(state)), "models": _part(lambda: _models(state)),
            "training": _part(lambda: _training(state))}
