"""Fine-tuning on the tiny preset (CPU, seconds): LoRA and full saves load back as what was trained,
only the intended weights move, and a SIGKILLed run resumes to the same weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from osprey_core import adapters, load_engine
from osprey_core import conversation as conv
from osprey_core.factory import load_model
from osprey_core.reference import plain_option_logliks
from osprey_core.regions import Region
from training import dataset, finetune, synthetic

ROOT = Path(__file__).resolve().parents[2]
GEN = dict(image_size=64, objects=(3, 4))


def make_samples(tmp: Path, n_images: int = 3) -> tuple[list[dataset.Sample], list]:
    scenes = list(synthetic.generate(n_images, seed=5, **GEN))
    written = synthetic.write_images(scenes, tmp)
    exs = [r for sc, p, sha in written for r in synthetic.region_examples(sc, p, sha)]
    return dataset.build_samples(exs, synthetic.label_space(), tasks=("category", "attributes"), seed=0), exs


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_samples(tmp_path_factory.mktemp("shapes"))


def _image(ex) -> np.ndarray:
    return np.asarray(Image.open(ex.image).convert("RGB"))


def _scores(model, tokenizer, ex, labels):
    mask = Region.from_coco_rle(ex.rle).mask
    return plain_option_logliks(model, tokenizer, _image(ex), mask, conv.CATEGORY_PROMPT, labels)


def test_lora_adapter_loads_as_the_trained_model(data, tmp_path):
    samples, exs = data
    cfg = finetune.TrainConfig(mode="lora", steps=6, batch_size=4, lr=5e-3, lora_r=4, lora_alpha=8)
    result = finetune.train("tiny", samples, tmp_path / "v1", cfg, progress=False)
    out = result.out_dir
    names = {p.name for p in out.iterdir()}
    assert {adapters.ADAPTER_WEIGHTS, adapters.ADAPTER_CONFIG, adapters.MODULES_WEIGHTS, adapters.BASE_FILE,
            "osprey_config.json", "tokenizer.json", finetune.TRAINING_FILE} <= names
    assert not any(n.endswith((".bin", ".pt", ".pth", ".pkl")) for n in names)
    assert finetune.CHECKPOINTS not in names
    lora = load_file(str(out / adapters.ADAPTER_WEIGHTS))
    assert lora and all("lora_" in k and k.startswith("model.layers.") for k in lora)
    assert {k.split(".")[0] for k in load_file(str(out / adapters.MODULES_WEIGHTS))} == {"mask_extractor", "model"}

    labels = list(synthetic.SHAPES)
    base, tok, _ = load_model("tiny")
    merged, tok2, _ = load_model(out)
    trained = result.model
    for ex in exs[:3]:
        want = _scores(trained, tok, ex, labels)
        got = _scores(merged, tok2, ex, labels)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
        assert not np.allclose(_scores(base, tok, ex, labels), want, atol=1e-3)  # training changed it
    # the engine on the adapter directory: same numbers as the in-memory trained model
    engine = load_engine(str(out))
    ex = exs[0]
    res = engine.classify(_image(ex), [Region.from_coco_rle(ex.rle)], labels)[0]
    np.testing.assert_allclose([res.logprobs[lab] for lab in labels], _scores(trained, tok, ex, labels),
                               rtol=1e-4, atol=1e-4)

    # what moved: LoRA'd projections and the extractor/projector; never the vision tower
    b, m = base.state_dict(), merged.state_dict()
    assert torch.equal(b["model.vision_tower.vision_tower.visual.trunk.stem.0.weight"],
                       m["model.vision_tower.vision_tower.visual.trunk.stem.0.weight"])
    assert torch.equal(b["model.embed_tokens.weight"], m["model.embed_tokens.weight"])
    assert not torch.equal(b["model.layers.0.self_attn.q_proj.weight"], m["model.layers.0.self_attn.q_proj.weight"])
    assert not torch.equal(b["mask_extractor.feat_linear.weight"], m["mask_extractor.feat_linear.weight"])


def test_adapter_refuses_a_different_base(data, tmp_path):
    samples, _ = data
    cfg = finetune.TrainConfig(mode="lora", steps=1, batch_size=2)
    out = finetune.train("tiny", samples, tmp_path / "v", cfg, progress=False).out_dir
    ref = (out / adapters.BASE_FILE).read_text().replace('"version": "', '"version": "x')
    (out / adapters.BASE_FILE).write_text(ref)
    from osprey_core.errors import CheckpointError

    with pytest.raises(CheckpointError, match="trained on base version"):
        load_model(out)


def test_adapter_names_its_base_by_the_content_addressed_version(data, tmp_path):
    """The base version an adapter records is the base's file-hash version (what `load_adapter` checks),
    not a digest of the tensors as training loaded them: on a GPU those are bf16, so the digest never
    matched an fp32 load and every GPU-trained adapter was refused. Changing the base's weights on disk
    afterwards is still refused."""
    from safetensors.torch import save_file

    from osprey_core import versioning
    from osprey_core.errors import CheckpointError

    samples, _ = data
    base = finetune.train("tiny", samples, tmp_path / "base", finetune.TrainConfig(mode="full", steps=1,
                          batch_size=2), progress=False).out_dir
    out = finetune.train(base, samples, tmp_path / "lora", finetune.TrainConfig(mode="lora", steps=1,
                         batch_size=2), progress=False).out_dir
    recorded = json.loads((out / adapters.BASE_FILE).read_text())["version"]
    assert recorded == versioning.version_of_directory(base)
    load_model(out)  # loads: the check is against the same version
    weights = load_file(str(base / "model.safetensors"))
    weights["mask_extractor.feat_linear.weight"][0, 0] += 1.0
    save_file(weights, str(base / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="trained on base version"):
        load_model(out)


def test_full_finetune_saves_our_format_and_learns(data, tmp_path):
    samples, exs = data
    cfg = finetune.TrainConfig(mode="full", steps=12, batch_size=8, lr=2e-3)
    result = finetune.train("tiny", samples, tmp_path / "full", cfg, progress=False)
    assert (result.out_dir / "model.safetensors").is_file()
    assert not adapters.is_adapter_dir(result.out_dir)
    assert result.losses[-1] < result.losses[0]
    loaded, tok, _ = load_model(result.out_dir)
    for k, v in result.model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_encode_stats_and_no_samples(data, tmp_path):
    samples, _ = data
    bad = dataset.Sample(samples[0].image, samples[0].image_key, samples[0].width, samples[0].height,
                         samples[0].masks, ((samples[0].turns[0][0], "x</s>y"),))
    with pytest.raises(finetune.TrainingError, match="no usable training samples"):
        finetune.train("tiny", [bad], tmp_path / "none", finetune.TrainConfig(steps=1), progress=False)
    with pytest.raises(finetune.TrainingError):
        finetune.TrainConfig(mode="qlora")


KILLED_RUN = textwrap.dedent("""
    import os, signal, sys, json
    sys.path.insert(0, {root!r})
    from training import dataset, finetune
    samples = [dataset.Sample(**{{**s, "masks": tuple(s["masks"]), "turns": tuple(map(tuple, s["turns"]))}})
               for s in json.load(open({samples!r}))]
    cfg = finetune.TrainConfig(**json.load(open({cfg!r})))
    def die(step, total, loss):
        if step == {kill_at}:
            os.kill(os.getpid(), signal.SIGKILL)
    finetune.train("tiny", samples, {out!r}, cfg, progress=False, on_step=die)
