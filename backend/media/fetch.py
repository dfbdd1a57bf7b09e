"""Fetch task images by URL, without SSRF, bombs or path escapes; knows no annotation tool.

Which servers are trusted is passed in as `TrustedOrigin`s by the adapter that owns them (the Label Studio
adapter gives LABEL_STUDIO_URL with its API key: ``backend.labelstudio.client.media_origins``):
- relative URLs (``/data/upload/...``) resolve against the first trusted origin;
- a trusted origin is exactly scheme + host + port: the same host on another port is just another host;
- on a trusted origin only the `key_paths` prefixes are fetched, and only there is its auth sent
  (Label Studio: ``/data/upload/`` and ``/data/local-files/``); any other path (``/api/...``) is 403
  before a request is made, so a task URL cannot make us send the API key to the API;
- ``/data/local-files/?d=<relative path>`` is read from LOCAL_FILES_DOCUMENT_ROOT when it is set (a
  shared volume), else fetched from the trusted origin;
- other absolute http(s) URLs only from OSPREY_ALLOWED_HOSTS (an entry `host` allows any port of that
  host, `host:port` only that port), never with credentials; DNS answers for allowed hosts are trusted;
- redirects are followed only to the same origin (at most 3), each hop checked by the rules above;
- URLs with control characters (tab, CR, LF, NUL...) are 400 and URLs longer than
  OSPREY_MEDIA_MAX_URL_CHARS are 414; a ``?d=`` path longer than the OS allows is 414;
- cloud URIs (``s3://``, ``gs://``, ``azure-blob://``, ...) and other schemes: 400.

Limits: one overall deadline per download (OSPREY_MEDIA_TIMEOUT_S), a byte cap enforced while
streaming (OSPREY_MEDIA_MAX_BYTES), a pixel cap checked from the image header before decoding
(OSPREY_MEDIA_MAX_PIXELS), only common raster formats are decoded. Decoded images are kept in an
LRU cache bounded by item count and by bytes (cache.py).
"""

from __future__ import annotations

import io
import logging
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from urllib.parse import parse_qs, unquote, urljoin, urlsplit

import httpx
from PIL import Image, ImageOps

from backend.errors import InputError
from backend.media.cache import ImageCache
from backend.settings import Settings

logger = logging.getLogger(__name__)

# Decoders we allow; exotic ones (FITS, PSD, ...) are where decoder bugs and bombs live.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")  # JPEG includes multi-picture (MPO)
_MAX_REDIRECTS = 3
_HEADERS = {"Accept-Encoding": "identity"}
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
LOCAL_FILES_PATH = "/data/local-files"


