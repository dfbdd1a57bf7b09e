"""Neutral answers -> Label Studio result items and predictions (protocol notes §3).

`prediction_from_answers(answers, specs, plan, model_version)` is the one way answers become a Label Studio
prediction, in the web process (interactive, batch within the budget) and in write-back
(`prediction_from_output` on a published job output).

Every item of one region reuses the region `id` (that is how Label Studio groups them), carries
`original_width`/`original_height`/`image_rotation`, and copies the region geometry into `value`, as the
frontend does for per-region results:

- `*Labels` tool (or a merged `<Labels>` result): one item, geometry + `{"<type>": [label]}` + `score`;
- plain tool + `<Labels>`: the geometry item (`type: "rectangle"`) and one `labels` item per `<Labels>`
  control, geometry + `{"labels": [label]}` + `score` (the split format);
- per-region `Choices`: geometry + `{"choices": [...]}` + `score` (probability of the top choice);
- per-region `TextArea`: geometry + `{"text": [...]}`;
- per-region `Taxonomy`: geometry + `{"taxonomy": [[root, ..., leaf]]}` + `score` (path probability).

Geometry comes back as received; a mask that SAM made (`RegionAnswer.mask`) becomes a brush region of the
plan's mask target (`format: "rle"`, alpha 255) at the original image size. An auto-labeling proposal for a
polygon or rectangle tool carries its outline in pixels (`meta["shape"]`, backend/service/autolabel.py);
it becomes `{"points": [[x%, y%], ...], "closed": true}` or `{"x", "y", "width", "height", "rotation": 0}`
in percent of the original size.

`keep` mode (`output["disagreements"]`): the kept label's item also gets `meta` = `{"text": ["model: <label>
(<score>)"], "model_label", "model_score", "agrees"}`, so the annotator sees in the region's details what
the model would have picked. Label Studio 1.23 keeps `meta` on result items (protocol notes §3; its
prediction validation ignores it, tests/e2e/test_autolabel.py posts such a prediction).

Prediction score (`prediction`): the lowest score of any result item, i.e. of the least certain region
category / attribute / taxonomy path. Label Studio sorts tasks by it for review ("prediction score"
column, `prediction-score-min` uncertainty sampling), so one doubtful region is enough to surface a task.
It is None (Label Studio accepts null) when nothing was scored, e.g. only descriptions or no regions.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from backend.service.tasks import Plan, RegionAnswer, RegionSpec, TaskError
from osprey_core.regions import Region


class RegionResults:
    """Collects the result items of one region; the geometry (a brush RLE can be large) is built once."""

    def __init__(self, region_id: str, spec: RegionSpec, from_name: str, type_: str, geometry: dict[str, Any]):
        self.id, self.spec, self.from_name, self.type = region_id, spec, from_name, type_
        self.geometry = geometry
        self.items: list[dict[str, Any]] = []

    def _add(self, from_name: str, type_: str, extra: dict[str, Any], score: float | None = None) -> None:
        meta = self.spec.meta
        item: dict[str, Any] = {
            "id": self.id,
            "from_name": from_name,
            "to_name": meta["to_name"],
            "type": type_,
            "original_width": self.spec.width,
            "original_height": self.spec.height,
            "image_rotation": meta.get("image_rotation", 0.0),
            "value": {**self.geometry, **extra},
        }
        if score is not None:
            item["score"] = float(score)
        self.items.append(item)

    def region(self, categories: Sequence[tuple[str, str, float]], labels: Sequence[str]) -> None:
        """The region itself with its predicted categories: (category control, label, score) each."""
        merged = [c for c in categories if c[0] == self.from_name]
        if merged:
            _, label, score = merged[0]
            self._add(self.from_name, self.type, {self.type: [str(label)]}, score)
        elif self.type.endswith("labels"):  # nothing predicted: keep the annotator's labels
            self._add(self.from_name, self.type, {self.type: list(labels)})
        else:
            self._add(self.from_name, self.type, {})
        for control, label, score in categories:
            if control != self.from_name:  # split format: a `labels` result of a <Labels> control
                self._add(control, "labels", {"labels": [str(label)]}, score)

    def choices(self, control: str, values: Iterable[str], score: float | None = None) -> None:
        self._add(control, "choices", {"choices": [str(v) for v in values]}, score)

    def text(self, control: str, texts: Iterable[str]) -> None:
        self._add(control, "textarea", {"text": [str(t) for t in texts]})

    def taxonomy(self, control: str, path: Sequence[str], score: float | None = None) -> None:
        self._add(control, "taxonomy", {"taxonomy": [[str(p) for p in path]]}, score)


def _region_results(answer: RegionAnswer, specs: dict[str, RegionSpec], plan: Plan) -> RegionResults:
    if not answer.sources or answer.sources[0] not in specs:
        raise TaskError(f"answer {answer.id!r} names no region of the request")
    spec = specs[answer.sources[0]]
    if answer.mask is not None:
        if plan.mask_target is None:
            raise TaskError(f"answer {answer.id!r} carries a mask but the plan has no mask target")
        target = plan.mask_target.meta
        rle = Region.from_coco_rle(answer.mask, spec.height, spec.width, allow_empty=True).to_ls_brush()
        return RegionResults(answer.id, spec, target["from_name"], target["type"], {"format": "rle", "rle": rle})
    meta = spec.meta
    if spec.kind == "brush_rle":
        geometry = {"format": "rle", "rle": spec.geometry["rle"]}
    elif "shape" in meta:
        geometry = shape_value(meta["shape"], spec.width, spec.height)
    else:
        geometry = dict(meta["value"])
    return RegionResults(answer.id, spec, meta["from_name"], meta["type"], geometry)


def shape_value(shape: dict[str, Any], width: int, height: int) -> dict[str, Any]:
    """A neutral polygon or box in pixels (backend/service/geometry.py `outline`) as a Label Studio value."""
    def px(v: float, size: int) -> float:
        return round(min(max(float(v) / size * 100, 0.0), 100.0), 4)

    if shape.get("kind") == "polygon":
        return {"points": [[px(x, width), px(y, height)] for x, y in shape["points"]], "closed": True}
    if shape.get("kind") == "box":
        return {"x": px(shape["x"], width), "y": px(shape["y"], height), "width": px(shape["width"], width),
                "height": px(shape["height"], height), "rotation": 0}
    raise TaskError(f"a region's shape must be a polygon or a box, got {shape.get('kind')!r}")


def result_items(answers: Sequence[RegionAnswer], specs: Sequence[RegionSpec], plan: Plan) -> list[dict[str, Any]]:
    """Label Studio result items of `answers` to the regions `specs` (made by backend/labelstudio/regions.py)."""
    by_id = {s.id: s for s in specs}
    items: list[dict[str, Any]] = []
    for answer in answers:
        out = _region_results(answer, by_id, plan)
        out.region(answer.categories, by_id[answer.sources[0]].labels)
        for name, picked, score in answer.attributes:
            out.choices(name, picked, score)
        for name, text in answer.descriptions:
            out.text(name, [text])
        for name, path, score in answer.taxonomy:
            out.taxonomy(name, path, score)
        items.extend(out.items)
    return items


def prediction(result: list[dict[str, Any]], model_version: str) -> dict[str, Any]:
    """A whole prediction for one task; `score` is the lowest item score (see the module docstring)."""
    scores = [float(item["score"]) for item in result if item.get("score") is not None]
    return {"result": result, "score": min(scores) if scores else None, "model_version": str(model_version)}


def prediction_from_answers(answers: Sequence[RegionAnswer], specs: Sequence[RegionSpec], plan: Plan,
                            model_version: str) -> dict[str, Any]:
    """The Label Studio prediction of one task from its neutral answers."""
    return prediction(result_items(answers, specs, plan), model_version)


def prediction_from_output(output: dict[str, Any]) -> dict[str, Any]:
    """The prediction of a successful job output (backend/queue/handlers.py `predict_job`), which carries
    the answers with the regions and plan they answer."""
    answers = [RegionAnswer.from_dict(a) for a in output["answers"]]
    specs = [RegionSpec.from_dict(r) for r in output["regions"]]
    result = result_items(answers, specs, Plan.from_dict(output["plan"]))
    add_disagreements(result, output.get("disagreements") or ())
    return prediction(result, output["model_version"])


def add_disagreements(result: list[dict[str, Any]], disagreements: Iterable[dict[str, Any]]) -> None:
    """`keep` mode: the model's own pick as `meta` of the item that holds the kept label (see above)."""
    for d in disagreements:
        item = next((i for i in result if i["id"] == d["region"] and i["from_name"] == d["category"]), None)
        if item is None:
            continue
        score = float(d["model_score"])
        item["meta"] = {"text": [f"model: {d['model_label']} ({score:.2f})"], "model_label": str(d["model_label"]),
                        "model_score": score, "agrees": d["model_label"] == d["kept"]}
