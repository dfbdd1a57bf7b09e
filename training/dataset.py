"""Corrections -> Osprey instruction data, split by image, tokenised with the loss mask of the original.

Each `RegionExample` becomes single-region conversations in the exact prompt layout the engine serves
with (spec §1.5; so what is trained is what is asked): the category with the official category prompt,
one question per attribute, the short and detailed descriptions (the serving prompt, or with
`template_mix` a random instruction template of supplementary tables A13/A14), and optional Table A15
positive/negative yes/no questions from the label set. Osprey-724K-style JSON (spec §9.3) reads into the
same `Sample`s, so public data can be mixed in. Labels follow `preprocess_v1` (spec §9.2) to the token.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from osprey_core import conversation as conv
from osprey_core.tokenizer import IMAGE_TOKEN_INDEX, tokenizer_image_token

from .records import LabelSpace, RegionExample

IGNORE_INDEX = -100
TASKS = ("category", "attributes", "short", "detailed", "posneg")
SYSTEMS = {"osprey_v1": conv.SYSTEM_OSPREY_V1, "vicuna_v1": conv.SYSTEM_VICUNA_V1}
SHORT_SUFFIX = " Answer the question using a short phrase."  # the VG short-caption suffix
SINGLE_WORD_SUFFIX = " Answer the question using a single word or phrase."  # Osprey-724K short-form


class DatasetError(ValueError):
    """Training data is malformed or does not fit the label space."""


@dataclass(frozen=True)
class Sample:
    """One training conversation: an image, its region masks (COCO RLE, i-th `<mask><pos>` = i-th mask)
    and (question, answer) turns; the first question holds the `<image>` placeholder."""

    image: str
    image_key: str
    width: int
    height: int
    masks: tuple[dict[str, Any], ...]
    turns: tuple[tuple[str, str], ...]
    task: str = "category"

    def to_dict(self) -> dict[str, Any]:
        return {"image": self.image, "image_key": self.image_key, "width": self.width, "height": self.height,
                "masks": list(self.masks), "turns": [list(t) for t in self.turns], "task": self.task}


@dataclass
class Encoded:
    """Token ids (with -200 for the image) and labels (-100 where not supervised), same length."""

    input_ids: list[int]
    labels: list[int]
    sample: Sample


@dataclass
class EncodeStats:
    kept: int = 0
    mismatched: int = 0  # dropped like the original's "tokenization mismatch"
    too_long: int = 0
    by_task: dict[str, int] = field(default_factory=dict)


# --- questions ------------------------------------------------------------------------------------------


def _template(template: str) -> str:
    return conv.OVERVIEW + template.replace("<region>", conv.REGION)


def _description_question(detail: str, rng: random.Random, template_mix: float) -> str:
    if rng.random() >= template_mix:
        return conv.description_question(detail)
    if detail == "short":
        return _template(rng.choice(conv.SHORT_TEMPLATES)) + SHORT_SUFFIX
    # Table A13 item 10 lacks the region tag in the paper; a question must name its region.
    return _template(rng.choice([t for t in conv.DETAILED_TEMPLATES if "<region>" in t]))


def posneg_question(category: str, rng: random.Random) -> str:
    """A Table A15 question about `category` for one region."""
    return _template(rng.choice(conv.POSNEG_TEMPLATES).replace("<category>", category))


def region_samples(
    ex: RegionExample,
    labels: LabelSpace | None = None,
    tasks: Sequence[str] = TASKS,
    rng: random.Random | None = None,
    template_mix: float = 0.0,
    negatives: int = 1,
) -> list[Sample]:
    """The single-region conversations of one example (only the answers it has)."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise DatasetError(f"unknown tasks {unknown}; known: {', '.join(TASKS)}")
    rng = rng or random.Random(0)
    key = ex.image_sha256 or ex.image
    make = lambda q, a, task: Sample(ex.image, key, ex.width, ex.height, (ex.rle,), ((q, a),), task)  # noqa: E731
    out: list[Sample] = []
    if "category" in tasks and ex.category:
        out.append(make(conv.category_question(), ex.category, "category"))
    if "attributes" in tasks:
        for name, values in ex.attributes.items():
            if labels is not None and labels.attributes and name not in labels.attributes:
                continue
            if values:
                out.append(make(conv.attribute_question(name), ", ".join(values), "attributes"))
    if "short" in tasks and ex.short:
        out.append(make(_description_question("short", rng, template_mix), ex.short, "short"))
    if "detailed" in tasks and ex.detailed:
        out.append(make(_description_question("detailed", rng, template_mix), ex.detailed, "detailed"))
    if "posneg" in tasks and ex.category and labels is not None and labels.categories:
        out.append(make(posneg_question(ex.category, rng), "Yes", "posneg"))
        others = [c for c in labels.categories if c != ex.category]
        for c in rng.sample(others, min(negatives, len(others))):
            out.append(make(posneg_question(c, rng), "No", "posneg"))
    return out


