"""Label Studio's ML-backend endpoints: /setup, /predict, /webhook, /versions (protocol notes §2, §6).

Label Studio formats stop here: requests are turned into neutral jobs (an image reference, regions, a plan)
for the queue, and the workers' outputs back into Label Studio predictions. Batch tasks that miss the time
budget are handed to write-back (backend/labelstudio/writeback.py), never dropped.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from typing import Any

from fastapi import APIRouter, Depends, HTTPException
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from backend.auth import auth_dependency, webhook_dependency
from backend.errors import INPUT_ERRORS
from backend.labelstudio.autolabel import autolabel_plan, found_nothing
from backend.labelstudio.autolabel import why_not as autolabel_why_not
from backend.labelstudio.config import PredictionPlan, parse_extra_params, parse_label_config
from backend.labelstudio.regions import parse_context, select_regions, task_image_url
from backend.labelstudio.results import prediction_from_output
from backend.labelstudio.sync import enqueue_for_event
from backend.labelstudio.webhook_setup import ensure_webhook_secret
from backend.queue.jobs import BATCH, INTERACTIVE, JobQueue, JobSpec, batch_group, canonical_json
from backend.service.autolabel import AutolabelOptions, label_mode
from backend.state import AppState
from training.schedule import training_status

logger = logging.getLogger(__name__)

_PLAN_CACHE_SIZE = 64
_VERSION_MAX_AGE_S = 0.5  # /predict names its jobs with a model version read at most this long ago
_ACTION_MAX = 64  # Label Studio's actions are short upper-case words (ANNOTATION_CREATED, ...)
_EVENT_IDS_MAX = 1_000  # ids kept per list; more -> sync the whole project
# Each entry is < ~40 KB (1,000 ids), so the stream stays bounded in bytes under `noeviction`.
_EVENTS_MAXLEN = 10_000


class PredictRequest(BaseModel):
    """What Label Studio POSTs to /predict (protocol notes §2.4, §2.5); unknown keys are ignored."""

    model_config = ConfigDict(extra="allow")
    tasks: list[Any]
    project: str | int | None = None
    label_config: str | None = None
    params: dict[str, Any] | None = None


class SetupRequest(BaseModel):
    """What Label Studio POSTs to /setup (§2.3). `access_token` and `hostname` are never used or logged."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)
    project: str | int | None = None
    schema_: str = Field(alias="schema")
    hostname: str | None = None
    access_token: str | None = None
    extra_params: str | dict[str, Any] | None = None


class WebhookEvent(BaseModel):
    """A Label Studio webhook event (§6): only `action` is required; only ids are kept (`slim_event`)."""

    model_config = ConfigDict(extra="allow")
    action: str = Field(max_length=_ACTION_MAX, pattern=r"^[A-Za-z0-9_]+$")


def _entity_id(value: Any) -> int | str | None:
    """The `id` of an event's project/task/annotation object, if it is a plain short scalar."""
    if isinstance(value, dict):
        value = value.get("id")
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int) or (isinstance(value, str) and len(value) <= 64):
        return value
    return None


def slim_event(event: dict[str, Any]) -> dict[str, Any]:
    """What training needs of an event -- the action and the ids to sync -- bounded in bytes.

    Label Studio is the source of truth: an event only says *what* to re-read through its API, so task
    data, results and label configs are never kept (an event can be tens of MB). Lists of ids are capped;
    a capped list asks for a sync of the whole project instead.
    """
    slim: dict[str, Any] = {"action": event["action"]}
    for key in ("project", "task", "annotation"):
        entity = _entity_id(event.get(key))
        if entity is not None:
            slim[key] = {"id": entity}
    for key in ("tasks", "annotations"):
        items = event.get(key)
        if isinstance(items, list):
            ids = [i for i in (_entity_id(x) for x in items[:_EVENT_IDS_MAX]) if i is not None]
            slim[key] = [{"id": i} for i in ids]
            if len(items) > _EVENT_IDS_MAX:
                slim["sync_project"] = True
    return slim


def _placeholder(model_version: str, status: str, message: str) -> dict[str, Any]:
    """A batch entry Label Studio skips: no `result` key, so no (empty) prediction is stored (writeback.py)."""
    return {"model_version": model_version, "score": None, "osprey_status": status, "message": message}


def _task_id(task: Any, index: int) -> int:
    if not isinstance(task, dict):
        raise HTTPException(422, f"tasks[{index}] must be an object, got {type(task).__name__}")
    task_id = task.get("id")
    if isinstance(task_id, bool) or not isinstance(task_id, int):
        raise HTTPException(422, f"tasks[{index}] needs an integer 'id' (Label Studio always sends one), got {task_id!r}")
    return task_id


