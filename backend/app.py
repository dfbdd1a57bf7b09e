"""The HTTP API Label Studio 1.23 calls on an ML backend, plus /metrics; ``create_app(settings)``.

| Endpoint        | Auth          | What it does |
|-----------------|---------------|--------------|
| GET  /health    | none          | ``{"status": "UP", "model_class": ..., "model_version": ...}`` without touching Redis (LS waits 1 s) |
| GET  /openapi.json, /docs | basic/bearer | the OpenAPI schema and its Swagger UI |
| POST /setup     | basic/bearer  | parses the labeling config (4xx if nothing is predictable) and answers ``{"model_version"}`` -- the version a worker announced in Redis, never loading a model (LS waits 3 s) |
| POST /predict   | basic/bearer  | interactive (``params.context.result``): one job on the ``interactive`` queue, waits up to OSPREY_INTERACTIVE_TIMEOUT_S, answers one prediction; batch: one job per task on ``batch``, waits up to OSPREY_BATCH_BUDGET_S, answers one entry per task in order; unfinished tasks are written back later (backend/writeback.py) |
| POST /webhook   | webhook secret| records Label Studio events in the Redis stream ``<prefix>:events`` (the training pipeline consumes it); 201 |
| GET  /versions  | basic/bearer  | ``{"versions": [...]}``: every model version a worker has served |
| GET  /metrics   | basic/bearer  | Prometheus text format (backend/metrics.py) |

The web process never loads the model (no torch import): it parses requests, enqueues RQ jobs with
references only and waits for their outputs (backend/queue.py). Errors are JSON ``{"detail": "..."}``:
malformed input -> 400/413/422 (bad media: 403/404/413/415 from the worker), Redis unreachable -> 503
(requests succeed again as soon as it is back; nothing to restart), no worker answer in time -> 504.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from contextlib import asynccontextmanager
from typing import Any

import anyio
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field
from redis.exceptions import RedisError

from backend.auth import auth_dependency, install_log_redaction, redact, webhook_dependency
from backend.labelstudio.config import PredictionPlan, parse_label_config
from backend.labelstudio.regions import parse_context, select_regions, task_image_url
from backend.metrics import Metrics
from backend.queue.jobs import BATCH, INTERACTIVE, JobQueue, JobSpec, canonical_json
from backend.queue.redis import QueueUnavailable, connect, redis_url
from backend.settings import Settings, get_settings

logger = logging.getLogger(__name__)

MODEL_CLASS = "OspreyRegionModel"
_PLAN_CACHE_SIZE = 64
_EVENT_PAYLOAD_MAX = 512 * 1024  # larger webhook payloads are stored without their bulky parts
_EVENTS_MAXLEN = 100_000


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
    """A Label Studio webhook event (§6): only `action` is required; the rest is kept as sent."""

    model_config = ConfigDict(extra="allow")
    action: str


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
    if extra is None or extra == "":
        return {}
    if isinstance(extra, dict):
        return extra
    try:
        value = json.loads(extra)
    except json.JSONDecodeError as exc:
        raise HTTPException(422, f"extra_params is not valid JSON: {exc}") from exc
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise HTTPException(422, "extra_params must be a JSON object")
    return value


class Backend:
    """Per-app state: the Redis connection (made lazily, so the server starts while Redis is down), plans."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.url = redis_url(settings)
        self.metrics = Metrics()
        self.metrics.watch_queue(self._snapshot)
        self._queue: JobQueue | None = None
        self._lock = threading.Lock()
        self._plans: OrderedDict[str, PredictionPlan] = OrderedDict()
        self._project_configs: OrderedDict[str, str] = OrderedDict()
        self.last_model: dict | None = None

    @property
    def writeback_enabled(self) -> bool:
        return bool(self.settings.label_studio_url) and self.settings.label_studio_api_key is not None

    def queue(self) -> JobQueue:
        if self._queue is None:
            with self._lock:
                if self._queue is None:
                    self._queue = JobQueue(connect(self.url), self.settings)
        return self._queue

    def _snapshot(self) -> dict[str, Any] | None:
        return self.queue().snapshot()

    def unavailable(self, exc: Exception) -> JSONResponse:
        if isinstance(exc, QueueUnavailable):
            message = str(exc)
        else:
            message = (f"the job queue is unavailable: Redis at {redact(self.url)} does not answer "
                       f"({type(exc).__name__}: {exc}); requests work again as soon as it is back")
        return JSONResponse({"detail": message}, status_code=503, headers={"Retry-After": "5"})

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
            except ValueError as exc:
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

    def model_version(self, wait_s: float = 0.0) -> str:
        """The version workers serve, as announced in Redis; waits up to `wait_s` for the first worker."""
        deadline = time.monotonic() + wait_s
        while True:
            current = self.queue().current_model()
            if current:
                self.last_model = current
                return current["version"]
            if time.monotonic() >= deadline:
                raise HTTPException(
                    503,
                    "no worker has loaded a model yet: start `osprey worker` (or `osprey run`) with the same "
                    "REDIS_URL and OSPREY_REDIS_PREFIX as this server",
                )
            time.sleep(0.1)

    # ---- /predict -----------------------------------------------------------------------------

    def predict(self, body: PredictRequest) -> dict[str, Any]:
        plan = self.plan_for(body.label_config, body.project)
        params = body.params or {}
        context = params.get("context")
        if context is not None and not isinstance(context, dict):
            raise HTTPException(422, f"params.context must be an object or null, got {type(context).__name__}")
        model_version = self.model_version()
        if isinstance(context, dict) and "result" in context:
            return self.interactive(body.tasks, context, plan, model_version)
        return self.batch(body.tasks, plan, model_version)

    def interactive(self, tasks: list[Any], context: dict, plan: PredictionPlan, model_version: str) -> dict:
        if len(tasks) != 1:
            raise HTTPException(422, f"an interactive request (params.context.result) carries exactly one task, "
                                     f"got {len(tasks)}")
        task = tasks[0]
        task_id = _task_id(task, 0)
        try:
            image_url = task_image_url(task, plan)
            regions = parse_context(context, plan)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from exc
        if not regions:
            # Label Studio wants one entry; an interactive answer is shown, never stored.
            return {"results": [{"result": [], "score": None, "model_version": model_version}]}
        queue = self.queue()
        spec = JobSpec(INTERACTIVE, task_id, image_url, [r.to_job() for r in regions], plan.to_dict(),
                       model_version, queue.keys.prefix)
        fresh = self._submit(queue, spec)
        output = queue.wait([spec.job_id], self.settings.osprey_interactive_timeout_s).get(spec.job_id)
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
            raise HTTPException(output["error"]["status"], output["error"]["message"])
        return {"results": [output["prediction"]]}

    def batch(self, tasks: list[Any], plan: PredictionPlan, model_version: str) -> dict:
        started = time.monotonic()
        budget = self.settings.osprey_batch_budget_s
        task_ids = [_task_id(task, i) for i, task in enumerate(tasks)]
        entries: list[dict | None] = [None] * len(tasks)
        specs: list[JobSpec | None] = [None] * len(tasks)
        errors = []
        queue = self.queue()
        for i, task in enumerate(tasks):
            try:
                image_url = task_image_url(task, plan)
                regions = select_regions(task, plan, self.settings.osprey_regions_from)
            except ValueError as exc:
                errors.append(f"task {task_ids[i]}: {exc}")
                entries[i] = _placeholder(model_version, "error", str(exc))
                continue
            if not regions:
                entries[i] = _placeholder(
                    model_version, "no_regions",
                    f"task {task_ids[i]} has no regions to label (OSPREY_REGIONS_FROM="
                    f"{self.settings.osprey_regions_from}); draw or import regions first")
                continue
            specs[i] = JobSpec(BATCH, task_ids[i], image_url, [r.to_job() for r in regions], plan.to_dict(),
                               model_version, queue.keys.prefix)
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
            if not output["prediction"]["result"]:
                return _placeholder(model_version, "empty", "the model suggested nothing for these regions; "
                                                            "an empty prediction is not stored")
            return output["prediction"]
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
        self.metrics.jobs.labels(spec.kind, "enqueued" if enqueued else "deduplicated").inc()
        return enqueued

    def _observe(self, kind: str, output: dict, fresh: bool) -> None:
        """Count an output; its compute time only once, by the request that enqueued the job."""
        self.metrics.jobs.labels(kind, "ok" if output["ok"] else "error").inc()
        if fresh and output.get("elapsed_s") is not None:
            self.metrics.job_duration.labels(kind).observe(float(output["elapsed_s"]))

    # ---- /webhook -----------------------------------------------------------------------------

    def record_event(self, event: dict[str, Any]) -> str:
        """Append a Label Studio event to the Redis stream the training pipeline reads."""
        payload = canonical_json(event)
        truncated = len(payload) > _EVENT_PAYLOAD_MAX
        if truncated:  # project.label_config and task data make events big; keep the ids
            slim = {k: v for k, v in event.items() if k not in ("project", "task", "tasks")}
            slim["project"] = {"id": (event.get("project") or {}).get("id")} if isinstance(event.get("project"), dict) else None
            payload = canonical_json(slim)
        project = event.get("project")
        fields = {
            "action": event["action"],
            "project_id": str(project.get("id", "")) if isinstance(project, dict) else "",
            "received_at": f"{time.time():.3f}",
            "truncated": "1" if truncated else "0",
            "payload": payload,
        }
        queue = self.queue()
        entry_id = queue.connection.xadd(queue.keys.events, fields, maxlen=_EVENTS_MAXLEN, approximate=True)
        return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)


