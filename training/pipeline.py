"""One training run: store examples -> dataset -> fine-tune -> evaluate -> gate -> promote -> announce.

Why it is safe to kill at any point: the run works in MODEL_DIR/runs/<run> (fine-tuning checkpoints, never
served); a version becomes visible only by the registry's atomic rename, and served only by its atomic
`current` pointer plus the announcement in Redis, both after the gate said yes while this run still held
the lock. So a run SIGKILLed mid-way leaves the current version serving, its lock expires, and the next
run (same data and settings) resumes from the last fine-tuning checkpoint or starts over.

The gate compares like with like: the candidate and the model serving now are both evaluated on this
run's held-out split (images never trained on; the split of an image depends only on its hash, so it is
stable as corrections arrive).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .records import LabelSpace, RegionExample
from .schedule import TrainingKeys, TrainingLock, TrainingSettings, record_run

logger = logging.getLogger(__name__)


class PipelineError(RuntimeError):
    """A run cannot be made from what the store holds (no examples, no held-out image)."""


@dataclass
class TrainingContext:
    """What a run needs, built once per process from the settings (`from_settings`)."""

    settings: Any
    policy: TrainingSettings
    connection: Any
    store: Any
    registry: Any
    model_dir: Path
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def prefix(self) -> str:
        return self.settings.osprey_redis_prefix

    @classmethod
    def from_settings(cls, settings: Any, connection: Any = None, policy: TrainingSettings | None = None
                      ) -> TrainingContext:
        from backend.queue.redis import connect, redis_url

        from .registry import Registry
        from .store import Store

        model_dir = Path(settings.model_dir)
        return cls(settings=settings, policy=policy or TrainingSettings(),
                   connection=connection or connect(redis_url(settings)),
                   store=Store(model_dir=model_dir), registry=Registry(model_dir), model_dir=model_dir)

    def job_queue(self):
        from backend.queue.jobs import JobQueue

        return JobQueue(self.connection, self.settings)

    def serving_source(self) -> str:
        """What prediction workers serve now: the announced source, else the registry's current, else
        OSPREY_MODEL."""
        cur = self.registry.current()
        default = str(self.registry.path(cur)) if cur else self.settings.osprey_model
        return self.job_queue().wanted_model_source(default)


def label_space_of(examples: list[RegionExample], known: list[str] | None = None) -> LabelSpace:
    """The project's labels as its corrections show them (plus those the serving version knew)."""
    cats = sorted({e.category for e in examples if e.category} | set(known or ()))
    attrs: dict[str, set[str]] = {}
    for e in examples:
        for name, values in e.attributes.items():
            attrs.setdefault(name, set()).update(values)
    return LabelSpace(tuple(cats), {k: tuple(sorted(v)) for k, v in sorted(attrs.items())})


def _train_config(policy: TrainingSettings):
    from .finetune import TrainConfig

    return TrainConfig(mode=policy.osprey_train_mode, lr=policy.osprey_train_lr, steps=policy.osprey_train_steps,
                       epochs=policy.osprey_train_epochs, batch_size=policy.osprey_train_batch_size,
                       seed=policy.osprey_train_seed, save_every=25, train_vision=policy.osprey_train_vision)


def run_training(ctx: TrainingContext, project: str, reason: str = "", job_id: str | None = None) -> dict[str, Any]:
    """Run one training of `project` under the lock; returns (and records) the outcome."""
    project = str(project)
    record: dict[str, Any] = {"project": project, "reason": reason, "job": job_id, "started_at": time.time(),
                              "pid": os.getpid()}
    lock = TrainingLock(ctx.connection, TrainingKeys(ctx.prefix).lock, ctx.policy.osprey_train_lock_ttl_s,
                        owner={"project": project, "job": job_id, "pid": os.getpid()})
    if not lock.acquire():
        record.update(status="skipped", message="another training run holds the lock")
        logger.info("training of project %s skipped: another run holds the lock", project)
        record_run(ctx.connection, ctx.prefix, record)
        return record
    try:
        record.update(_run_locked(ctx, lock, project, reason, job_id))
    except Exception as exc:
        record.update(status="failed", message=f"{type(exc).__name__}: {exc}")
        record_run(ctx.connection, ctx.prefix, {**record, "finished_at": time.time()})
        raise
    finally:
        lock.release()
    record["finished_at"] = time.time()
    record_run(ctx.connection, ctx.prefix, record)
    return record


