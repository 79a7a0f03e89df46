"""The contract every provider adapter fulfils, and the request it receives.

An adapter translates a :class:`ChatRequest` into its SDK's call and the
SDK's answer into a :class:`ChatResponse` or a stream of
:data:`StreamEvent` values, and maps the SDK's exceptions to
:class:`LLMError` subclasses in :meth:`Provider.map_error`. It does no
retries, caching or accounting: those wrap every provider alike, above it.
"""

from __future__ import annotations

import copy
import json
import weakref
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from app.llm.errors import LLMBadRequestError, LLMError, LLMResponseError
from app.llm.tools import ToolChoice, ToolSpec
from app.llm.types import ChatResponse, FinishReason, Message, ToolCall

#: ``reasoning_effort`` values: how much a reasoning model thinks before it answers.
ReasoningEffort = Literal["minimal", "low", "medium", "high"]
REASONING_EFFORTS: tuple[str, ...] = ("minimal", "low", "medium", "high")

#: The generation parameters of a :class:`ChatRequest` that a provider may be unable to send.
#: An adapter lists the ones it cannot take in :attr:`Provider.unsupported_parameters`.
GENERATION_PARAMETERS: tuple[str, ...] = (
    "top_p",
    "top_k",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "reasoning_effort",
    "thinking_budget",
    "safety",
)


@dataclass(frozen=True)
class ChatRequest:
    """One validated call for one model: everything an adapter sends, and nothing else.

    Every parameter is a field (:mod:`app.llm.canonical` walks them all for
    cache keys and cassettes), in the validated, normalised form
    :mod:`app.llm.params` makes of the caller's values. Fields are keywords
    with defaults, so a new one adds to it without reshaping it: a per-call
    ``api_key`` would be ``field(default=None, repr=False)``, and the canonical
    form already keeps only a hash of a field of that name.
    """

    provider: str
    model: str
    messages: list[Message]
    temperature: float | None = None
    max_tokens: int | None = None
    tools: list[ToolSpec] = field(default_factory=list)
    tool_choice: ToolChoice | None = None
    #: Structured output: a pydantic model class, a JSON schema dict, ``{"type": "json_object"}``
    #: (JSON mode: any JSON object), or None.
    response_format: Any = None
    user: str | None = None
    #: Seconds this attempt may take, when the call's deadline leaves less than the client's timeout.
    timeout: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    #: Stop sequences (a single string arrives as a one-item tuple).
    stop: tuple[str, ...] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    reasoning_effort: ReasoningEffort | None = None
    #: Tokens the model may think for (Anthropic ``thinking.budget_tokens``, Gemini ``thinkingBudget``).
    thinking_budget: int | None = None
    #: Gemini safety settings as ``(category, threshold)`` pairs, upper-case names.
    safety: tuple[tuple[str, str], ...] | None = None
    #: Merged into the provider's request body (nested objects merge key by key).
    extra: dict[str, Any] | None = None

    def context(self) -> dict[str, Any]:
        """Keyword arguments that put provider and model on an LLMError."""
        return {"provider": self.provider, "model": self.model}


