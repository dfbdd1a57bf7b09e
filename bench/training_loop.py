"""Seconds from "the 50th correction arrived" to "the new version answers /predict" (DESIGN §6: <= 5 min on
CPU with the demo model).

The same real stack as tests/training/test_loop.py (server, prediction worker, training worker, Redis at
REDIS_URL or 127.0.0.1:6379, SQLite store, the Label Studio API faked in memory), reusing its helpers: a
base version trained without hexagons serves; 50 corrected images arrive through /webhook; the clock
starts when the 50th webhook is answered and stops when a /predict of a new task answers with the
promoted version. Prints the phases (sync, training, evaluation + gate, reload) and, with --json, one
JSON object.

    .venv/bin/python bench/training_loop.py [--json] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--keep", help="work directory to keep (default: a temporary one, removed)")
    args = parser.parse_args()

    from tests.backend.test_sync import FakeLabelStudioAPI
    from tests.training import test_loop as t
    from training.registry import Registry

    workdir = Path(args.keep or tempfile.mkdtemp(prefix="osprey-bench-loop-"))
    workdir.mkdir(parents=True, exist_ok=True)
    model_dir = workdir / "data"
    started = time.perf_counter()
    base = t.train_base(model_dir)
    base_s = time.perf_counter() - started
    fake = FakeLabelStudioAPI(t.CONFIG)
    corrections = t.scenes(t.N_CORRECTIONS, 2, t.CLASSES)
    regions = sum(len(s.objects) for s in corrections)
    stack = t.make_stack(workdir, ls_url=fake.url, OSPREY_MODEL=str(Registry(model_dir).path(base)),
                         OSPREY_TRAIN_MIN_CORRECTIONS=str(regions), **t.TRAIN_ENV)
    stack.fake = fake
    trainer = None
    try:
        stack.start_worker()
        stack.start_server()
        trainer = t.start_training_worker(stack, "trainer")
        before = len(t.runs(stack))
        first = time.perf_counter()
        t.submit(fake, stack, 1, [(s, t.task_result(s)) for s in corrections])
        arrived = time.perf_counter()
        run = t.wait_run(stack, "1", before)
        recorded = time.perf_counter()
        if run["status"] != "promoted":
            print(json.dumps(run, indent=1), file=sys.stderr)
            return 1
        scene, k = next((s, k) for s in t.scenes(20, 3, t.CLASSES) for k, o in enumerate(s.objects)
                        if o.shape == t.NEW)
        while True:
            answer = t.predict_one(stack, scene, k)
            if answer.get("model_version") == run["version"]:
                break
            time.sleep(0.2)
        answered = time.perf_counter()
    finally:
        t.stop_group(trainer)
        stack.close()
        fake.close()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    out = {
        "corrections": t.N_CORRECTIONS, "regions": regions, "retrain_steps": t.RETRAIN_STEPS,
        "base_training_s": round(base_s, 1),
        "webhooks_s": round(arrived - first, 2),
        "train_s": run.get("train_seconds"),
        "correction_to_promotion_s": round(recorded - arrived, 1),
        "correction_to_serving_s": round(answered - arrived, 1),
        "hexagon_accuracy": {"before": run["current"]["per_label"][t.NEW], "after": run["candidate"]["per_label"][t.NEW]},
        "version": run["version"],
    }
    if args.json:
        print(json.dumps(out))
    else:
        print(f"50th correction -> new version answers /predict: {out['correction_to_serving_s']:.1f} s "
              f"(promotion after {out['correction_to_promotion_s']:.1f} s, of which fine-tuning {out['train_s']} s; "
              f"hexagon accuracy {out['hexagon_accuracy']['before']:.2f} -> {out['hexagon_accuracy']['after']:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
