"""Dataset builder: the prompts, the split by image, Osprey-724K reading and the spec §9.2 loss mask."""

from __future__ import annotations

import json
import random

import pytest

from osprey_core import conversation as conv
from osprey_core.tokenizer import build_tiny_tokenizer, continuation_ids, tokenizer_image_token
from training import dataset, synthetic
from training.dataset import IGNORE_INDEX, DatasetError, Sample
from training.records import LabelSpace, RegionExample

RLE = synthetic.coco_rle(synthetic.shape_mask("circle", 16, 16, 8, 0, 32, 32))
LABELS = LabelSpace(("circle", "square", "star"), {"color": ("red", "blue"), "size": ("small", "large")})


def example(image="a.png", category="circle", **kw) -> RegionExample:
    base = dict(image=image, image_sha256="sha-" + image, width=32, height=32, rle=RLE, category=category,
                attributes={"color": ("red",), "size": ("small",)}, short="a small red circle",
                detailed="This is a small red circle in the center of the image.")
    base.update(kw)
    return RegionExample(**base)


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer(1024)


def test_one_question_per_task_with_the_official_prompts():
    samples = dataset.region_samples(example(), LABELS, rng=random.Random(0), negatives=2)
    by_task: dict[str, list[Sample]] = {}
    for s in samples:
        by_task.setdefault(s.task, []).append(s)
    assert [s.turns[0] for s in by_task["category"]] == [(conv.CATEGORY_PROMPT, "circle")]
    assert sorted(s.turns[0] for s in by_task["attributes"]) == sorted(
        [(conv.attribute_question("color"), "red"), (conv.attribute_question("size"), "small")])
    assert by_task["short"][0].turns[0] == (conv.SHORT_PROMPT, "a small red circle")
    assert by_task["detailed"][0].turns[0][0] == conv.DETAILED_PROMPT
    posneg = by_task["posneg"]
    assert [a for _, ((_, a),) in [(s, s.turns) for s in posneg]] == ["Yes", "No", "No"]
    asked = set()
    for s in posneg:
        q = s.turns[0][0]
        assert q.startswith(conv.OVERVIEW) and q.count(conv.REGION) == 1
        body = q[len(conv.OVERVIEW):].replace(conv.REGION, "<region>")
        cat = next(c for c in LABELS.categories if c in body)
        assert body.replace(cat, "<category>") in conv.POSNEG_TEMPLATES
        asked.add(cat)
    assert asked == {"circle", "square", "star"}  # the negatives are the other labels
    for s in samples:
        assert s.masks == (RLE,) and s.image_key == "sha-a.png"


def test_paper_templates_when_mixed_in():
    samples = dataset.region_samples(example(), LABELS, tasks=("short", "detailed"), rng=random.Random(1),
                                     template_mix=1.0)
    short = next(s for s in samples if s.task == "short").turns[0][0]
    detailed = next(s for s in samples if s.task == "detailed").turns[0][0]
    assert short.endswith(dataset.SHORT_SUFFIX)
    body = short[len(conv.OVERVIEW):-len(dataset.SHORT_SUFFIX)].replace(conv.REGION, "<region>")
    assert body in conv.SHORT_TEMPLATES
    assert detailed[len(conv.OVERVIEW):].replace(conv.REGION, "<region>") in conv.DETAILED_TEMPLATES


def test_unknown_category_and_task_are_refused():
    with pytest.raises(DatasetError, match="not in the label set"):
        dataset.build_samples([example(category="hexagon")], LABELS)
    with pytest.raises(DatasetError, match="unknown tasks"):
        dataset.region_samples(example(), LABELS, tasks=("captions",))


def test_split_by_image_is_disjoint_deterministic_and_stable():
    exs = [example(image=f"img{i // 3}.png", region_id=str(i)) for i in range(300)]
    train, held = dataset.split_by_image(exs, held_out=0.25, seed=3)
    train_imgs, held_imgs = {e.image for e in train}, {e.image for e in held}
    assert not train_imgs & held_imgs and len(train) + len(held) == len(exs)
    assert 0.1 < len(held_imgs) / 100 < 0.4
    again = dataset.split_by_image(exs, held_out=0.25, seed=3)
    assert [e.region_id for e in again[1]] == [e.region_id for e in held]
    # more data later: no image changes side
    more = exs + [example(image=f"new{i}.png") for i in range(50)]
    _, held_more = dataset.split_by_image(more, held_out=0.25, seed=3)
    assert {e.image for e in held_more if e.image.startswith("img")} == held_imgs
    other_seed = {e.image for e in dataset.split_by_image(exs, held_out=0.25, seed=4)[1]}
    assert other_seed != held_imgs
    # a tiny set still holds one image out
    assert len(dataset.split_by_image(exs[:6], held_out=0.2, seed=0)[1]) == 3


