"""Prometheus metrics of the web process, plus queue and worker figures read from Redis at scrape time.

Served by ``GET /metrics`` (text exposition format). Workers keep no HTTP port: what they count lives
in the Redis hash ``<prefix>:stats`` and is exported here, so one scrape target covers a deployment
whatever the number of worker machines.

- ``osprey_http_requests_total{method,path,status}`` and ``osprey_http_request_duration_seconds{path}``
- ``osprey_jobs_total{queue,outcome}``: enqueued, deduplicated (same work already queued or done),
  ok, error, timeout, handed_off (batch work left to write-back)
- ``osprey_job_duration_seconds{queue}``: compute time reported by the worker for each job output
- ``osprey_queue_depth{queue}``, ``osprey_jobs_running{queue}``, ``osprey_workers`` (registered with RQ)
- ``osprey_live_workers``: prediction workers with a live heartbeat (0 means /health is DOWN)
- ``osprey_waiting_requests``: requests of this process waiting for a job (admission limit OSPREY_MAX_WAITING)
- ``osprey_worker_events_total{event}``: jobs_ok, jobs_rejected, jobs_failed, jobs_recovered,
  writeback_created, writeback_exists, writeback_already_written, writeback_undeliverable
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class QueueCollector(Collector):
    """Reads queue depths and worker counters from Redis when /metrics is scraped."""

    def __init__(self, snapshot: Callable[[], dict[str, Any] | None]):
        self._snapshot = snapshot

    def collect(self) -> Iterator[Any]:
        try:
            snap = self._snapshot()
        except Exception as exc:  # noqa: BLE001 - a scrape must not fail because Redis is down
            logger.warning("metrics: queue figures unavailable (%s)", exc)
            snap = None
        up = GaugeMetricFamily("osprey_queue_up", "1 when Redis answered this scrape, else 0")
        up.add_metric([], 0 if snap is None else 1)
        yield up
        if snap is None:
            return
        depth = GaugeMetricFamily("osprey_queue_depth", "Jobs waiting in each queue", labels=["queue"])
        running = GaugeMetricFamily("osprey_jobs_running", "Jobs being executed", labels=["queue"])
        for queue, value in snap["depths"].items():
            depth.add_metric([queue], value)
        for queue, value in snap["running"].items():
            running.add_metric([queue], value)
        workers = GaugeMetricFamily("osprey_workers", "Workers registered on the queues")
        workers.add_metric([], snap["workers"])
        live = GaugeMetricFamily("osprey_live_workers", "Prediction workers with a live heartbeat")
        live.add_metric([], snap.get("live_workers", 0))
        waiting = GaugeMetricFamily("osprey_waiting_requests", "Requests of this process waiting for a job")
        waiting.add_metric([], snap.get("waiting", 0))
        events = CounterMetricFamily("osprey_worker_events", "Events counted by workers", labels=["event"])
        for event, value in sorted(snap["events"].items()):
            events.add_metric([event], value)
        yield from (depth, running, workers, live, waiting, events)


class Metrics:
    """The web process's metrics, in a registry of its own (no global state between app instances)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("osprey_http_requests", "HTTP requests", ["method", "path", "status"],
                                registry=self.registry)
        self.latency = Histogram("osprey_http_request_duration_seconds", "HTTP request latency", ["path"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.jobs = Counter("osprey_jobs", "Prediction jobs by outcome as seen by /predict", ["queue", "outcome"],
                            registry=self.registry)
        self.job_duration = Histogram("osprey_job_duration_seconds", "Worker compute time per job", ["queue"],
                                      buckets=LATENCY_BUCKETS, registry=self.registry)

    def watch_queue(self, snapshot: Callable[[], dict[str, Any] | None]) -> None:
        self.registry.register(QueueCollector(snapshot))

    def observe_request(self, method: str, path: str, status: int, seconds: float) -> None:
        self.requests.labels(method, path, str(status)).inc()
        self.latency.labels(path).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
