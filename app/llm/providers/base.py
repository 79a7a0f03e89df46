"""The contract every provider adapter fulfils, and the request it receives.

An adapter translates a :class:`ChatRequest` into its SDK's call and the
SDK's answer into a :class:`ChatResponse` or a stream of
:data:`StreamEvent` values, and maps the SDK's exceptions to
:class:`LLMError` subclasses in :meth:`Provider.map_error`. It does no
retries, caching or accounting: those wrap every provider alike, above it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import threading
import weakref
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from app.connectors._base import keep_inherited, on_fork_in_child
from app.llm.errors import LLMBadRequestError, LLMError, LLMResponseError
from app.llm.tools import ToolChoice, ToolSpec
from app.llm.types import ChatResponse, FinishReason, Message, ToolCall
from app.redaction import Secret

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
    with defaults, so a new one adds to it without reshaping it. The per-call
    ``api_key`` is a :class:`~app.redaction.Secret` left out of the repr; the
    canonical form keeps only its hash.
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
    #: The caller's own key for this call (bring your own key), sent instead of the platform's.
    api_key: Secret | None = field(default=None, repr=False)

    def context(self) -> dict[str, Any]:
        """Keyword arguments that put provider and model on an LLMError."""
        return {"provider": self.provider, "model": self.model}


@dataclass(frozen=True)
class EmbedRequest:
    provider: str
    model: str
    inputs: list[str]
    timeout: float | None = None
    #: The caller's own key for this call, as in :class:`ChatRequest`.
    api_key: Secret | None = field(default=None, repr=False)

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

    #: Whether this adapter sends ``request.api_key`` (a caller's own key) instead of its
    #: configured one. One that does not refuses calls that carry a key (see check_api_key).
    takes_api_key: bool = False

    def check_api_key(self, request: ChatRequest | EmbedRequest) -> None:
        """Refuse a per-call ``api_key`` this provider cannot send (LLMBadRequestError naming it).

        Called for every call that carries one, before any hook or request, so that a call
        never falls back silently to the platform's key: an adapter that does not say it
        sends per-call keys (:attr:`takes_api_key`) refuses them all; one that does may
        still refuse one in some setting (Gemini on Vertex AI) by overriding this.
        """
        if not self.takes_api_key:
            raise LLMBadRequestError(
                f"provider {self.name!r} does not send a per-call api_key; leave it out to use its own"
                " credentials",
                field="api_key",
            )

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


#: How long a per-call key may be: far longer than any provider's keys, short of a header too big to send.
MAX_KEY_LENGTH = 4096


def per_call_key(value: Any) -> Secret | None:
    """A caller's ``api_key=`` as a :class:`Secret`, or None when not given.

    Refused with an LLMBadRequestError naming ``api_key`` (whose message never
    quotes the value): an empty or blank key, which must never fall back to the
    platform's key; anything but a string; and characters a key never has
    (space, control characters, non-ASCII), which an HTTP header cannot carry.
    """
    if value is None:
        return None
    if isinstance(value, Secret):
        value = value.reveal()
    if not isinstance(value, str):
        raise LLMBadRequestError(f"api_key must be a string, got {type(value).__name__}", field="api_key")
    if not value.strip():
        raise LLMBadRequestError(
            "api_key is empty; leave it out to use the configured key, or pass the caller's key",
            field="api_key",
        )
    if len(value) > MAX_KEY_LENGTH or not (value.isascii() and value.isprintable()) or " " in value:
        raise LLMBadRequestError(
            f"api_key must be at most {MAX_KEY_LENGTH} printable ASCII characters without spaces",
            field="api_key",
        )
    return Secret(value)


def key_id(key: Secret) -> str:
    """A key's identity where one is needed (a cache, a log, a metric): its SHA-256, never the key."""
    return hashlib.sha256(key.reveal().encode()).hexdigest()


class PerKeyClients:
    """Copies of a shared SDK client, each sending another key: the pool stays the base client's.

    ``with_options(api_key=...)`` (openai, anthropic) makes a client that shares its
    base's HTTP client, so every key goes over the same connections. Making one costs
    more than a request's own work in the layer, so copies are kept: per base client
    (weakly: a base that a reset, a fork or a finished event loop let go takes its
    copies with it), at most ``size`` keys each, the least recently used dropped first.
    A dropped copy is not closed: it owns no connection, and closing it would close the
    base's pool, which every other key (and the platform's) uses. Keys are held by
    their hash; a forked child starts with no copies (its bases are new clients).
    """

    def __init__(self, make: Callable[[Any, str], Any], size: int = 256) -> None:
        self._make = make
        self.size = size
        self._lock = threading.Lock()
        self._by_base: weakref.WeakKeyDictionary[Any, OrderedDict[str, Any]] = weakref.WeakKeyDictionary()
        _per_key_caches.add(self)

    def get(self, base: Any, key: Secret) -> Any:
        """The copy of ``base`` that sends ``key``, made on first use."""
        ident = key_id(key)
        with self._lock:
            copies = self._by_base.get(base)
            found = copies.get(ident) if copies is not None else None
            if found is not None:
                assert copies is not None
                copies.move_to_end(ident)
                return found
        made = self._make(base, key.reveal())  # outside the lock: two threads may both make one
        with self._lock:
            copies = self._by_base.get(base)
            if copies is None:
                copies = self._by_base[base] = OrderedDict()
            copies[ident] = made
            copies.move_to_end(ident)
            while len(copies) > self.size:
                copies.popitem(last=False)
        return made

    def __len__(self) -> int:
        """How many copies are kept, over every base."""
        with self._lock:
            return sum(len(copies) for copies in self._by_base.values())

    def _forget_after_fork(self) -> None:
        self._lock = threading.Lock()
        kept = [copy for copies in self._by_base.values() for copy in copies.values()]
        if kept:
            keep_inherited(kept)  # the parent's: never finalised here
        self._by_base = weakref.WeakKeyDictionary()


_per_key_caches: weakref.WeakSet[PerKeyClients] = weakref.WeakSet()


def _forget_per_key_clients() -> None:
    for cache in list(_per_key_caches):
        cache._forget_after_fork()


on_fork_in_child(_forget_per_key_clients)


def with_key(client: Any, key: str) -> Any:
    """An openai or anthropic client that sends ``key``, sharing ``client``'s connection pool."""
    return client.with_options(api_key=key)


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
