"""The shapes generator: masks, labels and descriptions agree with the pixels; deterministic per seed."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pycocotools import mask as coco_mask

from osprey_core.regions import Region
from training import synthetic
from training.records import RegionExample

SCENES = list(synthetic.generate(12, seed=7, image_size=96))


def test_object_counts_and_vocabulary():
    for scene in SCENES:
        assert 3 <= len(scene.objects) <= 8
        assert scene.image.shape == (96, 96, 3) and scene.image.dtype == np.uint8
        for o in scene.objects:
            assert o.shape in synthetic.SHAPES and o.colour in synthetic.COLOURS
            assert o.size in synthetic.SIZES and o.position in synthetic.POSITIONS
    assert {o.shape for s in SCENES for o in s.objects} == set(synthetic.SHAPES)
    assert any(s.background.startswith("a plain") for s in SCENES)
    assert any(not s.background.startswith("a plain") for s in SCENES)


def test_colour_named_is_colour_drawn():
    for scene in SCENES:
        for o in scene.objects:
            pixels = scene.image[o.mask]
            assert len(pixels) > 0
            assert (pixels == np.array(synthetic.COLOURS[o.colour], dtype=np.uint8)).all(), o.short()


def test_mask_covers_only_the_visible_pixels():
    occluded = 0
    for scene in SCENES:
        objs = scene.objects
        union = np.zeros(scene.image.shape[:2], dtype=int)
        for i, o in enumerate(objs):
            union += o.mask
            assert not (o.mask & ~o.full_mask).any()  # visible part of its own shape
            above = np.zeros_like(o.full_mask)
            for later in objs[i + 1:]:
                above |= later.full_mask
            # exactly the pixels of its shape that nothing drawn later covers
            assert np.array_equal(o.mask, o.full_mask & ~above)
            assert o.visible_fraction >= 0.6 - 1e-9
            occluded += bool(o.occluders)
            # no pixel outside the visible mask has been left in this object's colour by this object:
            # the hidden part shows the colour of what covers it
            hidden = o.full_mask & ~o.mask
            if hidden.any():
                assert o.occluders
        assert union.max() <= 1  # visible masks never overlap
    assert occluded > 0  # the generator does produce occlusion


def test_shape_mask_redraws_the_same_object():
    scene = SCENES[0]
    o = scene.objects[0]
    again = synthetic.shape_mask(o.shape, o.center[0], o.center[1], o.radius, o.angle, 96, 96)
    assert np.array_equal(again, o.full_mask)


def test_position_and_size_words():
    for scene in SCENES:
        for o in scene.objects:
            ys, xs = np.nonzero(o.mask)
            col = ["left", None, "right"][min(2, int(3 * (xs.mean() + 0.5) / 96))]
            row = ["top", None, "bottom"][min(2, int(3 * (ys.mean() + 0.5) / 96))]
            if col and row:
                assert o.position == f"{row} {col}"
            lo, hi = synthetic.SIZE_RADII[o.size]
            assert lo * 96 <= o.radius <= hi * 96
            assert o.short() == f"a {o.size} {o.colour} {o.shape} {synthetic.POSITION_PHRASES[o.position]}"


def test_deterministic_per_seed_and_index():
    again = list(synthetic.generate(12, seed=7, image_size=96))
    for a, b in zip(SCENES, again, strict=True):
        assert np.array_equal(a.image, b.image)
        assert [o.short() for o in a.objects] == [o.short() for o in b.objects]
    # image i depends only on (seed, i)
    assert np.array_equal(next(synthetic.generate(1, seed=7, start=5, image_size=96)).image, SCENES[5].image)
    other = next(synthetic.generate(1, seed=8, image_size=96))
    assert not np.array_equal(other.image, SCENES[0].image)


def test_excluded_shapes_never_appear():
    shapes = [s for s in synthetic.SHAPES if s != "hexagon"]
    for scene in synthetic.generate(10, seed=3, image_size=64, shapes=shapes):
        assert all(o.shape != "hexagon" for o in scene.objects)
    with pytest.raises(ValueError, match="unknown shapes"):
        synthetic.generate_scene(0, 0, shapes=["blob"])


def test_demo_data_writes_every_format(tmp_path):
    paths = synthetic.demo_data(tmp_path, images=3, seed=1, image_size=64)
    pngs = sorted(paths["images"].glob("*.png"))
    assert len(pngs) == 3
    records = synthetic.read_region_examples(paths["regions"])
    assert records and all(isinstance(r, RegionExample) for r in records)
    scenes = list(synthetic.generate(3, seed=1, image_size=64))
    assert len(records) == sum(len(s.objects) for s in scenes)
    first = records[0]
    decoded = coco_mask.decode({"size": first.rle["size"], "counts": first.rle["counts"].encode()})
    assert np.array_equal(decoded.astype(bool), scenes[0].objects[0].mask)
    assert first.category == scenes[0].objects[0].shape and first.short == scenes[0].objects[0].short()

    entries = json.loads(paths["osprey"].read_text())
    assert entries[0]["file_name"] == pngs[0].name
    assert len(entries[0]["annotation"]) == len(entries[0]["description"]) == len(scenes[0].objects)
    tasks = json.loads(paths["labelstudio"].read_text())
    brush = [r for r in tasks[0]["predictions"][0]["result"] if r["type"] == "brushlabels"]
    assert len(brush) == len(scenes[0].objects)
    region = Region.from_ls_brush(brush[0]["value"]["rle"], 64, 64)
    assert np.array_equal(region.mask, scenes[0].objects[0].mask)
    assert brush[0]["value"]["brushlabels"] == [scenes[0].objects[0].shape]
    assert json.loads(paths["label_space"].read_text())["categories"] == list(synthetic.SHAPES)
