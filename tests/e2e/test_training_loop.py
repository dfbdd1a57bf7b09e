"""The learning loop against the real Label Studio 1.23.2: corrected annotations submitted in Label Studio
reach the store through its webhooks and API; "Start Training" (`POST /api/ml/{id}/train`) runs a
training on the `training` queue; the new version is evaluated, promoted, listed by
`GET /api/ml/{id}/versions`, and the predictions Label Studio gets afterwards carry it.

Also checked: on /setup the backend adds its secret to the webhook Label Studio created without
credentials (no hand edit), so the very first corrections are not refused.

The base version and the shapes world are those of tests/training/test_loop.py (demo-sized Osprey, CPU).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.backend.conftest import WEBHOOK_SECRET, Stack, wait_for
from tests.e2e.conftest import LabelStudio, start_stack
from tests.training import test_loop as world

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]


@pytest.fixture(scope="module")
def learning_backend(label_studio: LabelStudio, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    workdir = tmp_path_factory.mktemp("learning")
    from training.registry import Registry

    base = world.train_base(workdir / "data")
    stack = start_stack(workdir, label_studio, local_files=False,
                        OSPREY_MODEL=str(Registry(workdir / "data").path(base)),
                        OSPREY_TRAIN_MIN_CORRECTIONS="1000000", **world.TRAIN_ENV)
    trainer = world.start_training_worker(stack, "trainer")
    try:
        yield {"stack": stack, "base": base, "workdir": workdir}
    except BaseException:
        print(stack.tail())
        raise
    finally:
        world.stop_group(trainer)
        stack.close()


def _upload(ls: LabelStudio, project: int, scene, folder: Path) -> int:
    path = folder / f"scene-{scene.seed}-{scene.index}.png"
    path.write_bytes(scene.png_bytes())
    before = {t["id"] for t in ls.tasks(project)}
    ls.upload_image(project, path)
    (task,) = [t for t in ls.tasks(project) if t["id"] not in before]
    return task["id"]


def test_start_training_in_label_studio_promotes_a_new_version(label_studio: LabelStudio, learning_backend: dict,
                                                               tmp_path: Path) -> None:
    ls, stack, base = label_studio, learning_backend["stack"], learning_backend["base"]
    stack: Stack
    project = ls.create_project("osprey e2e learning loop", world.CONFIG)
    ml = ls.connect_backend(project, stack.base_url)
    assert ml["model_version"] == base

    # The webhook Label Studio made has no credentials; /setup (every backend listing calls it) adds ours.
    def signed() -> bool:
        ls.backends(project)
        hook = ls.backend_webhook(project, stack.base_url)
        return (hook.get("headers") or {}).get("X-Osprey-Webhook-Secret") == WEBHOOK_SECRET

    wait_for(signed, 60, "the backend to add its secret to Label Studio's webhook", interval=1.0)

    corrections = world.scenes(world.N_CORRECTIONS, 2, world.CLASSES)
    regions = 0
    for scene in corrections:
        task_id = _upload(ls, project, scene, tmp_path)
        ls.annotate(task_id, world.task_result(scene))  # Label Studio sends ANNOTATION_CREATED before answering
        regions += len(scene.objects)

    def synced() -> bool:
        from training.store import Store

        store = Store(model_dir=learning_backend["workdir"] / "data")
        try:
            return len(store.examples(str(project))) == regions
        finally:
            store.close()

    wait_for(synced, 600, "the webhooks' syncs to store every corrected region", interval=2.0)

    before = len(world.runs(stack))
    ls.call("POST", f"/api/ml/{ml['id']}/train", json={"use_ground_truth": False})  # 200, empty body
    run = world.wait_run(stack, str(project), before)
    assert run["job"] == f"{stack.prefix}-train-{project}" and "Start Training" in run["reason"], run
    assert run["status"] == "promoted", json.dumps(run, indent=1)
    assert run["candidate"]["per_label"][world.NEW] >= 0.9 and run["current"]["model_version"] == base
    new_version = run["version"]

    listed = ls.call("GET", f"/api/ml/{ml['id']}/versions")
    assert new_version in listed["versions"], listed

    # The next prediction Label Studio asks for comes from the new version.
    scene, k = next((s, k) for s in world.scenes(20, 3, world.CLASSES) for k, o in enumerate(s.objects)
                    if o.shape == world.NEW)
    task_id = _upload(ls, project, scene, tmp_path)
    region = world.task_result(scene)[k]
    data = ls.interactive(ml["id"], task_id, {"result": [region]})["data"]
    assert data["model_version"] == new_version, data
    labels = [lab for r in data["result"] if r.get("type") == "brushlabels" for lab in r["value"]["brushlabels"]]
    assert labels == [world.NEW], data
    wait_for(lambda: ls.call("GET", f"/api/ml/{ml['id']}")["model_version"] == new_version, 30,
             "Label Studio to show the new version on the model card", interval=1.0)
