"""backend/media/fetch.py over real HTTP and a real directory tree, with the trusted origin the Label Studio
adapter hands it (backend.labelstudio.client.media_origins).

Two stdlib HTTP servers run in threads: one plays Label Studio's media routes (`/data/upload/...`,
answering 401 without the API token), the other an unrelated host reached as `localhost`. They are
stubs because a real Label Studio is too heavy for unit tests; the fetcher's HTTP, limits and
decoding are the real code paths.
"""

from __future__ import annotations

import base64
import io
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from backend.labelstudio.client import media_origins
from backend.media.fetch import MediaError, MediaFetcher
from backend.settings import Settings

TOKEN = "0123456789abcdef0123456789abcdef01234567"


def png(width: int = 32, height: int = 24, color: tuple[int, ...] = (255, 0, 0), mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height), color).save(buffer, "PNG")
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height; no pixel data to speak of."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def jpeg_with_orientation(width: int, height: int, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (0, 128, 255)).save(buffer, "JPEG", exif=exif)
    return buffer.getvalue()


Route = Callable[[BaseHTTPRequestHandler], None]


@dataclass
class Stub:
    routes: dict[str, Route]
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Authorization)
    streamed: int = 0
    stream_done: threading.Event = field(default_factory=threading.Event)
    url: str = ""


def serve(stub: Stub, host_name: str) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            stub.requests.append((self.path, self.headers.get("Authorization")))
            route = stub.routes.get(self.path)
            if route is None:
                self.send_error(404)
                return
            try:
                route(self)
            except (BrokenPipeError, ConnectionResetError):
                pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    stub.url = f"http://{host_name}:{server.server_address[1]}"
    return server


def send(data: bytes, status: int = 200, headers: dict[str, str] | None = None, auth: bool = False) -> Route:
    def route(handler: BaseHTTPRequestHandler) -> None:
        if auth and handler.headers.get("Authorization") != f"Token {TOKEN}":
            handler.send_error(401)
            return
        handler.send_response(status)
        for key, value in {"Content-Length": str(len(data)), **(headers or {})}.items():
            handler.send_header(key, value)
        handler.end_headers()
        handler.wfile.write(data)

    return route


def endless(stub: Stub, chunk: bytes, pause_s: float = 0.0, cap: int = 200 * 1024 * 1024) -> Route:
    """Streams `chunk` forever (no Content-Length) until the client goes away or `cap` bytes."""

    def route(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "image/png")
        handler.end_headers()
        try:
            while stub.streamed < cap:
                handler.wfile.write(chunk)
                stub.streamed += len(chunk)
                if pause_s:
                    time.sleep(pause_s)
        finally:
            stub.stream_done.set()

    return route


def sleepy(seconds: float) -> Route:
    def route(handler: BaseHTTPRequestHandler) -> None:
        time.sleep(seconds)
        send(png())(handler)

    return route


@pytest.fixture
def servers() -> Iterator[tuple[Stub, Stub]]:
    ls = Stub(routes={})
    other = Stub(routes={"/img.png": send(png(color=(0, 255, 0)))})
    running = [serve(ls, "127.0.0.1"), serve(other, "localhost")]
    other_url = other.url
    ls.routes.update(
        {
            "/data/upload/1/red.png": send(png(), auth=True),
            "/data/upload/1/rgba.png": send(png(color=(0, 0, 255, 128), mode="RGBA"), auth=True),
            "/data/upload/1/rotated.jpg": send(jpeg_with_orientation(40, 20, 6), auth=True),
            "/data/upload/1/text.png": send(b"hello, I am not an image", auth=True),
            "/data/upload/1/empty.png": send(b"", auth=True),
            "/data/upload/1/truncated.png": send(png(400, 300)[:200], auth=True),
            "/data/upload/1/header-20000.png": send(png_header_only(20000, 20000), auth=True),
            "/data/upload/1/declared-huge.png": send(b"x" * 10, headers={"Content-Length": str(10**9)}),
            "/data/upload/1/stream.png": endless(ls, b"\0" * 65536),
            "/data/upload/1/drip.png": endless(ls, b"\0", pause_s=0.05, cap=200),
            "/data/upload/1/slow.png": sleepy(3.0),
            "/data/upload/1/error.png": send(b"oops", status=500),
            "/data/upload/1/same-host-redirect.png": send(b"", 302, {"Location": "/data/upload/1/red.png"}),
            "/data/upload/1/other-host-redirect.png": send(b"", 302, {"Location": f"{other_url}/img.png"}),
            "/data/upload/1/loop.png": send(b"", 302, {"Location": "/data/upload/1/loop.png"}),
        }
    )
    yield ls, other
    for server in running:
        server.shutdown()
        server.server_close()


