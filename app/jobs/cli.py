"""``flask jobs``: run a worker, and look at or act on jobs."""

from __future__ import annotations

import json
from datetime import timedelta

import click
from flask import current_app
from flask.cli import AppGroup
from sqlalchemy import select

from app.jobs.models import FINAL, STATUSES, Job

jobs_cli = AppGroup("jobs", help="Background jobs (images, videos): the worker, and the job table.")


def _job(job_id: str) -> Job:
    from app.jobs import get_job

    job = get_job(job_id)
    if job is None:
        raise click.ClickException(f"no job {job_id!r}")
    return job


@jobs_cli.command("worker")
@click.option("--queues", default=None, help="Comma-separated queues (default: JOBS_QUEUE).")
@click.option("--burst", is_flag=True, help="Quit when the queues are empty.")
def worker_command(queues: str | None, burst: bool) -> None:
    """Run an RQ worker (with its scheduler) whose jobs run in this app's context."""
    from app.jobs import current_jobs
    from app.jobs.worker import build_worker

    names = [q.strip() for q in (queues or current_jobs().settings.queue).split(",") if q.strip()]
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    try:
        worker = build_worker(app, names)
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from None
    worker.work(burst=burst, with_scheduler=True, logging_level="INFO")


@jobs_cli.command("list")
@click.option("--status", type=click.Choice(STATUSES), default=None)
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
def list_command(status: str | None, limit: int) -> None:
    """The latest jobs: id, kind, status, progress, model, tenant, created."""
    from app.services.db_service import db

    query = select(Job).order_by(Job.created_at.desc()).limit(limit)
    if status is not None:
        query = query.where(Job.status == status)
    rows = db.session.scalars(query).all()
    click.echo(f"{'id':32}  {'kind':5}  {'status':19}  {'%':>3}  {'model':40}  {'tenant':12}  created")
    for job in rows:
        model = f"{job.provider}/{job.model}"
        click.echo(
            f"{job.id:32}  {job.kind:5}  {job.status:19}  {job.progress:>3}  {model:40}"
            f"  {job.tenant or '-':12}  {job.created_at:%Y-%m-%d %H:%M:%S}"
        )


@jobs_cli.command("show")
@click.argument("job_id")
def show_command(job_id: str) -> None:
    """One job, as JSON (never the prompt, a key or a download link)."""
    click.echo(json.dumps(_job(job_id).as_dict(), indent=2))


@jobs_cli.command("retry")
@click.argument("job_id")
def retry_command(job_id: str) -> None:
    """Run a failed or cancelled job again: from its operation when it has one, else a new submit."""
    from app.jobs import enqueue_step, utcnow
    from app.services.db_service import transaction

    job = _job(job_id)
    if job.status not in ("failed", "cancelled"):
        raise click.ClickException(f"job {job_id} is {job.status}: only failed or cancelled jobs are retried")
    with transaction():
        job.status, job.error_kind, job.error_message, job.finished_at = "queued", None, None, None
        job.phase, job.cost = None, None
        if job.operation_name is None:
            job.submitted_at = None  # the operator's decision: a new generation may start
        elif not job.pending_files:
            job.deadline_at = utcnow() + _poll_timeout()
        job.updated_at = utcnow()
    enqueue_step(job)
    click.echo(f"job {job_id} queued again" + (" (resuming its operation)" if job.operation_name else ""))


def _poll_timeout() -> timedelta:
    from app.jobs import current_jobs

    return timedelta(seconds=current_jobs().settings.poll_timeout)


@jobs_cli.command("cancel")
@click.argument("job_id")
def cancel_command(job_id: str) -> None:
    """Cancel a job that has not ended (a provider's operation already started runs on there)."""
    from app.jobs import current_jobs, utcnow
    from app.services.db_service import transaction

    job = _job(job_id)
    if job.status in FINAL:
        raise click.ClickException(f"job {job_id} is already {job.status}")
    with transaction():
        job.status, job.phase, job.finished_at, job.updated_at = "cancelled", None, utcnow(), utcnow()
        job.error_kind, job.error_message = "cancelled", "cancelled by an operator"
    if job.queue_job_id:
        current_jobs().backend.cancel(job.queue_job_id)
    click.echo(f"job {job_id} cancelled")


__all__ = ["jobs_cli"]
