"""``/api``: views that show the intended use of the services and the LLM layer.

``POST /api/chat`` and ``POST /api/embeddings`` call :func:`app.llm.get_llm`,
so they work with every provider (``"model": "provider/model"``). Every error
is JSON with a stable ``error.type``. The views check only the body's JSON
shape; the layer validates the rest, and each of its errors says its own
HTTP meaning (``http_status``, ``kind``, ``field``), so they are answered by
lookup. Messages pass through :func:`app.redaction.redact`, so they never
echo a key.

Before a view runs: the caller's API key (:mod:`app.api_keys`; 401 without a
valid one, unless ``API_AUTH=off``), its quotas (:mod:`app.api_quotas`; 429),
and the body's bounds (:mod:`app.api_body`: 413 past ``MAX_CONTENT_LENGTH``,
400 for nesting, non-JSON numbers and lone surrogates). The views then bound
what the layer does not: ``max_tokens`` (``LLM_MAX_TOKENS_LIMIT``), the
number of messages or inputs and the prompt's characters, each a 400 naming
the field. The key's name and tenant become the call's ``user`` and ``tenant``.

With ``"stream": true`` the chat answers ``text/event-stream``: an
``event: delta`` per text delta, then ``event: done`` (usage, finish reason,
tool calls), or ``event: error`` if the provider fails mid-stream. Errors
before the first delta are ordinary JSON responses with their status codes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from flask import Blueprint, Flask, Response, current_app, g, jsonify, request
from flask.blueprints import BlueprintSetupState

from app.api_body import BodyError, json_body, text_size
from app.api_keys import (
    ApiCaller,
    ApiKeyError,
    ApiKeysUnavailableError,
    auth_required,
    caller_for_key,
    presented_key,
)
from app.config import get_count
from app.errors import ConfigError, UnknownProfileError
from app.llm import ChatResponse, LLMError, LLMResponseError, LLMServerError, get_llm
from app.llm.client import OPENAI_PROVIDER
from app.llm.providers.base import GENERATION_PARAMETERS
from app.redaction import redact
from app.sse import SSE_HEADERS, _sse, _sse_response, check_settings, stream_chat  # noqa: F401 (moved there)

bp = Blueprint("api", __name__, url_prefix="/api")
bp.record_once(check_settings)  # LLM_SSE_HEARTBEAT, at start


class BadRequest(Exception):
    """The body does not have the JSON shape a view needs (``field`` says where)."""

    def __init__(self, field: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.field = field
        self.message = message
        self.status = status


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
    messages: Any  # validated by the layer
    stream: bool = False
    options: dict[str, Any] = field(default_factory=dict)


# --- before every view: the key, the quotas, the body ------------------------------


@bp.record_once
def _set_up(state: BlueprintSetupState) -> None:
    """On the app that registers ``/api``: the key check, then the quotas, in that order."""
    app = cast(Flask, state.app)
    try:
        app.config["MAX_CONTENT_LENGTH"] = get_count(app.config, "MAX_CONTENT_LENGTH") or None
    except ConfigError:
        raise ConfigError(
            f"MAX_CONTENT_LENGTH must be a whole number of bytes, got {app.config['MAX_CONTENT_LENGTH']!r}"
        ) from None
    for key in ("API_DEFAULT_RPM", "API_DEFAULT_TPM", "API_MAX_MESSAGES", "API_MAX_INPUTS",
                "API_MAX_PROMPT_CHARS", "API_MAX_JSON_DEPTH", "LLM_MAX_TOKENS_LIMIT"):  # fmt: skip
        get_count(app.config, key)  # a bad value stops start-up naming the key
    app.extensions["api_auth"] = auth_required(app)
    app.before_request(_authenticate)  # an app hook, so that it runs before Flask-Limiter's
    from app.api_quotas import init_quotas

    init_quotas(app, bp)


def _authenticate() -> Response | None:
    """401 for an ``/api`` request without a valid key (``g.api_caller`` otherwise)."""
    if request.blueprint != bp.name or not current_app.extensions.get("api_auth", True):
        return None
    try:
        g.api_caller = caller_for_key(presented_key(request.headers))
    except ApiKeyError as exc:
        return error_response(401, "unauthorized", exc.message, {"WWW-Authenticate": 'Bearer realm="api"'})
    except ApiKeysUnavailableError as exc:
        current_app.logger.error("API keys cannot be checked: %s", exc.__cause__ or exc)
        return error_response(
            503, "unavailable", "API keys cannot be checked now (the database is unavailable or not migrated)"
        )
    return None


@bp.errorhandler(429)
def _over_quota(error: Exception) -> Response:
    """Flask-Limiter's refusal as JSON; its after_request hook adds Retry-After and RateLimit-*."""
    limit = getattr(error, "description", None) or "the limit"
    g.api_over_quota = True  # app.api_quotas sets Retry-After on this answer only
    return error_response(
        429, "rate_limited", f"this API key is over its quota ({limit}); retry after Retry-After seconds"
    )


