"""One warning per interval when a back end fails: a cache that fails is a miss, never an error."""

from __future__ import annotations

import logging
import threading
import time

logger = logging.getLogger("app.llm.cache")

#: Seconds between two warnings of one back end.
WARN_INTERVAL = 60.0


class FailureLog:
    """Logs a back end's failures at most once per :data:`WARN_INTERVAL` (no traceback, no content)."""

    def __init__(self, backend: str, interval: float = WARN_INTERVAL) -> None:
        self.backend = backend
        self.interval = interval
        self._last = -interval
        self._lock = threading.Lock()
        self.failures = 0

    def failed(self, action: str, exc: BaseException) -> None:
        now = time.monotonic()
        with self._lock:
            self.failures += 1
            warn = now - self._last >= self.interval
            if warn:
                self._last = now
        if warn:
            logger.warning(
                "LLM response cache (%s): %s failed (%s); calls go on uncached"
                " (this warning repeats at most every %.0f s)",
                self.backend,
                action,
                type(exc).__name__,
                self.interval,
            )


__all__ = ["WARN_INTERVAL", "FailureLog"]
