"""Gemini through google-genai (the Developer API with a key, or Vertex AI).

Uses ``get_genai_client()`` (and its ``.aio`` side for the async calls), so
the client stays lazy, per app, per process and fork-safe. This module is
imported on the first call addressed to ``gemini/...``, never by ``app.llm``.

A call with a key of its own sends it in that request's ``x-goog-api-key``
header (google-genai's per-request ``HttpOptions.headers``, which replace the
client's own), through the same client and connection pool: no client is made
per key, so none needs bounding or closing. Vertex AI takes no API key, and
refuses one.

Translation: system messages become ``system_instruction``; user and
assistant messages become ``contents`` with the roles ``user`` and
``model``; assistant tool calls become ``function_call`` parts and tool
results ``function_response`` parts in a ``user`` content (Gemini wants the
function's name, taken from the message or from the call it answers).

Thought signatures: Gemini 3 models reject a history whose function calls lack
the ``thought_signature`` the model sent with them. :class:`ToolCall` has no
field for it, so the adapter remembers the signatures of the calls it returned
(bounded, keyed by call id, name and arguments) and sends them back with
those calls; for a call it never saw (another provider's history) and a
``gemini-3`` model it sends Google's documented "skip validation" signature.

Closing a stream early closes the HTTP response: for the sync stream by
closing the SDK's generator; for the async one the adapter also closes the
response itself, as google-genai keeps it in a reference cycle that only the
garbage collector would break (see :func:`_sdk_http_responses`).
"""

from __future__ import annotations

import json
import mimetypes
import sys
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from google.genai import errors as genai_errors
from google.genai import types

from app.llm.errors import (
    IncompleteStreamError,
    LLMAuthError,
    LLMBadRequestError,
    LLMConnectionError,
    LLMError,
    LLMNotFoundError,
    LLMPermissionError,
    LLMRateLimitError,
    LLMResponseError,
    LLMServerError,
    LLMTimeoutError,
    error_for_status,
    refine_bad_request,
    retry_after_from_google_details,
    retry_after_from_headers,
    sdk_errors,
)
from app.llm.providers.base import (
    ChatRequest,
    EmbedRequest,
    Provider,
    StreamEnd,
    StreamEvent,
    TextDelta,
    ToolCallDelta,
    is_json_mode,
)
from app.llm.structured import json_schema
from app.llm.types import (
    ChatResponse,
    FinishReason,
    ImagePart,
    Message,
    TextPart,
    ToolCall,
    system_text,
)
from app.services.genai_service import get_genai_client

FINISH_REASONS: dict[str, FinishReason] = {
    "STOP": "stop",
    "MAX_TOKENS": "length",
    **dict.fromkeys(
        (
            "SAFETY",
            "RECITATION",
            "BLOCKLIST",
            "PROHIBITED_CONTENT",
            "SPII",
            "IMAGE_SAFETY",
            "IMAGE_PROHIBITED_CONTENT",
            "IMAGE_RECITATION",
            "MODEL_ARMOR",
        ),
        "content_filter",
    ),
}

#: google.rpc status names that say more than the HTTP status.
STATUS_ERRORS: dict[str, type[LLMError]] = {
    "UNAUTHENTICATED": LLMAuthError,
    "PERMISSION_DENIED": LLMPermissionError,
    "NOT_FOUND": LLMNotFoundError,
    "RESOURCE_EXHAUSTED": LLMRateLimitError,
    "DEADLINE_EXCEEDED": LLMTimeoutError,
    "UNAVAILABLE": LLMServerError,
    "INTERNAL": LLMServerError,
}

#: ErrorInfo reasons of a 400 that is really an authentication failure.
AUTH_REASONS = frozenset({"API_KEY_INVALID", "API_KEY_EXPIRED", "API_KEY_NOT_FOUND"})

#: Google's documented signature for function calls Gemini 3 did not produce itself.
SKIP_SIGNATURE = b"skip_thought_signature_validator"
DEFAULT_IMAGE_MIME = "image/jpeg"


# --- requests ------------------------------------------------------------------


