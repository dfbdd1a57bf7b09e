"""SAM (`segment-anything`) for regions: refine a drawn box or click into an object mask, and propose
every object of an image for bulk auto-labeling.

torch and segment_anything are imported inside functions, so importing this module (e.g. to read
`build_refiner`'s signature in the web process) stays light. Checkpoints are read with
`torch.load(weights_only=True)` (or safetensors) and loaded strictly, so a wrong, truncated or
non-weights file fails with a `CheckpointError` naming it instead of running arbitrary pickle code.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from .errors import CheckpointError, ConfigError, ImageError, RegionError
from .regions import Region

if TYPE_CHECKING:
    from segment_anything.modeling import Sam


@dataclass(frozen=True)
class SamConfig:
    """Sizes of a SAM model (the values of segment_anything's `_build_sam` for the official ones)."""

    encoder_embed_dim: int
    encoder_depth: int
    encoder_num_heads: int
    encoder_global_attn_indexes: tuple[int, ...]
    image_size: int = 1024
    patch_size: int = 16
    window_size: int = 14
    prompt_embed_dim: int = 256
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    iou_head_hidden_dim: int = 256


SAM_CONFIGS: dict[str, SamConfig] = {
    "vit_b": SamConfig(768, 12, 12, (2, 5, 8, 11)),
    "vit_l": SamConfig(1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": SamConfig(1280, 32, 16, (7, 15, 23, 31)),
    # Random-weight test preset: a 64-pixel input and 32-wide layers, builds and runs in milliseconds.
    "tiny": SamConfig(
        32,
        2,
        2,
        (1,),
        image_size=64,
        window_size=2,
        prompt_embed_dim=32,
        mask_in_chans=4,
        decoder_mlp_dim=64,
        decoder_num_heads=2,
        iou_head_hidden_dim=32,
    ),
}
SAM_CONFIGS["default"] = SAM_CONFIGS["vit_h"]  # segment_anything's registry alias


def sam_config(model_type: str | SamConfig) -> SamConfig:
    if isinstance(model_type, SamConfig):
        return model_type
    if model_type not in SAM_CONFIGS:
        raise ConfigError(f"unknown SAM model type {model_type!r}; expected one of {sorted(SAM_CONFIGS)}")
    return SAM_CONFIGS[model_type]


def build_sam(model_type: str | SamConfig = "vit_b") -> Sam:
    """A randomly initialised SAM of the given type or sizes, in eval mode."""
    from functools import partial

    import torch
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    cfg = sam_config(model_type)
    grid = cfg.image_size // cfg.patch_size
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=cfg.encoder_depth,
            embed_dim=cfg.encoder_embed_dim,
            img_size=cfg.image_size,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=cfg.encoder_num_heads,
            patch_size=cfg.patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=cfg.encoder_global_attn_indexes,
            window_size=cfg.window_size,
            out_chans=cfg.prompt_embed_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=cfg.prompt_embed_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(cfg.image_size, cfg.image_size),
            mask_in_chans=cfg.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=cfg.decoder_depth,
                embedding_dim=cfg.prompt_embed_dim,
                mlp_dim=cfg.decoder_mlp_dim,
                num_heads=cfg.decoder_num_heads,
            ),
            transformer_dim=cfg.prompt_embed_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=cfg.iou_head_hidden_dim,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return sam.eval()


def load_sam(checkpoint: str | Path, model_type: str | SamConfig = "vit_b", device: str = "cpu") -> Sam:
    """Build SAM and load a checkpoint (official `sam_vit_*.pth`, or a `.safetensors` state dict)."""
    import torch

    path = Path(checkpoint)
    if not path.is_file():
        raise CheckpointError(f"SAM checkpoint {path} does not exist or is not a file")
    state = _read_state_dict(path)
    model = build_sam(model_type)
    name = model_type if isinstance(model_type, str) else "custom"
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        detail = str(e).strip().splitlines()
        raise CheckpointError(
            f"SAM checkpoint {path} does not fit model type {name!r}: {detail[1].strip() if len(detail) > 1 else e}"
        ) from e
    try:
        dev = torch.device(device)
        return model.to(dev).eval()
    except (RuntimeError, AssertionError) as e:
        raise ConfigError(f"cannot put SAM on device {device!r}: {e}") from e


def _read_state_dict(path: Path) -> dict[str, Any]:
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, forbidden global...: all mean "not a weights file"
        raise CheckpointError(f"SAM checkpoint {path} is unreadable or not a plain weights file: {e}") from e
    if isinstance(state, dict) and len(state) == 1 and next(iter(state)) in ("model", "state_dict"):
        state = next(iter(state.values()))
    if not isinstance(state, dict):
        raise CheckpointError(f"SAM checkpoint {path} holds a {type(state).__name__}, expected a state dict")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"SAM checkpoint {path} is not a plain state dict: {key!r} holds {type(value).__name__}"
            )
    return state


