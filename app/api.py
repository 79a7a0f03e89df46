"""``/api``: views that show the intended use of the services and the LLM layer.

``POST /api/chat`` and ``POST /api/embeddings`` call :func:`app.llm.get_llm`,
so they work with every provider (``"model": "provider/model"``). Every error
is JSON with a stable ``error.type``; upstream failures map to gateway
statuses from the layer's typed errors, and messages pass through
:func:`app.redaction.redact`, so they never echo a key.

With ``"stream": true`` the chat answers ``text/event-stream``: an
``event: delta`` per text delta, then ``event: done`` (usage, finish reason,
tool calls), or ``event: error`` if the provider fails mid-stream. Errors
before the first delta are ordinary JSON responses with their status codes.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request, stream_with_context

from app.errors import UnknownProfileError
from app.llm import (
    ChatResponse,
    ChatStream,
    LLMAuthError,
    LLMBadRequestError,
    LLMConnectionError,
    LLMContentFilterError,
    LLMContextLengthError,
    LLMError,
    LLMNotConfiguredError,
    LLMNotFoundError,
    LLMPermissionError,
    LLMRateLimitError,
    LLMResponseError,
    LLMServerError,
    LLMTimeoutError,
    get_llm,
)
from app.redaction import redact

bp = Blueprint("api", __name__, url_prefix="/api")

#: ``developer`` is OpenAI's newer name for ``system``; it is sent as ``system``.
ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
DEFAULT_PROFILE = "default"
#: The provider that addresses the ``default`` OpenAI profile.
OPENAI_PROVIDER = "openai"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class BadRequest(Exception):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def error_response(
    status: int, kind: str, message: str, headers: dict[str, str] | None = None, **extra: Any
) -> Response:
    response = jsonify(error=_error_body(kind, message, **extra))
    response.status_code = status
    response.headers.update(headers or {})
    return response


def _error_body(kind: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"type": kind, "message": redact(message), **extra}


# --- requests ------------------------------------------------------------------


@dataclass
class ChatCall:
    model: str  # "provider/model"
    messages: list[dict[str, Any]]
    stream: bool = False
    options: dict[str, Any] = field(default_factory=dict)


def _body() -> dict[str, Any]:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise BadRequest("body", "the body must be a JSON object")
    return body


def _address(body: Mapping[str, Any]) -> str:
    """``provider/model`` from ``model`` (and the older ``profile``), checked against the providers.

    With ``profile`` given, ``model`` is that profile's model name as before
    (``"default"`` is the ``openai`` provider). Without it, ``model`` is
    ``provider/model``; a name without ``/`` goes to ``openai``.
    """
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise BadRequest("model", "model must be a non-empty string ('provider/model', e.g. 'openai/gpt-4o')")
    model = model.strip()
    if "profile" in body:
        profile = body["profile"]
        if not isinstance(profile, str) or not profile:
            raise BadRequest("profile", "profile must be a non-empty string")
        from app.connectors.openai_connector import current_openai_connector

        try:
            current_openai_connector().profile(profile)
        except UnknownProfileError as exc:
            raise BadRequest("profile", str(exc)) from None
        return f"{OPENAI_PROVIDER if profile == DEFAULT_PROFILE else profile}/{model}"
    provider, sep, name = model.partition("/")
    if not sep:
        return f"{OPENAI_PROVIDER}/{model}"
    known = get_llm().provider_names()
    if not provider or not name or provider not in known:
        raise BadRequest(
            "model",
            f"model must be 'provider/model' with a known provider, got {model!r};"
            f" known providers: {', '.join(known)}",
        )
    return model


def _parse_messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages", "messages must be a non-empty list of {role, content} objects")
    parsed = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise BadRequest(where, f"{where} must be an object")
        role = message.get("role")
        if role not in ROLES:
            raise BadRequest(f"{where}.role", f"{where}.role must be one of {sorted(ROLES)}")
        content = message.get("content")
        if not isinstance(content, str | list) and not (
            content is None and role == "assistant" and message.get("tool_calls")
        ):
            raise BadRequest(f"{where}.content", f"{where}.content must be a string or a list of parts")
        parsed.append({**message, "role": "system"} if role == "developer" else message)
    return parsed


def _parse_tools(tools: Any) -> list[dict[str, Any]] | None:
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise BadRequest("tools", "tools must be a list of tool definitions")
    names: set[str] = set()
    for index, tool in enumerate(tools):
        where = f"tools[{index}]"
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else tool
        if (
            not isinstance(function, dict)
            or not isinstance(function.get("name"), str)
            or not function["name"]
        ):
            raise BadRequest(
                where,
                f"{where} must be {{name, description, parameters}}"
                " or {type: 'function', function: {name, description, parameters}}",
            )
        if not isinstance(function.get("parameters", {}), dict):
            raise BadRequest(f"{where}.parameters", f"{where}.parameters must be a JSON schema object")
        if function["name"] in names:
            raise BadRequest("tools", f"tools must have unique names; {function['name']!r} is repeated")
        names.add(function["name"])
    return tools


def _parse_response_format(value: Any) -> dict[str, Any] | None:
    """A JSON schema, bare or in OpenAI's ``{"type": "json_schema", "json_schema": {...}}`` wrapper."""
    if value is None:
        return None
    usage = "response_format must be a JSON schema object (or {type: 'json_schema', json_schema: {schema}})"
    if not isinstance(value, dict):
        raise BadRequest("response_format", usage)
    if value.get("type") == "json_schema":
        inner = value.get("json_schema")
        if not isinstance(inner, dict) or not isinstance(inner.get("schema"), dict):
            raise BadRequest("response_format.json_schema", usage)
        schema = inner["schema"]
    elif isinstance(value.get("type"), str) and value["type"] != "object":
        raise BadRequest("response_format", f"{usage}; the schema must describe an object")
    else:
        schema = value
    if schema.get("type", "object") != "object":
        raise BadRequest("response_format", f"{usage}; the schema must describe an object")
    return value


