"""Bulkheads: at most max_concurrency calls in flight per provider per process, for threads and tasks."""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import threading
import time

import pytest

from app.llm.errors import LLMBulkheadFullError
from app.llm.resilience.bulkhead import Bulkheads
from app.llm.resilience.settings import BulkheadPolicy

THREE = BulkheadPolicy(max_concurrency=3, max_wait=0.3)


def test_ten_threads_three_slots_exactly_three_in_flight_the_rest_fail_after_max_wait() -> None:
    bulkheads = Bulkheads()
    release = threading.Event()
    entered: list[int] = []
    failed: list[tuple[LLMBulkheadFullError, float]] = []
    peak = 0
    lock = threading.Lock()

    def worker(i: int) -> None:
        nonlocal peak
        started = time.monotonic()
        try:
            with bulkheads.slot("openai", THREE, THREE.max_wait):
                with lock:
                    entered.append(i)
                    peak = max(peak, bulkheads.in_flight("openai"))
                release.wait(5)
        except LLMBulkheadFullError as exc:
            failed.append((exc, time.monotonic() - started))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(10)]
    for thread in threads:
        thread.start()
    time.sleep(0.6)  # every waiter has given up by now
    assert bulkheads.in_flight("openai") == 3
    assert len(entered) == 3
    assert len(failed) == 7
    release.set()
    for thread in threads:
        thread.join()
    assert peak == 3
    assert bulkheads.in_flight("openai") == 0
    assert bulkheads.waiting("openai") == 0
    for exc, waited in failed:
        assert exc.provider == "openai"
        assert 0.28 <= waited < 0.6
        assert "no request was made" in str(exc)


def test_a_freed_slot_goes_to_a_waiter() -> None:
    bulkheads = Bulkheads()
    one = BulkheadPolicy(max_concurrency=1)
    holding = threading.Event()

    def hold() -> None:
        with bulkheads.slot("openai", one, 0):
            holding.set()
            time.sleep(0.2)

    thread = threading.Thread(target=hold)
    thread.start()
    holding.wait(5)
    started = time.monotonic()
    with bulkheads.slot("openai", one, 2.0):
        waited = time.monotonic() - started
        assert bulkheads.in_flight("openai") == 1
    thread.join()
    assert 0.1 < waited < 0.5
    assert bulkheads.in_flight("openai") == 0


def test_a_full_bulkhead_with_no_wait_fails_at_once() -> None:
    bulkheads = Bulkheads()
    one = BulkheadPolicy(max_concurrency=1)
    with bulkheads.slot("openai", one, 0):
        started = time.monotonic()
        with pytest.raises(LLMBulkheadFullError):
            with bulkheads.slot("openai", one, 0):
                pass
        assert time.monotonic() - started < 0.05
        with bulkheads.slot("gemini", one, 0):  # another provider has its own slots
            assert bulkheads.in_flight("gemini") == 1
    assert bulkheads.in_flight("openai") == 0


def test_slots_are_released_on_exceptions() -> None:
    bulkheads = Bulkheads()
    one = BulkheadPolicy(max_concurrency=1)
    for _ in range(5):
        with pytest.raises(ValueError, match="boom"):
            with bulkheads.slot("openai", one, 0):
                raise ValueError("boom")
        assert bulkheads.in_flight("openai") == 0
    slot = bulkheads.slot("openai", one, 0)
    slot.__enter__()
    slot.release()
    slot.__exit__(None, None, None)  # a second release is harmless
    assert bulkheads.in_flight("openai") == 0
    with bulkheads.slot("openai", one, 0):
        assert bulkheads.in_flight("openai") == 1


def test_raising_max_concurrency_admits_waiters() -> None:
    bulkheads = Bulkheads()
    with bulkheads.slot("openai", BulkheadPolicy(max_concurrency=1), 0):
        started = time.monotonic()
        with bulkheads.slot("openai", BulkheadPolicy(max_concurrency=2), 1.0):
            assert time.monotonic() - started < 0.05
            assert bulkheads.in_flight("openai") == 2


