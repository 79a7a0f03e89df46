"""``/api``'s jobs and media: ``POST /api/images``, ``POST /api/videos``, ``GET /api/jobs/<id>``,
``GET /api/media/<id>``.

Routes of the ``/api`` blueprint, so each needs an API key, counts against
its quota and has its body bounded, as the chat does. A job and a media file
belong to the key's tenant: another tenant's key gets 404, as for an id that
does not exist. A job answers 202 with its id and a ``Location`` to poll; its
status carries the media URLs and, when it failed, a typed error.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from flask import Response, jsonify, send_file, url_for

from app.api import BadRequest, _address, _bad_request, _body, _whose, bp, error_response, llm_error_response
from app.llm import LLMError

IMAGE_FIELDS = {"prompt", "model", "n", "size", "aspect_ratio", "negative_prompt", "seed"}
VIDEO_FIELDS = {"prompt", "model", "image", "duration_seconds", "aspect_ratio", "resolution",
                "negative_prompt", "seed"}  # fmt: skip


def _fields(body: dict[str, Any], known: set[str]) -> dict[str, Any]:
    unknown = sorted(set(body) - known)
    if unknown:
        raise BadRequest(unknown[0], f"unknown field {unknown[0]!r} (known: {', '.join(sorted(known))})")
    if not isinstance(body.get("model"), str):
        raise BadRequest("model", "model must be 'provider/model', a string")
    # An unknown provider is the caller's mistake (400), as for the chat: the layer, which cannot
    # tell it from a profile left out of the settings, says not configured (503).
    return {**body, "model": _address(body)}


def _accepted(job: Any) -> Response:
    location = url_for("api.job_status", job_id=job.id)
    response = jsonify(id=job.id, status=job.status, url=location)
    response.status_code = 202
    response.headers["Location"] = location
    return response


@bp.post("/images")
def create_images() -> Response:
    from app.jobs import create_image_job

    try:
        body = _fields(_body(), IMAGE_FIELDS)
        user, tenant = _whose()
        options = {k: body[k] for k in ("n", "size", "aspect_ratio", "negative_prompt", "seed") if k in body}
        job = create_image_job(body.get("prompt"), body["model"], user=user, tenant=tenant, **options)
    except BadRequest as exc:
        return _bad_request(exc)
    except LLMError as exc:
        return llm_error_response(exc)
    return _accepted(job)


@bp.post("/videos")
def create_video() -> Response:
    from app.jobs import create_video_job

    try:
        body = _fields(_body(), VIDEO_FIELDS)
        user, tenant = _whose()
        options = {k: body[k] for k in VIDEO_FIELDS - {"prompt", "model", "image"} if k in body}
        image = body.get("image")
        if isinstance(image, dict):  # {"data": base64} or {"media": id}
            image = _image_input(image)
        elif image is not None:
            raise BadRequest("image", 'image must be {"data": "<base64>"} or {"media": "<media id>"}')
        job = create_video_job(body.get("prompt"), body["model"], user=user, tenant=tenant, image=image,
                               **options)  # fmt: skip
    except BadRequest as exc:
        return _bad_request(exc)
    except LLMError as exc:
        return llm_error_response(exc)
    return _accepted(job)


def _image_input(image: dict[str, Any]) -> bytes | str:
    if set(image) == {"media"} and isinstance(image["media"], str):
        return image["media"]
    if set(image) == {"data"} and isinstance(image["data"], str):
        try:
            return base64.b64decode(image["data"], validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest("image.data", "image.data must be base64") from None
    raise BadRequest("image", 'image must be {"data": "<base64>"} or {"media": "<media id>"}')


def _not_found(what: str) -> Response:
    return error_response(404, "not_found", f"no such {what}")


@bp.get("/jobs/<job_id>")
def job_status(job_id: str) -> Response:
    from app.jobs import get_job

    job = get_job(job_id)
    _user, tenant = _whose()
    if job is None or job.tenant != tenant:
        return _not_found("job")
    answer = job.as_dict()
    answer.pop("tenant", None)
    answer["media"] = [
        {"id": media, "url": url_for("api.media_file", media_id=media)} for media in answer["media"]
    ]
    return jsonify(answer)


@bp.get("/media/<media_id>")
def media_file(media_id: str) -> Response:
    """The file, to its tenant's key only; ranges (``Range: bytes=...``) for video players."""
    from app.media import get_media_storage

    storage = get_media_storage()
    _user, tenant = _whose()
    found = storage.find(media_id, tenant)
    if found is None:
        return _not_found("media")
    source: Any = storage.local_path(found, tenant) if storage.local else storage.open(found, tenant)
    response = send_file(
        source, mimetype=found.content_type, conditional=True, etag=found.id.split(".")[0],
        max_age=3600, download_name=found.id,
    )  # fmt: skip
    response.headers["Cache-Control"] = "private, max-age=3600"
    response.headers["Accept-Ranges"] = "bytes"
    return response


__all__ = ["create_images", "create_video", "job_status", "media_file"]