def test_labels_supervise_exactly_the_answer_the_engine_scores(tok):
    for task_sample in dataset.region_samples(example(), LABELS, rng=random.Random(0)):
        enc = dataset.encode(task_sample, tok)
        assert enc is not None and len(enc.labels) == len(enc.input_ids)
        question, answer = task_sample.turns[0]
        prompt = conv.chat_prompt(question, system=conv.SYSTEM_OSPREY_V1)
        prompt_ids = tokenizer_image_token(prompt, tok)
        supervised = [t for t in enc.labels if t != IGNORE_INDEX]
        # what the engine's classify scores after the serving prompt, `</s>` included
        assert supervised == continuation_ids(tok, prompt_ids, prompt, answer)
        assert enc.input_ids[: len(prompt_ids)] == prompt_ids
        assert all(lab == IGNORE_INDEX for lab in enc.labels[: len(prompt_ids)])
        assert enc.labels[-1] == tok.eos_token_id


def test_vicuna_system_prompt_option(tok):
    s = dataset.region_samples(example(), LABELS, tasks=("category",))[0]
    assert dataset.render(s, "vicuna_v1").startswith(conv.SYSTEM_VICUNA_V1 + " USER: ")
    with pytest.raises(DatasetError):
        dataset.render(s, "llama_2")


def test_mismatched_sample_is_dropped_and_counted(tok):
    good = dataset.region_samples(example(), LABELS, tasks=("category",))[0]
    # an answer with a literal </s> splits into rounds that no longer add up to the real length
    bad = Sample(good.image, good.image_key, 32, 32, good.masks, ((good.turns[0][0], "circle</s>extra"),))
    encoded, stats = dataset.encode_all([good, bad, good], tok)
    assert len(encoded) == 2 and stats.kept == 2 and stats.mismatched == 1
    _, stats = dataset.encode_all([good], tok, max_length=10)
    assert stats.too_long == 1 and stats.kept == 0


def test_read_osprey_724k_styles(tmp_path, tok):
    poly = [[2.0, 2.0, 20.0, 2.0, 20.0, 20.0, 2.0, 20.0]]
    entries = [
        {"file_name": "COCO_train2014_000000000009.jpg", "height": 32, "width": 32,
         "annotation": [{"segmentation": poly}, {"segmentation": RLE}],
         "conversations": [{"from": "human", "value": "What is <region1> next to <region2>?"},
                           {"from": "gpt", "value": "A circle next to <region2>."},
                           {"from": "human", "value": "And its colour?"}, {"from": "gpt", "value": "Red."}]},
        {"file_name": "b.jpg", "height": 32, "width": 32, "annotation": [{"segmentation": RLE}],
         "description": ["<region1>: A red circle on grey."]},
    ]
    path = tmp_path / "osprey_conversation.json"
    path.write_text(json.dumps(entries))
    samples = dataset.read_osprey_json(path, image_root=tmp_path)
    conv_sample, desc = samples
    q0, a0 = conv_sample.turns[0]
    assert q0 == (conv.OVERVIEW + "Ther are 2 part regions in the picture: region1<mask><pos>,region2<mask><pos>. "
                  "What is region1 next to region2?")
    assert a0 == "A circle next to region2." and len(conv_sample.masks) == 2
    assert conv_sample.masks[0]["size"] == [32, 32] and isinstance(conv_sample.masks[0]["counts"], str)
    assert desc.task == "detailed" and desc.turns[0][1] == "A red circle on grey."
    short = dataset.read_osprey_json(path, image_root=tmp_path, style="short_form")[0]
    assert all(q.endswith(dataset.SINGLE_WORD_SUFFIX) for q, _ in short.turns)

    posneg = [{"file_name": "c.jpg", "height": 32, "width": 32, "annotation": [{"segmentation": RLE}],
               "conversations": [{"from": "human", "value": "Is the category of <region1> cat?"},
                                 {"from": "gpt", "value": "No"}]}]
    path.write_text(json.dumps(posneg))
    (s,) = dataset.read_osprey_json(path, image_root=tmp_path, style="posneg")
    assert s.turns[0] == (conv.OVERVIEW + "Is the category of <mask><pos> cat?", "No")
    assert dataset.encode(s, tok) is not None

    path.write_text(json.dumps([{"file_name": "x.jpg", "height": 32}]))
    with pytest.raises(DatasetError, match="entry 0 is malformed"):
        dataset.read_osprey_json(path)
    path.write_text("{not json")
    with pytest.raises(DatasetError, match="cannot read"):
        dataset.read_osprey_json(path)


def test_synthetic_records_build_and_encode(tmp_path, tok):
    scenes = list(synthetic.generate(2, seed=0, image_size=64))
    written = synthetic.write_images(scenes, tmp_path)
    exs = [r for sc, p, sha in written for r in synthetic.region_examples(sc, p, sha)]
    samples = dataset.build_samples(exs, synthetic.label_space(), seed=0)
    encoded, stats = dataset.encode_all(samples, tok)
    assert stats.mismatched == 0 and stats.kept == len(samples)
    assert set(stats.by_task) == set(dataset.TASKS)
    assert dataset.dataset_fingerprint(samples) == dataset.dataset_fingerprint(
        dataset.build_samples(exs, synthetic.label_space(), seed=0))
