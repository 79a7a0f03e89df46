"""The provider-independent core of ``app.llm``: validation, tools, structured output, errors, addressing.

Nothing here needs a provider's SDK: messages, tools and schemas are checked by
the layer itself before any request, and the error helpers are pure functions.
Tests that go as far as a request use :class:`tests.servers.KeepAliveServer`.
"""

from __future__ import annotations

import base64
import email.utils
import json
import subprocess
import sys
import time
from typing import Literal, Optional

import pytest
from pydantic import BaseModel

from app.errors import ConfigError
from app.llm import (
    LLMBadRequestError,
    LLMContentFilterError,
    LLMContextLengthError,
    LLMError,
    LLMNotConfiguredError,
    LLMRateLimitError,
    LLMResponseError,
    LLMServerError,
    ToolCall,
    get_llm,
)
from app.llm.client import split_model
from app.llm.errors import (
    LLMAuthError,
    LLMNotFoundError,
    LLMPermissionError,
    LLMTimeoutError,
    error_for_status,
    refine_bad_request,
    retry_after_from_google_details,
    retry_after_from_headers,
)
from app.llm.structured import parse_structured, schema_name, strict_json_schema
from app.llm.tools import ToolChoice, normalise_tool_choice, normalise_tools, tool_from_function
from app.llm.types import ImagePart, Message, TextPart, normalise_messages, system_text
from tests.conftest import CANARY_KEY, ROOT

PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR-not-really"
USER = {"role": "user", "content": "Hi"}


# --- messages --------------------------------------------------------------------------------


def test_plain_messages_become_message_values():
    messages = normalise_messages(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hello "}, "there"]},
            {"role": "assistant", "content": "Hi!"},
        ]
    )

    assert [m.role for m in messages] == ["system", "user", "assistant"]
    assert messages[1].parts == (TextPart("Hello "), TextPart("there"))
    assert messages[1].text == "Hello there"
    assert system_text(messages) == "Be brief."
    assert system_text(messages[1:]) is None


@pytest.mark.parametrize(
    ("messages", "needle", "field"),
    [
        ([], "messages must be a non-empty list", "messages"),
        ("Hi", "messages must be a non-empty list", "messages"),
        ({"role": "user", "content": "Hi"}, "messages must be a non-empty list", "messages"),
        ([USER, "Hi"], "messages[1] must be a dict", "messages[1]"),
        ([USER, {"role": "bogus", "content": "x"}], "messages[1].role must be one of", "messages[1].role"),
        ([{"content": "x"}], "messages[0].role must be one of", "messages[0].role"),
        ([{"role": ["user"], "content": "x"}], "messages[0].role must be one of", "messages[0].role"),
        (
            [{"role": "user"}],
            "messages[0].content must be a string or a non-empty list",
            "messages[0].content",
        ),
        (
            [{"role": "user", "content": []}],
            "messages[0].content must be a string or a non-empty list",
            "messages[0].content",
        ),
        ([{"role": "user", "content": 42}], "messages[0].content must be a string", "messages[0].content"),
        (
            [USER, {"role": "assistant", "content": None}],
            "messages[1].content must be a string",
            "messages[1].content",
        ),
        (
            [{"role": "user", "content": ["ok", 7]}],
            "messages[0].content[1] must be a text or image part",
            "messages[0].content[1]",
        ),
        (
            [{"role": "user", "content": [{"type": "audio"}]}],
            "messages[0].content[0].type must be",
            "messages[0].content[0].type",
        ),
        (
            [{"role": "user", "content": [{"type": "text", "text": 5}]}],
            "messages[0].content[0].text must be a string",
            "messages[0].content[0].text",
        ),
        (
            [USER, {"role": "tool", "content": "42"}],
            "messages[1].tool_call_id is required",
            "messages[1].tool_call_id",
        ),
        (
            [USER, {"role": "tool", "content": "42", "tool_call_id": 7}],
            "messages[1].tool_call_id is required",
            "messages[1].tool_call_id",
        ),
        (  # found by the /api fuzz test: a TypeError, and a 500, before this check
            [{"role": "user", "content": "0", "tool_calls": 1}],
            "messages[0].tool_calls must be a list of tool calls",
            "messages[0].tool_calls",
        ),
        (
            [{"role": "user", "content": "0", "tool_calls": [{"id": "c", "name": "f", "arguments": {}}]}],
            "messages[0].tool_calls must be a list of tool calls, on an assistant message",
            "messages[0].tool_calls",
        ),
    ],
)
def test_a_bad_message_is_a_bad_request_naming_the_index_and_field(messages, needle, field):
    with pytest.raises(LLMBadRequestError) as excinfo:
        normalise_messages(messages)

    assert needle in str(excinfo.value)
    assert excinfo.value.field == field
    assert excinfo.value.status_code is None  # the layer's own check: nothing was sent