def _run_locked(ctx: TrainingContext, lock: TrainingLock, project: str, reason: str, job_id: str | None
                ) -> dict[str, Any]:
    from osprey_core import load_engine
    from osprey_core.versioning import version_of_source

    from .dataset import TASKS, build_samples, dataset_fingerprint, split_by_image
    from .evaluate import apply_temperature, evaluate
    from .finetune import train

    policy, settings = ctx.policy, ctx.settings
    cutoff = ctx.store.now()  # before reading: a correction arriving during the run counts for the next
    examples = ctx.store.examples(project)
    train_ex, held = split_by_image(examples, policy.osprey_train_held_out, policy.osprey_train_seed)
    if not [e for e in held if e.category] or not train_ex:
        raise PipelineError(f"project {project}: {len(examples)} stored regions are not enough for a training "
                            f"run with a held-out split (need regions with a category on at least 2 images)")
    source = ctx.serving_source()
    current_id = ctx.registry.current()
    current_labels = ((ctx.registry.metrics(current_id) or {}).get("labels") if current_id else None) or []
    labels = label_space_of(examples, current_labels)
    tasks = tuple(t.strip() for t in policy.osprey_train_tasks.split(",") if t.strip() in TASKS)
    samples = build_samples(train_ex, labels, tasks=tasks, seed=policy.osprey_train_seed)
    fingerprint = dataset_fingerprint(samples)
    run_dir = ctx.model_dir / "runs" / f"{_safe(project)}-{fingerprint[:16]}"
    device = settings.osprey_device
    logger.info("training project %s from %s: %d regions (%d train, %d held out), %d samples, %s",
                project, source, len(examples), len(train_ex), len(held), len(samples), reason)
    result = train(source, samples, run_dir, _train_config(policy), device=device, progress=False,
                   metadata={"project": project, "reason": reason, "job": job_id})
    evaluate_kwargs = {"descriptions": policy.osprey_train_descriptions}
    candidate = load_engine(str(run_dir), device=device)
    cand_metrics = evaluate(candidate, held, labels, **evaluate_kwargs)
    del candidate
    current = load_engine(source, device=device)
    cur_metrics = evaluate(current, held, labels, **evaluate_kwargs)
    del current
    # Calibrate: the temperature fitted (by NLL) on the held-out split goes into the candidate's config
    # (so its scores are calibrated, and the config being hashed, the version id covers it), unless it
    # makes the calibration error worse on that split (few, confidently wrong regions can do that).
    # Accuracy and the gate's numbers do not depend on it (a positive temperature keeps every argmax).
    calibrated = cand_metrics.ece_after <= cand_metrics.ece_before
    calibration = {"applied": calibrated, "temperature": cand_metrics.temperature,
                   "ece_before": cand_metrics.ece_before, "ece_after": cand_metrics.ece_after}
    if calibrated:
        apply_temperature(run_dir, cand_metrics)
    version = version_of_source(str(run_dir))
    cand_metrics = dataclasses.replace(cand_metrics, model_version=version)
    info = ctx.registry.register(run_dir, version=version, dataset_fingerprint=fingerprint, base=source,
                                 metrics=cand_metrics, extra={"project": project, "reason": reason, "job": job_id,
                                                              "steps": result.steps, "final_loss": result.final_loss})
    out: dict[str, Any] = {"version": info.version, "base": source, "examples": len(examples),
                           "train_regions": len(train_ex), "held_out_regions": len(held), "samples": len(samples),
                           "steps": result.steps, "train_seconds": round(result.seconds, 2),
                           "candidate": _summary(cand_metrics), "current": _summary(cur_metrics),
                           "calibration": calibration}
    if not lock.holds():
        # Someone else may be running now: registering is harmless, promoting is not.
        out.update(status="lost_lock", message="the training lock expired during the run; not promoting")
        return out
    decision = ctx.registry.gate(info.version, current_metrics=cur_metrics, margin=policy.osprey_gate_margin,
                                 max_label_drop=policy.osprey_gate_max_label_drop)
    ctx.store.record_training(project, info.version, cutoff, dataset_fingerprint=fingerprint, n_examples=len(examples))
    out["decision"] = decision.to_dict()
    if decision.promoted:
        path = str(ctx.registry.path(info.version))
        ctx.job_queue().announce_model_source(path)
        out.update(status="promoted", source=path)
        logger.info("promoted %s (%s); workers load it before their next job", info.version,
                    "; ".join(decision.reasons))
    else:
        out.update(status="refused", message="; ".join(decision.reasons))
        logger.warning("gate refused %s: %s; %s keeps serving", info.version, "; ".join(decision.reasons), source)
    return out


def _summary(metrics: Any) -> dict[str, Any]:
    d = metrics.to_dict()
    return {"model_version": d.get("model_version"), "n": d.get("n"), "accuracy": d.get("accuracy"),
            "macro_f1": d.get("macro_f1"),
            "per_label": {k: v.get("accuracy") for k, v in (d.get("per_label") or {}).items()}}


def _safe(value: str) -> str:
    return "".join(c if c.isalnum() or c in "_.-" else "_" for c in value)[:64]