class ThoughtSignatures:
    """The thought signatures of recent function calls, to send back with them."""

    def __init__(self, size: int = 1024) -> None:
        self.size = size
        self._items: OrderedDict[tuple[str, str, str], bytes] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _key(call_id: str, name: str, arguments: Mapping[str, Any]) -> tuple[str, str, str]:
        return call_id, name, json.dumps(arguments, sort_keys=True, default=str)

    def remember(self, call: ToolCall, signature: bytes) -> None:
        key = self._key(call.id, call.name, call.arguments)
        with self._lock:
            self._items[key] = signature
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def get(self, call: ToolCall) -> bytes | None:
        with self._lock:
            return self._items.get(self._key(call.id, call.name, call.arguments))


def guess_mime_type(url: str) -> str:
    mime, _ = mimetypes.guess_type(urlsplit(url).path)
    return mime or DEFAULT_IMAGE_MIME


def image_part(part: ImagePart, context: dict[str, Any]) -> types.Part:
    inline = part.as_bytes()
    if inline is not None:
        data, mime = inline
        return types.Part.from_bytes(data=data, mime_type=mime)
    url = part.url or ""
    if url.startswith("data:"):
        raise LLMBadRequestError("an image data: URL must be base64 (data:<mime>;base64,...)", **context)
    return types.Part.from_uri(file_uri=url, mime_type=guess_mime_type(url))


def content_parts(message: Message, context: dict[str, Any]) -> list[types.Part]:
    parts: list[types.Part] = []
    for part in message.parts:
        if isinstance(part, TextPart):
            if part.text or (len(message.parts) == 1 and not message.tool_calls):
                parts.append(types.Part(text=part.text))
        else:
            parts.append(image_part(part, context))
    return parts


def function_response(text: str) -> dict[str, Any]:
    """A tool result as Gemini's ``response`` object: JSON object text as is, else ``{"result": text}``."""
    try:
        value = json.loads(text)
    except ValueError:
        return {"result": text}
    return value if isinstance(value, dict) else {"result": text}


def translate_messages(
    messages: Sequence[Message],
    context: dict[str, Any],
    signatures: ThoughtSignatures | None = None,
    *,
    skip_missing_signatures: bool = False,
) -> list[types.Content]:
    """Everything but the system messages, as Gemini ``contents``."""
    contents: list[types.Content] = []
    names: dict[str, str] = {}  # tool call id -> function name, latest call wins
    results: list[types.Part] = []

    def flush_results() -> None:
        if results:
            contents.append(types.Content(role="user", parts=list(results)))
            results.clear()

    for message in messages:
        if message.role == "system":
            continue
        if message.role == "tool":
            call_id = message.tool_call_id or ""
            name = message.name or names.get(call_id)
            if not name:
                raise LLMBadRequestError(
                    f"the tool result for call {call_id!r} needs a name: give the message a 'name',"
                    " or keep the assistant message with that tool call before it",
                    **context,
                )
            results.append(
                types.Part(
                    function_response=types.FunctionResponse(
                        id=call_id or None, name=name, response=function_response(message.text)
                    )
                )
            )
            continue
        flush_results()
        parts = content_parts(message, context)
        if message.role == "assistant":
            signed = False
            for call in message.tool_calls:
                names[call.id] = call.name
                signature = signatures.get(call) if signatures is not None else None
                signed = signed or signature is not None
                parts.append(
                    types.Part(
                        function_call=types.FunctionCall(
                            id=call.id, name=call.name, args=dict(call.arguments)
                        ),
                        thought_signature=signature,
                    )
                )
            if message.tool_calls and skip_missing_signatures and not signed:
                first = next(p for p in parts if p.function_call is not None)
                first.thought_signature = SKIP_SIGNATURE
            contents.append(types.Content(role="model", parts=parts))
        else:
            contents.append(types.Content(role="user", parts=parts))
    flush_results()
    if not contents:
        raise LLMBadRequestError(
            "Gemini needs at least one user message besides the system prompt", **context
        )
    return contents