def _parse_extra_params(extra: str | dict | None) -> dict[str, Any]:
    """v2 sends a JSON string, Label Studio stores whatever it was given: accept both (protocol §10.7)."""
    try:
        return parse_extra_params(extra)  # nesting bounded before json.loads recurses
    except INPUT_ERRORS as exc:
        raise HTTPException(422, str(exc)) from exc


class LabelStudioBackend:
    """The Label Studio side of the web process: label-config plans (cached by content) and the endpoints."""

    def __init__(self, state: AppState):
        self.state = state
        self.settings = state.settings
        self.metrics = state.metrics
        self._lock = threading.Lock()
        self._plans: OrderedDict[str, PredictionPlan] = OrderedDict()
        self._project_configs: OrderedDict[str, str] = OrderedDict()
        self.extra_params: dict[str, dict[str, Any]] = {}  # per project, from /setup (autolabel, label_mode)

    @property
    def writeback_enabled(self) -> bool:
        return bool(self.settings.label_studio_url) and self.settings.label_studio_api_key is not None

    def queue(self) -> JobQueue:
        return self.state.queue()

    # ---- label configs ------------------------------------------------------------------------

    def plan_for(self, config: str | None, project: Any) -> PredictionPlan:
        """The plan of a labeling config (cached by content); falls back to the config /setup saw."""
        key_project = str(project) if project is not None else None
        if not config:
            config = self._project_configs.get(key_project) if key_project else None
            if not config:
                raise HTTPException(422, "label_config is missing (Label Studio sends it with every /predict)")
        digest = hashlib.sha256(config.encode()).hexdigest()
        with self._lock:
            plan = self._plans.get(digest)
            if plan is not None:
                self._plans.move_to_end(digest)
        if plan is None:
            try:
                plan = parse_label_config(config)
            except INPUT_ERRORS as exc:
                raise HTTPException(422, str(exc)) from exc
            with self._lock:
                self._plans[digest] = plan
                while len(self._plans) > _PLAN_CACHE_SIZE:
                    self._plans.popitem(last=False)
        if key_project:
            with self._lock:
                self._project_configs[key_project] = config
                while len(self._project_configs) > _PLAN_CACHE_SIZE:
                    self._project_configs.popitem(last=False)
        return plan

    # ---- /predict -----------------------------------------------------------------------------

    def predict(self, body: PredictRequest) -> dict[str, Any]:
        plan = self.plan_for(body.label_config, body.project)
        params = body.params or {}
        context = params.get("context")
        if context is not None and not isinstance(context, dict):
            raise HTTPException(422, f"params.context must be an object or null, got {type(context).__name__}")
        model_version = self.state.model_version(max_age_s=_VERSION_MAX_AGE_S)
        if isinstance(context, dict) and "result" in context:
            return self.interactive(body.tasks, context, plan, model_version, project=body.project)
        return self.batch(body.tasks, plan, model_version, project=body.project)

    def interactive(self, tasks: list[Any], context: dict, plan: PredictionPlan, model_version: str,
                    project: Any = None) -> dict:
        if len(tasks) != 1:
            raise HTTPException(422, f"an interactive request (params.context.result) carries exactly one task, "
                                     f"got {len(tasks)}")
        task = tasks[0]
        task_id = _task_id(task, 0)
        try:
            image_url = task_image_url(task, plan)
            regions = parse_context(context, plan)
        except INPUT_ERRORS as exc:
            raise HTTPException(422, str(exc)) from exc
        if not regions:
            # Label Studio wants one entry; an interactive answer is shown, never stored.
            return {"results": [{"result": [], "score": None, "model_version": model_version}]}
        queue = self.queue()
        job_plan = plan.to_plan().to_dict()
        extra = self.extra_params.get(str(project)) if project is not None else None
        if label_mode(self.settings, extra) == "keep":  # keep the annotator's label (backend/service/autolabel.py)
            job_plan["label_mode"] = "keep"
        spec = JobSpec(INTERACTIVE, task_id, image_url, [r.to_dict() for r in regions], job_plan,
                       model_version, queue.keys.prefix)
        fresh, output = queue.submit_and_wait(spec, self.settings.osprey_interactive_timeout_s,
                                              require_worker=True)  # 503 when no worker is alive
        self._count_submit(spec, fresh)
        if output is None:
            self.metrics.jobs.labels(INTERACTIVE, "timeout").inc()
            snap = queue.snapshot()
            raise HTTPException(
                504,
                f"no worker finished the prediction within {self.settings.osprey_interactive_timeout_s:g} s "
                f"(OSPREY_INTERACTIVE_TIMEOUT_S); {snap['depths'][INTERACTIVE]} interactive and "
                f"{snap['depths'][BATCH]} batch jobs queued, {snap['workers']} worker(s) registered",
            )
        self._observe(INTERACTIVE, output, fresh)
        if not output["ok"]:
            retry_after = output["error"].get("retry_after_s")
            raise HTTPException(output["error"]["status"], output["error"]["message"],
                                headers={"Retry-After": str(retry_after)} if retry_after else None)
        return {"results": [prediction_from_output(output)]}

    def batch(self, tasks: list[Any], plan: PredictionPlan, model_version: str, project: Any = None) -> dict:
        started = time.monotonic()
        budget = self.settings.osprey_batch_budget_s
        task_ids = [_task_id(task, i) for i, task in enumerate(tasks)]
        entries: list[dict | None] = [None] * len(tasks)
        specs: list[JobSpec | None] = [None] * len(tasks)
        errors = []
        queue = self.queue()
        neutral_plan = plan.to_plan().to_dict()
        for i, task in enumerate(tasks):
            try:
                image_url = task_image_url(task, plan)
                regions = select_regions(task, plan, self.settings.osprey_regions_from)
            except INPUT_ERRORS as exc:
                errors.append(f"task {task_ids[i]}: {exc}")
                entries[i] = _placeholder(model_version, "error", str(exc))
                continue
            if not regions:
                # Region-less tasks are auto-labeled by the worker (backend/labelstudio/autolabel.py).
                extra = self.extra_params.get(str(project)) if project is not None else None
                auto = autolabel_plan(plan, neutral_plan, self.settings, extra)
                if auto is not None:
                    specs[i] = JobSpec(BATCH, task_ids[i], image_url, [], auto, model_version, queue.keys.prefix,
                                       group=batch_group(project))
                    continue
                entries[i] = _placeholder(
                    model_version, "no_regions",
                    f"task {task_ids[i]} has no regions to label (OSPREY_REGIONS_FROM="
                    f"{self.settings.osprey_regions_from}) and is not auto-labeled: "
                    f"{autolabel_why_not(plan, self.settings, extra)}")
                continue
            specs[i] = JobSpec(BATCH, task_ids[i], image_url, [r.to_dict() for r in regions], neutral_plan,
                               model_version, queue.keys.prefix, group=batch_group(project))  # fair per project
        if tasks and len(errors) == len(tasks):
            raise HTTPException(422, "no task can be predicted: " + "; ".join(errors[:10]))

        fresh = {s.job_id: self._submit(queue, s) for s in {s.job_id: s for s in specs if s is not None}.values()}
        outputs = queue.wait(list(fresh), budget - (time.monotonic() - started))
        for i, spec in enumerate(specs):
            if spec is not None:
                entries[i] = self._batch_entry(queue, spec, outputs.get(spec.job_id), model_version, budget,
                                               fresh[spec.job_id])
        return {"results": entries}

    def _batch_entry(self, queue: JobQueue, spec: JobSpec, output: dict | None, model_version: str,
                     budget: float, fresh: bool) -> dict:
        if output is not None and not output["ok"]:
            self._observe(BATCH, output, fresh)
            return _placeholder(model_version, "error", output["error"]["message"])
        decision = queue.claim(spec.job_id, allow_handoff=self.writeback_enabled)
        if decision == "response":
            output = output or queue.outputs([spec.job_id]).get(spec.job_id)
            if output is None:  # expired between the claim and now (only after OSPREY_RESULT_TTL_S)
                return _placeholder(model_version, "pending", "the output expired; ask again to recompute it")
            self._observe(BATCH, output, fresh)
            if not output["ok"]:
                return _placeholder(model_version, "error", output["error"]["message"])
            prediction = prediction_from_output(output)
            if not prediction["result"] and not found_nothing(output):  # an empty image: a real empty answer
                return _placeholder(model_version, "empty", "the model suggested nothing for these regions; "
                                                            "an empty prediction is not stored")
            return prediction
        self.metrics.jobs.labels(BATCH, "handed_off" if decision == "handoff" else "timeout").inc()
        if decision == "handoff":
            return _placeholder(model_version, "pending",
                                f"not finished within the {budget:g} s budget (OSPREY_BATCH_BUDGET_S); it will be "
                                "written to Label Studio through its API when done")
        return _placeholder(model_version, "pending",
                            f"not finished within the {budget:g} s budget and write-back is off (set LABEL_STUDIO_URL "
                            "and LABEL_STUDIO_API_KEY); the next request for this task returns it")

    def _submit(self, queue: JobQueue, spec: JobSpec) -> bool:
        enqueued = queue.submit(spec)
        self._count_submit(spec, enqueued)
        return enqueued

    def _count_submit(self, spec: JobSpec, enqueued: bool) -> None:
        self.metrics.jobs.labels(spec.kind, "enqueued" if enqueued else "deduplicated").inc()

    def _observe(self, kind: str, output: dict, fresh: bool) -> None:
        """Count an output; its compute time only once, by the request that enqueued the job."""
        self.metrics.jobs.labels(kind, "ok" if output["ok"] else "error").inc()
        if fresh and output.get("elapsed_s") is not None:
            self.metrics.job_duration.labels(kind).observe(float(output["elapsed_s"]))

    # ---- /webhook -----------------------------------------------------------------------------

    def record_event(self, event: dict[str, Any]) -> str:
        """Append the slim event to the bounded Redis stream the training sync reads."""
        slim = slim_event(event)
        project = slim.get("project") or {}
        fields = {
            "action": slim["action"],
            "project_id": str(project.get("id", "")),
            "received_at": f"{time.time():.3f}",
            "payload": canonical_json(slim),
        }
        queue = self.queue()
        entry_id = queue.connection.xadd(queue.keys.events, fields, maxlen=_EVENTS_MAXLEN, approximate=True)
        return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)


