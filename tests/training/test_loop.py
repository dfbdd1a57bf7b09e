"""The learning loop end to end, on CPU: corrections arrive through the real /webhook, are synced into the
store, one scheduled retrain fine-tunes the served version, the gate compares it with the serving version
on held-out images, the promotion is announced, and the running prediction worker serves the new version.

Real here: the `osprey serve` server, `osprey worker` (prediction, holding the model) and `osprey worker
--queues training` (syncs and training runs) subprocesses, Redis at 127.0.0.1:6379, RQ, the SQLite store,
the registry, fine-tuning and evaluation of the demo-sized Osprey on the synthetic shapes world.
Label Studio's API is tests/backend/test_sync.py's `FakeLabelStudioAPI` (tasks, annotations and uploads
in memory, shaped as Label Studio 1.23 answers): Label Studio is not part of this environment; the same
path against a real Label Studio 1.23.2 is tests/e2e/test_training_loop.py.

The world: shapes whose colour follows their class (circle red, square green, triangle blue, hexagon
purple), so the demo-sized model, with its frozen vision tower, can tell the classes apart after a short CPU
training; the base version never saw a hexagon (its label set has the word, no example).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.backend.conftest import WEBHOOK_SECRET, Stack, make_stack, wait_for
from tests.backend.test_sync import FakeLabelStudioAPI

# Minutes of CPU training: the timeouts leave room for a machine shared with other jobs.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

REPO = Path(__file__).resolve().parents[2]
CONFIG = (REPO / "deploy" / "labelstudio" / "demo_shapes.xml").read_text()
CLASSES = ("circle", "square", "triangle", "hexagon")
NEW = "hexagon"
COLOUR_OF = {"circle": "red", "square": "green", "triangle": "blue", "hexagon": "purple"}
IMAGE_SIZE = 128
N_CORRECTIONS = 50  # corrected images (Label Studio annotations), each with 2-4 regions
BASE_STEPS, RETRAIN_STEPS = 100, 80
TRAIN_ENV = {
    "OSPREY_TRAIN_MODE": "full", "OSPREY_TRAIN_STEPS": str(RETRAIN_STEPS), "OSPREY_TRAIN_LR": "5e-4",
    "OSPREY_TRAIN_BATCH_SIZE": "8", "OSPREY_TRAIN_TASKS": "category", "OSPREY_TRAIN_HELD_OUT": "0.3",
    "OSPREY_TRAIN_LOCK_TTL_S": "3", "OSPREY_TRAIN_TICK_S": "3600", "OSPREY_GATE_MAX_LABEL_DROP": "0.02",
    "OSPREY_DEVICE": "cpu", "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2",
}


def scenes(n: int, seed: int, shapes: tuple[str, ...]) -> list:
    """Synthetic scenes, each object recoloured with its class colour (see the module docstring)."""
    from training import synthetic

    out = []
    for scene in synthetic.generate(n, seed=seed, image_size=IMAGE_SIZE, objects=(2, 4), shapes=shapes, textured=0.0):
        for obj in scene.objects:
            obj.colour = COLOUR_OF[obj.shape]
            scene.image[obj.mask] = synthetic.COLOURS[obj.colour]
        out.append(scene)
    return out


def train_base(model_dir: Path) -> str:
    """The base version: trained on shapes without a single hexagon, registered and promoted."""
    import torch

    from osprey_core import load_engine
    from training import synthetic
    from training.dataset import build_samples, split_by_image
    from training.evaluate import evaluate
    from training.finetune import TrainConfig, train
    from training.records import LabelSpace
    from training.registry import Registry

    torch.set_num_threads(2)
    labels = LabelSpace(CLASSES)
    examples = []
    for scene, path, sha in synthetic.write_images(scenes(80, 1, CLASSES[:3]), model_dir / "base-data"):
        examples += synthetic.region_examples(scene, path, sha)
    train_ex, held = split_by_image(examples, 0.2, 0)
    assert not any(e.category == NEW for e in examples)
    out = model_dir / "runs" / "base"
    train("demo", build_samples(train_ex, labels, tasks=("category",)), out,
          TrainConfig(mode="full", lr=1e-3, steps=BASE_STEPS, batch_size=8, save_every=0), device="cpu", progress=False)
    engine = load_engine(str(out))
    metrics = evaluate(engine, held, labels, descriptions=False)
    registry = Registry(model_dir)
    version = registry.register(out, version=engine.model_version, metrics=metrics, base="demo").version
    registry.promote(version, reason="base version (no hexagons)")
    return version


def task_result(scene, labels: list[str] | None = None) -> list[dict]:
    """Label Studio brush regions for a scene's objects, labelled `labels` (default: the truth)."""
    from training import synthetic

    result = synthetic.labelstudio_task(scene, "unused")["predictions"][0]["result"]
    if labels is not None:
        names = iter(labels)
        for item in result:
            if item["type"] == "brushlabels":
                item["value"]["brushlabels"] = [next(names)]
    return [r for r in result if r["type"] == "brushlabels"]  # the demo run trains categories only


