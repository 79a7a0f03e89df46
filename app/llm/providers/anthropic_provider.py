"""Anthropic through its own SDK (the optional extra ``pip install .[anthropic]``).

Uses the Anthropic connector's clients (``get_anthropic_client()`` for sync
calls, one ``AsyncAnthropic`` per event loop for async ones), so they stay
lazy, per app, per process and fork-safe. A call with a key of its own goes
through a copy of that client sending its key over the same pool
(``with_options(api_key=...)``, kept per key by :class:`PerKeyClients`).

Translation to the Messages API: system messages become ``system``; tool
results (``role="tool"``) become ``tool_result`` blocks in a user message;
consecutive messages of one role merge, as Anthropic requires alternating
roles; ``max_tokens``, which Anthropic requires, defaults to
:data:`DEFAULT_MAX_TOKENS`; ``temperature``, ``top_p`` and ``top_k`` travel in
``extra_body`` (the SDK no longer names them), and so does ``extra`` where it
adds to the body rather than to what the layer built. Structured output uses the native JSON output
(``output_config.format``). Anthropic has no embeddings API.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Generator, Iterator, Mapping, Sequence
from typing import Any

from app.connectors.anthropic_connector import AnthropicConnector, current_anthropic_connector
from app.llm.errors import (
    IncompleteStreamError,
    LLMBadRequestError,
    LLMConnectionError,
    LLMError,
    LLMNotConfiguredError,
    LLMResponseError,
    LLMTimeoutError,
    error_for_status,
    refine_bad_request,
    retry_after_from_headers,
    sdk_errors,
)
from app.llm.providers.base import (
    ChatRequest,
    EmbedRequest,
    PerKeyClients,
    Provider,
    StreamEnd,
    StreamEvent,
    TextDelta,
    ToolCallDelta,
    WithoutRetries,
    is_json_mode,
    merge_body,
    with_key,
)
from app.llm.structured import json_schema
from app.llm.types import ChatResponse, FinishReason, ImagePart, Message, TextPart, ToolCall, system_text

try:
    import anthropic
except ImportError:  # the optional extra; the layer imports this module on first use of "anthropic/..."
    raise LLMNotConfiguredError(
        "the anthropic package is not installed; install the extra: pip install '.[anthropic]'",
        provider="anthropic",
        setting="the anthropic package",
    ) from None

#: Anthropic requires ``max_tokens``; this applies when the caller gives none (on top of a
#: thinking budget, which must be less than ``max_tokens``).
DEFAULT_MAX_TOKENS = 1024
#: The smallest ``thinking.budget_tokens`` the Messages API takes.
MIN_THINKING_BUDGET = 1024
#: Sampling parameters the SDK (1.0+) no longer names: sent in ``extra_body``, as its
#: migration guide does, which keeps the wire format.
SAMPLING = ("temperature", "top_p", "top_k")

FINISH_REASONS: dict[str, FinishReason] = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}

#: The HTTP status of each error ``type``, for errors that arrive inside a 200 stream.
ERROR_TYPE_STATUS: dict[str, int] = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}

EMBEDDINGS_HINT = (
    "anthropic has no embeddings API; use an embedding model of another provider,"
    " e.g. 'openai/text-embedding-3-small' or 'gemini/text-embedding-004'"
)


# --- request translation -------------------------------------------------------


def _image_block(part: ImagePart, context: dict[str, Any]) -> dict[str, Any]:
    inline = part.as_bytes()
    if inline is not None:
        data, mime_type = inline
        return {
            "type": "image",
            "source": {"type": "base64", "media_type": mime_type, "data": base64.b64encode(data).decode()},
        }
    if part.url and part.url.startswith(("http://", "https://")):
        return {"type": "image", "source": {"type": "url", "url": part.url}}
    raise LLMBadRequestError(
        "an image must be bytes, a base64 data: URL or an http(s) URL for Anthropic", **context
    )


def _content_blocks(parts: Sequence[TextPart | ImagePart], context: dict[str, Any]) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    for part in parts:
        if isinstance(part, TextPart):
            if part.text:  # Anthropic rejects empty text blocks
                blocks.append({"type": "text", "text": part.text})
        else:
            blocks.append(_image_block(part, context))
    return blocks


def _message_blocks(message: Message, context: dict[str, Any]) -> list[dict[str, Any]]:
    if message.role == "tool":
        has_images = any(isinstance(part, ImagePart) for part in message.parts)
        return [
            {
                "type": "tool_result",
                "tool_use_id": message.tool_call_id,
                "content": _content_blocks(message.parts, context) if has_images else message.text,
            }
        ]
    blocks = _content_blocks(message.parts, context)
    blocks.extend(
        {"type": "tool_use", "id": call.id, "name": call.name, "input": call.arguments}
        for call in message.tool_calls
    )
    return blocks or [{"type": "text", "text": message.text}]


def translate_messages(
    messages: Sequence[Message], context: dict[str, Any] | None = None
) -> tuple[str | None, list[dict[str, Any]]]:
    """``(system, messages)`` in the Messages API form, with alternating roles."""
    context = context or {}
    translated: list[dict[str, Any]] = []
    for message in messages:
        if message.role == "system":
            continue
        role = "assistant" if message.role == "assistant" else "user"
        blocks = _message_blocks(message, context)
        if translated and translated[-1]["role"] == role:
            translated[-1]["content"].extend(blocks)
        else:
            translated.append({"role": role, "content": blocks})
    for entry in translated:
        if entry["role"] == "user":
            # tool_result blocks must come first in their user message
            entry["content"].sort(key=lambda block: block["type"] != "tool_result")
    return system_text(messages), translated


def check_parameters(request: ChatRequest) -> None:
    """What the Messages API refuses, by name, before anything is sent."""
    if request.temperature is not None and request.temperature > 1:
        raise LLMBadRequestError("Anthropic takes a temperature from 0 to 1", field="temperature")
    if is_json_mode(request.response_format):
        raise LLMBadRequestError(
            "Anthropic has no JSON mode ({'type': 'json_object'}); give response_format a JSON schema"
            " or a pydantic model instead",
            field="response_format",
        )
    budget = request.thinking_budget
    if budget is None:
        return
    if budget < MIN_THINKING_BUDGET:
        raise LLMBadRequestError(
            f"Anthropic takes a thinking_budget of {MIN_THINKING_BUDGET} tokens or more",
            field="thinking_budget",
        )
    if request.max_tokens is not None and budget >= request.max_tokens:
        raise LLMBadRequestError(
            "Anthropic needs thinking_budget below max_tokens (thinking counts towards it)",
            field="thinking_budget",
        )
    for name in ("temperature", "top_k"):
        if getattr(request, name) is not None:
            raise LLMBadRequestError(f"Anthropic takes no {name} with thinking (thinking_budget)", field=name)


def check_schema(request: ChatRequest) -> None:
    """Refuse a structured-output schema Anthropic cannot take, naming the subschema at fault.

    ``anthropic.transform_schema`` (what :func:`build_params` sends) needs every
    subschema to have a ``type``, ``anyOf``, ``oneOf``, ``allOf``, ``const`` or
    ``enum``, and a ``type`` it knows; it raises on anything else, which would
    otherwise surface mid-call as an unreadable provider error. Images the
    Messages API cannot fetch (not inline, not http or https) are refused here too.
    """
    for index, message in enumerate(request.messages):
        for position, part in enumerate(message.parts):
            fetchable = isinstance(part, ImagePart) and (part.url or "").startswith(("http://", "https://"))
            if isinstance(part, ImagePart) and part.as_bytes() is None and not fetchable:
                raise LLMBadRequestError(
                    "an image must be bytes, a base64 data: URL or an http(s) URL for Anthropic",
                    field=f"messages[{index}].content[{position}].url",
                )
    response_format = request.response_format
    if response_format is None or is_json_mode(response_format):
        return
    where = "response_format"
    if isinstance(response_format, Mapping) and response_format.get("type") == "json_schema":
        where = "response_format.json_schema.schema"
    fault = _schema_fault(json_schema(response_format), where)
    if fault is not None:
        path, reason = fault
        raise LLMBadRequestError(f"Anthropic cannot take the JSON schema at {path}: {reason}", field=path)


def _schema_fault(schema: Any, where: str) -> tuple[str, str] | None:
    """Where ``anthropic.transform_schema`` fails on ``schema`` (the deepest failing subschema), and why."""
    try:
        anthropic.transform_schema(schema)
    except Exception as exc:  # ValueError, AssertionError, TypeError... on what it cannot read
        reason = str(exc) or type(exc).__name__
    else:
        return None
    if isinstance(schema, Mapping):
        children: list[tuple[str, Any]] = []
        for key in ("properties", "$defs", "definitions"):
            if isinstance(schema.get(key), Mapping):
                children += [(f"{where}.{key}.{name}", child) for name, child in schema[key].items()]
        for key in ("anyOf", "oneOf", "allOf"):
            if isinstance(schema.get(key), list):
                children += [(f"{where}.{key}[{i}]", child) for i, child in enumerate(schema[key])]
        if isinstance(schema.get("items"), Mapping):
            children.append((f"{where}.items", schema["items"]))
        for path, child in children:
            fault = _schema_fault(child, path)
            if fault is not None:
                return fault
    if "Expected code to be unreachable" in reason:  # the SDK's words for a type it does not know
        reason = f"unsupported type {schema.get('type')!r}" if isinstance(schema, Mapping) else reason
    return where, reason


def max_tokens(request: ChatRequest) -> int:
    """``max_tokens`` as sent: the caller's, else the default on top of any thinking budget."""
    if request.max_tokens is not None:
        return request.max_tokens
    return DEFAULT_MAX_TOKENS + (request.thinking_budget or 0)


