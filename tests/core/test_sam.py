"""SAM refinement and proposals through the real segment-anything modules and our real loading path.

No SAM weights can be downloaded here, so a tiny SAM ("tiny" preset: 64-pixel input, 32-wide layers)
is built with random weights, saved with torch.save and loaded back through `load_sam`. Outputs are
therefore meaningless as segmentations; the tests check shapes, types, selection, caching and errors.
"""

from __future__ import annotations

import pickle
from collections import OrderedDict

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from osprey_core.errors import CheckpointError, ConfigError, ImageError, RegionError
from osprey_core.regions import Region
from osprey_core.sam import (
    SAM_CONFIGS,
    SamConfig,
    SamProposer,
    SamRefiner,
    build_refiner,
    build_sam,
    load_sam,
)


def make_image(seed: int, width: int = 80, height: int = 48) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 60, (height, width, 3), dtype=np.uint8)
    img[8:30, 10:40] = (220, 40, 40)
    return img


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("sam") / "sam_tiny.pth"
    torch.save(build_sam("tiny").state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def refiner(checkpoint) -> SamRefiner:
    return SamRefiner(checkpoint, model_type="tiny")


def count_encoder_calls(refiner: SamRefiner) -> list[int]:
    calls = [0]

    def hook(*_):
        calls[0] += 1

    refiner.model.image_encoder.register_forward_hook(hook)
    return calls


# ---------------------------------------------------------------------- loading


def test_load_restores_saved_weights(checkpoint):
    saved = torch.load(checkpoint, weights_only=True)
    model = load_sam(checkpoint, "tiny")
    loaded = model.state_dict()
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert not model.training


def test_load_safetensors_and_wrapped_state_dicts(checkpoint, tmp_path):
    state = torch.load(checkpoint, weights_only=True)
    st = tmp_path / "sam.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(st))
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"model": state}, wrapped)
    for path in (st, wrapped):
        loaded = load_sam(path, "tiny").state_dict()
        assert all(torch.equal(state[k], loaded[k]) for k in state)


def test_custom_config_builds_with_those_sizes():
    cfg = SamConfig(
        16,
        1,
        1,
        (0,),
        image_size=32,
        window_size=0,
        prompt_embed_dim=16,
        mask_in_chans=2,
        decoder_mlp_dim=16,
        decoder_num_heads=1,
        iou_head_hidden_dim=8,
    )
    model = build_sam(cfg)
    assert model.image_encoder.img_size == 32
    assert model.prompt_encoder.embed_dim == 16
    assert SAM_CONFIGS["vit_b"].encoder_embed_dim == 768


def test_checkpoint_errors_name_the_file(checkpoint, tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(CheckpointError, match="nope.pth does not exist"):
        load_sam(missing, "tiny")

    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(open(checkpoint, "rb").read()[:5000])
    with pytest.raises(CheckpointError, match="truncated.pth is unreadable or not a plain weights file"):
        load_sam(truncated, "tiny")

    evil = tmp_path / "object.pth"
    with open(evil, "wb") as f:  # a legacy pickle holding an arbitrary object
        pickle.dump({"weight": OrderedDict(a=1), "cfg": ConfigError("x")}, f)
    with pytest.raises(CheckpointError, match="object.pth is unreadable or not a plain weights file"):
        load_sam(evil, "tiny")

    not_tensors = tmp_path / "not_tensors.pth"
    torch.save({"image_encoder.pos_embed": 3, "note": "hello"}, not_tensors)
    with pytest.raises(CheckpointError, match="not_tensors.pth is not a plain state dict: .* holds int"):
        load_sam(not_tensors, "tiny")

    a_list = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], a_list)
    with pytest.raises(CheckpointError, match="list.pth holds a list, expected a state dict"):
        load_sam(a_list, "tiny")

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="garbage.safetensors is unreadable"):
        load_sam(garbage, "tiny")


