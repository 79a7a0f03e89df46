"""``flask jobs worker``: an RQ worker whose jobs run in the app's context, with its services.

RQ's ``Worker`` forks a work horse per job. The services' fork hook
(:mod:`app.connectors._base`) makes the horse build its own SDK clients and
database connections and leave the parent's alone, so nothing is shared
across the fork. The worker runs RQ's scheduler (``enqueue_in`` polls) and,
with RQ's maintenance, :func:`app.jobs.recovery.recover_stalled` every
``JOBS_RECOVERY_INTERVAL`` seconds; RQ blocks on its queues for that long at
most, so the interval holds while the worker is idle.
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask
from rq import Worker

logger = logging.getLogger(__name__)

#: RQ's margin between the queue wait and the worker's key TTL (``worker_ttl - 15``).
RQ_TTL_MARGIN = 15


class AppWorker(Worker):
    """An RQ worker bound to one Flask app."""

    def __init__(self, app: Flask, *args: Any, **kwargs: Any) -> None:
        self.app = app
        super().__init__(*args, **kwargs)

    def perform_job(self, job: Any, queue: Any, *args: Any, **kwargs: Any) -> bool:
        with self.app.app_context():
            return bool(super().perform_job(job, queue, *args, **kwargs))

    def run_maintenance_tasks(self) -> None:
        super().run_maintenance_tasks()  # type: ignore[no-untyped-call]
        from app.jobs.recovery import recover_stalled

        with self.app.app_context():
            try:
                recover_stalled()
            except Exception:  # the database or Redis away: the next round tries again
                logger.exception("looking for lost jobs failed")


def build_worker(app: Flask, queues: list[str]) -> AppWorker:
    """A worker on its own Redis connection (RQ raises its socket timeout above the queue wait)."""
    import redis

    from app.config import get_str
    from app.jobs import current_jobs

    url = get_str(app.config, "REDIS_URL")
    if url is None:
        raise RuntimeError(
            "flask jobs worker needs REDIS_URL (without it, jobs run in the app's own threads)"
        )
    interval = max(1, round(current_jobs().settings.recovery_interval))
    connection = redis.Redis.from_url(url)
    return AppWorker(
        app,
        queues,
        connection=connection,
        maintenance_interval=interval,
        worker_ttl=interval + RQ_TTL_MARGIN,
        job_monitoring_interval=min(30, interval + RQ_TTL_MARGIN),
    )


__all__ = ["AppWorker", "build_worker"]
