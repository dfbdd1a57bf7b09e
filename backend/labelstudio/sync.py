"""Label Studio -> corrections store: what each annotated region of a task is, read through the API.

Label Studio is the source of truth (DESIGN §4): a webhook event only says which task (or project) to
re-read, so a replayed, duplicated, reordered or lost webhook changes nothing that a later sync does not
put right. `sync_task` reads the task with its annotations, turns every region into the store's neutral
region dict (COCO RLE at image size, labels, per-region choices and text areas, annotator, timestamps and
the prediction the annotator saw) and hands the task's complete region set to `Store.upsert_task`, which
inserts, updates and deletes to match. A task Label Studio no longer has (404) is deleted; a full
`sync_project` also drops stored tasks that are gone. The image is fetched once through the media fetcher
(same limits and credentials as predictions) and kept content-addressed; a task whose image URL did not
change is never downloaded again.

Jobs (queue ``<prefix>:training``, JSON payloads): `sync_job`, `sync_project_job`, `sync_all_job` (the
schedule's periodic repair), `delete_annotations_job`. `enqueue_for_event` maps a webhook event to them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from backend.errors import InputError
from backend.labelstudio.client import LabelStudioClient, LabelStudioError
from backend.labelstudio.config import PredictionPlan, parse_label_config
from backend.labelstudio.regions import parse_results, task_image_url

logger = logging.getLogger(__name__)

SYNC_JOB = "backend.labelstudio.sync.sync_job"
SYNC_PROJECT_JOB = "backend.labelstudio.sync.sync_project_job"
SYNC_ALL_JOB = "backend.labelstudio.sync.sync_all_job"
DELETE_JOB = "backend.labelstudio.sync.delete_annotations_job"
_PAGE = 100
# Events whose only payload is a task or tasks (the annotation changed: re-read the task).
_TASK_EVENTS = {"ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED", "TASKS_CREATED",
                "TASKS_DELETED", "ANNOTATION_DELETED"}


class SyncError(InputError):
    """A task cannot be synced (no label config, an unreadable result); the message says which."""


# --- Label Studio result -> neutral region dicts ---------------------------------------------------------


def _per_region_values(result: list[dict], plan: PredictionPlan) -> dict[str, dict[str, Any]]:
    """Region id -> {"attributes": {name: [values]}, "texts": {name: text}} from per-region controls."""
    attributes = {a.name for a in plan.attributes}
    texts = {d.name for d in plan.descriptions}
    out: dict[str, dict[str, Any]] = {}
    for item in result:
        if not isinstance(item, dict) or "id" not in item or not isinstance(item.get("value"), dict):
            continue
        name, value = item.get("from_name"), item["value"]
        entry = out.setdefault(str(item["id"]), {"attributes": {}, "texts": {}})
        if name in attributes and isinstance(value.get("choices"), list):
            entry["attributes"][name] = [str(v) for v in value["choices"]]
        elif name in texts and value.get("text") is not None:
            text = value["text"]
            entry["texts"][name] = " ".join(str(t) for t in text) if isinstance(text, list) else str(text)
    return out


def _prediction_seen(task: dict, annotation: dict) -> dict[str, dict[str, Any]]:
    """Region id -> what the prediction the annotation started from said about it."""
    parent = annotation.get("parent_prediction")
    if isinstance(parent, dict):
        parent = parent.get("id")
    if parent is None:
        return {}
    prediction = next((p for p in task.get("predictions") or [] if isinstance(p, dict) and p.get("id") == parent), None)
    if prediction is None:
        return {}
    out: dict[str, dict[str, Any]] = {}
    for item in prediction.get("result") or []:
        if not isinstance(item, dict) or not isinstance(item.get("value"), dict):
            continue
        labels = next((v for k, v in item["value"].items() if k.endswith("labels") and isinstance(v, list) and v), None)
        if labels:
            score = item.get("score", prediction.get("score"))
            out[str(item.get("id"))] = {"model_version": prediction.get("model_version"), "label": str(labels[0]),
                                        "score": float(score) if isinstance(score, (int, float)) else None}
    return out


def _annotator(annotation: dict) -> str | None:
    who = annotation.get("completed_by")
    if isinstance(who, dict):
        who = who.get("email") or who.get("id")
    return None if who is None else str(who)


def task_regions(task: dict, plan: PredictionPlan) -> list[dict[str, Any]]:
    """Every region of every (not cancelled) annotation of `task`, as the store's region dicts."""
    from backend.service.geometry import rasterise  # numpy/pycocotools: only where a sync runs

    regions: list[dict[str, Any]] = []
    short = {d.name for d in plan.descriptions if d.detail == "short"}
    for annotation in task.get("annotations") or []:
        if not isinstance(annotation, dict) or annotation.get("was_cancelled"):
            continue
        result = annotation.get("result") or []
        try:
            specs = parse_results(result, plan)
        except InputError as exc:
            raise SyncError(f"task {task.get('id')} annotation {annotation.get('id')}: {exc}") from exc
        extra = _per_region_values(result, plan)
        seen = _prediction_seen(task, annotation)
        for spec in specs:
            mask = rasterise(spec, (spec.width, spec.height))
            values = extra.get(spec.id, {"attributes": {}, "texts": {}})
            texts = dict(values["texts"])
            short_text = next((texts.pop(n) for n in list(texts) if n in short), None)
            detailed_text = next((texts.pop(n) for n in list(texts)), None)
            regions.append({
                "annotation_id": str(annotation["id"]), "region_id": spec.id, "rle": mask.to_coco_rle(),
                "labels": list(spec.labels), "attributes": values["attributes"], "short": short_text,
                "detailed": detailed_text, "texts": texts, "annotator": _annotator(annotation),
                "created_at": annotation.get("created_at"), "updated_at": annotation.get("updated_at"),
                "prediction": seen.get(spec.id),
            })
    return regions