def build_params(request: ChatRequest) -> dict[str, Any]:
    """The keyword arguments of ``client.messages.create`` for ``request``."""
    context = request.context()
    system, messages = translate_messages(request.messages, context)
    params: dict[str, Any] = {"model": request.model, "messages": messages, "max_tokens": max_tokens(request)}
    if system:
        params["system"] = system
    # Models that no longer take a sampling parameter answer 400 (an LLMBadRequestError).
    body = {name: getattr(request, name) for name in SAMPLING if getattr(request, name) is not None}
    if request.stop is not None:
        params["stop_sequences"] = list(request.stop)
    if request.thinking_budget is not None:
        params["thinking"] = {"type": "enabled", "budget_tokens": request.thinking_budget}
    if request.user is not None:
        params["metadata"] = {"user_id": request.user}
    if request.tools:
        params["tools"] = [
            {
                "name": tool.name,
                **({"description": tool.description} if tool.description else {}),
                "input_schema": tool.parameters,
            }
            for tool in request.tools
        ]
    choice = request.tool_choice
    if choice is not None and (request.tools or choice.mode not in ("auto", "none")):
        params["tool_choice"] = {
            "auto": {"type": "auto"},
            "none": {"type": "none"},
            "required": {"type": "any"},
            "tool": {"type": "tool", "name": choice.name},
        }[choice.mode]
    if request.response_format is not None:
        schema = anthropic.transform_schema(json_schema(request.response_format))
        params["output_config"] = {"format": {"type": "json_schema", "schema": schema}}
    for key, value in (request.extra or {}).items():
        # Into what the layer built (an SDK keyword, the same JSON key), else the body as is.
        merge_body(params if key in params else body, {key: value})
    if body:
        params["extra_body"] = body
    return params


