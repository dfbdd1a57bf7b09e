"""Fetch task images the way Label Studio references them, without SSRF, bombs or path escapes.

Supported `task["data"]` values (protocol notes §5):
- `/data/upload/...` and other `/data/...` paths: fetched from LABEL_STUDIO_URL with the API key;
- `/data/local-files/?d=<relative path>`: read from LOCAL_FILES_DOCUMENT_ROOT when it is set (a
  shared volume), else fetched from Label Studio like an upload;
- absolute http(s) URLs whose host is LABEL_STUDIO_URL's host or listed in OSPREY_ALLOWED_HOSTS.
  Anything else gets 403 before any request is made. The allow-list is by host name (an entry
  `host` allows any port, `host:port` only that port); DNS answers for allowed hosts are trusted.
  Redirects are followed only to the same scheme, host and port (at most 3), and the API key is
  sent only to Label Studio's own host.
- cloud URIs (`s3://`, `gs://`, `azure-blob://`, ...) and other schemes: 400.

Limits: one overall deadline per download (OSPREY_MEDIA_TIMEOUT_S), a byte cap enforced while
streaming (OSPREY_MEDIA_MAX_BYTES), a pixel cap checked from the image header before decoding
(OSPREY_MEDIA_MAX_PIXELS), only common raster formats are decoded. Decoded images are kept in an
LRU cache bounded by item count and by bytes.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections import OrderedDict
from pathlib import PurePosixPath
from urllib.parse import parse_qs, unquote, urljoin, urlsplit

import httpx
from PIL import Image, ImageOps

from backend.errors import InputError
from backend.labelstudio.client import LabelStudioAuth, LabelStudioError
from backend.settings import Settings

logger = logging.getLogger(__name__)

# Decoders we allow; exotic ones (FITS, PSD, ...) are where decoder bugs and bombs live.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")  # JPEG includes multi-picture (MPO)
_MAX_REDIRECTS = 3
_HEADERS = {"Accept-Encoding": "identity"}


class MediaError(InputError):
    """The media of a task cannot be used; `status_code` is the HTTP status the server answers with."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message


def _origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) of `url`, with the scheme's default port filled in."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError as exc:
        raise MediaError(400, f"bad port in media URL: {exc}") from exc
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), port or {"http": 80, "https": 443}.get(scheme)


