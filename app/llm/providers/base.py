"""The contract every provider adapter fulfils, and the request it receives.

An adapter translates a :class:`ChatRequest` into its SDK's call and the
SDK's answer into a :class:`ChatResponse` or a stream of
:data:`StreamEvent` values, and maps the SDK's exceptions to
:class:`LLMError` subclasses in :meth:`Provider.map_error`. It does no
retries, caching or accounting: those wrap every provider alike, above it.
"""

from __future__ import annotations

import json
import weakref
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

from app.llm.errors import LLMError, LLMResponseError
from app.llm.tools import ToolChoice, ToolSpec
from app.llm.types import ChatResponse, FinishReason, Message, ToolCall


@dataclass(frozen=True)
class ChatRequest:
    provider: str
    model: str
    messages: list[Message]
    temperature: float | None = None
    max_tokens: int | None = None
    tools: list[ToolSpec] = field(default_factory=list)
    tool_choice: ToolChoice | None = None
    #: Structured output: a pydantic model class, a JSON schema dict, or None.
    response_format: Any = None
    user: str | None = None
    #: Seconds this attempt may take, when the call's deadline leaves less than the client's timeout.
    timeout: float | None = None

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

    def check(self, request: ChatRequest) -> None:
        """Refuse what this provider cannot take, before any request or policy step.

        Raise :class:`~app.llm.errors.LLMBadRequestError` with ``field`` naming the
        parameter (a schema it cannot read, a parameter it does not support). The
        layer calls it for every model of a fallback chain when it builds its request.
        """
        return  # a hook: most providers take everything the layer has checked

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
