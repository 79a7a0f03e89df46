"""OpenAI and every OpenAI-compatible endpoint (one adapter, one profile each).

Uses the app's OpenAI connector, the one behind ``get_openai_client(profile)``
and ``get_async_openai_client(profile)``, so clients stay lazy, per app, per
process and fork-safe. OpenAI itself (the
``default`` profile and Azure) takes ``max_completion_tokens``; other
compatible servers (Ollama, vLLM, Groq, OpenRouter) are sent the older and
more widely accepted ``max_tokens``. A call with a key of its own goes through
a copy of the profile's client that sends that key over the same pool
(``with_options(api_key=...)``, kept per key by :class:`PerKeyClients`).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Generator, Iterator
from typing import Any

import openai

from app.connectors.openai_connector import OpenAIConnector, current_openai_connector
from app.llm.errors import (
    IncompleteStreamError,
    LLMBadRequestError,
    LLMConnectionError,
    LLMError,
    LLMRateLimitError,
    LLMResponseError,
    LLMServerError,
    LLMTimeoutError,
    MalformedChunkError,
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
    tool_call_from_json,
    with_key,
)
from app.llm.providers.sse_reader import ServerSentEvent, aiter_events, iter_events
from app.llm.structured import schema_name, strict_json_schema
from app.llm.types import ChatResponse, FinishReason, ImagePart, Message, TextPart

#: What a streamed request adds to the body: the last chunk then carries the usage.
STREAMED: dict[str, Any] = {"stream": True, "stream_options": {"include_usage": True}}

FINISH_REASONS: dict[str, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",
    "content_filter": "content_filter",
}


def usage_details(usage: Any) -> tuple[int | None, int | None]:
    """(reasoning, cached input) tokens: ``completion_tokens_details.reasoning_tokens`` and
    ``prompt_tokens_details.cached_tokens``, both already counted in the totals."""
    if usage is None:
        return None, None
    completion = getattr(usage, "completion_tokens_details", None)
    prompt = getattr(usage, "prompt_tokens_details", None)
    return (
        getattr(completion, "reasoning_tokens", None) if completion is not None else None,
        getattr(prompt, "cached_tokens", None) if prompt is not None else None,
    )


def translate_message(message: Message) -> dict[str, Any]:
    """One message in the Chat Completions form."""
    parts = message.parts
    if len(parts) == 1 and type(parts[0]) is TextPart and message.role in ("system", "user"):
        return {"role": message.role, "content": parts[0].text}  # the usual message, at once
    if message.role == "tool":
        return {"role": "tool", "tool_call_id": message.tool_call_id, "content": message.text}
    if message.role == "system":
        return {"role": "system", "content": message.text}
    if message.role == "assistant":
        translated: dict[str, Any] = {"role": "assistant", "content": message.text or None}
        if message.tool_calls:
            translated["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": json.dumps(call.arguments)},
                }
                for call in message.tool_calls
            ]
        return translated
    if all(isinstance(part, TextPart) for part in message.parts):
        return {"role": "user", "content": message.text}
    content: list[dict[str, Any]] = []
    for part in message.parts:
        if isinstance(part, TextPart):
            content.append({"type": "text", "text": part.text})
        elif isinstance(part, ImagePart):
            content.append({"type": "image_url", "image_url": {"url": part.as_data_url()}})
    return {"role": "user", "content": content}


#: OpenAI's own limit on stop sequences (compatible servers may take more).
OPENAI_MAX_STOP = 4
#: Request fields sent as they are, under their own name.
SAME_NAME = (
    "temperature",
    "top_p",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "reasoning_effort",
    "user",
)


class OpenAIProvider(Provider):
    #: Chat Completions has no top_k, thinking budget or safety settings; send a server's
    #: own form of them (vLLM's ``top_k``, say) in ``extra``.
    unsupported_parameters = frozenset({"top_k", "thinking_budget", "safety"})
    family = "OpenAI-compatible"
    takes_api_key = True

    def __init__(self, name: str, profile: str) -> None:
        super().__init__(name)
        self.profile = profile
        self._without_retries = WithoutRetries()  # the layer retries, not the SDK
        #: Copies of the clients above that send a per-call key (``api_key=``).
        self._per_key = PerKeyClients(with_key)
        #: The app's OpenAI connector, found on first use: an adapter serves one app's LLM
        #: layer, and the connector object lives as long as the app (reset and reconfigure
        #: change what it holds, not which one it is).
        self._connector: OpenAIConnector | None = None

    def _openai(self) -> OpenAIConnector:
        connector = self._connector
        if connector is None:
            connector = self._connector = current_openai_connector()
        return connector

    def _client(self, request: ChatRequest | EmbedRequest) -> tuple[Any, dict[str, Any]]:
        """The profile's client without SDK retries, and the options for this attempt.

        The options carry a shorter timeout for this attempt when the call's
        deadline leaves less than the client's own. One connector lookup serves both.
        """
        connector = self._openai()
        if request.api_key is None:
            client = self._without_retries(connector.client(self.profile))
        else:
            base = self._without_retries(connector.keyed_client(self.profile))
            client = self._per_key.get(base, request.api_key)
        return client, self._timeout(connector, request)

    def _aclient(self, request: ChatRequest | EmbedRequest) -> tuple[Any, dict[str, Any]]:
        connector = self._openai()
        if request.api_key is None:
            client = self._without_retries(connector.async_client(self.profile))
        else:
            base = self._without_retries(connector.keyed_async_client(self.profile))
            client = self._per_key.get(base, request.api_key)
        return client, self._timeout(connector, request)

    def _timeout(self, connector: OpenAIConnector, request: ChatRequest | EmbedRequest) -> dict[str, Any]:
        if request.timeout is None or request.timeout >= connector.profile(self.profile).timeout:
            return {}
        return {"timeout": request.timeout}

    # Chat completions are posted with the client's documented ``post`` rather than
    # ``chat.completions.create``: create() only adds a walk of the body against the
    # SDK's TypedDict annotations (``maybe_transform``), which costs more client CPU per
    # call than the network round trip to a local server (about 0.3 ms for two short
    # messages) and changes nothing in a body of plain JSON values, which _params builds
    # and the tests check against the official spec. Everything else is the SDK's own,
    # as create() uses it: the same client, auth, headers and URL (Azure deployment
    # routing included), timeouts, typed errors and ChatCompletion parsing.

    @staticmethod
    def _post_options(options: dict[str, Any]) -> dict[str, Any]:
        """create()'s request options: the bearer key only, and this attempt's timeout if any."""
        return {"security": {"bearer_auth": True}, **options}

    def _create(self, client: Any, params: dict[str, Any], options: dict[str, Any]) -> Any:
        from openai.types.chat import ChatCompletion

        return client.post(
            "/chat/completions", body=params, cast_to=ChatCompletion, options=self._post_options(options)
        )

    def _create_stream(self, client: Any, params: dict[str, Any], options: dict[str, Any]) -> Any:
        """The streamed answer's HTTP response, unread (``cast_to=httpx2.Response``: the SDK's own
        raw response, its errors and retries unchanged), read by :class:`_ChunkReader`."""
        import httpx2

        return client.post(
            "/chat/completions",
            body={**params, **STREAMED},
            cast_to=httpx2.Response,
            options=self._post_options(options),
            stream=True,
        )

    async def _acreate(self, client: Any, params: dict[str, Any], options: dict[str, Any]) -> Any:
        from openai.types.chat import ChatCompletion

        return await client.post(
            "/chat/completions", body=params, cast_to=ChatCompletion, options=self._post_options(options)
        )

    async def _acreate_stream(self, client: Any, params: dict[str, Any], options: dict[str, Any]) -> Any:
        import httpx2

        return await client.post(
            "/chat/completions",
            body={**params, **STREAMED},
            cast_to=httpx2.Response,
            options=self._post_options(options),
            stream=True,
        )

    # --- request ---------------------------------------------------------------

    def check(self, request: ChatRequest) -> None:
        super().check(request)
        if request.stop is not None and len(request.stop) > OPENAI_MAX_STOP and self._is_openai():
            raise LLMBadRequestError(f"OpenAI takes at most {OPENAI_MAX_STOP} stop sequences", field="stop")

    def _is_openai(self) -> bool:
        """OpenAI itself (the default profile, or Azure OpenAI) rather than a compatible server."""
        return self.profile == "default" or self._is_azure()

    def _params(self, request: ChatRequest) -> dict[str, Any]:
        params: dict[str, Any] = {
            "model": request.model,
            "messages": [translate_message(m) for m in request.messages],
        }
        for name in SAME_NAME:
            value = getattr(request, name)
            if value is not None:
                params[name] = value
        if request.max_tokens is not None:
            key = "max_completion_tokens" if self._is_openai() else "max_tokens"
            params[key] = request.max_tokens
        if request.stop is not None:
            params["stop"] = list(request.stop)
        if request.tools:
            params["tools"] = [
                {
                    "type": "function",
                    "function": {"name": t.name, "description": t.description, "parameters": t.parameters},
                }
                for t in request.tools
            ]
        choice = request.tool_choice
        if choice is not None and request.tools:  # OpenAI rejects tool_choice without tools
            params["tool_choice"] = (
                {"type": "function", "function": {"name": choice.name}}
                if choice.mode == "tool"
                else choice.mode
            )
        if is_json_mode(request.response_format):
            params["response_format"] = {"type": "json_object"}
        elif request.response_format is not None:
            params["response_format"] = {
                "type": "json_schema",
                "json_schema": {
                    "name": schema_name(request.response_format),
                    "schema": strict_json_schema(request.response_format),
                    "strict": True,
                },
            }
        if request.extra:
            merge_body(params, request.extra)
        return params

    def _is_azure(self) -> bool:
        return self._openai().profile(self.profile).is_azure

    # --- responses -------------------------------------------------------------

    def _response(self, request: ChatRequest, completion: Any) -> ChatResponse:
        context = request.context()
        if not getattr(completion, "choices", None):
            raise LLMResponseError("the provider sent a completion without choices", **context)
        choice = completion.choices[0]
        message = choice.message
        tool_calls = [
            tool_call_from_json(call.id, call.function.name, call.function.arguments, **context)
            for call in (message.tool_calls or [])
            if getattr(call, "function", None) is not None
        ]
        usage = completion.usage
        reasoning, cached = usage_details(usage)
        return ChatResponse(
            content=message.content,
            model=completion.model or request.model,
            provider=request.provider,
            input_tokens=usage.prompt_tokens if usage else None,
            output_tokens=usage.completion_tokens if usage else None,
            total_tokens=usage.total_tokens if usage else None,
            finish_reason=FINISH_REASONS.get(choice.finish_reason or ""),
            tool_calls=tool_calls,
            raw=completion,
            reasoning_tokens=reasoning,
            cached_input_tokens=cached,
            response_id=completion.id or None,
        )

    @staticmethod
    def _events(chunk: object) -> Iterator[StreamEvent]:
        """The events of one streamed chunk, read from its JSON as sent (see ``_create_stream``)."""
        if not isinstance(chunk, dict):
            what = f"{chunk!r:.60}"
            raise MalformedChunkError(f"the provider sent a stream chunk that is not an object: {what}")
        model = chunk.get("model")
        for choice in _objects(chunk.get("choices")):
            delta = choice.get("delta")
            if isinstance(delta, dict):
                content = delta.get("content")
                if content:
                    yield TextDelta(str(content))
                for call in _objects(delta.get("tool_calls")):
                    function = call.get("function")
                    function = function if isinstance(function, dict) else None
                    yield ToolCallDelta(
                        index=call.get("index") or 0,
                        id=call.get("id"),
                        name=function.get("name") if function else None,
                        arguments=(function.get("arguments") or "") if function else "",
                    )
            finish = choice.get("finish_reason")
            if finish:
                yield StreamEnd(finish_reason=FINISH_REASONS.get(finish), model=model)
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            completion = usage.get("completion_tokens_details")
            prompt = usage.get("prompt_tokens_details")
            yield StreamEnd(
                input_tokens=usage.get("prompt_tokens"),
                output_tokens=usage.get("completion_tokens"),
                total_tokens=usage.get("total_tokens"),
                model=model,
                reasoning_tokens=completion.get("reasoning_tokens") if isinstance(completion, dict) else None,
                cached_input_tokens=prompt.get("cached_tokens") if isinstance(prompt, dict) else None,
                response_id=chunk.get("id") or None,
            )

    # --- the calls -------------------------------------------------------------

    def chat(self, request: ChatRequest) -> ChatResponse:
        client, options = self._client(request)
        return self._response(request, self._create(client, self._params(request), options))

    def stream(self, request: ChatRequest) -> Iterator[StreamEvent]:
        client, options = self._client(request)
        response = self._create_stream(client, self._params(request), options)
        return _UpstreamEvents(response, self._stream(response))

    def _stream(self, response: Any) -> Generator[StreamEvent, None, None]:
        reader = _ChunkReader(response)
        try:
            for sse in iter_events(reader.body()):
                yield from reader.events(sse)
            reader.end()
        finally:
            response.close()  # after the body's end it goes back to the pool; before, it is closed

    def embed(self, request: EmbedRequest) -> list[list[float]]:
        client, options = self._client(request)
        result = client.embeddings.create(model=request.model, input=request.inputs, **options)
        return [item.embedding for item in sorted(result.data, key=lambda item: item.index)]

    async def achat(self, request: ChatRequest) -> ChatResponse:
        client, options = self._aclient(request)
        completion = await self._acreate(client, self._params(request), options)
        return self._response(request, completion)

    async def astream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        client, options = self._aclient(request)
        response = await self._acreate_stream(client, self._params(request), options)
        reader = _ChunkReader(response)
        try:
            async for sse in aiter_events(reader.abody()):
                for event in reader.events(sse):
                    yield event
            reader.end()
        finally:
            await response.aclose()

    async def aembed(self, request: EmbedRequest) -> list[list[float]]:
        client, options = self._aclient(request)
        result = await client.embeddings.create(model=request.model, input=request.inputs, **options)
        return [item.embedding for item in sorted(result.data, key=lambda item: item.index)]

    def list_models(self) -> list[str]:
        return sorted(model.id for model in self._openai().client(self.profile).models.list())

    # --- errors ----------------------------------------------------------------

    @sdk_errors  # the URL it was sent to; a chain without secrets
    def map_error(self, exc: BaseException, context: dict[str, Any]) -> LLMError:
        if isinstance(exc, IncompleteStreamError | MalformedChunkError):
            return LLMResponseError(str(exc), **context)
        if isinstance(exc, openai.APITimeoutError):
            return LLMTimeoutError("the provider did not answer in time", **context)
        if isinstance(exc, openai.APIConnectionError):
            return LLMConnectionError("the provider could not be reached", **context)
        if isinstance(exc, openai.APIStatusError):
            status = exc.status_code
            body = exc.body if isinstance(exc.body, dict) else {}
            error = body.get("error", body) if isinstance(body.get("error", body), dict) else {}
            code = error.get("code") or error.get("type")
            message = str(error.get("message") or exc.message or f"HTTP {status}")
            cls = refine_bad_request(error_for_status(status), str(code) if code else None, message)
            return cls(
                f"HTTP {status}: {message}",
                status_code=status,
                retry_after=retry_after_from_headers(exc.response.headers),
                **context,
            )
        if isinstance(exc, openai.APIResponseValidationError | json.JSONDecodeError):
            return LLMResponseError("the provider sent a response that could not be read", **context)
        if isinstance(exc, openai.APIError):  # an error event inside a stream (no HTTP status)
            body = exc.body if isinstance(exc.body, dict) else {}
            code = str(body.get("code") or body.get("type") or "")
            message = str(body.get("message") or exc.message or "the stream failed")
            return _stream_error_class(code, message)(f"error in the stream: {message}", **context)
        return LLMError(f"{type(exc).__name__}: {exc}", **context)


class _ChunkReader:
    """One streamed answer's events, written once for the sync and async readers.

    ``[DONE]`` is not the end of the reading: the body is read on to its end, as the
    Anthropic SDK reads its streams, so that the connection goes back to the pool (openai's
    sync ``Stream`` closes it at ``[DONE]``, which costs every later stream a new connection
    and, against a real provider, a TLS handshake). Servers end the body right after it; a
    transport error after it ends the reading, the answer being complete.
    """

    __slots__ = ("done", "finished", "response")

    def __init__(self, response: Any) -> None:
        self.response = response
        self.done = False  # [DONE] seen
        self.finished = False  # a chunk with a finish_reason seen: the answer's end marker

    def events(self, sse: ServerSentEvent) -> Iterator[StreamEvent]:
        if self.done:
            return iter(())
        if sse.data.startswith("[DONE]"):
            self.done = True
            return iter(())
        chunk = json.loads(sse.data)
        if isinstance(chunk, dict) and chunk.get("error"):  # an error event, raised as openai's Stream does
            error = chunk["error"]
            message = error.get("message") if isinstance(error, dict) else None
            text = message if isinstance(message, str) and message else "An error occurred during streaming"
            raise openai.APIError(text, request=self.response.request, body=error)
        self.finished = self.finished or _finishes(chunk)
        return OpenAIProvider._events(chunk)

    def end(self) -> None:
        if not self.finished:
            raise IncompleteStreamError("finish_reason", self.response)

    def body(self) -> Iterator[bytes]:
        try:
            yield from self.response.iter_bytes()
        except Exception as exc:
            self._transport_error(exc)

    async def abody(self) -> AsyncIterator[bytes]:
        try:
            async for piece in self.response.aiter_bytes():
                yield piece
        except Exception as exc:
            self._transport_error(exc)

    def _transport_error(self, exc: Exception) -> None:
        """An error reading the body: none after ``[DONE]``; the SDK's own typed error before it."""
        import httpx2

        if self.done and isinstance(exc, httpx2.HTTPError):
            return
        if isinstance(exc, httpx2.TimeoutException):
            raise openai.APITimeoutError(request=self.response.request) from exc
        if isinstance(exc, httpx2.RequestError):
            raise openai.APIConnectionError(request=self.response.request) from exc
        raise exc