def fetcher(ls: Stub, **overrides: object) -> MediaFetcher:
    values: dict[str, object] = {"label_studio_url": ls.url, "label_studio_api_key": TOKEN}
    values.update(overrides)
    return with_ls(Settings(**values))


def with_ls(settings: Settings) -> MediaFetcher:
    """A fetcher as the worker builds it: Label Studio's origin and key passed in by the adapter."""
    return MediaFetcher(settings, media_origins(settings))


def media_error(call: Callable[[], object]) -> MediaError:
    with pytest.raises(MediaError) as info:
        call()
    assert info.value.message  # every error explains itself
    return info.value


# --- Label Studio uploads ----------------------------------------------------------------------------
def test_upload_is_fetched_with_the_api_token(servers: tuple[Stub, Stub]) -> None:
    ls, _ = servers
    image = fetcher(ls).load_image("/data/upload/1/red.png")
    assert image.mode == "RGB" and image.size == (32, 24)
    assert image.getpixel((0, 0)) == (255, 0, 0)
    assert ls.requests == [("/data/upload/1/red.png", f"Token {TOKEN}")]


def test_absolute_url_on_label_studio_host_gets_the_token(servers: tuple[Stub, Stub]) -> None:
    ls, _ = servers
    assert fetcher(ls).load_image(f"{ls.url}/data/upload/1/red.png").size == (32, 24)
    assert ls.requests[-1][1] == f"Token {TOKEN}"


def test_without_api_key_label_studio_refusal_is_explained(servers: tuple[Stub, Stub]) -> None:
    ls, _ = servers
    error = media_error(lambda: fetcher(ls, label_studio_api_key=None).load_image("/data/upload/1/red.png"))
    assert error.status_code == 502 and "LABEL_STUDIO_API_KEY" in error.message


def test_rgba_becomes_rgb(servers: tuple[Stub, Stub]) -> None:
    ls, _ = servers
    assert fetcher(ls).load_image("/data/upload/1/rgba.png").mode == "RGB"


def test_exif_orientation_is_applied(servers: tuple[Stub, Stub]) -> None:
    ls, _ = servers
    # stored 40x20 with orientation 6 (rotate 90): Label Studio shows (and brush RLE uses) 20x40
    assert fetcher(ls).load_image("/data/upload/1/rotated.jpg").size == (20, 40)


def test_load_bytes_returns_raw_bytes(servers: tuple[Stub, Stub]) -> None:
    ls, _ = servers
    assert fetcher(ls).load_bytes("/data/upload/1/text.png") == b"hello, I am not an image"


def test_relative_url_needs_label_studio_url() -> None:
    error = media_error(lambda: MediaFetcher(Settings()).load_image("/data/upload/1/red.png"))
    assert error.status_code == 400 and "LABEL_STUDIO_URL" in error.message


# --- hosts and redirects --------------------------------------------------------------------------------
def test_other_host_is_refused_without_a_request(servers: tuple[Stub, Stub]) -> None:
    ls, other = servers
    error = media_error(lambda: fetcher(ls).load_image(f"{other.url}/img.png"))
    assert error.status_code == 403 and "OSPREY_ALLOWED_HOSTS" in error.message
    assert other.requests == []


def test_allowed_host_is_fetched_without_the_label_studio_token(servers: tuple[Stub, Stub]) -> None:
    ls, other = servers
    image = fetcher(ls, osprey_allowed_hosts="example.org, LOCALHOST").load_image(f"{other.url}/img.png")
    assert image.getpixel((0, 0)) == (0, 255, 0)
    assert other.requests == [("/img.png", None)]


