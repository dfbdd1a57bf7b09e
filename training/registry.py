"""Model registry: versioned model directories, an atomic `current` pointer and the promotion gate.

Layout under MODEL_DIR/registry/:
    <version>/            one version, immutable once registered: the model files (weights or adapter +
                          base reference, config, tokenizer), metrics.json and manifest.json (sha256 and
                          size of every file, parent version, dataset fingerprint, base)
    decisions/<version>.json   every gate decision about that version, with its numbers (append-only list)
    current               the served version's id (one line; replaced atomically)
    history.json          promoted ids, oldest first (what `rollback` walks back)
    .staging/             registrations in progress; never served, swept on open

A version becomes visible only by `os.rename` of a complete, fsynced staging directory, so a crash
mid-copy leaves nothing a worker could load; `current` is written to a temp file and `os.replace`d.
Writers serialise on an flock of `registry/.lock`; readers take no lock.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .evaluate import METRICS_FILE, Metrics, write_metrics

MANIFEST_FILE = "manifest.json"
HASH_CACHE_FILE = ".osprey_sha256.json"  # osprey_core.versioning's sha256 cache: rewritable, not content
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_RESERVED = {"current", "history.json", "decisions", ".staging", ".lock"}


class RegistryError(ValueError):
    """Unknown or invalid version, a corrupt version directory, or an impossible promotion/rollback."""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json_atomic(path: Path, data: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def content_version(files: Mapping[str, str], prefix: str = "osprey") -> str:
    """Fallback version id for a directory that is not a model checkpoint (no config): a hash over
    the files' (path, sha256) pairs, metrics excluded."""
    h = hashlib.sha256()
    for rel in sorted(files):
        if rel in (METRICS_FILE, MANIFEST_FILE):
            continue
        h.update(f"{rel}\0{files[rel]}\n".encode())
    return f"{prefix}-{h.hexdigest()[:16]}"


