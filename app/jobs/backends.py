"""Where a job's steps run: RQ on Redis, or (no ``REDIS_URL``) a small in-process thread pool.

Both take ``enqueue(job_id, step_id, delay)``: a step is the short function
:func:`app.jobs.steps.run_step`, never a wait. A poll that is not due yet is
enqueued with RQ's ``enqueue_in`` (its scheduler, on in ``flask jobs worker``,
moves it to the queue when due), so no work horse sleeps.

A lease (a Redis key with a short TTL, renewed by a thread while the step
runs) says that a step of a job is in progress: a second step of the same job
finds it taken and does nothing, and a worker killed mid-step lets it expire,
which is how :func:`app.jobs.recovery.recover_stalled` knows it is gone.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flask import Flask
    from redis import Redis

logger = logging.getLogger(__name__)

STEP_FUNCTION = "app.jobs.steps.run_step"
#: RQ keeps a finished step's record this long (the job table keeps the job).
STEP_RESULT_TTL = 3600
STEP_FAILURE_TTL = 7 * 24 * 3600

_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


class Lease(ABC):
    """At most one step of a job at a time, held while it runs."""

    @abstractmethod
    def acquire(self, job_id: str, token: str, seconds: float) -> bool: ...

    @abstractmethod
    def renew(self, job_id: str, token: str, seconds: float) -> bool: ...

    @abstractmethod
    def release(self, job_id: str, token: str) -> None: ...

    @abstractmethod
    def held(self, job_id: str) -> bool: ...


class RedisLease(Lease):
    def __init__(self, redis: Callable[[], Redis], prefix: str) -> None:
        self._redis = redis
        self.prefix = prefix

    def _key(self, job_id: str) -> str:
        return f"{self.prefix}:lease:{job_id}"

    def acquire(self, job_id: str, token: str, seconds: float) -> bool:
        return bool(self._redis().set(self._key(job_id), token, nx=True, px=int(seconds * 1000)))

    def renew(self, job_id: str, token: str, seconds: float) -> bool:
        return bool(self._redis().eval(_RENEW, 1, self._key(job_id), token, int(seconds * 1000)))

    def release(self, job_id: str, token: str) -> None:
        self._redis().eval(_RELEASE, 1, self._key(job_id), token)

    def held(self, job_id: str) -> bool:
        return bool(self._redis().exists(self._key(job_id)))


class LocalLease(Lease):
    """The lease of one process (the thread pool's)."""

    def __init__(self) -> None:
        self._held: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def acquire(self, job_id: str, token: str, seconds: float) -> bool:
        with self._lock:
            current = self._held.get(job_id)
            if current is not None and current[1] > time.monotonic():
                return False
            self._held[job_id] = (token, time.monotonic() + seconds)
            return True

    def renew(self, job_id: str, token: str, seconds: float) -> bool:
        with self._lock:
            if self._held.get(job_id, ("", 0.0))[0] != token:
                return False
            self._held[job_id] = (token, time.monotonic() + seconds)
            return True

    def release(self, job_id: str, token: str) -> None:
        with self._lock:
            if self._held.get(job_id, ("", 0.0))[0] == token:
                del self._held[job_id]

    def held(self, job_id: str) -> bool:
        with self._lock:
            current = self._held.get(job_id)
            return current is not None and current[1] > time.monotonic()


class Backend(ABC):
    name: str
    lease: Lease

    @abstractmethod
    def enqueue(self, job_id: str, step_id: str, delay: float = 0.0) -> None:
        """Run the job's next step now, or in ``delay`` seconds."""

    def status(self, step_id: str) -> str | None:
        """The queue's word for a step (``queued``, ``scheduled``, ``started``...), None if unknown."""
        return None

    def started_at(self, step_id: str) -> float | None:
        return None

    def cancel(self, step_id: str) -> None:  # noqa: B027 - optional
        """Forget a queued or scheduled step (a started one finds the job cancelled and stops)."""


class RQBackend(Backend):
    name = "rq"

    def __init__(self, redis: Callable[[], Redis], queue: str) -> None:
        self._redis = redis
        self.queue_name = queue
        self.lease = RedisLease(redis, f"jobs:{queue}")

    def queue(self) -> Any:
        from rq import Queue

        return Queue(self.queue_name, connection=self._redis())

    def enqueue(self, job_id: str, step_id: str, delay: float = 0.0) -> None:
        options: dict[str, Any] = {
            "job_id": step_id,
            "result_ttl": STEP_RESULT_TTL,
            "failure_ttl": STEP_FAILURE_TTL,
            "description": f"job {job_id}",
        }
        queue = self.queue()
        if delay > 0:
            queue.enqueue_in(timedelta(seconds=delay), STEP_FUNCTION, job_id, **options)
        else:
            queue.enqueue(STEP_FUNCTION, job_id, **options)

    def _fetch(self, step_id: str) -> Any:
        from rq.exceptions import NoSuchJobError
        from rq.job import Job

        try:
            return Job.fetch(step_id, connection=self._redis())
        except NoSuchJobError:
            return None

    def status(self, step_id: str) -> str | None:
        job = self._fetch(step_id)
        if job is None:
            return None
        status = job.get_status(refresh=False)
        return None if status is None else str(getattr(status, "value", status))

    def started_at(self, step_id: str) -> float | None:
        job = self._fetch(step_id)
        started = getattr(job, "started_at", None)
        return None if started is None else started.timestamp()

    def cancel(self, step_id: str) -> None:
        job = self._fetch(step_id)
        if job is not None and job.get_status(refresh=False) in ("queued", "scheduled", "deferred"):
            job.cancel()


class ThreadBackend(Backend):
    """For development without Redis: steps on a few threads of this process, delays on timers.

    A job whose process ends is not resumed by anything (``flask jobs retry ID``
    runs it again); production runs ``flask jobs worker`` on Redis.
    """

    name = "threads"

    def __init__(self, app: Flask, threads: int) -> None:
        self.app = app
        self.lease = LocalLease()
        self._threads = threads
        self._pool: ThreadPoolExecutor | None = None
        self._pid = os.getpid()
        self._lock = threading.Lock()

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None or self._pid != os.getpid():  # a forked child starts its own
                self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="jobs")
                self._pid = os.getpid()
            return self._pool

    def enqueue(self, job_id: str, step_id: str, delay: float = 0.0) -> None:
        if delay > 0:
            timer = threading.Timer(delay, self.enqueue, args=(job_id, step_id))
            timer.daemon = True
            timer.start()
            return
        self._executor().submit(self._run, job_id)

    def _run(self, job_id: str) -> None:
        from app.jobs.steps import run_step

        with self.app.app_context():
            try:
                run_step(job_id)
            except Exception:
                logger.exception("job %s: a step failed unexpectedly", job_id)

    def shutdown(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


__all__ = ["Backend", "LocalLease", "RQBackend", "RedisLease", "ThreadBackend"]