def tool_config(request: ChatRequest) -> types.ToolConfig | None:
    choice = request.tool_choice
    if choice is None:
        return None
    if choice.mode == "tool":
        calling = types.FunctionCallingConfig(
            mode=types.FunctionCallingConfigMode.ANY, allowed_function_names=[choice.name or ""]
        )
    else:
        mode = {"auto": "AUTO", "none": "NONE", "required": "ANY"}[choice.mode]
        calling = types.FunctionCallingConfig(mode=types.FunctionCallingConfigMode(mode))
    return types.ToolConfig(function_calling_config=calling)


#: Request fields -> the GenerateContentConfig fields (``generationConfig`` on the wire) they fill.
SAMPLING = {
    "temperature": "temperature",
    "max_tokens": "max_output_tokens",
    "top_p": "top_p",
    "top_k": "top_k",
    "seed": "seed",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
}
#: Gemini's ``seed`` is an int32.
INT32 = 2**31


def check_request(request: ChatRequest) -> None:
    """What Gemini cannot take, refused by name before anything is sent."""
    if request.seed is not None and not -INT32 <= request.seed < INT32:
        raise LLMBadRequestError("Gemini takes a 32-bit seed (-2**31 to 2**31 - 1)", field="seed")
    if request.reasoning_effort is not None and request.thinking_budget is not None:
        raise LLMBadRequestError(
            "Gemini takes reasoning_effort (thinkingLevel) or thinking_budget, not both",
            field="thinking_budget",
        )
    for index, (category, threshold) in enumerate(request.safety or ()):
        if category not in types.HarmCategory.__members__:
            known = ", ".join(types.HarmCategory.__members__)
            raise LLMBadRequestError(
                f"unknown Gemini safety category {category!r}; known: {known}",
                field=f"safety[{index}].category",
            )
        if threshold not in types.HarmBlockThreshold.__members__:
            known = ", ".join(types.HarmBlockThreshold.__members__)
            raise LLMBadRequestError(
                f"unknown Gemini safety threshold {threshold!r}; known: {known}",
                field=f"safety[{index}].threshold",
            )


#: The header that carries a Gemini API key (google-genai's own, replaced per request).
KEY_HEADER = "x-goog-api-key"


def key_options(request: ChatRequest | EmbedRequest) -> types.HttpOptions | None:
    """The call's own key in this request's headers, replacing the client's key."""
    if request.api_key is None:
        return None
    return types.HttpOptions(headers={KEY_HEADER: request.api_key.reveal()})


def http_options(request: ChatRequest) -> types.HttpOptions | None:
    """This attempt's shorter timeout, ``extra`` merged into the body (google-genai's ``extra_body``),
    and the call's own key."""
    options = key_options(request)
    if request.extra:
        options = options or types.HttpOptions()
        options.extra_body = request.extra
    if request.timeout is not None:
        from app.connectors.genai_connector import current_genai_connector

        if request.timeout < current_genai_connector().settings.timeout:
            # A shorter timeout for this attempt: the call's deadline leaves less than GENAI_TIMEOUT.
            options = options or types.HttpOptions()
            options.timeout = max(1, round(request.timeout * 1000))
    return options


def generate_config(request: ChatRequest) -> types.GenerateContentConfig:
    config = types.GenerateContentConfig(
        # The tools are declarations for the caller to run, never Python callables.
        automatic_function_calling=types.AutomaticFunctionCallingConfig(disable=True),
    )
    config.http_options = http_options(request)
    system = system_text(request.messages)
    if system:
        config.system_instruction = system
    for name, setting in SAMPLING.items():
        value = getattr(request, name)
        if value is not None:
            setattr(config, setting, value)
    if request.stop is not None:
        config.stop_sequences = list(request.stop)
    if request.thinking_budget is not None or request.reasoning_effort is not None:
        config.thinking_config = types.ThinkingConfig(
            thinking_budget=request.thinking_budget,
            thinking_level=types.ThinkingLevel(request.reasoning_effort.upper())
            if request.reasoning_effort is not None
            else None,
        )
    if request.safety is not None:
        config.safety_settings = [
            types.SafetySetting(
                category=types.HarmCategory(category), threshold=types.HarmBlockThreshold(threshold)
            )
            for category, threshold in request.safety
        ]
    if request.tools:
        config.tools = [
            types.Tool(
                function_declarations=[
                    types.FunctionDeclaration(
                        name=tool.name,
                        description=tool.description or None,
                        parameters_json_schema=tool.parameters,
                    )
                    for tool in request.tools
                ]
            )
        ]
    config.tool_config = tool_config(request)
    if is_json_mode(request.response_format):
        config.response_mime_type = "application/json"  # JSON mode: any JSON, no schema
    elif request.response_format is not None:
        config.response_mime_type = "application/json"
        config.response_json_schema = json_schema(request.response_format)
    return config


