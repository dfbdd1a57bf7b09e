"""Registry: versions with manifests, atomic current pointer, gate decisions, rollback, CLI."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from training import registry as registry_mod
from training.evaluate import Metrics, classification_metrics, split_fingerprint
from training.models_cli import main as models_main
from training.records import RegionExample
from training.registry import Decision, Registry, RegistryError, decide

LABELS = ["circle", "square", "triangle", "hexagon"]
GOLD = [lab for lab in LABELS for _ in range(25)]  # 100 held-out regions, 25 per class
SPLIT = split_fingerprint(RegionExample(image="x", image_sha256=f"s{i}", width=1, height=1, rle={},
                                        category=g, region_id=str(i)) for i, g in enumerate(GOLD))


def metrics_for(pred: list[str], version: str) -> Metrics:
    """Real metrics of a constructed set of predictions on the fixed held-out split."""
    logits = np.full((len(GOLD), len(LABELS)), -4.0)
    for i, p in enumerate(pred):
        logits[i, LABELS.index(p)] = -0.2
    m = classification_metrics(GOLD, logits, LABELS)
    return Metrics(**m, labels=LABELS, split_fingerprint=SPLIT, model_version=version)


def base_predictions() -> list[str]:
    """A model that never saw hexagons: right on the other classes except 1 in 25, hexagons -> circle."""
    pred = []
    for i, g in enumerate(GOLD):
        if g == "hexagon":
            pred.append("circle")
        elif i % 25 == 0:
            pred.append("square" if g != "square" else "circle")
        else:
            pred.append(g)
    return pred


def model_dir(tmp_path, name: str, seed: int):
    d = tmp_path / name
    (d / "adapter").mkdir(parents=True)
    torch.manual_seed(seed)
    save_file({"w": torch.randn(8, 8)}, str(d / "model.safetensors"))
    save_file({"lora_A": torch.randn(2, 8)}, str(d / "adapter" / "adapter_model.safetensors"))
    (d / "config.json").write_text(json.dumps({"name": "tiny", "score_temperature": 1.0}))
    (d / "tokenizer.json").write_text(json.dumps({"model": "bpe", "seed": 0}))
    return d


@pytest.fixture
def reg(tmp_path) -> Registry:
    return Registry(tmp_path / "data")


def test_register_writes_manifest_with_every_checksum(reg, tmp_path) -> None:
    src = model_dir(tmp_path, "m1", 0)
    info = reg.register(src, dataset_fingerprint="ds-1", base="tiny", metrics=metrics_for(GOLD, "x"))
    root = reg.path(info.version)
    man = json.loads((root / "manifest.json").read_text())
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    # every file but the manifest itself and the core's rewritable sha256 cache
    assert sorted(man["files"]) == sorted(f for f in files if f not in ("manifest.json", ".osprey_sha256.json"))
    assert "metrics.json" in man["files"] and "adapter/adapter_model.safetensors" in man["files"]
    for rel, entry in man["files"].items():
        assert entry["sha256"] == hashlib.sha256((root / rel).read_bytes()).hexdigest()
    assert man["dataset_fingerprint"] == "ds-1" and man["base"] == "tiny" and man["parent"] is None
    assert reg.verify(info.version) == []
    # content-addressed: the same files give the same id (idempotent), other weights another one
    assert reg.register(src).version == info.version
    other = reg.register(model_dir(tmp_path, "m2", 1))
    assert other.version != info.version
    assert [v.version for v in reg.list()] == [info.version, other.version]
    assert reg.current() is None


def test_explicit_version_and_parent(reg, tmp_path) -> None:
    a = reg.register(model_dir(tmp_path, "a", 0), version="tiny-aaaa")
    reg.promote("tiny-aaaa")
    b = reg.register(model_dir(tmp_path, "b", 1), version="tiny-bbbb")
    assert a.parent is None and b.parent == "tiny-aaaa"
    with pytest.raises(RegistryError, match="invalid version id"):
        reg.register(model_dir(tmp_path, "c", 2), version="../escape")
    with pytest.raises(RegistryError, match="invalid version id"):
        reg.path("current")


def test_crash_mid_copy_leaves_no_version(reg, tmp_path, monkeypatch) -> None:
    src = model_dir(tmp_path, "m", 0)
    calls = {"n": 0}
    real_copy = shutil.copyfile

    def dying_copy(a, b, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real_copy(a, b, *args, **kwargs)

    monkeypatch.setattr(registry_mod.shutil, "copyfile", dying_copy)
    with pytest.raises(OSError, match="disk full"):
        reg.register(src, version="tiny-crash")
    monkeypatch.setattr(registry_mod.shutil, "copyfile", real_copy)
    assert reg.list() == [] and list((reg.root / ".staging").iterdir()) == []
    with pytest.raises(RegistryError, match="no registered version"):
        reg.path("tiny-crash")
    # a directory left by a hard kill (files, no manifest) is not a version and is replaced on register
    partial = reg.root / "tiny-crash"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half")
    assert reg.list() == []
    with pytest.raises(RegistryError):
        reg.promote("tiny-crash")
    reg.register(src, version="tiny-crash")
    assert reg.verify("tiny-crash") == []


def test_corrupt_version_is_not_promoted(reg, tmp_path) -> None:
    v = reg.register(model_dir(tmp_path, "m", 0)).version
    f = reg.path(v) / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    assert reg.verify(v) == ["model.safetensors: sha256 mismatch"]
    with pytest.raises(RegistryError, match="corrupt"):
        reg.promote(v)
    assert reg.current() is None


def test_promote_and_rollback_move_an_atomic_pointer(reg, tmp_path) -> None:
    a = reg.register(model_dir(tmp_path, "a", 0)).version
    b = reg.register(model_dir(tmp_path, "b", 1)).version
    with pytest.raises(RegistryError, match="nothing to roll back"):
        reg.rollback()
    reg.promote(a)
    reg.promote(b)
    assert reg.current() == b and (reg.root / "current").read_text() == b + "\n"
    assert reg.current_path() == reg.root / b
    assert not [p for p in reg.root.iterdir() if p.name.startswith(".current-")]  # no temp files left
    assert reg.rollback() == a
    assert reg.current() == a
    statuses = {v.version: v.status for v in reg.list()}
    assert statuses == {a: "current", b: "rolled-back"}
    with pytest.raises(RegistryError, match="nothing to roll back"):
        reg.rollback()


# --- the gate ------------------------------------------------------------------------------------------


def test_gate_promotes_a_version_that_learned_a_new_class(reg, tmp_path) -> None:
    base_m = metrics_for(base_predictions(), "base")
    learned = [g if g == "hexagon" or i % 25 else p for i, (g, p) in enumerate(zip(GOLD, base_predictions(),
                                                                                  strict=True))]
    new_m = metrics_for(learned, "new")
    assert base_m.per_label["hexagon"]["accuracy"] == 0.0 and new_m.per_label["hexagon"]["accuracy"] == 1.0
    base = reg.register(model_dir(tmp_path, "base", 0), metrics=base_m).version
    reg.promote(base)
    cand = reg.register(model_dir(tmp_path, "new", 1), metrics=new_m).version
    d = reg.gate(cand, margin=0.01, max_label_drop=0.02)
    assert d.promote and d.promoted and reg.current() == cand
    assert d.current == pytest.approx(base_m.accuracy) and d.candidate == pytest.approx(new_m.accuracy)
    assert d.label_drops["hexagon"] == pytest.approx(-1.0)
    assert reg.show(cand)["decisions"][0]["kind"] == "gate"


def test_gate_refuses_a_label_shuffled_candidate_and_records_it(reg, tmp_path, capsys) -> None:
    good = metrics_for(GOLD, "good")
    rng = np.random.default_rng(0)
    shuffled = metrics_for(list(rng.permutation(GOLD)), "shuffled")
    cur = reg.register(model_dir(tmp_path, "good", 0), metrics=good).version
    reg.promote(cur)
    bad = reg.register(model_dir(tmp_path, "bad", 1), metrics=shuffled).version
    d = reg.gate(bad, margin=0.0, max_label_drop=0.02)
    assert not d.promote and not d.promoted
    assert reg.current() == cur
    assert d.candidate == pytest.approx(shuffled.accuracy) and d.current == 1.0
    assert any("does not beat current" in r for r in d.reasons)
    assert any(r.startswith("label 'circle' drops") for r in d.reasons)
    # visible in list / show and the CLI
    info = {v.version: v for v in reg.list()}[bad]
    assert info.status == "refused" and info.decisions[-1]["candidate"] == pytest.approx(shuffled.accuracy)
    assert models_main(["--model-dir", str(reg.root.parent), "list"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith(bad))
    assert "refused" in line and f"{100 * shuffled.accuracy:.1f}%" in line and "100.0%" in line
    assert models_main(["--model-dir", str(reg.root.parent), "show", bad]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["status"] == "refused" and shown["decisions"][-1]["promote"] is False
    assert models_main(["--model-dir", str(reg.root.parent), "list", "--json"]) == 0
    listed = {v["version"]: v for v in json.loads(capsys.readouterr().out)}
    assert listed[cur]["status"] == "current" and listed[bad]["status"] == "refused"


def test_decide_rules() -> None:
    base = metrics_for(base_predictions(), "a")
    assert decide(base, None).promote  # first version
    same = decide(base, base)
    assert not same.promote and "does not beat" in same.reasons[0]  # equal is not better
    better = metrics_for(GOLD, "b")
    assert decide(better, base, margin=0.05).promote
    assert not decide(better, base, margin=0.5).promote  # not by the margin
    # better overall but one label drops 4 points (1 of 25) -> refused at 2, accepted at 5
    worse_square = [("circle" if (g == "square" and i == 26) else g) for i, g in enumerate(GOLD)]
    cand = metrics_for(worse_square, "c")
    ref = metrics_for([g if g != "hexagon" else "circle" for g in GOLD], "r")
    assert cand.accuracy > ref.accuracy
    d = decide(cand, ref, max_label_drop=0.02)
    assert not d.promote and d.label_drops["square"] == pytest.approx(0.04)
    assert decide(cand, ref, max_label_drop=0.05).promote
    other_split = Metrics.from_dict({**better.to_dict(), "split_fingerprint": "other"})
    assert not decide(other_split, base).promote
    with pytest.raises(RegistryError):
        decide(better, base, margin=-0.1)
    assert Decision.from_dict(d.to_dict()) == d


def test_cli_promote_rollback_and_errors(reg, tmp_path, capsys) -> None:
    a = reg.register(model_dir(tmp_path, "a", 0)).version
    b = reg.register(model_dir(tmp_path, "b", 1)).version
    root = str(reg.root.parent)
    assert models_main(["--model-dir", root, "promote", a]) == 0
    assert models_main(["--model-dir", root, "promote", b, "--reason", "hotfix"]) == 0
    assert reg.current() == b and reg.show(b)["decisions"][-1]["reasons"] == ["hotfix"]
    assert models_main(["--model-dir", root, "rollback"]) == 0
    assert reg.current() == a
    capsys.readouterr()
    assert models_main(["--model-dir", root, "show", "nope"]) == 2
    assert "no registered version 'nope'" in capsys.readouterr().err


def test_version_id_is_the_id_the_engine_serves(reg, tmp_path) -> None:
    """A real (tiny) checkpoint: the registry's id is osprey_core's content address of the files, and
    loading the registered directory reports the same version."""
    from osprey_core.checkpoint import save_checkpoint
    from osprey_core.config import tiny
    from osprey_core.factory import build_model, load_versioned
    from osprey_core.tokenizer import build_tiny_tokenizer
    from osprey_core.versioning import version_of_directory

    cfg = tiny()
    src = save_checkpoint(build_model(cfg), build_tiny_tokenizer(cfg.text.vocab_size), tmp_path / "ckpt")
    info = reg.register(src, metrics=metrics_for(GOLD, "x"), base=None, dataset_fingerprint="ds")
    assert info.version == version_of_directory(src)
    assert reg.verify(info.version) == []
    _, _, _, served = load_versioned(reg.path(info.version))
    assert served == info.version
    assert reg.verify(info.version) == []  # loading (and its hash cache) leaves the manifest intact


def test_gate_refuses_a_better_but_corrupt_candidate(reg, tmp_path) -> None:
    cur = reg.register(model_dir(tmp_path, "a", 0), metrics=metrics_for(base_predictions(), "a")).version
    reg.promote(cur)
    cand = reg.register(model_dir(tmp_path, "b", 1), metrics=metrics_for(GOLD, "b")).version
    (reg.path(cand) / "tokenizer.json").write_text("{}")  # bit rot after registration
    d = reg.gate(cand)
    assert not d.promote and not d.promoted and reg.current() == cur
    assert "tokenizer.json" in d.reasons[-1]
    assert {v.version: v.status for v in reg.list()}[cand] == "refused"


def test_sigkill_mid_registration_leaves_nothing_served(reg, tmp_path) -> None:
    """A real crash: the registering process is SIGKILLed after copying its first file."""
    import os
    import signal
    import subprocess
    import sys
    import time

    src = tmp_path / "plain"
    src.mkdir()
    for i in range(3):
        (src / f"part{i}.bin").write_bytes(os.urandom(1024))
    ready = tmp_path / "ready"
    script = f"""
import shutil, time, pathlib
from training import registry
real = shutil.copyfile
n = [0]
def slow(a, b, *args, **kw):
    out = real(a, b, *args, **kw)
    n[0] += 1
    if n[0] == 1:
        pathlib.Path({str(ready)!r}).write_text("x")
        time.sleep(60)
    return out
registry.shutil.copyfile = slow
registry.Registry({str(reg.root.parent)!r}).register({str(src)!r}, version="tiny-killed")
"""
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=os.getcwd())
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None, "the registering process died early"
            assert time.monotonic() < deadline, "the registering process never started copying"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert any((reg.root / ".staging").iterdir())  # the half copy is there, but only in staging
    assert reg.list() == []
    with pytest.raises(RegistryError):
        reg.path("tiny-killed")
    info = reg.register(src, version="tiny-killed")  # the next attempt succeeds
    assert reg.verify(info.version) == [] and len(reg.manifest(info.version)["files"]) == 3
