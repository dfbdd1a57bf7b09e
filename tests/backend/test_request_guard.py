"""Auth before the body, and a body limit that holds for chunked uploads (issue 6, defect 4).

Against the real server subprocess (the shared `stack`: real Redis, a real worker): an anonymous client
streaming a huge chunked body gets its 401 without the server reading the body; invalid JSON without
credentials is a 401, not a 400; an authenticated chunked body over OSPREY_MAX_REQUEST_BYTES is cut off
with a 413 at the limit. The server's peak RSS stays far below what reading the bodies would take.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import httpx

from tests.backend.conftest import PASSWORD, USER, WEBHOOK_SECRET

CHUNK = b"x" * (1 << 20)


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def _raw_chunked_post(port: int, path: str, headers: dict[str, str], chunks: int) -> tuple[int, int]:
    """Send a chunked POST of up to `chunks` MiB; return (status, MiB actually sent before the answer)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    sock.sendall(head.encode())
    sent = 0
    sock.settimeout(0.05)
    answer = b""
    try:
        for _ in range(chunks):
            try:
                answer += sock.recv(65536)
            except TimeoutError:
                pass
            if answer:
                break
            try:
                sock.sendall(b"%x\r\n" % len(CHUNK) + CHUNK + b"\r\n")
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += 1
        sock.settimeout(10)
        while b"\r\n" not in answer:
            data = sock.recv(65536)
            if not data:
                break
            answer += data
    finally:
        sock.close()
    status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1") else 0
    return status, sent


def _basic() -> dict[str, str]:
    token = httpx.BasicAuth(USER, PASSWORD)._auth_header  # noqa: SLF001 - the exact header httpx sends
    return {"Authorization": token}


def test_anonymous_chunked_gigabyte_is_refused_before_reading(stack):
    status, sent = _raw_chunked_post(stack.port, "/predict", {"Content-Type": "application/json"}, chunks=1024)
    assert status == 401
    assert sent < 64, f"the server let an anonymous client upload {sent} MiB before answering"
    assert _peak_rss_mb(stack.server.pid) < 600


def test_invalid_json_without_credentials_is_401_not_400(stack):
    response = httpx.post(stack.base_url + "/predict", content=b"{not json", timeout=10,
                          headers={"Content-Type": "application/json"})
    assert response.status_code == 401
    response = httpx.post(stack.base_url + "/setup", content=b"{not json", timeout=10,
                          headers={"Content-Type": "application/json"})
    assert response.status_code == 401


def test_webhook_without_secret_is_refused_before_reading(stack):
    status, sent = _raw_chunked_post(stack.port, "/webhook", {"Content-Type": "application/json"}, chunks=256)
    assert status == 401
    assert sent < 64


def test_authenticated_chunked_body_over_the_limit_is_413(stack):
    # The shared stack runs with OSPREY_MAX_REQUEST_BYTES = 2 MiB.
    status, sent = _raw_chunked_post(stack.port, "/predict", {"Content-Type": "application/json", **_basic()},
                                     chunks=512)
    assert status == 413
    assert sent < 128
    assert _peak_rss_mb(stack.server.pid) < 600


def test_authenticated_chunked_body_under_the_limit_reaches_the_route(stack):
    def body() -> Iterator[bytes]:
        yield b'{"tasks": [], '
        yield b'"label_config": "<View/>"}'

    response = httpx.post(stack.base_url + "/predict", content=body(), auth=(USER, PASSWORD), timeout=30,
                          headers={"Content-Type": "application/json"})
    assert response.status_code == 422  # parsed and answered by the route: an empty config predicts nothing
    assert "detail" in response.json()


def test_webhook_with_secret_still_accepted(stack):
    response = httpx.post(stack.base_url + f"/webhook?secret={WEBHOOK_SECRET}", json={"action": "PING"}, timeout=10)
    assert response.status_code == 201, response.text


def test_refusals_before_routing_are_counted_under_their_path(stack):
    def refused_webhooks() -> float:
        from prometheus_client.parser import text_string_to_metric_families

        text = stack.get("/metrics").text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if (sample.name == "osprey_http_requests_total" and sample.labels.get("path") == "/webhook"
                        and sample.labels.get("status") == "401"):
                    return sample.value
        return 0.0

    before = refused_webhooks()
    assert httpx.post(stack.base_url + "/webhook", json={"action": "PING"}, timeout=10).status_code == 401
    assert refused_webhooks() == before + 1
    assert httpx.get(stack.base_url + "/no-such-path-" + "x" * 50, timeout=10).status_code == 401