def _parse_chat(body: dict[str, Any]) -> ChatCall:
    messages = _parse_messages(body.get("messages"))
    address = _address(body)
    options: dict[str, Any] = {}
    tools = _parse_tools(body.get("tools"))
    if tools:
        options["tools"] = tools
    tool_choice = body.get("tool_choice")
    if tool_choice is not None:
        if not isinstance(tool_choice, str | dict):
            raise BadRequest("tool_choice", "tool_choice must be 'auto', 'none', 'required' or a tool name")
        options["tool_choice"] = tool_choice
    response_format = _parse_response_format(body.get("response_format"))
    if response_format is not None:
        options["response_format"] = response_format
    temperature = body.get("temperature")
    if temperature is not None:
        if isinstance(temperature, bool) or not isinstance(temperature, int | float) or temperature < 0:
            raise BadRequest("temperature", "temperature must be a number of 0 or more")
        options["temperature"] = temperature
    max_tokens = body.get("max_tokens")
    if max_tokens is not None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise BadRequest("max_tokens", "max_tokens must be a positive integer")
        options["max_tokens"] = max_tokens
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("stream", "stream must be true or false")
    return ChatCall(address, messages, stream, options)


# --- answers ---------------------------------------------------------------------


def _usage(response: ChatResponse) -> dict[str, int | None]:
    return {
        "prompt_tokens": response.input_tokens,
        "completion_tokens": response.output_tokens,
        "total_tokens": response.total_tokens,
    }


def _tool_calls(response: ChatResponse) -> list[dict[str, Any]]:
    return [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in response.tool_calls]


def _chat_json(response: ChatResponse, structured: bool) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "content": response.content,
        "model": response.model,
        "provider": response.provider,
        "usage": _usage(response),
        "finish_reason": response.finish_reason,
        "tool_calls": _tool_calls(response),
    }
    if structured:
        answer["parsed"] = response.parsed
    return answer


