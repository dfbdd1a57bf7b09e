"""Authentication of our HTTP endpoints and redaction of secrets from logs.

Every endpoint but `/health` takes either of:
- HTTP basic auth with BASIC_AUTH_USER / BASIC_AUTH_PASS: what Label Studio sends when the ML backend
  is connected with "Use basic authentication" (protocol notes §2.7);
- `Authorization: Bearer <OSPREY_API_TOKEN>` for scripts and other clients.

With neither configured the backend is open (local single-machine use) and logs a warning at
startup; OSPREY_AUTH_REQUIRED=true turns that into a startup error.

`/webhook` is different: Label Studio's auto-created project webhook carries no credentials, so it
authenticates with OSPREY_WEBHOOK_SECRET, in the webhook URL (`/webhook?secret=...`) or the header
`X-Osprey-Webhook-Secret`. Basic/bearer credentials are also accepted there, because "Start
Training" reaches `/webhook` through Label Studio's ML client, which sends basic auth.

All comparisons are constant-time (`hmac.compare_digest`). `install_log_redaction` keeps tokens,
passwords and Authorization headers out of every log record of the process, at every level.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import re
import traceback
from collections.abc import Awaitable, Callable, Iterable

from fastapi import HTTPException, Request

from backend.settings import Settings

logger = logging.getLogger(__name__)

WEBHOOK_SECRET_HEADER = "X-Osprey-Webhook-Secret"
WEBHOOK_SECRET_PARAM = "secret"
_CHALLENGE = {"WWW-Authenticate": 'Basic realm="osprey"'}


class AuthConfigError(ValueError):
    """The auth settings are inconsistent (half-set basic auth, or auth required but none set)."""


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def auth_mode(settings: Settings) -> str:
    """"basic", "token", "basic+token" or "open"; raises AuthConfigError on inconsistent settings."""
    user, password = settings.basic_auth_user, settings.basic_auth_pass
    if bool(user) != bool(password and password.get_secret_value()):
        raise AuthConfigError("set both BASIC_AUTH_USER and BASIC_AUTH_PASS, or neither")
    token = settings.osprey_api_token is not None and bool(settings.osprey_api_token.get_secret_value())
    modes = [name for name, on in (("basic", bool(user)), ("token", token)) if on]
    if not modes:
        if settings.osprey_auth_required:
            raise AuthConfigError(
                "OSPREY_AUTH_REQUIRED is set but no credentials are configured: set BASIC_AUTH_USER and "
                "BASIC_AUTH_PASS, or OSPREY_API_TOKEN"
            )
        return "open"
    return "+".join(modes)


def credentials_ok(authorization: str | None, settings: Settings) -> bool:
    """Whether an Authorization header carries the configured basic or bearer credentials."""
    if not authorization:
        return False
    scheme, _, value = authorization.partition(" ")
    value = value.strip()
    scheme = scheme.lower()
    if scheme == "basic" and settings.basic_auth_user and settings.basic_auth_pass is not None:
        try:
            user, sep, password = base64.b64decode(value, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        user_ok = _same(user, settings.basic_auth_user)
        pass_ok = _same(password, settings.basic_auth_pass.get_secret_value())
        return bool(sep) and user_ok and pass_ok
    if scheme == "bearer" and settings.osprey_api_token is not None:
        expected = settings.osprey_api_token.get_secret_value()
        return bool(expected) and _same(value, expected)
    return False


def require_auth(request: Request, settings: Settings) -> None:
    """Raise 401 unless the request carries valid credentials (no-op in open mode)."""
    if auth_mode(settings) == "open":
        return
    if not credentials_ok(request.headers.get("authorization"), settings):
        raise HTTPException(
            status_code=401,
            detail="authentication required: HTTP basic auth (BASIC_AUTH_USER/PASS) or 'Authorization: Bearer <token>'",
            headers=_CHALLENGE,
        )


def check_webhook_secret(request: Request, settings: Settings) -> None:
    """Raise 401 (nothing presented) or 403 (wrong secret) unless the webhook call is authenticated."""
    expected = settings.osprey_webhook_secret.get_secret_value() if settings.osprey_webhook_secret else ""
    given = request.headers.get(WEBHOOK_SECRET_HEADER)
    if given is None:
        given = request.query_params.get(WEBHOOK_SECRET_PARAM)
    if given is not None and expected:
        if _same(given, expected):
            return
        raise HTTPException(status_code=403, detail="wrong webhook secret")
    if credentials_ok(request.headers.get("authorization"), settings):
        return
    if not expected and auth_mode(settings) == "open":
        return
    if given is not None:
        raise HTTPException(status_code=403, detail="wrong webhook secret (OSPREY_WEBHOOK_SECRET is not set)")
    raise HTTPException(
        status_code=401,
        detail=f"webhook secret required: add ?{WEBHOOK_SECRET_PARAM}=<OSPREY_WEBHOOK_SECRET> to the webhook URL "
        f"in Label Studio, or send the {WEBHOOK_SECRET_HEADER} header",
    )


def auth_dependency(settings: Settings) -> Callable[[Request], Awaitable[None]]:
    """A FastAPI dependency for `Depends(...)` on every endpoint but /health; validates the settings now."""
    mode = auth_mode(settings)
    if mode == "open":
        logger.warning(
            "no credentials configured: every endpoint is open. Set BASIC_AUTH_USER/BASIC_AUTH_PASS or "
            "OSPREY_API_TOKEN unless this backend is only reachable from this machine"
        )
    else:
        logger.info("endpoint auth: %s", mode)

    async def dependency(request: Request) -> None:  # async: a header check needs no thread of its own
        require_auth(request, settings)

    return dependency


def webhook_dependency(settings: Settings) -> Callable[[Request], Awaitable[None]]:
    """A FastAPI dependency for `POST /webhook`."""
    mode = auth_mode(settings)  # fails fast on inconsistent settings
    if settings.osprey_webhook_secret is None and mode != "open":
        logger.warning(
            "OSPREY_WEBHOOK_SECRET is not set: Label Studio's annotation webhooks (sent without credentials) "
            "will be refused with 401"
        )

    async def dependency(request: Request) -> None:
        check_webhook_secret(request, settings)

    return dependency


# --- log redaction --------------------------------------------------------------------------------
REDACTED = "[REDACTED]"
_SECRET_KEYS = (
    r"authorization|x-osprey-webhook-secret|secret|password|passwd|pass|api[_-]?key|token|access_token"
    r"|refresh|access|signature|sig|credential"
)
_PATTERNS = (
    # scheme + credential: "Bearer abc", "Basic dXNl...", "Token 1a2b..."
    (re.compile(r"\b(Basic|Bearer|Token)( +)[A-Za-z0-9._~+/=-]{4,}"), rf"\1\2{REDACTED}"),
    # key = value, key: value, "key": "value", ?key=value
    (
        re.compile(rf"""(\b[\w-]*(?:{_SECRET_KEYS})\b["']?\s*[:=]\s*["']?)(?!\[REDACTED\]|(?:Basic|Bearer|Token) )[^\s"'&,;}}\]]+""", re.IGNORECASE),
        rf"\1{REDACTED}",
    ),
    # JSON Web Tokens anywhere
    (re.compile(r"eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"), REDACTED),
    # credentials in URLs: redis://:pass@host, https://user:pass@host
    (re.compile(r"(://[^/\s:@]*:)[^@\s/]+@"), rf"\1{REDACTED}@"),
)


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` with known secret values and credential-looking substrings replaced by [REDACTED]."""
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, REDACTED)
    return text


