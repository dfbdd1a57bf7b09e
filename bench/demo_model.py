"""The demo model's numbers: training time and the held-out accuracy table; cold start of `osprey run` (clean
MODEL_DIR, no OSPREY_MODEL) to the first answered interactive request; the loop time from the 50th
correction (crosses, the class it never saw) to the new version serving (tests/demo/test_demo_loop.py's stack, timed).

    .venv/bin/python bench/demo_model.py [--json] [--skip-train] [--skip-loop] [--threads 2]

Training builds into a temporary directory (models/demo/ is not touched); --skip-train measures the
shipped model instead. Check `uptime` first: other work on the cores slows every number here.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def bench_train(threads: int) -> dict:
    import torch

    from training import demo_model

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="osprey-bench-demo-") as tmp:
        started = time.perf_counter()
        report = demo_model.build(Path(tmp) / "demo", progress=False, log=lambda s: print(s, file=sys.stderr))
        report["build_seconds"] = round(time.perf_counter() - started, 1)
    return report


def bench_shipped() -> dict:
    from training import demo_model

    return demo_model.held_out_accuracy(demo_model.shipped_model())


def bench_cold_start() -> dict:
    import httpx

    from tests.demo.test_run_default import CONFIG, free_port, region_item, wait_for
    from training import demo_model, synthetic

    with tempfile.TemporaryDirectory(prefix="osprey-bench-run-") as tmp:
        tmp_path = Path(tmp)
        scene = synthetic.generate_scene(demo_model.HELD_OUT_SEED + 1, 0, shapes=demo_model.TRAIN_SHAPES,
                                         **demo_model.WORLD)
        (tmp_path / "files" / "demo").mkdir(parents=True)
        (tmp_path / "files" / "demo" / "a.png").write_bytes(scene.png_bytes())
        port = free_port()
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("OSPREY_", "LABEL_STUDIO_", "BASIC_AUTH_")) and k != "REDIS_URL"}
        env |= {"MODEL_DIR": str(tmp_path / "data"), "LOCAL_FILES_DOCUMENT_ROOT": str(tmp_path / "files")}
        base = f"http://127.0.0.1:{port}"
        body = {"tasks": [{"id": 1, "data": {"image": "/data/local-files/?d=demo/a.png"}}], "project": "1.1",
                "label_config": CONFIG,
                "params": {"login": None, "password": None, "context": {"result": [region_item(scene, 0)]}}}
        started = time.perf_counter()
        run = subprocess.Popen([sys.executable, "-m", "backend.cli", "run", "--host", "127.0.0.1", "--port", str(port)],
                               cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
        try:
            wait_for(lambda: httpx.get(base + "/health", timeout=5).status_code == 200, 600, "/health")
            health_s = time.perf_counter() - started
            wait_for(lambda: httpx.post(base + "/predict", json=body, timeout=60).status_code == 200, 600, "/predict")
            first_s = time.perf_counter() - started
        finally:
            run.send_signal(signal.SIGINT)
            try:
                run.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(run.pid, signal.SIGKILL)
    return {"health_s": round(health_s, 2), "first_answer_s": round(first_s, 2)}


def bench_loop() -> dict:
    """The clock starts when the 50th correction's webhook is answered, stops when /predict answers with the
    promoted version."""
    from tests.backend.test_sync import FakeLabelStudioAPI
    from tests.demo import test_demo_loop as d
    from tests.training import test_loop as t
    from training import demo_model
    from training.registry import Registry

    with tempfile.TemporaryDirectory(prefix="osprey-bench-demo-loop-") as tmp:
        tmp_path = Path(tmp)
        model_dir = tmp_path / "data"
        base = demo_model.ensure_registered(model_dir)
        fake = FakeLabelStudioAPI(t.CONFIG)
        scenes = demo_model.new_class_scenes(d.N_CORRECTIONS, 4242)
        regions = sum(len(s.objects) for s in scenes)
        stack = t.make_stack(tmp_path, ls_url=fake.url, OSPREY_MODEL=str(Registry(model_dir).path(base)),
                             OSPREY_TRAIN_MIN_CORRECTIONS=str(regions), OSPREY_TRAIN_TICK_S="3600",
                             **demo_model.DEMO_TRAINING_ENV)
        stack.fake = fake
        trainer = None
        try:
            stack.start_worker()
            stack.start_server()
            trainer = t.start_training_worker(stack, "trainer")
            before = len(t.runs(stack))
            last = t.submit(fake, stack, 1, [(s, d.annotation(s)) for s in scenes])
            run = t.wait_run(stack, "1", before, timeout=3600)
            trained = time.time()
            probe = next((s, k) for s in demo_model.new_class_scenes(5, 5151) for k, o in enumerate(s.objects)
                         if o.shape == demo_model.NEW_CLASS)
            while t.predict_one(stack, *probe)["model_version"] != run.get("version"):
                if run.get("status") != "promoted" or time.time() - trained > 600:
                    break
                time.sleep(1)
            served = time.time()
        finally:
            t.stop_group(trainer)
            stack.close()
            fake.close()
    return {"status": run.get("status"), "regions": regions, "train_seconds": run.get("train_seconds"),
            "new_class": demo_model.NEW_CLASS,
            "before": run["current"]["per_label"].get(demo_model.NEW_CLASS),
            "after": run["candidate"]["per_label"].get(demo_model.NEW_CLASS),
            "correction_to_serving_s": round(served - last, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--skip-train", action="store_true", help="measure the shipped model instead of building one")
    parser.add_argument("--skip-loop", action="store_true", help="leave out the learning-loop timing")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for training (default 2)")
    args = parser.parse_args()
    from training import demo_model

    out: dict = {"load_average": os.getloadavg()[0]}
    out["model"] = bench_shipped() if args.skip_train else bench_train(args.threads)
    if not args.json:
        print(demo_model.format_report(out["model"]))
        if "build_seconds" in out["model"]:
            print(f"training {out['model']['train_seconds']} s (build with evaluation {out['model']['build_seconds']} s)")
    out["cold_start"] = bench_cold_start()
    if not args.json:
        print(f"osprey run cold start: /health {out['cold_start']['health_s']} s, first interactive answer "
              f"{out['cold_start']['first_answer_s']} s")
    if not args.skip_loop:
        out["loop"] = bench_loop()
        if not args.json:
            print(f"loop: 50th correction -> new version serving {out['loop']['correction_to_serving_s']} s "
                  f"({out['loop']['status']}, {out['loop']['new_class']} {out['loop']['before']} -> {out['loop']['after']})")
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
