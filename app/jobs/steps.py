"""A job's steps: each short, each idempotent, each run under the job's lease.

:func:`run_step` is the one function RQ (or the thread pool) runs. It reads
the job's row and does the next thing the row says, so a step run twice, late,
or after a restart does what is left and nothing more:

- **image**: generate (through the layer: hooks, policy) and store the images.
- **video, no operation yet**: submit. ``submitted_at`` is committed just
  before the request and the operation's name just after it, before the step
  returns; a job found with ``submitted_at`` and no name may have started a
  generation whose answer was lost, so it fails (``submit_outcome_unknown``)
  rather than start a second one (``flask jobs retry`` is the operator's call).
- **video with an operation**: one poll. Not done: the next poll is enqueued
  ``JOBS_POLL_INTERVAL`` later (no step sleeps), until ``JOBS_POLL_TIMEOUT``.
  Done: its videos' file names are kept, then each is downloaded at once
  (``files.download``: the key goes in a header, the link is never kept) into
  media storage. Done with neither a response nor an error, and every video
  filtered, are failures with the reason, booked at zero.

Everything a job stores that came from the provider is redacted.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from decimal import Decimal
from typing import Any

from app.jobs import current_jobs, enqueue_step, utcnow
from app.jobs.models import Job
from app.llm.errors import (
    LLMContentFilterError,
    LLMError,
    LLMNotFoundError,
    LLMResponseError,
    error_for_status,
)
from app.redaction import redact
from app.services.db_service import db, transaction

logger = logging.getLogger(__name__)

#: Seconds of video a Veo call makes when the request does not say (Veo 3's default).
DEFAULT_VIDEO_SECONDS = 8
#: google.rpc codes of a finished operation's error, as HTTP statuses (for the typed error).
RPC_STATUS = {3: 400, 5: 404, 7: 403, 8: 429, 9: 400, 13: 500, 14: 503, 4: 504, 16: 401}


def run_step(job_id: str) -> str:
    """Do the job's next step; what happened, in a word (RQ keeps it as the step's result)."""
    jobs = current_jobs()
    token = os.urandom(8).hex()
    lease = jobs.backend.lease
    if not lease.acquire(job_id, token, jobs.settings.lease):
        return "busy"  # another step of this job runs now
    try:
        with _renewing(job_id, token):
            db.session.expire_all()
            job = db.session.get(Job, job_id)
            if job is None:
                return "missing"
            if job.final:
                return job.status
            try:
                return _image(job) if job.kind == "image" else _video(job)
            except Cancelled:
                logger.info("job %s: cancelled while a step ran", job_id)
                return "cancelled"
    finally:
        try:
            lease.release(job_id, token)
        finally:
            db.session.remove()


@contextmanager
def _renewing(job_id: str, token: str) -> Iterator[None]:
    """Renew the lease every third of its length while the step runs (a thread of this process)."""
    jobs = current_jobs()
    seconds = jobs.settings.lease
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(seconds / 3):
            try:
                if not jobs.backend.lease.renew(job_id, token, seconds):
                    logger.warning("job %s: its lease was lost while a step ran", job_id)
                    return
            except Exception:  # Redis away for a moment: the next renewal may get through
                logger.warning("job %s: renewing its lease failed", job_id, exc_info=True)

    thread = threading.Thread(target=renew, name=f"lease-{job_id[:8]}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=1)


class Cancelled(Exception):
    """The job was cancelled while this step ran: the step stops, and writes nothing more."""


def _save(job: Job, **changes: Any) -> None:
    db.session.refresh(job, ["status"])
    if job.status == "cancelled":
        raise Cancelled
    with transaction():
        for name, value in changes.items():
            setattr(job, name, value)
        job.updated_at = utcnow()


def _fail(
    job: Job, kind: str, message: str, *, settle: LLMError | None = None, cost: Decimal | None = None
) -> str:
    """Final failure, redacted; ``settle``: the error the hooks' on_error sees (the job's end).

    The hooks run first, so that a job seen as ended has been booked.
    """
    if settle is not None:
        from app.llm import get_llm

        media = get_llm().media
        request, _adapter = _video_request(job)
        media.settle(media.video_call(request, call_id=job.call_id, user=job.user, tenant=job.tenant), settle)
    _save(job, status="failed", error_kind=kind, error_message=redact(message)[:2000], finished_at=utcnow(),
          phase=None, cost=cost)  # fmt: skip
    logger.info("job %s failed: %s", job.id, kind)
    return "failed"


def _error_kind(error: LLMError) -> str:
    return error.kind if error.kind != "upstream_rejected" else str(error.reason or error.kind)


# --- images ------------------------------------------------------------------------


def _image(job: Job) -> str:
    from app.llm import get_llm
    from app.media import get_media_storage

    if job.submitted_at is not None:
        return _fail(
            job, "submit_outcome_unknown", "the job's generation request was sent by a step that did not"
            " finish; it is not sent again, so that no second generation starts",
        )  # fmt: skip
    now = utcnow()
    _save(job, status="running", phase="submitting", progress=10, started_at=job.started_at or now,
          submitted_at=now)  # fmt: skip
    params = job.params
    try:
        response = get_llm().media.generate_image(
            params["prompt"], f"{job.provider}/{job.model}", tenant=job.tenant, user=job.user,
            n=params.get("n", 1), size=params.get("size"), aspect_ratio=params.get("aspect_ratio"),
            negative_prompt=params.get("negative_prompt"), seed=params.get("seed"),
        )  # fmt: skip
    except LLMError as error:  # the layer's hooks have seen it (on_error)
        return _fail(job, _error_kind(error), str(error))
    storage = get_media_storage()
    _save(job, phase="storing", progress=90)
    media = [storage.put(image.data, image.mime_type, job.tenant).id for image in response.images]
    filtered = [{"reason": redact(item.reason)} for item in response.filtered]
    usage = response.usage
    result = {"media": media, "filtered": filtered}
    if not media:
        reasons = "; ".join(item["reason"] for item in filtered) or "no reason given"
        _save(job, result=result, usage_unit="image", usage_quantity=Decimal(0), cost=Decimal(0))
        return _fail(
            job, "content_filter", f"every image was filtered by the provider: {reasons}", cost=Decimal(0)
        )
    _save(job, status="succeeded", phase=None, progress=100, result=result, usage_unit=usage.unit,
          usage_quantity=Decimal(str(usage.quantity)), cost=usage.cost, finished_at=utcnow())  # fmt: skip
    return "succeeded"


# --- video ---------------------------------------------------------------------------


def _video_request(job: Job) -> tuple[Any, Any]:
    from app.llm import get_llm
    from app.media import get_media_storage

    params = dict(job.params)
    data = mime = None
    if params.get("image"):
        storage = get_media_storage()
        found = storage.find(params["image"], job.tenant)
        if found is not None:
            data, mime = storage.read(found, job.tenant), found.content_type
    adapter, request = get_llm().media.video_request(
        params.get("prompt"), f"{job.provider}/{job.model}", image=data, image_mime_type=mime,
        duration_seconds=params.get("duration_seconds"), aspect_ratio=params.get("aspect_ratio"),
        resolution=params.get("resolution"), negative_prompt=params.get("negative_prompt"),
        seed=params.get("seed"),
    )  # fmt: skip
    return request, adapter


def _video(job: Job) -> str:
    if job.operation_name is None:
        return _submit(job)
    if job.pending_files:
        return _download(job)
    return _poll(job)


def _submit(job: Job) -> str:
    from app.llm import get_llm

    if job.submitted_at is not None:
        return _fail(
            job, "submit_outcome_unknown",
            "the submit was sent by a step that did not finish, so the provider may have started a"
            " generation whose name was lost; it is not sent again, so that no second generation starts",
            settle=LLMError("the video's submit outcome is unknown", provider=job.provider, model=job.model),
        )  # fmt: skip
    media = get_llm().media
    request, adapter = _video_request(job)
    now = utcnow()
    _save(job, status="running", phase="submitting", progress=5, started_at=job.started_at or now)
    _save(job, submitted_at=utcnow())
    call = media.video_call(request, call_id=job.call_id, user=job.user, tenant=job.tenant)
    try:
        name = media.submit(call, adapter, request)
    except LLMError as error:  # the hooks' on_error has run (the call ended at its submit)
        return _fail(job, _error_kind(error), str(error))
    deadline = utcnow() + timedelta(seconds=current_jobs().settings.poll_timeout)
    _save(job, operation_name=name, status="waiting_on_provider", phase="polling", progress=10,
          deadline_at=deadline)  # fmt: skip
    enqueue_step(job, current_jobs().settings.poll_interval)
    return "submitted"


def _operation(job: Job, name: str) -> Any:
    from app.llm.media.types import OperationRequest

    return OperationRequest(job.provider, job.model, name)


def _poll(job: Job) -> str:
    from app.llm import get_llm

    settings = current_jobs().settings
    media = get_llm().media
    adapter = get_llm().provider(job.provider)
    assert job.operation_name is not None
    if job.status != "waiting_on_provider" or job.phase != "polling":
        _save(job, status="waiting_on_provider", phase="polling")
    try:
        state = media.poll(adapter, _operation(job, job.operation_name))
    except LLMError as error:
        if isinstance(error, LLMNotFoundError) or not _retryable(error):
            return _fail(job, _error_kind(error), str(error), settle=error, cost=Decimal(0))
        return _poll_again(job, settings, f"the poll failed ({type(error).__name__}), polling again")
    if not state.done:
        if state.progress is not None:
            _save(job, progress=max(job.progress, min(89, 10 + int(state.progress * 0.8))))
        return _poll_again(job, settings, None)
    return _finished(job, state)


def _retryable(error: LLMError) -> bool:
    from app.llm.resilience.retry import is_retryable

    return is_retryable(error)


def _poll_again(job: Job, settings: Any, note: str | None) -> str:
    if job.deadline_at is not None and utcnow() >= job.deadline_at:
        error = LLMError(f"the video was not ready within JOBS_POLL_TIMEOUT ({settings.poll_timeout:g} s)",
                         provider=job.provider, model=job.model)  # fmt: skip
        return _fail(job, "poll_timeout", error.message, settle=error, cost=Decimal(0))
    if note:
        logger.info("job %s: %s", job.id, note)
    enqueue_step(job, settings.poll_interval)
    return "polling"


def _finished(job: Job, state: Any) -> str:
    context: dict[str, Any] = {"provider": job.provider, "model": job.model}
    zero = Decimal(0)
    if state.error_code is not None or state.error_message is not None:
        status = RPC_STATUS.get(state.error_code or 0, 502)
        error = error_for_status(status)(f"the operation failed: {state.error_message}", status_code=status,
                                         **context)  # fmt: skip
        _save(job, usage_unit="second", usage_quantity=zero)
        return _fail(job, _error_kind(error), error.message, settle=error, cost=zero)
    if not state.files and not state.inline:
        _save(job, usage_unit="second", usage_quantity=zero)
        if state.filtered_count:
            reasons = "; ".join(redact(reason) for reason in state.filtered_reasons) or "no reason given"
            error = LLMContentFilterError(
                f"every video ({state.filtered_count}) was filtered by the provider: {reasons}", **context
            )
            _save(
                job, result={"media": [], "filtered": [{"reason": redact(r)} for r in state.filtered_reasons]}
            )
            return _fail(job, "content_filter", error.message, settle=error, cost=zero)
        error = LLMResponseError("the operation is done with neither a response nor an error", **context)
        return _fail(job, "empty_response", error.message, settle=error, cost=zero)
    if state.inline:
        from app.media import get_media_storage

        storage = get_media_storage()
        media = [storage.put(data, mime, job.tenant).id for data, mime in state.inline]
        return _succeed(job, media)
    _save(job, pending_files=list(state.files), phase="downloading", progress=90)
    return _download(job)


def _download(job: Job) -> str:
    from app.llm import get_llm
    from app.media import get_media_storage

    media_calls = get_llm().media
    adapter = get_llm().provider(job.provider)
    storage = get_media_storage()
    if job.phase != "downloading":
        _save(job, phase="downloading", status="waiting_on_provider")
    done = list((job.result or {}).get("media", []))
    for name in list(job.pending_files or ()):
        try:
            data = media_calls.download(adapter, _operation(job, name))
        except LLMError as error:
            if _retryable(error):
                return _poll_again(
                    job, current_jobs().settings, f"a download failed ({type(error).__name__})"
                )
            return _fail(job, "download_failed", str(error), settle=error, cost=Decimal(0))
        done.append(storage.put(data, _video_type(data), job.tenant).id)
        remaining = [n for n in (job.pending_files or []) if n != name]
        _save(job, pending_files=remaining, result={"media": done, "filtered": []})
    return _succeed(job, done)


def _video_type(data: bytes) -> str:
    return "video/webm" if data.startswith(b"\x1a\x45\xdf\xa3") else "video/mp4"


def _succeed(job: Job, media: list[str]) -> str:
    from app.llm import get_llm
    from app.llm.media.types import VideoResponse

    request, _adapter = _video_request(job)
    calls = get_llm().media
    seconds = (request.duration_seconds or DEFAULT_VIDEO_SECONDS) * len(media)
    usage = calls.video_usage(request, seconds)
    call = calls.video_call(request, call_id=job.call_id, user=job.user, tenant=job.tenant)
    calls.settle(call, VideoResponse(job.provider, job.model, media, usage, job.id))
    _save(job, status="succeeded", phase=None, progress=100, pending_files=None,
          result={"media": media, "filtered": []}, usage_unit=usage.unit,
          usage_quantity=Decimal(str(usage.quantity)), cost=usage.cost, finished_at=utcnow())  # fmt: skip
    return "succeeded"


__all__ = ["run_step"]
