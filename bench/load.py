"""Annotators under load: interactive latency with and without a 1,000-task batch running, on the real stack.

What runs: `osprey serve` + `--workers` `osprey worker` subprocesses (tiny model, CPU, 1 torch thread each) on
a fresh key prefix of a real Redis, and an in-process fake Label Studio receiving the write-backs
(tests/backend/conftest.py). `--annotators` closed-loop clients (each sends its next click when the last is
answered; every click a different box, so none is deduplicated) run for `--seconds`:

    idle         annotators alone
    with batch   annotators while one /predict of `--tasks` batch tasks (one region each) runs; the tasks
                 that miss the batch budget are written back to the fake Label Studio when done

Printed per annotator count: interactive p50/p99 (ms) idle and with the batch, their p99 ratio (target
<= 2x), 429/503/other-error counts, batch throughput (tasks/s from the batch POST to the last write-back),
and lost / duplicated predictions (a task with no prediction, or with more than one: must be 0 / 0).

    python bench/load.py                               # 8 and 32 annotators, table
    python bench/load.py --annotators 8 --json
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from backend_latency import CONFIG, Deployment, H, W, _reachable, box, percentile  # noqa: E402

from tests.backend.conftest import LS_TOKEN, FakeLabelStudio  # noqa: E402


def click_body(i: int) -> dict:
    task = {"id": 1, "data": {"image": "/data/local-files/?d=img.png"}, "annotations": [], "predictions": []}
    return {"tasks": [task], "project": "1.1", "label_config": CONFIG,
            "params": {"login": None, "password": None, "context": {"result": [box(i)]}}}


def batch_body(first_task: int, n: int) -> dict:
    tasks = [{"id": first_task + k, "data": {"image": "/data/local-files/?d=img.png"}, "predictions": [],
              "annotations": [{"id": k + 1, "result": [box(1_000_000 + first_task + k)], "was_cancelled": False}]}
             for k in range(n)]
    return {"tasks": tasks, "project": "2.1", "label_config": CONFIG, "params": {"context": None}}


class Annotators:
    """`n` closed-loop clients for `seconds`; latencies of the 200s and counts of everything else."""

    def __init__(self, url: str, n: int, seconds: float, counter: itertools.count):
        self.url, self.n, self.seconds, self.counter = url, n, seconds, counter
        self.latencies: list[float] = []
        self.statuses: dict[str, int] = {}
        self.lock = threading.Lock()

    def _client(self) -> None:
        deadline = time.monotonic() + self.seconds
        with httpx.Client(base_url=self.url, timeout=120) as client:
            while time.monotonic() < deadline:
                i = next(self.counter)
                started = time.perf_counter()
                try:
                    status = str(client.post("/predict", json=click_body(i)).status_code)
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                elapsed = time.perf_counter() - started
                with self.lock:
                    self.statuses[status] = self.statuses.get(status, 0) + 1
                    if status == "200":
                        self.latencies.append(elapsed)
                    elif status in ("429", "503"):
                        time.sleep(0.5)

    def run(self) -> dict:
        threads = [threading.Thread(target=self._client) for _ in range(self.n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        ms = [1000 * v for v in self.latencies]
        return {"answered": len(ms), "p50_ms": round(percentile(ms, 50), 1) if ms else None,
                "p99_ms": round(percentile(ms, 99), 1) if ms else None, "statuses": dict(self.statuses)}


def run_batch(url: str, fake: FakeLabelStudio, first_task: int, n: int, out: dict) -> None:
    """One batch POST, then wait until every task has its prediction (response or write-back)."""
    started = time.perf_counter()
    response = httpx.post(url + "/predict", json=batch_body(first_task, n), timeout=300)
    out["status"] = response.status_code
    entries = response.json().get("results", []) if response.status_code == 200 else []
    in_response = {first_task + k for k, e in enumerate(entries) if "result" in e}
    out["in_response"] = len(in_response)
    deadline = time.monotonic() + 1800
    tasks = range(first_task, first_task + n)
    while time.monotonic() < deadline:
        written = {t: len(fake.for_task(t)) for t in tasks}
        if all(written[t] + (t in in_response) >= 1 for t in tasks):
            break
        time.sleep(0.5)
    out["seconds"] = time.perf_counter() - started
    time.sleep(2.0)  # late duplicates would show up now
    counts = {t: len(fake.for_task(t)) + (t in in_response) for t in tasks}
    out["lost"] = sum(1 for c in counts.values() if c == 0)
    out["duplicated"] = sum(1 for c in counts.values() if c > 1)
    out["tasks_per_s"] = round(n / out["seconds"], 2)


def measure(dep: Deployment, fake: FakeLabelStudio, annotators: int, seconds: float, tasks: int,
            first_task: int, warmup_s: float = 0.0) -> dict:
    counter = itertools.count(first_task * 10)
    if warmup_s > 0:  # first clicks (connections, caches, allocator) are not part of the idle baseline
        Annotators(dep.url, annotators, warmup_s, counter).run()
    idle = Annotators(dep.url, annotators, seconds, counter).run()
    batch: dict = {}
    runner = threading.Thread(target=run_batch, args=(dep.url, fake, first_task, tasks, batch))
    runner.start()
    time.sleep(1.0)  # the batch is queued and running
    loaded = Annotators(dep.url, annotators, seconds, counter).run()
    runner.join()
    ratio = (loaded["p99_ms"] / idle["p99_ms"]) if idle["p99_ms"] and loaded["p99_ms"] else None
    return {"annotators": annotators, "idle": idle, "with_batch": loaded,
            "p99_ratio": round(ratio, 2) if ratio else None, "batch": batch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotators", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=20.0, help="duration of each annotator phase")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of clicks before each idle phase, not counted")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not _reachable(args.redis_url):
        sys.exit(f"no Redis answers at {args.redis_url}")

    workdir = Path(tempfile.mkdtemp(prefix="osprey-load-"))
    img = np.zeros((H, W, 3), dtype=np.uint8)
    img[100:300, 100:400] = (200, 40, 40)
    Image.fromarray(img).save(workdir / "img.png")
    fake = FakeLabelStudio()
    dep = Deployment(args.redis_url, workdir)
    dep.env |= {"LABEL_STUDIO_URL": fake.url, "LABEL_STUDIO_API_KEY": LS_TOKEN, "OSPREY_BATCH_BUDGET_S": "5",
                "OSPREY_MAX_NEW_TOKENS": "8", "OSPREY_WRITEBACK_BACKOFF_S": "1"}
    rows = []
    try:
        for _ in range(args.workers):
            dep.start_worker(threads=1)
        dep.start_server()
        for k, n in enumerate(args.annotators):
            rows.append(measure(dep, fake, n, args.seconds, args.tasks, first_task=100_000 * (k + 1),
                                warmup_s=args.warmup))
    finally:
        dep.stop()
        fake.close()
    report = {"machine": platform.platform(), "workers": args.workers, "tasks": args.tasks, "seconds": args.seconds,
              "warmup_s": args.warmup, "rows": rows}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{args.workers} workers (tiny model, CPU, 1 thread each), batch of {args.tasks} tasks, "
          f"{args.seconds:g} s per phase")
    print(f"{'annot.':>6} {'idle p50':>9} {'idle p99':>9} {'batch p50':>10} {'batch p99':>10} {'ratio':>6} "
          f"{'429':>4} {'503':>4} {'other':>5} {'tasks/s':>8} {'lost':>5} {'dup':>4}")
    for row in rows:
        statuses = {**row["with_batch"]["statuses"]}
        for key, value in row["idle"]["statuses"].items():
            statuses[key] = statuses.get(key, 0) + value
        other = sum(v for k, v in statuses.items() if k not in ("200", "429", "503"))
        b = row["batch"]
        print(f"{row['annotators']:>6} {row['idle']['p50_ms']:>9} {row['idle']['p99_ms']:>9} "
              f"{row['with_batch']['p50_ms']:>10} {row['with_batch']['p99_ms']:>10} {row['p99_ratio']:>6} "
              f"{statuses.get('429', 0):>4} {statuses.get('503', 0):>4} {other:>5} {b.get('tasks_per_s')!s:>8} "
              f"{b.get('lost')!s:>5} {b.get('duplicated')!s:>4}")


if __name__ == "__main__":
    main()