def test_checkpoint_of_another_size_is_rejected(checkpoint):
    other = SamConfig(
        16,
        1,
        1,
        (0,),
        image_size=64,
        window_size=0,
        prompt_embed_dim=32,
        mask_in_chans=4,
        decoder_mlp_dim=64,
        decoder_num_heads=2,
        iou_head_hidden_dim=32,
    )
    with pytest.raises(CheckpointError, match="sam_tiny.pth does not fit model type 'custom'"):
        load_sam(checkpoint, other)


def test_bad_configuration(checkpoint):
    with pytest.raises(ConfigError, match="unknown SAM model type 'vit_x'"):
        load_sam(checkpoint, "vit_x")
    with pytest.raises(ConfigError, match="cannot put SAM on device"):
        load_sam(checkpoint, "tiny", device="nodevice")
    with pytest.raises(ConfigError, match="cache_size"):
        SamRefiner(checkpoint, "tiny", cache_size=0)


def test_build_refiner(checkpoint):
    assert build_refiner(None) is None
    assert build_refiner("") is None
    assert isinstance(build_refiner(checkpoint, "tiny"), SamRefiner)


# ---------------------------------------------------------------------- refinement


def test_box_to_mask_shape_and_type(refiner):
    img = make_image(0)
    r = refiner.box_to_mask(img, (10, 8, 40, 30))
    assert isinstance(r, Region)
    assert r.size == (80, 48) and r.mask.dtype == bool
    assert refiner.box_to_mask(Image.fromarray(img), [10, 8, 40, 30]) == r  # PIL input, same pixels


def test_points_to_mask_picks_the_best_scoring_mask(refiner):
    img = make_image(1)
    r = refiner.points_to_mask(img, [(20, 15), (60, 40)], [1, 0])
    refiner.set_image(img)
    masks, scores, _ = refiner.predictor.predict(
        point_coords=np.array([[20.0, 15.0], [60.0, 40.0]]),
        point_labels=np.array([1, 0]),
        multimask_output=True,
    )
    assert masks.shape == (3, 48, 80)
    assert np.array_equal(r.mask, masks[int(np.argmax(scores))])


def test_image_is_encoded_once_per_content(checkpoint):
    refiner = SamRefiner(checkpoint, "tiny", cache_size=2)
    calls = count_encoder_calls(refiner)
    a, b, c = make_image(0), make_image(1), make_image(2)
    first = refiner.box_to_mask(a, (10, 8, 40, 30))
    refiner.points_to_mask(a.copy(), [(20, 15)], [1])  # same content, new array
    assert calls[0] == 1
    refiner.box_to_mask(b, (0, 0, 30, 30))
    assert calls[0] == 2
    assert refiner.box_to_mask(a, (10, 8, 40, 30)) == first  # back from the cache, same result
    assert calls[0] == 2
    refiner.box_to_mask(c, (0, 0, 30, 30))  # evicts b (least recently used)
    refiner.box_to_mask(b, (0, 0, 30, 30))
    assert calls[0] == 4


def test_refiner_input_errors(refiner):
    img = make_image(0)
    with pytest.raises(ImageError, match="uint8"):
        refiner.box_to_mask(img.astype(np.float32), (0, 0, 5, 5))
    with pytest.raises(ImageError, match="HxWx3"):
        refiner.box_to_mask(np.zeros((4, 4, 2), np.uint8), (0, 0, 5, 5))
    with pytest.raises(ImageError, match="PIL image"):
        refiner.box_to_mask("image.png", (0, 0, 5, 5))
    with pytest.raises(RegionError, match="box must have shape"):
        refiner.box_to_mask(img, (0, 0, 5))
    with pytest.raises(RegionError, match="NaN or infinite"):
        refiner.box_to_mask(img, (0, 0, float("nan"), 5))
    with pytest.raises(RegionError, match="empty or outside"):
        refiner.box_to_mask(img, (100, 100, 120, 120))
    with pytest.raises(RegionError, match="outside the 80x48 image"):
        refiner.points_to_mask(img, [(100, 10)], [1])
    with pytest.raises(RegionError, match="labels must be 1 values"):
        refiner.points_to_mask(img, [(10, 10)], [2])
    with pytest.raises(RegionError, match="at least one object point"):
        refiner.points_to_mask(img, [(10, 10)], [0])
    with pytest.raises(RegionError, match="at least one point"):
        refiner.points_to_mask(img, [], [])


