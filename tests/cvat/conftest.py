"""Shared CVAT test data: a task of shapes frames with CVAT labels (a select and a description text
attribute each), served by the fake CVAT of fake_cvat.py (see its docstring for why it is not a real one)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.cvat.fake_cvat import attribute, label

LABELS = ["circle", "square", "triangle"]
COLORS = ["red", "green", "blue"]


def frame(seed: int, size: int = 96) -> np.ndarray:
    """Three flat blocks of distinct colours on grey (the classical proposer finds each as one object)."""
    rng = np.random.default_rng(seed)
    img = np.full((size, size, 3), 200, np.uint8)
    for k, colour in enumerate([(220, 30, 30), (30, 70, 220), (30, 160, 50)]):
        x, y = int(rng.integers(4, size // 2 - 8)) + (k % 2) * size // 2, int(rng.integers(4, size // 3)) + k * 28
        img[y:y + 18, x:x + 18] = colour
    return img


def cvat_labels(colors: list[str] = COLORS) -> list[dict]:
    return [label(n, i + 1, [attribute("color", 10 * (i + 1), "select", list(colors)),
                             attribute("description", 10 * (i + 1) + 1, "text", [])])
            for i, n in enumerate(LABELS)]


@pytest.fixture(scope="session")
def engine():
    from osprey_core import load_engine

    return load_engine("tiny", max_new_tokens=3)


@pytest.fixture(autouse=True)
def cvat_cache(tmp_path, monkeypatch):
    """cvat-sdk caches task data under the user cache dir: keep it inside the test's tmp dir."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path))