def test_image_parts_by_url_data_url_and_bytes():
    data_url = "data:image/png;base64," + base64.b64encode(PNG).decode()
    [message] = normalise_messages(
        [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image", "url": "https://example.com/cat.png"},
                    {"type": "image", "url": data_url},
                    {"type": "image", "data": PNG, "mime_type": "image/png"},
                    {"type": "image_url", "image_url": {"url": "https://example.com/dog.jpg"}},
                ],
            }
        ]
    )

    text, by_url, by_data_url, by_bytes, openai_form = message.parts
    assert text == TextPart("What is this?")
    assert by_url == ImagePart(url="https://example.com/cat.png")
    assert by_url.as_data_url() == "https://example.com/cat.png"
    assert by_url.as_bytes() is None  # a remote image: the provider fetches it
    assert by_data_url.as_bytes() == (PNG, "image/png")
    assert by_bytes == ImagePart(data=PNG, mime_type="image/png")
    assert by_bytes.as_data_url() == data_url
    assert by_bytes.as_bytes() == (PNG, "image/png")
    assert openai_form == ImagePart(url="https://example.com/dog.jpg")
    assert message.text == "What is this?"


@pytest.mark.parametrize(
    ("part", "needle", "field"),
    [
        (
            {"type": "image", "data": PNG},
            "messages[0].content[1].mime_type is required",
            "messages[0].content[1].mime_type",
        ),
        (
            {"type": "image", "data": PNG, "mime_type": "png"},
            "messages[0].content[1].mime_type is required",
            "messages[0].content[1].mime_type",
        ),
        ({"type": "image"}, "messages[0].content[1] needs a url or data", "messages[0].content[1].url"),
        (
            {"type": "image", "url": ""},
            "messages[0].content[1] needs a url or data",
            "messages[0].content[1].url",
        ),
        (
            {"type": "image", "data": "not bytes", "mime_type": "image/png"},
            "needs a url or data",
            "messages[0].content[1].url",
        ),
        ({"type": "image_url", "image_url": 7}, "needs a url or data", "messages[0].content[1].image_url"),
    ],
)
def test_a_bad_image_part_names_what_is_missing(part, needle, field):
    with pytest.raises(LLMBadRequestError, match=r".*") as excinfo:
        normalise_messages([{"role": "user", "content": ["look", part]}])

    assert needle in str(excinfo.value)
    assert excinfo.value.field == field


def test_assistant_tool_calls_in_the_openai_form_and_as_tool_calls():
    call = ToolCall(id="call_2", name="get_time", arguments={"tz": "UTC"})
    messages = normalise_messages(
        [
            USER,
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    },
                    call,
                    {"id": "call_3", "name": "ping", "arguments": {}},
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "18C"},
        ]
    )

    assistant, tool = messages[1], messages[2]
    assert assistant.parts == ()
    assert assistant.tool_calls == (
        ToolCall("call_1", "get_weather", {"city": "Paris"}),
        call,
        ToolCall("call_3", "ping", {}),
    )
    assert tool == Message(role="tool", parts=(TextPart("18C"),), tool_call_id="call_1", name="get_weather")


