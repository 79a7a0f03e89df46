"""Finding jobs whose step was lost, and giving them a new one.

RQ notices a work horse that died under a living worker (the job fails, and
is retried if it has retries left), and a worker that vanished only when its
job's entry in the ``StartedJobRegistry`` expires: a minute and more after its
last heartbeat, at the next maintenance run (every 10 minutes by default),
when ``StartedJobRegistry.cleanup`` moves it to the ``FailedJobRegistry`` with
an ``AbandonedJobError``. The scheduler lock of a killed worker also lasts a
minute, so its scheduled polls wait that long. The job table is the truth
here, so a worker does not wait for either: every ``JOBS_RECOVERY_INTERVAL``
it looks at the active jobs, and one whose lease is free and whose latest step
is not waiting its turn in the queue (gone, ended, started by a worker that
is gone, or scheduled and overdue) gets a new step. Running a step twice is
harmless (see :mod:`app.jobs.steps`), so a false alarm costs one extra poll.
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta

from sqlalchemy import select

from app.jobs import current_jobs, enqueue_step, utcnow
from app.jobs.models import ACTIVE, Job
from app.services.db_service import db

logger = logging.getLogger(__name__)

#: A scheduled step this late, or a started one this long without its lease, is lost.
GRACE_FACTOR = 2


def stalled(job: Job) -> str | None:
    """Why ``job``'s step is lost (None: it is in hand, or waiting its turn)."""
    jobs = current_jobs()
    backend = jobs.backend
    if backend.lease.held(job.id):
        return None
    grace = GRACE_FACTOR * jobs.settings.lease
    step = job.queue_job_id
    status = backend.status(step) if step else None
    if status in ("queued", "deferred"):
        return None
    if status == "scheduled":
        due = job.next_step_at
        if due is not None and utcnow() > due + timedelta(seconds=grace):
            return "its scheduled step is overdue (no scheduler took it)"
        return None
    if status == "started":
        started = backend.started_at(step) if step else None
        if started is not None and time.time() - started < grace:
            return None  # just started: its lease is on the way
        return "its step started on a worker that is gone (the lease expired)"
    return f"its latest step is {status or 'gone'}"


def recover_stalled(limit: int = 500) -> list[str]:
    """Give each lost job a new step; the ids of those that got one."""
    db.session.expire_all()
    rows = db.session.scalars(
        select(Job).where(Job.status.in_(ACTIVE)).order_by(Job.updated_at).limit(limit)
    ).all()
    recovered: list[str] = []
    for job in rows:
        reason = stalled(job)
        if reason is None:
            continue
        logger.warning("job %s: %s; enqueued again (step %d)", job.id, reason, job.step + 1)
        enqueue_step(job)
        recovered.append(job.id)
    db.session.remove()
    return recovered


__all__ = ["recover_stalled", "stalled"]
