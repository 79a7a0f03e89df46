"""Sans-I/O steps: policy written once as a generator, run by a sync or an async driver.

A *flow* is a generator that does no I/O itself. It yields :class:`Step`
objects (send a request, sleep, take a slot, run a blocking Redis command)
and receives each step's result, or has the step's exception thrown into it,
in the manner of httpx's ``auth_flow``. :func:`run_sync` and :func:`run_async`
are the only places that know how to wait: the sync driver calls
``step.sync()``, the async one awaits ``step.async_()``. So retries, the
deadline, breakers and fallbacks are decided in one place for both worlds.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Generator
from typing import Any, TypeVar

T = TypeVar("T")


class Step:
    """One unit of I/O: how to do it in a thread, and how to do it on an event loop."""

    __slots__ = ("async_", "sync")

    def __init__(self, sync: Callable[[], Any], async_: Callable[[], Awaitable[Any]]) -> None:
        self.sync = sync
        self.async_ = async_


#: What a flow is: it yields steps, is sent their results, and returns ``T``.
Flow = Generator[Step, Any, T]


def sleep(seconds: float) -> Step:
    """Wait ``seconds`` (``time.sleep`` in a thread or greenlet, ``asyncio.sleep`` on a loop)."""
    return Step(lambda: time.sleep(seconds), lambda: _asleep(seconds))


def blocking(fn: Callable[[], T]) -> Step:
    """Run ``fn`` (a blocking call such as a Redis command): directly, or in a worker thread."""
    return Step(fn, lambda: _to_thread(fn))


def run_sync(flow: Flow[T]) -> T:
    """Drive ``flow`` in the calling thread (or greenlet)."""
    try:
        step = next(flow)
        while True:
            try:
                result = step.sync()
            except BaseException as exc:  # the flow decides: handle it, or let it through
                step = flow.throw(exc)
            else:
                step = flow.send(result)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]


async def run_async(flow: Flow[T]) -> T:
    """Drive ``flow`` on the running event loop; no step blocks the loop."""
    try:
        step = next(flow)
        while True:
            try:
                result = await step.async_()
            except BaseException as exc:  # cancellation included: the flow gives back what it holds
                step = flow.throw(exc)
            else:
                step = flow.send(result)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]


async def _asleep(seconds: float) -> None:
    import asyncio  # only async callers pay for it

    await asyncio.sleep(seconds)


async def _to_thread(fn: Callable[[], T]) -> T:
    import asyncio

    return await asyncio.to_thread(fn)


__all__ = ["Flow", "Step", "blocking", "run_async", "run_sync", "sleep"]