# --- response translation ------------------------------------------------------


def _input_tokens(usage: Any) -> int | None:
    """Input tokens including those written to and read from the prompt cache."""
    tokens = getattr(usage, "input_tokens", None)
    if tokens is None:
        return None
    return int(
        tokens
        + (getattr(usage, "cache_creation_input_tokens", None) or 0)
        + (getattr(usage, "cache_read_input_tokens", None) or 0)
    )


def usage_detail(usage: Any) -> dict[str, Any]:
    """Thinking, cache-read and cache-write tokens (``output_tokens_details.thinking_tokens``,
    ``cache_read_input_tokens``, ``cache_creation_input_tokens``), as StreamEnd/ChatResponse fields."""
    details = getattr(usage, "output_tokens_details", None)
    return {
        "reasoning_tokens": getattr(details, "thinking_tokens", None) if details is not None else None,
        "cached_input_tokens": getattr(usage, "cache_read_input_tokens", None),
        "cache_write_tokens": getattr(usage, "cache_creation_input_tokens", None),
    }


def _finish_reason(stop_reason: str | None) -> FinishReason | None:
    return FINISH_REASONS.get(stop_reason or "")


def translate_response(request: ChatRequest, message: Any) -> ChatResponse:
    context = request.context()
    texts: list[str] = []
    tool_calls: list[ToolCall] = []
    for block in message.content or ():
        if block.type == "text":
            texts.append(block.text)
        elif block.type == "tool_use":
            if not isinstance(block.input, dict):
                raise LLMResponseError(
                    f"the model sent arguments for tool {block.name!r} that are not a JSON object",
                    raw_text=repr(block.input),
                    **context,
                )
            tool_calls.append(ToolCall(id=block.id, name=block.name, arguments=dict(block.input)))
    usage = message.usage
    input_tokens = _input_tokens(usage) if usage is not None else None
    output_tokens = usage.output_tokens if usage is not None else None
    total = input_tokens + output_tokens if input_tokens is not None and output_tokens is not None else None
    return ChatResponse(
        content="".join(texts) or None,
        model=message.model or request.model,
        provider=request.provider,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        total_tokens=total,
        finish_reason=_finish_reason(message.stop_reason),
        tool_calls=tool_calls,
        raw=message,
        response_id=message.id or None,
        **(usage_detail(usage) if usage is not None else {}),
    )


