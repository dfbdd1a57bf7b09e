"""The neutral training record: one annotated region, as the store hands it to the dataset builder.

Tool-neutral on purpose: Label Studio sync, CVAT pulls, the synthetic generator and Osprey-724K-style
JSON all produce `RegionExample`s, and everything downstream (dataset, fine-tuning, evaluation) reads
only these.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class LabelSpace:
    """What a project asks for: its category labels and, per attribute, the allowed values."""

    categories: tuple[str, ...]
    attributes: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"categories": list(self.categories),
                "attributes": {k: list(v) for k, v in self.attributes.items()}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LabelSpace:
        return cls(tuple(data.get("categories", ())),
                   {k: tuple(v) for k, v in (data.get("attributes") or {}).items()})


@dataclass(frozen=True)
class RegionExample:
    """One region with its human answers.

    `image` is a local file path (the store keeps images content-addressed on disk, so training never
    depends on the annotation tool being up); `rle` is COCO RLE at the image's size
    (`{"size": [h, w], "counts": str}`).
    """

    image: str
    image_sha256: str
    width: int
    height: int
    rle: dict[str, Any]
    category: str | None = None
    attributes: dict[str, tuple[str, ...]] = field(default_factory=dict)
    short: str | None = None
    detailed: str | None = None
    region_id: str = ""
    task_id: str = ""
    # What the annotator was shown (so accepted vs corrected is known); None when nothing was predicted.
    predicted_category: str | None = None
    predicted_score: float | None = None
    predicted_version: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["attributes"] = {k: list(v) for k, v in self.attributes.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RegionExample:
        data = dict(data)
        data["attributes"] = {k: tuple(v) for k, v in (data.get("attributes") or {}).items()}
        return cls(**data)