def test_allowed_host_with_port_allows_only_that_port(servers: tuple[Stub, Stub]) -> None:
    ls, other = servers
    port = int(other.url.rsplit(":", 1)[1])
    assert fetcher(ls, osprey_allowed_hosts=f"localhost:{port}").load_image(f"{other.url}/img.png")
    error = media_error(lambda: fetcher(ls, osprey_allowed_hosts=f"localhost:{port + 1}").load_image(f"{other.url}/img.png"))
    assert error.status_code == 403


def test_same_host_redirect_is_followed(servers: tuple[Stub, Stub]) -> None:
    ls, _ = servers
    assert fetcher(ls).load_image("/data/upload/1/same-host-redirect.png").size == (32, 24)


def test_redirect_to_another_host_is_not_followed(servers: tuple[Stub, Stub]) -> None:
    ls, other = servers
    fetch = fetcher(ls, osprey_allowed_hosts="localhost")  # even an allowed host is not followed to
    error = media_error(lambda: fetch.load_image("/data/upload/1/other-host-redirect.png"))
    assert error.status_code == 403 and "redirect" in error.message
    assert other.requests == []


def test_redirect_loop_ends(servers: tuple[Stub, Stub]) -> None:
    ls, _ = servers
    error = media_error(lambda: fetcher(ls).load_image("/data/upload/1/loop.png"))
    assert error.status_code == 502 and "redirects" in error.message


@pytest.mark.parametrize(
    ("url", "status", "words"),
    [
        ("s3://bucket/key.png", 400, "unsupported scheme"),
        ("gs://bucket/key.png", 400, "unsupported scheme"),
        ("azure-blob://container/key.png", 400, "unsupported scheme"),
        ("file:///etc/passwd", 400, "unsupported scheme"),
        ("ftp://example.org/a.png", 400, "unsupported scheme"),
        ("//evil.example/a.png", 400, "unsupported scheme"),
        ("", 400, "empty"),
        ("   ", 400, "empty"),
        ("http:///nohost.png", 400, "no host"),
        ("http://user:pw@127.0.0.1/a.png", 400, "credentials"),
        ("http://127.0.0.1:99999/a.png", 400, "port"),
        ("/api/projects/1/", 400, "unsupported relative"),
        ("images/a.png", 400, "unsupported relative"),
        ("/data/../api/users/", 403, ".."),
        ("/data/upload/%2e%2e/%2e%2e/api/users/", 403, ".."),
        ("http://169.254.169.254/latest/meta-data/", 403, "not allowed"),
        ("http://10.0.0.1/a.png", 403, "not allowed"),
    ],
)
def test_bad_urls(servers: tuple[Stub, Stub], url: str, status: int, words: str) -> None:
    ls, other = servers
    error = media_error(lambda: fetcher(ls).load_image(url))
    assert error.status_code == status and words in error.message
    assert ls.requests == [] and other.requests == []


def test_non_string_url_is_400(servers: tuple[Stub, Stub]) -> None:
    ls, _ = servers
    assert media_error(lambda: fetcher(ls).load_image(None)).status_code == 400  # type: ignore[arg-type]


# --- upstream failures and limits -------------------------------------------------------------------------
def test_missing_media_is_404(servers: tuple[Stub, Stub]) -> None:
    ls, _ = servers
    assert media_error(lambda: fetcher(ls).load_image("/data/upload/1/nope.png")).status_code == 404


def test_upstream_error_is_502(servers: tuple[Stub, Stub]) -> None:
    ls, _ = servers
    error = media_error(lambda: fetcher(ls).load_image("/data/upload/1/error.png"))
    assert error.status_code == 502 and "500" in error.message


def test_unreachable_host_is_502(tmp_path: Path) -> None:
    fetch = with_ls(Settings(label_studio_url="http://127.0.0.1:1", osprey_media_timeout_s=2))
    assert media_error(lambda: fetch.load_image("/data/upload/1/a.png")).status_code == 502


