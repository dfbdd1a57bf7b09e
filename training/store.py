"""Corrections store: every annotated region the tool holds, with the prediction the annotator saw.

SQLAlchemy 2 on SQLite (default: MODEL_DIR/corrections.sqlite) or PostgreSQL (`DATABASE_URL`, psycopg 3;
`postgresql://` URLs are read as `postgresql+psycopg://`). The schema is Alembic's (training/migrations),
upgraded to head on open, in-process, under a lock (a PostgreSQL advisory lock; SQLite serialises writers).

The input is tool-neutral: the adapter (e.g. the Label Studio sync) turns one task into
`upsert_task(project_id, task_id, image_ref=..., image_sha256=..., image_path=..., regions=[...])`,
where `regions` is the *complete* current set of that task's annotated regions (all its annotations).
Each region dict (unknown keys are refused):

    annotation_id  str | int   required   the annotation (one annotator's version of the task)
    region_id      str | int   required   the region id inside the annotation
    rle            dict        required   COCO RLE at image size: {"size": [h, w], "counts": str}
    labels         [str]       []         chosen category label(s); the first is the category
    attributes     {str: [str]} {}        per-region choices (a str value is taken as [value])
    short          str | None             short description (the adapter maps its text areas)
    detailed       str | None             detailed description
    texts          {str: str}  {}         any other text areas, by control name
    annotator      str | int | None       who annotated (e.g. the tool's user id or e-mail)
    created_at     ISO str | datetime | None   the tool's timestamps
    updated_at     ISO str | datetime | None
    prediction     {"model_version": str|None, "label": str|None, "score": float|None} | None
                   what the annotator was shown for this region (None: no suggestion)

Syncs are idempotent: a replayed or duplicate sync changes nothing (rows are keyed by
project/task/annotation/region and compared by a content hash); regions missing from a sync are
deleted, so annotations deleted in the tool disappear. `changed_at` moves only when a region's
content changes, which is what `count_since` counts for the retraining schedule.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlalchemy.types import TypeDecorator

from .images import ImageStore
from .records import RegionExample

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
_SCHEMA_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_ADVISORY_KEY = 0x05B7E1  # "osprey" migrations
_REGION_KEYS = {"annotation_id", "region_id", "rle", "labels", "attributes", "short", "detailed", "texts",
                "annotator", "created_at", "updated_at", "prediction"}
_PREDICTION_KEYS = {"model_version", "label", "score"}


class StoreError(ValueError):
    """Malformed input to the store (a region dict, an id, a URL), or a lookup that cannot succeed."""


# --- schema (mirrors migrations/versions; the migrations are what creates it) ---------------------------


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on every backend (SQLite keeps naive text: stored as UTC, read as UTC)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        value = value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


metadata = sa.MetaData()
tasks_table = sa.Table(
    "osprey_tasks", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("project_id", sa.String(64), nullable=False),
    sa.Column("task_id", sa.String(64), nullable=False),
    sa.Column("image_ref", sa.Text, nullable=False),
    sa.Column("image_sha256", sa.String(64), nullable=False),
    sa.Column("image_path", sa.Text, nullable=False),
    sa.Column("width", sa.Integer, nullable=False),
    sa.Column("height", sa.Integer, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("changed_at", UTCDateTime, nullable=False),
    sa.Column("synced_at", UTCDateTime, nullable=False),
    sa.UniqueConstraint("project_id", "task_id", name="uq_osprey_tasks_project_task"),
)
regions_table = sa.Table(
    "osprey_regions", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("task_pk", sa.Integer, sa.ForeignKey("osprey_tasks.id", ondelete="CASCADE"), nullable=False),
    sa.Column("project_id", sa.String(64), nullable=False),
    sa.Column("task_id", sa.String(64), nullable=False),
    sa.Column("annotation_id", sa.String(64), nullable=False),
    sa.Column("region_id", sa.String(128), nullable=False),
    sa.Column("rle", sa.JSON, nullable=False),
    sa.Column("labels", sa.JSON, nullable=False),
    sa.Column("attributes", sa.JSON, nullable=False),
    sa.Column("texts", sa.JSON, nullable=False),
    sa.Column("short", sa.Text),
    sa.Column("detailed", sa.Text),
    sa.Column("annotator", sa.String(255)),
    sa.Column("annotated_at", UTCDateTime),
    sa.Column("tool_updated_at", UTCDateTime),
    sa.Column("predicted_version", sa.String(255)),
    sa.Column("predicted_label", sa.Text),
    sa.Column("predicted_score", sa.Float),
    sa.Column("accepted", sa.Boolean),
    sa.Column("content_sha256", sa.String(64), nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("changed_at", UTCDateTime, nullable=False),
    sa.UniqueConstraint("project_id", "task_id", "annotation_id", "region_id", name="uq_osprey_regions_identity"),
)
marks_table = sa.Table(
    "osprey_training_marks", metadata,
    sa.Column("project_id", sa.String(64), primary_key=True),
    sa.Column("version", sa.String(255), primary_key=True),
    sa.Column("cutoff", UTCDateTime, nullable=False),
    sa.Column("dataset_fingerprint", sa.String(128)),
    sa.Column("n_examples", sa.Integer),
    sa.Column("created_at", UTCDateTime, nullable=False),
)


# --- input validation ----------------------------------------------------------------------------------


def _now() -> datetime:
    return datetime.now(UTC)


def _id(value: Any, what: str, max_len: int = 64) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise StoreError(f"{what} must be a string or an integer, got {type(value).__name__}")
    text = str(value).strip()
    if not text or len(text) > max_len:
        raise StoreError(f"{what} must be 1-{max_len} characters, got {text!r}")
    return text


def _opt_text(value: Any, what: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise StoreError(f"{what} must be a string or null, got {type(value).__name__}")
    return value


def _str_list(value: Any, what: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise StoreError(f"{what} must be a list of non-empty strings, got {value!r}")
    return list(value)


def _timestamp(value: Any, what: str) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            pass
    raise StoreError(f"{what} must be an ISO-8601 timestamp, got {value!r}")


def _rle(value: Any, height: int | None, width: int | None, where: str) -> dict[str, Any]:
    from osprey_core.errors import RegionError
    from osprey_core.regions import Region

    if not isinstance(value, Mapping) or not isinstance(value.get("counts"), str):
        raise StoreError(f"{where}: rle must be compressed COCO RLE {{'size': [h, w], 'counts': str}}")
    try:
        Region.from_coco_rle(value, height, width, allow_empty=False)
    except RegionError as exc:
        raise StoreError(f"{where}: {exc}") from exc
    return {"size": [int(value["size"][0]), int(value["size"][1])], "counts": value["counts"]}


def normalize_region(region: Mapping[str, Any], height: int | None = None, width: int | None = None) -> dict:
    """A region dict (shape in the module docstring) -> the row's columns; StoreError when malformed."""
    if not isinstance(region, Mapping):
        raise StoreError(f"a region must be a dict, got {type(region).__name__}")
    unknown = set(region) - _REGION_KEYS
    if unknown:
        raise StoreError(f"unknown region keys {sorted(unknown)}; accepted: {sorted(_REGION_KEYS)}")
    for key in ("annotation_id", "region_id", "rle"):
        if key not in region:
            raise StoreError(f"a region needs {key!r}")
    ann = _id(region["annotation_id"], "annotation_id")
    rid = _id(region["region_id"], "region_id", 128)
    where = f"region {ann}/{rid}"
    attrs = region.get("attributes") or {}
    if not isinstance(attrs, Mapping) or not all(isinstance(k, str) and k for k in attrs):
        raise StoreError(f"{where}: attributes must be a dict of name -> values")
    texts = region.get("texts") or {}
    if not isinstance(texts, Mapping) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in texts.items()):
        raise StoreError(f"{where}: texts must be a dict of name -> text")
    pred = region.get("prediction")
    if pred is not None:
        if not isinstance(pred, Mapping) or set(pred) - _PREDICTION_KEYS:
            raise StoreError(f"{where}: prediction must be a dict with keys {sorted(_PREDICTION_KEYS)}")
        score = pred.get("score")
        if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))
                                  or not math.isfinite(score)):
            raise StoreError(f"{where}: prediction score must be a finite number, got {score!r}")
    labels = _str_list(region.get("labels"), f"{where}: labels")
    annotator = region.get("annotator")
    row = {
        "annotation_id": ann,
        "region_id": rid,
        "rle": _rle(region["rle"], height, width, where),
        "labels": labels,
        "attributes": {k: _str_list(v, f"{where}: attribute {k!r}") for k, v in sorted(attrs.items())},
        "texts": dict(sorted(texts.items())),
        "short": _opt_text(region.get("short"), f"{where}: short"),
        "detailed": _opt_text(region.get("detailed"), f"{where}: detailed"),
        "annotator": None if annotator is None else _id(annotator, f"{where}: annotator", 255),
        "annotated_at": _timestamp(region.get("created_at"), f"{where}: created_at"),
        "tool_updated_at": _timestamp(region.get("updated_at"), f"{where}: updated_at"),
        "predicted_version": _opt_text((pred or {}).get("model_version"), f"{where}: prediction model_version"),
        "predicted_label": _opt_text((pred or {}).get("label"), f"{where}: prediction label"),
        "predicted_score": None if (pred or {}).get("score") is None else float(pred["score"]),
    }
    row["accepted"] = None if row["predicted_label"] is None else row["predicted_label"] in labels
    content = {k: row[k] for k in ("rle", "labels", "attributes", "texts", "short", "detailed", "annotator",
                                   "predicted_version", "predicted_label", "predicted_score")}
    row["content_sha256"] = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
    return row


