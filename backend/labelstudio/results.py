"""Engine outputs -> Label Studio result items (protocol notes §3).

Every item of one region reuses the region `id` (that is how Label Studio groups them), carries
`original_width`/`original_height`/`image_rotation`, and copies the region geometry into `value`, as the
frontend does for per-region results:

- `*Labels` tool (or a merged `<Labels>` result): one item, geometry + `{"<type>": [label]}` + `score`;
- plain tool + `<Labels>`: the geometry item (`type: "rectangle"`) and one `labels` item per `<Labels>`
  control, geometry + `{"labels": [label]}` + `score` (the split format);
- per-region `Choices`: geometry + `{"choices": [...]}` + `score` (probability of the top choice);
- per-region `TextArea`: geometry + `{"text": [...]}`;
- per-region `Taxonomy`: geometry + `{"taxonomy": [[root, ..., leaf]]}` + `score` (path probability).

Brush geometry is re-encoded from the mask (`format: "rle"`, alpha 255), so SAM masks and job payloads
need no Label Studio RLE.

Prediction score (`prediction`): the lowest score of any result item, i.e. of the least certain region
category / attribute / taxonomy path. Label Studio sorts tasks by it for review ("prediction score"
column, `prediction-score-min` uncertainty sampling), so one doubtful region is enough to surface a task.
It is None (Label Studio accepts null) when nothing was scored, e.g. only descriptions or no regions.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from backend.labelstudio.config import CategorySource
from backend.labelstudio.regions import RegionRef


def geometry_value(ref: RegionRef) -> dict[str, Any]:
    """The region geometry for `value`: the drawn shape as received, brush re-encoded from the mask."""
    if ref.geometry == "brush":
        return {"format": "rle", "rle": ref.region.to_ls_brush()}
    return dict(ref.value)


class RegionResults:
    """Collects the result items of one region; the geometry (a brush RLE can be large) is built once."""

    def __init__(self, ref: RegionRef) -> None:
        self.ref = ref
        self.geometry = geometry_value(ref)
        self.items: list[dict[str, Any]] = []

    def _add(self, from_name: str, type_: str, extra: dict[str, Any], score: float | None = None) -> None:
        ref = self.ref
        item: dict[str, Any] = {
            "id": ref.id,
            "from_name": from_name,
            "to_name": ref.to_name,
            "type": type_,
            "original_width": ref.original_width,
            "original_height": ref.original_height,
            "image_rotation": ref.image_rotation,
            "value": {**self.geometry, **extra},
        }
        if score is not None:
            item["score"] = float(score)
        self.items.append(item)

    def region(self, categories: Sequence[tuple[CategorySource, str, float]]) -> None:
        """The region itself with its predicted categories: (target control, label, score) each."""
        ref = self.ref
        merged = [c for c in categories if c[0].control == ref.from_name]
        if merged:
            source, label, score = merged[0]
            self._add(ref.from_name, ref.type, {ref.type: [str(label)]}, score)
        elif ref.type.endswith("labels"):  # nothing predicted: keep the annotator's labels
            self._add(ref.from_name, ref.type, {ref.type: list(ref.labels)})
        else:
            self._add(ref.from_name, ref.type, {})
        for source, label, score in categories:
            if source.control != ref.from_name:
                self._add(source.control, source.type, {source.type: [str(label)]}, score)

    def choices(self, control: str, values: Iterable[str], score: float | None = None) -> None:
        self._add(control, "choices", {"choices": [str(v) for v in values]}, score)

    def text(self, control: str, texts: Iterable[str]) -> None:
        self._add(control, "textarea", {"text": [str(t) for t in texts]})

    def taxonomy(self, control: str, path: Sequence[str], score: float | None = None) -> None:
        self._add(control, "taxonomy", {"taxonomy": [[str(p) for p in path]]}, score)


def prediction(result: list[dict[str, Any]], model_version: str) -> dict[str, Any]:
    """A whole prediction for one task; `score` is the lowest item score (see the module docstring)."""
    scores = [float(item["score"]) for item in result if item.get("score") is not None]
    return {"result": result, "score": min(scores) if scores else None, "model_version": str(model_version)}