@pytest.fixture(scope="module")
def loop(tmp_path_factory) -> Iterator[dict[str, Any]]:
    """A base version serving on a stack (server + prediction worker + training worker) fed by a fake LS."""
    workdir = tmp_path_factory.mktemp("loop")
    model_dir = workdir / "data"
    base = train_base(model_dir)
    fake = FakeLabelStudioAPI(CONFIG)
    from training.registry import Registry

    corrections = scenes(N_CORRECTIONS, 2, CLASSES)
    regions = sum(len(s.objects) for s in corrections)
    # The schedule's rule counts regions (OSPREY_TRAIN_MIN_CORRECTIONS): a run once all the regions of the 50
    # corrected images are in; the training worker checks the rule after every sync.
    stack = make_stack(workdir, ls_url=fake.url, OSPREY_MODEL=str(Registry(model_dir).path(base)),
                       OSPREY_TRAIN_MIN_CORRECTIONS=str(regions), **TRAIN_ENV)
    stack.fake = fake  # type: ignore[attr-defined]
    state: dict[str, Any] = {"stack": stack, "fake": fake, "base": base, "model_dir": model_dir,
                             "corrections": corrections, "regions": regions}
    try:
        stack.start_worker()
        stack.start_server()
        state["trainer"] = start_training_worker(stack, "trainer")
        yield state
    except BaseException:
        print(stack.tail())
        raise
    finally:
        stop_group(state.get("trainer"))
        stack.close()
        fake.close()


def start_training_worker(stack: Stack, name: str, **env: str) -> subprocess.Popen:
    log = stack.workdir / f"{name}.log"
    stack.logs.append(log)
    return subprocess.Popen([sys.executable, "-m", "backend.cli", "worker", "--queues", "training", "--name",
                             f"{stack.prefix}-{name}"], cwd=REPO, env={**stack.env, **env},
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)  # noqa: SIM115


def stop_group(proc: subprocess.Popen | None, sig: int = signal.SIGTERM) -> None:
    """Signal a training worker and the job process it forked (one process group)."""
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def hook(stack: Stack, action: str, project: int, **body: Any) -> dict:
    r = httpx.post(f"{stack.base_url}/webhook", json={"action": action, "project": {"id": project}, **body},
                   headers={"X-Osprey-Webhook-Secret": WEBHOOK_SECRET}, timeout=30)
    assert r.status_code == 201, r.text
    return r.json()


def runs(stack: Stack) -> list[dict]:
    return [json.loads(v) for v in stack.redis().lrange(f"{stack.prefix}:training:runs", 0, -1)]


def wait_run(stack: Stack, project: str, after: int, timeout: float = 900) -> dict:
    """The first run of `project` recorded after the first `after` records."""
    def done() -> dict | None:
        found = [r for r in runs(stack)[: max(0, len(runs(stack)) - after)] if r.get("project") == project]
        return found[-1] if found else None

    return wait_for(done, timeout, f"a training run of project {project}", interval=1.0)


def submit(fake: FakeLabelStudioAPI, stack: Stack, project: int, items: list[tuple[Any, list[dict]]]) -> float:
    """Create each task, annotate it and send the webhook, as Label Studio does; returns when the last
    webhook was answered (time.time())."""
    for scene, result in items:
        task = fake.add_task(scene.png_bytes(), project=project)
        annotation = fake.annotate(task, result)
        hook(stack, "ANNOTATION_CREATED", project, task={"id": task}, annotation={"id": annotation})
    return time.time()


