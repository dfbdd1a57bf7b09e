"""Optimised equals plain: the cached, packed engine gives the plain path's scores and greedy text."""

from __future__ import annotations

import numpy as np
import pytest

from osprey_core import ImageError, RegionError
from osprey_core import conversation as conv
from osprey_core.reference import plain_generate, plain_option_logliks

LABELS = ["cat", "dog", "red car", "person", "blue", "traffic light", "tree", "sky"]


def test_classify_scores_equal_plain_forward(engine, image, masks):
    results = engine.classify(image, masks, LABELS)
    assert len(results) == len(masks)
    temp = engine.model.cfg.score_temperature
    for r, mask in enumerate(masks):
        plain = np.array(plain_option_logliks(engine.model, engine.tokenizer, image, mask, conv.category_question(), LABELS))
        got = np.array([results[r].logprobs[label] for label in LABELS])
        np.testing.assert_allclose(got, plain, atol=1e-4, rtol=0)
        probs = np.exp((plain - plain.max()) / temp)
        probs /= probs.sum()
        np.testing.assert_allclose([results[r].scores[label] for label in LABELS], probs, atol=1e-5, rtol=0)
        assert results[r].label == LABELS[int(np.argmax(plain))]
        assert results[r].score == pytest.approx(probs.max(), abs=1e-5)
        assert sum(results[r].scores.values()) == pytest.approx(1.0)


def test_regions_change_the_answer(engine, image, masks):
    """Guards the equality tests: different regions must give different scores."""
    res = engine.classify(image, masks, LABELS)
    rows = np.array([[c.logprobs[label] for label in LABELS] for c in res])
    assert np.abs(rows[0] - rows[1]).max() > 1e-2


def test_packing_groups_do_not_change_scores(engine, image, masks):
    whole = engine.option_logliks(image, masks, conv.category_question(), LABELS)
    old = engine.max_packed_tokens
    engine.max_packed_tokens = 1  # one region per packed forward
    try:
        split = engine.option_logliks(image, masks, conv.category_question(), LABELS)
    finally:
        engine.max_packed_tokens = old
    np.testing.assert_allclose(whole, split, atol=1e-4, rtol=0)


def test_attributes_equal_plain(engine, image, masks):
    attrs = {"color": ["red", "green", "blue"], "size": ["small", "large"]}
    out = engine.attributes(image, masks[:3], attrs)
    for r in range(3):
        for name, values in attrs.items():
            plain = plain_option_logliks(engine.model, engine.tokenizer, image, masks[r],
                                         conv.attribute_question(name), values)
            np.testing.assert_allclose([out[r][name].logprobs[v] for v in values], plain, atol=1e-4, rtol=0)


def test_batched_greedy_equals_one_region_at_a_time(engine, image, masks):
    question = conv.description_question("short")
    batched = engine.generate(image, masks, question, max_new_tokens=12)
    single = [plain_generate(engine.model, engine.tokenizer, image, m, question, 12) for m in masks]
    assert batched == single
    assert len(set(batched)) > 1, "regions should not all decode to the same text"


def test_describe_and_ask_return_one_text_per_region(engine, image, masks):
    assert len(engine.describe(image, masks[:2], detail="detailed", max_new_tokens=6)) == 2
    answers = engine.ask(image, masks[:2], "What color is <region>?", max_new_tokens=6)
    plain = [plain_generate(engine.model, engine.tokenizer, image, m, conv.open_question("What color is <region>?"), 6)
             for m in masks[:2]]
    assert answers == plain


def test_image_encoded_once_and_prefix_reused(engine, image, masks):
    from tests.conftest import synthetic_image

    fresh = synthetic_image(seed=123)
    before = dict(engine.stats)
    engine.classify(fresh, masks, LABELS)
    engine.classify(fresh, masks[:2], ["a", "b"])
    engine.describe(fresh, masks[:1], max_new_tokens=2)
    assert engine.stats["image_encodes"] - before["image_encodes"] == 1
    # category prompt prefix once, short-description prefix once
    assert engine.stats["prefix_fills"] - before["prefix_fills"] == 2


def test_bad_inputs_are_clear_errors(engine, image, masks):
    with pytest.raises(RegionError, match="mask is 10x10 but the image is 80x48"):
        engine.classify(image, [np.ones((10, 10), bool)], LABELS)
    with pytest.raises(RegionError, match="empty"):
        engine.classify(image, [np.zeros((48, 80), bool)], LABELS)
    with pytest.raises(ImageError):
        engine.classify(np.zeros((4, 4), np.float32), masks[:1], LABELS)
    with pytest.raises(ValueError, match="at least one"):
        engine.classify(image, masks[:1], [])
    with pytest.raises(ValueError, match="detail"):
        engine.describe(image, masks[:1], detail="long")


def test_no_regions_and_large_or_duplicate_label_sets(engine, image, masks):
    assert engine.classify(image, [], LABELS) == []
    assert engine.describe(image, [], max_new_tokens=2) == []
    assert engine.attributes(image, [], {"color": ["red"]}) == []
    many = [f"label {i}" for i in range(150)]
    res = engine.classify(image, masks[:2], many)
    assert len(res[0].scores) == 150 and abs(sum(res[0].scores.values()) - 1) < 1e-6
    plain = plain_option_logliks(engine.model, engine.tokenizer, image, masks[1], conv.category_question(), many[:5])
    np.testing.assert_allclose([res[1].logprobs[m] for m in many[:5]], plain, atol=1e-4, rtol=0)
    dup = engine.classify(image, masks[:1], ["cat", "dog", "cat"])[0]
    assert list(dup.scores) == ["cat", "dog"]


def test_prefix_cache_is_bounded_across_images(engine, masks):
    from tests.conftest import synthetic_image

    old = engine.prefix_cache_size
    engine.prefix_cache_size = 2
    try:
        for seed in range(4):
            engine.classify(synthetic_image(seed=200 + seed), masks[:1], ["a", "b"])
        assert len(engine._prefixes) == 2
        engine.clear_caches()
        before = engine.stats["prefix_fills"]
        engine.classify(synthetic_image(seed=203), masks[:1], ["a", "b"])
        assert engine.stats["prefix_fills"] == before + 1
    finally:
        engine.prefix_cache_size = old