# --- responses -----------------------------------------------------------------


def _enum_name(value: Any) -> str | None:
    if value is None:
        return None
    return str(getattr(value, "value", value))


def finish_reason(reason: Any) -> FinishReason | None:
    name = _enum_name(reason)
    return FINISH_REASONS.get(name) if name else None


def usage(metadata: Any) -> tuple[int | None, int | None, int | None]:
    """(input, output, total) tokens; output counts the thinking tokens, as they are billed so."""
    if metadata is None:
        return None, None, None
    output = metadata.candidates_token_count
    if metadata.thoughts_token_count:
        output = (output or 0) + metadata.thoughts_token_count
    return metadata.prompt_token_count, output, metadata.total_token_count


def usage_detail(metadata: Any) -> tuple[int | None, int | None]:
    """(reasoning, cached input) tokens: ``thoughtsTokenCount``, ``cachedContentTokenCount``."""
    if metadata is None:
        return None, None
    return metadata.thoughts_token_count, metadata.cached_content_token_count


def _blocked(response: Any) -> bool:
    feedback = getattr(response, "prompt_feedback", None)
    return feedback is not None and feedback.block_reason is not None


class _Reader:
    """Reads answers (whole or chunk by chunk) into text, tool calls, finish and usage."""

    def __init__(self, provider: GeminiProvider, request: ChatRequest) -> None:
        self.provider = provider
        self.request = request
        self.context = request.context()
        self.calls: list[ToolCall] = []
        self.finish: FinishReason | None = None
        self.blocked = False
        self.usage: tuple[int | None, int | None, int | None] = (None, None, None)
        self.detail: tuple[int | None, int | None] = (None, None)
        self.model: str | None = None
        self.response_id: str | None = None

    def read(self, response: Any) -> tuple[list[str], list[ToolCall]]:
        """Text and tool calls of one response or chunk; records the rest."""
        texts: list[str] = []
        new_calls: list[ToolCall] = []
        candidate = response.candidates[0] if response.candidates else None
        content = candidate.content if candidate is not None else None
        for part in (content.parts if content is not None else None) or ():
            if part.function_call is not None:
                call = self._tool_call(part)
                self.calls.append(call)
                new_calls.append(call)
            elif part.text and not part.thought:
                texts.append(part.text)
        if candidate is not None and candidate.finish_reason is not None:
            self.finish = finish_reason(candidate.finish_reason)
        self.blocked = self.blocked or _blocked(response)
        if response.usage_metadata is not None:
            self.usage = usage(response.usage_metadata)
            self.detail = usage_detail(response.usage_metadata)
        self.model = response.model_version or self.model
        self.response_id = response.response_id or self.response_id
        return texts, new_calls

    def _tool_call(self, part: Any) -> ToolCall:
        call = part.function_call
        name = call.name or ""
        args = call.args if call.args is not None else {}
        if not isinstance(args, dict):
            raise LLMResponseError(
                f"the model sent arguments for tool {name!r} that are not a JSON object",
                raw_text=json.dumps(args, default=str),
                **self.context,
            )
        tool_call = ToolCall(id=call.id or f"call_{len(self.calls)}", name=name, arguments=args)
        if part.thought_signature:
            self.provider.signatures.remember(tool_call, part.thought_signature)
        return tool_call

    def finish_reason(self) -> FinishReason | None:
        if self.calls:
            return "tool_calls"
        if self.blocked:
            return "content_filter"
        return self.finish

    def response(self, texts: list[str], raw: Any) -> ChatResponse:
        input_tokens, output_tokens, total_tokens = self.usage
        reasoning, cached = self.detail
        return ChatResponse(
            content="".join(texts) or None,
            model=self.model or self.request.model,
            provider=self.request.provider,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            total_tokens=total_tokens,
            finish_reason=self.finish_reason(),
            tool_calls=list(self.calls),
            raw=raw,
            reasoning_tokens=reasoning,
            cached_input_tokens=cached,
            response_id=self.response_id,
        )

    def events(self, chunk: Any) -> Iterator[StreamEvent]:
        before = len(self.calls)
        texts, calls = self.read(chunk)
        for text in texts:
            yield TextDelta(text)
        for index, call in enumerate(calls, start=before):
            yield ToolCallDelta(index=index, id=call.id, name=call.name, arguments=json.dumps(call.arguments))

    def end(self) -> StreamEnd:
        input_tokens, output_tokens, total_tokens = self.usage
        reasoning, cached = self.detail
        return StreamEnd(
            finish_reason=self.finish_reason(),
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            total_tokens=total_tokens,
            model=self.model,
            reasoning_tokens=reasoning,
            cached_input_tokens=cached,
            response_id=self.response_id,
        )