# --- the store -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UpsertResult:
    inserted: int
    updated: int
    unchanged: int
    deleted: int


def database_url(url: str | None = None, model_dir: str | os.PathLike | None = None) -> str:
    """The URL to open: `url`, else DATABASE_URL, else SQLite at MODEL_DIR/corrections.sqlite."""
    url = url or os.environ.get("DATABASE_URL")
    if not url:
        root = Path(model_dir if model_dir is not None else os.environ.get("MODEL_DIR", "data"))
        root.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{(root / 'corrections.sqlite').resolve()}"
    for plain in ("postgres://", "postgresql://"):
        if url.startswith(plain):
            return "postgresql+psycopg://" + url[len(plain):]
    if not (url.startswith("sqlite") or url.startswith("postgresql+psycopg")):
        raise StoreError(f"unsupported DATABASE_URL scheme in {url.split('://')[0]!r}: use sqlite or postgresql")
    return url


def upgrade(engine: Engine) -> None:
    """Run the Alembic migrations to head on `engine` (idempotent; safe with concurrent openers)."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _ADVISORY_KEY})
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


class Store:
    """The corrections database of one deployment (all projects); thread-safe like its Engine."""

    def __init__(self, url: str | None = None, *, model_dir: str | os.PathLike | None = None,
                 schema: str | None = None, migrate: bool = True, echo: bool = False):
        self.url = database_url(url, model_dir)
        self.model_dir = Path(model_dir if model_dir is not None else os.environ.get("MODEL_DIR", "data"))
        kwargs: dict[str, Any] = {"echo": echo, "future": True}
        if self.url.startswith("sqlite"):
            kwargs["connect_args"] = {"timeout": 30}
        elif schema is not None:
            if not _SCHEMA_RE.match(schema):
                raise StoreError(f"invalid schema name {schema!r}")
            kwargs["connect_args"] = {"options": f"-csearch_path={schema}"}
        self.schema = schema
        self.engine = sa.create_engine(self.url, **kwargs)
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        if schema is not None and self.engine.dialect.name == "postgresql":
            with self.engine.begin() as conn:
                conn.execute(sa.text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
        if migrate:
            upgrade(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    def images(self) -> ImageStore:
        """The content-addressed image files under MODEL_DIR/images."""
        return ImageStore(self.model_dir / "images")

    # -- writing --

    def _insert(self):
        return (postgresql.insert if self.engine.dialect.name == "postgresql" else sqlite.insert)(tasks_table)

    def upsert_task(self, project_id: str | int, task_id: str | int, *, image_ref: str, image_sha256: str,
                    image_path: str | os.PathLike, regions: Iterable[Mapping[str, Any]],
                    width: int | None = None, height: int | None = None) -> UpsertResult:
        """Make the store hold exactly `regions` for this task (insert new, update changed, delete gone).

        The image size is taken from the regions' RLE when not given; all must agree with it.
        """
        project_id, task_id = _id(project_id, "project_id"), _id(task_id, "task_id")
        if not isinstance(image_ref, str) or not image_ref:
            raise StoreError("image_ref must be a non-empty string")
        if not isinstance(image_sha256, str) or not re.fullmatch(r"[0-9a-f]{64}", image_sha256):
            raise StoreError(f"image_sha256 must be a lower-case hex sha256, got {image_sha256!r}")
        regions = list(regions)
        if (width is None) != (height is None):
            raise StoreError("pass both width and height, or neither")
        if width is None:
            sizes = {tuple(size) for size in (_rle_size(r) for r in regions) if size is not None}
            if len(sizes) > 1:
                raise StoreError(f"task {task_id}: regions have different RLE sizes {sorted(sizes)}")
            # no regions (every annotation deleted): the size is unknown and unused, stored as 0
            height, width = (int(v) for v in next(iter(sizes))) if sizes else (0, 0)
        rows = [normalize_region(r, height or None, width or None) for r in regions]
        keys = [(r["annotation_id"], r["region_id"]) for r in rows]
        if len(set(keys)) != len(keys):
            dup = sorted({k for k in keys if keys.count(k) > 1})
            raise StoreError(f"task {task_id}: duplicate (annotation_id, region_id) in one sync: {dup}")
        now = _now()
        image = {"image_ref": image_ref, "image_sha256": image_sha256, "image_path": str(image_path),
                 "width": int(width), "height": int(height)}
        with self.engine.begin() as conn:
            stmt = self._insert().values(project_id=project_id, task_id=task_id, created_at=now, changed_at=now,
                                         synced_at=now, **image)
            conn.execute(stmt.on_conflict_do_update(index_elements=["project_id", "task_id"],
                                                    set_={"synced_at": now}))
            task = conn.execute(sa.select(tasks_table).where(tasks_table.c.project_id == project_id,
                                                       tasks_table.c.task_id == task_id).with_for_update()).one()
            if any(getattr(task, k) != v for k, v in image.items()):
                conn.execute(tasks_table.update().where(tasks_table.c.id == task.id).values(changed_at=now, **image))
            existing = {(r.annotation_id, r.region_id): r for r in conn.execute(
                sa.select(regions_table.c.id, regions_table.c.annotation_id, regions_table.c.region_id,
                          regions_table.c.content_sha256, regions_table.c.annotated_at, regions_table.c.tool_updated_at)
                .where(regions_table.c.task_pk == task.id))}
            inserted = updated = unchanged = 0
            for row in rows:
                old = existing.pop((row["annotation_id"], row["region_id"]), None)
                if old is None:
                    conn.execute(regions_table.insert().values(task_pk=task.id, project_id=project_id, task_id=task_id,
                                                         created_at=now, changed_at=now, **row))
                    inserted += 1
                elif old.content_sha256 != row["content_sha256"]:
                    conn.execute(regions_table.update().where(regions_table.c.id == old.id).values(changed_at=now, **row))
                    updated += 1
                else:
                    stamps = {"annotated_at": row["annotated_at"], "tool_updated_at": row["tool_updated_at"]}
                    if any(_utc(getattr(old, k)) != _utc(v) for k, v in stamps.items()):  # not a correction
                        conn.execute(regions_table.update().where(regions_table.c.id == old.id).values(**stamps))
                    unchanged += 1
            if existing:
                conn.execute(regions_table.delete().where(regions_table.c.id.in_([r.id for r in existing.values()])))
        return UpsertResult(inserted, updated, unchanged, len(existing))

    def delete_annotation(self, project_id: str | int, annotation_id: str | int) -> int:
        """Remove an annotation's regions (the tool deleted it); returns how many rows went."""
        project_id, annotation_id = _id(project_id, "project_id"), _id(annotation_id, "annotation_id")
        with self.engine.begin() as conn:
            return conn.execute(regions_table.delete().where(regions_table.c.project_id == project_id,
                                                       regions_table.c.annotation_id == annotation_id)).rowcount

    def delete_task(self, project_id: str | int, task_id: str | int) -> int:
        """Remove a task and its regions; returns the number of regions removed."""
        project_id, task_id = _id(project_id, "project_id"), _id(task_id, "task_id")
        with self.engine.begin() as conn:
            n = conn.execute(regions_table.delete().where(regions_table.c.project_id == project_id,
                                                    regions_table.c.task_id == task_id)).rowcount
            conn.execute(tasks_table.delete().where(tasks_table.c.project_id == project_id, tasks_table.c.task_id == task_id))
            return n

    def prune_tasks(self, project_id: str | int, keep: Iterable[str | int]) -> int:
        """After a full project sync: drop the tasks the tool no longer has. Returns tasks removed."""
        project_id = _id(project_id, "project_id")
        keep_ids = {_id(t, "task_id") for t in keep}
        with self.engine.begin() as conn:
            stored = [r.task_id for r in conn.execute(sa.select(tasks_table.c.task_id)
                                                      .where(tasks_table.c.project_id == project_id))]
            gone = [t for t in stored if t not in keep_ids]
            for i in range(0, len(gone), 500):
                chunk = gone[i:i + 500]
                conn.execute(regions_table.delete().where(regions_table.c.project_id == project_id,
                                                    regions_table.c.task_id.in_(chunk)))
                conn.execute(tasks_table.delete().where(tasks_table.c.project_id == project_id, tasks_table.c.task_id.in_(chunk)))
            return len(gone)

    def record_training(self, project_id: str | int, version: str, cutoff: datetime, *,
                        dataset_fingerprint: str | None = None, n_examples: int | None = None) -> None:
        """Remember that `version` was trained on the corrections up to `cutoff` (for `count_since`).

        Take `cutoff = store.now()` *before* reading `examples()`, so a correction arriving during
        training counts towards the next run.
        """
        project_id = _id(project_id, "project_id")
        values = {"cutoff": cutoff, "dataset_fingerprint": dataset_fingerprint, "n_examples": n_examples}
        with self.engine.begin() as conn:
            done = conn.execute(marks_table.update().where(marks_table.c.project_id == project_id,
                                                              marks_table.c.version == version)
                                .values(**values)).rowcount
            if not done:
                conn.execute(marks_table.insert().values(project_id=project_id, version=version,
                                                            created_at=_now(), **values))

    # -- reading --

    @staticmethod
    def now() -> datetime:
        return _now()

    def last_training(self, project_id: str | int) -> dict[str, Any] | None:
        project_id = _id(project_id, "project_id")
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(marks_table).where(marks_table.c.project_id == project_id)
                               .order_by(marks_table.c.cutoff.desc()).limit(1)).first()
        return dict(row._mapping) if row else None

    def count_since(self, project_id: str | int, since: datetime | str | None = None) -> int:
        """Regions added or changed after `since`: a datetime, a version recorded with
        `record_training` (its cutoff), or None (all regions)."""
        project_id = _id(project_id, "project_id")
        with self.engine.connect() as conn:
            if isinstance(since, str):
                cutoff = conn.execute(sa.select(marks_table.c.cutoff).where(
                    marks_table.c.project_id == project_id, marks_table.c.version == since)).scalar()
                if cutoff is None:
                    raise StoreError(f"no training of version {since!r} recorded for project {project_id}")
                since = cutoff
            q = sa.select(sa.func.count()).select_from(regions_table).where(regions_table.c.project_id == project_id)
            if since is not None:
                q = q.where(regions_table.c.changed_at > since)
            return int(conn.execute(q).scalar_one())

    def examples(self, project_id: str | int) -> list[RegionExample]:
        """Every stored region of the project as a RegionExample, in a stable order.

        `category` is the first chosen label; `region_id` is "<annotation_id>/<region_id>" (unique in
        the task: two annotators of one task give two examples).
        """
        project_id = _id(project_id, "project_id")
        q = (sa.select(regions_table, tasks_table.c.image_path, tasks_table.c.image_sha256, tasks_table.c.width, tasks_table.c.height)
             .join(tasks_table, tasks_table.c.id == regions_table.c.task_pk)
             .where(regions_table.c.project_id == project_id)
             .order_by(regions_table.c.task_id, regions_table.c.annotation_id, regions_table.c.region_id))
        with self.engine.connect() as conn:
            rows = conn.execute(q).all()
        return [RegionExample(
            image=r.image_path, image_sha256=r.image_sha256, width=r.width, height=r.height, rle=r.rle,
            category=r.labels[0] if r.labels else None,
            attributes={k: tuple(v) for k, v in r.attributes.items()},
            short=r.short, detailed=r.detailed, region_id=f"{r.annotation_id}/{r.region_id}", task_id=r.task_id,
            predicted_category=r.predicted_label, predicted_score=r.predicted_score,
            predicted_version=r.predicted_version) for r in rows]

    def stats(self, project_id: str | int) -> dict[str, int]:
        """Counts for operators: tasks, regions, and how many suggestions were accepted or corrected."""
        project_id = _id(project_id, "project_id")
        with self.engine.connect() as conn:
            n_tasks = conn.execute(sa.select(sa.func.count()).select_from(tasks_table)
                                   .where(tasks_table.c.project_id == project_id)).scalar_one()
            counts = dict(conn.execute(sa.select(regions_table.c.accepted, sa.func.count())
                                       .where(regions_table.c.project_id == project_id)
                                       .group_by(regions_table.c.accepted)).all())
        return {"tasks": int(n_tasks), "regions": int(sum(counts.values())),
                "accepted": int(counts.get(True, 0)), "corrected": int(counts.get(False, 0)),
                "unpredicted": int(counts.get(None, 0))}

    def projects(self) -> list[str]:
        with self.engine.connect() as conn:
            return sorted(r[0] for r in conn.execute(sa.select(tasks_table.c.project_id).distinct()))


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)


def _rle_size(region: Any) -> tuple[int, int] | None:
    """(h, w) of a region's RLE when well-formed; the full check is normalize_region's."""
    rle = region.get("rle") if isinstance(region, Mapping) else None
    size = rle.get("size") if isinstance(rle, Mapping) else None
    if isinstance(size, (list, tuple)) and len(size) == 2 and all(
            isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in size):
        return int(size[0]), int(size[1])
    return None


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA journal_mode=WAL")
    cur.close()
