"""Running a request's upstream I/O apart from the request, so that it can be stopped from outside.

A response that waits on an upstream read cannot see its client leave, and a
thread blocked in a socket read cannot be interrupted: closing the socket from
another thread does not wake it (the kernel keeps the socket open while the
read waits). So the upstream work runs where it can be cancelled at once, and
the request only waits for its results:

- under gevent, a greenlet running the sync code, stopped with ``kill()``
  (the blocked read raises ``GreenletExit``, and the stream closes its
  connection on the way out);
- under gunicorn's gthread worker, a task on one asyncio loop per worker
  running the async code, stopped with ``cancel()`` (the SDKs close the
  connection on ``CancelledError``);
- anywhere else (the test client, ``flask run``), a thread running the sync
  code, told to stop by a flag it reads after each event.

Each runs inside a copy of the request's context (``current_app``, ``g``,
``request``), as the view would have.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from flask.globals import request_ctx

from app.connectors._base import on_fork_in_child
from app.serving.worker import gevent_patched

logger = logging.getLogger(__name__)


class Cancelled:
    """A flag the sync code reads between two events (the thread runner's only way to stop it)."""

    __slots__ = ("_set",)

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def __bool__(self) -> bool:
        return self._set


class Running(Protocol):
    def cancel(self) -> None:
        """Stop the work now (idempotent; harmless once it has ended)."""


SyncWork = Callable[[Cancelled], None]
AsyncWork = Callable[[], Awaitable[None]]


Crashed = Callable[[Exception], None]


def run_apart(sync_work: SyncWork, async_work: AsyncWork, *, on_loop: bool, crashed: Crashed) -> Running:
    """Start the work: in a greenlet under gevent, on the loop when ``on_loop``, else in a thread.

    ``crashed(exc)`` is told of an exception that escaped the work (or entering its context),
    so that whoever waits for the work's results is not left waiting; stopping it is no crash.
    """
    ctx = request_ctx.copy()
    if gevent_patched():
        return _GreenletRun(ctx, sync_work, crashed)
    if on_loop:
        return _LoopRun(ctx, async_work, crashed)
    return _ThreadRun(ctx, sync_work, crashed)


class _GreenletRun:
    def __init__(self, ctx: Any, work: SyncWork, crashed: Crashed) -> None:
        import gevent

        self._cancelled = Cancelled()
        self._greenlet = gevent.spawn(_in_context, ctx, work, self._cancelled, crashed)

    def cancel(self) -> None:
        self._cancelled.set()
        self._greenlet.kill(block=False)  # GreenletExit at its blocking point, when it next runs


class _ThreadRun:
    def __init__(self, ctx: Any, work: SyncWork, crashed: Crashed) -> None:
        self._cancelled = Cancelled()
        threading.Thread(
            target=_in_context, args=(ctx, work, self._cancelled, crashed), name="llm-stream", daemon=True
        ).start()

    def cancel(self) -> None:
        self._cancelled.set()


class _LoopRun:
    def __init__(self, ctx: Any, work: AsyncWork, crashed: Crashed) -> None:
        self._future = _loop().submit(_ain_context(ctx, work, crashed))

    def cancel(self) -> None:
        self._future.cancel()  # thread-safe: the task is cancelled on its loop


def _in_context(ctx: Any, work: SyncWork, cancelled: Cancelled, crashed: Crashed) -> None:
    try:
        with ctx:
            work(cancelled)
    except BaseException as exc:  # a killed greenlet's GreenletExit ends here, silently
        if isinstance(exc, Exception):
            logger.exception("work apart from its request failed")
            crashed(exc)


async def _ain_context(ctx: Any, work: AsyncWork, crashed: Crashed) -> None:
    try:
        with ctx:
            await work()
    except asyncio.CancelledError:
        pass
    except Exception as exc:
        logger.exception("work apart from its request failed")
        crashed(exc)


class _LoopThread:
    """One asyncio loop per worker process, in a daemon thread, started on first use."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self._run, name="llm-stream-loop", daemon=True).start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coroutine: Any) -> concurrent.futures.Future[Any]:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)


class _Holder:
    """This process's loop thread, started on first use (a forked child starts its own)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.loop_thread: _LoopThread | None = None


_held = _Holder()


def _loop() -> _LoopThread:
    loop_thread = _held.loop_thread
    if loop_thread is None:
        with _held.lock:
            if _held.loop_thread is None:
                _held.loop_thread = _LoopThread()
            loop_thread = _held.loop_thread
    return loop_thread


def run_on_loop(app: Any, work: Callable[[Any], Awaitable[None]], timeout: float) -> None:
    """Run ``work(app)`` on this worker's loop, in an app context, and wait for it (warm-up)."""

    async def in_app() -> None:
        with app.app_context():
            await work(app)

    _loop().submit(in_app()).result(timeout)


def _forget_after_fork() -> None:
    _held.__init__()  # type: ignore[misc]  # its thread stayed in the parent


on_fork_in_child(_forget_after_fork)

__all__ = ["Cancelled", "Running", "run_apart", "run_on_loop"]