def _caller() -> ApiCaller | None:
    caller: ApiCaller | None = g.get("api_caller")
    return caller


def _whose() -> tuple[str | None, str | None]:
    """``user`` and ``tenant`` of the layer's call: the key's name and tenant."""
    caller = _caller()
    return (caller.name, caller.tenant) if caller else (None, None)


def _body() -> dict[str, Any]:
    try:
        return json_body()
    except BodyError as exc:
        raise BadRequest(exc.field, exc.message, exc.status) from None


def _bounded(field: str, items: list[Any], count_key: str, noun: str) -> None:
    """400 naming ``field`` past ``count_key`` items or ``API_MAX_PROMPT_CHARS`` characters."""
    most = get_count(current_app.config, count_key)
    if len(items) > most:
        raise BadRequest(field, f"{field} has {len(items)} {noun}; at most {most} are allowed ({count_key})")
    chars = text_size(items)
    limit = get_count(current_app.config, "API_MAX_PROMPT_CHARS")
    if chars > limit:
        raise BadRequest(
            field, f"{field} holds {chars} characters; at most {limit} are allowed (API_MAX_PROMPT_CHARS)"
        )


def _address(body: Mapping[str, Any]) -> str:
    """``provider/model`` from ``model`` (and the older ``profile``), checked against the providers.

    With ``profile`` given, ``model`` is that profile's model name as before
    (``"default"`` is the ``openai`` provider). Without it, ``model`` is
    ``provider/model``; a name without ``/`` goes to ``openai``. An unknown
    provider is the caller's mistake here (400), where the layer, which
    cannot tell it from a missing profile, says not configured (503).
    """
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise BadRequest("model", "model must be a non-empty string ('provider/model', e.g. 'openai/gpt-4o')")
    model = model.strip()
    if "profile" in body:
        profile = body["profile"]
        if not isinstance(profile, str) or not profile:
            raise BadRequest("profile", "profile must be a non-empty string")
        from app.connectors.openai_connector import DEFAULT_PROFILE, current_openai_connector

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


#: The layer's generation parameters (``top_p`` … ``safety``) are passed to it as they are: it
#: validates each (app.llm.params). Not taken over HTTP: ``extra`` (any provider field, ``n`` or
#: a token limit past the cap among them), ``api_key``, ``fallbacks`` and ``cache`` (the
#: operator's), ``tenant`` (the caller's API key's). ``user`` is taken, as OpenAI's clients send
#: it, and ignored: the call's user is the API key's.
CHAT_FIELDS = frozenset(
    {"model", "profile", "messages", "stream", "tools", "tool_choice", "response_format", "temperature"}
    | {"max_tokens", "user", *GENERATION_PARAMETERS}
)


def _generation(body: Mapping[str, Any]) -> dict[str, Any]:
    """The generation parameters given (the layer checks each), after refusing any other field."""
    unknown = sorted(set(body) - CHAT_FIELDS)
    if unknown:
        raise BadRequest(
            unknown[0],
            f"{unknown[0]} is not a field of /api/chat (it takes {', '.join(sorted(CHAT_FIELDS))})",
        )
    options = {name: body[name] for name in GENERATION_PARAMETERS if body.get(name) is not None}
    thinking = options.get("thinking_budget")
    if isinstance(thinking, int) and not isinstance(thinking, bool):
        cap = get_count(current_app.config, "LLM_MAX_TOKENS_LIMIT")
        if thinking > cap:
            raise BadRequest(
                "thinking_budget", f"thinking_budget may be at most {cap} here (LLM_MAX_TOKENS_LIMIT)"
            )
    return options


def _parse_chat(body: dict[str, Any]) -> ChatCall:
    """The call's arguments, checked for their JSON types only: the layer validates the rest."""
    address = _address(body)
    options: dict[str, Any] = {}
    for name, kinds, usage in (
        ("tools", list, "a list of tool definitions"),
        ("tool_choice", str | dict, "'auto', 'none', 'required' or a tool name"),
        ("response_format", dict, "a JSON schema object (or {type: 'json_schema', json_schema: {schema}})"),
    ):
        value = body.get(name)
        if value is not None and not isinstance(value, kinds):
            raise BadRequest(name, f"{name} must be {usage}")
        if value is not None:
            options[name] = value
    # JSON numbers with their schema's minimum (a boolean is not a number here).
    temperature = body.get("temperature")
    if temperature is not None:
        if (
            isinstance(temperature, bool)
            or not isinstance(temperature, int | float)
            or not math.isfinite(temperature)
            or temperature < 0
        ):
            raise BadRequest("temperature", "temperature must be a finite number of 0 or more")
        options["temperature"] = temperature
    max_tokens = body.get("max_tokens")
    if max_tokens is not None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise BadRequest("max_tokens", "max_tokens must be a positive integer")
        cap = get_count(current_app.config, "LLM_MAX_TOKENS_LIMIT")
        if max_tokens > cap:
            raise BadRequest("max_tokens", f"max_tokens may be at most {cap} here (LLM_MAX_TOKENS_LIMIT)")
        options["max_tokens"] = max_tokens
    options.update(_generation(body))
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("stream", "stream must be true or false")
    messages = body.get("messages")
    if isinstance(messages, list):  # its shape is the layer's to check; its size is bounded here
        _bounded("messages", messages, "API_MAX_MESSAGES", "messages")
    return ChatCall(address, messages, stream, options)