def _validation_message(exc: RequestValidationError) -> tuple[int, str]:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        ctx = next((e.get("ctx") or {} for e in errors if e.get("type") == "json_invalid"), {})
        return 400, f"request body is not valid JSON: {ctx.get('error', 'decode error')}"
    parts = []
    for e in errors[:10]:
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        parts.append(f"{loc}: {e.get('msg')}")
    return 422, "invalid request: " + "; ".join(parts)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The ASGI app. Connects to Redis lazily, so it starts (and answers /health) while Redis is down."""
    settings = settings or get_settings()
    install_log_redaction(settings)
    backend = Backend(settings)
    require_auth = auth_dependency(settings)
    require_webhook = webhook_dependency(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Sync endpoints block in worker threads while they wait for jobs: allow many concurrent waits.
        anyio.to_thread.current_default_thread_limiter().total_tokens = 256
        yield

    # The OpenAPI schema and docs are served below behind the same auth as the API.
    app = FastAPI(title="Osprey ML backend for Label Studio", version="0.1.0", lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.backend = backend

    @app.middleware("http")
    async def limit_and_measure(request: Request, call_next):
        started = time.perf_counter()
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > settings.osprey_max_request_bytes:
            response = JSONResponse(
                {"detail": f"request body of {length} bytes is above OSPREY_MAX_REQUEST_BYTES="
                           f"{settings.osprey_max_request_bytes}"}, status_code=413)
        else:
            response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", None) or "other"
        backend.metrics.observe_request(request.method, path, response.status_code, time.perf_counter() - started)
        return response

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        status, message = _validation_message(exc)
        return JSONResponse({"detail": message}, status_code=status)

    @app.exception_handler(QueueUnavailable)
    async def on_queue_unavailable(request: Request, exc: QueueUnavailable):
        return backend.unavailable(exc)

    @app.exception_handler(RedisError)
    async def on_redis_error(request: Request, exc: RedisError):
        logger.warning("Redis error on %s: %s", request.url.path, exc)
        return backend.unavailable(exc)

    @app.exception_handler(ValueError)
    async def on_value_error(request: Request, exc: ValueError):
        # Validators raise ValueError subclasses (RegionError, LabelConfigError, ...): the input is at fault.
        return JSONResponse({"detail": str(exc) or type(exc).__name__}, status_code=422)

    @app.exception_handler(Exception)
    async def on_error(request: Request, exc: Exception):
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": f"internal error ({type(exc).__name__}); see the server log"}, status_code=500)

    @app.get("/health")
    def health() -> dict[str, Any]:
        version = backend.last_model["version"] if backend.last_model else None
        return {"status": "UP", "model_class": MODEL_CLASS, "model_version": version}

    @app.post("/setup", dependencies=[Depends(require_auth)])
    def setup(body: SetupRequest) -> dict[str, Any]:
        backend.plan_for(body.schema_, body.project)
        _parse_extra_params(body.extra_params)
        return {"model_version": backend.model_version(wait_s=settings.osprey_setup_wait_s)}

    @app.post("/predict", dependencies=[Depends(require_auth)])
    def predict(body: PredictRequest) -> dict[str, Any]:
        return backend.predict(body)

    @app.post("/webhook", status_code=201, dependencies=[Depends(require_webhook)])
    def webhook(event: WebhookEvent) -> dict[str, Any]:
        entry = backend.record_event(event.model_dump())
        logger.info("webhook %s recorded (%s)", event.action, entry)
        return {"status": "ok", "action": event.action, "event_id": entry}

    @app.get("/versions", dependencies=[Depends(require_auth)])
    def versions() -> dict[str, Any]:
        queue = backend.queue()
        current = queue.current_model()
        return {"versions": queue.model_versions(), "current": current["version"] if current else None}

    @app.get("/metrics", dependencies=[Depends(require_auth)])
    def metrics() -> Response:
        return Response(backend.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/openapi.json", dependencies=[Depends(require_auth)], include_in_schema=False)
    def openapi() -> dict[str, Any]:
        return app.openapi()

    @app.get("/docs", dependencies=[Depends(require_auth)], include_in_schema=False)
    def docs() -> Response:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} - API")

    return app
