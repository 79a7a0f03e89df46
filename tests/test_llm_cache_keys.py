"""The cache key: every field of the normalised request changes it, and it is the canonical form's key.

The walk reads the fields from the dataclasses themselves (``ChatRequest``,
``EmbedRequest`` and every dataclass reachable from their type hints), so a
field added later fails here until it has a sample pair below: no parameter
can join the request without joining the key.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from app.llm.cache.keys import cache_key
from app.llm.canonical import NOT_PART_OF_THE_QUESTION, request_key
from app.llm.providers.base import ChatRequest, EmbedRequest
from app.llm.tools import ToolChoice, ToolSpec
from app.llm.types import ImagePart, Message, TextPart, ToolCall
from app.redaction import Secret
from tests.conftest import CANARY_KEY


class Answer(BaseModel):
    text: str


class OtherAnswer(BaseModel):
    text: str
    score: float


#: Per dataclass and field: the value the base instance has, and another one. A new field needs a pair.
SAMPLES: dict[str, dict[str, tuple[Any, Any]]] = {
    "ChatRequest": {
        "provider": ("openai", "groq"),
        "model": ("gpt-4o-mini", "gpt-4o"),
        "messages": ([Message("user", (TextPart("Hi"),))], [Message("user", (TextPart("Ho"),))]),
        "temperature": (0.5, 0.7),
        "max_tokens": (100, 101),
        "tools": ([], [ToolSpec("f", "d", {"type": "object"})]),
        "tool_choice": (None, ToolChoice("auto")),
        "response_format": (Answer, OtherAnswer),
        "user": ("alice", "bob"),
        "timeout": (10.0, 20.0),
        "top_p": (0.9, 0.8),
        "top_k": (40, 41),
        "stop": (("END",), ("END", "STOP")),
        "seed": (1, 2),
        "presence_penalty": (0.1, 0.2),
        "frequency_penalty": (0.1, 0.3),
        "reasoning_effort": ("low", "high"),
        "thinking_budget": (512, 1024),
        "safety": (
            (("HARM_CATEGORY_HARASSMENT", "BLOCK_NONE"),),
            (("HARM_CATEGORY_HARASSMENT", "BLOCK_ONLY_HIGH"),),
        ),
        "extra": ({"options": {"num_ctx": 4096}}, {"options": {"num_ctx": 8192}}),
        "api_key": (Secret(CANARY_KEY), Secret(CANARY_KEY + "2")),
    },
    "EmbedRequest": {
        "provider": ("openai", "gemini"),
        "model": ("text-embedding-3-small", "text-embedding-3-large"),
        "inputs": (["a"], ["a", "b"]),
        "timeout": (10.0, 20.0),
        "api_key": (None, Secret(CANARY_KEY)),
    },
    "Message": {
        "role": ("user", "assistant"),
        "parts": ((TextPart("Hi"),), (TextPart("Hi"), TextPart("!"))),
        "tool_calls": ((), (ToolCall("c1", "f", {}),)),
        "tool_call_id": (None, "c1"),
        "name": (None, "f"),
    },
    "TextPart": {"text": ("Hi", "Hi ")},
    "ImagePart": {
        "url": (None, "https://example.test/cat.png"),
        "data": (b"\x89PNG\x00\x01", b"\x89PNG\x00\x02"),
        "mime_type": ("image/png", "image/jpeg"),
    },
    "ToolCall": {"id": ("c1", "c2"), "name": ("f", "g"), "arguments": ({"x": 1}, {"x": 1.0})},
    "ToolSpec": {
        "name": ("f", "g"),
        "description": ("d", "e"),
        "parameters": ({"type": "object"}, {"type": "object", "required": []}),
    },
    "ToolChoice": {"mode": ("tool", "required"), "name": ("f", None)},
}


def base(kind: type) -> Any:
    return kind(**{name: first for name, (first, _second) in SAMPLES[kind.__name__].items()})


def in_a_request(value: Any) -> ChatRequest | EmbedRequest:
    """A request holding ``value`` (a nested dataclass), so the key sees it where a call would."""
    request = base(ChatRequest)
    if isinstance(value, ChatRequest | EmbedRequest):
        return value
    if isinstance(value, Message):
        return dataclasses.replace(request, messages=[value])
    if isinstance(value, TextPart | ImagePart):
        return dataclasses.replace(request, messages=[Message("user", (value,))])
    if isinstance(value, ToolCall):
        return dataclasses.replace(request, messages=[Message("assistant", (), (value,))])
    if isinstance(value, ToolSpec):
        return dataclasses.replace(request, tools=[value])
    if isinstance(value, ToolChoice):
        return dataclasses.replace(request, tool_choice=value)
    raise AssertionError(f"no way to put a {type(value).__name__} in a request: add one to in_a_request()")


def reachable_dataclasses(root: type, found: dict[str, type] | None = None) -> dict[str, type]:
    """Every dataclass type a request is made of, read from the type hints."""
    found = {} if found is None else found
    if root.__name__ in found:
        return found
    found[root.__name__] = root
    for hint in typing.get_type_hints(root).values():
        for kind in _types_in(hint):
            if dataclasses.is_dataclass(kind):
                reachable_dataclasses(kind, found)
    return found


def _types_in(hint: Any) -> list[Any]:
    args = typing.get_args(hint)
    return [hint, *[kind for arg in args for kind in _types_in(arg)]] if args else [hint]


def key(request: Any, **scope: Any) -> str:
    return cache_key(request, **{"tenant": None, "endpoint": None, "kind": "chat", **scope})


def test_every_dataclass_a_request_is_made_of_has_samples():
    reachable = {**reachable_dataclasses(ChatRequest), **reachable_dataclasses(EmbedRequest)}
    assert set(reachable) == set(SAMPLES), "a new type in the request: give its fields sample pairs"
    for name, kind in reachable.items():
        fields = {field.name for field in dataclasses.fields(kind)}
        missing = fields - set(SAMPLES[name])
        assert not missing, f"{name} has fields without samples ({sorted(missing)}): add a pair for each"


def test_every_field_changes_the_key_but_the_attempts_timeout():
    reachable = {**reachable_dataclasses(ChatRequest), **reachable_dataclasses(EmbedRequest)}
    checked = 0
    for name, kind in reachable.items():
        original = base(kind)
        before = key(in_a_request(original))
        for field in dataclasses.fields(kind):
            changed = dataclasses.replace(original, **{field.name: SAMPLES[name][field.name][1]})
            after = key(in_a_request(changed))
            if field.name in NOT_PART_OF_THE_QUESTION:
                assert after == before, f"{name}.{field.name} is not part of the question"
            else:
                assert after != before, f"{name}.{field.name} does not change the cache key"
            checked += 1
    assert checked >= 40


def test_a_calls_key_is_the_canonical_forms_with_its_scope():
    from app.llm.cache.keys import call_key

    request = base(ChatRequest)
    for endpoint, kind, tenant in [
        (None, "chat", None),
        ("http://h/v1", "stream", "acme"),
        ("e", "embed", "t\u00e9"),
    ]:
        expected = request_key(request, endpoint=endpoint, kind=kind, tenant=tenant)
        assert call_key(request, endpoint, kind, tenant) == expected


def test_the_scope_changes_the_key():
    request = base(ChatRequest)
    keys = {
        key(request),
        key(request, tenant="acme"),
        key(request, tenant="globex"),
        key(request, endpoint="https://api.openai.com/v1"),
        key(request, endpoint="http://127.0.0.1:8000/v1"),
        key(request, kind="stream"),
    }
    assert len(keys) == 6


def test_keyword_and_dict_order_do_not_change_the_key():
    one = dataclasses.replace(base(ChatRequest), extra={"a": 1, "b": {"x": 1, "y": [1, 2]}})
    two = dataclasses.replace(base(ChatRequest), extra={"b": {"y": [1, 2], "x": 1}, "a": 1})
    assert key(one, tenant="t", kind="chat") == cache_key(two, kind="chat", endpoint=None, tenant="t")


def test_the_key_is_the_canonical_forms_and_holds_no_secret():
    request = base(ChatRequest)
    assert key(request, tenant="acme") == request_key(request, tenant="acme", endpoint=None, kind="chat")
    with_image = in_a_request(base(ImagePart))
    assert key(with_image) == request_key(with_image, tenant=None, endpoint=None, kind="chat")
    embed = dataclasses.replace(base(EmbedRequest), api_key=Secret(CANARY_KEY))
    assert cache_key(embed, kind="embed") == request_key(embed, kind="embed")
    from app.llm.cache.keys import encode

    text = encode(request)
    assert CANARY_KEY not in text and "\\u0089PNG" not in encode(with_image)  # hashed, never inline


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(extra=st.dictionaries(st.text(max_size=6), JSON, max_size=4), text=st.text(max_size=20),
       temperature=st.one_of(st.none(), st.floats(0, 2), st.integers(0, 2)))  # fmt: skip
def test_the_fast_key_is_request_key_for_any_values(extra, text, temperature):
    request = dataclasses.replace(
        base(ChatRequest),
        extra=extra,
        temperature=temperature,
        messages=[Message("user", (TextPart(text), ImagePart(data=text.encode("utf-8", "surrogatepass"))))],
    )
    assert cache_key(request, tenant=text) == request_key(request, tenant=text)
