"""Every Redis key and queue name of one deployment, under one prefix (tests use a unique one).

One place for names, so the web process, the workers and the supervisor never disagree on a key.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from backend.errors import InputError

_PREFIX_RE = re.compile(r"[A-Za-z0-9_.-]+")

INTERACTIVE = "interactive"
BATCH = "batch"
WRITEBACK = "writeback"
KINDS = (INTERACTIVE, BATCH)  # prediction queues; WRITEBACK carries deliveries to annotation tools
ALL_QUEUES = (INTERACTIVE, BATCH, WRITEBACK)


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def content_digest(obj: Any, length: int = 40) -> str:
    """A stable hash of a JSON-able value (job ids, write-back dedup keys)."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:length]


class RedisKeys:
    """Names of one deployment's keys; every key starts with `prefix`."""

    def __init__(self, prefix: str):
        if not isinstance(prefix, str) or not _PREFIX_RE.fullmatch(prefix):
            raise InputError(f"OSPREY_REDIS_PREFIX must match [A-Za-z0-9_.-]+, got {prefix!r}")
        self.prefix = prefix

    @classmethod
    def from_queue_name(cls, queue_name: str) -> RedisKeys:
        """The keys of the deployment an RQ queue (``<prefix>:<kind>``) belongs to."""
        return cls(queue_name.rsplit(":", 1)[0])

    def queue_name(self, kind: str) -> str:
        return f"{self.prefix}:{kind}"

    # ---- job outputs and hand-off ----------------------------------------------------------------
    def out(self, job_id: str) -> str:
        return f"{self.prefix}:out:{job_id}"

    def done(self, job_id: str) -> str:
        return f"{self.prefix}:done:{job_id}"

    def handoff(self, job_id: str) -> str:
        """Set (without expiry) when a batch request stopped waiting; holds the delivery function's name."""
        return f"{self.prefix}:handoff:{job_id}"

    @property
    def done_channel(self) -> str:
        """Pub/sub channel on which workers announce finished job ids (one listener per web process)."""
        return f"{self.prefix}:done"

    # ---- write-back ------------------------------------------------------------------------------
    def writeback_record(self, task_id: Any, content: str) -> str:
        """Dedup record of one delivered output; `content` hashes regions + plan + model version."""
        return f"{self.prefix}:wb:{task_id}:{content}"

    def writeback_lock(self, task_id: Any, content: str) -> str:
        return f"{self.prefix}:wblock:{task_id}:{content}"

    @property
    def writeback_failed(self) -> str:
        """Hash task id -> JSON {job_id, reason, at}: handed-off tasks that got no prediction."""
        return f"{self.prefix}:wb:failed"

    # ---- job bookkeeping -------------------------------------------------------------------------
    @property
    def pending(self) -> str:
        """Sorted set of enqueued-but-unpublished job ids (score = enqueue time), for lost-job recovery."""
        return f"{self.prefix}:pending"

    @property
    def lost(self) -> str:
        return f"{self.prefix}:lost"

    @property
    def job_runs(self) -> str:
        """Hash job id -> number of executions started (retries and duplicates show up here)."""
        return f"{self.prefix}:job_runs"

    @property
    def stats(self) -> str:
        """Hash of worker-side counters (exported by /metrics)."""
        return f"{self.prefix}:stats"

    @property
    def reaper_lock(self) -> str:
        return f"{self.prefix}:reaper_lock"

    # ---- fair batch lane --------------------------------------------------------------------------
    def batch_hold(self, group: str) -> str:
        """RQ queue name where one project's batch jobs wait; no worker listens to it directly: the feeder
        (``JobQueue.feed``) moves jobs round-robin across projects into the ``batch`` queue."""
        return f"{self.prefix}:batch-{group}"

    @property
    def batch_ring(self) -> str:
        """List of the groups (projects) with waiting batch jobs, in round-robin order."""
        return f"{self.prefix}:batch_ring"

    @property
    def batch_slots(self) -> str:
        """Sorted set worker name -> deadline: workers allowed to run a batch job now (at most all but
        OSPREY_INTERACTIVE_RESERVED_WORKERS of the live workers)."""
        return f"{self.prefix}:batch_slots"

    @property
    def hung(self) -> str:
        """Hash job id -> JSON {worker, after_s, attempts, at}: jobs whose worker was killed for hanging."""
        return f"{self.prefix}:hung"

    # ---- workers ---------------------------------------------------------------------------------
    @property
    def live_workers(self) -> str:
        """Sorted set worker name -> deadline (epoch s) of its liveness: prediction workers only."""
        return f"{self.prefix}:workers:live"

    @property
    def supervisor(self) -> str:
        """JSON {state, reason, at} of `osprey run`'s worker supervisor (gave_up shows in /health)."""
        return f"{self.prefix}:supervisor"

    # ---- models ----------------------------------------------------------------------------------
    @property
    def model_source(self) -> str:
        """What workers should serve: a preset name or model directory. Promotion writes it."""
        return f"{self.prefix}:model:source"

    @property
    def model_current(self) -> str:
        """JSON {source, version, worker, at} of the model a worker last loaded (what /setup reports)."""
        return f"{self.prefix}:model:current"

    @property
    def model_versions(self) -> str:
        """Sorted set version -> first time a worker served it (GET /versions)."""
        return f"{self.prefix}:model:versions"

    @property
    def model_swap(self) -> str:
        """JSON {ok, source, error, worker, at} of the last model swap (a failed one shows in /versions)."""
        return f"{self.prefix}:model:swap"

    @property
    def events(self) -> str:
        """Stream of annotation-tool webhook events (consumed by training)."""
        return f"{self.prefix}:events"
