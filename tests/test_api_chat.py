"""``POST /api/chat`` against a local server speaking the OpenAI protocol: success and every error."""

from __future__ import annotations

import json
import socket
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from werkzeug import Request, Response

from tests.conftest import CANARY_KEY, api_key_headers, chat_completion

CHAT_PATH = "/v1/chat/completions"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


@pytest.fixture
def chat_app(make_app, local_server):
    """An app whose default profile points at ``local_server`` with the canary key; no SDK retries."""
    return make_app(
        OPENAI_API_KEY=CANARY_KEY,
        OPENAI_BASE_URL=local_server.url_for("/v1"),
        OPENAI_MAX_RETRIES=0,
    )


def _post(app, body=None, **kwargs):
    if body is not None:
        kwargs["json"] = body
    return app.test_client().post("/api/chat", headers=api_key_headers(app), **kwargs)


def _assert_json_error(response, status: int, kind: str) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    text = response.get_data(as_text=True)
    assert "<html" not in text.lower()
    assert "Traceback" not in text
    error = json.loads(text)["error"]
    assert error["type"] == kind
    assert error["message"]
    return error


def _upstream_requests(local_server) -> list[Request]:
    return [request for request, _ in local_server.log]


# --- success -------------------------------------------------------------------------------


def test_chat_returns_content_model_and_usage(chat_app, local_server):
    local_server.expect_request(CHAT_PATH, method="POST").respond_with_json(
        chat_completion("Hello there", model="gpt-4o-mini-2024-07-18")
    )

    response = _post(chat_app, {"messages": MESSAGES, "model": "gpt-4o-mini"})

    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.json == {
        "content": "Hello there",
        "model": "gpt-4o-mini-2024-07-18",
        "provider": "openai",
        "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
        "finish_reason": "stop",
        "tool_calls": [],
    }
    (sent,) = _upstream_requests(local_server)
    assert sent.method == "POST"
    assert sent.path == CHAT_PATH
    assert sent.headers["Authorization"] == f"Bearer {CANARY_KEY}"
    assert sent.headers["Content-Type"] == "application/json"
    # The API key's name is the call's user, which OpenAI takes as `user`.
    assert json.loads(sent.get_data()) == {"messages": MESSAGES, "model": "gpt-4o-mini", "user": "tests"}


def test_chat_uses_the_named_profile(make_app, local_server):
    profile_key = "sk-profile-" + "9" * 24
    app = make_app(
        OPENAI_API_KEY=CANARY_KEY,
        OPENAI_BASE_URL=local_server.url_for("/default/v1"),
        OPENAI_PROFILES={
            "local": {
                "base_url": local_server.url_for("/local/v1"),
                "api_key": profile_key,
                "default_headers": {"X-Title": "flask-services"},
                "max_retries": 0,
            }
        },
    )
    local_server.expect_request("/local/v1/chat/completions", method="POST").respond_with_json(
        chat_completion("from local", model="llama3")
    )

    response = _post(app, {"messages": MESSAGES, "model": "llama3", "profile": "local"})

    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.json["content"] == "from local"
    (sent,) = _upstream_requests(local_server)
    assert sent.path == "/local/v1/chat/completions"
    assert sent.headers["Authorization"] == f"Bearer {profile_key}"
    assert sent.headers["X-Title"] == "flask-services"


def test_chat_sends_list_content_parts_in_the_openai_form(chat_app, local_server):
    local_server.expect_request(CHAT_PATH, method="POST").respond_with_json(chat_completion("ok"))
    image = "data:image/png;base64,iVBORw0KGgo="
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Just text"}]},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [{"type": "text", "text": "Describe this"},
                                     {"type": "image", "url": image}]},
    ]  # fmt: skip

    response = _post(chat_app, {"messages": messages, "model": "gpt-4o"})

    assert response.status_code == 200, response.get_data(as_text=True)
    (sent,) = _upstream_requests(local_server)
    assert json.loads(sent.get_data())["messages"] == [
        {"role": "user", "content": "Just text"},  # text-only parts are sent as a string
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [{"type": "text", "text": "Describe this"},
                                     {"type": "image_url", "image_url": {"url": image}}]},
    ]  # fmt: skip


