"""backend/auth.py on a tiny FastAPI app defined here (unit level; the server's own tests use real HTTP)."""

from __future__ import annotations

import base64
import io
import logging
from collections.abc import Iterator

import pytest
from fastapi import Depends, FastAPI, Request
from fastapi.testclient import TestClient
from uvicorn.logging import AccessFormatter

import backend.auth as auth
from backend.auth import (
    AuthConfigError,
    RedactSecretsFilter,
    auth_dependency,
    auth_mode,
    install_log_redaction,
    redact,
    webhook_dependency,
)
from backend.settings import Settings

USER, PASSWORD = "labelstudio", "correct-horse-battery"
TOKEN = "osprey-api-token-1234567890"
SECRET = "webhook-secret-abcdef"


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def make_app(settings: Settings) -> FastAPI:
    app = FastAPI()
    debug_log = logging.getLogger("tests.auth.app")

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "UP"}

    @app.post("/predict", dependencies=[Depends(auth_dependency(settings))])
    def predict(request: Request) -> dict[str, str]:
        debug_log.debug("request headers: %s", dict(request.headers))  # what v2 logs at DEBUG
        return {"ok": "predict"}

    @app.post("/webhook", dependencies=[Depends(webhook_dependency(settings))])
    def webhook(request: Request) -> dict[str, str]:
        debug_log.debug("webhook %s %s", request.url, dict(request.headers))
        return {"ok": "webhook"}

    return app


def client(**values: object) -> TestClient:
    return TestClient(make_app(Settings(**values)))


BASIC = {"basic_auth_user": USER, "basic_auth_pass": PASSWORD}
BEARER = {"osprey_api_token": TOKEN}


# --- endpoint auth ----------------------------------------------------------------------------------------
def test_open_mode_allows_everything_and_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="backend.auth"):
        c = client()
    assert "every endpoint is open" in caplog.text
    assert c.post("/predict").status_code == 200
    assert c.post("/webhook").status_code == 200


def test_auth_required_refuses_to_start_without_credentials() -> None:
    with pytest.raises(AuthConfigError, match="OSPREY_AUTH_REQUIRED"):
        auth_dependency(Settings(osprey_auth_required=True))
    assert auth_mode(Settings(osprey_auth_required=True, **BEARER)) == "token"


@pytest.mark.parametrize("values", [{"basic_auth_user": USER}, {"basic_auth_pass": PASSWORD}])
def test_half_configured_basic_auth_is_a_config_error(values: dict[str, str]) -> None:
    with pytest.raises(AuthConfigError, match="BASIC_AUTH_USER and BASIC_AUTH_PASS"):
        auth_dependency(Settings(**values))


def test_modes() -> None:
    assert auth_mode(Settings()) == "open"
    assert auth_mode(Settings(**BASIC)) == "basic"
    assert auth_mode(Settings(**BEARER)) == "token"
    assert auth_mode(Settings(**BASIC, **BEARER)) == "basic+token"


def test_basic_auth() -> None:
    c = client(**BASIC)
    assert c.get("/health").status_code == 200  # /health stays open
    missing = c.post("/predict")
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"].startswith("Basic")
    assert "BASIC_AUTH_USER" in missing.json()["detail"]
    assert c.post("/predict", headers=basic(USER, PASSWORD)).status_code == 200
    assert c.post("/predict", auth=(USER, PASSWORD)).status_code == 200


@pytest.mark.parametrize(
    "headers",
    [
        basic(USER, "wrong"),
        basic("someone", PASSWORD),
        basic(USER, PASSWORD + "x"),
        basic(USER, ""),
        {"Authorization": "Basic " + base64.b64encode(USER.encode()).decode()},  # no colon
        {"Authorization": "Basic not-base64!!"},
        {"Authorization": "Basic " + base64.b64encode(b"\xff\xfe:\xff").decode()},  # not UTF-8
        {"Authorization": "Basic"},
        {"Authorization": f"Bearer {PASSWORD}"},
        {"Authorization": f"Token {PASSWORD}"},
        {"Authorization": ""},
    ],
)
def test_basic_auth_rejects(headers: dict[str, str]) -> None:
    assert client(**BASIC).post("/predict", headers=headers).status_code == 401


