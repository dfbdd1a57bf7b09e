"""What `make demo` imports into Label Studio and what `make screenshots` submits as the annotator's
corrections (backend/demo.py), from the demo world's generator tasks; the full run needs Label Studio
(`make screenshots`)."""

from __future__ import annotations

from pathlib import Path

from backend import demo
from training import demo_model, synthetic


def generated(tmp_path: Path, n: int = 3) -> tuple[list[dict], list[synthetic.Scene]]:
    scenes = list(synthetic.generate(n, seed=1001, shapes=demo_model.WORLD_SHAPES, **demo_model.WORLD))
    return [synthetic.labelstudio_task(s, f"/data/local-files/?d={tmp_path}/shapes/images/{i}.png")
            for i, s in enumerate(scenes)], scenes


def test_imported_tasks_carry_the_regions_unlabeled(tmp_path):
    tasks, scenes = generated(tmp_path)
    imported = demo.unlabeled_tasks(tasks, tmp_path)
    for task, scene in zip(imported, scenes, strict=True):
        assert task["data"]["image"].startswith("/data/local-files/?d=shapes/images/")
        (prediction,) = task["predictions"]
        assert prediction["model_version"] == demo.REGIONS_VERSION
        assert len(prediction["result"]) == len(scene.objects)
        assert all(r["type"] == "brushlabels" and r["value"]["brushlabels"] == [] for r in prediction["result"])


def test_the_corrections_name_each_regions_true_label_colour_and_caption(tmp_path):
    tasks, scenes = generated(tmp_path)
    for result, scene in zip(demo.answers(tasks), scenes, strict=True):
        by_name: dict[str, list[dict]] = {}
        for item in result:
            by_name.setdefault(item["from_name"], []).append(item)
        assert set(by_name) == {"category", "color", "caption"}
        labels = [r["value"]["brushlabels"] for r in by_name["category"]]
        assert labels == [[o.shape] for o in scene.objects]
        region_ids = {r["id"] for r in by_name["category"]}
        assert {r["id"] for r in by_name["color"]} == region_ids == {r["id"] for r in by_name["caption"]}
        colours = {r["id"]: r["value"]["choices"] for r in by_name["color"]}
        assert sorted(map(tuple, colours.values())) == sorted((o.colour,) for o in scene.objects)


def test_a_task_without_regions_gets_no_prediction_and_no_correction(tmp_path):
    task = {"data": {"image": f"/data/local-files/?d={tmp_path}/a.png"}}
    assert demo.unlabeled_tasks([task], tmp_path)[0]["predictions"] == []
    assert demo.answers([task]) == [[]]