def test_slow_server_times_out_with_504(servers: tuple[Stub, Stub]) -> None:
    ls, _ = servers
    error = media_error(lambda: fetcher(ls, osprey_media_timeout_s=0.3).load_image("/data/upload/1/slow.png"))
    assert error.status_code == 504 and "OSPREY_MEDIA_TIMEOUT_S" in error.message


def test_dripping_server_hits_the_overall_deadline(servers: tuple[Stub, Stub]) -> None:
    """One byte every 50 ms never trips a per-read timeout; the download deadline still ends it."""
    ls, _ = servers
    error = media_error(lambda: fetcher(ls, osprey_media_timeout_s=0.3).load_image("/data/upload/1/drip.png"))
    assert error.status_code == 504
    assert ls.streamed < 200  # stopped before the server ran out of bytes


def test_declared_length_over_the_limit_is_413_before_reading(servers: tuple[Stub, Stub]) -> None:
    ls, _ = servers
    error = media_error(lambda: fetcher(ls).load_bytes("/data/upload/1/declared-huge.png"))
    assert error.status_code == 413 and "OSPREY_MEDIA_MAX_BYTES" in error.message


def test_byte_limit_is_enforced_while_streaming(servers: tuple[Stub, Stub]) -> None:
    ls, _ = servers
    fetch = fetcher(ls, osprey_media_max_bytes=1024 * 1024)
    error = media_error(lambda: fetch.load_bytes("/data/upload/1/stream.png"))
    assert error.status_code == 413
    assert ls.stream_done.wait(10)  # the server saw the client hang up ...
    assert ls.streamed < 100 * 1024 * 1024  # ... long before its 200 MB were sent


def test_compressed_transfer_is_refused(servers: tuple[Stub, Stub]) -> None:
    ls, _ = servers
    body = zlib.compress(b"\0" * 1_000_000)
    ls.routes["/data/upload/1/gzip.png"] = send(body, headers={"Content-Encoding": "deflate"})
    error = media_error(lambda: fetcher(ls).load_bytes("/data/upload/1/gzip.png"))
    assert error.status_code == 502 and "Content-Encoding" in error.message
    assert ls.requests[-1][0] == "/data/upload/1/gzip.png"


def test_pixel_limit_from_header_before_decoding(servers: tuple[Stub, Stub]) -> None:
    ls, _ = servers
    error = media_error(lambda: fetcher(ls).load_image("/data/upload/1/header-20000.png"))
    assert error.status_code == 413


def test_decompression_bomb_under_the_byte_limit_is_413() -> None:
    buffer = io.BytesIO()
    Image.new("1", (9000, 9000)).save(buffer, "PNG")  # 81 MP in a few kB
    data = buffer.getvalue()
    assert len(data) < 100_000
    error = media_error(lambda: MediaFetcher(Settings()).decode(data, "bomb.png"))
    assert error.status_code == 413 and "OSPREY_MEDIA_MAX_PIXELS" in error.message


def test_custom_pixel_limit(servers: tuple[Stub, Stub]) -> None:
    ls, _ = servers
    error = media_error(lambda: fetcher(ls, osprey_media_max_pixels=700).load_image("/data/upload/1/red.png"))
    assert error.status_code == 413 and "32x24" in error.message


@pytest.mark.parametrize("name", ["text.png", "empty.png", "truncated.png"])
def test_non_images_and_truncated_images_are_415(servers: tuple[Stub, Stub], name: str) -> None:
    ls, _ = servers
    error = media_error(lambda: fetcher(ls).load_image(f"/data/upload/1/{name}"))
    assert error.status_code == 415


def test_unsupported_format_is_415() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "PPM")  # PIL can read it, but it is not on our list
    assert media_error(lambda: MediaFetcher(Settings()).decode(buffer.getvalue())).status_code == 415


# --- local files ------------------------------------------------------------------------------------------
@pytest.fixture
def document_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "imgs").mkdir(parents=True)
    (root / "imgs" / "a b.png").write_bytes(png(10, 8))
    (tmp_path / "secret.png").write_bytes(png(5, 5))
    (root / "imgs" / "escape.png").symlink_to(tmp_path / "secret.png")
    (root / "imgs" / "inside.png").symlink_to(root / "imgs" / "a b.png")
    return root