@pytest.mark.parametrize(
    ("tool_call", "needle", "field"),
    [
        (
            {"id": "c", "function": {"name": "f", "arguments": "{oops"}},
            "tool_calls[0].arguments is not valid",
            "tool_calls[0].function.arguments",
        ),
        (
            {"id": "c", "name": "f", "arguments": "{oops"},
            "tool_calls[0].arguments is not valid",
            "tool_calls[0].arguments",
        ),
        ({"id": "c", "function": {"arguments": "{}"}}, "tool_calls[0] must be a ToolCall", "tool_calls[0]"),
        (
            {"id": "c", "name": "f", "arguments": "[1, 2]"},
            "tool_calls[0] must be a ToolCall",
            "tool_calls[0]",
        ),
        ("get_weather", "tool_calls[0] must be a ToolCall", "tool_calls[0]"),
    ],
)
def test_a_bad_assistant_tool_call_names_its_index(tool_call, needle, field):
    with pytest.raises(LLMBadRequestError) as excinfo:
        normalise_messages([USER, {"role": "assistant", "content": None, "tool_calls": [tool_call]}])

    assert f"messages[1].{needle}" in str(excinfo.value)
    assert excinfo.value.field == f"messages[1].{field}"


# --- tools -----------------------------------------------------------------------------------


class Address(BaseModel):
    street: str
    city: str


def search_docs(
    query: str,
    limit: int = 5,
    tags: list[str] | None = None,
    exact: Optional[bool] = None,  # noqa: UP045 - the spelling users write
    mode: Literal["fast", "deep"] = "fast",
    *args: int,
    **kwargs: str,
) -> list[str]:
    """Search the documentation.

    Returns the matching titles.
    """
    return []


def ship_to(address: Address, express) -> None:  # express has no hint: any value
    """Ship the order."""


WEATHER_PARAMS = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


def test_tools_in_all_three_forms_normalise_alike():
    specs = normalise_tools(
        [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": "Weather now",
                    "parameters": WEATHER_PARAMS,
                },
            },
            {
                "name": "get_time",
                "description": "The time",
                "parameters": {"type": "object", "properties": {}},
            },
            {"name": "ping"},
            search_docs,
        ]
    )

    weather, time_, ping, search = specs
    assert (weather.name, weather.description, weather.parameters) == (
        "get_weather",
        "Weather now",
        WEATHER_PARAMS,
    )
    assert weather.parameters is not WEATHER_PARAMS  # a copy: adapters may not change the caller's dict
    assert (time_.name, time_.description) == ("get_time", "The time")
    assert ping.parameters == {"type": "object", "properties": {}}
    assert search.name == "search_docs"
    assert search.description == "Search the documentation.\n\nReturns the matching titles."


def test_a_functions_hints_and_defaults_make_its_schema():
    schema = tool_from_function(search_docs).parameters

    assert schema["type"] == "object"
    assert schema["required"] == ["query"]  # only the parameter without a default
    assert set(schema["properties"]) == {"query", "limit", "tags", "exact", "mode"}  # no *args, **kwargs
    props = schema["properties"]
    assert props["query"] == {"type": "string"}
    assert props["limit"] == {"type": "integer", "default": 5}
    assert props["tags"]["anyOf"] == [{"type": "array", "items": {"type": "string"}}, {"type": "null"}]
    assert props["exact"]["anyOf"] == [{"type": "boolean"}, {"type": "null"}]
    assert props["mode"] == {"type": "string", "enum": ["fast", "deep"], "default": "fast"}
    assert "title" not in schema
    assert not any("title" in prop for prop in props.values())


def test_a_function_with_a_model_parameter_and_an_unhinted_one():
    spec = tool_from_function(ship_to)

    assert spec.description == "Ship the order."
    assert spec.parameters["required"] == ["address", "express"]
    assert spec.parameters["properties"]["address"] == {"$ref": "#/$defs/Address"}
    assert spec.parameters["$defs"]["Address"]["required"] == ["street", "city"]
    assert spec.parameters["properties"]["express"] == {}


def lambda_free_name() -> None:
    """A function whose name is fine."""


