"""An ASGI guard in front of every route: credentials are checked from the headers before a single body
byte is read, then the body is read with a byte limit that holds for chunked uploads too.

FastAPI reads and JSON-parses a body before it runs a route's dependencies, so auth as a dependency alone
would let an anonymous client make the server read (and parse) a gigabyte. The guard also times every
request for /metrics.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import HTTPException
from fastapi.responses import JSONResponse
from starlette.requests import Request

from backend.auth import check_webhook_secret, require_auth
from backend.metrics import Metrics
from backend.settings import Settings

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

OPEN_PATHS = frozenset({"/health"})
# Metric labels for requests refused before routing (no route in the scope yet); anything else is "other",
# so a scanner cannot blow up the label set.
KNOWN_PATHS = frozenset({"/health", "/setup", "/predict", "/webhook", "/versions", "/train", "/metrics",
                         "/openapi.json", "/docs"})
WEBHOOK_PATHS = frozenset({"/webhook"})
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class _Reject(Exception):
    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        self.status, self.detail, self.headers = status, detail, headers or {}


class RequestGuard:
    """Auth first (from headers), then a bounded body, then the app; every request is timed."""

    def __init__(self, app: Any, settings: Settings, metrics: Metrics) -> None:
        self.app, self.settings, self.metrics = app, settings, metrics
        self.limit = settings.osprey_max_request_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = {"code": 500}

        async def send_and_note(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            self._authenticate(scope)
            if scope.get("method") in _BODY_METHODS:
                receive = await self._read_bounded(scope, receive)
        except _Reject as rejection:
            response = JSONResponse({"detail": rejection.detail}, status_code=rejection.status,
                                    headers=rejection.headers)
            await response(scope, receive, send_and_note)
        else:
            await self.app(scope, receive, send_and_note)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or (scope.get("path") if scope.get("path") in KNOWN_PATHS else "other")
            self.metrics.observe_request(scope.get("method", ""), path, status["code"], time.perf_counter() - started)

    def _authenticate(self, scope: Scope) -> None:
        path = scope.get("path", "")
        if path in OPEN_PATHS:
            return
        request = Request(scope)  # headers and query only: the body is not touched
        try:
            if path in WEBHOOK_PATHS:
                check_webhook_secret(request, self.settings)
            else:
                require_auth(request, self.settings)
        except HTTPException as exc:
            raise _Reject(exc.status_code, str(exc.detail), dict(exc.headers or {})) from None

    async def _read_bounded(self, scope: Scope, receive: Receive) -> Receive:
        """Read the whole body, refusing (413) as soon as it passes the limit; replay it to the app."""
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            raise _Reject(413, f"request body of {int(declared)} bytes is above OSPREY_MAX_REQUEST_BYTES={self.limit}")
        chunks: list[bytes] = []
        total = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # client went away: let the app see the disconnect
                return _replay(b"".join(chunks), receive, first=message)
            body = message.get("body", b"")
            total += len(body)
            if total > self.limit:
                raise _Reject(413, f"request body is above OSPREY_MAX_REQUEST_BYTES={self.limit} bytes "
                                   "(stopped reading there)")
            chunks.append(body)
            if not message.get("more_body", False):
                return _replay(b"".join(chunks), receive)


def _replay(body: bytes, receive: Receive, first: Message | None = None) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return first or {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