def settings_secrets(settings: Settings) -> list[str]:
    """The secret values in `settings`, and the basic-auth header they make, for literal redaction."""
    values = [
        s.get_secret_value()
        for s in (
            settings.label_studio_api_key,
            settings.basic_auth_pass,
            settings.osprey_api_token,
            settings.osprey_webhook_secret,
        )
        if s is not None
    ]
    if settings.basic_auth_user and settings.basic_auth_pass is not None:
        pair = f"{settings.basic_auth_user}:{settings.basic_auth_pass.get_secret_value()}"
        values.append(base64.b64encode(pair.encode()).decode())
    return values


class RedactSecretsFilter(logging.Filter):
    """Redacts a record's message, arguments and traceback text in place; never drops a record.

    Arguments are redacted one by one (numbers and clean objects are kept), so formatters that
    read `record.args` themselves, like uvicorn's access log, keep working.
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self.secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def _clean(self, value: object) -> object:
        if value is None or isinstance(value, bool | int | float):
            return value
        text = value if isinstance(value, str) else str(value)
        cleaned = redact(text, self.secrets)
        return value if cleaned == text else cleaned

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.args:  # with arguments, msg is a format template: checked once formatted below
            record.msg = self._clean(record.msg)
        elif isinstance(record.args, tuple):
            record.args = tuple(self._clean(a) for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: self._clean(v) for k, v in record.args.items()}
        try:
            message = record.getMessage()
        except Exception:  # a broken format string must not lose the record
            message = f"{record.msg!r} {record.args!r}"
        cleaned = redact(message, self.secrets)
        if cleaned != message:  # a secret formed only once the arguments were put in
            record.msg, record.args = cleaned, None
        if record.exc_info and not record.exc_text:
            record.exc_text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
        if record.exc_text:
            record.exc_text = redact(record.exc_text, self.secrets)
        if record.stack_info:
            record.stack_info = redact(record.stack_info, self.secrets)
        return True


_installed: RedactSecretsFilter | None = None


def install_log_redaction(settings: Settings | None = None, extra_secrets: Iterable[str] = ()) -> RedactSecretsFilter:
    """Redact every log record this process creates, whatever logger or handler emits it.

    Installed as a log-record factory (not a handler filter) so that records from uvicorn, httpx,
    rq and records of handlers added later are covered too. Calling it again updates the secrets.
    """
    global _installed
    secrets = [*(settings_secrets(settings) if settings else []), *extra_secrets]
    if _installed is not None:
        _installed.secrets = sorted({*_installed.secrets, *(s for s in secrets if s)}, key=len, reverse=True)
        return _installed
    flt = RedactSecretsFilter(secrets)
    previous = logging.getLogRecordFactory()

    def factory(*args: object, **kwargs: object) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        flt.filter(record)
        return record

    logging.setLogRecordFactory(factory)
    _installed = flt
    return flt
