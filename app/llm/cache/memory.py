"""The memory back end: an LRU bounded in bytes, per process.

Written here rather than taken from a library because what it must do is
small and specific: bound the entries' total *bytes* (``cachetools`` bounds
a count, or a size through a ``getsizeof`` callback on every insert, with no
per-entry TTL in the same structure), expire each entry at its own TTL, and
drop entries per model. An ``OrderedDict`` under one lock does all three.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

from app.llm.cache.store import NO_LOCK, model_of


class MemoryStore:
    backend = "memory"
    shared = False

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        #: name -> (expires at, time.monotonic(); the entry's bytes), least recently used first.
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, name: str) -> bytes | None:
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                return None
            if entry[0] <= time.monotonic():
                self._remove(name)
                return None
            self._entries.move_to_end(name)
            return entry[1]

    def set(self, name: str, data: bytes, ttl: float) -> None:
        size = len(data)
        if size > self.max_bytes:
            return  # larger than the whole cache: not kept
        with self._lock:
            if name in self._entries:
                self._remove(name)
            self._entries[name] = (time.monotonic() + ttl, data)
            self._bytes += size
            while self._bytes > self.max_bytes:
                self._remove(next(iter(self._entries)))

    def delete(self, name: str) -> None:
        with self._lock:
            if name in self._entries:
                self._remove(name)

    def _remove(self, name: str) -> None:
        _expires, data = self._entries.pop(name)
        self._bytes -= len(data)

    def clear(self, model: str | None = None) -> int:
        with self._lock:
            names = [name for name in self._entries if model is None or model_of(name) == model]
            for name in names:
                self._remove(name)
        return len(names)

    def size(self) -> tuple[int, int]:
        with self._lock:
            return len(self._entries), self._bytes

    def lock(self, name: str, ttl: float) -> str | None:
        return NO_LOCK  # one process: the hook's in-process single flight is all there is

    def unlock(self, name: str, token: str) -> None:
        pass

    def locked(self, name: str) -> bool:
        return False

    def add_counts(self, hits: int, misses: int) -> bool:
        return True

    def shared_counts(self) -> tuple[int, int]:
        return 0, 0
