"""Honest scores (softmax over sequence log-likelihoods with a temperature, optionally length-normalised)
and the engine's cache invariant (the shared prefix KV cache is never written by a call)."""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import pytest
import torch

from osprey_core import conversation as conv
from osprey_core.config import OspreyConfig, tiny
from osprey_core.engine import candidate_scores
from osprey_core.errors import ConfigError
from osprey_core.reference import plain_option_logliks
from osprey_core.tokenizer import continuation_ids, tokenizer_image_token

LABELS = ["cat", "red car", "traffic light", "tree", "fire hydrant"]


@contextlib.contextmanager
def scoring(engine, **changes):
    """Temporarily change the (session-shared) engine's scoring options."""
    cfg = engine.model.cfg
    old = {k: getattr(cfg, k) for k in changes}
    for k, v in changes.items():
        setattr(cfg, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(cfg, k, v)


def plain_scores(engine, image, mask, question, labels, temperature, normalized):
    """The plain path's log-likelihoods turned into scores by hand (no engine code involved)."""
    tok = engine.tokenizer
    text = conv.chat_prompt(question)
    ids = tokenizer_image_token(text, tok)
    counts = np.array([len(continuation_ids(tok, ids, text, o)) for o in labels], dtype=np.float64)
    ll = np.array(plain_option_logliks(engine.model, tok, image, mask, question, labels))
    z = (ll / counts if normalized else ll) / temperature
    p = np.exp(z - z.max())
    return ll, counts, p / p.sum()


@pytest.mark.parametrize("normalized", [False, True], ids=["sum", "mean-per-token"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_packed_engine_equals_plain_path_in_both_modes(engine, image, masks, normalized, temperature):
    with scoring(engine, score_length_normalized=normalized, score_temperature=temperature):
        results = engine.classify(image, masks[:3], LABELS)
        attrs = engine.attributes(image, masks[:2], {"color": ["red", "dark green", "blue"]})
    for r, mask in enumerate(masks[:3]):
        ll, counts, probs = plain_scores(engine, image, mask, conv.category_question(), LABELS, temperature, normalized)
        np.testing.assert_allclose([results[r].logprobs[o] for o in LABELS], ll, atol=1e-4, rtol=0)
        np.testing.assert_allclose([results[r].scores[o] for o in LABELS], probs, atol=1e-5, rtol=0)
        assert [results[r].token_counts[o] for o in LABELS] == counts.astype(int).tolist()
        assert results[r].label == LABELS[int(np.argmax(probs))]
    values = ["red", "dark green", "blue"]
    for r, mask in enumerate(masks[:2]):
        _, _, probs = plain_scores(engine, image, mask, conv.attribute_question("color"), values, temperature,
                                   normalized)
        np.testing.assert_allclose([attrs[r]["color"].scores[v] for v in values], probs, atol=1e-5, rtol=0)


def test_length_normalisation_changes_scores_of_labels_of_different_lengths(engine, image, masks):
    summed = engine.classify(image, masks[:1], LABELS)[0]
    with scoring(engine, score_length_normalized=True):
        mean = engine.classify(image, masks[:1], LABELS)[0]
    assert len(set(summed.token_counts.values())) > 1, "the label set must mix lengths"
    assert summed.logprobs == mean.logprobs
    assert max(abs(summed.scores[o] - mean.scores[o]) for o in LABELS) > 1e-3


def test_temperature_flattens_and_keeps_the_ranking():
    ll = np.array([[-1.0, -3.0, -7.0]])
    cold, hot = candidate_scores(ll, [1, 1, 1], 1.0), candidate_scores(ll, [1, 1, 1], 4.0)
    assert np.argsort(cold[0]).tolist() == np.argsort(hot[0]).tolist()
    assert hot[0].max() < cold[0].max() and np.allclose(hot.sum(1), 1) and np.allclose(cold.sum(1), 1)
    np.testing.assert_allclose(candidate_scores(ll, [1, 2, 7], 1.0, True), candidate_scores(
        np.array([[-1.0, -1.5, -1.0]]), [1, 1, 1], 1.0))
    with pytest.raises(ValueError, match="positive"):
        candidate_scores(ll, [1, 1, 1], 0.0)


def test_score_info_says_calibrated_only_for_a_fitted_temperature(engine):
    info = engine.score_info()
    assert info == {"method": "softmax over candidate sequence log-likelihoods", "temperature": 1.0,
                    "calibrated": False, "length_normalized": False, "calibration": None}
    with scoring(engine, score_temperature=1.7):
        assert engine.score_info()["calibrated"] is False  # a temperature alone is not a calibration
    fit = {"method": "nll", "examples": 200, "ece_before": 0.2, "ece_after": 0.04}
    with scoring(engine, score_temperature=1.7, score_temperature_fitted=True, score_calibration=fit,
                 score_length_normalized=True):
        info = engine.score_info()
    assert info["calibrated"] is True and info["temperature"] == 1.7 and info["calibration"] == fit
    assert info["length_normalized"] is True and "mean per-token" in info["method"]


def test_scoring_options_round_trip_through_the_config(tmp_path):
    cfg = dataclasses.replace(tiny(), score_temperature=1.3, score_temperature_fitted=True,
                              score_length_normalized=True, score_calibration={"examples": 10})
    cfg.save(tmp_path / "c.json")
    assert OspreyConfig.load(tmp_path / "c.json") == cfg
    hf = OspreyConfig.from_hf_config({"vocab_size": 32000, "osprey_score_temperature": 0.8,
                                      "osprey_score_temperature_fitted": True})
    assert (hf.score_temperature, hf.score_temperature_fitted, hf.score_length_normalized) == (0.8, True, False)
    with pytest.raises(ConfigError, match="positive"):
        OspreyConfig(score_temperature=0)


def _prefix_snapshot(engine) -> dict:
    return {key: ([(k.clone(), v.clone()) for k, v in st.kv], st.last_logits.clone(), id(st))
            for key, st in engine._prefixes.items()}


def test_prefix_kv_is_bit_identical_after_classify_attributes_describe(engine, masks):
    from tests.conftest import synthetic_image

    img = synthetic_image(seed=7)

    def calls():
        engine.classify(img, masks, LABELS)
        engine.attributes(img, masks[:3], {"color": ["red", "green"], "size": ["small", "large"]})
        engine.describe(img, masks[:2], detail="short", max_new_tokens=4)
        engine.describe(img, masks[:2], detail="detailed", max_new_tokens=4)

    calls()  # fills one prefix per prompt on this image
    before = _prefix_snapshot(engine)
    fills = engine.stats["prefix_fills"]
    mine = [key for key in before if key[0] == engine.encode(img).key]
    assert len(mine) == 5  # category, 2 attributes, short, detailed
    calls()
    calls()
    assert engine.stats["prefix_fills"] == fills, "the cached prefixes were reused, not refilled"
    after = _prefix_snapshot(engine)
    for key in mine:
        (kv0, logits0, id0), (kv1, logits1, id1) = before[key], after[key]
        assert id0 == id1
        assert torch.equal(logits0, logits1)
        for (k0, v0), (k1, v1) in zip(kv0, kv1, strict=True):
            assert torch.equal(k0, k1) and torch.equal(v0, v1)

