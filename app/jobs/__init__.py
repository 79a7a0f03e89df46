"""Background jobs: RQ on Redis (``flask jobs worker``), a thread pool without it (development).

A job is a row of the job table (:mod:`app.jobs.models`) and a chain of short
steps (:mod:`app.jobs.steps`) that move it on: an image job is one step; a
video job is a submit, polls re-enqueued every ``JOBS_POLL_INTERVAL`` seconds
until ``JOBS_POLL_TIMEOUT``, and a download into media storage. Settings:

- ``JOBS_QUEUE`` (``media``): the RQ queue.
- ``JOBS_THREADS`` (2): threads of the in-process pool used when ``REDIS_URL`` is unset.
- ``JOBS_POLL_INTERVAL`` (10 s) and ``JOBS_POLL_TIMEOUT`` (1800 s): a video's polls.
- ``JOBS_LEASE`` (30 s): how long a step's lease lasts unless renewed (every third of it);
  a worker killed mid-step is noticed this long after.
- ``JOBS_RECOVERY_INTERVAL`` (10 s): how often a worker looks for jobs whose step was lost.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from flask import Flask, current_app

from app.config import get_count, get_seconds, get_str
from app.errors import ConfigError
from app.jobs.models import Job

if TYPE_CHECKING:
    from app.jobs.backends import Backend

logger = logging.getLogger(__name__)

EXTENSION_KEY = "jobs"


@dataclass(frozen=True)
class JobsSettings:
    queue: str
    threads: int
    poll_interval: float
    poll_timeout: float
    lease: float
    recovery_interval: float


def parse_jobs_settings(config: Any) -> JobsSettings:
    queue = get_str(config, "JOBS_QUEUE") or "media"
    threads = get_count(config, "JOBS_THREADS")
    if threads < 1:
        raise ConfigError("JOBS_THREADS must be 1 or more")
    settings = JobsSettings(
        queue,
        threads,
        get_seconds(config, "JOBS_POLL_INTERVAL"),
        get_seconds(config, "JOBS_POLL_TIMEOUT"),
        get_seconds(config, "JOBS_LEASE"),
        get_seconds(config, "JOBS_RECOVERY_INTERVAL"),
    )
    if settings.poll_timeout < settings.poll_interval:
        raise ConfigError("JOBS_POLL_TIMEOUT must be at least JOBS_POLL_INTERVAL")
    return settings


class Jobs:
    """One app's jobs: its settings and back end (built on first use: start-up imports no RQ)."""

    def __init__(self, app: Flask, settings: JobsSettings) -> None:
        self.app = app
        self.settings = settings
        self._backend: Backend | None = None

    @property
    def uses_redis(self) -> bool:
        return get_str(self.app.config, "REDIS_URL") is not None

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            from app.jobs.backends import RQBackend, ThreadBackend

            if self.uses_redis:
                from app.connectors.redis_connector import EXTENSION_KEY as REDIS_KEY

                connector = self.app.extensions[REDIS_KEY]
                self._backend = RQBackend(connector.client, self.settings.queue)
            else:
                self._backend = ThreadBackend(self.app, self.settings.threads)
        return self._backend


def init_app(app: Flask) -> None:
    """Register the jobs (settings checked now), media storage and ``flask jobs``."""
    from app.jobs.cli import jobs_cli
    from app.llm.media.prices import parse_media_prices
    from app.media import storage

    settings = parse_jobs_settings(app.config)
    parse_media_prices(app.config.get("LLM_MEDIA_PRICES"))  # a bad entry stops start-up
    app.extensions[EXTENSION_KEY] = Jobs(app, settings)
    storage.init_app(app)
    app.cli.add_command(jobs_cli)
    if get_str(app.config, "REDIS_URL") is None and not app.testing and not _in_cli():
        logger.warning(
            "jobs run on an in-process thread pool of %d threads because REDIS_URL is unset:"
            " for development only (a job whose process stops is not resumed); in production set"
            " REDIS_URL and run `flask jobs worker`",
            settings.threads,
        )


def _in_cli() -> bool:
    return os.environ.get("FLASK_RUN_FROM_CLI") == "true"


