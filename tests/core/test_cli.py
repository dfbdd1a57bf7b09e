"""`osprey predict` end to end in a subprocess, on the tiny model and files the test writes."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
from PIL import Image

from tests.conftest import box_mask, synthetic_image


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "osprey_core.cli", *args], capture_output=True, text=True,
                          timeout=120)


def test_predict_mask_and_box(tmp_path):
    img = tmp_path / "img.png"
    Image.fromarray(synthetic_image()).save(img)
    mask = tmp_path / "m.png"
    Image.fromarray((box_mask(80, 48, 6, 4, 30, 20) * 255).astype(np.uint8)).save(mask)
    proc = _run(str(img), "--mask", str(mask), "--box", "40,24,76,44", "--labels", "cat,dog,car",
                "--attribute", "color=red,green", "--describe", "short", "--max-new-tokens", "4")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["model_version"].startswith("tiny-")
    assert [r["region"] for r in out["regions"]] == [str(mask), "40,24,76,44"]
    for r in out["regions"]:
        assert r["label"] in {"cat", "dog", "car"}
        assert abs(sum(r["scores"].values()) - 1) < 1e-3
        assert r["attributes"]["color"]["value"] in {"red", "green"}
        assert isinstance(r["short_description"], str)
    assert out["regions"][1]["bbox"] == [40, 24, 76, 44]
    assert out["regions"][1]["area"] == 36 * 20


def test_predict_bad_inputs(tmp_path):
    img = tmp_path / "img.png"
    Image.fromarray(synthetic_image()).save(img)
    not_image = tmp_path / "x.png"
    not_image.write_text("hello")
    proc = _run(str(not_image), "--box", "1,1,5,5", "--labels", "a")
    assert proc.returncode == 2 and "cannot read image" in proc.stderr
    small = tmp_path / "small.png"
    Image.fromarray(np.ones((5, 5), np.uint8) * 255).save(small)
    proc = _run(str(img), "--mask", str(small), "--labels", "a")
    assert proc.returncode == 2 and "mask is 5x5" in proc.stderr
    proc = _run(str(img), "--box", "1,2,3", "--labels", "a")
    assert proc.returncode != 0 and "--box expects 4" in proc.stderr