# --- the sync -------------------------------------------------------------------------------------------


class LabelStudioSync:
    """Reads tasks through the Label Studio API and writes them to the corrections store."""

    def __init__(self, client: LabelStudioClient, store: Any, media: Any):
        self.client = client
        self.store = store
        self.media = media
        self._plans: dict[str, PredictionPlan] = {}

    def plan(self, project: str) -> PredictionPlan:
        if project not in self._plans:
            config = self.client.get_project(int(project)).get("label_config")
            if not config:
                raise SyncError(f"project {project} has no label config")
            self._plans[project] = parse_label_config(config)
        return self._plans[project]

    def _get_task(self, task_id: str) -> dict | None:
        try:
            task = self.client.get_task(int(task_id))
        except LabelStudioError as exc:
            if exc.status == 404:
                return None
            raise
        if "annotations" not in task:  # an older/lighter serializer: ask for them
            task["annotations"] = self._request("GET", f"/api/tasks/{task_id}/annotations/")
        return task

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.client._request(method, path, **kwargs).json()

    def _stored_image(self, project: str, task_id: str, image_ref: str) -> tuple[str, str] | None:
        """(sha256, path) of this task's image when the store has it for the same URL."""
        import sqlalchemy as sa

        from training.store import tasks_table

        with self.store.engine.connect() as conn:
            row = conn.execute(sa.select(tasks_table.c.image_ref, tasks_table.c.image_sha256, tasks_table.c.image_path)
                               .where(tasks_table.c.project_id == project, tasks_table.c.task_id == task_id)).first()
        if row is None or row.image_ref != image_ref or not self.store.images().has(row.image_sha256):
            return None
        return row.image_sha256, row.image_path

    def _image(self, project: str, task_id: str, url: str) -> tuple[str, str]:
        stored = self._stored_image(project, task_id, url)
        if stored is not None:
            return stored
        data = self.media.load_bytes(url)
        self.media.decode(data, url)  # an image we can read, within the pixel limits
        put = self.store.images().put_bytes(data)
        return put.sha256, str(put.path)

    def sync_task(self, project: Any, task_id: Any) -> dict[str, Any]:
        """Make the store match Label Studio for one task; returns what changed."""
        project, task_id = str(project), str(task_id)
        task = self._get_task(task_id)
        if task is None or (task.get("project") is not None and str(task.get("project")) != project):
            removed = self.store.delete_task(project, task_id)
            return {"task": task_id, "deleted": removed, "gone": True}
        plan = self.plan(project)
        regions = task_regions(task, plan)
        if not regions:
            removed = self.store.delete_task(project, task_id)
            return {"task": task_id, "deleted": removed, "regions": 0}
        url = task_image_url(task, plan)
        sha, path = self._image(project, task_id, url)
        result = self.store.upsert_task(project, task_id, image_ref=url, image_sha256=sha, image_path=path,
                                        regions=regions)
        return {"task": task_id, "regions": len(regions), "inserted": result.inserted, "updated": result.updated,
                "unchanged": result.unchanged, "deleted": result.deleted}

    def task_ids(self, project: Any) -> Iterator[int]:
        """Every task id of the project (Data Manager API, paged)."""
        page, seen = 1, 0
        while True:
            try:
                data = self._request("GET", "/api/tasks", params={"project": int(project), "page": page,
                                                                    "page_size": _PAGE, "fields": "task_only"})
            except LabelStudioError as exc:
                if exc.status == 404 and page > 1:  # past the last page
                    return
                raise
            tasks = data.get("tasks", []) if isinstance(data, dict) else data
            for t in tasks:
                yield int(t["id"])
            seen += len(tasks)
            total = data.get("total") if isinstance(data, dict) else None
            if not tasks or (total is not None and seen >= total) or len(tasks) < _PAGE:
                return
            page += 1

    def sync_project(self, project: Any) -> dict[str, Any]:
        """Sync every task of the project and drop stored tasks Label Studio no longer has."""
        project = str(project)
        self._plans.pop(project, None)  # the label config may have changed
        ids = list(self.task_ids(project))
        changed = failed = 0
        for task_id in ids:
            try:
                out = self.sync_task(project, task_id)
            except (SyncError, InputError, LabelStudioError) as exc:
                failed += 1
                logger.warning("sync of task %s (project %s) failed: %s", task_id, project, exc)
                continue
            changed += int(bool(out.get("inserted") or out.get("updated") or out.get("deleted")))
        pruned = self.store.prune_tasks(project, ids)
        logger.info("synced project %s: %d tasks, %d changed, %d failed, %d removed", project, len(ids), changed,
                    failed, pruned)
        return {"project": project, "tasks": len(ids), "changed": changed, "failed": failed, "pruned": pruned}