def current_jobs() -> Jobs:
    jobs = current_app.extensions.get(EXTENSION_KEY)
    if not isinstance(jobs, Jobs):
        raise RuntimeError("jobs are not set up: app.jobs.init_app(app)")
    return jobs


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def create_job(kind: str, provider: str, model: str, params: dict[str, Any], *,
               user: str | None, tenant: str | None) -> Job:  # fmt: skip
    """Insert the job (``queued``) and enqueue its first step."""
    from app.services.db_service import transaction

    now = utcnow()
    job = Job(
        id=os.urandom(16).hex(),
        kind=kind,
        status="queued",
        progress=0,
        tenant=tenant,
        user=user,
        provider=provider,
        model=model,
        params=params,
        call_id=os.urandom(16).hex(),
        step=0,
        created_at=now,
        updated_at=now,
    )
    with transaction() as session:
        session.add(job)
    enqueue_step(job)
    return job


def enqueue_step(job: Job, delay: float = 0.0) -> None:
    """Record the job's next step (committed first, so recovery sees it), then enqueue it."""
    from datetime import timedelta

    from app.services.db_service import transaction

    jobs = current_jobs()
    with transaction():
        job.step += 1
        job.queue_job_id = f"{job.id}-{job.step}"
        job.next_step_at = utcnow() + timedelta(seconds=delay)
        job.updated_at = utcnow()
    jobs.backend.enqueue(job.id, job.queue_job_id, delay)


def create_image_job(prompt: Any, model: Any, *, user: str | None = None, tenant: str | None = None,
                     **options: Any) -> Job:  # fmt: skip
    """Validate now (a 400 before anything is stored), then queue the job."""
    from app.llm import get_llm

    _adapter, request = get_llm().media.image_request(prompt, model, user=user, **options)
    params = {"prompt": request.prompt, "n": request.n, "size": request.size,
              "aspect_ratio": request.aspect_ratio, "negative_prompt": request.negative_prompt,
              "seed": request.seed}  # fmt: skip
    return create_job("image", request.provider, request.model, params, user=user, tenant=tenant)


def create_video_job(prompt: Any, model: Any, *, user: str | None = None, tenant: str | None = None,
                     image: Any = None, **options: Any) -> Job:  # fmt: skip
    """``image``: bytes, or the id of a media file of the same tenant (an image job's result)."""
    from app.llm import get_llm
    from app.llm.errors import LLMBadRequestError
    from app.media import get_media_storage

    image_id: str | None = None
    data: bytes | None = None
    mime: str | None = None
    storage = get_media_storage()
    if isinstance(image, bytes | bytearray):
        stored = storage.put(bytes(image), _sniff_image(bytes(image)), tenant)
        image_id, data, mime = stored.id, bytes(image), stored.content_type
    elif isinstance(image, str):
        found = storage.find(image, tenant)
        if found is None or not found.content_type.startswith("image/"):
            raise LLMBadRequestError(f"no image media {image!r} of this tenant", field="image")
        image_id, data, mime = found.id, storage.read(found, tenant), found.content_type
    elif image is not None:
        raise LLMBadRequestError("image must be bytes or a media id", field="image")
    _adapter, request = get_llm().media.video_request(
        prompt, model, image=data, image_mime_type=mime, **options
    )
    params = {"prompt": request.prompt, "image": image_id, "duration_seconds": request.duration_seconds,
              "aspect_ratio": request.aspect_ratio, "resolution": request.resolution,
              "negative_prompt": request.negative_prompt, "seed": request.seed}  # fmt: skip
    return create_job("video", request.provider, request.model, params, user=user, tenant=tenant)


def _sniff_image(data: bytes) -> str:
    from app.llm.errors import LLMBadRequestError

    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    raise LLMBadRequestError("image must be PNG, JPEG or WebP", field="image")


def get_job(job_id: str) -> Job | None:
    from app.services.db_service import db

    if not isinstance(job_id, str) or len(job_id) != 32:
        return None
    return db.session.get(Job, job_id)


__all__ = [
    "Jobs",
    "JobsSettings",
    "create_image_job",
    "create_job",
    "create_video_job",
    "current_jobs",
    "enqueue_step",
    "get_job",
    "init_app",
]