@pytest.mark.parametrize(
    ("tools", "needle", "field"),
    [
        (
            [{"name": "a"}, {"type": "function", "function": {"name": "a"}}],
            "tool names must be unique",
            "tools[1].function.name",
        ),
        ([search_docs, search_docs], "tool names must be unique", "tools[1]"),
        ([{"name": "a"}, {"description": "no name"}], "tools[1] needs a name", "tools[1].name"),
        ([{"type": "function", "function": "get_weather"}], "tools[0] needs a name", "tools[0].function"),
        (
            [{"name": "a", "parameters": ["city"]}],
            "tools[0].parameters must be a JSON schema object",
            "tools[0].parameters",
        ),
        (["get_weather"], "tools[0] must be a dict or a function", "tools[0]"),
        ([lambda_free_name, lambda city: city], "tools[1] has the name '<lambda>'", "tools[1]"),
        ([{"name": "get weather"}], "tools[0] has the name 'get weather'", "tools[0].name"),
        ([{"name": "x" * 65}], "tools[0] has the name", "tools[0].name"),
        ({"name": "a"}, "tools must be a list", "tools"),
    ],
)
def test_bad_tools_are_bad_requests(tools, needle, field):
    with pytest.raises(LLMBadRequestError) as excinfo:
        normalise_tools(tools)

    assert needle in str(excinfo.value)
    assert excinfo.value.field == field


def test_no_tools_is_an_empty_list():
    assert normalise_tools(None) == []
    assert normalise_tools([]) == []


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        (None, None),
        ("auto", ToolChoice("auto")),
        ("none", ToolChoice("none")),
        ("required", ToolChoice("required")),
        ("get_weather", ToolChoice("tool", "get_weather")),
        ({"type": "function", "function": {"name": "get_weather"}}, ToolChoice("tool", "get_weather")),
    ],
)
def test_tool_choice_values(choice, expected):
    specs = normalise_tools([{"name": "get_weather", "parameters": WEATHER_PARAMS}])

    assert normalise_tool_choice(choice, specs) == expected


@pytest.mark.parametrize(
    ("choice", "tools", "needle"),
    [
        ("get_time", [{"name": "get_weather"}], "the name of a given tool, got 'get_time'"),
        ({"type": "function", "function": {"name": "nope"}}, [{"name": "get_weather"}], "got {'type'"),
        ("get_weather", [], "the name of a given tool"),
        ("required", [], "tool_choice 'required' needs tools"),
        (3, [{"name": "get_weather"}], "got 3"),
    ],
)
def test_a_tool_choice_that_names_no_given_tool_is_a_bad_request(choice, tools, needle):
    with pytest.raises(LLMBadRequestError) as excinfo:
        normalise_tool_choice(choice, normalise_tools(tools))

    assert needle in str(excinfo.value)
    assert excinfo.value.field == "tool_choice"


# --- structured output -----------------------------------------------------------------------


class Line(BaseModel):
    sku: str
    quantity: int = 1


class Order(BaseModel):
    customer: str
    note: str | None = None
    shipping: Address
    lines: list[Line]
    default: str = "x"  # a field named like a JSON-schema keyword
    properties: dict[str, str] = {}


def _objects(node, found=None):
    """Every object schema in ``node`` (schemas only, not property maps)."""
    found = [] if found is None else found
    if isinstance(node, dict):
        if node.get("type") == "object":
            found.append(node)
        for key, value in node.items():
            if key in ("properties", "$defs"):
                for child in value.values():
                    _objects(child, found)
            elif key in ("items", "anyOf", "additionalProperties"):
                _objects(value, found)
    elif isinstance(node, list):
        for item in node:
            _objects(item, found)
    return found


