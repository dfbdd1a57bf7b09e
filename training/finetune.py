"""Fine-tuning: LoRA on the LLM's attention and MLP projections plus the mask extractor and projector
trained in full, vision tower frozen (the paper's stage-3 choices, scaled down); or full fine-tuning of
everything but the vision tower, for small models.

Loss: next-token cross-entropy on the assistant answers only (labels from `dataset.encode`, spec §9.2).
AdamW, cosine schedule with linear warmup, gradient accumulation, fp32 on CPU, bf16 autocast on GPU
(trainable weights kept in fp32), `accelerate` for several processes (`accelerate launch --config_file
deploy/accelerate/zero2.yaml -m training.cli train ...`). The vision tower is frozen, so each image's
feature maps are computed once and cached. Resumable: checkpoints of the trainable weights, the
optimizer and the step under `<out>/checkpoints/`; a rerun with the same data and settings continues
from the last one. Everything saved is safetensors or JSON.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .dataset import IGNORE_INDEX, DatasetError, Encoded, EncodeStats, Sample, dataset_fingerprint, encode_all

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
TRAINING_FILE = "training.json"
TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"


class TrainingError(RuntimeError):
    """A training run cannot start or continue (bad settings, no usable samples)."""


@dataclass
class TrainConfig:
    """Settings of one run; everything here (plus base and data) decides whether a checkpoint resumes."""

    mode: str = "lora"  # "lora" | "full"
    lr: float | None = None  # default: 2e-4 for LoRA, 2e-5 for full fine-tuning
    steps: int | None = None  # optimizer steps; default from epochs
    epochs: float = 2.0
    batch_size: int = 4
    grad_accum: int = 1
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    # Modules trained in full besides LoRA (always in "full" mode, with the LLM).
    train_extractor: bool = True
    train_projector: bool = True
    # The vision tower stays frozen in every Osprey stage; a model whose tower was never trained (the demo
    # preset, random init) needs it trained, or region features carry colour but hardly any shape.
    train_vision: bool = False
    system: str = "osprey_v1"
    max_length: int = 2048
    seed: int = 0
    save_every: int = 50  # optimizer steps between checkpoints (0: never)
    image_cache: int = 512  # images whose frozen vision features stay in memory

    def __post_init__(self) -> None:
        if self.mode not in ("lora", "full"):
            raise TrainingError(f"mode must be 'lora' or 'full', got {self.mode!r}")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise TrainingError("batch_size and grad_accum must be >= 1")
        if self.steps is not None and self.steps < 1:
            raise TrainingError("steps must be >= 1")
        if self.epochs <= 0:
            raise TrainingError("epochs must be > 0")

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return 2e-4 if self.mode == "lora" else 2e-5


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    samples_seen: int
    final_loss: float
    losses: list[float]
    encode: dict[str, Any]
    resumed_from: int = 0
    seconds: float = 0.0
    metadata: dict[str, Any] = field(default_factory=dict)
    model: Any = field(default=None, repr=False)  # the trained model as it is in memory (LoRA unmerged)


def cosine_lr(step: int, total: int, warmup: int, base: float) -> float:
    """Linear warmup to `base`, then cosine to 0 (transformers' `get_cosine_schedule_with_warmup`)."""
    if step < warmup:
        return base * (step + 1) / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# --- the model side --------------------------------------------------------------------------------------


class _VisionCache:
    """Per image key (LRU): the frozen tower's features, or, while the tower is trained and so must run
    on every sample, the decoded and preprocessed image."""

    def __init__(self, model, size: int):
        self.model, self.size = model, size
        self.items: OrderedDict[str, Any] = OrderedDict()

    def levels(self, sample: Sample) -> dict[str, torch.Tensor]:
        tower = self.model.model.vision_tower
        if tower.trainable:
            return {k: v[0] for k, v in tower(self._cached(sample, self._pixels)[None]).items()}
        return self._cached(sample, lambda s: {k: v[0] for k, v in tower(self._pixels(s)[None]).items()})

    def _cached(self, sample: Sample, make: Callable[[Sample], Any]) -> Any:
        if sample.image_key in self.items:
            self.items.move_to_end(sample.image_key)
            return self.items[sample.image_key]
        value = make(sample)
        self.items[sample.image_key] = value
        while len(self.items) > self.size:
            self.items.popitem(last=False)
        return value

    @torch.no_grad()
    def _pixels(self, sample: Sample) -> torch.Tensor:
        """The preprocessed image (3, S, S), checked against its regions' size."""
        from PIL import Image

        from osprey_core.image_processing import preprocess, to_pil

        try:
            with Image.open(sample.image) as im:
                pil = to_pil(im.convert("RGB"))
        except OSError as e:
            raise DatasetError(f"cannot read image {sample.image}: {e}") from e
        if pil.size != (sample.width, sample.height):
            raise DatasetError(f"{sample.image} is {pil.size[0]}x{pil.size[1]}, its regions are at "
                               f"{sample.width}x{sample.height}")
        tower = self.model.model.vision_tower
        return preprocess(pil, self.model.cfg.vision).to(self.model.device, tower.trunk.stem[0].weight.dtype)


def _decode_masks(sample: Sample, device) -> torch.Tensor:
    from pycocotools import mask as coco_mask

    masks = []
    for rle in sample.masks:
        h, w = rle["size"]
        if (w, h) != (sample.width, sample.height):
            raise DatasetError(f"a mask of {sample.image} is {w}x{h}, the image {sample.width}x{sample.height}")
        counts = rle["counts"].encode() if isinstance(rle["counts"], str) else rle["counts"]
        masks.append(coco_mask.decode({"size": [h, w], "counts": counts}))
    return torch.from_numpy(np.stack(masks).astype(np.float32)).to(device)


class OspreyTrainStep(nn.Module):
    """One module around the model whose forward is the loss of a micro-batch, so that `accelerate`
    (DDP / DeepSpeed) wraps the whole computation: splicing, LLM, shifted cross-entropy."""

    def __init__(self, model, cache_size: int):
        super().__init__()
        self.osprey = model
        self.cache = _VisionCache(model, cache_size)

    def _image_tokens(self, levels: dict[str, torch.Tensor]) -> torch.Tensor:
        res4 = levels["res4"]
        proj = self.osprey.model.mm_projector
        return proj(res4.reshape(res4.shape[0], -1).t().to(proj[0].weight.dtype))

    def sequence(self, enc: Encoded) -> tuple[torch.Tensor, torch.Tensor]:
        """Spliced embeddings (L', hidden) and labels (L',) with the image placeholder expanded."""
        m = self.osprey
        levels = self.cache.levels(enc.sample)
        tokens = self._image_tokens(levels)
        masks = _decode_masks(enc.sample, m.device)
        mask_tok, pos_tok = m.region_embeddings(_features(levels, tokens), masks)
        ids = torch.tensor(enc.input_ids)
        embeds = m.splice(ids, tokens, mask_tok, pos_tok)
        labels: list[int] = []
        for t, lab in zip(enc.input_ids, enc.labels, strict=True):
            labels += [IGNORE_INDEX] * tokens.shape[0] if t == -200 else [lab]
        return embeds, torch.tensor(labels, device=m.device)

    def forward(self, batch: list[Encoded]) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed token loss, number of supervised tokens) of a micro-batch."""
        seqs, labels = zip(*(self.sequence(e) for e in batch), strict=True)
        embeds, attn, positions = self.osprey.pad_batch(list(seqs))
        target = torch.full(attn.shape, IGNORE_INDEX, dtype=torch.long, device=embeds.device)
        for i, lab in enumerate(labels):
            target[i, : lab.shape[0]] = lab
        logits, _ = self.osprey(embeds, attention_mask=attn, position_ids=positions)
        shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
        shift_target = target[:, 1:].reshape(-1)
        loss = F.cross_entropy(shift_logits.float(), shift_target, ignore_index=IGNORE_INDEX, reduction="sum")
        return loss, (shift_target != IGNORE_INDEX).sum()


def _features(levels, tokens):
    from osprey_core.modeling.modeling_osprey import ImageFeatures

    return ImageFeatures(levels, tokens)


def prepare_model(model, config: TrainConfig):
    """Freeze / add LoRA as `config.mode` says; returns the LoRA config (None in full mode)."""
    from osprey_core import adapters

    model.requires_grad_(False)
    lora = None
    if config.mode == "lora":
        lora = adapters.lora_config(config.lora_r, config.lora_alpha, config.lora_dropout)
        with torch.random.fork_rng(devices=[]):  # LoRA's random init: from the run's seed, not the process
            torch.manual_seed(config.seed)
            adapters.add_lora(model, lora)
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)
    else:
        for name, p in model.named_parameters():
            p.requires_grad_(not name.startswith("model.vision_tower."))
    if config.train_extractor:
        model.mask_extractor.requires_grad_(True)
    if config.train_projector:
        model.model.mm_projector.requires_grad_(True)
    if config.train_vision:
        model.model.vision_tower.requires_grad_(True)
    for p in model.parameters():  # master weights of what is trained stay fp32 (autocast does bf16)
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return lora


# --- checkpoints (safetensors + JSON only) ----------------------------------------------------------------


def _save_checkpoint(ckpt_root: Path, step: int, model, optimizer, run_id: str, losses: list[float]) -> None:
    from safetensors.torch import save_file

    tmp = ckpt_root / f".tmp-step-{step}"
    final = ckpt_root / f"step-{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    params = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(params, str(tmp / TRAINABLE_FILE))
    names = {id(p): n for n, p in model.named_parameters()}
    opt_tensors: dict[str, torch.Tensor] = {}
    for p, state in optimizer.state.items():
        for k, v in state.items():
            if isinstance(v, torch.Tensor):
                opt_tensors[f"{names[id(p)]}::{k}"] = v.detach().cpu().contiguous().reshape(v.shape)
    save_file(opt_tensors, str(tmp / OPTIMIZER_FILE))
    state = {"step": step, "run_id": run_id, "losses": losses, "torch_rng": torch.get_rng_state().tolist()}
    (tmp / STATE_FILE).write_text(json.dumps(state))
    os.replace(tmp, final)  # a checkpoint exists only once complete
    for old in ckpt_root.glob("step-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)


def _latest_checkpoint(ckpt_root: Path, run_id: str) -> Path | None:
    for path in sorted(ckpt_root.glob("step-*"), reverse=True):
        try:
            state = json.loads((path / STATE_FILE).read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if state.get("run_id") == run_id and (path / TRAINABLE_FILE).is_file():
            return path
        logger.warning("ignoring checkpoint %s: it belongs to another run (other data or settings)", path)
    return None


def _load_checkpoint(path: Path, model, optimizer) -> tuple[int, list[float]]:
    from safetensors.torch import load_file

    params = dict(model.named_parameters())
    for name, t in load_file(str(path / TRAINABLE_FILE)).items():
        if name not in params:
            raise TrainingError(f"checkpoint {path} holds {name}, which the model does not have")
        params[name].data.copy_(t.to(params[name].device))
    for key, t in load_file(str(path / OPTIMIZER_FILE)).items():
        name, k = key.split("::", 1)
        p = params[name]
        optimizer.state[p][k] = t.to(p.device) if k != "step" else t
    state = json.loads((path / STATE_FILE).read_text())
    torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
    return int(state["step"]), list(state.get("losses", []))


# --- the run ------------------------------------------------------------------------------------------------


def _run_id(base: str, base_version: str, config: TrainConfig, data_fp: str, world: int) -> str:
    blob = json.dumps({"base": base, "base_version": base_version, "config": asdict(config), "data": data_fp,
                       "world": world}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _micro_batches(n: int, config: TrainConfig, world: int, rank: int, total_steps: int) -> list[list[int]]:
    """Index lists of this process's micro-batches, for all steps: seeded epoch permutations cut into
    global batches of batch_size × world; each process takes its slice."""
    need = total_steps * config.grad_accum
    per_global = config.batch_size * world
    out: list[list[int]] = []
    epoch = 0
    while len(out) < need:
        order = list(range(n))
        random.Random(config.seed * 1_000_003 + epoch).shuffle(order)
        for i in range(0, n - per_global + 1 if n >= per_global else 1, per_global):
            chunk = order[i : i + per_global]
            mine = chunk[rank * config.batch_size : (rank + 1) * config.batch_size] or chunk[: config.batch_size]
            out.append(mine)
            if len(out) == need:
                break
        epoch += 1
    return out


def train(
    base: str | Path,
    samples: Sequence[Sample],
    out_dir: str | Path,
    config: TrainConfig | None = None,
    device: str | None = None,
    progress: bool = True,
    metadata: dict[str, Any] | None = None,
    on_step: Callable[[int, int, float], None] | None = None,
) -> TrainResult:
    """Fine-tune `base` (a preset, a model directory, an adapter directory) on `samples`; write a model
    directory `load_engine` can load to `out_dir` (LoRA: adapter + modules + base reference; full: our
    save format) plus `training.json`. Rerunning after a kill resumes from the last checkpoint.
    `on_step(step, total, loss)` is called after every optimizer step (job progress, heartbeats)."""
    from accelerate import Accelerator
    from tqdm import tqdm

    from osprey_core import adapters, checkpoint
    from osprey_core.factory import load_model
    from osprey_core.versioning import version_of_source

    config = config or TrainConfig()
    out = Path(out_dir)
    started = time.perf_counter()
    cpu = device == "cpu" or (device is None and not torch.cuda.is_available())
    accelerator = Accelerator(cpu=cpu, mixed_precision="no" if cpu else "bf16")
    world, rank = accelerator.num_processes, accelerator.process_index

    frozen_dtype = torch.float32 if (cpu or config.mode == "full") else torch.bfloat16
    model, tokenizer, _ = load_model(base, device="cpu", dtype=frozen_dtype)
    # The base's content-addressed version (cached file hashes), not a digest of the tensors as loaded
    # here: those depend on the dtype (bf16 on GPU), and the adapter is checked against an fp32 load.
    base_version = version_of_source(base)
    encoded, stats = encode_all(samples, tokenizer, config.system, config.max_length)
    if stats.mismatched or stats.too_long:
        logger.warning("dropped %d samples whose tokenization disagreed with their rounds and %d too long ones",
                       stats.mismatched, stats.too_long)
    if not encoded:
        raise TrainingError(f"no usable training samples ({len(samples)} given, {stats.mismatched} mismatched, "
                            f"{stats.too_long} too long)")
    data_fp = dataset_fingerprint(e.sample for e in encoded)
    run_id = _run_id(str(base), base_version, config, data_fp, world)

    lora = prepare_model(model, config)
    model.to(accelerator.device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    step_module = OspreyTrainStep(model, config.image_cache)

    per_step = config.batch_size * config.grad_accum * world
    total = config.steps or max(1, math.ceil(config.epochs * len(encoded) / per_step))
    warmup = int(round(config.warmup_ratio * total))
    ckpt_root = out / CHECKPOINTS
    start, losses = 0, []
    latest = _latest_checkpoint(ckpt_root, run_id) if ckpt_root.is_dir() else None
    if latest is not None:
        start, losses = _load_checkpoint(latest, model, optimizer)
        logger.info("resuming %s from step %d", out, start)
    ds = getattr(accelerator.state, "deepspeed_plugin", None)
    if ds is not None:  # no DataLoader goes through prepare(): DeepSpeed needs the batch sizes told
        if config.grad_accum != 1:
            raise TrainingError("with DeepSpeed, use --batch-size instead of --grad-accum (it steps itself)")
        ds.deepspeed_config["train_micro_batch_size_per_gpu"] = config.batch_size
        ds.deepspeed_config["gradient_accumulation_steps"] = 1
        ds.deepspeed_config["train_batch_size"] = config.batch_size * world
        ds.deepspeed_config["gradient_clipping"] = config.max_grad_norm or 0.0
    step_module, optimizer = accelerator.prepare(step_module, optimizer)
    batches = _micro_batches(len(encoded), config, world, rank, total)

    bar = tqdm(total=total, initial=start, desc=f"train ({config.mode})", unit="step",
               disable=not (progress and accelerator.is_main_process))
    model.train()
    for step in range(start, total):
        lr = cosine_lr(step, total, warmup, config.learning_rate)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_loss, step_tokens = 0.0, 0
        micro = batches[step * config.grad_accum : (step + 1) * config.grad_accum]
        token_counts = [sum(sum(1 for t in encoded[i].labels[1:] if t != IGNORE_INDEX) for i in mb) for mb in micro]
        denom = max(1, sum(token_counts))
        for k, mb in enumerate(micro):
            ctx = accelerator.no_sync(step_module) if k < len(micro) - 1 else _null()
            with ctx, accelerator.autocast():
                loss_sum, n_tok = step_module([encoded[i] for i in mb])
                loss = loss_sum / denom  # mean over the step's supervised tokens
            accelerator.backward(loss)
            step_loss += float(loss_sum.detach())
            step_tokens += int(n_tok)
        if config.max_grad_norm:
            accelerator.clip_grad_norm_(trainable, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(step_loss / max(1, step_tokens))
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{lr:.2e}")
        done = step + 1
        if config.save_every and done % config.save_every == 0 and done < total and accelerator.is_main_process:
            _save_checkpoint(ckpt_root, done, model, optimizer, run_id, losses)
        if on_step is not None:
            on_step(done, total, losses[-1])
    bar.close()
    model.eval()
    accelerator.wait_for_everyone()

    info = {
        "base": str(base), "base_version": base_version, "mode": config.mode, "config": asdict(config),
        "steps": total, "samples": len(encoded), "dataset_fingerprint": data_fp, "run_id": run_id,
        "encode": asdict(stats), "final_loss": losses[-1] if losses else float("nan"),
        "loss_first": losses[0] if losses else float("nan"), **(metadata or {}),
    }
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        model_cpu = accelerator.unwrap_model(step_module).osprey.to("cpu")
        if lora is not None:
            adapters.save_adapter(model_cpu, tokenizer, out, lora,
                                  adapters.base_reference(base, base_version, out))
        else:
            checkpoint.save_checkpoint(model_cpu.float(), tokenizer, out)
        (out / TRAINING_FILE).write_text(json.dumps(info, indent=2))
        shutil.rmtree(ckpt_root, ignore_errors=True)
    return TrainResult(out, total, total * per_step, info["final_loss"], losses, asdict(stats),
                       resumed_from=start, seconds=time.perf_counter() - started, metadata=info,
                       model=accelerator.unwrap_model(step_module).osprey)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def encode_report(stats: EncodeStats) -> str:
    return f"{stats.kept} samples kept, {stats.mismatched} dropped (tokenization mismatch), {stats.too_long} too long"
