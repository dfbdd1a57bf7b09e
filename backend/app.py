"""The HTTP API Label Studio 1.23 calls on an ML backend, plus /metrics; ``create_app(settings)``.

| Endpoint        | Auth          | What it does |
|-----------------|---------------|--------------|
| GET  /health    | none          | ``{"status": "UP", "model_class": ..., "model_version": ..., "workers": n}``; 503 ``{"status": "DOWN", "reason": ...}`` when no worker has a live heartbeat or Redis is down (one cheap Redis read; LS waits 1 s) |
| GET  /openapi.json, /docs | basic/bearer | the OpenAPI schema and its Swagger UI |
| POST /setup     | basic/bearer  | parses the labeling config (4xx if nothing is predictable) and answers ``{"model_version"}`` -- the version a worker announced in Redis, never loading a model (LS waits 3 s) |
| POST /predict   | basic/bearer  | interactive (``params.context.result``): one job on the ``interactive`` queue, waits up to OSPREY_INTERACTIVE_TIMEOUT_S, answers one prediction; batch: one job per task on ``batch``, waits up to OSPREY_BATCH_BUDGET_S, answers one entry per task in order; unfinished tasks are written back later (backend/labelstudio/writeback.py) |
| POST /webhook   | webhook secret| records Label Studio events in the Redis stream ``<prefix>:events`` (the training pipeline consumes it); 201 |
| GET  /versions  | basic/bearer  | ``{"versions": [...]}``: every model version a worker has served |
| GET  /metrics   | basic/bearer  | Prometheus text format (backend/metrics.py) |

The web process never loads the model (no torch import): it parses requests, enqueues RQ jobs with
references only and waits for their outputs (backend/queue/). Errors are JSON ``{"detail": "..."}``:
malformed input -> 400/413/422 (bad media: 403/404/413/415 from the worker), Redis unreachable -> 503
(requests succeed again as soon as it is back; nothing to restart), no worker answer in time -> 504.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import Any

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from redis.exceptions import RedisError

from backend.auth import auth_dependency, install_log_redaction
from backend.auth import require_auth as require_auth_for
from backend.errors import INPUT_ERRORS, input_status
from backend.guard import RequestGuard
from backend.health import health_detail
from backend.labelstudio.routes import create_router
from backend.queue.jobs import QueueBusy
from backend.queue.redis import QueueUnavailable
from backend.settings import Settings, get_settings
from backend.state import AppState

logger = logging.getLogger(__name__)

MODEL_CLASS = "OspreyRegionModel"


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


def _documented_errors(schema: dict[str, Any]) -> dict[str, Any]:
    """Every error answer is ``{"detail": "<message>"}`` (handlers above), 422 included: say so in the schema
    instead of FastAPI's default list of validation errors (tests/fuzz/test_schemathesis.py checks it)."""
    schemas = schema.setdefault("components", {}).setdefault("schemas", {})
    schemas["HTTPValidationError"] = {"title": "Error", "type": "object", "required": ["detail"],
                                      "properties": {"detail": {"type": "string", "title": "Detail"}}}
    schemas.pop("ValidationError", None)
    error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/HTTPValidationError"}}}}
    for path, operations in schema.get("paths", {}).items():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            for status, why in _ERROR_STATUSES.items():
                if path == "/predict" or status not in _PREDICT_ONLY:
                    responses.setdefault(str(status), {"description": why, **error})
    return schema


# The error answers every operation can give (body {"detail": "<message>"}), documented in the schema so a
# client (and schemathesis' status-code check) knows them; 5xx only where they are the service's answer.
_ERROR_STATUSES = {
    400: "the body is not valid JSON", 401: "authentication required or wrong", 403: "not allowed",
    408: "the body did not arrive in time (OSPREY_BODY_TIMEOUT_S)",
    413: "the body is above OSPREY_MAX_REQUEST_BYTES", 415: "not a JSON body", 422: "the input is invalid",
    429: "too many requests waiting: retry after Retry-After", 502: "the prediction failed on every attempt",
    503: "no live worker, or Redis is unreachable: retry after Retry-After", 504: "the prediction took too long",
}
_PREDICT_ONLY = {502, 504}