def test_strict_json_schema_closes_every_nested_object():
    schema = strict_json_schema(Order)

    objects = _objects(schema)
    assert len(objects) >= 4  # Order, Address, Line, the properties map
    top, defs = schema, schema["$defs"]
    assert top["additionalProperties"] is False
    assert top["required"] == ["customer", "note", "shipping", "lines", "default", "properties"]
    assert defs["Address"] == {
        "type": "object",
        "title": "Address",
        "properties": {
            "street": {"type": "string", "title": "Street"},
            "city": {"type": "string", "title": "City"},
        },
        "required": ["street", "city"],
        "additionalProperties": False,
    }
    assert defs["Line"]["required"] == ["sku", "quantity"]  # optional fields become required (strict)
    assert "default" not in defs["Line"]["properties"]["quantity"]
    # Field *names* are not keywords: "default" and "properties" stay as properties.
    assert top["properties"]["default"] == {"type": "string", "title": "Default"}
    assert top["properties"]["properties"]["type"] == "object"
    assert top["properties"]["properties"]["additionalProperties"] == {"type": "string"}  # kept
    assert "required" not in top["properties"]  # the property map itself is not a schema
    # The model's own schema is untouched.
    assert "additionalProperties" not in Order.model_json_schema()["$defs"]["Address"]


def test_strict_json_schema_of_a_dict_and_of_the_openai_wrapper():
    schema = {
        "type": "object",
        "properties": {
            "tags": {"type": "array", "items": {"type": "object", "properties": {"k": {"type": "string"}}}}
        },
    }
    wrapper = {"type": "json_schema", "json_schema": {"name": "tagged", "schema": schema}}

    for given in (schema, wrapper):
        strict = strict_json_schema(given)
        assert strict["required"] == ["tags"]
        assert strict["additionalProperties"] is False
        item = strict["properties"]["tags"]["items"]
        assert item["required"] == ["k"]
        assert item["additionalProperties"] is False
    assert "required" not in schema  # a deep copy


class Page(BaseModel):
    items: list[int]


def test_schema_names_are_what_openai_accepts():
    generic = type("Page[Item]", (Page,), {})

    assert schema_name(Order) == "Order"
    assert schema_name(generic) == "Page_Item_"
    assert schema_name({"type": "json_schema", "json_schema": {"name": "tagged", "schema": {}}}) == "tagged"
    assert schema_name({"title": "My schema", "type": "object"}) == "My_schema"
    assert schema_name({"type": "object"}) == "response"


def test_parse_structured_with_a_pydantic_model():
    text = json.dumps(
        {
            "customer": "Ada",
            "note": None,
            "shipping": {"street": "1 Main St", "city": "Paris"},
            "lines": [{"sku": "A1", "quantity": 2}],
            "default": "d",
            "properties": {},
        }
    )

    order = parse_structured(Order, text, provider="openai", model="gpt-4o-mini")

    assert isinstance(order, Order)
    assert order.shipping.city == "Paris"
    assert order.lines == [Line(sku="A1", quantity=2)]


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (
            '{"customer": "Ada", "shipping": {"street": "x"}, "lines": []}',
            "does not match Order: shipping.city",
        ),
        ("not json", "does not match Order"),
        ("", "returned no structured output"),
        (None, "returned no structured output"),
    ],
)
def test_parse_structured_keeps_the_raw_text_when_it_does_not_fit(text, needle):
    with pytest.raises(LLMResponseError) as excinfo:
        parse_structured(Order, text, provider="openai", model="gpt-4o-mini")

    assert needle in str(excinfo.value)
    assert excinfo.value.raw_text == text
    assert (excinfo.value.provider, excinfo.value.model) == ("openai", "gpt-4o-mini")