# --- events and jobs ------------------------------------------------------------------------------------


def _ids(items: Any) -> list[str]:
    return [str(i["id"]) for i in items or [] if isinstance(i, dict) and i.get("id") is not None]


def enqueue_for_event(connection: Any, prefix: str, event: dict[str, Any]) -> dict[str, Any]:
    """What a (slim) webhook event asks for: syncs, deletes, or a training run ("Start Training").

    Returns {"jobs": [...]} and, for START_TRAINING, {"job": id} -- Label Studio keeps that as the
    training job of the backend.
    """
    from training.schedule import enqueue_sync, enqueue_training, training_queue

    action = str(event.get("action", ""))
    project = (event.get("project") or {}).get("id")
    if project is None:
        return {"jobs": []}
    project = str(project)
    jobs: list[str] = []
    out: dict[str, Any] = {"jobs": jobs}
    if action == "START_TRAINING":
        job_id, _ = enqueue_training(connection, prefix, project, "Start Training in Label Studio")
        jobs.append(job_id)
        out["job"] = job_id
    elif action in ("PROJECT_UPDATED",) or event.get("sync_project"):
        jobs.append(enqueue_sync(connection, prefix, SYNC_PROJECT_JOB, project)[0])
    elif action == "ANNOTATIONS_DELETED":
        ids = _ids(event.get("annotations"))
        if ids:
            job = training_queue(connection, prefix).enqueue_call(
                DELETE_JOB, args=({"prefix": prefix, "project": project, "annotations": ids},),
                result_ttl=24 * 3600, failure_ttl=7 * 24 * 3600, description=f"delete annotations of project {project}")
            jobs.append(job.id)
    elif action in _TASK_EVENTS:
        tasks = _ids(event.get("tasks")) or ([str(event["task"]["id"])] if isinstance(event.get("task"), dict) else [])
        for task in tasks:
            jobs.append(enqueue_sync(connection, prefix, SYNC_JOB, project, task, project_func=SYNC_PROJECT_JOB)[0])
    return out