def create_app(settings: Settings | None = None) -> FastAPI:
    """The ASGI app. Connects to Redis lazily, so it starts (and answers /health) while Redis is down."""
    settings = settings or get_settings()
    install_log_redaction(settings)
    state = AppState(settings)
    require_auth = auth_dependency(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Sync endpoints block in worker threads while they wait for jobs: allow many concurrent waits.
        anyio.to_thread.current_default_thread_limiter().total_tokens = 256
        yield

    # The OpenAPI schema and docs are served below behind the same auth as the API.
    app = FastAPI(title="Osprey ML backend for Label Studio", version="0.1.0", lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.backend = state
    app.add_middleware(RequestGuard, settings=settings, metrics=state.metrics)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        status, message = _validation_message(exc)
        return JSONResponse({"detail": message}, status_code=status)

    @app.exception_handler(QueueUnavailable)
    async def on_queue_unavailable(request: Request, exc: QueueUnavailable):
        return state.unavailable(exc)

    @app.exception_handler(QueueBusy)
    async def on_queue_busy(request: Request, exc: QueueBusy):
        # Load shedding (429) or no live worker (503): say why, and when to come back.
        return JSONResponse({"detail": exc.message}, status_code=exc.status_code,
                            headers={"Retry-After": str(exc.retry_after_s)})

    @app.exception_handler(RedisError)
    async def on_redis_error(request: Request, exc: RedisError):
        logger.warning("Redis error on %s: %s", request.url.path, exc)
        return state.unavailable(exc)

    for error_class in INPUT_ERRORS:
        @app.exception_handler(error_class)
        async def on_input_error(request: Request, exc: Exception):
            # Only the project's own error classes mean the input is at fault (backend/errors.py).
            return JSONResponse({"detail": str(exc) or type(exc).__name__}, status_code=input_status(exc))

    @app.exception_handler(Exception)
    async def on_error(request: Request, exc: Exception):
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": f"internal error ({type(exc).__name__}); see the server log"}, status_code=500)

    health_threads: list[anyio.CapacityLimiter | None] = [None]

    @app.get("/health", response_model=None)
    async def health(request: Request, detail: bool = False) -> dict[str, Any] | JSONResponse:
        # UP only while a prediction worker has a live heartbeat (backend/queue/jobs.py live_workers);
        # one Redis read, cached for 0.5 s (Label Studio polls with a 1 s timeout), on /health's own
        # threads (the Redis read may block; the default threads may all be waiting on jobs) and its own
        # client, which gives up after HEALTH_REDIS_TIMEOUT_S (state.py; a stalled Redis: DOWN in time).
        # `?detail=1` (authenticated): Redis, workers, model versions, lanes, oldest job, last training run.
        if detail:
            require_auth_for(request, settings)
        # Its own threads: with every default thread waiting on a job, Label Studio's 1 s health check
        # must still be answered (it would queue behind those waits otherwise).
        if health_threads[0] is None:
            health_threads[0] = anyio.CapacityLimiter(4)  # created on the server's event loop
        return await anyio.to_thread.run_sync(_health_body, detail, limiter=health_threads[0])

    def _health_body(detail: bool) -> dict[str, Any] | JSONResponse:
        version = state.last_model["version"] if state.last_model else None
        body: dict[str, Any] = {"status": "UP", "model_class": MODEL_CLASS, "model_version": version}
        try:
            queue = state.health_queue()
            workers = queue.live_worker_count(cached=True)
            reason = None if workers else queue.no_worker_reason()
        except (QueueUnavailable, RedisError) as exc:
            workers, reason = 0, f"the job queue is unavailable (Redis: {type(exc).__name__}: {exc})"
        body["workers"] = workers
        if reason is not None:
            body = {**body, "status": "DOWN", "reason": reason}
        if detail:
            body["detail"] = health_detail(state)
        if reason is not None:
            return JSONResponse(body, status_code=503)
        return body

    app.include_router(create_router(state))

    @app.get("/metrics", dependencies=[Depends(require_auth)], response_class=PlainTextResponse)
    def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/openapi.json", dependencies=[Depends(require_auth)], include_in_schema=False)
    def openapi() -> dict[str, Any]:
        return _documented_errors(app.openapi())

    @app.get("/docs", dependencies=[Depends(require_auth)], include_in_schema=False)
    def docs() -> Response:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} - API")

    return app