def test_parse_structured_with_a_dict_schema():
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}}

    assert parse_structured(schema, '{"answer": 42}') == {"answer": 42}
    with pytest.raises(LLMResponseError, match="not valid JSON") as excinfo:
        parse_structured(schema, '{"answer": ')
    assert excinfo.value.raw_text == '{"answer": '
    with pytest.raises(LLMResponseError, match="not a JSON object"):
        parse_structured(schema, "[42]")


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after-ms": "1500"}, 1.5),
        ({"retry-after-ms": "1500", "retry-after": "9"}, 1.5),  # the precise one wins
        ({"Retry-After-Ms": "250"}, 0.25),  # header names are case-insensitive
        ({"retry-after": "7"}, 7.0),
        ({"Retry-After": "7"}, 7.0),
        ({"retry-after": " 2.5 "}, 2.5),
        ({"retry-after-ms": "soon", "retry-after": "3"}, 3.0),  # a bad ms value falls back
        ({"retry-after-ms": "-5"}, None),
        ({"retry-after": "-1"}, None),
        ({"retry-after": "inf"}, None),
        ({"retry-after": "tomorrow"}, None),
        ({"retry-after": ""}, None),
        ({"content-type": "application/json"}, None),
        ({}, None),
        (None, None),
    ],
)
def test_retry_after_from_headers(headers, expected):
    assert retry_after_from_headers(headers) == expected


def test_retry_after_from_an_http_date():
    now = time.time()
    later = email.utils.formatdate(now + 30, usegmt=True)
    earlier = email.utils.formatdate(now - 30, usegmt=True)

    assert retry_after_from_headers({"retry-after": later}, now=now) == pytest.approx(30, abs=1)
    assert retry_after_from_headers({"retry-after": earlier}, now=now) == 0.0
    assert 28 <= (retry_after_from_headers({"Retry-After": later}) or 0) <= 31


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            {
                "error": {
                    "code": 429,
                    "status": "RESOURCE_EXHAUSTED",
                    "details": [
                        {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": []},
                        {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "30s"},
                    ],
                }
            },
            30.0,
        ),
        ({"details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "1.5s"}]}, 1.5),
        (
            {
                "error": {
                    "details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "soon"}]
                }
            },
            None,
        ),
        ({"error": {"details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo"}]}}, None),
        ({"error": {"details": "none"}}, None),
        ({"error": {"message": "quota"}}, None),
        ("RESOURCE_EXHAUSTED", None),
        (None, None),
    ],
)
def test_retry_after_from_google_details(body, expected):
    assert retry_after_from_google_details(body) == expected


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (400, LLMBadRequestError),
        (401, LLMAuthError),
        (403, LLMPermissionError),
        (404, LLMNotFoundError),
        (408, LLMTimeoutError),
        (413, LLMContextLengthError),
        (422, LLMBadRequestError),
        (409, LLMBadRequestError),
        (429, LLMRateLimitError),
        (500, LLMServerError),
        (529, LLMServerError),
        (302, LLMError),
        (None, LLMError),
    ],
)
def test_error_for_status(status, expected):
    assert error_for_status(status) is expected


@pytest.mark.parametrize(
    ("cls", "code", "message", "expected"),
    [
        (LLMBadRequestError, "context_length_exceeded", "too long", LLMContextLengthError),
        (
            LLMBadRequestError,
            None,
            "This model's maximum context length is 128000 tokens.",
            LLMContextLengthError,
        ),
        (
            LLMBadRequestError,
            None,
            "prompt is too long: 210000 tokens > 200000 maximum",
            LLMContextLengthError,
        ),
        (LLMBadRequestError, "content_filter", "The response was filtered", LLMContentFilterError),
        (LLMBadRequestError, None, "flagged by our content management policy", LLMContentFilterError),
        (LLMBadRequestError, "invalid_value", "temperature must be <= 2", LLMBadRequestError),
        (LLMRateLimitError, "context_length_exceeded", "too long", LLMRateLimitError),  # only 400s refine
        (LLMServerError, None, "content_filter", LLMServerError),
    ],
)
def test_refine_bad_request(cls, code, message, expected):
    assert refine_bad_request(cls, code, message) is expected