class _ImageCache:
    """Thread-safe LRU of decoded images, bounded by item count and total bytes."""

    def __init__(self, max_items: int, max_bytes: int) -> None:
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, tuple[Image.Image, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> Image.Image | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[0]

    def put(self, key: str, image: Image.Image) -> None:
        size = image.width * image.height * len(image.getbands())
        if self.max_items <= 0 or size > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._items[key] = (image, size)
            self._bytes += size
            while len(self._items) > self.max_items or self._bytes > self.max_bytes:
                _, (_, evicted) = self._items.popitem(last=False)
                self._bytes -= evicted

    def __len__(self) -> int:
        return len(self._items)


class MediaFetcher:
    """Loads task media (`load_image`, `load_bytes`) under the limits in `Settings`. Thread-safe.

    Cached images are shared between callers: treat them as read-only.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.ls_url = settings.label_studio_url.rstrip("/") if settings.label_studio_url else None
        if self.ls_url and not self.ls_url.startswith(("http://", "https://")):
            raise ValueError(f"LABEL_STUDIO_URL must start with http:// or https://, got {self.ls_url!r}")
        self.ls_origin = _origin(self.ls_url) if self.ls_url else None
        self.auth: LabelStudioAuth | None = None
        if self.ls_url and settings.label_studio_api_key is not None:
            self.auth = LabelStudioAuth(
                self.ls_url, settings.label_studio_api_key.get_secret_value(), timeout_s=settings.osprey_media_timeout_s
            )
        self.root = settings.local_files_document_root.resolve() if settings.local_files_document_root else None
        self.cache = _ImageCache(settings.osprey_media_cache_items, settings.osprey_media_cache_bytes)
        # trust_env=False: no proxies or .netrc credentials picked up from the environment.
        self._http = httpx.Client(timeout=settings.osprey_media_timeout_s, follow_redirects=False, trust_env=False)

    def close(self) -> None:
        self._http.close()

    # --- public --------------------------------------------------------------------------------
    def load_image(self, url: str) -> Image.Image:
        """The image at `url` as RGB with its EXIF orientation applied (what Label Studio displays)."""
        cached = self.cache.get(url) if isinstance(url, str) else None
        if cached is not None:
            return cached
        image = self.decode(self.load_bytes(url), url)
        self.cache.put(url, image)
        return image

    def load_bytes(self, url: str) -> bytes:
        """The raw bytes at `url`, within the byte cap and the download deadline."""
        if not isinstance(url, str) or not url.strip():
            raise MediaError(400, "media URL is empty or not a string")
        url = url.strip()
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme in ("http", "https"):
            return self._fetch_absolute(url)
        if scheme or parts.netloc:
            raise MediaError(
                400,
                f"unsupported scheme {scheme!r} in media URL: use Label Studio uploads, local files or http(s) "
                "URLs (cloud storage URIs such as s3:// or gs:// are not supported)",
            )
        if not parts.path.startswith("/data/"):
            raise MediaError(400, f"unsupported relative media URL {url!r}: expected /data/upload/... or /data/...")
        if ".." in PurePosixPath(unquote(parts.path)).parts:
            raise MediaError(403, f"media URL {url!r} contains '..'")
        if parts.path.rstrip("/") == "/data/local-files" and self.root is not None:
            return self._read_local(parts.query)
        if self.ls_url is None:
            raise MediaError(400, f"media URL {url!r} is relative to Label Studio but LABEL_STUDIO_URL is not set")
        return self._download(self.ls_url + url)

    def decode(self, data: bytes, url: str = "<bytes>") -> Image.Image:
        """Decode `data` to RGB, checking the pixel count from the header before any pixel is decoded."""
        try:
            image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        except Image.DecompressionBombError as exc:
            raise MediaError(413, f"image {url!r} is too large (OSPREY_MEDIA_MAX_PIXELS): {exc}") from exc
        except (Image.UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise MediaError(415, f"{url!r} is not a supported image ({', '.join(IMAGE_FORMATS)})") from exc
        width, height = image.size
        if width * height > self.settings.osprey_media_max_pixels:
            raise MediaError(
                413,
                f"image {url!r} is {width}x{height} = {width * height} pixels, above the limit of "
                f"{self.settings.osprey_media_max_pixels} (OSPREY_MEDIA_MAX_PIXELS)",
            )
        if width == 0 or height == 0:
            raise MediaError(415, f"image {url!r} has no pixels")
        try:
            image.load()
            image = ImageOps.exif_transpose(image)
            return image.convert("RGB")
        except Image.DecompressionBombError as exc:
            raise MediaError(413, f"image {url!r} is too large (OSPREY_MEDIA_MAX_PIXELS): {exc}") from exc
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise MediaError(415, f"image {url!r} is truncated or corrupt: {exc}") from exc

    # --- sources -------------------------------------------------------------------------------
    def _read_local(self, query: str) -> bytes:
        assert self.root is not None
        values = parse_qs(query).get("d")
        if not values or not values[0]:
            raise MediaError(400, "local-files URL has no ?d=<path relative to LOCAL_FILES_DOCUMENT_ROOT>")
        relative = values[0]
        if "\x00" in relative or PurePosixPath(relative).is_absolute():
            raise MediaError(403, f"local-files path {relative!r} must be relative to LOCAL_FILES_DOCUMENT_ROOT")
        path = (self.root / relative).resolve()  # resolves '..' and symlinks
        if not path.is_relative_to(self.root):
            raise MediaError(403, f"local-files path {relative!r} escapes LOCAL_FILES_DOCUMENT_ROOT")
        if not path.is_file():
            raise MediaError(404, f"local file {relative!r} not found under LOCAL_FILES_DOCUMENT_ROOT")
        size = path.stat().st_size
        if size > self.settings.osprey_media_max_bytes:
            raise MediaError(413, self._too_big(relative))
        with path.open("rb") as f:
            data = f.read(self.settings.osprey_media_max_bytes + 1)
        if len(data) > self.settings.osprey_media_max_bytes:  # grew since stat
            raise MediaError(413, self._too_big(relative))
        return data

    def _fetch_absolute(self, url: str) -> bytes:
        parts = urlsplit(url)
        if parts.username is not None or parts.password is not None:
            raise MediaError(400, "media URLs must not carry credentials")
        _, host, port = _origin(url)
        if not host:
            raise MediaError(400, f"media URL {url!r} has no host")
        if not self._host_allowed(host, port):
            raise MediaError(
                403, f"host {host!r} is not allowed for media: add it to OSPREY_ALLOWED_HOSTS (comma-separated)"
            )
        return self._download(url)

    def _host_allowed(self, host: str, port: int | None) -> bool:
        if self.ls_origin is not None and host == self.ls_origin[1]:
            return True
        allowed = self.settings.allowed_hosts
        return host in allowed or (port is not None and f"{host}:{port}" in allowed)

    def _download(self, url: str) -> bytes:
        deadline = time.monotonic() + self.settings.osprey_media_timeout_s
        origin = _origin(url)
        for _ in range(_MAX_REDIRECTS + 1):
            try:
                auth = self.auth if origin == self.ls_origin else None  # the API key only goes to Label Studio
                with self._http.stream("GET", url, auth=auth, headers=_HEADERS) as response:
                    if response.is_redirect:
                        target = urljoin(url, response.headers.get("location", ""))
                        if _origin(target) != origin:
                            raise MediaError(403, f"media URL {url!r} redirects to another host; not followed")
                        url = target
                        continue
                    self._check_status(response, url)
                    return self._read_limited(response, url, deadline)
            except httpx.TimeoutException as exc:
                raise MediaError(504, f"timed out fetching {url!r} (OSPREY_MEDIA_TIMEOUT_S)") from exc
            except httpx.HTTPError as exc:
                raise MediaError(502, f"could not fetch {url!r}: {type(exc).__name__}") from exc
            except LabelStudioError as exc:  # the API key could not be turned into an access token
                raise MediaError(502, f"could not authenticate to Label Studio for {url!r}: {exc.message}") from exc
        raise MediaError(502, f"too many redirects fetching {url!r}")

    def _check_status(self, response: httpx.Response, url: str) -> None:
        status = response.status_code
        if status == 200:
            return
        if status == 404:
            raise MediaError(404, f"media {url!r} not found (404 from its server)")
        if status in (401, 403):
            raise MediaError(
                502, f"media server refused {url!r} with {status}: check LABEL_STUDIO_API_KEY and its permissions"
            )
        raise MediaError(502, f"media server answered {status} for {url!r}")

    def _read_limited(self, response: httpx.Response, url: str, deadline: float) -> bytes:
        limit = self.settings.osprey_media_max_bytes
        declared = response.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise MediaError(413, self._too_big(url))
        encoding = response.headers.get("content-encoding", "identity").lower()
        if encoding != "identity":  # we asked for identity; decoding gzip here would be a bomb vector
            raise MediaError(502, f"media server sent {url!r} with Content-Encoding {encoding!r}")
        buffer = bytearray()
        for chunk in response.iter_raw():  # as bytes arrive, so the deadline is checked often
            buffer += chunk
            if len(buffer) > limit:
                raise MediaError(413, self._too_big(url))
            if time.monotonic() > deadline:
                raise MediaError(504, f"timed out fetching {url!r} (OSPREY_MEDIA_TIMEOUT_S)")
        return bytes(buffer)

    def _too_big(self, name: str) -> str:
        return f"media {name!r} is larger than {self.settings.osprey_media_max_bytes} bytes (OSPREY_MEDIA_MAX_BYTES)"
