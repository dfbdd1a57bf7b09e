"""Interactive latency through HTTP + Redis queue + worker, against the engine alone on the same inputs.

What runs: `osprey serve` and `osprey worker` subprocesses (tiny model, CPU) on a fresh key prefix of a
real Redis; a client POSTs interactive /predict requests exactly as Label Studio sends them (one
RectangleLabels region per request, every request a different box, so none is deduplicated).

    e2e      wall time of one /predict as the client sees it (sequential requests, keep-alive)
    engine   `predict_regions(engine, image, plan, regions)` in this process for the same request
             (the worker's compute: classification + attribute; image decoding excluded, as the
             worker's media cache and the engine's image cache are warm in both cases)
    overhead e2e - engine, paired per request: HTTP, parsing, Redis enqueue, RQ dequeue and
             bookkeeping, publish, wake-up of the waiting request, JSON
    in-worker the worker's own time for that very job (`elapsed_s` of its output: payload decoding,
             image from the cache, the model calls), read back from Redis after the run
    queue overhead  e2e - in-worker, paired per request: the same overhead without the drift between
             two separate engine measurements (the machine's speed moves by several ms between runs)

Throughput: `--concurrency` clients, with 1 then 2 workers (each worker gets cores/workers torch threads).
Burst: `--burst` clients (default 200) each send one interactive request at the same moment (2 workers):
how many are answered 200, shed with 429 or 503 (with Retry-After), or fail otherwise, and p50/p99 of
the answered ones. Before the one-listener design, 94 of 200 got 503 "Redis unavailable" (pool exhausted).
Redis: `--redis-url` / REDIS_URL (default the local 127.0.0.1:6379); when that does not answer, the
embedded Redis is started in a temporary directory.

    python bench/backend_latency.py                  # table
    python bench/backend_latency.py --json
    python bench/backend_latency.py --redis-url redis://127.0.0.1:6379/0 --requests 300
    git worktree add /tmp/old 300a425 && python bench/backend_latency.py --code /tmp/old --burst 0   # A/B
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

W, H = 640, 480
LABELS = ["person", "car", "dog", "cat", "bicycle", "bus", "truck", "tree", "building", "bird"]
CONFIG = (
    '<View><Image name="image" value="$image"/>'
    '<RectangleLabels name="rect" toName="image" smart="true">'
    + "".join(f'<Label value="{label}"/>' for label in LABELS)
    + "</RectangleLabels>"
    '<Choices name="color" toName="image" perRegion="true">'
    '<Choice value="red"/><Choice value="green"/><Choice value="blue"/><Choice value="other"/></Choices>'
    "</View>"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def box(i: int) -> dict:
    """The i-th distinct rectangle, as Label Studio serializes a smart RectangleLabels region."""
    rng = np.random.default_rng(i)
    x, y = float(rng.uniform(0, 70)), float(rng.uniform(0, 70))
    w, h = float(rng.uniform(5, 30)), float(rng.uniform(5, 30))
    return {"original_width": W, "original_height": H, "image_rotation": 0,
            "value": {"x": x, "y": y, "width": w, "height": h, "rotation": 0, "rectanglelabels": ["car"]},
            "id": f"b{i}", "from_name": "rect", "to_name": "image", "type": "rectanglelabels", "origin": "manual"}


def body(i: int) -> dict:
    task = {"id": 1, "data": {"image": "/data/local-files/?d=img.png"}, "annotations": [], "predictions": []}
    return {"tasks": [task], "project": "1.1", "label_config": CONFIG,
            "params": {"login": None, "password": None, "context": {"result": [box(i)]}}}


class Deployment:
    def __init__(self, redis_url: str, workdir: Path, code: Path = REPO):
        self.workdir = workdir
        self.code = code  # the checkout whose server and worker run (`--code`: compare commits side by side)
        self.prefix = f"bench-{uuid.uuid4().hex[:8]}"
        self.port = free_port()
        base = {k: v for k, v in os.environ.items() if not k.startswith(("OSPREY_", "BASIC_AUTH_", "LABEL_STUDIO_"))}
        self.env = {**base, "REDIS_URL": redis_url, "OSPREY_REDIS_PREFIX": self.prefix,
                    "LOCAL_FILES_DOCUMENT_ROOT": str(workdir), "MODEL_DIR": str(workdir / "data"),
                    "LOG_LEVEL": "WARNING", "OSPREY_INTERACTIVE_TIMEOUT_S": "120"}
        self.procs: list[subprocess.Popen] = []
        self.workers: list[subprocess.Popen] = []
        self.redis_url = redis_url

    def spawn(self, args: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = open(self.workdir / f"{args[0]}{len(self.procs)}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen([sys.executable, "-m", "backend.cli", *args], cwd=self.code, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def start_server(self) -> None:
        self.spawn(["serve", "--host", "127.0.0.1", "--port", str(self.port)], self.env)
        self._wait(lambda: httpx.get(f"{self.url}/health", timeout=1).status_code == 200, "server")

    def start_worker(self, threads: int) -> None:
        import redis

        r = redis.Redis.from_url(self.redis_url)
        key = f"rq:workers:{self.prefix}:interactive"
        before = r.scard(key)
        env = {**self.env, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        self.workers.append(self.spawn(["worker", "--name", f"{self.prefix}-w{len(self.workers)}"], env))
        self._wait(lambda: r.scard(key) > before, "worker")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _wait(self, predicate, what: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if predicate():
                    return
            except Exception:  # noqa: BLE001 - not up yet
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{what} did not come up; logs in {self.workdir}")

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        import redis

        r = redis.Redis.from_url(self.redis_url)
        for name in r.smembers("rq:workers"):
            if self.prefix in name.decode():
                r.srem("rq:workers", name)
        for name in r.smembers("rq:queues"):
            if f"rq:queue:{self.prefix}:" in name.decode():
                r.srem("rq:queues", name)
        keys = list(r.scan_iter(f"{self.prefix}*")) + list(r.scan_iter(f"rq:*{self.prefix}*"))
        if keys:
            r.delete(*keys)


def _reachable(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1).ping())
    except (redis.RedisError, OSError):
        return False


def post(client: httpx.Client, i: int) -> float:
    started = time.perf_counter()
    response = client.post("/predict", json=body(i))
    elapsed = time.perf_counter() - started
    if response.status_code != 200:
        raise RuntimeError(f"/predict answered {response.status_code}: {response.text}")
    return elapsed


def engine_times(indices: list[int], image_path: Path, repeats: int = 1) -> dict[int, float]:
    """The worker's computation for each request, in this process, with the same tiny model."""
    from backend.labelstudio.config import parse_label_config
    from backend.labelstudio.regions import parse_context
    from backend.service.predict import predict_regions
    from osprey_core import load_engine

    engine = load_engine("tiny", device="cpu", max_new_tokens=64)
    plan = parse_label_config(CONFIG)
    image = Image.open(image_path).convert("RGB")
    predict_regions(engine, image, plan.to_plan(), parse_context({"result": [box(10**9)]}, plan))  # warm the image cache
    out = {}
    for i in indices:
        regions = parse_context({"result": [box(i)]}, plan)
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            predict_regions(engine, image, plan.to_plan(), regions)
            best = min(best, time.perf_counter() - started)
        out[i] = best
    return out