def test_local_file_is_read_from_the_document_root(document_root: Path) -> None:
    fetch = MediaFetcher(Settings(local_files_document_root=document_root))
    assert fetch.load_image("/data/local-files/?d=imgs/a%20b.png").size == (10, 8)
    assert fetch.load_image("/data/local-files/?d=imgs%2Finside.png").size == (10, 8)


@pytest.mark.parametrize(
    ("query", "status"),
    [
        ("d=../secret.png", 403),
        ("d=../../../../etc/passwd", 403),
        ("d=imgs/../../secret.png", 403),
        ("d=%2Fetc%2Fpasswd", 403),
        ("d=/etc/passwd", 403),
        ("d=imgs/escape.png", 403),  # a symlink that points outside the root
        ("d=imgs/a.png%00.png", 403),
        ("d=imgs/missing.png", 404),
        ("d=imgs", 404),
        ("d=", 400),
        ("x=imgs/a.png", 400),
    ],
)
def test_local_file_escapes_and_misses(document_root: Path, query: str, status: int) -> None:
    fetch = MediaFetcher(Settings(local_files_document_root=document_root))
    assert media_error(lambda: fetch.load_image(f"/data/local-files/?{query}")).status_code == status


def test_local_file_over_the_byte_limit_is_413(document_root: Path) -> None:
    fetch = MediaFetcher(Settings(local_files_document_root=document_root, osprey_media_max_bytes=50))
    assert media_error(lambda: fetch.load_image("/data/local-files/?d=imgs/a%20b.png")).status_code == 413


def test_local_files_without_root_go_to_label_studio(servers: tuple[Stub, Stub]) -> None:
    ls, _ = servers
    ls.routes["/data/local-files/?d=imgs/a.png"] = send(png(7, 7), auth=True)
    assert fetcher(ls).load_image("/data/local-files/?d=imgs/a.png").size == (7, 7)


# --- cache ------------------------------------------------------------------------------------------------
def test_cache_avoids_a_second_download(servers: tuple[Stub, Stub]) -> None:
    ls, _ = servers
    fetch = fetcher(ls)
    first = fetch.load_image("/data/upload/1/red.png")
    assert fetch.load_image("/data/upload/1/red.png") is first
    assert len(ls.requests) == 1


def test_cache_is_bounded_lru(servers: tuple[Stub, Stub]) -> None:
    ls, _ = servers
    fetch = fetcher(ls, osprey_media_cache_items=1)
    fetch.load_image("/data/upload/1/red.png")
    fetch.load_image("/data/upload/1/rgba.png")  # evicts red.png
    fetch.load_image("/data/upload/1/red.png")
    assert [path for path, _ in ls.requests].count("/data/upload/1/red.png") == 2
    assert len(fetch.cache) == 1


def test_cache_byte_budget(servers: tuple[Stub, Stub]) -> None:
    ls, _ = servers
    fetch = fetcher(ls, osprey_media_cache_bytes=32 * 24 * 3 - 1)  # one byte short of the image
    fetch.load_image("/data/upload/1/red.png")
    fetch.load_image("/data/upload/1/red.png")
    assert len(ls.requests) == 2 and len(fetch.cache) == 0


def test_errors_are_not_cached(servers: tuple[Stub, Stub]) -> None:
    ls, _ = servers
    fetch = fetcher(ls)
    media_error(lambda: fetch.load_image("/data/upload/1/text.png"))
    media_error(lambda: fetch.load_image("/data/upload/1/text.png"))
    assert len(ls.requests) == 2


def test_label_studio_url_must_be_http() -> None:
    with pytest.raises(ValueError, match="LABEL_STUDIO_URL"):
        with_ls(Settings(label_studio_url="ls:8080"))