def build_samples(
    examples: Iterable[RegionExample],
    labels: LabelSpace | None = None,
    tasks: Sequence[str] = TASKS,
    seed: int = 0,
    template_mix: float = 0.0,
    negatives: int = 1,
) -> list[Sample]:
    """All conversations of `examples`, in a seeded order (templates and negatives seeded too)."""
    rng = random.Random(seed)
    out: list[Sample] = []
    for ex in examples:
        if labels is not None and ex.category and labels.categories and ex.category not in labels.categories:
            raise DatasetError(f"region {ex.region_id or '?'} of {ex.image}: category {ex.category!r} is not in "
                               f"the label set ({', '.join(labels.categories)})")
        out += region_samples(ex, labels, tasks, rng, template_mix, negatives)
    rng.shuffle(out)
    return out


# --- split ----------------------------------------------------------------------------------------------


def _unit(seed: int, key: str) -> float:
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_by_image(examples: Sequence[RegionExample], held_out: float = 0.2, seed: int = 0
                   ) -> tuple[list[RegionExample], list[RegionExample]]:
    """(train, held-out): every region of one image on the same side.

    An image's side depends only on (seed, image hash), so it never moves when more corrections arrive
    and versions trained later are compared on the same held-out images.
    """
    if not 0.0 <= held_out < 1.0:
        raise DatasetError(f"held_out must be in [0, 1), got {held_out}")
    keys = sorted({ex.image_sha256 or ex.image for ex in examples})
    held = {k for k in keys if _unit(seed, k) < held_out}
    if held_out > 0 and not held and len(keys) >= 2:  # tiny sets: still hold one image out
        held = {min(keys, key=lambda k: _unit(seed, k))}
    train = [ex for ex in examples if (ex.image_sha256 or ex.image) not in held]
    test = [ex for ex in examples if (ex.image_sha256 or ex.image) in held]
    return train, test


# --- Osprey-724K-style JSON ---------------------------------------------------------------------------


_REGION_TAG = re.compile(r"<region(\d+)>")
_DESCRIPTION = re.compile(r"<.*>:\ (.*)")


def read_osprey_json(
    path: str | Path,
    image_root: str | Path | None = None,
    style: str = "conversation",
    seed: int = 0,
) -> list[Sample]:
    """An Osprey-724K file (a JSON list of entries with `file_name`, `height`, `width`, `annotation`,
    `conversations` or `description`) -> Samples, prompts built as the original datasets build them.

    `style`: "conversation" / "part_level" / "short_form" (region list intro; the last two add the
    single-word suffix), "posneg" (each `<regionK>` replaced in place by `<mask><pos>`). Entries with a
    `description` list become one detailed-description turn per region (random Table A13 template).
    """
    if style not in ("conversation", "part_level", "short_form", "posneg"):
        raise DatasetError(f"unknown style {style!r}")
    path = Path(path)
    try:
        entries = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DatasetError(f"cannot read {path}: {e}") from e
    if not isinstance(entries, list):
        raise DatasetError(f"{path}: expected a JSON list of entries")
    root = Path(image_root) if image_root is not None else path.parent / "images"
    rng = random.Random(seed)
    out: list[Sample] = []
    for n, entry in enumerate(entries):
        try:
            out += _entry_samples(entry, root, style, rng)
        except (KeyError, TypeError, ValueError) as e:
            raise DatasetError(f"{path}: entry {n} is malformed ({type(e).__name__}: {e})") from e
    return out


def _entry_samples(entry: dict[str, Any], root: Path, style: str, rng: random.Random) -> list[Sample]:
    name = str(entry["file_name"])
    image = str(root / name)
    w, h = int(entry["width"]), int(entry["height"])
    masks = tuple(_segmentation(a["segmentation"], h, w) for a in entry["annotation"])
    if not masks:
        return []
    if "description" in entry and not entry.get("conversations"):
        samples = []
        for k, text in enumerate(entry["description"]):
            m = _DESCRIPTION.match(text)
            answer = m.group(1) if m else text
            q = _template(rng.choice([t for t in conv.DETAILED_TEMPLATES if "<region>" in t]))
            samples.append(Sample(image, name, w, h, (masks[k],), ((q, answer),), "detailed"))
        return samples
    msgs = entry["conversations"]
    if len(msgs) < 2 or len(msgs) % 2:
        raise ValueError("conversations must alternate human/gpt turns")
    turns = []
    for i in range(0, len(msgs), 2):
        q, a = str(msgs[i]["value"]), str(msgs[i + 1]["value"])
        if style == "posneg":
            q = _REGION_TAG.sub(conv.REGION, q)
        else:
            q = q.replace("<", "").replace(">", "")
            if style in ("short_form", "part_level"):
                q += SINGLE_WORD_SUFFIX
        turns.append((q, a.replace("<", "").replace(">", "")))
    if style == "posneg":
        turns[0] = (conv.OVERVIEW + turns[0][0], turns[0][1])
        used = sum(q.count(conv.REGION) for q, _ in turns)
        masks = masks[:used]
    else:
        turns[0] = (conv.OVERVIEW + conv.multi_region_intro(len(masks)) + turns[0][0], turns[0][1])
    return [Sample(image, name, w, h, masks, tuple(turns), style)]