def test_aslot_with_asyncio_tasks_keeps_three_in_flight_and_the_loop_free() -> None:
    bulkheads = Bulkheads()

    async def main() -> tuple[int, list[float], int, int]:
        release = asyncio.Event()
        entered = 0
        failed: list[float] = []
        ticks = 0

        async def call() -> None:
            nonlocal entered
            started = time.monotonic()
            try:
                async with bulkheads.aslot("openai", THREE, THREE.max_wait):
                    entered += 1
                    await release.wait()
            except LLMBulkheadFullError:
                failed.append(time.monotonic() - started)

        async def ticker() -> None:
            nonlocal ticks
            while not release.is_set():
                ticks += 1
                await asyncio.sleep(0.01)

        tasks = [asyncio.create_task(call()) for _ in range(10)]
        tick = asyncio.create_task(ticker())
        await asyncio.sleep(0.5)
        in_flight = bulkheads.in_flight("openai")
        release.set()
        await asyncio.gather(*tasks, tick)
        return entered, failed, in_flight, ticks

    entered, failed, in_flight, ticks = asyncio.run(main())
    assert entered == 3
    assert in_flight == 3
    assert len(failed) == 7
    assert all(0.28 <= waited < 0.7 for waited in failed)
    assert ticks >= 30  # waiting tasks never blocked the loop
    assert bulkheads.in_flight("openai") == 0


def test_aslot_waiter_is_woken_by_a_release_in_another_thread() -> None:
    bulkheads = Bulkheads()
    one = BulkheadPolicy(max_concurrency=1)
    holding = threading.Event()

    def hold() -> None:
        with bulkheads.slot("openai", one, 0):
            holding.set()
            time.sleep(0.2)

    thread = threading.Thread(target=hold)
    thread.start()
    holding.wait(5)

    async def main() -> float:
        started = time.monotonic()
        async with bulkheads.aslot("openai", one, 2.0):
            assert bulkheads.in_flight("openai") == 1
            return time.monotonic() - started

    waited = asyncio.run(main())
    thread.join()
    assert 0.1 < waited < 0.5
    assert bulkheads.in_flight("openai") == 0


def test_a_cancelled_waiting_task_leaks_no_slot() -> None:
    bulkheads = Bulkheads()
    one = BulkheadPolicy(max_concurrency=1)

    async def main() -> None:
        release = asyncio.Event()

        async def holder() -> None:
            async with bulkheads.aslot("openai", one, 0):
                await release.wait()

        async def waiter() -> None:
            async with bulkheads.aslot("openai", one, 5.0):
                pytest.fail("a cancelled waiter must not run")

        hold = asyncio.create_task(holder())
        await asyncio.sleep(0.01)
        wait = asyncio.create_task(waiter())
        await asyncio.sleep(0.05)
        assert bulkheads.waiting("openai") == 1
        wait.cancel()
        with pytest.raises(asyncio.CancelledError):
            await wait
        assert bulkheads.waiting("openai") == 0
        release.set()
        await hold
        async with bulkheads.aslot("openai", one, 0):
            assert bulkheads.in_flight("openai") == 1

    asyncio.run(main())
    assert bulkheads.in_flight("openai") == 0


def test_a_forked_child_starts_with_empty_bulkheads() -> None:
    bulkheads = Bulkheads()
    two = BulkheadPolicy(max_concurrency=2)
    release = threading.Event()
    holding = threading.Barrier(3)

    def hold() -> None:
        with bulkheads.slot("openai", two, 0):
            holding.wait(5)
            release.wait(10)

    threads = [threading.Thread(target=hold) for _ in range(2)]
    for thread in threads:
        thread.start()
    holding.wait(5)
    assert bulkheads.in_flight("openai") == 2
    compartment = bulkheads._compartments["openai"]
    compartment.lock.acquire()  # as if a parent thread were taking a slot at the moment of the fork
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        result: dict[str, object] = {}
        try:
            result["empty"] = bulkheads.in_flight("openai")
            with bulkheads.slot("openai", two, 0), bulkheads.slot("openai", two, 0):
                result["held"] = bulkheads.in_flight("openai")
        except BaseException as exc:
            result["error"] = repr(exc)
        os.write(write, json.dumps(result).encode())
        os._exit(0)
    compartment.lock.release()
    os.close(write)
    try:
        ready, _, _ = select.select([read], [], [], 10)
        if not ready:
            os.kill(pid, signal.SIGKILL)
            pytest.fail("the forked child hung on a lock inherited from the parent")
        result = json.loads(os.read(read, 65536))
    finally:
        os.close(read)
        os.waitpid(pid, 0)
        release.set()
        for thread in threads:
            thread.join()
    assert result == {"empty": 0, "held": 2}
    assert bulkheads.in_flight("openai") == 0
