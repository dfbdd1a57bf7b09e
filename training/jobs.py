"""The RQ job functions of the learning loop (queue ``<prefix>:training``, JSON payloads).

    train_job(payload)   one training run of payload["project"] (training/pipeline.py)
    tick_job(payload)    the schedule's check: a run for every project that is due (schedule.due)

Syncs from an annotation tool are jobs of that tool's adapter (e.g. backend.labelstudio.sync.sync_job),
which call `maybe_train` when they stored something, so the N-th correction starts a run at once.
Workers run these with settings from the environment (`osprey worker --queues training`).
"""

from __future__ import annotations

import logging
import time
from datetime import datetime
from typing import Any

from .schedule import TrainingSettings, due, enqueue_training

logger = logging.getLogger(__name__)

_CONTEXT: Any = None


def context() -> Any:
    """The process's TrainingContext (settings from the environment), built on first use."""
    global _CONTEXT
    if _CONTEXT is None:
        from backend.settings import get_settings

        from .pipeline import TrainingContext

        _CONTEXT = TrainingContext.from_settings(get_settings())
    return _CONTEXT


def set_context(ctx: Any) -> None:
    """Use `ctx` for the jobs of this process (tests, embedded runs)."""
    global _CONTEXT
    _CONTEXT = ctx


def _job_id() -> str | None:
    from rq import get_current_job

    job = get_current_job()
    return job.id if job is not None else None


def _die_with_worker() -> None:
    """In RQ's forked job process (its own session): get SIGKILL when the worker dies (Linux), so a killed
    worker never leaves a run training -- and holding the lock -- on its own."""
    import os
    import signal
    import sys

    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the worker died before the prctl
            os._exit(1)


def train_job(payload: dict[str, Any]) -> dict[str, Any]:
    from .pipeline import run_training

    _die_with_worker()
    return run_training(context(), str(payload["project"]), str(payload.get("reason", "")), _job_id())


def new_corrections(store: Any, project: str) -> tuple[int, float | None]:
    """Corrections added or changed since the project's last run, and when that run's data was cut."""
    last = store.last_training(project)
    cutoff = last["cutoff"] if last else None
    at = cutoff.timestamp() if isinstance(cutoff, datetime) else None
    return store.count_since(project, cutoff), at


def maybe_train(connection: Any, prefix: str, store: Any, project: str, policy: TrainingSettings | None = None,
                now: float | None = None) -> str | None:
    """Enqueue a run of `project` if the rule says so; returns the job id or None."""
    policy = policy or TrainingSettings()
    count, last_at = new_corrections(store, project)
    reason = due(count, last_at, policy, now)
    if reason is None:
        return None
    job_id, _ = enqueue_training(connection, prefix, project, reason)
    return job_id


def tick_job(payload: dict[str, Any]) -> dict[str, Any]:
    """Run by the CronScheduler every OSPREY_TRAIN_TICK_S: enqueue a run for each due project."""
    ctx = context()
    from .schedule import TrainingKeys

    projects = set(ctx.store.projects()) | {p.decode() if isinstance(p, bytes) else str(p) for p in
                                            ctx.connection.smembers(TrainingKeys(ctx.prefix).projects)}
    started = {}
    for project in sorted(projects):
        job_id = maybe_train(ctx.connection, ctx.prefix, ctx.store, project, ctx.policy, time.time())
        if job_id:
            started[project] = job_id
    return {"projects": sorted(projects), "enqueued": started}