def test_personal_access_token_that_cannot_be_refreshed_is_502(servers: tuple[Stub, Stub]) -> None:
    """The stub has no /api/token/refresh/ (it answers 501 to POST): the PAT exchange fails cleanly."""
    ls, _ = servers
    claims = base64.urlsafe_b64encode(b'{"token_type": "refresh", "exp": 4102444800}').decode().rstrip("=")
    pat = f"eyJhbGciOiJIUzI1NiJ9.{claims}.c2ln"
    error = media_error(lambda: fetcher(ls, label_studio_api_key=pat).load_image("/data/upload/1/red.png"))
    assert error.status_code == 502 and "personal access token" in error.message
    assert ls.requests == []  # no media request went out without valid credentials


# --- defect 5: exactly Label Studio's origin, the key only on its media paths ---------------------------
def test_label_studio_host_on_another_port_is_refused(servers: tuple[Stub, Stub]) -> None:
    """LABEL_STUDIO_URL's host used to be allowed on every port (another service on that host was fetched,
    and its status codes worked as a port oracle)."""
    ls, _ = servers
    neighbour = Stub(routes={"/img.png": send(png())})
    server = serve(neighbour, "127.0.0.1")  # same host as Label Studio, other port
    try:
        error = media_error(lambda: fetcher(ls).load_image(f"{neighbour.url}/img.png"))
        assert error.status_code == 403 and "not allowed" in error.message
        assert neighbour.requests == []
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("path", ["/api/projects/", "/api/users/1/", "/static/a.png", "/data/export/1.json",
                                  "/data/upload/../../api/users/"])
def test_label_studio_paths_outside_media_are_refused_and_never_get_the_key(servers: tuple[Stub, Stub],
                                                                             path: str) -> None:
    ls, _ = servers
    error = media_error(lambda: fetcher(ls).load_bytes(f"{ls.url}{path}"))
    assert error.status_code == 403
    assert ls.requests == []  # refused before any request: the API key went nowhere


def test_a_redirect_from_media_to_the_api_is_refused(servers: tuple[Stub, Stub]) -> None:
    ls, _ = servers
    ls.routes["/data/upload/1/to-api.png"] = send(b"", 302, {"Location": "/api/current-user/token"})
    error = media_error(lambda: fetcher(ls).load_bytes("/data/upload/1/to-api.png"))
    assert error.status_code == 403 and "/data/upload/" in error.message
    assert [p for p, _ in ls.requests] == ["/data/upload/1/to-api.png"]


@pytest.mark.parametrize("url", ["/data/upload/1/red.png\t", "/data/upload/1/\tred.png",
                                 "/data/upload/1/red.png\r\nX-Injected: 1", "/data/upload/1/red\n.png",
                                 "/data/upload/1/red\x00.png", "/data/upload/1/red\x7f.png"])
def test_urls_with_control_characters_are_400(servers: tuple[Stub, Stub], url: str) -> None:
    ls, _ = servers
    error = media_error(lambda: fetcher(ls).load_image(url))
    assert error.status_code == 400 and "control characters" in error.message
    assert ls.requests == []


def test_a_huge_url_is_414_and_not_echoed_whole(servers: tuple[Stub, Stub]) -> None:
    ls, _ = servers
    url = "/data/upload/1/" + "a" * 1_000_000 + ".png"
    error = media_error(lambda: fetcher(ls).load_image(url))
    assert error.status_code == 414 and "OSPREY_MEDIA_MAX_URL_CHARS" in error.message
    assert len(error.message) < 500
    assert ls.requests == []


@pytest.mark.parametrize("relative", ["imgs/" + "b" * 10_000 + ".png", "imgs/" + "c" * 300 + ".png",
                                      "/".join(["d" * 200] * 30) + "/a.png"])
def test_local_files_path_longer_than_the_os_allows_is_414(document_root: Path, relative: str) -> None:
    """It used to reach the file system and come back as a 502 "File name too long"."""
    fetch = MediaFetcher(Settings(local_files_document_root=document_root, osprey_media_max_url_chars=100_000))
    error = media_error(lambda: fetch.load_image(f"/data/local-files/?d={relative}"))
    assert error.status_code == 414 and "longer than the file system allows" in error.message