def _finishes(chunk: Any) -> bool:
    """Whether a stream chunk ends the answer: a candidate's finish reason, or a blocked prompt.

    Gemini's stream has no end event: its last chunk is the one with a finish reason.
    """
    return any(c.finish_reason is not None for c in chunk.candidates or ()) or _blocked(chunk)


async def _failing(exc: BaseException) -> AsyncIterator[StreamEvent]:
    """An async stream that raises ``exc`` when read (astream itself must not raise)."""
    raise exc
    yield  # pragma: no cover - makes this an async generator


# --- the adapter -----------------------------------------------------------------


class GeminiProvider(Provider):
    family = "Gemini"  # takes every generation parameter of the layer
    takes_api_key = True  # not on Vertex AI: check_api_key refuses it there

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.signatures = ThoughtSignatures()

    def check(self, request: ChatRequest) -> None:
        super().check(request)
        check_request(request)

    def check_api_key(self, request: ChatRequest | EmbedRequest) -> None:
        from app.connectors.genai_connector import current_genai_connector

        if current_genai_connector().settings.vertexai:
            raise LLMBadRequestError(
                "Gemini here is Vertex AI (GOOGLE_GENAI_USE_VERTEXAI), which authenticates with"
                " Google Cloud credentials and takes no per-call api_key",
                field="api_key",
            )

    @staticmethod
    def _genai(request: ChatRequest | EmbedRequest) -> Any:
        """The client for this call: the app's, or the one that sends per-call keys."""
        if request.api_key is None:
            return get_genai_client()
        from app.connectors.genai_connector import current_genai_connector

        return current_genai_connector().keyed_client()

    def _build(self, request: ChatRequest) -> tuple[list[types.Content], types.GenerateContentConfig]:
        contents = translate_messages(
            request.messages,
            request.context(),
            self.signatures,
            skip_missing_signatures=request.model.removeprefix("models/").startswith("gemini-3"),
        )
        return contents, generate_config(request)

    def _response(self, request: ChatRequest, response: Any) -> ChatResponse:
        reader = _Reader(self, request)
        texts, _calls = reader.read(response)
        return reader.response(texts, response)

    # --- chat --------------------------------------------------------------------

    def chat(self, request: ChatRequest) -> ChatResponse:
        contents, config = self._build(request)
        response = self._genai(request).models.generate_content(
            model=request.model,
            contents=contents,
            config=config,
        )
        return self._response(request, response)

    async def achat(self, request: ChatRequest) -> ChatResponse:
        contents, config = self._build(request)
        response = await self._genai(request).aio.models.generate_content(
            model=request.model,
            contents=contents,
            config=config,
        )
        return self._response(request, response)

    # --- streams -----------------------------------------------------------------

    def stream(self, request: ChatRequest) -> Iterator[StreamEvent]:
        client = self._genai(request)
        contents, config = self._build(request)
        # A generator: nothing is sent before the first read.
        upstream = client.models.generate_content_stream(
            model=request.model,
            contents=contents,
            config=config,
        )
        return self._stream(request, upstream)

    def _stream(self, request: ChatRequest, upstream: Iterator[Any]) -> Iterator[StreamEvent]:
        reader = _Reader(self, request)
        ended = False
        try:
            for chunk in upstream:
                ended = ended or _finishes(chunk)
                yield from reader.events(chunk)
            if not ended:
                raise IncompleteStreamError("a finish reason")
            yield reader.end()
        finally:
            # Closing the SDK's generator finalises the generators inside it down to
            # httpx2's Response.iter_raw, whose ``finally`` closes the HTTP response.
            close = getattr(upstream, "close", None)
            if close is not None:
                close()

    def astream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        try:
            client = self._genai(request)
            contents, config = self._build(request)
        except Exception as exc:
            return _failing(exc)
        return self._astream(request, client, contents, config)

    async def _astream(
        self, request: ChatRequest, client: Any, contents: list[types.Content], config: Any
    ) -> AsyncIterator[StreamEvent]:
        reader = _Reader(self, request)
        upstream = await client.aio.models.generate_content_stream(
            model=request.model, contents=contents, config=config
        )
        ended = False
        try:
            async for chunk in upstream:
                ended = ended or _finishes(chunk)
                for event in reader.events(chunk):
                    yield event
            if not ended:
                raise IncompleteStreamError("a finish reason")
            yield reader.end()
        finally:
            # Found before aclose() clears the generators' frames; see _sdk_http_responses.
            responses = _sdk_http_responses(upstream)
            aclose = getattr(upstream, "aclose", None)
            if aclose is not None:
                await aclose()
            for response in responses:
                await _close_sdk_http_response(response)

    # --- embeddings and models ---------------------------------------------------

    @staticmethod
    def _embed_contents(request: EmbedRequest) -> list[types.Content]:
        # One Content per input: a list of plain strings would be merged into one
        # content (one vector) for the multimodal embedding models.
        return [types.Content(parts=[types.Part(text=text)]) for text in request.inputs]

    @staticmethod
    def _vectors(request: EmbedRequest, result: Any) -> list[list[float]]:
        embeddings = result.embeddings or []
        if len(embeddings) != len(request.inputs):
            raise LLMResponseError(
                f"asked for {len(request.inputs)} embeddings, got {len(embeddings)}", **request.context()
            )
        return [list(embedding.values or ()) for embedding in embeddings]

    @staticmethod
    def _embed_config(request: EmbedRequest) -> dict[str, Any]:
        options = key_options(request)
        return {"config": types.EmbedContentConfig(http_options=options)} if options is not None else {}

    def embed(self, request: EmbedRequest) -> list[list[float]]:
        result = self._genai(request).models.embed_content(
            model=request.model,
            contents=self._embed_contents(request),
            **self._embed_config(request),
        )
        return self._vectors(request, result)

    async def aembed(self, request: EmbedRequest) -> list[list[float]]:
        result = await self._genai(request).aio.models.embed_content(
            model=request.model,
            contents=self._embed_contents(request),
            **self._embed_config(request),
        )
        return self._vectors(request, result)

    def list_models(self) -> list[str]:
        return sorted(
            model.name.removeprefix("models/") for model in get_genai_client().models.list() if model.name
        )

    # --- errors ------------------------------------------------------------------

    @sdk_errors  # the URL it was sent to; a chain without secrets
    def map_error(self, exc: BaseException, context: dict[str, Any]) -> LLMError:
        if isinstance(exc, IncompleteStreamError):
            return LLMResponseError(str(exc), **context)
        if isinstance(exc, genai_errors.APIError):
            return self._api_error(exc, context)
        timeouts, transport = _httpx_errors()
        if isinstance(exc, timeouts):
            return LLMTimeoutError("Gemini did not answer in time", **context)
        if isinstance(exc, transport):
            return LLMConnectionError(f"Gemini could not be reached ({type(exc).__name__})", **context)
        if isinstance(exc, genai_errors.UnknownApiResponseError):
            return LLMResponseError("Gemini sent a response that is not JSON", **context)
        return LLMError(f"{type(exc).__name__}: {exc}", **context)

    @staticmethod
    def _api_error(exc: genai_errors.APIError, context: dict[str, Any]) -> LLMError:
        code = exc.code if isinstance(exc.code, int) else None
        status = exc.status if isinstance(exc.status, str) else None
        message = str(exc.message or "") or "no message"
        cls = STATUS_ERRORS.get(status or "") or error_for_status(code)
        if cls is LLMBadRequestError and AUTH_REASONS & _error_reasons(exc.details):
            cls = LLMAuthError
        cls = refine_bad_request(cls, status, message)
        retry_after = retry_after_from_google_details(exc.details)
        if retry_after is None:
            headers = getattr(getattr(exc, "response", None), "headers", None)
            retry_after = retry_after_from_headers(headers if isinstance(headers, Mapping) else None)
        where = " ".join(str(p) for p in (code, status) if p)
        return cls(
            f"Gemini API error {where}: {message}" if where else f"Gemini API error: {message}",
            status_code=code,
            retry_after=retry_after,
            **context,
        )