def worker_times(redis_url: str, prefix: str) -> dict[int, float]:
    """Request index -> the worker's `elapsed_s` for its job, from the outputs the jobs stored."""
    import redis

    r = redis.Redis.from_url(redis_url)
    out = {}
    for key in r.scan_iter(f"{prefix}:out:*", count=1000):
        value = r.get(key)
        if value is None:
            continue
        output = json.loads(value)
        # Outputs name their regions; before the serving-core restructure they carried the LS result instead.
        region = str((output.get("regions") or output.get("prediction", {}).get("result") or [{}])[0].get("id", ""))
        if output.get("ok") and region.startswith("b") and region[1:].isdigit():
            out[int(region[1:])] = float(output["elapsed_s"])
    return out


def throughput(url: str, first: int, count: int, concurrency: int) -> float:
    with httpx.Client(base_url=url, timeout=300) as client:
        started = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(lambda i: post(client, i), range(first, first + count)))
        return count / (time.perf_counter() - started)


def burst(url: str, first: int, clients: int) -> dict:
    """`clients` simultaneous interactive requests (one each); counts by status and latency of the 200s."""
    import threading

    barrier = threading.Barrier(clients)
    limits = httpx.Limits(max_connections=clients + 10, max_keepalive_connections=clients + 10)
    results: list[tuple[int, float, bool]] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        with httpx.Client(base_url=url, timeout=300, limits=limits) as client:
            barrier.wait()
            started = time.perf_counter()
            try:
                response = client.post("/predict", json=body(i))
                status, retry_after = response.status_code, "retry-after" in response.headers
            except httpx.HTTPError:
                status, retry_after = -1, False
            with lock:
                results.append((status, time.perf_counter() - started, retry_after))

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(first, first + clients)))
    answered = [t for status, t, _ in results if status == 200]
    shed = [(status, ra) for status, _, ra in results if status in (429, 503)]
    return {
        "clients": clients,
        "answered": len(answered),
        "429": sum(1 for status, _ in shed if status == 429),
        "503": sum(1 for status, _ in shed if status == 503),
        "shed_with_retry_after": sum(1 for _, ra in shed if ra),
        "other": len(results) - len(answered) - len(shed),
        "p50_ms": percentile(answered, 50) * 1000.0 if answered else None,
        "p99_ms": percentile(answered, 99) * 1000.0 if answered else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--requests", type=int, default=200, help="sequential requests for the latency figures")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=8, help="clients for the throughput figures")
    parser.add_argument("--throughput-requests", type=int, default=200)
    parser.add_argument("--burst", type=int, default=200, help="simultaneous interactive clients (0: skip)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--code", type=Path, default=REPO,
                        help="run server and worker from this checkout (e.g. a `git worktree` of an older commit)")
    args = parser.parse_args()
    cores = os.cpu_count() or 1

    workdir = Path(tempfile.mkdtemp(prefix="osprey-bench-"))
    rng = np.random.default_rng(0)
    image_path = workdir / "img.png"
    Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(image_path)

    embedded = None
    redis_url = args.redis_url
    if not _reachable(redis_url):  # no Redis here: use the project's embedded one, as `osprey run` does
        from backend.queue.redis import EmbeddedRedis

        embedded = EmbeddedRedis(workdir / "data").start()
        redis_url = embedded.url
    deployment = Deployment(redis_url, workdir, args.code.resolve())
    try:
        deployment.start_worker(threads=cores)
        deployment.start_server()
        indices = list(range(args.requests))
        with httpx.Client(base_url=deployment.url, timeout=120) as client:
            for i in range(args.warmup):
                post(client, 1_000_000 + i)
            e2e = {i: post(client, i) for i in indices}
        engine = engine_times(indices, image_path)
        overhead = [e2e[i] - engine[i] for i in indices]
        in_worker = worker_times(redis_url, deployment.prefix)
        paired = [i for i in indices if i in in_worker]
        queue_overhead = [e2e[i] - in_worker[i] for i in paired]

        rates = {1: throughput(deployment.url, 2_000_000, args.throughput_requests, args.concurrency)}
        deployment.workers[0].send_signal(signal.SIGTERM)
        deployment.workers[0].wait(timeout=30)
        deployment.start_worker(threads=max(1, cores // 2))
        deployment.start_worker(threads=max(1, cores // 2))
        throughput(deployment.url, 2_500_000, args.warmup, args.concurrency)
        rates[2] = throughput(deployment.url, 3_000_000, args.throughput_requests, args.concurrency)
        bursts = burst(deployment.url, 4_000_000, args.burst) if args.burst else None
    except BaseException:
        deployment.stop()
        if embedded is not None:
            embedded.stop()
        print(f"benchmark failed; server and worker logs are in {workdir}", file=sys.stderr)
        raise
    deployment.stop()
    if embedded is not None:
        embedded.stop()
    shutil.rmtree(workdir, ignore_errors=True)

    ms = 1000.0
    result = {
        "machine": {"cpus": cores, "platform": platform.platform(), "python": platform.python_version(),
                    "gpu": None},
        "model": "tiny (CPU, fp32)",
        "redis": "embedded" if embedded is not None else redis_url,
        "requests": args.requests,
        "latency_ms": {
            "e2e": {"p50": percentile(list(e2e.values()), 50) * ms, "p99": percentile(list(e2e.values()), 99) * ms},
            "engine": {"p50": percentile(list(engine.values()), 50) * ms,
                       "p99": percentile(list(engine.values()), 99) * ms},
            "overhead": {"p50": percentile(overhead, 50) * ms, "p99": percentile(overhead, 99) * ms,
                         "mean": statistics.fmean(overhead) * ms},
            "in_worker": {"p50": percentile([in_worker[i] for i in paired], 50) * ms,
                          "p99": percentile([in_worker[i] for i in paired], 99) * ms},
            "queue_overhead": {"p50": percentile(queue_overhead, 50) * ms,
                               "p99": percentile(queue_overhead, 99) * ms,
                               "mean": statistics.fmean(queue_overhead) * ms, "paired": len(paired)},
        },
        "throughput_rps": {f"{w}_worker{'s' if w > 1 else ''}": rates[w] for w in sorted(rates)},
        "concurrency": args.concurrency,
        "burst": bursts,
        "target_overhead_p50_ms": 10.0,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    lat = result["latency_ms"]
    print(f"interactive /predict, tiny model on CPU ({cores} cores), {args.requests} sequential requests")
    print(f"{'':<28}{'p50 ms':>10}{'p99 ms':>10}")
    print(f"{'HTTP + queue + worker':<28}{lat['e2e']['p50']:>10.1f}{lat['e2e']['p99']:>10.1f}")
    print(f"{'engine alone':<28}{lat['engine']['p50']:>10.1f}{lat['engine']['p99']:>10.1f}")
    print(f"{'overhead (paired)':<28}{lat['overhead']['p50']:>10.1f}{lat['overhead']['p99']:>10.1f}"
          f"   (target p50 <= 10 ms)")
    print(f"{'in-worker time of the job':<28}{lat['in_worker']['p50']:>10.1f}{lat['in_worker']['p99']:>10.1f}")
    print(f"{'e2e - in-worker (paired)':<28}{lat['queue_overhead']['p50']:>10.1f}"
          f"{lat['queue_overhead']['p99']:>10.1f}   ({lat['queue_overhead']['paired']} requests)")
    print(f"throughput, {args.concurrency} concurrent clients: "
          + ", ".join(f"{k.replace('_', ' ')}: {v:.1f} req/s" for k, v in result["throughput_rps"].items()))
    if bursts:
        p50 = f"{bursts['p50_ms']:.0f}" if bursts["p50_ms"] is not None else "-"
        p99 = f"{bursts['p99_ms']:.0f}" if bursts["p99_ms"] is not None else "-"
        print(f"{bursts['clients']} simultaneous interactive clients (2 workers): {bursts['answered']} answered, "
              f"{bursts['429']} x 429, {bursts['503']} x 503 ({bursts['shed_with_retry_after']} with Retry-After), "
              f"{bursts['other']} other; answered p50 {p50} ms, p99 {p99} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
