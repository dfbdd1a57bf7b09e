"""A small Label Studio API client: auth, prediction write-back and task/project reads.

Built on httpx directly rather than label-studio-sdk's generated client: we need five endpoints,
explicit timeouts and a retry policy that never creates a prediction twice, and the same auth
logic has to serve plain media downloads (`LabelStudioAuth` is an `httpx.Auth`, handed to the
tool-agnostic fetcher by `media_origins`).

Label Studio 1.23 accepts two kinds of API key (protocol notes §1.2, §5):
- a legacy token, sent as `Authorization: Token <key>`;
- a personal access token (PAT): a JWT *refresh* token, exchanged at `POST /api/token/refresh/`
  for a 5-minute access token that is sent as `Authorization: Bearer <access>`. We refresh ahead of
  the access token's `exp`, and once more when Label Studio answers 401.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from collections.abc import Generator
from typing import Any

import httpx

from backend.media.fetch import TrustedOrigin
from backend.queue.retry import RetryPolicy
from backend.settings import Settings

logger = logging.getLogger(__name__)

# The only paths of Label Studio whose media we fetch, and the only ones that get the API key.
MEDIA_KEY_PATHS = ("/data/upload/", "/data/local-files/")
# Refresh this long before the access token expires, so a request never races its expiry.
_EXPIRY_MARGIN_S = 30.0
# Statuses after which an idempotent request (GET, DELETE) is retried.
_RETRY_STATUSES = frozenset({500, 502, 503, 504})
# A POST is retried only when the request cannot have been processed.
_RETRY_STATUSES_POST = frozenset({502, 503})
_RETRY_ERRORS_POST = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


class LabelStudioError(Exception):
    """A Label Studio API call failed; `status` is the HTTP status, or None when no answer came."""

    def __init__(self, status: int | None, message: str) -> None:
        super().__init__(f"Label Studio API error ({status if status is not None else 'no response'}): {message}")
        self.status = status
        self.message = message


def _jwt_claims(token: str) -> dict[str, Any] | None:
    """Claims of a JWT without verifying it (Label Studio verifies); None when `token` is not a JWT."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4))
        claims = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return None
    return claims if isinstance(claims, dict) else None


class LabelStudioAuth(httpx.Auth):
    """`httpx.Auth` that sends a Label Studio API key the way 1.23 expects it.

    `kind` is "legacy" (Token header), "pat" (refresh JWT exchanged for access tokens) or
    "access" (a JWT access token used as is; it cannot be renewed). Thread-safe.
    """

    def __init__(self, base_url: str, api_key: str, *, timeout_s: float = 10.0) -> None:
        if not api_key:
            raise ValueError("Label Studio API key is empty")
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key
        self._timeout_s = timeout_s
        self._lock = threading.Lock()
        self._access: str | None = None
        self._access_exp: float | None = None
        claims = _jwt_claims(api_key)
        if claims is None:
            self.kind = "legacy"
        elif claims.get("token_type") == "refresh":
            self.kind = "pat"
        else:
            self.kind = "access"

    def header(self, *, force_refresh: bool = False) -> str:
        """The Authorization header value, refreshing the access token when needed."""
        if self.kind == "legacy":
            return f"Token {self._api_key}"
        if self.kind == "access":
            return f"Bearer {self._api_key}"
        with self._lock:
            expired = self._access_exp is not None and time.time() > self._access_exp - _EXPIRY_MARGIN_S
            if force_refresh or self._access is None or expired:
                self._refresh()
            return f"Bearer {self._access}"

    def _refresh(self) -> None:
        url = f"{self.base_url}/api/token/refresh/"
        try:
            response = httpx.post(url, json={"refresh": self._api_key}, timeout=self._timeout_s)
        except httpx.HTTPError as exc:
            raise LabelStudioError(None, f"token refresh at {url} failed: {type(exc).__name__}") from exc
        if response.status_code != 200:
            raise LabelStudioError(
                response.status_code,
                "Label Studio rejected the personal access token (expired, revoked, or Label Studio's "
                "SECRET_KEY changed since it was issued); create a new one and set LABEL_STUDIO_API_KEY",
            )
        try:
            access = response.json()["access"]
        except (ValueError, KeyError, TypeError) as exc:
            raise LabelStudioError(200, "token refresh answer has no 'access' field") from exc
        if not isinstance(access, str) or not access:
            raise LabelStudioError(200, "token refresh answer has an empty 'access' field")
        claims = _jwt_claims(access) or {}
        exp = claims.get("exp")
        self._access = access
        self._access_exp = float(exp) if isinstance(exp, int | float) else None
        logger.debug("refreshed the Label Studio access token")

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = self.header()
        response = yield request
        if response.status_code == 401 and self.kind == "pat":
            request.headers["Authorization"] = self.header(force_refresh=True)
            yield request