def test_chat_addresses_provider_slash_model(make_app, local_server):
    app = make_app(
        OPENAI_API_KEY=CANARY_KEY,
        OPENAI_BASE_URL=local_server.url_for("/default/v1"),
        OPENAI_PROFILES={
            "local": {"base_url": local_server.url_for("/local/v1"), "api_key": "sk-" + "2" * 24}
        },
    )
    local_server.expect_request("/local/v1/chat/completions").respond_with_json(
        chat_completion("L", "llama3")
    )
    local_server.expect_request("/default/v1/chat/completions").respond_with_json(
        chat_completion("D", "gpt-4o")
    )

    local = _post(app, {"messages": MESSAGES, "model": "local/llama3"})
    default = _post(app, {"messages": MESSAGES, "model": "openai/gpt-4o"})

    assert (local.status_code, local.json["content"], local.json["provider"]) == (200, "L", "local")
    assert (default.status_code, default.json["content"], default.json["provider"]) == (200, "D", "openai")
    first, second = _upstream_requests(local_server)
    assert (first.path, json.loads(first.get_data())["model"]) == ("/local/v1/chat/completions", "llama3")
    assert (second.path, json.loads(second.get_data())["model"]) == ("/default/v1/chat/completions", "gpt-4o")


def test_chat_with_a_profile_sends_the_model_name_as_given(make_app, local_server):
    app = make_app(
        OPENAI_PROFILES={"router": {"base_url": local_server.url_for("/v1"), "api_key": "sk-" + "3" * 24}}
    )
    local_server.expect_request(CHAT_PATH).respond_with_json(chat_completion("ok", "meta-llama/llama-3-70b"))

    response = _post(app, {"messages": MESSAGES, "model": "meta-llama/llama-3-70b", "profile": "router"})

    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.json["provider"] == "router"
    (sent,) = _upstream_requests(local_server)
    assert json.loads(sent.get_data())["model"] == "meta-llama/llama-3-70b"


def test_unknown_provider_is_a_400_listing_the_known_ones(chat_app, local_server):
    error = _assert_json_error(
        _post(chat_app, {"messages": MESSAGES, "model": "nope/x"}), 400, "invalid_request"
    )

    assert error["field"] == "model"
    assert "'nope/x'" in error["message"]
    assert "openai" in error["message"]
    assert local_server.log == []


def test_provider_preset_without_its_key_is_a_503_naming_it(make_app, local_server):
    app = make_app(OPENAI_API_KEY=CANARY_KEY, OPENAI_PROFILES={"groq": {}})

    response = _post(app, {"messages": MESSAGES, "model": "groq/llama-3.1-8b-instant"})

    error = _assert_json_error(response, 503, "not_configured")
    assert error["setting"] == "GROQ_API_KEY"
    assert local_server.log == []


def test_chat_sends_options_and_developer_messages_as_system(chat_app, local_server):
    local_server.expect_request(CHAT_PATH).respond_with_json(chat_completion("ok"))
    messages = [{"role": "developer", "content": "Be terse."}, {"role": "user", "content": "Hi"}]

    response = _post(
        chat_app, {"messages": messages, "model": "gpt-4o", "temperature": 0.2, "max_tokens": 50}
    )

    assert response.status_code == 200, response.get_data(as_text=True)
    (sent,) = _upstream_requests(local_server)
    assert json.loads(sent.get_data()) == {
        "model": "gpt-4o",
        "messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}],
        "temperature": 0.2,
        "max_completion_tokens": 50,  # OpenAI itself; compatible servers get max_tokens
        "user": "tests",  # the API key's name
    }


def test_chat_sends_the_generation_parameters_in_the_providers_form(chat_app, local_server):
    local_server.expect_request(CHAT_PATH).respond_with_json(chat_completion("ok"))
    options = {"top_p": 0.9, "stop": ["END"], "seed": 7, "presence_penalty": 0.5, "frequency_penalty": -0.5}

    response = _post(chat_app, {"messages": MESSAGES, "model": "gpt-4o", **options, "user": "not me"})

    assert response.status_code == 200, response.get_data(as_text=True)
    (sent,) = _upstream_requests(local_server)
    body = json.loads(sent.get_data())
    assert {name: body.get(name) for name in options} == options
    assert body["user"] == "tests"  # the API key's name, never the body's


