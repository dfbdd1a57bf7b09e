"""Content-addressed image files: sha256 -> MODEL_DIR/images/<ab>/<sha256>, written once.

Training reads images from here, so it never depends on the annotation tool (or its URLs, tokens and
uptime) after a sync. A file appears only complete: written to a temp file in the same directory,
fsynced, checked against its hash, then renamed into place; an existing file is never rewritten.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


class ImageStoreError(ValueError):
    """A bad content hash, data that does not match its hash, or an image that is not stored."""


@dataclass(frozen=True)
class StoredImage:
    sha256: str
    path: Path
    created: bool  # False when the content was already stored


class ImageStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def _check(sha256: str) -> str:
        if not isinstance(sha256, str) or not _SHA_RE.match(sha256):
            raise ImageStoreError(f"not a lower-case hex sha256: {sha256!r}")
        return sha256

    def path_for(self, sha256: str) -> Path:
        sha256 = self._check(sha256)
        return self.root / sha256[:2] / sha256

    def has(self, sha256: str) -> bool:
        return self.path_for(sha256).is_file()

    def get(self, sha256: str) -> Path:
        p = self.path_for(sha256)
        if not p.is_file():
            raise ImageStoreError(f"image {sha256} is not in the store {self.root}")
        return p

    def put_bytes(self, data: bytes, sha256: str | None = None) -> StoredImage:
        """Store `data` (once); `sha256`, when given, must match it (a corrupted download is refused)."""
        actual = hashlib.sha256(data).hexdigest()
        if sha256 is not None and self._check(sha256) != actual:
            raise ImageStoreError(f"image content hashes to {actual}, expected {sha256}")
        dest = self.path_for(actual)
        if dest.is_file():
            return StoredImage(actual, dest, created=False)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, dest)  # same bytes if a concurrent writer won: harmless
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return StoredImage(actual, dest, created=True)

    def put_file(self, path: str | os.PathLike, sha256: str | None = None) -> StoredImage:
        return self.put_bytes(Path(path).read_bytes(), sha256)
