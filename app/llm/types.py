"""What the LLM layer returns and what it takes, independent of any provider.

Messages come in as plain dicts (``{"role", "content"}``, content a string or
a list of parts); :func:`normalise_messages` validates them once into
:class:`Message` values that each provider translates into its own form.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal, cast

from app.jsonbounds import too_deep
from app.llm.errors import LLMBadRequestError

FinishReason = Literal["stop", "length", "tool_calls", "content_filter"]
Role = Literal["system", "user", "assistant", "tool"]
ROLES: frozenset[str] = frozenset({"system", "user", "assistant", "tool"})
#: Other names accepted for a role: ``developer`` is OpenAI's newer name for ``system``.
ROLE_ALIASES: dict[str, Role] = {"developer": "system"}
_ROLE_NAMES = sorted([*ROLES, *ROLE_ALIASES])


#: A UTF-16 surrogate: in a Python string always a lone one (``"\ud800"`` from JSON), which no
#: provider can be sent (UTF-8 cannot encode it).
_SURROGATE = re.compile("[\ud800-\udfff]")
#: How deeply a tool call's JSON arguments may nest: the parser recurses once per level.
MAX_ARGUMENTS_DEPTH = 64


def check_text(where: str, value: str) -> str:
    """``value``, or an LLMBadRequestError naming ``where`` if it holds a lone surrogate."""
    if not value.isascii() and _SURROGATE.search(value):
        raise LLMBadRequestError(f"{where} holds a lone UTF-16 surrogate, which is not text", field=where)
    return value


def check_texts(where: str, value: Any) -> None:
    """:func:`check_text` on every string of a JSON-like value (keys too), naming the first bad one."""
    if isinstance(value, str):
        check_text(where, value)
    elif isinstance(value, Mapping):
        for key, item in value.items():
            if isinstance(key, str):
                check_text(where, key)
            check_texts(f"{where}.{key}", item)
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            check_texts(f"{where}[{index}]", item)


@dataclass(frozen=True)
class ToolCall:
    """A function the model asked to call; ``arguments`` is the parsed JSON object."""

    id: str
    name: str
    arguments: dict[str, Any]


class _Cost:
    """``ChatResponse.cost``: as given, or worked out by its ``pricing`` when first read.

    genai-prices' arithmetic takes about 0.1 ms a call, as much as the rest of the layer's
    own work on a call; an answer whose cost nobody reads does not pay for it. Given as
    None (the default), the cost is worked out when read; worked out once, it is kept.
    """

    def __get__(self, response: ChatResponse | None, owner: type | None = None) -> Decimal | None:
        if response is None:
            return None  # the field's default
        state = response.__dict__
        if "_cost" in state:
            cost: Decimal | None = state["_cost"]
            return cost
        pricing = state.get("pricing")
        if pricing is None:
            return None
        cost = state["_cost"] = pricing(response)
        return cost

    def __set__(self, response: ChatResponse, value: Decimal | None) -> None:
        if value is None:
            response.__dict__.pop("_cost", None)
        else:
            response.__dict__["_cost"] = value


@dataclass
class ChatResponse:
    """One finished answer, the same for every provider."""

    content: str | None
    model: str
    provider: str
    input_tokens: int | None = None
    output_tokens: int | None = None
    total_tokens: int | None = None
    finish_reason: FinishReason | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)
    parsed: Any = None
    latency_ms: float = 0.0
    raw: Any = field(default=None, repr=False)
    #: Every try this answer took, across retries and fallbacks (app.llm.resilience.Attempt).
    attempts: list[Any] = field(default_factory=list)
    #: Output tokens spent thinking; already counted in ``output_tokens`` (billed as output).
    reasoning_tokens: int | None = None
    #: Input tokens read from the provider's prompt cache; already counted in ``input_tokens``.
    cached_input_tokens: int | None = None
    #: Input tokens written to the prompt cache (Anthropic); already counted in ``input_tokens``.
    cache_write_tokens: int | None = None
    #: The provider's id of this answer (``chatcmpl-...``, ``msg_...``, Gemini's ``responseId``).
    response_id: str | None = None
    #: USD for this answer: the usage priced by the model catalogue (genai-prices), worked out
    #: when first read; None when unknown (no usage, no price, or an answer no provider gave).
    cost: _Cost = _Cost()
    #: How ``cost`` is worked out (the layer sets it for answers a provider gave).
    pricing: Callable[[ChatResponse], Decimal | None] | None = field(default=None, repr=False, compare=False)
    #: Answered by the response cache (app.llm.cache): no provider was asked, and the usage above
    #: is the original answer's (a usage ledger bills a hit at zero).
    cached: bool = False
    #: A stream's text deltas, in order (the cache replays them as they came); None for a call.
    deltas: list[str] | None = field(default=None, repr=False, compare=False)

    @property
    def has_tool_calls(self) -> bool:
        return bool(self.tool_calls)

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (a response cache) with its cost worked out: ``pricing`` does not travel."""
        state = dict(self.__dict__)
        state["pricing"] = None
        cost = self.cost
        if cost is not None:
            state["_cost"] = cost
        return state

    def usage(self) -> dict[str, int | None]:
        return {
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "total_tokens": self.total_tokens,
            "reasoning_tokens": self.reasoning_tokens,
            "cached_input_tokens": self.cached_input_tokens,
            "cache_write_tokens": self.cache_write_tokens,
        }


