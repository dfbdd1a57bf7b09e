"""Corrections store on SQLite and on the real PostgreSQL (127.0.0.1:5432, database `test`, one schema
per test, dropped after): migrations from empty, idempotent upserts, deletes, examples, schedule counts."""

from __future__ import annotations

import hashlib
import os
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
import sqlalchemy as sa
from pycocotools import mask as coco_mask

from training.images import ImageStore, ImageStoreError
from training.store import Store, StoreError, database_url

PG_URL = os.environ.get("OSPREY_TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
W, H = 40, 30
SHA = hashlib.sha256(b"image-1").hexdigest()


def rle(x0: int, y0: int, x1: int, y1: int, w: int = W, h: int = H) -> dict:
    m = np.zeros((h, w), dtype=np.uint8)
    m[y0:y1, x0:x1] = 1
    r = coco_mask.encode(np.asfortranarray(m))
    return {"size": [h, w], "counts": r["counts"].decode("ascii")}


def region(ann, rid, label="circle", predicted="circle", **extra) -> dict:
    out = {"annotation_id": ann, "region_id": rid, "rle": rle(2, 2, 10 + len(rid), 12), "labels": [label],
           "attributes": {"colour": ["red"]}, "short": f"a {label}", "annotator": "ann@example.com",
           "created_at": "2026-12-01T10:00:00Z", "updated_at": "2026-12-01T10:05:00+00:00",
           "prediction": None if predicted is None else {"model_version": "tiny-abc", "label": predicted,
                                                         "score": 0.8}}
    out.update(extra)
    return out


def upsert(store: Store, task="t1", regions=None, project="p1", sha=SHA):
    return store.upsert_task(project, task, image_ref=f"/data/upload/{task}.png", image_sha256=sha,
                             image_path=f"/models/images/{sha[:2]}/{sha}", regions=regions or [])


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request, tmp_path):
    """(url, schema, cleanup) for a fresh, empty database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'corrections.sqlite'}", None
        return
    schema = f"osprey_test_{uuid.uuid4().hex[:12]}"
    yield PG_URL, schema
    eng = sa.create_engine(PG_URL)
    with eng.begin() as conn:
        conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    eng.dispose()


@pytest.fixture
def store(backend, tmp_path):
    url, schema = backend
    s = Store(url, schema=schema, model_dir=tmp_path)
    yield s
    s.close()


def count(store: Store, table: str) -> int:
    with store.engine.connect() as conn:
        return conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one()


def test_migrations_run_from_empty_and_reopen(backend, tmp_path) -> None:
    url, schema = backend
    s = Store(url, schema=schema, model_dir=tmp_path)
    insp = sa.inspect(s.engine)
    names = set(insp.get_table_names())
    assert {"osprey_tasks", "osprey_regions", "osprey_training_marks", "osprey_alembic_version"} <= names
    with s.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT version_num FROM osprey_alembic_version")).scalars().all() == ["0001"]
        if schema:  # everything lives in the test's own schema, nothing in public
            found = conn.execute(sa.text("SELECT table_schema FROM information_schema.tables "
                                         "WHERE table_name = 'osprey_regions'")).scalars().all()
            assert schema in found
    upsert(s, regions=[region(1, "a")])
    s.close()
    again = Store(url, schema=schema, model_dir=tmp_path)  # upgrade on open is a no-op at head
    assert len(again.examples("p1")) == 1
    again.close()


def test_replayed_and_duplicate_syncs_create_no_duplicate_rows(store) -> None:
    regs = [region(1, "a"), region(1, "b", label="square"), region(2, "a", label="hexagon")]
    first = upsert(store, regions=regs)
    assert (first.inserted, first.updated, first.unchanged, first.deleted) == (3, 0, 0, 0)
    mark = store.now()
    time.sleep(0.01)
    for _ in range(3):  # webhook replays / the periodic sync seeing the same state
        again = upsert(store, regions=list(reversed(regs)))
        assert (again.inserted, again.updated, again.unchanged, again.deleted) == (0, 0, 3, 0)
    assert count(store, "osprey_regions") == 3 and count(store, "osprey_tasks") == 1
    assert store.count_since("p1", mark) == 0  # replays are not new corrections
    assert store.count_since("p1") == 3


def test_concurrent_duplicate_events(store) -> None:
    regs = [region(1, "a"), region(1, "b")]
    errors: list[BaseException] = []

    def sync() -> None:
        try:
            upsert(store, task="t9", regions=regs)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=sync) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert count(store, "osprey_regions") == 2 and count(store, "osprey_tasks") == 1


def test_changes_are_counted_and_accepted_vs_corrected_known(store) -> None:
    upsert(store, regions=[region(1, "a"), region(1, "b", label="square", predicted="circle"),
                           region(1, "c", predicted=None)])
    assert store.stats("p1") == {"tasks": 1, "regions": 3, "accepted": 1, "corrected": 1, "unpredicted": 1}
    cutoff = store.now()
    store.record_training("p1", "tiny-v1", cutoff, dataset_fingerprint="fp", n_examples=3)
    time.sleep(0.01)
    # the annotator corrects region a (circle -> hexagon); only the timestamps of b change
    res = upsert(store, regions=[region(1, "a", label="hexagon"),
                                 region(1, "b", label="square", predicted="circle", updated_at="2026-12-02T00:00:00Z"),
                                 region(1, "c", predicted=None)])
    assert (res.inserted, res.updated, res.unchanged, res.deleted) == (0, 1, 2, 0)
    from training.store import regions_table

    with store.engine.connect() as conn:
        stamp = conn.execute(sa.select(regions_table.c.tool_updated_at)
                             .where(regions_table.c.region_id == "b")).scalar_one()
    assert stamp == datetime(2026, 12, 2, tzinfo=UTC)  # kept current, without counting as a correction
    assert store.count_since("p1", "tiny-v1") == 1
    assert store.count_since("p1", cutoff) == 1
    assert store.last_training("p1")["version"] == "tiny-v1"
    assert store.stats("p1")["corrected"] == 2
    with pytest.raises(StoreError, match="no training of version"):
        store.count_since("p1", "never-trained")
    ex = {e.region_id: e for e in store.examples("p1")}
    assert ex["1/a"].category == "hexagon" and ex["1/a"].predicted_category == "circle"


def test_deletes_are_honoured(store) -> None:
    upsert(store, regions=[region(1, "a"), region(1, "b"), region(2, "a")])
    upsert(store, task="t2", regions=[region(3, "a")])
    # a region removed in the tool disappears at the next sync of its task
    res = upsert(store, regions=[region(1, "a"), region(2, "a")])
    assert res.deleted == 1
    assert sorted(e.region_id for e in store.examples("p1")) == ["1/a", "2/a", "3/a"]
    # ANNOTATIONS_DELETED: only that annotation's regions go
    assert store.delete_annotation("p1", 2) == 1
    assert sorted(e.region_id for e in store.examples("p1")) == ["1/a", "3/a"]
    assert store.delete_annotation("p1", 2) == 0  # replayed delete: nothing more
    # a sync with no annotations left empties the task
    assert upsert(store, regions=[]).deleted == 1
    # a full project sync prunes tasks the tool no longer has
    upsert(store, task="t3", regions=[region(4, "a")])
    assert store.prune_tasks("p1", keep=["t3"]) == 2
    assert [e.task_id for e in store.examples("p1")] == ["t3"]
    assert store.delete_task("p1", "t3") == 1
    assert count(store, "osprey_regions") == 0 and count(store, "osprey_tasks") == 0


def test_examples_carry_everything_the_dataset_needs(store) -> None:
    r = region(7, "r1", label="hexagon", predicted="circle", attributes={"colour": "blue", "size": ["big"]},
               detailed="A big blue hexagon.", texts={"notes": "edge case"})
    upsert(store, task=42, regions=[r], project=5)
    upsert(store, task=1, regions=[region(1, "x")], project="other")
    (e,) = store.examples(5)
    assert e.task_id == "42" and e.region_id == "7/r1"
    assert (e.width, e.height) == (W, H) and e.rle == r["rle"]
    assert e.image_sha256 == SHA and e.image.endswith(SHA)
    assert e.category == "hexagon" and e.attributes == {"colour": ("blue",), "size": ("big",)}
    assert e.short == "a hexagon" and e.detailed == "A big blue hexagon."
    assert (e.predicted_category, e.predicted_score, e.predicted_version) == ("circle", 0.8, "tiny-abc")
    assert store.projects() == ["5", "other"]
    with store.engine.connect() as conn:
        row = conn.execute(sa.text("SELECT annotated_at, accepted, texts FROM osprey_regions")).first()
    assert row.accepted in (False, 0)


def test_timestamps_are_utc_aware(store) -> None:
    upsert(store, regions=[region(1, "a", created_at="2026-12-01T12:00:00+02:00")])
    from training.store import regions_table

    with store.engine.connect() as conn:
        got = conn.execute(sa.select(regions_table.c.annotated_at, regions_table.c.changed_at)).one()
    assert got.annotated_at == datetime(2026, 12, 1, 10, 0, tzinfo=UTC)
    assert got.changed_at.tzinfo is not None
    assert abs(got.changed_at - datetime.now(UTC)) < timedelta(minutes=5)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ({"colour": "x"}, "unknown region keys"),
        ({"rle": {"size": [H, W], "counts": "!!!"}}, "region 1/a"),
        ({"rle": rle(0, 0, 5, 5, w=W + 1)}, "different RLE sizes"),
        ({"rle": {"size": [H, W], "counts": [W * H]}}, "compressed COCO RLE"),
        ({"labels": [""]}, "labels must be"),
        ({"prediction": {"label": "x", "score": float("nan")}}, "finite"),
        ({"prediction": {"lbl": "x"}}, "prediction must be"),
        ({"created_at": "yesterday"}, "ISO-8601"),
        ({"region_id": None}, "region_id must be"),
    ],
)
def test_bad_regions_are_refused_with_clear_errors(store, bad, match) -> None:
    with pytest.raises(StoreError, match=match):
        upsert(store, regions=[region(1, "ok"), region(1, "a", **bad)])
    assert count(store, "osprey_regions") == 0  # nothing half-written


def test_bad_task_input(store) -> None:
    with pytest.raises(StoreError, match="duplicate"):
        upsert(store, regions=[region(1, "a"), region(1, "a")])
    with pytest.raises(StoreError, match="sha256"):
        upsert(store, regions=[region(1, "a")], sha="abc")
    with pytest.raises(StoreError, match="empty"):
        upsert(store, regions=[region(1, "a", rle={"size": [H, W], "counts": coco_mask.encode(
            np.zeros((H, W), dtype=np.uint8, order="F"))["counts"].decode()})])


def test_database_url_resolution(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    assert database_url(None, tmp_path) == f"sqlite:///{(tmp_path / 'corrections.sqlite').resolve()}"
    monkeypatch.setenv("DATABASE_URL", "postgresql://u@h:5432/db")
    assert database_url(None, tmp_path) == "postgresql+psycopg://u@h:5432/db"
    assert database_url("postgres://u@h/db") == "postgresql+psycopg://u@h/db"
    with pytest.raises(StoreError, match="unsupported"):
        database_url("mysql://u@h/db")
    with pytest.raises(StoreError, match="schema"):
        Store(PG_URL, schema="bad; drop", migrate=False)


def test_image_store_is_content_addressed_and_write_once(tmp_path) -> None:
    images = ImageStore(tmp_path / "images")
    data = b"\x89PNG fake bytes"
    sha = hashlib.sha256(data).hexdigest()
    first = images.put_bytes(data)
    assert first.created and first.sha256 == sha and first.path == tmp_path / "images" / sha[:2] / sha
    mtime = first.path.stat().st_mtime_ns
    second = images.put_bytes(data, sha256=sha)
    assert not second.created and second.path.stat().st_mtime_ns == mtime
    assert images.get(sha).read_bytes() == data and images.has(sha)
    with pytest.raises(ImageStoreError, match="expected"):
        images.put_bytes(b"other", sha256=sha)
    with pytest.raises(ImageStoreError, match="not in the store"):
        images.get("0" * 64)
    with pytest.raises(ImageStoreError, match="sha256"):
        images.path_for("../../etc/passwd")
    src = tmp_path / "x.bin"
    src.write_bytes(b"file bytes")
    assert images.put_file(src).path.read_bytes() == b"file bytes"
    assert not [p for p in (tmp_path / "images").rglob(".tmp-*")]


def test_full_project_sync_repairs_missed_webhooks(store, tmp_path) -> None:
    """The store missed events (an update, a new task, a deleted task): one full project sync (every
    task upserted, then the rest pruned) leaves it exactly as a store fed only that sync."""
    upsert(store, task="t1", regions=[region(1, "a", label="circle")])
    upsert(store, task="gone", regions=[region(5, "a")])
    truth = {"t1": [region(1, "a", label="hexagon"), region(1, "b")], "t2": [region(2, "a", label="square")]}
    for task, regs in truth.items():
        upsert(store, task=task, regions=regs)
    store.prune_tasks("p1", keep=truth)

    fresh = Store(f"sqlite:///{tmp_path / 'fresh.sqlite'}", model_dir=tmp_path)
    for task, regs in truth.items():
        upsert(fresh, task=task, regions=regs)
    assert store.examples("p1") == fresh.examples("p1")
    assert store.count_since("p1") == 3
    fresh.close()