def translate_event(event: Any) -> Iterator[StreamEvent]:
    """The layer's events for one raw Messages stream event."""
    kind = event.type
    if kind == "message_start":
        message = event.message
        yield StreamEnd(
            input_tokens=_input_tokens(message.usage),
            model=message.model,
            response_id=message.id or None,
            **usage_detail(message.usage),
        )
    elif kind == "content_block_start":
        block = event.content_block
        if block.type == "tool_use":
            # The arguments follow as input_json_delta fragments (the start carries "{}").
            yield ToolCallDelta(index=event.index, id=block.id, name=block.name)
        elif block.type == "text" and block.text:
            yield TextDelta(block.text)
    elif kind == "content_block_delta":
        delta = event.delta
        if delta.type == "text_delta":
            yield TextDelta(delta.text)
        elif delta.type == "input_json_delta":
            yield ToolCallDelta(index=event.index, arguments=delta.partial_json)
    elif kind == "message_delta":
        usage = event.usage
        yield StreamEnd(
            finish_reason=_finish_reason(event.delta.stop_reason),
            input_tokens=_input_tokens(usage) if usage is not None else None,
            output_tokens=usage.output_tokens if usage is not None else None,
            **(usage_detail(usage) if usage is not None else {}),
        )


class _SyncEvents(Iterator[StreamEvent]):
    """The events of one open SDK stream; ``close()`` closes the HTTP response, read or not."""

    def __init__(self, upstream: Any) -> None:
        self._upstream = upstream
        self._events = self._translate(upstream)

    @staticmethod
    def _translate(upstream: Any) -> Generator[StreamEvent, None, None]:
        ended = False
        try:
            for event in upstream:
                ended = ended or event.type == "message_stop"
                yield from translate_event(event)
            if not ended:
                raise IncompleteStreamError("message_stop", getattr(upstream, "response", None))
        finally:
            upstream.close()  # an early exit frees the connection and tells the server

    def __next__(self) -> StreamEvent:
        return next(self._events)

    def close(self) -> None:
        try:
            self._events.close()
        finally:
            self._upstream.close()


# --- the adapter ---------------------------------------------------------------