def _to_rgb(image: Any) -> np.ndarray:
    """PIL image or HxW / HxWx3 / HxWx4 uint8 array -> C-contiguous HxWx3 uint8 RGB."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if not isinstance(image, np.ndarray):
        raise ImageError(f"image must be a PIL image or an HxWx3 uint8 array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ImageError(f"image array must be uint8, got {image.dtype}")
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    if image.ndim != 3 or image.shape[2] not in (3, 4) or min(image.shape[:2]) == 0:
        raise ImageError(f"image array must be HxWx3 (RGB), got shape {tuple(image.shape)}")
    return np.ascontiguousarray(image[:, :, :3])


def _image_key(rgb: np.ndarray) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(str(rgb.shape).encode())
    h.update(rgb.data)
    return h.hexdigest()


class SamRefiner:
    """Box / click prompts -> object masks. Image embeddings are cached by image content, so every
    prompt on an image after the first costs only the (small) mask decoder."""

    def __init__(
        self,
        checkpoint: str | Path,
        model_type: str | SamConfig = "vit_b",
        device: str = "cpu",
        *,
        cache_size: int = 4,
    ) -> None:
        self._setup(load_sam(checkpoint, model_type, device), cache_size)

    @classmethod
    def from_model(cls, model: Sam, *, cache_size: int = 4) -> SamRefiner:
        refiner = cls.__new__(cls)
        refiner._setup(model, cache_size)
        return refiner

    def _setup(self, model: Sam, cache_size: int) -> None:
        from segment_anything import SamPredictor

        if cache_size < 1:
            raise ConfigError(f"cache_size must be >= 1, got {cache_size}")
        self.model = model
        self.predictor = SamPredictor(model)
        self.cache_size = cache_size
        self._cache: OrderedDict[str, tuple[Any, tuple[int, ...], tuple[int, ...]]] = OrderedDict()
        self._current: str | None = None
        self._lock = threading.Lock()

    def set_image(self, image: Any) -> np.ndarray:
        """Make `image` the predictor's current image, encoding it only if it is not cached.
        Returns the RGB array used."""
        rgb = _to_rgb(image)
        key = _image_key(rgb)
        with self._lock:
            self._activate(rgb, key)
        return rgb

    def _activate(self, rgb: np.ndarray, key: str) -> None:
        p = self.predictor
        if key == self._current and p.is_image_set:
            return
        if key in self._cache:
            p.features, p.original_size, p.input_size = self._cache[key]
            p.is_image_set = True
            self._cache.move_to_end(key)
        else:
            p.set_image(rgb)
            self._cache[key] = (p.features, p.original_size, p.input_size)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        self._current = key

    def box_to_mask(self, image: Any, box_xyxy: Sequence[float]) -> Region:
        """The mask SAM predicts for a pixel box (x0, y0, x1, y1); may be empty if SAM sees nothing."""
        rgb = _to_rgb(image)
        h, w = rgb.shape[:2]
        box = _finite(box_xyxy, "box", (4,))
        box = np.clip(box, 0, [w, h, w, h])
        if not (box[0] < box[2] and box[1] < box[3]):
            raise RegionError(f"box {list(map(float, box_xyxy))} is empty or outside the {w}x{h} image")
        with self._lock:
            self._activate(rgb, _image_key(rgb))
            masks, _, _ = self.predictor.predict(box=box, multimask_output=False)
        return Region(masks[0], allow_empty=True)

    def points_to_mask(self, image: Any, points: Sequence[Sequence[float]], labels: Sequence[int]) -> Region:
        """The best-scoring of SAM's three masks for clicks (x, y) in pixels; label 1 = object,
        0 = background. May be empty if SAM sees nothing."""
        rgb = _to_rgb(image)
        h, w = rgb.shape[:2]
        pts = _finite(points, "points", (-1, 2))
        if len(pts) == 0:
            raise RegionError("points_to_mask needs at least one point")
        lab = np.asarray(labels)
        if lab.shape != (len(pts),) or not np.isin(lab, (0, 1)).all():
            raise RegionError(
                f"labels must be {len(pts)} values of 0 (background) or 1 (object), got {labels!r}"
            )
        if not (lab == 1).any():
            raise RegionError("points_to_mask needs at least one object point (label 1)")
        outside = (pts[:, 0] < 0) | (pts[:, 0] > w) | (pts[:, 1] < 0) | (pts[:, 1] > h)
        if outside.any():
            i = int(np.flatnonzero(outside)[0])
            raise RegionError(f"point {i} {pts[i].tolist()} is outside the {w}x{h} image")
        with self._lock:
            self._activate(rgb, _image_key(rgb))
            masks, scores, _ = self.predictor.predict(
                point_coords=pts, point_labels=lab.astype(np.int64), multimask_output=True
            )
        return Region(masks[int(np.argmax(scores))], allow_empty=True)


class SamProposer:
    """SAM "segment everything" for bulk auto-labeling: all object masks of an image, largest first."""

    def __init__(
        self, checkpoint: str | Path, model_type: str | SamConfig = "vit_b", device: str = "cpu", **options: Any
    ) -> None:
        """`options`: min_area, max_regions and SamAutomaticMaskGenerator's knobs (see `_setup`)."""
        self._setup(load_sam(checkpoint, model_type, device), **options)

    @classmethod
    def from_model(cls, model: Sam, **options: Any) -> SamProposer:
        """Share one loaded SAM (e.g. a `SamRefiner`'s `.model`) instead of loading it twice."""
        proposer = cls.__new__(cls)
        proposer._setup(model, **options)
        return proposer

    def _setup(
        self,
        model: Sam,
        *,
        min_area: int = 100,
        max_regions: int | None = None,
        points_per_side: int = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        box_nms_thresh: float = 0.7,
    ) -> None:
        from segment_anything import SamAutomaticMaskGenerator

        if min_area < 0:
            raise ConfigError(f"min_area must be >= 0 pixels, got {min_area}")
        if max_regions is not None and max_regions < 1:
            raise ConfigError(f"max_regions must be >= 1 or None, got {max_regions}")
        if points_per_side < 1 or points_per_batch < 1:
            raise ConfigError("points_per_side and points_per_batch must be >= 1")
        self.model = model
        self.min_area = min_area
        self.max_regions = max_regions
        # coco_rle output keeps memory at one mask at a time until the area filter has run.
        self.generator = SamAutomaticMaskGenerator(
            model,
            points_per_side=points_per_side,
            points_per_batch=points_per_batch,
            pred_iou_thresh=pred_iou_thresh,
            stability_score_thresh=stability_score_thresh,
            box_nms_thresh=box_nms_thresh,
            output_mode="coco_rle",
        )
        self._lock = threading.Lock()

    def propose(self, image: Any) -> list[Region]:
        """Object masks of at least `min_area` pixels, sorted by area (largest first), at most
        `max_regions` of them."""
        rgb = _to_rgb(image)
        with self._lock:
            records = self.generator.generate(rgb)
        records = [r for r in records if r["area"] >= max(self.min_area, 1)]
        records.sort(key=lambda r: (-r["area"], -r["predicted_iou"]))
        if self.max_regions is not None:
            records = records[: self.max_regions]
        return [Region.from_coco_rle(r["segmentation"]) for r in records]


def build_refiner(
    checkpoint: str | Path | None, model_type: str | SamConfig = "vit_b", device: str = "cpu"
) -> SamRefiner | None:
    """A `SamRefiner` when a checkpoint is configured, else None (boxes stay box masks, clicks become
    small disks: see `Region.from_ls_rectangle` / `from_ls_keypoint`)."""
    if checkpoint is None or str(checkpoint).strip() == "":
        return None
    return SamRefiner(checkpoint, model_type, device)


def _finite(values: Any, name: str, shape: tuple[int, ...]) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise RegionError(f"{name} must be numbers, got {values!r}") from e
    if shape == (-1, 2):
        if arr.size == 0:
            return arr.reshape(0, 2)
        if arr.ndim != 2 or arr.shape[1] != 2:
            raise RegionError(f"{name} must be a list of [x, y] pairs, got shape {tuple(arr.shape)}")
    elif arr.shape != shape:
        raise RegionError(f"{name} must have shape {shape}, got {tuple(arr.shape)}")
    if not np.isfinite(arr).all():
        raise RegionError(f"{name} contains NaN or infinite values")
    return arr