@bp.post("/chat")
def chat() -> Response:
    """``{"model", "messages", ...}`` -> ``{"content", "model", "provider", "usage", ...}`` (or SSE)."""
    try:
        call = _parse_chat(_body())
    except BadRequest as exc:
        return error_response(400, "invalid_request", exc.message, field=exc.field)
    llm = get_llm()
    if call.stream:
        try:
            stream = llm.chat_stream(call.messages, call.model, **call.options)
        except LLMError as exc:
            return llm_error_response(exc)
        return _sse_response(stream, "response_format" in call.options)
    try:
        answer = llm.chat(call.messages, call.model, **call.options)
    except LLMError as exc:
        return llm_error_response(exc)
    return jsonify(_chat_json(answer, "response_format" in call.options))


@bp.post("/embeddings")
def embeddings() -> Response:
    """``{"model", "input": [...] | "text"}`` -> ``{"model", "provider", "data": [{"index", "embedding"}]}``.

    ``input`` may be one string or a list; ``data`` keeps the order of the inputs.
    """
    try:
        body = _body()
        inputs = body.get("input")
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not inputs:
            raise BadRequest("input", "input must be a string or a non-empty list of strings")
        for index, text in enumerate(inputs):
            if not isinstance(text, str) or not text:
                raise BadRequest(f"input[{index}]", f"input[{index}] must be a non-empty string")
        address = _address(body)
    except BadRequest as exc:
        return error_response(400, "invalid_request", exc.message, field=exc.field)
    try:
        vectors = get_llm().embed(inputs, address)
    except LLMError as exc:
        return llm_error_response(exc)
    provider, _, model = address.partition("/")
    return jsonify(
        model=model,
        provider=provider,
        data=[{"index": index, "embedding": vector} for index, vector in enumerate(vectors)],
    )


# --- streaming ---------------------------------------------------------------------