class MediaError(InputError):
    """The media of a task cannot be used; `status_code` is the HTTP status the server answers with."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message, status_code)
        self.status_code = status_code
        self.message = message


@dataclass(frozen=True)
class TrustedOrigin:
    """A server whose media we fetch with credentials: `auth` goes only to paths under `key_paths`.

    `auth_errors` are the exceptions `auth` may raise (e.g. a token that cannot be refreshed): 502."""

    base_url: str
    auth: httpx.Auth | None = None
    key_paths: tuple[str, ...] = ()
    auth_errors: tuple[type[Exception], ...] = ()

    @property
    def origin(self) -> tuple[str, str, int | None]:
        return _origin(self.base_url)

    def allows_path(self, path: str) -> bool:
        return any(path.startswith(p) or path == p.rstrip("/") for p in self.key_paths)


def _origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) of `url`, with the scheme's default port filled in."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError as exc:
        raise MediaError(400, f"bad port in media URL: {exc}") from exc
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), port or {"http": 80, "https": 443}.get(scheme)


def _short(url: str, limit: int = 200) -> str:
    """A URL for messages and logs, bounded (a 1 MB URL must not be echoed whole)."""
    return url if len(url) <= limit else f"{url[:limit]}... ({len(url)} chars)"


class MediaFetcher:
    """Loads task media (`load_image`, `load_bytes`) under the limits in `Settings`. Thread-safe.

    Cached images are shared between callers: treat them as read-only.
    """

    def __init__(self, settings: Settings, origins: Sequence[TrustedOrigin] = ()) -> None:
        self.settings = settings
        self.origins = list(origins)
        for o in self.origins:
            if not o.base_url.startswith(("http://", "https://")):
                raise InputError(f"a media origin must start with http:// or https://, got {o.base_url!r}")
        self.root = settings.local_files_document_root.resolve() if settings.local_files_document_root else None
        self.cache = ImageCache(settings.osprey_media_cache_items, settings.osprey_media_cache_bytes)
        self.max_url_chars = int(getattr(settings, "osprey_media_max_url_chars", 8192) or 8192)
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
        url = url.strip(" ")
        if len(url) > self.max_url_chars:
            raise MediaError(414, f"media URL is {len(url)} characters long, above the limit of "
                                  f"{self.max_url_chars} (OSPREY_MEDIA_MAX_URL_CHARS)")
        if _CONTROL_RE.search(url):
            raise MediaError(400, f"media URL {_short(url)!r} contains control characters (tab, CR, LF...)")
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
            raise MediaError(400, f"unsupported relative media URL {_short(url)!r}: expected /data/upload/... "
                                  "or /data/local-files/?d=...")
        if ".." in PurePosixPath(unquote(parts.path)).parts:
            raise MediaError(403, f"media URL {_short(url)!r} contains '..'")
        if parts.path.rstrip("/") == LOCAL_FILES_PATH and self.root is not None:
            return self._read_local(parts.query)
        if not self.origins:
            raise MediaError(400, f"media URL {_short(url)!r} is relative to Label Studio but LABEL_STUDIO_URL "
                                  "is not set")
        base = self.origins[0]
        if not base.allows_path(parts.path):
            raise MediaError(403, self._path_refused(url, base))
        return self._download(base.base_url.rstrip("/") + url)

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
            raise MediaError(403, f"local-files path {_short(relative)!r} must be relative to "
                                  "LOCAL_FILES_DOCUMENT_ROOT")
        self._check_path_length(relative)
        try:
            path = (self.root / relative).resolve()  # resolves '..' and symlinks
        except OSError as exc:  # ENAMETOOLONG, ELOOP...
            raise MediaError(400, f"local-files path {_short(relative)!r} cannot be used: {exc.strerror}") from exc
        if not path.is_relative_to(self.root):
            raise MediaError(403, f"local-files path {_short(relative)!r} escapes LOCAL_FILES_DOCUMENT_ROOT")
        try:
            if not path.is_file():
                raise MediaError(404, f"local file {_short(relative)!r} not found under LOCAL_FILES_DOCUMENT_ROOT")
            size = path.stat().st_size
            if size > self.settings.osprey_media_max_bytes:
                raise MediaError(413, self._too_big(relative))
            with path.open("rb") as f:
                data = f.read(self.settings.osprey_media_max_bytes + 1)
        except OSError as exc:
            raise MediaError(400, f"local-files path {_short(relative)!r} cannot be read: {exc.strerror}") from exc
        if len(data) > self.settings.osprey_media_max_bytes:  # grew since stat
            raise MediaError(413, self._too_big(relative))
        return data

    def _check_path_length(self, relative: str) -> None:
        """A path longer than the OS allows is the caller's mistake (414), not a server error."""
        assert self.root is not None
        try:
            name_max = os.pathconf(self.root, "PC_NAME_MAX")
            path_max = os.pathconf(self.root, "PC_PATH_MAX")
        except (OSError, ValueError):
            name_max, path_max = 255, 4096
        full = len(os.fsencode(str(self.root))) + 1 + len(os.fsencode(relative))
        longest = max((len(os.fsencode(p)) for p in relative.split("/")), default=0)
        if full >= path_max or longest > name_max:
            raise MediaError(414, f"local-files path of {len(relative)} characters is longer than the file system "
                                  f"allows ({path_max} per path, {name_max} per name)")

    def _fetch_absolute(self, url: str) -> bytes:
        parts = urlsplit(url)
        if parts.username is not None or parts.password is not None:
            raise MediaError(400, "media URLs must not carry credentials")
        _, host, port = _origin(url)
        if not host:
            raise MediaError(400, f"media URL {_short(url)!r} has no host")
        trusted = self._trusted(url)
        if trusted is not None:
            if not trusted.allows_path(parts.path) or ".." in PurePosixPath(unquote(parts.path)).parts:
                raise MediaError(403, self._path_refused(url, trusted))
        elif not self._host_allowed(host, port):
            raise MediaError(
                403, f"host {host!r} (port {port}) is not allowed for media: add it to OSPREY_ALLOWED_HOSTS "
                     "(comma-separated `host` or `host:port`)"
            )
        return self._download(url)

    def _trusted(self, url: str) -> TrustedOrigin | None:
        origin = _origin(url)
        return next((o for o in self.origins if o.origin == origin), None)

    def _host_allowed(self, host: str, port: int | None) -> bool:
        allowed = self.settings.allowed_hosts
        return host in allowed or (port is not None and f"{host}:{port}" in allowed)

    @staticmethod
    def _path_refused(url: str, origin: TrustedOrigin) -> str:
        paths = " and ".join(origin.key_paths) or "no path"
        return (f"media URL {_short(url)!r} is on {origin.base_url} but outside {paths}; only those paths are "
                "fetched from it (its credentials go nowhere else)")

    def _download(self, url: str) -> bytes:
        deadline = time.monotonic() + self.settings.osprey_media_timeout_s
        origin = _origin(url)
        trusted = self._trusted(url)
        auth_errors = trusted.auth_errors if trusted is not None else ()
        for _ in range(_MAX_REDIRECTS + 1):
            try:
                # The credentials only go to the trusted origin's key paths (checked for every hop).
                auth = trusted.auth if trusted is not None and trusted.allows_path(urlsplit(url).path) else None
                with self._http.stream("GET", url, auth=auth, headers=_HEADERS) as response:
                    if response.is_redirect:
                        target = urljoin(url, response.headers.get("location", ""))
                        if _origin(target) != origin:
                            raise MediaError(403, f"media URL {_short(url)!r} redirects to another host; not followed")
                        if trusted is not None and not trusted.allows_path(urlsplit(target).path):
                            raise MediaError(403, self._path_refused(target, trusted))
                        url = target
                        continue
                    self._check_status(response, url)
                    return self._read_limited(response, url, deadline)
            except httpx.TimeoutException as exc:
                raise MediaError(504, f"timed out fetching {_short(url)!r} (OSPREY_MEDIA_TIMEOUT_S)") from exc
            except httpx.HTTPError as exc:
                raise MediaError(502, f"could not fetch {_short(url)!r}: {type(exc).__name__}") from exc
            except auth_errors as exc:  # e.g. the API key could not be turned into an access token
                message = getattr(exc, "message", None) or str(exc)
                raise MediaError(502, f"could not authenticate for {_short(url)!r}: {message}") from exc
        raise MediaError(502, f"too many redirects fetching {_short(url)!r}")

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