class _Runtime:
    """Per-process: settings, store, media fetcher, Label Studio client (built on first use)."""

    def __init__(self) -> None:
        from backend.labelstudio.client import media_origins
        from backend.media.fetch import MediaFetcher
        from backend.queue.redis import connect, redis_url
        from backend.settings import get_settings
        from training.store import Store

        self.settings = get_settings()
        self.connection = connect(redis_url(self.settings))
        self.store = Store(model_dir=self.settings.model_dir)
        self.media = MediaFetcher(self.settings, media_origins(self.settings))
        self.client = LabelStudioClient.from_settings(self.settings)

    def sync(self) -> LabelStudioSync:
        return LabelStudioSync(self.client, self.store, self.media)


_RUNTIME: _Runtime | None = None


def runtime() -> _Runtime:
    global _RUNTIME
    if _RUNTIME is None:
        _RUNTIME = _Runtime()
    return _RUNTIME


def _after_sync(rt: _Runtime, project: str) -> str | None:
    from training.jobs import maybe_train

    return maybe_train(rt.connection, rt.settings.osprey_redis_prefix, rt.store, project)


def sync_job(payload: dict[str, Any]) -> dict[str, Any]:
    rt = runtime()
    out = rt.sync().sync_task(payload["project"], payload["task"])
    out["training_job"] = _after_sync(rt, str(payload["project"]))
    return out


def sync_project_job(payload: dict[str, Any]) -> dict[str, Any]:
    rt = runtime()
    out = rt.sync().sync_project(payload["project"])
    out["training_job"] = _after_sync(rt, str(payload["project"]))
    return out


def sync_all_job(payload: dict[str, Any]) -> dict[str, Any]:
    """The schedule's periodic repair: a full sync of every project the loop knows."""
    from training.schedule import TrainingKeys

    rt = runtime()
    prefix = rt.settings.osprey_redis_prefix
    known = {p.decode() if isinstance(p, bytes) else str(p) for p in rt.connection.smembers(TrainingKeys(prefix).projects)}
    projects = sorted(known | set(rt.store.projects()))
    return {"projects": {p: rt.sync().sync_project(p) for p in projects}}


def delete_annotations_job(payload: dict[str, Any]) -> dict[str, Any]:
    rt = runtime()
    removed = sum(rt.store.delete_annotation(payload["project"], a) for a in payload["annotations"])
    return {"project": payload["project"], "deleted": removed}


def periodic_jobs(settings: Any) -> dict[str, int]:
    """What the schedule runs for Label Studio: the full sync that repairs missed webhooks."""
    from training.schedule import TrainingSettings

    if not settings.label_studio_url or settings.label_studio_api_key is None:
        return {}
    return {SYNC_ALL_JOB: TrainingSettings().osprey_sync_period_s}


def sync_cli(settings: Any, project: int, enqueue: bool = False) -> int:
    """`osprey sync --project ID`: sync now (or queue it) and print what changed."""
    import json
    import sys

    if not settings.label_studio_url or settings.label_studio_api_key is None:
        print("osprey sync: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY", file=sys.stderr)
        return 2
    rt = runtime()
    if enqueue:
        from training.schedule import enqueue_sync

        job_id, fresh = enqueue_sync(rt.connection, settings.osprey_redis_prefix, SYNC_PROJECT_JOB, project)
        print(json.dumps({"job": job_id, "enqueued": fresh}))
        return 0
    try:
        out = rt.sync().sync_project(project)
    except (LabelStudioError, InputError) as exc:
        print(f"osprey sync: {exc}", file=sys.stderr)
        return 1
    out["training_job"] = _after_sync(rt, str(project))
    print(json.dumps(out))
    return 0