def _finishes(chunk: object) -> bool:
    """Whether a stream chunk carries a finish reason: the end of the answer (usage may follow)."""
    return isinstance(chunk, dict) and any(
        choice.get("finish_reason") for choice in _objects(chunk.get("choices"))
    )


def _objects(value: object) -> list[dict[str, Any]]:
    """The JSON objects of a list in a chunk (``choices``, ``tool_calls``); anything else is none."""
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def _stream_error_class(code: str, message: str) -> type[LLMError]:
    """The class for an error event in a stream, by its code or type (``server_error`` mostly)."""
    if "rate_limit" in code or "quota" in code:
        return LLMRateLimitError
    refined = refine_bad_request(LLMBadRequestError, code, message)
    if refined is not LLMBadRequestError:
        return refined
    return LLMBadRequestError if "invalid_request" in code else LLMServerError


class _UpstreamEvents:
    """The events of one upstream stream; ``close()`` closes the HTTP response.

    A bare generator would not do: closing one that was never started skips its
    ``finally``, so a stream closed before its first read would keep the
    connection open.
    """

    def __init__(self, upstream: Any, events: Generator[StreamEvent, None, None]) -> None:
        self._upstream = upstream
        self._events = events

    def __iter__(self) -> _UpstreamEvents:
        return self

    def __next__(self) -> StreamEvent:
        return next(self._events)

    def close(self) -> None:
        try:
            self._events.close()
        finally:
            self._upstream.close()