def test_errors_carry_their_context_and_never_a_registered_key(make_app):
    make_app(OPENAI_API_KEY=CANARY_KEY)  # registers the key as a secret

    error = LLMRateLimitError(
        f"Incorrect API key provided: {CANARY_KEY}",
        provider="openai",
        model="gpt-4o",
        status_code=429,
        retry_after=2.0,
    )

    assert CANARY_KEY not in str(error)
    assert CANARY_KEY not in error.message
    assert str(error).startswith("openai/gpt-4o: ")
    assert (error.provider, error.model, error.status_code, error.retry_after) == (
        "openai",
        "gpt-4o",
        429,
        2.0,
    )
    assert str(LLMError("plain")) == "plain"
    assert str(LLMError("x", provider="gemini")) == "gemini: x"
    assert LLMResponseError("bad", raw_text="{").raw_text == "{"
    assert LLMNotConfiguredError("no key", setting="OPENAI_API_KEY").setting == "OPENAI_API_KEY"


# --- addressing and configuration --------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("openai/gpt-4o-mini", ("openai", "gpt-4o-mini")),
        ("openrouter/meta-llama/llama-3-70b", ("openrouter", "meta-llama/llama-3-70b")),
        ("ollama/llama3.2:3b", ("ollama", "llama3.2:3b")),
        ("azure/my-deployment", ("azure", "my-deployment")),
    ],
)
def test_split_model(address, expected):
    assert split_model(address) == expected


@pytest.mark.parametrize("address", ["gpt-4o", "/gpt-4o", "openai/", ""])
def test_a_model_without_a_provider_is_a_bad_request(address):
    with pytest.raises(LLMBadRequestError, match="model must be 'provider/model'"):
        split_model(address)


@pytest.mark.parametrize(
    ("call", "field"),
    [
        # Each was a TypeError or AttributeError from inside the layer (found by a hypothesis run).
        (lambda llm: llm.chat([USER], -1), "model"),
        (lambda llm: llm.chat([USER], ["openai/gpt-4o"]), "model"),
        (lambda llm: llm.chat([USER], b"openai/gpt-4o"), "model"),
        (lambda llm: llm.chat([USER], "openai/gpt-4o", fallbacks=-1), "fallbacks"),
        (lambda llm: llm.chat([USER], "openai/gpt-4o", fallbacks=[None]), "fallbacks"),
        (lambda llm: llm.embed(-1, "openai/text-embedding-3-small"), "inputs"),
        (lambda llm: llm.embed(b"text", "openai/text-embedding-3-small"), "inputs"),
    ],
)
def test_arguments_of_the_wrong_type_are_bad_requests_naming_them(make_app, call, field):
    app = make_app(OPENAI_API_KEY=CANARY_KEY, OPENAI_BASE_URL="http://127.0.0.1:9/v1")
    with app.app_context(), pytest.raises(LLMBadRequestError) as caught:
        call(get_llm())
    assert caught.value.field == field


def test_the_default_model_applies_when_model_is_omitted(make_app, keepalive_server):
    app = make_app(
        OPENAI_API_KEY=CANARY_KEY,
        OPENAI_BASE_URL=keepalive_server.url_for("/v1"),
        OPENAI_MAX_RETRIES=0,
        LLM_DEFAULT_MODEL="openai/gpt-4.1-nano",
    )

    with app.app_context():
        response = get_llm().chat([USER])

    assert [r.json["model"] for r in keepalive_server.requests] == ["gpt-4.1-nano"]
    assert (response.provider, response.model, response.content) == ("openai", "gpt-4.1-nano", "hi")


def test_an_explicit_model_beats_the_default(make_app, keepalive_server):
    app = make_app(
        OPENAI_API_KEY=CANARY_KEY,
        OPENAI_BASE_URL=keepalive_server.url_for("/v1"),
        LLM_DEFAULT_MODEL="openai/gpt-4.1-nano",
    )

    with app.app_context():
        get_llm().chat([USER], model="openai/gpt-4o")

    assert keepalive_server.requests[0].json["model"] == "gpt-4o"


@pytest.mark.parametrize("value", ["gpt-4o", "openai/", "/gpt-4o"])
def test_the_default_model_is_validated_at_start(make_app, value):
    with pytest.raises(ConfigError, match="LLM_DEFAULT_MODEL must be 'provider/model'"):
        make_app(LLM_DEFAULT_MODEL=value)