def tool_completion(*calls: tuple[str, str, str]) -> dict:
    completion = chat_completion(None, model="gpt-4o")
    choice = completion["choices"][0]
    choice["finish_reason"] = "tool_calls"
    choice["message"]["tool_calls"] = [
        {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
        for call_id, name, arguments in calls
    ]
    return completion


WEATHER_PARAMS = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


def test_chat_with_tools_returns_tool_calls(chat_app, local_server):
    local_server.expect_request(CHAT_PATH).respond_with_json(
        tool_completion(("call_1", "get_weather", '{"city": "Paris"}'), ("call_2", "get_time", ""))
    )
    tools = [
        {"type": "function", "function": {"name": "get_weather", "description": "Weather.",
                                          "parameters": WEATHER_PARAMS}},
        {"name": "get_time", "description": "The time."},  # the flat form
    ]  # fmt: skip

    response = _post(
        chat_app,
        {"messages": MESSAGES, "model": "openai/gpt-4o", "tools": tools, "tool_choice": "get_weather"},
    )

    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.json["content"] is None
    assert response.json["finish_reason"] == "tool_calls"
    assert response.json["tool_calls"] == [
        {"id": "call_1", "name": "get_weather", "arguments": {"city": "Paris"}},
        {"id": "call_2", "name": "get_time", "arguments": {}},
    ]
    (sent,) = _upstream_requests(local_server)
    body = json.loads(sent.get_data())
    assert body["tools"] == [
        {"type": "function", "function": {"name": "get_weather", "description": "Weather.",
                                          "parameters": WEATHER_PARAMS}},
        {"type": "function", "function": {"name": "get_time", "description": "The time.",
                                          "parameters": {"type": "object", "properties": {}}}},
    ]  # fmt: skip
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}


def test_chat_sends_tool_results_back(chat_app, local_server):
    local_server.expect_request(CHAT_PATH).respond_with_json(chat_completion("It is sunny."))
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                              "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]  # fmt: skip

    tools = [{"name": "get_weather", "parameters": WEATHER_PARAMS}]

    response = _post(
        chat_app, {"messages": messages, "model": "gpt-4o", "tool_choice": "none", "tools": tools}
    )

    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.json["content"] == "It is sunny."
    (sent,) = _upstream_requests(local_server)
    body = json.loads(sent.get_data())
    assert body["messages"][1]["tool_calls"][0]["function"] == {"name": "get_weather",
                                                               "arguments": '{"city": "Paris"}'}  # fmt: skip
    assert body["messages"][2] == {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}
    assert body["tool_choice"] == "none"


def test_malformed_tool_arguments_from_the_model_are_a_502(chat_app, local_server):
    local_server.expect_request(CHAT_PATH).respond_with_json(
        tool_completion(("call_1", "get_weather", '{"city": "Par'))
    )

    tools = [{"name": "get_weather", "parameters": WEATHER_PARAMS}]

    response = _post(chat_app, {"messages": MESSAGES, "model": "gpt-4o", "tools": tools})

    error = _assert_json_error(response, 502, "upstream_error")
    assert "get_weather" in error["message"]


ANSWER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
}


@pytest.mark.parametrize(
    ("response_format", "name"),
    [
        (ANSWER_SCHEMA, "response"),
        ({**ANSWER_SCHEMA, "title": "city_facts"}, "city_facts"),
        ({"type": "json_schema",
          "json_schema": {"name": "city_facts", "schema": ANSWER_SCHEMA, "strict": True}}, "city_facts"),
    ],
)  # fmt: skip
def test_chat_with_a_json_schema_returns_parsed(chat_app, local_server, response_format, name):
    local_server.expect_request(CHAT_PATH).respond_with_json(
        chat_completion('{"city": "Paris", "population": 2102650}')
    )

    response = _post(chat_app, {"messages": MESSAGES, "model": "gpt-4o", "response_format": response_format})

    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.json["parsed"] == {"city": "Paris", "population": 2102650}
    assert response.json["content"] == '{"city": "Paris", "population": 2102650}'
    (sent,) = _upstream_requests(local_server)
    sent_format = json.loads(sent.get_data())["response_format"]
    assert sent_format["type"] == "json_schema"
    assert sent_format["json_schema"]["name"] == name
    assert sent_format["json_schema"]["strict"] is True
    schema = sent_format["json_schema"]["schema"]
    assert schema["properties"] == ANSWER_SCHEMA["properties"]
    assert schema["additionalProperties"] is False  # what OpenAI's strict mode requires
    assert schema["required"] == ["city", "population"]


