"""``/api``: views that show the intended use of the services.

``POST /api/chat`` calls ``get_openai_client(profile).chat.completions.create``
inside the view. Every error is JSON with a stable ``error.type``; upstream
failures map to gateway statuses and never echo the upstream body (which may
quote the key back).
"""

from __future__ import annotations

import math
from typing import Any

from flask import Blueprint, Response, jsonify, request

from app.errors import ServiceNotConfiguredError, UnknownProfileError
from app.redaction import redact
from app.services.openai_service import get_openai_client

bp = Blueprint("api", __name__, url_prefix="/api")

ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})


class BadRequest(Exception):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def error_response(
    status: int, kind: str, message: str, headers: dict[str, str] | None = None, **extra: Any
) -> Response:
    response = jsonify(error={"type": kind, "message": redact(message), **extra})
    response.status_code = status
    response.headers.update(headers or {})
    return response


def _parse_chat(body: object) -> tuple[list[dict[str, Any]], str, str]:
    if not isinstance(body, dict):
        raise BadRequest("body", "the body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages", "messages must be a non-empty list of {role, content} objects")
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise BadRequest(where, f"{where} must be an object")
        if message.get("role") not in ROLES:
            raise BadRequest(f"{where}.role", f"{where}.role must be one of {sorted(ROLES)}")
        if not isinstance(message.get("content"), str | list):
            raise BadRequest(f"{where}.content", f"{where}.content must be a string or a list of parts")
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise BadRequest("model", "model must be a non-empty string")
    profile = body.get("profile", "default")
    if not isinstance(profile, str) or not profile:
        raise BadRequest("profile", "profile must be a non-empty string")
    return messages, model, profile


@bp.post("/chat")
def chat() -> Response:
    """``{"messages", "model", "profile"}`` -> ``{"content", "model", "usage"}``."""
    try:
        messages, model, profile = _parse_chat(request.get_json(silent=True))
        client = get_openai_client(profile)
    except BadRequest as exc:
        return error_response(400, "invalid_request", exc.message, field=exc.field)
    except UnknownProfileError as exc:
        return error_response(400, "invalid_request", str(exc), field="profile")
    except ServiceNotConfiguredError as exc:
        return error_response(503, "not_configured", str(exc), setting=exc.setting)
    import openai  # loaded with the client above

    try:
        completion = client.chat.completions.create(model=model, messages=messages)  # type: ignore[arg-type]
        return jsonify(_completion_json(completion))
    except openai.APIError as exc:
        return upstream_error_response(exc, profile)
    except _UNREADABLE as exc:
        # A 2xx that is not a chat completion (bad JSON, HTML, wrong shape): the
        # provider failed, not this app, so 502 rather than an "internal" 500.
        return upstream_error_response(exc, profile)


#: What the SDK (which does not validate responses) and :func:`_completion_json`
#: raise on a 2xx body that is not a chat completion.
_UNREADABLE = (ValueError, TypeError, AttributeError, LookupError)


def _completion_json(completion: Any) -> dict[str, Any]:
    choices = completion.choices
    if not isinstance(choices, list) or not choices:
        raise ValueError("the completion has no choices")
    usage = completion.usage
    return {
        "content": choices[0].message.content,
        "model": completion.model,
        "usage": {
            "prompt_tokens": usage.prompt_tokens if usage else None,
            "completion_tokens": usage.completion_tokens if usage else None,
            "total_tokens": usage.total_tokens if usage else None,
        },
    }


def retry_after_seconds(headers: Any) -> str | None:
    """``Retry-After`` to pass on, from ``retry-after-ms`` or ``retry-after`` (seconds or a date)."""
    if (millis := headers.get("retry-after-ms")) is not None:
        try:
            return str(max(0, math.ceil(float(millis) / 1000)))
        except ValueError:
            pass
    value = headers.get("retry-after")
    return value.strip() if isinstance(value, str) and value.strip() else None


def upstream_error_response(exc: Exception, profile: str) -> Response:
    """Map an openai SDK error to the response the API promises."""
    import openai

    where = f"the provider of profile {profile!r}"
    if isinstance(exc, openai.APITimeoutError):
        return error_response(504, "upstream_timeout", f"{where} did not answer in time")
    if isinstance(exc, openai.APIConnectionError):
        return error_response(502, "upstream_unreachable", f"{where} could not be reached")
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        if status in (401, 403):
            return error_response(
                502, "upstream_auth", f"{where} rejected the configured credentials (HTTP {status})",
                upstream_status=status,
            )  # fmt: skip
        if status == 429:
            retry_after = retry_after_seconds(exc.response.headers)
            headers = {"Retry-After": retry_after} if retry_after else {}
            return error_response(429, "rate_limited", f"{where} is rate limiting requests", headers)
        if 400 <= status < 500:
            detail = _upstream_message(exc)
            message = f"{where} rejected the request (HTTP {status}): {detail}"
            return error_response(400, "upstream_rejected", message, upstream_status=status)
        return error_response(
            502, "upstream_error", f"{where} failed (HTTP {status})", upstream_status=status
        )
    return error_response(502, "upstream_error", f"{where} sent a response that could not be read")


def _upstream_message(exc: Any) -> str:
    """The provider's own explanation of a 4xx, which helps fix the request (redacted later)."""
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        message = body.get("message") or (body.get("error") or {}).get("message")
        if isinstance(message, str):
            return message[:300]
    return "no detail"