def _sdk_http_responses(stream: Any, limit: int = 64) -> list[Any]:
    """The SDK's ``HttpResponse`` objects held by a suspended async stream's generators.

    google-genai's async stream keeps its HTTP response in a reference cycle
    (``HttpResponse.segment_iterator`` is a generator whose frame holds the
    ``HttpResponse``), so closing the stream it returns leaves the connection
    open until the cyclic garbage collector runs. The adapter finds those
    objects by walking the generators' frames (duck-typed: anything whose
    ``response_stream`` is an httpx2 response) and closes them itself. Should
    a later SDK hold them elsewhere, nothing is found and nothing breaks.
    """
    response_types = _httpx_response_types()
    found: list[Any] = []
    seen: set[int] = set()
    queue = [stream]
    while queue and len(seen) < limit:
        item = queue.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(getattr(item, "response_stream", None), response_types):
            found.append(item)
            continue
        frame = getattr(item, "ag_frame", None) or getattr(item, "gi_frame", None)
        if frame is not None:
            queue.extend(frame.f_locals.values())
    return found


async def _close_sdk_http_response(response: Any) -> None:
    try:
        await response.response_stream.aclose()  # the HTTP response: the connection closes now
    finally:
        segments = getattr(response, "segment_iterator", None)
        if segments is not None:
            await segments.aclose()  # and the generators reading it finalise in order


def _httpx_response_types() -> tuple[type[Any], ...]:
    import httpx2

    httpx = sys.modules.get("httpx")
    return (httpx2.Response, httpx.Response) if httpx is not None else (httpx2.Response,)


def _error_reasons(body: Any) -> set[str]:
    """The ``reason`` of every ``google.rpc.ErrorInfo`` in an error body."""
    error = body.get("error", body) if isinstance(body, Mapping) else None
    details = error.get("details") if isinstance(error, Mapping) else None
    return {
        str(detail.get("reason"))
        for detail in details or ()
        if isinstance(detail, Mapping) and str(detail.get("@type", "")).endswith("google.rpc.ErrorInfo")
    }


def _httpx_errors() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    """(timeout classes, transport error classes) of httpx2, and of httpx when it is loaded."""
    import httpx2

    timeouts: list[type[BaseException]] = [httpx2.TimeoutException]
    transport: list[type[BaseException]] = [httpx2.TransportError]
    httpx = sys.modules.get("httpx")
    if httpx is not None:
        timeouts.append(httpx.TimeoutException)
        transport.append(httpx.TransportError)
    return tuple(timeouts), tuple(transport)