def test_no_parsed_field_without_response_format(chat_app, local_server):
    local_server.expect_request(CHAT_PATH).respond_with_json(chat_completion('{"city": "Paris"}'))
    response = _post(chat_app, {"messages": MESSAGES, "model": "gpt-4o"})
    assert "parsed" not in response.json
    assert "response_format" not in json.loads(_upstream_requests(local_server)[0].get_data())


def test_structured_output_that_is_not_json_is_a_502(chat_app, local_server):
    local_server.expect_request(CHAT_PATH).respond_with_json(chat_completion("Paris, about 2 million"))

    response = _post(chat_app, {"messages": MESSAGES, "model": "gpt-4o", "response_format": ANSWER_SCHEMA})

    error = _assert_json_error(response, 502, "upstream_error")
    assert "could not be read" in error["message"]
    assert "not valid JSON" in error["message"]


# --- invalid requests: 400 naming the field, nothing sent upstream ------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"data": "{not json", "content_type": "application/json"}, "body"),
        ({"data": json.dumps({"messages": MESSAGES, "model": "m"}), "content_type": "text/plain"}, "body"),
        ({"json": ["messages"]}, "body"),
        ({"json": "hello"}, "body"),
        ({"json": {"model": "gpt-4o"}}, "messages"),
        ({"json": {"messages": [], "model": "gpt-4o"}}, "messages"),
        ({"json": {"messages": "hi", "model": "gpt-4o"}}, "messages"),
        ({"json": {"messages": ["hi"], "model": "gpt-4o"}}, "messages[0]"),
        ({"json": {"messages": [{"content": "hi"}], "model": "gpt-4o"}}, "messages[0].role"),
        ({"json": {"messages": [*MESSAGES, {"role": "wizard", "content": "x"}], "model": "m"}},
         "messages[2].role"),
        ({"json": {"messages": [{"role": "user"}], "model": "gpt-4o"}}, "messages[0].content"),
        ({"json": {"messages": [{"role": "user", "content": 42}], "model": "gpt-4o"}}, "messages[0].content"),
        ({"json": {"messages": MESSAGES}}, "model"),
        ({"json": {"messages": MESSAGES, "model": "   "}}, "model"),
        ({"json": {"messages": MESSAGES, "model": 4}}, "model"),
        ({"json": {"messages": MESSAGES, "model": "m", "profile": 3}}, "profile"),
        ({"json": {"messages": MESSAGES, "model": "m", "profile": ""}}, "profile"),
        ({"json": {"messages": MESSAGES, "model": "nope/gpt-4o"}}, "model"),
        ({"json": {"messages": MESSAGES, "model": "openai/"}}, "model"),
        ({"json": {"messages": MESSAGES, "model": "/gpt-4o"}}, "model"),
        ({"json": {"messages": [{"role": "tool", "content": "42"}], "model": "m"}},
         "messages[0].tool_call_id"),
        ({"json": {"messages": [{"role": "user", "content": [{"type": "audio"}]}], "model": "m"}},
         "messages[0].content[0].type"),
        ({"json": {"messages": MESSAGES, "model": "m", "tools": {"name": "f"}}}, "tools"),
        ({"json": {"messages": MESSAGES, "model": "m", "tools": [{"description": "no name"}]}},
         "tools[0].name"),
        ({"json": {"messages": MESSAGES, "model": "m",
                   "tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}},
         "tools[0].function.parameters"),
        ({"json": {"messages": MESSAGES, "model": "m", "tools": [{"name": "f", "parameters": "x"}]}},
         "tools[0].parameters"),
        ({"json": {"messages": MESSAGES, "model": "m", "tools": [{"name": "f"}, {"name": "f"}]}},
         "tools[1].name"),
        ({"json": {"messages": MESSAGES, "model": "m", "tool_choice": 3}}, "tool_choice"),
        ({"json": {"messages": MESSAGES, "model": "m", "tools": [{"name": "f"}], "tool_choice": "g"}},
         "tool_choice"),
        ({"json": {"messages": MESSAGES, "model": "m", "response_format": "json"}}, "response_format"),
        ({"json": {"messages": MESSAGES, "model": "m", "response_format": {"type": "array"}}},
         "response_format"),
        ({"json": {"messages": MESSAGES, "model": "m",
                   "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}},
         "response_format.json_schema.schema"),
        ({"json": {"messages": MESSAGES, "model": "m",
                   "response_format": {"type": "json_schema", "json_schema": "x"}}},
         "response_format.json_schema"),
        ({"json": {"messages": MESSAGES, "model": "m", "temperature": "hot"}}, "temperature"),
        ({"json": {"messages": MESSAGES, "model": "m", "temperature": -1}}, "temperature"),
        ({"json": {"messages": MESSAGES, "model": "m", "temperature": True}}, "temperature"),
        ({"json": {"messages": MESSAGES, "model": "m", "max_tokens": 0}}, "max_tokens"),
        ({"json": {"messages": MESSAGES, "model": "m", "max_tokens": 2.5}}, "max_tokens"),
        ({"json": {"messages": MESSAGES, "model": "m", "stream": "yes"}}, "stream"),
        ({"json": {"messages": MESSAGES, "model": "m", "top_p": 1.5}}, "top_p"),
        ({"json": {"messages": MESSAGES, "model": "m", "stop": ["ok", ""]}}, "stop[1]"),
        ({"json": {"messages": MESSAGES, "model": "m", "seed": 2**64}}, "seed"),
        ({"json": {"messages": MESSAGES, "model": "m", "presence_penalty": -3}}, "presence_penalty"),
        ({"json": {"messages": MESSAGES, "model": "m", "reasoning_effort": "max"}}, "reasoning_effort"),
        ({"json": {"messages": MESSAGES, "model": "m", "thinking_budget": 100_000_000}}, "thinking_budget"),
        ({"json": {"messages": MESSAGES, "model": "m", "safety": []}}, "safety"),
        # Any provider field and the operator's settings are not taken over HTTP, nor left unsaid.
        ({"json": {"messages": MESSAGES, "model": "m", "extra": {"n": 64}}}, "extra"),
        ({"json": {"messages": MESSAGES, "model": "m", "max_completion_tokens": 10**8}},
         "max_completion_tokens"),
        ({"json": {"messages": MESSAGES, "model": "m", "api_key": "sk-other"}}, "api_key"),
        ({"json": {"messages": [{"role": "user", "content": "0", "tool_calls": 1}], "model": "m"}},
         "messages[0].tool_calls"),
    ],
)  # fmt: skip
def test_invalid_body_is_a_400_naming_the_field(chat_app, local_server, kwargs, field):
    response = chat_app.test_client().post("/api/chat", headers=api_key_headers(chat_app), **kwargs)

    error = _assert_json_error(response, 400, "invalid_request")
    assert error["field"] == field
    assert field.split("[")[0].split(".")[0] in error["message"]
    assert local_server.log == []


def test_unknown_profile_is_a_400_listing_the_configured_ones(make_app, local_server):
    app = make_app(
        OPENAI_API_KEY=CANARY_KEY,
        OPENAI_PROFILES={"local": {"base_url": local_server.url_for("/v1"), "api_key": "sk-" + "1" * 20}},
    )

    response = _post(app, {"messages": MESSAGES, "model": "m", "profile": "nope"})

    error = _assert_json_error(response, 400, "invalid_request")
    assert error["field"] == "profile"
    assert "'nope'" in error["message"]
    assert "'default'" in error["message"]
    assert "'local'" in error["message"]
    assert local_server.log == []


def test_provider_not_configured_is_a_503_naming_the_setting(make_app, local_server):
    app = make_app(OPENAI_BASE_URL=local_server.url_for("/v1"))

    response = _post(app, {"messages": MESSAGES, "model": "gpt-4o"})

    error = _assert_json_error(response, 503, "not_configured")
    assert error["setting"] == "OPENAI_API_KEY"
    assert "OPENAI_API_KEY" in error["message"]
    assert local_server.log == []


def test_profile_whose_key_variable_is_unset_is_a_503_naming_it(make_app, local_server):
    app = make_app(
        OPENAI_PROFILES={"local": {"base_url": local_server.url_for("/v1"), "api_key_env": "X_KEY"}}
    )

    response = _post(app, {"messages": MESSAGES, "model": "m", "profile": "local"})

    error = _assert_json_error(response, 503, "not_configured")
    assert error["setting"] == "X_KEY"


# --- upstream errors -----------------------------------------------------------------------


def test_upstream_401_is_a_502_that_never_shows_the_key(chat_app, local_server):
    # Like OpenAI's real answer, the body quotes (part of) the key back.
    local_server.expect_request(CHAT_PATH).respond_with_json(
        {"error": {"message": f"Incorrect API key provided: {CANARY_KEY}.", "type": "invalid_request_error",
                   "code": "invalid_api_key"}},
        status=401,
        headers={"X-Echo": CANARY_KEY},
    )  # fmt: skip

    response = _post(chat_app, {"messages": MESSAGES, "model": "gpt-4o"})

    error = _assert_json_error(response, 502, "upstream_auth")
    assert error["upstream_status"] == 401
    assert CANARY_KEY not in response.get_data(as_text=True)
    assert all(CANARY_KEY not in value for value in response.headers.values())
    assert len(local_server.log) == 1


def test_upstream_403_is_a_502(chat_app, local_server):
    local_server.expect_request(CHAT_PATH).respond_with_json({"error": {"message": "no"}}, status=403)
    error = _assert_json_error(_post(chat_app, {"messages": MESSAGES, "model": "m"}), 502, "upstream_auth")
    assert error["upstream_status"] == 403


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Retry-After": "7"}, "7"),
        ({"retry-after-ms": "2500"}, "3"),
        ({"retry-after-ms": "2500", "Retry-After": "9"}, "3"),
        ({"retry-after-ms": "soon", "Retry-After": "9"}, "9"),
        ({"Retry-After": "0"}, "0"),
        ({"retry-after-ms": "1"}, "1"),  # rounded up: never "retry now" when the provider said wait
    ],
)
def test_upstream_429_passes_retry_after_on(chat_app, local_server, headers, expected):
    local_server.expect_request(CHAT_PATH).respond_with_json(
        {"error": {"message": "Rate limit reached", "type": "requests"}}, status=429, headers=headers
    )

    response = _post(chat_app, {"messages": MESSAGES, "model": "gpt-4o"})

    _assert_json_error(response, 429, "rate_limited")
    assert response.headers["Retry-After"] == expected
    assert len(local_server.log) == 1  # OPENAI_MAX_RETRIES=0: the SDK did not retry