def _model_files(files: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    return {rel: e["sha256"] for rel, e in files.items() if rel != METRICS_FILE}


def _core_version(directory: Path) -> str | None:
    """The core's content-addressed version (osprey_core.versioning) of a checkpoint or adapter
    directory: the id `load_versioned` gives the same files, so the registry, job ids and Label
    Studio show one string. None when the directory has no model config."""
    if not ((directory / "osprey_config.json").is_file() or (directory / "config.json").is_file()):
        return None
    from osprey_core.errors import OspreyError
    from osprey_core.versioning import version_of_directory

    try:
        return version_of_directory(directory)
    except OspreyError as exc:
        raise RegistryError(f"cannot version the model directory: {exc}") from exc


# --- the gate ------------------------------------------------------------------------------------------


@dataclass
class Decision:
    """Whether a candidate may replace the current version, and the numbers that decided it."""

    promote: bool
    reasons: list[str]
    metric: str
    candidate: float | None
    current: float | None
    delta: float | None
    margin: float
    max_label_drop: float
    label_drops: dict[str, float] = field(default_factory=dict)
    candidate_version: str | None = None
    current_version: str | None = None
    decided_at: str = field(default_factory=_now)
    promoted: bool = False  # set when the registry actually moved `current`

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Decision:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


def _as_dict(m: Metrics | Mapping[str, Any] | None) -> dict[str, Any] | None:
    if m is None:
        return None
    return m.to_dict() if isinstance(m, Metrics) else dict(m)


def decide(candidate_metrics: Metrics | Mapping[str, Any], current_metrics: Metrics | Mapping[str, Any] | None,
           margin: float = 0.0, max_label_drop: float = 0.02, metric: str = "accuracy") -> Decision:
    """Promote only if the candidate beats the current version on the held-out split by more than
    `margin` (in `metric`, a fraction) and no label's accuracy drops by more than `max_label_drop`.

    Both metrics must come from the same held-out examples (their `split_fingerprint`s, when set, must
    match): numbers from different splits do not compare, so that is a refusal too. With no current
    version the candidate is promoted.
    """
    if margin < 0 or max_label_drop < 0:
        raise RegistryError(f"margin and max_label_drop must be >= 0, got {margin} and {max_label_drop}")
    cand = _as_dict(candidate_metrics)
    cur = _as_dict(current_metrics)
    if cand is None or not isinstance(cand.get(metric), (int, float)):
        raise RegistryError(f"candidate metrics have no numeric {metric!r}")
    c_val = float(cand[metric])
    base = {"metric": metric, "candidate": c_val, "margin": margin, "max_label_drop": max_label_drop,
            "candidate_version": cand.get("model_version")}
    if cur is None:
        return Decision(True, ["no current version"], current=None, delta=None, **base)
    if not isinstance(cur.get(metric), (int, float)):
        raise RegistryError(f"current metrics have no numeric {metric!r}")
    p_val = float(cur[metric])
    delta = c_val - p_val
    base.update(current=p_val, delta=delta, current_version=cur.get("model_version"))
    reasons: list[str] = []
    fa, fb = cand.get("split_fingerprint"), cur.get("split_fingerprint")
    if fa and fb and fa != fb:
        reasons.append("candidate and current were evaluated on different held-out splits")
    if not delta > margin:
        reasons.append(f"{metric} {c_val:.4f} does not beat current {p_val:.4f} by more than {margin:.4f}")
    drops: dict[str, float] = {}
    for label, now in (cur.get("per_label") or {}).items():
        new = (cand.get("per_label") or {}).get(label)
        if not now or now.get("accuracy") is None or not new or new.get("accuracy") is None:
            continue
        drop = float(now["accuracy"]) - float(new["accuracy"])
        drops[label] = drop
        if drop > max_label_drop:
            reasons.append(f"label {label!r} drops {drop:.4f} ({now['accuracy']:.4f} -> {new['accuracy']:.4f}),"
                           f" more than {max_label_drop:.4f}")
    if not reasons:
        reasons.append(f"{metric} {c_val:.4f} beats current {p_val:.4f} by {delta:.4f}")
        return Decision(True, reasons, label_drops=drops, **base)
    return Decision(False, reasons, label_drops=drops, **base)


# --- versions ------------------------------------------------------------------------------------------


@dataclass
class VersionInfo:
    """A registered version as `list()` shows it."""

    version: str
    path: Path
    parent: str | None
    created_at: str
    dataset_fingerprint: str | None
    base: str | None
    current: bool
    metrics: dict[str, Any] | None
    decisions: list[dict[str, Any]]

    @property
    def status(self) -> str:
        if self.current:
            return "current"
        if not self.decisions:
            return "candidate"
        last = self.decisions[-1]
        if last.get("kind") == "rollback":
            return "rolled-back"
        if last.get("promoted"):
            return "retired"
        return "refused" if not last.get("promote") else "approved"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        d["status"] = self.status
        return d


class Registry:
    """The versions under `model_dir/registry`: register, promote (directly or through the gate),
    roll back, list, show, and the `current` pointer workers poll."""

    def __init__(self, model_dir: str | os.PathLike):
        self.root = Path(model_dir) / "registry"
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "decisions").mkdir(exist_ok=True)
        self._staging = self.root / ".staging"
        self._staging.mkdir(exist_ok=True)

    # -- locking and small files --

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.root / ".lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _history(self) -> list[str]:
        try:
            return list(json.loads((self.root / "history.json").read_text()))
        except FileNotFoundError:
            return []

    def _decisions(self, version: str) -> list[dict[str, Any]]:
        try:
            return list(json.loads((self.root / "decisions" / f"{version}.json").read_text()))
        except FileNotFoundError:
            return []

    def _append_decision(self, version: str, record: dict[str, Any]) -> None:
        _write_json_atomic(self.root / "decisions" / f"{version}.json", self._decisions(version) + [record])

    def _set_current(self, version: str | None) -> None:
        path = self.root / "current"
        if version is None:
            path.unlink(missing_ok=True)
            return
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".current-")
        with os.fdopen(fd, "w") as fh:
            fh.write(version + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(self.root)

    # -- reading --

    @staticmethod
    def _check_id(version: str) -> str:
        if not isinstance(version, str) or not _VERSION_RE.match(version) or version in _RESERVED:
            raise RegistryError(f"invalid version id {version!r} (letters, digits, '.', '_', '-'; max 128)")
        return version

    def path(self, version: str) -> Path:
        """The directory of a complete registered version (one with a manifest), else RegistryError."""
        p = self.root / self._check_id(version)
        if not (p / MANIFEST_FILE).is_file():
            raise RegistryError(f"no registered version {version!r} under {self.root}")
        return p

    def manifest(self, version: str) -> dict[str, Any]:
        try:
            return json.loads((self.path(version) / MANIFEST_FILE).read_text())
        except ValueError as exc:
            raise RegistryError(f"version {version!r}: unreadable manifest: {exc}") from exc

    def current(self) -> str | None:
        """The served version's id, or None before the first promotion."""
        try:
            value = (self.root / "current").read_text().strip()
        except FileNotFoundError:
            return None
        return value or None

    def current_path(self) -> Path | None:
        cur = self.current()
        return self.path(cur) if cur else None

    def metrics(self, version: str) -> dict[str, Any] | None:
        p = self.path(version) / METRICS_FILE
        return json.loads(p.read_text()) if p.is_file() else None

    def verify(self, version: str, checksums: bool = True) -> list[str]:
        """Problems with a version's files against its manifest (empty = intact). `checksums=False`
        checks presence and sizes only (cheap enough for every load of a 7B)."""
        root = self.path(version)
        problems = []
        for rel, entry in self.manifest(version)["files"].items():
            f = root / rel
            if not f.is_file():
                problems.append(f"{rel}: missing")
            elif f.stat().st_size != entry["size"]:
                problems.append(f"{rel}: size {f.stat().st_size} != {entry['size']}")
            elif checksums and sha256_file(f) != entry["sha256"]:
                problems.append(f"{rel}: sha256 mismatch")
        return problems

    def _info(self, version: str, current: str | None) -> VersionInfo:
        man = self.manifest(version)
        return VersionInfo(version=version, path=self.root / version, parent=man.get("parent"),
                           created_at=man.get("created_at", ""), dataset_fingerprint=man.get("dataset_fingerprint"),
                           base=man.get("base"), current=version == current, metrics=self.metrics(version),
                           decisions=self._decisions(version))

    def list(self) -> list[VersionInfo]:
        """Every complete version, oldest first (staging and partial directories are not versions)."""
        cur = self.current()
        out = [self._info(p.name, cur) for p in self.root.iterdir()
               if p.is_dir() and p.name not in _RESERVED and (p / MANIFEST_FILE).is_file()]
        order = {v.version: self.manifest(v.version).get("created_ns", 0) for v in out}
        return sorted(out, key=lambda v: (order[v.version], v.version))

    def show(self, version: str) -> dict[str, Any]:
        info = self._info(version, self.current())
        return {**info.to_dict(), "manifest": self.manifest(version)}

    # -- writing --

    def register(self, src_dir: str | os.PathLike, *, version: str | None = None, parent: str | None = "current",
                 dataset_fingerprint: str | None = None, base: str | None = None,
                 metrics: Metrics | Mapping[str, Any] | None = None,
                 extra: Mapping[str, Any] | None = None) -> VersionInfo:
        """Copy a model directory in as a new version (not promoted). Idempotent for an existing id.

        `parent="current"` records the version serving now; `base` names the base model an adapter
        applies to. The copy is assembled and fsynced in `.staging/` and renamed into place.
        """
        src = Path(src_dir)
        if not src.is_dir():
            raise RegistryError(f"not a directory: {src}")
        if version is not None:
            self._check_id(version)
        if parent == "current":
            parent = self.current()
        self._sweep_staging()
        stage = Path(tempfile.mkdtemp(dir=self._staging, prefix="v-"))
        try:
            files: dict[str, dict[str, Any]] = {}
            for f in sorted(src.rglob("*")):
                if f.is_symlink() and not f.resolve().is_file():
                    raise RegistryError(f"{f}: dangling or directory symlink")
                if not f.is_file():
                    continue
                rel = f.relative_to(src).as_posix()
                if rel in (MANIFEST_FILE, HASH_CACHE_FILE) or (rel == METRICS_FILE and metrics is not None):
                    continue  # the manifest is ours to write; given metrics replace a copied file
                dst = stage / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, dst)
            if not any(stage.rglob("*")):
                raise RegistryError(f"{src} has no files to register")
            if version is None:  # the id covers the model files only, so metrics can be written after
                version = _core_version(stage) or content_version(
                    {f.relative_to(stage).as_posix(): sha256_file(f) for f in stage.rglob("*") if f.is_file()})
            if metrics is not None:
                data = _as_dict(metrics)
                data["model_version"] = version  # the numbers belong to this id
                write_metrics(data, stage / METRICS_FILE)
            for f in sorted(stage.rglob("*")):
                if f.is_file() and f.name != HASH_CACHE_FILE:
                    with open(f, "rb+") as fh:
                        os.fsync(fh.fileno())
                    files[f.relative_to(stage).as_posix()] = {"sha256": sha256_file(f), "size": f.stat().st_size}
            manifest = {"version": version, "parent": parent, "base": base,
                        "dataset_fingerprint": dataset_fingerprint, "created_at": _now(),
                        "created_ns": time.time_ns(), "files": files, "extra": dict(extra or {})}
            _write_json_atomic(stage / MANIFEST_FILE, manifest)
            _fsync_dir(stage)
            final = self.root / version
            with self._locked():
                if (final / MANIFEST_FILE).is_file():
                    shutil.rmtree(stage, ignore_errors=True)
                    if _model_files(self.manifest(version)["files"]) != _model_files(files):
                        raise RegistryError(f"version {version!r} is already registered with other files")
                    return self._info(version, self.current())
                if final.exists():  # a partial directory from an older crash: never a version
                    shutil.rmtree(final)
                os.rename(stage, final)
                _fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        return self._info(version, self.current())

    def _sweep_staging(self, older_than_s: float = 3600.0) -> None:
        """Remove staging dirs left by crashed registrations (old enough not to be in progress)."""
        cutoff = time.time() - older_than_s
        for p in self._staging.iterdir():
            try:
                if p.stat().st_mtime < cutoff:
                    shutil.rmtree(p, ignore_errors=True)
            except FileNotFoundError:
                pass

    def record_decision(self, version: str, decision: Decision) -> None:
        self.path(version)
        self._append_decision(version, {"kind": "gate", **decision.to_dict()})

    def promote(self, version: str, *, reason: str = "manual", verify: bool = True) -> None:
        """Point `current` at `version` (checked against its manifest first) and record it."""
        self.path(version)
        if verify:
            problems = self.verify(version, checksums=True)
            if problems:
                raise RegistryError(f"version {version!r} is corrupt, not promoting: {'; '.join(problems)}")
        with self._locked():
            previous = self.current()
            if previous == version:
                return
            history = [v for v in self._history() if v != version] + [version]
            _write_json_atomic(self.root / "history.json", history)
            self._set_current(version)
            self._append_decision(version, {"kind": "promote", "promote": True, "promoted": True,
                                            "reasons": [reason], "previous": previous, "decided_at": _now()})

    def gate(self, candidate: str, *, current_metrics: Metrics | Mapping[str, Any] | None = None,
             margin: float = 0.0, max_label_drop: float = 0.02, metric: str = "accuracy") -> Decision:
        """Decide on `candidate` against the serving version, record the decision, promote if it passes.

        `current_metrics`: the serving version evaluated on the *candidate's* held-out split (pass it
        whenever the split changed since the current version was registered); default: its metrics.json.
        """
        cand = self.metrics(candidate)
        if cand is None:
            raise RegistryError(f"version {candidate!r} has no metrics.json; evaluate it before the gate")
        cur_id = self.current()
        if current_metrics is None and cur_id is not None:
            current_metrics = self.metrics(cur_id)
            if current_metrics is None:
                raise RegistryError(f"current version {cur_id!r} has no metrics; pass current_metrics")
        decision = decide(cand, current_metrics, margin=margin, max_label_drop=max_label_drop, metric=metric)
        decision.candidate_version, decision.current_version = candidate, cur_id
        if decision.promote:
            problems = self.verify(candidate)
            if problems:
                decision.promote = False
                decision.reasons.append("files do not match the manifest: " + "; ".join(problems))
        decision.promoted = decision.promote
        self.record_decision(candidate, decision)
        if decision.promote:
            self.promote(candidate, reason="gate: " + "; ".join(decision.reasons), verify=False)
        return decision

    def rollback(self) -> str:
        """Serve the previously promoted version again; returns its id."""
        with self._locked():
            history = self._history()
            cur = self.current()
            if cur in history:
                history = history[: history.index(cur)]
            candidates = [v for v in history if (self.root / v / MANIFEST_FILE).is_file()]
            if not candidates:
                raise RegistryError("nothing to roll back to: no earlier promoted version")
            target = candidates[-1]
            _write_json_atomic(self.root / "history.json", candidates)
            self._set_current(target)
            if cur is not None:
                self._append_decision(cur, {"kind": "rollback", "promote": False, "promoted": False,
                                            "reasons": [f"rolled back to {target}"], "decided_at": _now()})
            self._append_decision(target, {"kind": "promote", "promote": True, "promoted": True,
                                           "reasons": [f"rollback from {cur}"], "previous": cur,
                                           "decided_at": _now()})
            return target