def _segmentation(seg: Any, h: int, w: int) -> dict[str, Any]:
    """COCO polygon list / uncompressed RLE / compressed RLE -> compressed RLE with str counts."""
    from pycocotools import mask as coco_mask

    if isinstance(seg, list):
        rle = coco_mask.merge(coco_mask.frPyObjects(seg, h, w))
    elif isinstance(seg, dict) and isinstance(seg.get("counts"), list):
        rle = coco_mask.frPyObjects(seg, h, w)
    elif isinstance(seg, dict) and isinstance(seg.get("counts"), str | bytes):
        return {"size": [int(v) for v in seg["size"]],
                "counts": seg["counts"].decode() if isinstance(seg["counts"], bytes) else seg["counts"]}
    else:
        raise ValueError("segmentation must be a polygon list or a COCO RLE dict")
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


# --- tokenisation and loss mask (spec §9.2) --------------------------------------------------------------


def render(sample: Sample, system: str = "osprey_v1") -> str:
    """The whole conversation as the TWO separator style renders it, every answer closed by `</s>`.

    Default system prompt: the serving one (`osprey_v1`), since our models are served with it;
    `vicuna_v1` is what the original trained with (spec §1.4)."""
    if system not in SYSTEMS:
        raise DatasetError(f"unknown system prompt {system!r}; known: {', '.join(SYSTEMS)}")
    render_turns = getattr(conv, "training_conversation", None)
    if render_turns is not None:
        return render_turns(list(sample.turns), system=SYSTEMS[system])
    return SYSTEMS[system] + " " + "".join(f"USER: {q} ASSISTANT: {a}</s>" for q, a in sample.turns)


def encode(sample: Sample, tokenizer, system: str = "osprey_v1", max_length: int = 2048,
           stats: EncodeStats | None = None) -> Encoded | None:
    """`preprocess_v1`: rounds split on `</s>`; in each, the instruction through "ASSISTANT: " (its
    token count - 2) and the BOS are ignored; the answer and its `</s>` are supervised. A sample whose
    summed round lengths disagree with its real length is dropped (None) and counted, as the original
    does; so is one longer than `max_length` tokens."""
    stats = stats if stats is not None else EncodeStats()
    text = render(sample, system)
    ids = tokenizer_image_token(text, tokenizer)
    labels = list(ids)
    pad = tokenizer.pad_token_id
    total = sum(1 for t in ids if t != pad)
    sep = " ASSISTANT: "
    cur = 1
    labels[:cur] = [IGNORE_INDEX] * cur
    for rou in text.split("</s>"):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        round_len = len(tokenizer_image_token(rou, tokenizer))
        instruction_len = len(tokenizer_image_token(parts[0] + sep, tokenizer)) - 2
        labels[cur : cur + instruction_len] = [IGNORE_INDEX] * len(labels[cur : cur + instruction_len])
        cur += round_len
    labels[cur:] = [IGNORE_INDEX] * len(labels[cur:])
    if cur != total:
        stats.mismatched += 1
        return None
    if len(ids) > max_length:
        stats.too_long += 1
        return None
    # The image placeholder and the region tokens are never targets (they sit in the instruction).
    mask_ids = {IMAGE_TOKEN_INDEX, *tokenizer.convert_tokens_to_ids(["<mask>", "<pos>"])}
    labels = [IGNORE_INDEX if t in mask_ids else lab for t, lab in zip(ids, labels, strict=True)]
    stats.kept += 1
    stats.by_task[sample.task] = stats.by_task.get(sample.task, 0) + 1
    return Encoded(ids, labels, sample)


def encode_all(samples: Iterable[Sample], tokenizer, system: str = "osprey_v1", max_length: int = 2048
               ) -> tuple[list[Encoded], EncodeStats]:
    stats = EncodeStats()
    out = [e for s in samples if (e := encode(s, tokenizer, system, max_length, stats)) is not None]
    return out, stats


def dataset_fingerprint(samples: Iterable[Sample]) -> str:
    """sha256 over the samples' content (images by key): what a version was trained on."""
    h = hashlib.sha256()
    for s in samples:
        h.update(json.dumps(s.to_dict(), sort_keys=True).encode())
    return h.hexdigest()