def test_bearer_token() -> None:
    c = client(**BEARER)
    assert c.post("/predict", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert c.post("/predict", headers={"Authorization": f"bearer {TOKEN}"}).status_code == 200
    assert c.post("/predict", headers={"Authorization": f"Bearer {TOKEN}x"}).status_code == 401
    assert c.post("/predict", headers={"Authorization": "Bearer "}).status_code == 401
    assert c.post("/predict", headers=basic(USER, TOKEN)).status_code == 401
    assert c.post("/predict").status_code == 401


def test_either_credential_when_both_are_configured() -> None:
    c = client(**BASIC, **BEARER)
    assert c.post("/predict", headers=basic(USER, PASSWORD)).status_code == 200
    assert c.post("/predict", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert c.post("/predict", headers={"Authorization": f"Bearer {PASSWORD}"}).status_code == 401


def test_comparisons_are_constant_time_and_do_not_short_circuit(monkeypatch: pytest.MonkeyPatch) -> None:
    compared: list[tuple[bytes, bytes]] = []
    real = auth.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    c = client(**BASIC)
    assert c.post("/predict", headers=basic("intruder", "guess")).status_code == 401
    # the password is compared even though the user name was already wrong
    assert compared == [(b"intruder", USER.encode()), (b"guess", PASSWORD.encode())]


# --- webhook ----------------------------------------------------------------------------------------------
def test_webhook_secret_in_query_or_header() -> None:
    c = client(**BASIC, osprey_webhook_secret=SECRET)
    assert c.post(f"/webhook?secret={SECRET}").status_code == 200
    assert c.post("/webhook", headers={"X-Osprey-Webhook-Secret": SECRET}).status_code == 200


def test_webhook_wrong_secret_is_403_and_missing_is_401() -> None:
    c = client(**BASIC, osprey_webhook_secret=SECRET)
    assert c.post("/webhook?secret=nope").status_code == 403
    assert c.post("/webhook", headers={"X-Osprey-Webhook-Secret": "nope"}).status_code == 403
    assert c.post("/webhook?secret=").status_code == 403
    missing = c.post("/webhook")
    assert missing.status_code == 401
    assert "?secret=" in missing.json()["detail"]
    # a wrong header is not rescued by a right query parameter: the header is what was presented
    assert c.post(f"/webhook?secret={SECRET}", headers={"X-Osprey-Webhook-Secret": "nope"}).status_code == 403


def test_webhook_accepts_backend_credentials_for_start_training() -> None:
    """"Start Training" reaches /webhook through Label Studio's ML client, which sends basic auth."""
    c = client(**BASIC, osprey_webhook_secret=SECRET)
    assert c.post("/webhook", headers=basic(USER, PASSWORD)).status_code == 200
    assert c.post("/webhook", headers=basic(USER, "wrong")).status_code == 401


def test_webhook_without_configured_secret(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="backend.auth"):
        c = client(**BASIC)
    assert "OSPREY_WEBHOOK_SECRET is not set" in caplog.text
    assert c.post("/webhook").status_code == 401
    assert c.post("/webhook?secret=guess").status_code == 403
    assert c.post("/webhook", headers=basic(USER, PASSWORD)).status_code == 200


def test_webhook_secret_alone_protects_the_webhook_in_open_mode() -> None:
    c = client(osprey_webhook_secret=SECRET)
    assert c.post("/predict").status_code == 200
    assert c.post("/webhook").status_code == 401
    assert c.post(f"/webhook?secret={SECRET}").status_code == 200


# --- no secrets in logs -----------------------------------------------------------------------------------
@pytest.fixture
def redaction() -> Iterator[None]:
    factory = logging.getLogRecordFactory()
    yield
    logging.setLogRecordFactory(factory)
    auth._installed = None


def test_no_secret_reaches_the_logs_at_debug(redaction: None, caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings(
        **BASIC,
        **BEARER,
        osprey_webhook_secret=SECRET,
        label_studio_api_key="ls-legacy-key-0123456789abcdef",
    )
    install_log_redaction(settings)
    caplog.set_level(logging.DEBUG)
    c = TestClient(make_app(settings))
    assert c.post("/predict", headers=basic(USER, PASSWORD)).status_code == 200
    assert c.post("/predict", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert c.post(f"/webhook?secret={SECRET}").status_code == 200
    assert c.post(f"/webhook?secret={SECRET}x").status_code == 403  # a wrong guess is redacted too
    log = logging.getLogger("tests.auth")
    log.debug("setup payload: %s", {"access_token": "ls-legacy-key-0123456789abcdef", "hostname": "http://ls"})
    log.info("connecting to redis://:%s@redis:6379/0", PASSWORD)
    log.debug("env LABEL_STUDIO_API_KEY=%s", settings.label_studio_api_key.get_secret_value())  # type: ignore[union-attr]
    try:
        raise RuntimeError(f"upstream said: bad token {TOKEN}")
    except RuntimeError:
        log.exception("write-back failed")
    logging.getLogger("uvicorn.access").info(
        '%s - "%s %s HTTP/%s" %d', "127.0.0.1:5000", "POST", f"/webhook?secret={SECRET}", "1.1", 200
    )

    # every path produced records, and they were rewritten rather than dropped
    assert any(r.name.startswith("httpx") for r in caplog.records)  # the test client's request log
    assert any(r.name == "tests.auth.app" for r in caplog.records)
    assert "write-back failed" in caplog.text and "RuntimeError" in caplog.text
    assert "[REDACTED]" in caplog.text

    handler_output = io.StringIO()
    handler = logging.StreamHandler(handler_output)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
    access = AccessFormatter('%(client_addr)s - "%(request_line)s" %(status_code)s', use_colors=False)
    for record in caplog.records:
        handler.handle(record)
        if record.name == "uvicorn.access":
            handler_output.write(access.format(record) + "\n")
    text = caplog.text + handler_output.getvalue()
    assert "POST /webhook?secret=[REDACTED] HTTP/1.1" in text  # uvicorn's access format still works
    basic_blob = basic(USER, PASSWORD)["Authorization"].split()[1]
    for secret in (PASSWORD, TOKEN, SECRET, basic_blob, "ls-legacy-key-0123456789abcdef"):
        assert secret not in text


def test_redact_patterns() -> None:
    jwt = "eyJhbGciOiJIUzI1NiJ9.eyJ0b2tlbl90eXBlIjoicmVmcmVzaCJ9.c2ln"
    cases = {
        "Authorization: Bearer abc.def-ghi": "Authorization: Bearer [REDACTED]",
        "{'authorization': 'Basic dTpw'}": "{'authorization': 'Basic [REDACTED]'}",
        "GET /webhook?secret=s3&x=1": "GET /webhook?secret=[REDACTED]&x=1",
        f'{{"refresh": "{jwt}"}}': '{"refresh": "[REDACTED]"}',
        f"token is {jwt}": "token is [REDACTED]",
        "redis://user:hunter2@host:6379/0": "redis://user:[REDACTED]@host:6379/0",
        "BASIC_AUTH_PASS=hunter2": "BASIC_AUTH_PASS=[REDACTED]",
        "a.png?X-Amz-Signature=abc&X-Amz-Expires=60": "a.png?X-Amz-Signature=[REDACTED]&X-Amz-Expires=60",
        "model tiny-1234 loaded in 2 s": "model tiny-1234 loaded in 2 s",
        "token_type: refresh": "token_type: refresh",
    }
    for text, expected in cases.items():
        assert redact(text) == expected
    assert redact("the value is plainsecret here", ["plainsecret"]) == "the value is [REDACTED] here"


def test_filter_keeps_non_secret_arguments_intact() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "%s took %d ms (%r)", ("job", 12, [1, 2]), None)
    RedactSecretsFilter(["zzzz"]).filter(record)
    assert record.args == ("job", 12, [1, 2])
    assert record.getMessage() == "job took 12 ms ([1, 2])"


def test_install_is_idempotent_and_adds_secrets(redaction: None, caplog: pytest.LogCaptureFixture) -> None:
    first = install_log_redaction(Settings(**BEARER))
    second = install_log_redaction(None, extra_secrets=["late-secret-value"])
    assert first is second
    caplog.set_level(logging.INFO)
    logging.getLogger("tests.auth").info("values %s and %s", TOKEN, "late-secret-value")
    assert TOKEN not in caplog.text and "late-secret-value" not in caplog.text