# --- answers ---------------------------------------------------------------------


def _bad_request(exc: BadRequest) -> Response:
    kind = "invalid_request" if exc.status == 400 else "request_too_large"
    return error_response(exc.status, kind, exc.message, field=exc.field)


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
        return _bad_request(exc)
    llm = get_llm()
    user, tenant = _whose()
    if call.stream:
        options = {**call.options, "user": user, "tenant": tenant}
        return stream_chat(llm, call.messages, call.model, options, "response_format" in call.options)
    try:
        answer = llm.chat(call.messages, call.model, **call.options, user=user, tenant=tenant)
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
        _bounded("input", inputs, "API_MAX_INPUTS", "inputs")
        address = _address(body)
    except BadRequest as exc:
        return _bad_request(exc)
    try:
        user, tenant = _whose()
        vectors = get_llm().embed(inputs, address, user=user, tenant=tenant)
    except LLMError as exc:
        return llm_error_response(exc)
    provider, _, model = address.partition("/")
    return jsonify(
        model=model,
        provider=provider,
        data=[{"index": index, "embedding": vector} for index, vector in enumerate(vectors)],
    )


# --- streaming: app/sse.py ------------------------------------------------------------


# --- errors ------------------------------------------------------------------------

#: What the client is told, by ``kind``: a summary naming the provider, never its own words
#: (an auth error may quote the key; a 5xx, its internals), except a refusal's explanation.
_SUMMARIES = {
    "upstream_auth": "{where} rejected the configured credentials{status}",
    "rate_limited": "{where} is rate limiting requests",
    "upstream_timeout": "{where} did not answer in time",
    "upstream_unreachable": "{where} could not be reached or the connection broke",
    "upstream_rejected": "{where} rejected the request{status}: {detail}",
}
#: Kinds whose message the layer wrote for the caller (nothing of the provider's in it).
_OWN_WORDS = frozenset(
    {"invalid_request", "not_configured", "circuit_open", "bulkhead_full", "budget_exceeded"}
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


def llm_error_parts(exc: LLMError) -> tuple[int, dict[str, Any], dict[str, str]]:
    """Status, ``error`` body and headers for a typed LLM error (shared by JSON and SSE answers).

    All of it is read off the error: ``http_status``, ``kind``, ``field``,
    ``reason``, ``retry_after``; only the wording is chosen here.
    """
    kind = exc.kind
    extra: dict[str, Any] = {"provider": exc.provider, "model": exc.model}
    if exc.field is not None:
        extra["field"] = exc.field
    if kind == "upstream_rejected":
        extra["reason"] = exc.reason
    if exc.status_code is not None:
        extra["upstream_status"] = exc.status_code
    setting = getattr(exc, "setting", None)  # LLMNotConfiguredError: what to set
    if setting is not None:
        extra["setting"] = setting
    body = _error_body(kind, _message(exc, kind), **extra)
    return exc.http_status, body, retry_after_header(exc.retry_after)


def _message(exc: LLMError, kind: str) -> str:
    if kind in _OWN_WORDS:
        return exc.message
    where = f"the provider {exc.provider!r}" if exc.provider else "the provider"
    status = f" (HTTP {exc.status_code})" if exc.status_code else ""
    summary = _SUMMARIES.get(kind)
    if summary is not None:
        detail = re.sub(r"^HTTP \d{3}:\s*", "", exc.message)
        if not detail or _NO_DETAIL.match(detail):
            detail = "no detail"
        return summary.format(where=where, status=status, detail=detail)
    if isinstance(exc, LLMServerError):
        return f"{where} failed{status}"
    if isinstance(exc, LLMResponseError):  # the layer says what was wrong with the answer
        return f"{where} sent a response that could not be read: {exc.message}"
    # An error the layer could not classify: the provider's answer broke the adapter.
    current_app.logger.warning("unclassified LLM error: %s", exc)
    return f"{where} sent a response that could not be read"


from app.jobs import api as _jobs_api  # noqa: E402, F401  (/api/images, /api/videos, /api/jobs, /api/media)
