"""Scoring label sets safely: any size up to `MAX_LABELS` in bounded chunks, and no label text read as a token.

Chunks. The engine scores every region x every candidate in one packed forward whose attention mask grows
with the square of the candidates' total token count (3,000 labels: a 300 MB allocation; 100,000: 9 GB).
Here a label set is cut into chunks of at most `CHUNK_LABELS` labels and `CHUNK_CHARS` characters, each
scored by its own engine call, and the per-label log-likelihoods are merged into one softmax with
`RegionEngine.merge_classifications` -- the same distribution as one call, with memory bounded by the chunk.
Above `MAX_LABELS` labels a set is refused (`LabelSetError`, 422) before any model work.

Special tokens. Label text and attribute names are spliced into prompts; a label `<image>` became an image
placeholder (IndexError in the worker) and `</s>`, `<mask>`, `<pos>`... would be read as control tokens.
`model_text` breaks every tag-shaped `<word>` / `</word>` by a space after `<` ("<image>" -> "< image>"),
which tokenizes as ordinary text; the mapping back keeps the label the user sees unchanged in the answer,
and a collision with another label's text is made unique, so distinct labels stay distinct.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from backend.errors import InputError

MAX_LABELS = 5_000  # candidates in one label set (a category, an attribute, a taxonomy level)
MAX_LABEL_CHARS = 500  # characters of one candidate label
CHUNK_LABELS = 128
CHUNK_CHARS = 4_096

_TAG = re.compile(r"<(?=/?[^\s<>]*>)")


class LabelSetError(InputError):
    """A label set is too large, or a label is empty or too long, to be scored."""


@dataclass(frozen=True)
class Scored:
    """A classification in the labels the user gave (not the model's neutralised text)."""

    label: str
    score: float
    scores: dict[str, float]


def model_text(text: str) -> str:
    """`text` with every tag-shaped `<...>` broken, so the tokenizer sees plain characters."""
    return _TAG.sub("< ", text)


def model_texts(labels: Sequence[str]) -> dict[str, str]:
    """Label -> the text the model scores, injective (a collision gets a numbered suffix)."""
    out: dict[str, str] = {}
    used: set[str] = set(labels)  # an unchanged label keeps its own text
    for label in labels:
        text = model_text(label)
        if text != label:
            n = 2
            candidate = text
            while candidate in used:
                candidate = f"{text} ({n})"
                n += 1
            text = candidate
            used.add(text)
        out[label] = text
    return out


def check_label_set(labels: Sequence[str], what: str) -> list[str]:
    """Unique labels in order; `LabelSetError` when the set cannot be scored."""
    unique = list(dict.fromkeys(labels))
    if len(unique) > MAX_LABELS:
        raise LabelSetError(f"{what} has {len(unique)} labels, above the limit of {MAX_LABELS}")
    for label in unique:
        if not isinstance(label, str) or not label.strip():
            raise LabelSetError(f"{what} has an empty label")
        if len(label) > MAX_LABEL_CHARS:
            raise LabelSetError(f"{what} has a label of {len(label)} characters, above the limit of {MAX_LABEL_CHARS}")
    return unique


def chunks(labels: Sequence[str]) -> list[list[str]]:
    """Consecutive chunks of at most CHUNK_LABELS labels and CHUNK_CHARS characters (at least one label)."""
    out: list[list[str]] = []
    current: list[str] = []
    chars = 0
    for label in labels:
        if current and (len(current) >= CHUNK_LABELS or chars + len(label) > CHUNK_CHARS):
            out.append(current)
            current, chars = [], 0
        current.append(label)
        chars += len(label)
    if current:
        out.append(current)
    return out


def fits_one_chunk(labels: Sequence[str]) -> bool:
    return len(chunks(list(dict.fromkeys(labels)))) <= 1


def score(engine: Any, call: Callable[[list[str]], list[Any]], labels: Sequence[str], what: str) -> list[Scored]:
    """Score `labels` with `call(model_labels) -> [Classification per region]`, chunked and merged."""
    unique = check_label_set(labels, what)
    texts = model_texts(unique)
    back = {t: label for label, t in texts.items()}
    parts = [call([texts[label] for label in chunk]) for chunk in chunks(unique)]
    merged = parts[0] if len(parts) == 1 else engine.merge_classifications(parts)
    return [Scored(back[c.label], float(c.score), {back[k]: float(v) for k, v in c.scores.items()}) for c in merged]


def classify(engine: Any, image: Any, masks: list, labels: Sequence[str], what: str = "a label set") -> list[Scored]:
    """`engine.classify`, chunked and with neutralised label text."""
    return score(engine, lambda chunk: engine.classify(image, masks, chunk), labels, what)


def attributes(engine: Any, image: Any, masks: list, questions: dict[str, list[str]]) -> list[dict[str, Scored]]:
    """`engine.attributes` for several attributes: one engine call when every set fits one chunk (the
    engine shares the image prefix across them), else one chunked scoring per attribute."""
    names = model_texts(list(questions))
    out: list[dict[str, Scored]] = [{} for _ in masks]
    if all(fits_one_chunk(v) for v in questions.values()):
        sets = {name: check_label_set(v, f"attribute {name!r}") for name, v in questions.items()}
        texts = {name: model_texts(v) for name, v in sets.items()}
        results = engine.attributes(image, masks, {names[n]: [texts[n][v] for v in sets[n]] for n in sets})
        for i, per_region in enumerate(results):
            for n in sets:
                c = per_region[names[n]]
                back = {t: v for v, t in texts[n].items()}
                out[i][n] = Scored(back[c.label], float(c.score), {back[k]: float(p) for k, p in c.scores.items()})
        return out
    for n, values in questions.items():
        def call(chunk: list[str], n: str = n) -> list[Any]:
            return [r[names[n]] for r in engine.attributes(image, masks, {names[n]: chunk})]

        for i, scored in enumerate(score(engine, call, values, f"attribute {n!r}")):
            out[i][n] = scored
    return out