class AnthropicProvider(Provider):
    """The Messages API; one instance per LLM layer."""

    unsupported_parameters = frozenset(
        {"seed", "presence_penalty", "frequency_penalty", "reasoning_effort", "safety"}
    )
    family = "Anthropic Messages API"
    takes_api_key = True

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._without_retries = WithoutRetries()  # the layer retries, not the SDK
        #: Copies of the clients above that send a per-call key (``api_key=``).
        self._per_key = PerKeyClients(with_key)

    def check(self, request: ChatRequest) -> None:
        super().check(request)
        check_parameters(request)
        check_schema(request)

    @staticmethod
    def _connector() -> AnthropicConnector:
        return current_anthropic_connector()

    def _options(self, connector: AnthropicConnector, request: ChatRequest) -> dict[str, Any]:
        """A shorter timeout for this attempt when the call's deadline leaves less than the client's."""
        if request.timeout is not None and request.timeout < connector.settings.timeout:
            return {"timeout": request.timeout}
        return {}

    def _client(self, connector: AnthropicConnector, request: ChatRequest) -> Any:
        """The sync client without SDK retries, sending the call's own key when it has one."""
        if request.api_key is None:
            return self._without_retries(connector.client())
        return self._per_key.get(self._without_retries(connector.keyed_client()), request.api_key)

    def _aclient(self, connector: AnthropicConnector, request: ChatRequest) -> Any:
        """The async client of the running event loop, likewise."""
        if request.api_key is None:
            return self._without_retries(connector.async_client())
        return self._per_key.get(self._without_retries(connector.keyed_async_client()), request.api_key)

    def chat(self, request: ChatRequest) -> ChatResponse:
        connector = self._connector()
        client = self._client(connector, request)
        message = client.messages.create(**build_params(request), **self._options(connector, request))
        return translate_response(request, message)

    def stream(self, request: ChatRequest) -> Iterator[StreamEvent]:
        connector = self._connector()
        params = {**build_params(request), **self._options(connector, request)}
        upstream = self._client(connector, request).messages.create(**params, stream=True)
        return _SyncEvents(upstream)

    def embed(self, request: EmbedRequest) -> list[list[float]]:
        raise LLMBadRequestError(EMBEDDINGS_HINT, **request.context())

    async def achat(self, request: ChatRequest) -> ChatResponse:
        connector = self._connector()
        client = self._aclient(connector, request)
        message = await client.messages.create(**build_params(request), **self._options(connector, request))
        return translate_response(request, message)

    def astream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        # The connector is looked up now, in the caller's app context; the client is
        # taken inside the generator, in the event loop that iterates it.
        return self._astream(self._connector(), request)

    async def _astream(
        self, connector: AnthropicConnector, request: ChatRequest
    ) -> AsyncIterator[StreamEvent]:
        params = {**build_params(request), **self._options(connector, request)}
        client = self._aclient(connector, request)
        upstream = await client.messages.create(**params, stream=True)
        ended = False
        try:
            async for event in upstream:
                ended = ended or event.type == "message_stop"
                for translated in translate_event(event):
                    yield translated
            if not ended:
                raise IncompleteStreamError("message_stop", getattr(upstream, "response", None))
        finally:
            await upstream.close()

    async def aembed(self, request: EmbedRequest) -> list[list[float]]:
        raise LLMBadRequestError(EMBEDDINGS_HINT, **request.context())

    def list_models(self) -> list[str]:
        return sorted(model.id for model in self._connector().client().models.list())

    @sdk_errors  # the URL it was sent to; a chain without secrets
    def map_error(self, exc: BaseException, context: dict[str, Any]) -> LLMError:
        if isinstance(exc, IncompleteStreamError):
            return LLMResponseError(str(exc), **context)
        if isinstance(exc, anthropic.APITimeoutError):
            return LLMTimeoutError("Anthropic did not answer in time", **context)
        if isinstance(exc, anthropic.APIConnectionError):
            return LLMConnectionError("Anthropic could not be reached", **context)
        if isinstance(exc, anthropic.APIStatusError):
            kind = str(exc.type) if exc.type else None
            status = exc.status_code
            if status < 400:  # an error event inside a stream that began with 200
                status = ERROR_TYPE_STATUS.get(kind or "", 500)
            message = str(exc.api_message or exc.message or f"HTTP {status}")
            # 529 overloaded_error is a 5xx: LLMServerError, like 500 api_error.
            cls = refine_bad_request(error_for_status(status), kind, message)
            return cls(
                f"HTTP {status}{f' {kind}' if kind else ''}: {message}",
                status_code=status,
                retry_after=retry_after_from_headers(exc.response.headers),
                **context,
            )
        if isinstance(exc, anthropic.APIResponseValidationError):
            return LLMResponseError("Anthropic sent a response that could not be read", **context)
        return LLMError(f"{type(exc).__name__}: {exc}", **context)