""")


def test_sigkilled_run_resumes_to_the_same_weights(data, tmp_path):
    import json

    samples, _ = data
    cfg = finetune.TrainConfig(mode="lora", steps=8, batch_size=4, lr=3e-3, save_every=3, lora_r=4)
    (tmp_path / "samples.json").write_text(json.dumps([s.to_dict() for s in samples]))
    from dataclasses import asdict

    (tmp_path / "cfg.json").write_text(json.dumps(asdict(cfg)))
    out = tmp_path / "killed"
    script = KILLED_RUN.format(root=str(ROOT), samples=str(tmp_path / "samples.json"), cfg=str(tmp_path / "cfg.json"),
                               kill_at=7, out=str(out))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=600)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert [p.name for p in (out / finetune.CHECKPOINTS).glob("step-*")] == ["step-00000006"]
    assert not (out / adapters.ADAPTER_WEIGHTS).exists()  # nothing half-written as a model

    # One thread here too, as in the killed run: CPU kernels split reductions by thread count, and at lr 3e-3
    # that float noise reaches ~2e-5 in the weights.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        resumed = finetune.train("tiny", samples, out, cfg, progress=False)
        assert resumed.resumed_from == 6 and len(resumed.losses) == 8
        straight = finetune.train("tiny", samples, tmp_path / "straight", cfg, progress=False)
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_allclose(resumed.losses, straight.losses, rtol=1e-5)
    a = load_file(str(out / adapters.ADAPTER_WEIGHTS))
    b = load_file(str(straight.out_dir / adapters.ADAPTER_WEIGHTS))
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_cosine_schedule():
    lrs = [finetune.cosine_lr(s, 100, 10, 1.0) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[55] == pytest.approx(0.5, abs=0.02) and lrs[-1] < 0.01
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