@dataclass(frozen=True)
class TextPart:
    text: str


@dataclass(frozen=True)
class ImagePart:
    """An image by URL (``https:`` or ``data:``) or as bytes with a mime type."""

    url: str | None = None
    data: bytes | None = None
    mime_type: str | None = None

    def as_data_url(self) -> str:
        if self.url is not None:
            return self.url
        assert self.data is not None
        return f"data:{self.mime_type};base64,{base64.b64encode(self.data).decode()}"

    def as_bytes(self) -> tuple[bytes, str] | None:
        """(bytes, mime type) when the image is inline (bytes or a ``data:`` URL)."""
        if self.data is not None:
            return self.data, self.mime_type or "application/octet-stream"
        if self.url and self.url.startswith("data:") and ";base64," in self.url:
            header, payload = self.url[5:].split(";base64,", 1)
            return base64.b64decode(payload), header or "application/octet-stream"
        return None


Part = TextPart | ImagePart


@dataclass(frozen=True)
class Message:
    role: Role
    parts: tuple[Part, ...] = ()
    tool_calls: tuple[ToolCall, ...] = ()
    #: For ``role="tool"``: which call this answers, and the function's name.
    tool_call_id: str | None = None
    name: str | None = None

    @property
    def text(self) -> str:
        return "".join(part.text for part in self.parts if isinstance(part, TextPart))


def normalise_messages(messages: Sequence[Mapping[str, Any]] | Any) -> list[Message]:
    """Validate user messages into :class:`Message` values.

    A bad one is an LLMBadRequestError whose ``field`` is the path to it
    (``messages[2].content[0].url``), so an API can point at it.
    """
    if type(messages) is not list and (isinstance(messages, str) or not isinstance(messages, Sequence)):
        raise LLMBadRequestError(
            "messages must be a non-empty list of {role, content} dicts", field="messages"
        )
    if not messages:
        raise LLMBadRequestError(
            "messages must be a non-empty list of {role, content} dicts", field="messages"
        )
    return [_message(index, raw) for index, raw in enumerate(messages)]


def _message(index: int, raw: Any) -> Message:
    # Every call validates its messages: the checks go cheapest first (a dict before the
    # Mapping ABC), and a plain text message is built without the general path.
    if type(raw) is not dict and not isinstance(raw, Mapping):
        raise LLMBadRequestError(
            f"messages[{index}] must be a dict with role and content", field=f"messages[{index}]"
        )
    role = raw.get("role")
    if not isinstance(role, str) or role not in ROLES:  # an unhashable role must not be a TypeError
        role = ROLE_ALIASES.get(role) if isinstance(role, str) else None
        if role is None:
            raise LLMBadRequestError(
                f"messages[{index}].role must be one of {_ROLE_NAMES}, got {raw.get('role')!r}",
                field=f"messages[{index}].role",
            )
    content = raw.get("content")
    if type(content) is str and role != "tool" and len(raw) == 2:  # {"role", "content": "text"}
        return Message(
            role=cast(Role, role), parts=(TextPart(check_text(f"messages[{index}].content", content)),)
        )
    where = f"messages[{index}]"
    raw_calls = raw.get("tool_calls")
    if raw_calls is not None and (
        not isinstance(raw_calls, list | tuple) or (raw_calls and role != "assistant")
    ):
        raise LLMBadRequestError(
            f"{where}.tool_calls must be a list of tool calls, on an assistant message",
            field=f"{where}.tool_calls",
        )
    parts = _parts(where, content, allow_empty=role == "assistant" and bool(raw_calls))
    tool_calls = (
        tuple(_tool_call(f"{where}.tool_calls[{i}]", c) for i, c in enumerate(raw_calls)) if raw_calls else ()
    )
    tool_call_id = raw.get("tool_call_id")
    if role == "tool" and not isinstance(tool_call_id, str):
        raise LLMBadRequestError(
            f"{where}.tool_call_id is required for a tool result", field=f"{where}.tool_call_id"
        )
    if isinstance(tool_call_id, str):
        check_text(f"{where}.tool_call_id", tool_call_id)
    name = raw.get("name")
    if isinstance(name, str):
        check_text(f"{where}.name", name)
    return Message(role=cast(Role, role), parts=parts, tool_calls=tool_calls, tool_call_id=tool_call_id,
                   name=name if isinstance(name, str) else None)  # fmt: skip


