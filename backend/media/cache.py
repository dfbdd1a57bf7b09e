"""The decoded-image cache of a worker: consecutive jobs on one image (an annotator's regions) decode it once.

Bounded by item count and by decoded bytes (LRU), so a run of huge images cannot grow the worker without bound.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from PIL import Image


class ImageCache:
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
