"""Auto-labeling: proposals through the one neutral predict path with the real (tiny, random-weight) engine;
Label Studio configs without a brush get the proposals as polygons or boxes with the same answers; the
`osprey autolabel` COCO output loaded by pycocotools; a run killed with SIGKILL halfway resumes without
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
from backend.labelstudio.autolabel import autolabel_plan, found_nothing, region_tool, why_not
from backend.labelstudio.config import parse_label_config
from backend.labelstudio.results import add_disagreements, prediction_from_answers, prediction_from_output
from backend.service.autolabel import (
    AutolabelError,
    AutolabelOptions,
    autolabel_image,
    label_mode,
    predict_keep,
    worker_specs,
)
from backend.service.geometry import outline
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


# ---- Label Studio configs without a brush: polygons and boxes ------------------------------------------

TOOLS = {
    "brush": '<BrushLabels name="category" toName="image">{labels}</BrushLabels>',
    "polygon": '<PolygonLabels name="category" toName="image">{labels}</PolygonLabels>',
    "rectangle": '<RectangleLabels name="category" toName="image">{labels}</RectangleLabels>',
    "split": '<Rectangle name="box" toName="image"/><Labels name="category" toName="image">{labels}</Labels>',
    "keypoint": '<KeyPointLabels name="category" toName="image">{labels}</KeyPointLabels>',
}


def ls_config(*tools: str) -> str:
    labels = "".join(f'<Label value="{v}"/>' for v in LABELS)
    body = "".join(TOOLS[t].format(labels=labels) for t in tools)
    return (f'<View><Image name="image" value="$image"/>{body}<Choices name="color" toName="image" perRegion="true">'
            '<Choice value="red"/><Choice value="green"/><Choice value="blue"/></Choices></View>')


class Autolabel:
    """Settings with auto-labeling on (what the web process reads) and a worker runtime without SAM."""

    osprey_autolabel = True
    osprey_autolabel_max_regions = 32
    refiner = None
    settings = None


def ls_prediction(engine, config: str, img: np.ndarray) -> tuple[dict, list[RegionSpec]]:
    """A region-less Label Studio task end to end, as web process and worker run it (JSON in between)."""
    ls_plan = parse_label_config(config)
    job_plan = autolabel_plan(ls_plan, ls_plan.to_plan().to_dict(),
                              Autolabel(), {"autolabel": {"min_area": 0.01}})
    job_plan = json.loads(json.dumps(job_plan))
    neutral = Plan.from_dict(job_plan)
    specs = worker_specs(Autolabel(), img, neutral, job_plan["autolabel"])
    answers = predict_regions(engine, img, neutral, specs)
    output = json.loads(json.dumps({"ok": True, "answers": [a.to_dict() for a in answers],
                                    "regions": [s.to_dict() for s in specs], "plan": job_plan,
                                    "model_version": engine.model_version}))
    return prediction_from_output(output), specs


def answers_of(prediction: dict) -> list[tuple]:
    """Per region: (label, score) of the category and (choice, score) of the attribute."""
    by_id: dict[str, dict] = {}
    for item in prediction["result"]:
        by_id.setdefault(item["id"], {})[item["from_name"]] = item
    out = []
    for items in by_id.values():
        cat, color = items["category"], items["color"]
        label = next(v for k, v in cat["value"].items() if k.endswith("labels"))
        out.append((label, round(cat["score"], 6), tuple(color["value"]["choices"]), round(color["score"], 6)))
    return out


def test_polygon_and_rectangle_configs_get_the_proposals_with_the_brush_answers(engine):
    from label_studio_sdk.label_interface import LabelInterface

    img = shapes_image(1)
    brush, _ = ls_prediction(engine, ls_config("brush"), img)
    assert len(answers_of(brush)) == 3
    for tool, type_ in (("polygon", "polygonlabels"), ("rectangle", "rectanglelabels"), ("split", "rectangle")):
        config = ls_config(tool)
        pred, specs = ls_prediction(engine, config, img)
        assert LabelInterface(config).validate_prediction(pred, return_errors=True) == []
        assert answers_of(pred) == answers_of(brush)  # the model saw the same masks
        assert pred["score"] == brush["score"] and pred["model_version"] == engine.model_version
        shapes = [i for i in pred["result"] if i["type"] == type_]
        assert len(shapes) == 3
        for item, spec in zip(shapes, specs, strict=True):
            mask = Region.from_coco_rle({k: spec.geometry[k] for k in ("size", "counts")})
            value = item["value"]
            if tool == "polygon":
                assert value["closed"] is True and len(value["points"]) >= 3
                drawn = Region.from_ls_polygon(value["points"], 96, 96)
                assert (drawn.mask & mask.mask).sum() / (drawn.mask | mask.mask).sum() > 0.9
            else:
                x0, y0, x1, y1 = mask.bbox
                assert (value["x"], value["y"], value["width"], value["height"], value["rotation"]) == pytest.approx(
                    (x0 / 0.96, y0 / 0.96, (x1 - x0) / 0.96, (y1 - y0) / 0.96, 0), abs=1e-4)  # 4 decimals
            # every item of the region carries the same geometry (Label Studio's per-region format)
            assert all({k: i["value"][k] for k in ("points", "x") if k in value} ==
                       {k: value[k] for k in ("points", "x") if k in value}
                       for i in pred["result"] if i["id"] == item["id"])
        if tool == "split":  # a plain Rectangle takes its category from <Labels>, as a `labels` item
            assert {i["type"] for i in pred["result"]} == {"rectangle", "labels", "choices"}


def test_region_tool_prefers_brush_then_polygon_then_rectangle():
    def tool(*tools: str) -> str | None:
        found = region_tool(parse_label_config(ls_config(*tools)))
        return None if found is None else found.type

    assert tool("rectangle", "polygon", "brush") == "brushlabels"
    assert tool("rectangle", "polygon") == "polygonlabels"
    assert tool("keypoint", "split") == "rectangle"
    plan_ = parse_label_config(ls_config("keypoint"))
    assert tool("keypoint") is None
    assert autolabel_plan(plan_, plan_.to_plan().to_dict(), Autolabel()) is None
    assert "no Brush, Polygon or Rectangle tool" in why_not(plan_, Autolabel())


def test_outline_of_a_mask_with_a_hole_and_two_parts():
    m = np.zeros((60, 80), bool)
    m[0:30, 0:30] = True  # touches the image border
    m[10:20, 10:20] = False  # a hole: not the outer contour
    m[40:45, 50:55] = True  # a smaller second part: dropped
    poly = outline(Region(m), "polygon")
    filled = Region.from_polygon(poly["points"], 80, 60)
    assert filled.bbox == (0, 0, 30, 30) and filled.area == 900
    assert outline(Region(m), "box") == {"kind": "box", "x": 0.0, "y": 0.0, "width": 55.0, "height": 45.0,
                                         "rotation": 0.0}
    line = np.zeros((10, 10), bool)
    line[3, 2:9] = True  # one pixel high
    assert Region.from_polygon(outline(Region(line), "polygon")["points"], 10, 10) == Region(line)


def test_an_image_without_objects_is_a_real_empty_answer(engine):
    flat = np.full((64, 64, 3), 128, np.uint8)  # one segment, the whole image: above max_area
    pred, specs = ls_prediction(engine, ls_config("polygon"), flat)
    assert specs == [] and pred == {"result": [], "score": None, "model_version": engine.model_version}
    plan_ = parse_label_config(ls_config("polygon"))
    job_plan = autolabel_plan(plan_, plan_.to_plan().to_dict(), Autolabel())
    assert found_nothing({"ok": True, "answers": [], "regions": [], "plan": job_plan})
    assert not found_nothing({"ok": True, "answers": [], "regions": [{"id": "r1"}], "plan": job_plan})  # drawn
    assert not found_nothing({"ok": True, "answers": [], "regions": [], "plan": plan_.to_plan().to_dict()})


def test_keep_mode_disagreement_goes_into_the_items_meta():
    result = [{"id": "r1", "from_name": "category", "value": {"brushlabels": ["cat"]}, "score": 0.2},
              {"id": "r1", "from_name": "color", "value": {"choices": ["red"]}}]
    add_disagreements(result, [{"region": "r1", "category": "category", "kept": "cat", "kept_score": 0.2,
                                "model_label": "dog", "model_score": 0.7}])
    assert result[0]["meta"] == {"text": ["model: dog (0.70)"], "model_label": "dog", "model_score": 0.7,
                                 "agrees": False}
    assert "meta" not in result[1]


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
