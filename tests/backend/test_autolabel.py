"""Auto-labeling: proposals through the one neutral predict path with the real (tiny, random-weight) engine;
the `osprey autolabel` COCO output loaded by pycocotools; a run killed with SIGKILL halfway resumes without
redoing finished images; `keep` mode keeps the annotator's label and reports the model's view."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backend.cli_autolabel import build_plan, parse_attribute, parse_labels
from backend.labelstudio.results import prediction_from_answers
from backend.service.autolabel import (
    AutolabelError,
    AutolabelOptions,
    autolabel_image,
    label_mode,
    predict_keep,
    worker_specs,
)
from backend.service.predict import predict_regions
from backend.service.tasks import Category, MaskTarget, Plan, RegionSpec
from osprey_core.proposals import ClassicalProposer, Proposal
from osprey_core.regions import Region

REPO = Path(__file__).resolve().parents[2]
LABELS = ["circle", "square", "triangle"]


def shapes_image(seed: int, size: int = 96) -> np.ndarray:
    """Three flat blocks of distinct colours on grey (the proposer finds each as one object)."""
    rng = np.random.default_rng(seed)
    img = np.full((size, size, 3), 200, np.uint8)
    for k, colour in enumerate([(220, 30, 30), (30, 70, 220), (30, 160, 50)]):
        x, y = int(rng.integers(4, size // 2 - 8)) + (k % 2) * size // 2, int(rng.integers(4, size // 3)) + k * 28
        img[y:y + 18, x:x + 18] = colour
    return img


@pytest.fixture(scope="module")
def engine():
    from osprey_core import load_engine

    return load_engine("tiny", max_new_tokens=4)


def plan(with_target: bool = False) -> Plan:
    base = build_plan(LABELS, [parse_attribute("color=red,green,blue")], "short")
    if not with_target:
        return base
    return Plan(base.categories, base.attributes, base.descriptions,
                mask_target=MaskTarget(("category",), ("brush",), {"from_name": "category", "type": "brushlabels"}))


def test_autolabel_image_answers_every_proposal(engine):
    img = shapes_image(0)
    result = autolabel_image(engine, img, plan(), ClassicalProposer(), AutolabelOptions(min_area=0.01))
    assert len(result.proposals) == 3
    assert [a.sources[0] for a in result.answers] == [s.id for s in result.specs]
    for spec, answer, proposal in zip(result.specs, result.answers, result.proposals, strict=True):
        assert spec.geometry["kind"] == "rle" and spec.size == (96, 96)
        assert Region.from_coco_rle({k: spec.geometry[k] for k in ("size", "counts")}) == proposal.region
        assert spec.meta["proposal_score"] == proposal.score
        [(cat, label, score)] = answer.categories
        assert cat == "category" and label in LABELS and 0 < score <= 1
        [(name, values, _)] = answer.attributes
        assert name == "color" and values[0] in ("red", "green", "blue")
        [(caption, text)] = answer.descriptions
        assert caption == "caption" and isinstance(text, str)
    # The same answers as predicting the proposals as if they had been drawn.
    again = predict_regions(engine, img, plan(), result.specs)
    assert [a.to_dict() for a in again] == [a.to_dict() for a in result.answers]


def test_label_studio_brush_regions_with_scores(engine):
    img = shapes_image(1)
    p = plan(with_target=True)
    meta = {"from_name": "category", "to_name": "image", "type": "brushlabels", "image_rotation": 0.0}
    options = AutolabelOptions(min_area=0.01, geometry="brush_rle", meta=meta)
    result = autolabel_image(engine, img, p, ClassicalProposer(), options)
    pred = prediction_from_answers(result.answers, result.specs, p, engine.model_version)
    regions = [r for r in pred["result"] if r["type"] == "brushlabels"]
    assert len(regions) == 3 and pred["score"] is not None
    for r in regions:
        assert r["value"]["format"] == "rle" and r["value"]["rle"] and r["value"]["brushlabels"][0] in LABELS
        assert 0 < r["score"] <= 1 and r["original_width"] == 96
        mask = Region.from_ls_brush(r["value"]["rle"], 96, 96)
        assert mask.area > 100


def test_worker_specs_build_the_proposer_once():
    class Runtime:
        refiner = None
        settings = None

    rt = Runtime()
    opts = AutolabelOptions(min_area=0.01, max_regions=2).to_dict()
    specs = worker_specs(rt, shapes_image(2), plan(), opts)
    assert len(specs) == 2 and all(s.categories == ("category",) for s in specs)
    first = rt._osprey_proposer
    worker_specs(rt, shapes_image(3), plan(), opts)
    assert rt._osprey_proposer is first


def test_options_from_settings_and_extra_params():
    class S:
        osprey_autolabel = True
        osprey_autolabel_max_regions = 12
        osprey_label_mode = "suggest"

    assert AutolabelOptions.from_settings(S()).max_regions == 12
    assert AutolabelOptions.from_settings(S(), {"autolabel": False}).enabled is False
    assert AutolabelOptions.from_settings(S(), {"autolabel": {"max_regions": 3}}).max_regions == 3
    assert AutolabelOptions.from_dict(AutolabelOptions(meta={"a": 1}).to_dict()).meta == {"a": 1}
    with pytest.raises(AutolabelError, match="unknown autolabel option"):
        AutolabelOptions.from_settings(S(), {"autolabel": {"max_region": 3}})
    with pytest.raises(AutolabelError, match="true, false or an object"):
        AutolabelOptions.from_settings(S(), {"autolabel": "yes"})
    with pytest.raises(AutolabelError):
        AutolabelOptions(max_regions=0)
    assert label_mode(S()) == "suggest" and label_mode(S(), {"label_mode": "keep"}) == "keep"
    with pytest.raises(AutolabelError, match="label_mode"):
        label_mode(S(), {"label_mode": "replace"})
    with pytest.raises(AutolabelError):
        parse_attribute("color=red")
    assert parse_labels(" a, b ,a,,") == ["a", "b"]


def test_keep_mode_keeps_the_annotators_label_and_reports_the_model(engine):
    img = shapes_image(4)
    region = ClassicalProposer(filter=None).propose(img)[0].region
    rle = region.to_coco_rle()
    p = Plan(categories=(Category("category", tuple(LABELS)),), attributes=plan().attributes)
    suggested = predict_regions(engine, img, p, [RegionSpec("r1", {"kind": "rle", **rle}, 96, 96,
                                                            categories=("category",))])
    model_label, model_score = suggested[0].categories[0][1:]
    given = next(label for label in LABELS if label != model_label)
    spec = RegionSpec("r1", {"kind": "rle", **rle}, 96, 96, labels=(given,), categories=("category",))
    answers, disagreements = predict_keep(engine, img, p, [spec])
    [(cat, label, score)] = answers[0].categories
    assert (cat, label) == ("category", given) and score < model_score
    assert answers[0].attributes == suggested[0].attributes
    [d] = disagreements
    assert (d.kept, d.model_label, d.agrees) == (given, model_label, False)
    assert d.model_score == pytest.approx(model_score) and d.kept_score == pytest.approx(score)


# ---- the CLI --------------------------------------------------------------------------------------------


def write_images(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"img{i:02d}.png"
        Image.fromarray(shapes_image(10 + i)).save(path)
        paths.append(path)
    return paths


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "backend.cli_autolabel", *args, "--labels", ",".join(LABELS),
            "--attribute", "color=red,green,blue", "--describe", "short", "--model", "tiny",
            "--max-new-tokens", "3", "--min-area", "0.01", "--no-progress"]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def test_cli_writes_coco_that_pycocotools_loads_and_skips_a_bad_image(tmp_path):
    from pycocotools.coco import COCO

    write_images(tmp_path / "images", 2)
    (tmp_path / "images" / "broken.png").write_bytes(b"\x89PNG not really")
    out = tmp_path / "coco.json"
    run = subprocess.run(cli(str(tmp_path / "images"), "--out", str(out)), env=env(), capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "skipped" in run.stderr and "broken.png" in run.stderr
    coco = COCO(str(out))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == LABELS
    assert len(coco.getImgIds()) == 2 and len(coco.getAnnIds()) == 6
    for ann in coco.loadAnns(coco.getAnnIds()):
        mask = coco.annToMask(ann)
        assert mask.sum() == ann["area"] > 0
        assert ann["attributes"]["color"] in ("red", "green", "blue") and isinstance(ann["caption"], str)
        assert 0 < ann["score"] <= 1 and ann["category_id"] in coco.getCatIds()
    assert json.loads(out.read_text())["info"]["skipped"][0]["file_name"].endswith("broken.png")
    assert not (tmp_path / "coco.json.partial.jsonl").exists()


def test_cli_resumes_after_sigkill_halfway(tmp_path):
    write_images(tmp_path / "images", 6)
    out = tmp_path / "coco.json"
    journal = tmp_path / "coco.json.partial.jsonl"
    proc = subprocess.Popen(cli(str(tmp_path / "images"), "--out", str(out)), env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 500
        while time.monotonic() < deadline and proc.poll() is None:
            if journal.exists() and journal.read_bytes().count(b"\n") >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"finished before it could be killed: {proc.stderr.read()}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not out.exists()
    done_first = [json.loads(line) for line in journal.read_text().splitlines() if line.strip()]
    assert 2 <= len(done_first) < 6
    run = subprocess.run(cli(str(tmp_path / "images"), "--out", str(out)), env=env(), capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert f"resuming: {len(done_first)} image(s) already done" in run.stderr
    doc = json.loads(out.read_text())
    names = [im["file_name"] for im in doc["images"]]
    assert sorted(Path(n).name for n in names) == [f"img{i:02d}.png" for i in range(6)]
    assert len({a["id"] for a in doc["annotations"]}) == len(doc["annotations"]) == 18
    # The images finished before the kill keep exactly what was recorded then.
    by_file = {im["file_name"]: im["id"] for im in doc["images"]}
    for rec in done_first:
        kept = [a for a in doc["annotations"] if a["image_id"] == by_file[rec["file_name"]]]
        assert [a["segmentation"] for a in kept] == [a["segmentation"] for a in rec["annotations"]]
        assert [a["score"] for a in kept] == [a["score"] for a in rec["annotations"]]


def test_proposal_without_objects_gives_an_empty_image_record(engine, tmp_path):
    class Nothing:
        def propose(self, image):
            return []

    result = autolabel_image(engine, np.full((32, 32, 3), 9, np.uint8), plan(), Nothing())
    assert result.answers == [] and result.specs == []

    class One:
        def propose(self, image):
            m = np.zeros((32, 32), bool)
            m[4:20, 4:20] = True
            return [Proposal(Region(m), 0.5)]

    assert len(autolabel_image(engine, np.full((32, 32, 3), 9, np.uint8), plan(), One()).answers) == 1