def test_upstream_429_with_an_http_date_passes_on_the_seconds_until_then(chat_app, local_server):
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=120), usegmt=True)
    local_server.expect_request(CHAT_PATH).respond_with_json(
        {"error": {"message": "Rate limit reached"}}, status=429, headers={"Retry-After": when}
    )

    response = _post(chat_app, {"messages": MESSAGES, "model": "gpt-4o"})

    _assert_json_error(response, 429, "rate_limited")
    assert 115 <= int(response.headers["Retry-After"]) <= 121


def test_upstream_429_without_retry_after_sends_none(chat_app, local_server):
    local_server.expect_request(CHAT_PATH).respond_with_json({"error": {"message": "slow"}}, status=429)
    response = _post(chat_app, {"messages": MESSAGES, "model": "gpt-4o"})
    _assert_json_error(response, 429, "rate_limited")
    assert "Retry-After" not in response.headers


def test_upstream_timeout_is_a_504(make_app, local_server):
    app = make_app(
        OPENAI_API_KEY=CANARY_KEY,
        OPENAI_BASE_URL=local_server.url_for("/v1"),
        OPENAI_MAX_RETRIES=0,
        OPENAI_TIMEOUT=0.3,
    )

    def slow(_request: Request) -> Response:
        time.sleep(1.5)
        return Response(json.dumps(chat_completion()), content_type="application/json")

    local_server.expect_request(CHAT_PATH).respond_with_handler(slow)

    started = time.monotonic()
    response = _post(app, {"messages": MESSAGES, "model": "gpt-4o"})
    elapsed = time.monotonic() - started

    error = _assert_json_error(response, 504, "upstream_timeout")
    assert "did not answer in time" in error["message"]
    assert elapsed < 1.4  # gave up at the 0.3 s read timeout, not when the server answered
    time.sleep(max(0.0, 1.6 - elapsed))  # let the handler finish before the server stops