def create_router(state: AppState) -> APIRouter:
    """The Label Studio endpoints, each behind the backend's auth (the webhook behind its own secret)."""
    settings = state.settings
    backend = LabelStudioBackend(state)
    require_auth = auth_dependency(settings)
    require_webhook = webhook_dependency(settings)
    router = APIRouter()

    @router.post("/setup", dependencies=[Depends(require_auth)])
    def setup(body: SetupRequest) -> dict[str, Any]:
        backend.plan_for(body.schema_, body.project)
        extra = _parse_extra_params(body.extra_params)
        if body.project is not None:
            try:
                AutolabelOptions.from_settings(settings, extra)
                label_mode(settings, extra)
            except INPUT_ERRORS as exc:
                raise HTTPException(422, str(exc)) from exc
            backend.extra_params[str(body.project)] = extra
        ensure_webhook_secret(settings, body.project)  # background, once per project (learning loop)
        answer: dict[str, Any] = {"model_version": state.model_version(wait_s=settings.osprey_setup_wait_s)}
        score = (state.last_model or {}).get("score")
        if score is not None:  # what the scores mean (LS reads only model_version; people and scripts read this)
            answer["score"] = score
        return answer

    @router.post("/predict", dependencies=[Depends(require_auth)], response_class=JSONResponse)
    def predict(body: PredictRequest) -> JSONResponse:
        # Plain JSON types already: a JSONResponse skips FastAPI's re-encoding and validation of the answer.
        return JSONResponse(backend.predict(body))

    @router.post("/webhook", status_code=201, dependencies=[Depends(require_webhook)])
    def webhook(event: WebhookEvent) -> dict[str, Any]:
        raw = event.model_dump()
        entry = backend.record_event(raw)
        logger.info("webhook %s recorded (%s)", event.action, entry)  # action: <= 64 word characters
        # The learning loop: the event triggers a sync of what it names, or a training run (START_TRAINING,
        # whose `job` Label Studio keeps); Label Studio stays the source of truth (sync.py).
        queue = state.queue()
        enqueued = enqueue_for_event(queue.connection, queue.keys.prefix, slim_event(raw))
        return {"status": "ok", "action": event.action, "event_id": entry, **enqueued}

    @router.get("/versions", dependencies=[Depends(require_auth)])
    def versions() -> dict[str, Any]:
        queue = state.queue()
        current = queue.current_model()
        # `training`: the last runs of the learning loop, refusals with the gate's numbers (schedule.py).
        # `swap`: the last model swap of a worker; a failed one ({"ok": false, "error": ...}) shows here.
        # A promoted version is listed at once, before a worker's next job loads it.
        training = training_status(queue.connection, queue.keys.prefix)
        served = queue.model_versions()
        promoted = [r["version"] for r in reversed(training["runs"]) if r.get("status") == "promoted"]
        return {"versions": served + [v for v in dict.fromkeys(promoted) if v not in served],
                "current": current["version"] if current else None, "training": training,
                "swap": queue.last_swap()}

    return router