def predict_one(stack: Stack, scene, obj_index: int) -> dict:
    """POST /predict for a new task whose annotation holds one region of `scene` (batch mode)."""
    fake: FakeLabelStudioAPI = stack.fake  # type: ignore[attr-defined]
    task_id = fake.add_task(scene.png_bytes(), project=1)
    region = task_result(scene)[obj_index]
    task = dict(fake.tasks[task_id])
    task["annotations"] = [{"id": 10_000 + task_id, "result": [region], "was_cancelled": False}]
    body = {"tasks": [task], "project": "1.1795681025", "label_config": CONFIG,
            "params": {"login": None, "password": None, "context": None}}
    r = stack.post("/predict", body)
    assert r.status_code == 200, r.text
    return r.json()["results"][0]


# --- the tests ------------------------------------------------------------------------------------------


def test_it_really_learns_a_new_class_from_50_corrections(loop):
    stack, fake, base = loop["stack"], loop["fake"], loop["base"]
    corrections, regions = loop["corrections"], loop["regions"]
    assert sum(o.shape == NEW for s in corrections for o in s.objects) >= 10
    before = len(runs(stack))
    submit(fake, stack, 1, [(s, task_result(s)) for s in corrections])
    run = wait_run(stack, "1", before)
    assert run["status"] == "promoted", json.dumps(run, indent=1)
    assert str(regions) in run["reason"]
    cand, cur = run["candidate"]["per_label"], run["current"]["per_label"]
    assert cur[NEW] <= 0.1, cur  # the base never saw a hexagon
    assert cand[NEW] >= 0.9, cand
    for label in CLASSES[:3]:
        assert cand[label] >= cur[label] - 0.02, (label, cand, cur)
    new_version = run["version"]
    assert run["current"]["model_version"] == base and new_version != base

    # The running prediction worker picks the promotion up: the next /predict answers with the new version.
    held_hexagon = next((s, k) for s in scenes(20, 3, CLASSES) for k, o in enumerate(s.objects) if o.shape == NEW)
    answer = predict_one(stack, *held_hexagon)
    assert answer["model_version"] == new_version, answer
    labels = [lab for item in answer["result"] if item.get("type") == "brushlabels" for lab in item["value"]["brushlabels"]]
    assert labels == [NEW], answer
    versions = stack.get("/versions").json()
    assert new_version in versions["versions"] and versions["current"] == new_version
    assert versions["training"]["runs"][0]["status"] == "promoted"
    # The promoted version serves calibrated scores: its held-out-fitted temperature is in its config
    # (covered by its id), and /setup says so.
    from training.registry import Registry

    config = json.loads((Registry(loop["model_dir"]).path(new_version) / "osprey_config.json").read_text())
    calibration = run["calibration"]  # applied unless the fitted temperature worsened the held-out ECE
    assert calibration["applied"] == (calibration["ece_after"] <= calibration["ece_before"]), calibration
    assert config.get("score_temperature_fitted", False) is calibration["applied"], config
    if calibration["applied"]:
        assert config["score_temperature"] == calibration["temperature"] > 0, config
    score = stack.post("/setup", {"schema": CONFIG, "project": "1"}).json()["score"]
    assert score["calibrated"] is calibration["applied"], score
    assert score["temperature"] == config.get("score_temperature", 1.0), score