def test_upstream_500_is_a_502(chat_app, local_server):
    local_server.expect_request(CHAT_PATH).respond_with_json(
        {"error": {"message": "The server had an error"}}, status=500
    )

    error = _assert_json_error(_post(chat_app, {"messages": MESSAGES, "model": "m"}), 502, "upstream_error")

    assert error["upstream_status"] == 500
    assert len(local_server.log) == 1


def test_upstream_connection_refused_is_a_502(make_app):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = make_app(
        OPENAI_API_KEY=CANARY_KEY, OPENAI_BASE_URL=f"http://127.0.0.1:{port}/v1", OPENAI_MAX_RETRIES=0
    )

    response = _post(app, {"messages": MESSAGES, "model": "gpt-4o"})

    error = _assert_json_error(response, 502, "upstream_unreachable")
    assert "could not be reached" in error["message"]


def test_upstream_404_is_a_400_with_the_providers_explanation(chat_app, local_server):
    local_server.expect_request(CHAT_PATH).respond_with_json(
        {"error": {"message": f"The model `gpt-9` does not exist (key {CANARY_KEY})",
                   "type": "invalid_request_error", "code": "model_not_found"}},
        status=404,
    )  # fmt: skip

    response = _post(chat_app, {"messages": MESSAGES, "model": "gpt-9"})

    error = _assert_json_error(response, 400, "upstream_rejected")
    assert error["upstream_status"] == 404
    assert error["reason"] == "not_found"
    assert "The model `gpt-9` does not exist" in error["message"]
    assert CANARY_KEY not in response.get_data(as_text=True)