def _parts(where: str, content: Any, *, allow_empty: bool) -> tuple[Part, ...]:
    if content is None and allow_empty:
        return ()
    if isinstance(content, str):
        return (TextPart(check_text(f"{where}.content", content)),)
    if not isinstance(content, list) or (not content and not allow_empty):
        raise LLMBadRequestError(
            f"{where}.content must be a string or a non-empty list of parts", field=f"{where}.content"
        )
    return tuple(_part(f"{where}.content[{i}]", part) for i, part in enumerate(content))


def _part(where: str, part: Any) -> Part:
    if isinstance(part, str):
        return TextPart(check_text(where, part))
    if not isinstance(part, Mapping):
        raise LLMBadRequestError(f"{where} must be a text or image part", field=where)
    kind = part.get("type")
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise LLMBadRequestError(f"{where}.text must be a string", field=f"{where}.text")
        return TextPart(check_text(f"{where}.text", part["text"]))
    if kind in ("image", "image_url"):
        return _image_part(where, kind, part)
    raise LLMBadRequestError(f"{where}.type must be 'text' or 'image', got {kind!r}", field=f"{where}.type")


def _image_part(where: str, kind: str, part: Mapping[str, Any]) -> ImagePart:
    url = part.get("url")
    # Where a JSON caller puts the url (bytes are for Python callers).
    at = f"{where}.url"
    if kind == "image_url":  # the OpenAI form, accepted as given
        image_url = part.get("image_url")
        url = image_url.get("url") if isinstance(image_url, Mapping) else image_url
        at = f"{where}.image_url.url" if isinstance(image_url, Mapping) else f"{where}.image_url"
    if isinstance(url, str) and url:
        image = ImagePart(url=check_text(at, url))
        if url.startswith("data:"):  # some adapters decode it: a bad one is the caller's mistake
            try:
                inline = image.as_bytes()
            except ValueError:  # binascii.Error: not base64
                inline = None
            if inline is None:
                raise LLMBadRequestError(f"{at} must be a data:<mime type>;base64,<data> URL", field=at)
        return image
    data = part.get("data")
    if isinstance(data, bytes | bytearray):
        mime = part.get("mime_type")
        if not isinstance(mime, str) or "/" not in mime:
            raise LLMBadRequestError(
                f"{where}.mime_type is required with image bytes (e.g. image/png)", field=f"{where}.mime_type"
            )
        return ImagePart(data=bytes(data), mime_type=mime)
    raise LLMBadRequestError(f"{where} needs a url or data (bytes) with a mime_type", field=at)


def _tool_call(where: str, raw: Any) -> ToolCall:
    if isinstance(raw, ToolCall):
        return raw
    if isinstance(raw, Mapping):
        nested = raw.get("function")
        function: Mapping[str, Any] = nested if isinstance(nested, Mapping) else raw
        name, arguments = function.get("name"), function.get("arguments", {})
        at = f"{where}.function" if isinstance(nested, Mapping) else where
        if isinstance(arguments, str):
            import json

            if too_deep(arguments, MAX_ARGUMENTS_DEPTH):  # refused before the recursive parser
                raise LLMBadRequestError(
                    f"{where}.arguments nests more than {MAX_ARGUMENTS_DEPTH} levels deep",
                    field=f"{at}.arguments",
                )
            try:
                arguments = json.loads(arguments or "{}", parse_constant=_not_json)
            except ValueError:  # not JSON, or a number too long to convert
                raise LLMBadRequestError(
                    f"{where}.arguments is not valid JSON", field=f"{at}.arguments"
                ) from None
        if isinstance(name, str) and isinstance(arguments, dict):
            check_text(f"{at}.name", name)
            check_texts(f"{at}.arguments", arguments)
            call_id = raw.get("id") or name
            return ToolCall(id=check_text(f"{where}.id", str(call_id)), name=name, arguments=arguments)
    raise LLMBadRequestError(f"{where} must be a ToolCall or {{id, name, arguments}}", field=where)


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # NaN and Infinity, which Python's parser would take


def system_text(messages: Iterable[Message]) -> str | None:
    """The system messages joined, for providers that take the system prompt apart."""
    texts = [m.text for m in messages if m.role == "system"]
    return "\n\n".join(texts) if texts else None