def test_a_label_shuffled_training_set_is_refused(loop):
    stack, fake = loop["stack"], loop["fake"]
    serving = stack.redis().get(f"{stack.prefix}:model:source")
    # Harmful corrections: the labels of every training-side image shuffled. The held-out images (the split
    # depends only on the image's hash) keep true labels, as a trusted held-out set would.
    from training import synthetic
    from training.dataset import split_by_image

    world = scenes(40, 4, CLASSES)
    examples = [e for s in world for e in synthetic.region_examples(s, "unused")]
    _, held = split_by_image(examples, float(TRAIN_ENV["OSPREY_TRAIN_HELD_OUT"]), 0)
    held_images = {e.image_sha256 for e in held}
    rng = random.Random(0)
    items = []
    for s in world:
        truth = synthetic.region_examples(s, "unused")[0].image_sha256 in held_images
        items.append((s, task_result(s, None if truth else [rng.choice(CLASSES) for _ in s.objects])))
    stop_group(loop["trainer"])  # a shorter run does the harm (and keeps the test short)
    loop["trainer"] = start_training_worker(stack, "trainer-shuffled", OSPREY_TRAIN_STEPS="40")
    with fake.lock:
        fake.projects[2] = {"id": 2, "title": "shapes, shuffled", "label_config": CONFIG}
    for scene, result in items:  # annotations Label Studio holds; no webhook reached us
        fake.annotate(fake.add_task(scene.png_bytes(), project=2), result)
    proc = subprocess.run([sys.executable, "-m", "backend.cli", "sync", "--project", "2"], cwd=REPO, env=stack.env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["tasks"] == len(items) and summary["failed"] == 0, summary
    before = len(runs(stack))
    answer = hook(stack, "START_TRAINING", 2)
    assert answer["job"].endswith("-train-2")
    run = wait_run(stack, "2", before)
    assert run["status"] == "refused", json.dumps(run, indent=1)
    decision = run["decision"]
    assert decision["promote"] is False and decision["candidate"] < decision["current"]
    assert stack.redis().get(f"{stack.prefix}:model:source") == serving  # the current version stays

    versions = stack.get("/versions").json()
    refusal = versions["training"]["refusals"][0]
    assert refusal["version"] == run["version"] and refusal["decision"]["current"] == decision["current"]
    listing = subprocess.run([sys.executable, "-m", "training.models_cli", "--model-dir", str(loop["model_dir"]),
                              "list"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert listing.returncode == 0, listing.stderr
    row = next(line for line in listing.stdout.splitlines() if line.startswith(run["version"]))
    assert "refused" in row and f"{100 * decision['current']:.1f}%" in row


def test_a_sigkilled_run_leaves_the_current_version_and_the_next_run_succeeds(loop):
    stack, fake = loop["stack"], loop["fake"]
    r = stack.redis()
    with fake.lock:
        fake.projects[3] = {"id": 3, "title": "shapes, killed run", "label_config": CONFIG}
    for scene in scenes(20, 5, CLASSES):
        fake.annotate(fake.add_task(scene.png_bytes(), project=3), task_result(scene))
    stop_group(loop["trainer"])
    # A longer lock TTL for this run: between the kill and the look below, a loaded machine must not let
    # the lock expire first (3 s left too little margin once: the heartbeat's last beat may be ~1 s old).
    slow = start_training_worker(stack, "slow", OSPREY_TRAIN_STEPS="100000", OSPREY_TRAIN_LOCK_TTL_S="8")
    proc = subprocess.run([sys.executable, "-m", "backend.cli", "sync", "--project", "3"], cwd=REPO, env=stack.env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    serving = r.get(f"{stack.prefix}:model:source")
    current = (loop["model_dir"] / "registry" / "current").read_text()
    before = len(runs(stack))
    hook(stack, "START_TRAINING", 3)
    lock_key = f"{stack.prefix}:training:lock"
    owner = json.loads(wait_for(lambda: r.get(lock_key), 300, "the run to take the lock"))
    wait_for(lambda: list((loop["model_dir"] / "runs").glob("3-*/checkpoints/*")), 600,
             "the run's first fine-tuning checkpoint")
    stop_group(slow, signal.SIGKILL)  # mid-way: the worker; its job process (RQ's fork) dies with it
    wait_for(lambda: not os.path.exists(f"/proc/{owner['pid']}"), 10, "the job process to die with its worker")
    assert r.get(lock_key) is not None  # nobody released it ...
    wait_for(lambda: r.get(lock_key) is None, 30, "the lock to expire")  # ... it expired
    assert r.get(f"{stack.prefix}:model:source") == serving
    assert (loop["model_dir"] / "registry" / "current").read_text() == current
    assert len(runs(stack)) == before  # the killed run recorded nothing

    loop["trainer"] = start_training_worker(stack, "trainer-after-kill", OSPREY_TRAIN_STEPS="20")
    hook(stack, "START_TRAINING", 3)
    run = wait_run(stack, "3", before)
    assert run["status"] in ("promoted", "refused"), json.dumps(run, indent=1)
    assert (loop["model_dir"] / "registry" / run["version"] / "manifest.json").is_file()
