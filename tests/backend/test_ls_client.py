"""backend/ls_client.py over real HTTP against a stub of the Label Studio API.

The stub (stdlib http.server in a thread) stands in for Label Studio because the real server is too
heavy to start in unit tests; it implements just the endpoints and auth rules we rely on, as the
protocol notes describe them for LS 1.23 (legacy `Token`, PAT refresh at /api/token/refresh/ to a
short-lived `Bearer` access token, DRF-style `detail` errors). An end-to-end test against a real
Label Studio 1.23.2 is future work.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from backend.labelstudio.client import LabelStudioAuth, LabelStudioClient, LabelStudioError
from backend.settings import Settings

LEGACY = "0123456789abcdef0123456789abcdef01234567"


def make_jwt(claims: dict[str, Any]) -> str:
    def part(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")

    return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part(claims)}.c2lnbmF0dXJl"


PAT = make_jwt({"token_type": "refresh", "exp": int(time.time()) + 10**9, "jti": "pat-1"})


@dataclass
class StubLabelStudio:
    """State of the stub: recorded requests, issued access tokens, queued failures."""

    requests: list[dict[str, Any]] = field(default_factory=list)
    valid_access: set[str] = field(default_factory=set)
    refreshes: int = 0
    access_lifetime_s: int = 300
    fail_next: list[int] = field(default_factory=list)  # statuses to answer before serving normally
    predictions: dict[int, dict[str, Any]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""

    def authorized(self, header: str | None) -> bool:
        if header == f"Token {LEGACY}":
            return True
        return header is not None and header.startswith("Bearer ") and header[7:] in self.valid_access


def _handler(stub: StubLabelStudio) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _send(self, status: int, body: Any = None) -> None:
            data = b"" if body is None else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _handle(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            body = json.loads(raw) if raw else None
            parts = urlsplit(self.path)
            with stub.lock:
                stub.requests.append(
                    {
                        "method": method,
                        "path": parts.path,
                        "query": parse_qs(parts.query),
                        "auth": self.headers.get("Authorization"),
                        "body": body,
                    }
                )
                if stub.fail_next:
                    return self._send(stub.fail_next.pop(0), {"detail": "stub failure"})
            if parts.path == "/api/token/refresh/" and method == "POST":
                if not body or body.get("refresh") != PAT:
                    return self._send(401, {"detail": "Token is invalid or expired", "code": "token_not_valid"})
                with stub.lock:
                    stub.refreshes += 1
                    access = make_jwt(
                        {"token_type": "access", "exp": int(time.time()) + stub.access_lifetime_s, "n": stub.refreshes}
                    )
                    stub.valid_access.add(access)
                return self._send(200, {"access": access})
            if not stub.authorized(self.headers.get("Authorization")):
                return self._send(401, {"detail": "Authentication credentials were not provided."})
            if parts.path == "/api/predictions/" and method == "POST":
                with stub.lock:
                    pid = len(stub.predictions) + 1
                    stub.predictions[pid] = {"id": pid, **body}
                return self._send(201, stub.predictions[pid])
            if parts.path == "/api/predictions/" and method == "GET":
                task = int(parse_qs(parts.query)["task"][0])
                return self._send(200, [p for p in stub.predictions.values() if p["task"] == task])
            if parts.path.startswith("/api/predictions/") and method == "DELETE":
                pid = int(parts.path.rstrip("/").rsplit("/", 1)[1])
                if stub.predictions.pop(pid, None) is None:
                    return self._send(404, {"detail": "Not found."})
                return self._send(204)
            if parts.path.startswith("/api/tasks/") and method == "GET":
                tid = int(parts.path.rstrip("/").rsplit("/", 1)[1])
                return self._send(200, {"id": tid, "data": {"image": "/data/upload/1/a.png"}})
            if parts.path.startswith("/api/projects/") and method == "GET":
                pid = int(parts.path.rstrip("/").rsplit("/", 1)[1])
                return self._send(200, {"id": pid, "label_config": "<View/>"})
            return self._send(404, {"detail": "Not found."})

        def do_GET(self) -> None:
            self._handle("GET")

        def do_POST(self) -> None:
            self._handle("POST")

        def do_DELETE(self) -> None:
            self._handle("DELETE")

    return Handler


@pytest.fixture
def stub() -> Iterator[StubLabelStudio]:
    state = StubLabelStudio()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield state
    server.shutdown()
    server.server_close()


def client_for(stub: StubLabelStudio, key: str | None) -> LabelStudioClient:
    return LabelStudioClient(stub.url, key, backoff_s=0.01, timeout_s=5)


def test_legacy_token_is_sent_as_token_header(stub: StubLabelStudio) -> None:
    with client_for(stub, LEGACY) as client:
        assert client.auth is not None and client.auth.kind == "legacy"
        task = client.get_task(7)
    assert task["id"] == 7
    assert stub.requests[-1]["auth"] == f"Token {LEGACY}"
    assert stub.refreshes == 0


def test_request_shapes(stub: StubLabelStudio) -> None:
    result = [{"id": "r1", "from_name": "label", "to_name": "image", "type": "brushlabels", "value": {}}]
    with client_for(stub, LEGACY) as client:
        created = client.create_prediction(3, result, 0.75, "tiny-abcd1234")
        unscored = client.create_prediction(4, result, None, "tiny-abcd1234")
        listed = client.list_predictions(3)
        client.delete_prediction(created["id"])
        client.delete_prediction(created["id"])  # already gone: still fine
        project = client.get_project(2)
    post = stub.requests[0]
    assert (post["method"], post["path"]) == ("POST", "/api/predictions/")
    assert post["body"] == {"task": 3, "result": result, "score": 0.75, "model_version": "tiny-abcd1234"}
    assert "score" not in stub.requests[1]["body"]
    assert created["id"] == 1 and unscored["task"] == 4
    assert [p["id"] for p in listed] == [1]
    assert (stub.requests[2]["method"], stub.requests[2]["path"], stub.requests[2]["query"]) == (
        "GET",
        "/api/predictions/",
        {"task": ["3"]},
    )
    assert (stub.requests[3]["method"], stub.requests[3]["path"]) == ("DELETE", "/api/predictions/1/")
    assert stub.requests[5]["path"] == "/api/projects/2/" and project["label_config"] == "<View/>"
    assert list(stub.predictions) == [2]


def test_pat_is_exchanged_for_a_bearer_access_token(stub: StubLabelStudio) -> None:
    with client_for(stub, PAT) as client:
        assert client.auth is not None and client.auth.kind == "pat"
        client.get_task(1)
        client.get_task(2)
    assert stub.refreshes == 1  # the access token is reused while valid
    assert stub.requests[0]["path"] == "/api/token/refresh/"
    assert stub.requests[0]["body"] == {"refresh": PAT}
    assert stub.requests[1]["auth"].startswith("Bearer ") and stub.requests[1]["auth"] != f"Bearer {PAT}"
    assert stub.requests[1]["auth"] == stub.requests[2]["auth"]


def test_pat_refreshes_and_retries_after_a_401(stub: StubLabelStudio) -> None:
    with client_for(stub, PAT) as client:
        client.get_task(1)
        stub.valid_access.clear()  # Label Studio forgot the access token (expired/restarted)
        created = client.create_prediction(9, [], 0.5, "v1")
    assert created["task"] == 9
    assert stub.refreshes == 2
    posts = [r for r in stub.requests if r["path"] == "/api/predictions/"]
    assert len(posts) == 2  # one refused with 401, one accepted after the refresh
    assert posts[0]["auth"] != posts[1]["auth"]
    assert len(stub.predictions) == 1


def test_access_token_is_refreshed_before_it_expires(stub: StubLabelStudio) -> None:
    stub.access_lifetime_s = 10  # inside the client's 30 s safety margin: every request refreshes
    with client_for(stub, PAT) as client:
        client.get_task(1)
        client.get_task(2)
    assert stub.refreshes == 2
    assert not any(r.get("auth") is None and r["path"] != "/api/token/refresh/" for r in stub.requests)


def test_rejected_pat_gives_clear_error(stub: StubLabelStudio) -> None:
    other = make_jwt({"token_type": "refresh", "exp": int(time.time()) + 10**9, "jti": "other"})
    with client_for(stub, other) as client, pytest.raises(LabelStudioError) as info:
        client.get_task(1)
    assert info.value.status == 401
    assert "personal access token" in info.value.message


def test_wrong_legacy_token_is_401_without_retry(stub: StubLabelStudio) -> None:
    with client_for(stub, "f" * 40) as client, pytest.raises(LabelStudioError) as info:
        client.get_task(1)
    assert info.value.status == 401 and "credentials" in info.value.message
    assert len(stub.requests) == 1


def test_5xx_is_retried_for_reads(stub: StubLabelStudio) -> None:
    stub.fail_next = [503, 500, 502]
    with client_for(stub, LEGACY) as client:
        assert client.get_task(5)["id"] == 5
    assert len(stub.requests) == 4


def test_retries_are_bounded(stub: StubLabelStudio) -> None:
    stub.fail_next = [503] * 10
    with client_for(stub, LEGACY) as client, pytest.raises(LabelStudioError) as info:
        client.get_project(1)
    assert info.value.status == 503 and "stub failure" in info.value.message
    assert len(stub.requests) == client.max_retries + 1


def test_post_is_retried_on_503_but_not_on_500(stub: StubLabelStudio) -> None:
    stub.fail_next = [503]
    with client_for(stub, LEGACY) as client:
        client.create_prediction(1, [], None, "v1")
        assert len(stub.requests) == 2
        stub.fail_next = [500]
        with pytest.raises(LabelStudioError) as info:
            client.create_prediction(2, [], None, "v1")
    assert info.value.status == 500
    assert len(stub.requests) == 3  # a 500 may have created it: no blind retry


def test_connection_errors_are_retried_then_reported() -> None:
    client = LabelStudioClient("http://127.0.0.1:1", LEGACY, backoff_s=0.01, timeout_s=1, max_retries=2)
    with client, pytest.raises(LabelStudioError) as info:
        client.get_task(1)
    assert info.value.status is None and "ConnectError" in info.value.message


def test_from_settings_requires_url_and_key() -> None:
    with pytest.raises(ValueError, match="LABEL_STUDIO_URL"):
        LabelStudioClient.from_settings(Settings(label_studio_api_key=LEGACY))
    with pytest.raises(ValueError, match="LABEL_STUDIO_API_KEY"):
        LabelStudioClient.from_settings(Settings(label_studio_url="http://ls:8080"))
    with pytest.raises(ValueError, match="http"):
        LabelStudioClient("ls:8080", LEGACY)
    client = LabelStudioClient.from_settings(Settings(label_studio_url="http://ls:8080/", label_studio_api_key=LEGACY))
    assert client.url == "http://ls:8080"
    client.close()


def test_auth_kinds() -> None:
    access = make_jwt({"token_type": "access", "exp": int(time.time()) + 300})
    assert LabelStudioAuth("http://ls", LEGACY).kind == "legacy"
    assert LabelStudioAuth("http://ls", PAT).kind == "pat"
    assert LabelStudioAuth("http://ls", access).header() == f"Bearer {access}"
    assert LabelStudioAuth("http://ls", "not.a.jwt").kind == "legacy"
    with pytest.raises(ValueError):
        LabelStudioAuth("http://ls", "")