@dataclass(frozen=True)
class EmbedRequest:
    provider: str
    model: str
    inputs: list[str]
    timeout: float | None = None

    def context(self) -> dict[str, Any]:
        return {"provider": self.provider, "model": self.model}


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class ToolCallDelta:
    """A fragment of a streamed tool call; fragments with one ``index`` add up to one call."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass(frozen=True)
class StreamEnd:
    """What arrives after the text: why it stopped, and the usage when the provider sends it."""

    finish_reason: FinishReason | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    total_tokens: int | None = None
    model: str | None = None
    #: Output tokens spent thinking (part of ``output_tokens``).
    reasoning_tokens: int | None = None
    #: Input tokens read from the provider's prompt cache (part of ``input_tokens``).
    cached_input_tokens: int | None = None
    #: Input tokens written to the prompt cache (Anthropic; part of ``input_tokens``).
    cache_write_tokens: int | None = None
    response_id: str | None = None


StreamEvent = TextDelta | ToolCallDelta | StreamEnd


class Provider(ABC):
    """An adapter for one provider family, bound to one addressed provider name."""

    def __init__(self, name: str) -> None:
        self.name = name

    @abstractmethod
    def chat(self, request: ChatRequest) -> ChatResponse: ...

    @abstractmethod
    def stream(self, request: ChatRequest) -> Iterator[StreamEvent]:
        """A generator of events; closing it must close the upstream connection."""

    @abstractmethod
    def embed(self, request: EmbedRequest) -> list[list[float]]: ...

    @abstractmethod
    async def achat(self, request: ChatRequest) -> ChatResponse: ...

    @abstractmethod
    def astream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        """An async generator of events; ``aclose()`` must close the upstream connection."""

    @abstractmethod
    async def aembed(self, request: EmbedRequest) -> list[list[float]]: ...

    #: Generation parameters (of :data:`GENERATION_PARAMETERS`) this adapter cannot send. The
    #: layer drops them instead of refusing the call when ``LLM_DROP_UNSUPPORTED`` is on.
    unsupported_parameters: frozenset[str] = frozenset()
    #: A short name of the API family, for messages ("OpenAI-compatible", "Gemini", ...).
    family: str = ""

    def unsupported_in(self, request: ChatRequest) -> list[str]:
        """The parameters set on ``request`` that this adapter cannot send (in the table's order)."""
        unsupported = self.unsupported_parameters
        if not unsupported:
            return []
        return [name for name in GENERATION_PARAMETERS
                if name in unsupported and getattr(request, name) is not None]  # fmt: skip

    def check(self, request: ChatRequest) -> None:
        """Refuse what this provider cannot take, before any request or policy step.

        Raise :class:`~app.llm.errors.LLMBadRequestError` with ``field`` naming the
        parameter (a schema it cannot read, a parameter it does not support). The
        layer calls it for every model of a fallback chain when it builds its request.
        This default refuses the :attr:`unsupported_parameters` set on the request;
        an adapter that overrides it calls ``super().check(request)`` first.
        """
        for name in self.unsupported_in(request):
            raise unsupported_parameter(self, name)

    @abstractmethod
    def map_error(self, exc: BaseException, context: dict[str, Any]) -> LLMError:
        """The typed error for an exception the SDK raised (``context``: provider and model)."""

    def list_models(self) -> list[str]:
        """Model names the provider offers (``flask llm models``)."""
        return []


class WithoutRetries:
    """The SDK clients with their own retries off (``with_options(max_retries=0)``).

    The layer's one retry loop retries instead, so attempts never multiply.
    ``with_options`` shares the client's connection pool; the copy is cached
    per service client, which changes after a reset, in a forked child, and
    per event loop for async clients (hence the weak keys).
    """

    def __init__(self) -> None:
        self._copies: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
        #: The last (client, copy) handed out: every call of a sync client finds it here,
        #: without the weak dictionary's weakref per lookup. Replaced, so never kept alive long.
        self._last: tuple[Any, Any] = (None, None)

    def __call__(self, client: Any) -> Any:
        last_client, last_copy = self._last
        if last_client is client:
            return last_copy
        copy = self._copies.get(client)
        if copy is None:
            copy = client.with_options(max_retries=0)
            self._copies[client] = copy
        self._last = (client, copy)
        return copy


def unsupported_parameter(provider: Provider, name: str) -> LLMBadRequestError:
    family = f" ({provider.family})" if provider.family else ""
    return LLMBadRequestError(
        f"{name} is not supported by provider {provider.name!r}{family}; leave it out, send a"
        " provider-specific form in extra=..., or set LLM_DROP_UNSUPPORTED=true to drop it",
        field=name,
    )


def is_json_mode(response_format: Any) -> bool:
    """``{"type": "json_object"}``: any JSON object, without a schema (OpenAI's JSON mode)."""
    return isinstance(response_format, Mapping) and response_format.get("type") == "json_object"


def merge_body(body: dict[str, Any], extra: Mapping[str, Any] | None) -> dict[str, Any]:
    """``extra`` merged into a request ``body`` in place: objects key by key, anything else replaced.

    The same rule google-genai applies to its ``extra_body``, so ``extra`` means the same
    for every provider.
    """
    for key, value in (extra or {}).items():
        current = body.get(key)
        if isinstance(current, dict) and isinstance(value, Mapping):
            body[key] = merge_body(dict(current), value)
        else:
            body[key] = copy.deepcopy(value)
    return body


def parse_arguments(name: str, text: str | None, **context: Any) -> dict[str, Any]:
    """A tool call's JSON arguments; malformed JSON is an LLMResponseError keeping the text."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LLMResponseError(
            f"the model sent malformed JSON arguments for tool {name!r}: {exc.msg}",
            raw_text=text,
            **context,
        ) from None
    if not isinstance(value, dict):
        raise LLMResponseError(
            f"the model sent arguments for tool {name!r} that are not a JSON object", raw_text=text, **context
        )
    return value


def tool_call_from_json(call_id: str, name: str, arguments: str | None, **context: Any) -> ToolCall:
    return ToolCall(id=call_id, name=name, arguments=parse_arguments(name, arguments, **context))