def test_no_model_and_no_default_is_a_bad_request(make_app):
    app = make_app(OPENAI_API_KEY=CANARY_KEY)

    with app.app_context(), pytest.raises(LLMBadRequestError, match="LLM_DEFAULT_MODEL is not set"):
        get_llm().chat([USER])
    with app.app_context(), pytest.raises(LLMBadRequestError, match="LLM_DEFAULT_MODEL is not set"):
        get_llm().embed(["a"])


def test_an_unknown_provider_is_not_configured_and_lists_the_known_ones(make_app):
    app = make_app(OPENAI_API_KEY=CANARY_KEY, OPENAI_PROFILES={"vllm": {"base_url": "http://127.0.0.1:9/v1"}})

    with app.app_context(), pytest.raises(LLMNotConfiguredError) as excinfo:
        get_llm().chat([USER], model="mistral/mistral-large")

    error = excinfo.value
    assert error.provider == "mistral"
    assert error.setting == "OPENAI_PROFILES"
    assert "unknown provider 'mistral'" in str(error)
    for known in ("openai", "vllm", "gemini", "anthropic"):
        assert known in str(error)


@pytest.mark.parametrize(
    ("settings", "model", "setting"),
    [
        ({}, "openai/gpt-4o-mini", "OPENAI_API_KEY"),
        ({"OPENAI_PROFILES": {"groq": {}}}, "groq/llama-3.1-8b-instant", "GROQ_API_KEY"),
        ({"OPENAI_PROFILES": {"openrouter": {}}}, "openrouter/meta-llama/llama-3-70b", "OPENROUTER_API_KEY"),
    ],
)
def test_an_unconfigured_provider_names_the_missing_setting(make_app, settings, model, setting):
    app = make_app(**settings)

    with app.app_context():
        llm = get_llm()
        with pytest.raises(LLMNotConfiguredError) as chat_error:
            llm.chat([USER], model=model)
        with pytest.raises(LLMNotConfiguredError) as stream_error:
            llm.chat_stream([USER], model=model)
        with pytest.raises(LLMNotConfiguredError) as embed_error:
            llm.embed(["a"], model=model)

    for excinfo in (chat_error, stream_error, embed_error):
        assert excinfo.value.setting == setting
        assert setting in str(excinfo.value)
        assert excinfo.value.provider == model.split("/")[0]


def test_validation_errors_from_chat_carry_provider_and_model(make_app):
    app = make_app()  # nothing configured: validation comes first, no client is built

    with app.app_context():
        llm = get_llm()
        with pytest.raises(LLMBadRequestError) as excinfo:
            llm.chat([{"role": "user", "content": [{"type": "image", "data": PNG}]}], model="openai/gpt-4o")
        with pytest.raises(LLMBadRequestError, match="tool_choice"):
            llm.chat([USER], model="openai/gpt-4o", tools=[search_docs], tool_choice="get_weather")
        with pytest.raises(LLMBadRequestError, match="max_tokens must be a positive integer"):
            llm.chat([USER], model="openai/gpt-4o", max_tokens=0)
        with pytest.raises(LLMBadRequestError, match="response_format must be"):
            llm.chat([USER], model="openai/gpt-4o", response_format=str)
        with pytest.raises(LLMBadRequestError, match="non-empty list of strings"):
            llm.embed("just one string", model="openai/text-embedding-3-small")

    assert (excinfo.value.provider, excinfo.value.model) == ("openai", "gpt-4o")
    assert "messages[0].content[0].mime_type is required" in str(excinfo.value)
    assert excinfo.value.field == "messages[0].content[0].mime_type"  # kept when re-raised with context


def test_importing_app_llm_imports_no_sdk():
    code = (
        "import sys, app.llm\n"
        "from app.llm import get_llm, ChatResponse, ToolCall, LLMError\n"
        "sdks = ['openai', 'google.genai', 'anthropic', 'redis', 'httpx', 'httpx2']\n"
        "print(','.join(m for m in sdks if m in sys.modules))\n"
    )

    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True, timeout=60
    )

    assert result.stdout.strip() == ""