@pytest.mark.parametrize(
    ("status", "error", "reason"),
    [
        (400, {"message": "This model's maximum context length is 128000 tokens. However, your messages"
                          " resulted in 130000 tokens.", "type": "invalid_request_error",
               "code": "context_length_exceeded"}, "context_length"),
        (400, {"message": "Your request was rejected as a result of our safety system.",
               "type": "invalid_request_error", "code": "content_policy_violation"}, "content_filter"),
        (400, {"message": "Invalid value for 'temperature'.", "type": "invalid_request_error",
               "code": None}, "bad_request"),
    ],
)  # fmt: skip
def test_upstream_400_is_a_400_with_the_reason(chat_app, local_server, status, error, reason):
    local_server.expect_request(CHAT_PATH).respond_with_json({"error": error}, status=status)

    body = _assert_json_error(_post(chat_app, {"messages": MESSAGES, "model": "m"}), 400, "upstream_rejected")

    assert body["upstream_status"] == 400
    assert body["reason"] == reason
    assert error["message"][:40] in body["message"]


def test_upstream_4xx_without_a_json_body_says_no_detail(chat_app, local_server):
    local_server.expect_request(CHAT_PATH).respond_with_data("nope", status=422, content_type="text/plain")

    error = _assert_json_error(
        _post(chat_app, {"messages": MESSAGES, "model": "m"}), 400, "upstream_rejected"
    )

    assert error["upstream_status"] == 422
    assert error["message"].endswith("no detail")


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        ("{not json", "application/json"),
        ("<html><body>Bad gateway</body></html>", "text/html"),
        (json.dumps({"choices": "zzz"}), "application/json"),
        (json.dumps({"id": "chatcmpl-1", "object": "chat.completion"}), "application/json"),
    ],
)
def test_upstream_2xx_that_is_not_a_completion_is_a_502(chat_app, local_server, body, content_type):
    local_server.expect_request(CHAT_PATH).respond_with_data(body, content_type=content_type)

    response = _post(chat_app, {"messages": MESSAGES, "model": "m"})

    error = _assert_json_error(response, 502, "upstream_error")
    assert "could not be read" in error["message"]


# --- routing and unexpected errors: JSON too ---------------------------------------------


def test_unknown_api_route_is_a_json_404(client):
    error = _assert_json_error(client.get("/api/nope"), 404, "not_found")
    assert error["message"]


def test_get_on_chat_is_a_json_405_with_allow(client):
    response = client.get("/api/chat")

    _assert_json_error(response, 405, "method_not_allowed")
    allowed = {method.strip() for method in response.headers["Allow"].split(",")}
    assert "POST" in allowed
    assert "GET" not in allowed


def test_unexpected_exception_is_a_json_500_without_traceback(make_app, caplog):
    app = make_app()

    @app.get("/api/boom")
    def boom():
        raise RuntimeError(f"database password is {CANARY_KEY}")

    response = app.test_client().get("/api/boom")

    error = _assert_json_error(response, 500, "internal_error")
    assert error["message"] == "the server hit an unexpected error"
    text = response.get_data(as_text=True)
    assert "RuntimeError" not in text
    assert CANARY_KEY not in text
    assert "boom" not in text
    # Operators still get the traceback, in the log.
    (record,) = [r for r in caplog.records if r.getMessage().startswith("unhandled error")]
    assert record.exc_info is not None
