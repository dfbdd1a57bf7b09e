"""The learning loop on the shipped demo model: 50 corrected images with crosses (the class it never saw)
arrive through the real /webhook -> sync -> store, one retrain (the training settings `osprey run` uses with
the demo model), the gate promotes the new version, cross goes from ~0 to >= 90 % held-out accuracy, no
other shape drops more than 2 points, and the running prediction worker answers the next cross with the new
version.

Reuses the training issue's machinery (tests/training/test_loop.py: the stack, the fake Label Studio API,
webhook and run helpers); only the base differs: the committed models/demo/, not a model trained here.
"""

from __future__ import annotations

import json

import pytest

from backend.demo import answers
from tests.backend.test_sync import FakeLabelStudioAPI
from tests.training import test_loop as loop_tools
from training import demo_model, synthetic

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

N_CORRECTIONS = 50


def annotation(scene) -> list[dict]:
    """What an annotator submits after fixing the demo model's suggestion: every region's label, colour
    and caption (the Label Studio result the demo project's config produces)."""
    return answers([synthetic.labelstudio_task(scene, "unused")])[0]


def test_fifty_corrections_teach_the_demo_model_the_class_it_never_saw(tmp_path):
    model_dir = tmp_path / "data"
    base = demo_model.ensure_registered(model_dir)
    fake = FakeLabelStudioAPI(loop_tools.CONFIG)
    scenes = demo_model.new_class_scenes(N_CORRECTIONS, 4242)
    regions = sum(len(s.objects) for s in scenes)
    env = {**demo_model.DEMO_TRAINING_ENV, "OSPREY_TRAIN_LOCK_TTL_S": "3", "OSPREY_TRAIN_TICK_S": "3600",
           "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    from training.registry import Registry

    stack = loop_tools.make_stack(tmp_path, ls_url=fake.url, OSPREY_MODEL=str(Registry(model_dir).path(base)),
                                  OSPREY_TRAIN_MIN_CORRECTIONS=str(regions), **env)
    stack.fake = fake  # type: ignore[attr-defined]
    trainer = None
    try:
        stack.start_worker()
        stack.start_server()
        trainer = loop_tools.start_training_worker(stack, "trainer")
        before = len(loop_tools.runs(stack))
        loop_tools.submit(fake, stack, 1, [(s, annotation(s)) for s in scenes])
        run = loop_tools.wait_run(stack, "1", before, timeout=1800)
        assert run["status"] == "promoted", json.dumps(run, indent=1)
        cand, cur = run["candidate"]["per_label"], run["current"]["per_label"]
        assert cur[demo_model.NEW_CLASS] <= 0.1, cur
        assert cand[demo_model.NEW_CLASS] >= 0.9, cand
        for label in demo_model.TRAIN_SHAPES:
            if cur.get(label) is not None and cand.get(label) is not None:
                assert cand[label] >= cur[label] - 0.02, (label, cand, cur)
        held_out = next((s, k) for s in demo_model.new_class_scenes(5, 5151) for k, o in enumerate(s.objects)
                        if o.shape == demo_model.NEW_CLASS)
        answer = loop_tools.predict_one(stack, *held_out)
        assert answer["model_version"] == run["version"] != base, answer
        labels = [lab for item in answer["result"] if item.get("type") == "brushlabels"
                  for lab in item["value"]["brushlabels"]]
        assert labels == [demo_model.NEW_CLASS], answer
    except BaseException:
        print(stack.tail())
        raise
    finally:
        loop_tools.stop_group(trainer)
        stack.close()
        fake.close()