def _error_message(response: httpx.Response) -> str:
    """A short message from an error answer (DRF puts it in `detail`)."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:300] or response.reason_phrase
    if isinstance(body, dict) and "detail" in body:
        return str(body["detail"])[:300]
    return json.dumps(body)[:300]


class LabelStudioClient:
    """The Label Studio API calls the backend makes (write-back of predictions, task and project reads).

    Retries follow one `RetryPolicy` (default: `max_retries` with short growing sleeps; write-back passes
    `NO_RETRY` because its retries are RQ job retries). 4xx are never retried. GET and DELETE are retried on
    connection errors, timeouts and 500/502/503/504. `create_prediction` is retried only when the
    request cannot have been processed (connection refused, 502, 503); after a read timeout or a 500
    the outcome is unknown and a `LabelStudioError` says so, so the caller reconciles with
    `list_predictions` instead of risking a duplicate.
    """

    def __init__(
        self,
        url: str,
        api_key: str | None,
        *,
        timeout_s: float = 10.0,
        max_retries: int = 3,
        backoff_s: float = 0.2,
        retry: RetryPolicy | None = None,
    ) -> None:
        if not url or not url.startswith(("http://", "https://")):
            raise ValueError(f"LABEL_STUDIO_URL must start with http:// or https://, got {url!r}")
        self.url = url.rstrip("/")
        self.auth = LabelStudioAuth(self.url, api_key, timeout_s=timeout_s) if api_key else None
        self.retry = retry or RetryPolicy(retries=max_retries, first_s=backoff_s, factor=2.0)
        self.max_retries = self.retry.retries
        self._http = httpx.Client(base_url=self.url, auth=self.auth, timeout=timeout_s, trust_env=False)

    @classmethod
    def from_settings(cls, settings: Settings, retry: RetryPolicy | None = None) -> LabelStudioClient:
        if not settings.label_studio_url:
            raise ValueError("LABEL_STUDIO_URL is not set; it is needed to write predictions back")
        if settings.label_studio_api_key is None:
            raise ValueError("LABEL_STUDIO_API_KEY is not set; it is needed to write predictions back")
        return cls(settings.label_studio_url, settings.label_studio_api_key.get_secret_value(), retry=retry)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> LabelStudioClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- API -----------------------------------------------------------------------------------
    def create_prediction(
        self, task_id: int, result: list[dict[str, Any]], score: float | None, model_version: str
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"task": task_id, "result": result, "model_version": model_version}
        if score is not None:
            body["score"] = score
        return self._request("POST", "/api/predictions/", json=body).json()

    def list_predictions(self, task_id: int) -> list[dict[str, Any]]:
        data = self._request("GET", "/api/predictions/", params={"task": task_id}).json()
        if isinstance(data, dict):  # paginated answer
            data = data.get("results", [])
        if not isinstance(data, list):
            raise LabelStudioError(200, "GET /api/predictions/ did not return a list")
        return data

    def delete_prediction(self, prediction_id: int) -> None:
        """Delete a prediction; one that is already gone (404) counts as deleted."""
        self._request("DELETE", f"/api/predictions/{prediction_id}/", ok_statuses={404})

    def get_task(self, task_id: int) -> dict[str, Any]:
        return self._request("GET", f"/api/tasks/{task_id}/").json()

    def get_project(self, project_id: int) -> dict[str, Any]:
        return self._request("GET", f"/api/projects/{project_id}/").json()

    # --- transport -----------------------------------------------------------------------------
    def _request(
        self, method: str, path: str, *, ok_statuses: frozenset[int] | set[int] = frozenset(), **kwargs: Any
    ) -> httpx.Response:
        post = method == "POST"
        retry_statuses = _RETRY_STATUSES_POST if post else _RETRY_STATUSES
        retry_errors = _RETRY_ERRORS_POST if post else (httpx.TransportError,)
        for attempt in range(self.max_retries + 1):
            last = attempt == self.max_retries
            try:
                response = self._http.request(method, path, **kwargs)
            except retry_errors as exc:
                if last:
                    raise LabelStudioError(None, f"{method} {path}: {type(exc).__name__} after retries") from exc
            except httpx.TransportError as exc:  # only reached for POST: the outcome is unknown
                raise LabelStudioError(
                    None, f"{method} {path}: {type(exc).__name__}; the request may have been processed"
                ) from exc
            else:
                if response.is_success or response.status_code in ok_statuses:
                    return response
                if response.status_code not in retry_statuses or last:
                    raise LabelStudioError(response.status_code, f"{method} {path}: {_error_message(response)}")
            logger.warning("Label Studio %s %s failed, retry %d/%d", method, path, attempt + 1, self.max_retries)
            time.sleep(self.retry.delay(attempt))
        raise AssertionError("unreachable")


def media_origins(settings: Settings) -> list[TrustedOrigin]:
    """What the media fetcher may fetch from Label Studio, and with which credentials.

    Exactly LABEL_STUDIO_URL's scheme, host and port; the API key only on /data/upload/ and
    /data/local-files/ (the worker resolves this by name: OSPREY_MEDIA_ORIGINS)."""
    if not settings.label_studio_url:
        return []
    url = settings.label_studio_url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"LABEL_STUDIO_URL must start with http:// or https://, got {url!r}")
    auth = None
    if settings.label_studio_api_key is not None:
        auth = LabelStudioAuth(url, settings.label_studio_api_key.get_secret_value(),
                               timeout_s=settings.osprey_media_timeout_s)
    return [TrustedOrigin(url, auth, MEDIA_KEY_PATHS, auth_errors=(LabelStudioError,))]
