"""Which kind of worker this process is, and how many requests it holds at once.

gunicorn's hooks (``gunicorn.conf.py``) record it in each worker with
:func:`set_worker`; anywhere else (``flask run``, the test client, another
server) it is unknown, and :func:`llm_capacity` falls back to
:data:`FALLBACK_CAPACITY`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Literal

WorkerKind = Literal["gthread", "gevent", "unknown"]

#: The bulkhead's size when the server's concurrency is unknown.
FALLBACK_CAPACITY = 32


@dataclass(frozen=True)
class WorkerInfo:
    kind: WorkerKind
    #: Requests one worker serves at once: its threads (gthread) or its connections (gevent).
    concurrency: int | None


#: This process's worker: one entry, replaced by :func:`set_worker`.
_current: list[WorkerInfo] = [WorkerInfo("unknown", None)]


def set_worker(kind: WorkerKind, concurrency: int) -> None:
    """Record this process's worker (gunicorn's ``post_fork`` hook calls it in each worker)."""
    _current[0] = WorkerInfo(kind, max(1, concurrency))


def current_worker() -> WorkerInfo:
    return _current[0]


def reserved(concurrency: int) -> int:
    """Requests kept free of LLM calls, so that probes and short requests are served at capacity.

    One in eight of the worker's threads or connections, at least 1 and at most 8
    (none for a worker of one thread, which has nothing to spare).
    """
    return 0 if concurrency <= 1 else max(1, min(8, concurrency // 8))


def llm_capacity() -> int:
    """The default of ``LLM_MAX_CONCURRENCY``: LLM calls one worker may have in flight per provider."""
    concurrency = _current[0].concurrency
    if concurrency is None:
        return FALLBACK_CAPACITY
    return concurrency - reserved(concurrency)


def gevent_patched() -> bool:
    """Whether gevent has monkey-patched this process (imports nothing when it has not)."""
    monkey = sys.modules.get("gevent.monkey")
    return bool(monkey is not None and monkey.is_module_patched("socket"))