def _sse(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def _sse_response(stream: ChatStream, structured: bool) -> Response:
    """Pull the first delta here, so that errors before it are JSON with their status codes."""
    try:
        first: str | None = next(stream)
    except StopIteration:  # nothing but tool calls (or an empty answer)
        first = None
    except LLMError as exc:
        stream.close()
        return llm_error_response(exc)
    except BaseException:
        stream.close()
        raise

    def events() -> Iterator[str]:
        try:
            if first is not None:
                yield _sse("delta", {"text": first})
                for text in stream:
                    yield _sse("delta", {"text": text})
            answer = stream.response
            done = {
                "model": answer.model,
                "provider": answer.provider,
                "usage": _usage(answer),
                "finish_reason": answer.finish_reason,
                "tool_calls": _tool_calls(answer),
            }
            if structured:
                done["parsed"] = answer.parsed
            yield _sse("done", done)
        except LLMError as exc:
            status, body, _headers = llm_error_parts(exc, mid_stream=True)
            yield _sse("error", {"error": {**body, "status": status}})
        except Exception:
            current_app.logger.exception("unhandled error in a chat stream")
            body = _error_body("internal_error", "the server hit an unexpected error")
            yield _sse("error", {"error": {**body, "status": 500}})
        finally:
            # Also when the WSGI server closes this generator because the client went away.
            stream.close()

    response = Response(stream_with_context(events()), mimetype="text/event-stream", headers=SSE_HEADERS)
    # A generator closed before its first step runs no ``finally``: close the upstream here too.
    response.call_on_close(stream.close)
    return response


# --- errors ------------------------------------------------------------------------

#: The start of a validation message that names the offending field (``messages[2].content``).
_FIELD = re.compile(
    r"^(?:messages|tools|tool_choice|response_format|max_tokens|temperature|inputs?)"
    r"(?:\[\d+\]|\.[A-Za-z_]\w*)*"
)
#: What a provider's message is when it has no explanation of its own.
_NO_DETAIL = re.compile(r"^(?:HTTP|Error code:?)\s*\d{3}\s*$", re.IGNORECASE)


def llm_error_response(exc: LLMError) -> Response:
    """The JSON error response for a typed LLM error."""
    status, body, headers = llm_error_parts(exc)
    response = jsonify(error=body)
    response.status_code = status
    response.headers.update(headers)
    return response


def retry_after_header(seconds: float | None) -> dict[str, str]:
    """``Retry-After`` in whole seconds (rounded up), when the provider said how long."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return {}
    return {"Retry-After": str(math.ceil(seconds))}


def _is_validation_error(exc: LLMError) -> bool:
    """The layer's own check of the call failed: nothing was sent, no SDK error is chained."""
    return type(exc) is LLMBadRequestError and exc.status_code is None and exc.__cause__ is None


def llm_error_parts(exc: LLMError, *, mid_stream: bool = False) -> tuple[int, dict[str, Any], dict[str, str]]:
    """Status, ``error`` body and headers for a typed LLM error (shared by JSON and SSE answers)."""
    where = f"the provider {exc.provider!r}" if exc.provider else "the provider"
    context = {"provider": exc.provider, "model": exc.model}
    upstream = {"upstream_status": exc.status_code} if exc.status_code is not None else {}
    if isinstance(exc, LLMNotConfiguredError):
        return 503, _error_body("not_configured", exc.message, setting=exc.setting, **context), {}
    if isinstance(exc, LLMAuthError | LLMPermissionError):
        status = f" (HTTP {exc.status_code})" if exc.status_code else ""
        message = f"{where} rejected the configured credentials{status}"
        return 502, _error_body("upstream_auth", message, **upstream, **context), {}
    if isinstance(exc, LLMRateLimitError):
        message = f"{where} is rate limiting requests"
        return 429, _error_body("rate_limited", message, **context), retry_after_header(exc.retry_after)
    if isinstance(exc, LLMTimeoutError):
        return 504, _error_body("upstream_timeout", f"{where} did not answer in time", **context), {}
    if isinstance(exc, LLMConnectionError):
        message = f"{where} could not be reached or the connection broke"
        return 502, _error_body("upstream_unreachable", message, **context), {}
    if isinstance(exc, LLMServerError):
        status = f" (HTTP {exc.status_code})" if exc.status_code else ""
        return 502, _error_body("upstream_error", f"{where} failed{status}", **upstream, **context), {}
    if not mid_stream and _is_validation_error(exc):
        # The layer's own validation (nothing was sent): name the field when the message does.
        match = _FIELD.match(exc.message)
        name = match.group(0) if match else "tools" if exc.message.startswith("tool ") else "body"
        return 400, _error_body("invalid_request", exc.message, field=name), {}
    if isinstance(exc, LLMBadRequestError | LLMNotFoundError):
        detail = re.sub(r"^HTTP \d{3}:\s*", "", exc.message)
        if not detail or _NO_DETAIL.match(detail):
            detail = "no detail"
        status = f" (HTTP {exc.status_code})" if exc.status_code else ""
        reason = (
            "context_length"
            if isinstance(exc, LLMContextLengthError)
            else "content_filter"
            if isinstance(exc, LLMContentFilterError)
            else "not_found"
            if isinstance(exc, LLMNotFoundError)
            else "bad_request"
        )
        message = f"{where} rejected the request{status}: {detail}"
        return 400, _error_body("upstream_rejected", message, reason=reason, **upstream, **context), {}
    if isinstance(exc, LLMResponseError):
        message = f"{where} sent a response that could not be read: {exc.message}"
        return 502, _error_body("upstream_error", message, **context), {}
    # An error the layer could not classify: the provider's answer broke the adapter.
    current_app.logger.warning("unclassified LLM error: %s", exc)
    message = f"{where} sent a response that could not be read"
    return 502, _error_body("upstream_error", message, **upstream, **context), {}