# ---------------------------------------------------------------------- regions built with a refiner


def test_ls_rectangle_and_keypoint_use_the_refiner(refiner):
    img = make_image(3)
    rect = Region.from_ls_rectangle(12.5, 12.5, 37.5, 50, 0, 80, 48, refiner=refiner, image=img, id="r")
    assert rect.id == "r"
    assert rect.with_id(None) == refiner.box_to_mask(img, (10, 6, 40, 30))
    point = Region.from_ls_keypoint(25, 50, 80, 48, refiner=refiner, image=img, id="k")
    assert point.with_id(None) == refiner.points_to_mask(img, [(20, 24)], [1])
    with pytest.raises(RegionError, match="needs the image"):
        Region.from_ls_rectangle(12.5, 12.5, 37.5, 50, 0, 80, 48, refiner=refiner)
    with pytest.raises(RegionError, match="refined mask is 80x48 but image is 160x96"):
        Region.from_ls_rectangle(12.5, 12.5, 37.5, 50, 0, 160, 96, refiner=refiner, image=img)


def test_empty_sam_mask_falls_back_to_the_drawn_shape(checkpoint):
    """A SAM whose mask hypernetworks output zeros predicts logit 0 everywhere, i.e. nothing."""
    refiner = SamRefiner(checkpoint, "tiny")
    with torch.no_grad():
        for mlp in refiner.model.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.zero_()
            mlp.layers[-1].bias.zero_()
    img = make_image(0)
    assert refiner.box_to_mask(img, (10, 8, 40, 30)).area == 0
    rect = Region.from_ls_rectangle(12.5, 12.5, 37.5, 50, 0, 80, 48, refiner=refiner, image=img)
    assert rect == Region.from_ls_rectangle(12.5, 12.5, 37.5, 50, 0, 80, 48)
    point = Region.from_ls_keypoint(25, 50, 80, 48, radius_px=4, refiner=refiner, image=img)
    assert point == Region.from_ls_keypoint(25, 50, 80, 48, radius_px=4)


# ---------------------------------------------------------------------- proposals


def test_proposer_sorts_and_filters_by_area(refiner):
    img = make_image(4)
    # Random weights: accept every mask (thresholds 0, no NMS) so there are many of varied size.
    options = dict(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0)
    everything = SamProposer.from_model(refiner.model, min_area=0, **options).propose(img)
    assert len(everything) > 3
    assert all(isinstance(r, Region) and r.size == (80, 48) and r.area > 0 for r in everything)
    areas = [r.area for r in everything]
    assert areas == sorted(areas, reverse=True)
    cut = sorted(areas)[len(areas) // 2]
    big = SamProposer.from_model(refiner.model, min_area=cut, **options).propose(img)
    assert [r.area for r in big] == [a for a in areas if a >= cut]
    top = SamProposer.from_model(refiner.model, min_area=0, max_regions=2, **options).propose(img)
    assert top == everything[:2]


def test_proposer_loads_from_checkpoint_and_validates(checkpoint):
    proposer = SamProposer(
        checkpoint, "tiny", points_per_side=2, pred_iou_thresh=0.0, stability_score_thresh=0.0
    )
    assert isinstance(proposer.propose(make_image(5)), list)
    with pytest.raises(ConfigError, match="min_area"):
        SamProposer(checkpoint, "tiny", min_area=-1)
    with pytest.raises(ConfigError, match="max_regions"):
        SamProposer(checkpoint, "tiny", max_regions=0)
