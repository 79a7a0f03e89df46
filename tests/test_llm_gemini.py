"""The LLM layer's Gemini adapter, against a local server speaking the Gemini API (v1beta).

Every handler checks the body google-genai sends and answers with the shapes
Gemini documents: ``generateContent``, ``streamGenerateContent?alt=sse`` (SSE
``data:`` chunks), ``batchEmbedContents``, ``models`` and its error bodies
(``{"error": {"code", "message", "status", "details"}}``).

What every adapter promises alike (chat, streams, tools, structured output,
the common HTTP errors, timeouts, closing streams) is tested once for all in
``tests/test_provider_contract.py``; this file keeps what is Gemini's own.
"""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import pytest
from google.genai import errors as genai_errors
from google.genai import types as genai_types
from pydantic import BaseModel
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from app.llm import (
    LLMAuthError,
    LLMBadRequestError,
    LLMContextLengthError,
    LLMError,
    LLMNotConfiguredError,
    LLMNotFoundError,
    LLMPermissionError,
    LLMRateLimitError,
    LLMResponseError,
    LLMServerError,
    ToolCall,
    get_llm,
)
from tests.conftest import CANARY_GEMINI_KEY
from tests.payloads import gemini_call as call
from tests.payloads import gemini_error as error_body
from tests.payloads import gemini_reply as reply
from tests.payloads import gemini_sse as sse
from tests.payloads import gemini_text as text
from tests.payloads import gemini_text_chunk as text_chunk

MODEL = "gemini-2.5-flash"
ADDRESS = f"gemini/{MODEL}"
BASE = f"/v1beta/models/{MODEL}"
GENERATE = f"{BASE}:generateContent"
STREAM = f"{BASE}:streamGenerateContent"
PIXEL = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)


# --- helpers ---------------------------------------------------------------------


@pytest.fixture
def server(local_server: HTTPServer) -> HTTPServer:
    """The session's local HTTP server, with no handlers and an empty log for each test."""
    return local_server


def gemini_app(make_app, server, **settings):
    return make_app(
        {
            "GEMINI_API_KEY": CANARY_GEMINI_KEY,
            "GENAI_BASE_URL": server.url_for("/"),
            "GENAI_API_VERSION": "v1beta",
        },
        **settings,
    )


def get(obj: dict[str, Any], camel: str) -> Any:
    """A field in either spelling: the API accepts lowerCamelCase and proto snake_case alike."""
    snake = "".join(f"_{c.lower()}" if c.isupper() else c for c in camel)
    return obj[camel] if camel in obj else obj[snake]


def unbase64(value: str) -> bytes:
    """Bytes fields as google-genai sends them (URL-safe base64, which the API accepts)."""
    return base64.urlsafe_b64decode(value)


def camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(word.title() for word in rest)


class Recorder:
    """A handler that records each request's JSON body and answers with ``answer(request)``."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.bodies: list[dict[str, Any]] = []
        self.requests: list[Request] = []

    def __call__(self, request: Request) -> Response:
        self.requests.append(request)
        self.bodies.append(request.get_json(silent=True) or {})
        answer = self.answer
        if not isinstance(answer, Response | dict):
            answer = answer(request)
        if isinstance(answer, Response):
            return answer
        return Response(json.dumps(answer), content_type="application/json")

    @property
    def body(self) -> dict[str, Any]:
        (body,) = self.bodies
        return body


def serve(server, path: str, answer: Any, **match: Any) -> Recorder:
    recorder = Recorder(answer)
    server.expect_request(path, method=match.pop("method", "POST"), **match).respond_with_handler(recorder)
    return recorder


def streaming(*chunks: dict[str, Any]) -> Response:
    return Response(sse(*chunks), content_type="text/event-stream")


def chat(app, messages, **kwargs):
    with app.app_context():
        return get_llm().chat(messages, model=kwargs.pop("model", ADDRESS), **kwargs)


def run(app, coroutine_function):
    with app.app_context():
        return asyncio.run(coroutine_function())


USER = [{"role": "user", "content": "Hi"}]


# --- message translation ---------------------------------------------------------


def test_chat_sends_key_system_instruction_and_multi_turn_contents(make_app, server):
    recorder = serve(server, GENERATE, reply(text("Paris.")))
    app = gemini_app(make_app, server)
    response = chat(
        app,
        [
            {"role": "system", "content": "Be brief."},
            {"role": "system", "content": "Answer in English."},
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Which country? I mean: France?"},
            {"role": "user", "content": [{"type": "text", "text": "Yes, France."}]},
        ],
    )

    request = recorder.requests[0]
    assert request.path == GENERATE
    assert request.headers["x-goog-api-key"] == CANARY_GEMINI_KEY
    body = recorder.body
    assert body["systemInstruction"]["parts"] == [{"text": "Be brief.\n\nAnswer in English."}]
    assert [(c["role"], c["parts"]) for c in body["contents"]] == [
        ("user", [{"text": "Capital of France?"}]),
        ("model", [{"text": "Which country? I mean: France?"}]),
        ("user", [{"text": "Yes, France."}]),
    ]
    assert "tools" not in body
    assert "toolConfig" not in body
    assert body.get("generationConfig", {}) == {}  # nothing asked for, nothing sent

    assert response.content == "Paris."
    assert response.provider == "gemini"
    assert response.model == "gemini-2.5-flash-001"  # the modelVersion Gemini answered with
    assert response.finish_reason == "stop"
    assert (response.input_tokens, response.output_tokens, response.total_tokens) == (11, 5, 16)
    assert response.tool_calls == []
    assert response.has_tool_calls is False
    assert isinstance(response.raw, genai_types.GenerateContentResponse)
    assert response.latency_ms > 0


def test_temperature_and_max_tokens_reach_generation_config(make_app, server):
    recorder = serve(server, GENERATE, reply(text("ok"), model_version=None))
    app = gemini_app(make_app, server)
    response = chat(app, USER, temperature=0.25, max_tokens=77)
    assert recorder.body["generationConfig"] == {"temperature": 0.25, "maxOutputTokens": 77}
    assert response.model == MODEL  # no modelVersion: the requested model


def test_images_as_bytes_data_url_and_https_url(make_app, server):
    recorder = serve(server, GENERATE, reply(text("a pixel")))
    app = gemini_app(make_app, server)
    data_url = "data:image/gif;base64," + base64.b64encode(b"GIF89a-bytes").decode()
    chat(
        app,
        [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What are these?"},
                    {"type": "image", "data": PIXEL, "mime_type": "image/png"},
                    {"type": "image", "url": data_url},
                    {"type": "image_url", "image_url": {"url": "https://img.example/cat.webp?size=2"}},
                    {"type": "image", "url": "https://img.example/render"},  # no extension: jpeg
                ],
            }
        ],
    )
    (content,) = recorder.body["contents"]
    assert content["role"] == "user"
    text_part, png, gif, webp, unknown = content["parts"]
    assert text_part == {"text": "What are these?"}
    png_blob, gif_blob = get(png, "inlineData"), get(gif, "inlineData")
    assert unbase64(png_blob["data"]) == PIXEL
    assert get(png_blob, "mimeType") == "image/png"
    assert unbase64(gif_blob["data"]) == b"GIF89a-bytes"
    assert get(gif_blob, "mimeType") == "image/gif"
    webp_file, unknown_file = get(webp, "fileData"), get(unknown, "fileData")
    assert get(webp_file, "fileUri") == "https://img.example/cat.webp?size=2"
    assert get(webp_file, "mimeType") == "image/webp"
    assert get(unknown_file, "fileUri") == "https://img.example/render"
    assert get(unknown_file, "mimeType") == "image/jpeg"


def test_only_system_messages_is_a_bad_request_before_any_call(make_app, server):
    app = gemini_app(make_app, server)
    with pytest.raises(LLMBadRequestError) as info:
        chat(app, [{"role": "system", "content": "Be brief."}])
    assert info.value.provider == "gemini"
    assert info.value.model == MODEL
    assert server.log == []


def test_thought_parts_are_not_content_and_thinking_tokens_count_as_output(make_app, server):
    serve(
        server,
        GENERATE,
        reply(
            {"text": "Let me think about France...", "thought": True},
            text("Paris"),
            text(" it is."),
            usage={
                "promptTokenCount": 4,
                "candidatesTokenCount": 3,
                "thoughtsTokenCount": 20,
                "totalTokenCount": 27,
            },
        ),
    )
    app = gemini_app(make_app, server)
    response = chat(app, USER)
    assert response.content == "Paris it is."
    assert (response.input_tokens, response.output_tokens, response.total_tokens) == (4, 23, 27)


# --- tools -------------------------------------------------------------------------


def get_weather(city: str, unit: str = "celsius") -> str:
    """Current weather in a city."""
    return f"sunny in {city} ({unit})"


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Local time in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def test_tool_declarations_and_a_tool_call(make_app, server):
    recorder = serve(server, GENERATE, reply(call("get_weather", {"city": "Oslo"})))
    app = gemini_app(make_app, server)
    response = chat(
        app,
        [{"role": "user", "content": "Weather in Oslo?"}],
        tools=[get_weather, WEATHER_TOOL, {"name": "noop", "description": "", "parameters": None}],
    )

    (tool,) = recorder.body["tools"]
    weather, time_tool, noop = tool["functionDeclarations"]
    assert weather["name"] == "get_weather"
    assert weather["description"] == "Current weather in a city."
    schema = get(weather, "parametersJsonSchema")
    assert schema["properties"]["city"] == {"type": "string"}
    assert schema["required"] == ["city"]
    assert time_tool["name"] == "get_time"
    assert get(time_tool, "parametersJsonSchema") == WEATHER_TOOL["function"]["parameters"]
    assert noop["name"] == "noop"
    assert "description" not in noop
    assert get(noop, "parametersJsonSchema") == {"type": "object", "properties": {}}

    assert response.finish_reason == "tool_calls"  # Gemini says STOP; the layer says why
    assert response.has_tool_calls
    assert response.tool_calls == [ToolCall(id="call_0", name="get_weather", arguments={"city": "Oslo"})]
    assert response.content is None


def test_parallel_tool_calls_keep_their_ids_and_text(make_app, server):
    serve(
        server,
        GENERATE,
        reply(
            text("Checking both."),
            call("get_weather", {"city": "Oslo"}, "fc-1"),
            call("get_weather", {"city": "Rome", "unit": "fahrenheit"}, "fc-2"),
        ),
    )
    app = gemini_app(make_app, server)
    response = chat(app, [{"role": "user", "content": "Oslo and Rome?"}], tools=[get_weather])
    assert response.content == "Checking both."
    assert response.tool_calls == [
        ToolCall("fc-1", "get_weather", {"city": "Oslo"}),
        ToolCall("fc-2", "get_weather", {"city": "Rome", "unit": "fahrenheit"}),
    ]


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ("auto", {"mode": "AUTO"}),
        ("none", {"mode": "NONE"}),
        ("required", {"mode": "ANY"}),
        ("get_time", {"mode": "ANY", "allowedFunctionNames": ["get_time"]}),
        (
            {"type": "function", "function": {"name": "get_weather"}},
            {"mode": "ANY", "allowedFunctionNames": ["get_weather"]},
        ),
    ],
)
def test_tool_choice_modes(make_app, server, choice, expected):
    recorder = serve(server, GENERATE, reply(text("ok")))
    app = gemini_app(make_app, server)
    chat(app, USER, tools=[get_weather, WEATHER_TOOL], tool_choice=choice)
    config = recorder.body["toolConfig"]["functionCallingConfig"]
    assert {camel(k): v for k, v in config.items()} == expected


def test_tool_results_round_trip_as_function_responses(make_app, server):
    recorder = serve(server, GENERATE, reply(text("Oslo is sunny, Rome is rainy.")))
    app = gemini_app(make_app, server)
    response = chat(
        app,
        [
            {"role": "user", "content": "Oslo and Rome?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "fc-1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                    },
                    {"id": "fc-2", "name": "get_time", "arguments": {"city": "Rome"}},
                ],
            },
            {"role": "tool", "tool_call_id": "fc-1", "content": '{"sky": "sunny", "c": 21}'},
            {"role": "tool", "tool_call_id": "fc-2", "name": "get_time", "content": "14:05"},
            {"role": "user", "content": "Summarise."},
        ],
        tools=[get_weather, WEATHER_TOOL],
    )
    user, model, results, follow_up = recorder.body["contents"]
    assert user == {"role": "user", "parts": [{"text": "Oslo and Rome?"}]}
    assert model["role"] == "model"
    assert [get(p, "functionCall") for p in model["parts"]] == [
        {"id": "fc-1", "name": "get_weather", "args": {"city": "Oslo"}},
        {"id": "fc-2", "name": "get_time", "args": {"city": "Rome"}},
    ]
    # Parallel results answer in one user turn, one function_response part each.
    assert results["role"] == "user"
    assert [get(p, "functionResponse") for p in results["parts"]] == [
        {"id": "fc-1", "name": "get_weather", "response": {"sky": "sunny", "c": 21}},
        {"id": "fc-2", "name": "get_time", "response": {"result": "14:05"}},
    ]
    assert follow_up == {"role": "user", "parts": [{"text": "Summarise."}]}
    assert response.content == "Oslo is sunny, Rome is rainy."


def test_a_tool_result_whose_call_is_unknown_needs_a_name(make_app, server):
    app = gemini_app(make_app, server)
    with pytest.raises(LLMBadRequestError, match="needs a name"):
        chat(app, [*USER, {"role": "tool", "tool_call_id": "fc-9", "content": "42"}])
    assert server.log == []


def test_thought_signatures_go_back_with_their_calls(make_app, server):
    signature = base64.b64encode(b"opaque-signature-bytes").decode()
    recorder = serve(
        server,
        GENERATE,
        lambda _request: (
            reply(call("get_weather", {"city": "Oslo"}, thoughtSignature=signature))
            if len(recorder.bodies) == 1
            else reply(text("Sunny."))
        ),
    )
    app = gemini_app(make_app, server)
    messages: list[dict[str, Any]] = [{"role": "user", "content": "Oslo?"}]
    first = chat(app, messages, tools=[get_weather])
    (tool_call,) = first.tool_calls
    messages += [
        {"role": "assistant", "content": None, "tool_calls": [tool_call]},
        {"role": "tool", "tool_call_id": tool_call.id, "content": "sunny"},
    ]
    assert chat(app, messages, tools=[get_weather]).content == "Sunny."
    model_turn = recorder.bodies[1]["contents"][1]
    (part,) = model_turn["parts"]
    assert get(part, "functionCall")["name"] == "get_weather"
    assert unbase64(get(part, "thoughtSignature")) == b"opaque-signature-bytes"


def test_gemini_3_gets_the_skip_signature_for_calls_it_did_not_make(make_app, server):
    recorder = serve(server, "/v1beta/models/gemini-3-flash-preview:generateContent", reply(text("ok")))
    app = gemini_app(make_app, server)
    history = [
        {"role": "user", "content": "Oslo and Rome?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_abc", "name": "get_weather", "arguments": {"city": "Oslo"}},
                {"id": "call_def", "name": "get_weather", "arguments": {"city": "Rome"}},
            ],
        },
        {"role": "tool", "tool_call_id": "call_abc", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_def", "content": "rainy"},
    ]
    chat(app, history, model="gemini/gemini-3-flash-preview", tools=[get_weather])
    first, second = recorder.body["contents"][1]["parts"]
    assert unbase64(get(first, "thoughtSignature")) == b"skip_thought_signature_validator"
    assert "thoughtSignature" not in second
    assert "thought_signature" not in second


# --- structured output ---------------------------------------------------------------


class Weather(BaseModel):
    city: str
    temperature_c: float


def test_structured_output_sends_the_schema_and_parses_the_answer(make_app, server):
    recorder = serve(server, GENERATE, reply(text('{"city": "Oslo", "temperature_c": 7.5}')))
    app = gemini_app(make_app, server)
    response = chat(app, USER, response_format=Weather)
    config = recorder.body["generationConfig"]
    assert config["responseMimeType"] == "application/json"
    assert config["responseJsonSchema"] == Weather.model_json_schema()
    assert response.parsed == Weather(city="Oslo", temperature_c=7.5)


# --- finish reasons ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("gemini", "expected"),
    [
        ("STOP", "stop"),
        ("MAX_TOKENS", "length"),
        ("SAFETY", "content_filter"),
        ("RECITATION", "content_filter"),
        ("BLOCKLIST", "content_filter"),
        ("PROHIBITED_CONTENT", "content_filter"),
        ("SPII", "content_filter"),
        ("OTHER", None),
    ],
)
def test_finish_reasons_are_normalised(make_app, server, gemini, expected):
    serve(server, GENERATE, reply(text("partial"), finish=gemini))
    app = gemini_app(make_app, server)
    assert chat(app, USER).finish_reason == expected


def test_a_blocked_prompt_is_a_content_filter_finish(make_app, server):
    serve(
        server,
        GENERATE,
        {
            "promptFeedback": {"blockReason": "SAFETY"},
            "usageMetadata": {"promptTokenCount": 9, "totalTokenCount": 9},
        },
    )
    app = gemini_app(make_app, server)
    response = chat(app, USER)
    assert response.content is None
    assert response.finish_reason == "content_filter"
    assert response.input_tokens == 9


# --- streaming -----------------------------------------------------------------------


def test_stream_yields_text_deltas_then_the_response(make_app, server):
    recorder = serve(
        server,
        STREAM,
        streaming(
            text_chunk("The capital"),
            text_chunk(" of France"),
            reply(
                text(" is Paris."),
                usage={"promptTokenCount": 6, "candidatesTokenCount": 7, "totalTokenCount": 13},
            ),
        ),
        query_string="alt=sse",
    )
    app = gemini_app(make_app, server)
    with app.app_context():
        stream = get_llm().chat_stream(
            [{"role": "system", "content": "Terse."}, {"role": "user", "content": "Capital of France?"}],
            model=ADDRESS,
            max_tokens=40,
        )
        deltas = list(stream)
    assert deltas == ["The capital", " of France", " is Paris."]
    body = recorder.body
    assert body["systemInstruction"]["parts"] == [{"text": "Terse."}]
    assert body["contents"] == [{"role": "user", "parts": [{"text": "Capital of France?"}]}]
    assert body["generationConfig"] == {"maxOutputTokens": 40}
    assert recorder.requests[0].headers["x-goog-api-key"] == CANARY_GEMINI_KEY
    response = stream.response
    assert response.content == "The capital of France is Paris."
    assert response.finish_reason == "stop"
    assert (response.input_tokens, response.output_tokens, response.total_tokens) == (6, 7, 13)
    assert response.model == "gemini-2.5-flash-001"
    assert response.provider == "gemini"


def test_streamed_parallel_tool_calls_arrive_in_the_response(make_app, server):
    serve(
        server,
        STREAM,
        streaming(
            text_chunk("Looking up."),
            reply(call("get_weather", {"city": "Oslo"}), finish=None, usage=None),
            reply(call("get_weather", {"city": "Rome"}), call("get_time", {"city": "Rome"}, "fc-x")),
        ),
        query_string="alt=sse",
    )
    app = gemini_app(make_app, server)
    with app.app_context():
        stream = get_llm().chat_stream(USER, model=ADDRESS, tools=[get_weather, WEATHER_TOOL])
        assert list(stream) == ["Looking up."]
    response = stream.response
    assert response.finish_reason == "tool_calls"
    assert response.tool_calls == [
        ToolCall("call_0", "get_weather", {"city": "Oslo"}),
        ToolCall("call_1", "get_weather", {"city": "Rome"}),
        ToolCall("fc-x", "get_time", {"city": "Rome"}),
    ]
    assert response.total_tokens == 16


def test_a_stream_rejected_up_front_raises_a_typed_error(make_app, server):
    server.expect_request(STREAM, query_string="alt=sse").respond_with_json(
        {"error": {"code": 404, "message": "models/nope is not found", "status": "NOT_FOUND"}}, status=404
    )
    app = gemini_app(make_app, server)
    with app.app_context(), pytest.raises(LLMNotFoundError) as info:
        list(get_llm().chat_stream(USER, model=ADDRESS))
    assert isinstance(info.value.__cause__, genai_errors.ClientError)


# --- async ---------------------------------------------------------------------------


def test_async_chat(make_app, server):
    recorder = serve(server, GENERATE, reply(text("async hi"), call("get_weather", {"city": "Oslo"}, "fc-a")))
    app = gemini_app(make_app, server)

    async def main():
        return await get_llm().achat(
            [{"role": "system", "content": "Be brief."}, *USER],
            model=ADDRESS,
            tools=[get_weather],
            tool_choice="auto",
        )

    response = run(app, main)
    assert response.content == "async hi"
    assert response.tool_calls == [ToolCall("fc-a", "get_weather", {"city": "Oslo"})]
    assert response.finish_reason == "tool_calls"
    assert response.input_tokens == 11
    body = recorder.body
    assert body["systemInstruction"]["parts"] == [{"text": "Be brief."}]
    assert body["toolConfig"]["functionCallingConfig"]["mode"] == "AUTO"
    assert recorder.requests[0].headers["x-goog-api-key"] == CANARY_GEMINI_KEY


def test_async_stream(make_app, server):
    serve(
        server,
        STREAM,
        streaming(
            text_chunk("one"), text_chunk(" two"), reply(call("get_time", {"city": "Rome"}), finish="STOP")
        ),
        query_string="alt=sse",
    )
    app = gemini_app(make_app, server)

    async def main():
        stream = get_llm().achat_stream(USER, model=ADDRESS, tools=[WEATHER_TOOL])
        deltas = [delta async for delta in stream]
        return deltas, stream.response

    deltas, response = run(app, main)
    assert deltas == ["one", " two"]
    assert response.content == "one two"
    assert response.tool_calls == [ToolCall("call_0", "get_time", {"city": "Rome"})]
    assert response.finish_reason == "tool_calls"
    assert (response.input_tokens, response.output_tokens, response.total_tokens) == (11, 5, 16)


def test_async_stream_without_a_key_raises_a_typed_error_when_read(make_app):
    app = make_app()

    async def main():
        stream = get_llm().achat_stream(USER, model=ADDRESS)  # must not raise here
        with pytest.raises(LLMNotConfiguredError) as info:
            await stream.__anext__()
        return info.value

    error = run(app, main)
    assert error.setting == "GEMINI_API_KEY"
    assert error.provider == "gemini"


# --- embeddings and models ----------------------------------------------------------------


EMBED_MODEL = "gemini-embedding-001"
EMBEDDINGS = {"embeddings": [{"values": [0.1, 0.2, 0.3]}, {"values": [0.4, 0.5, 0.6]}]}


def test_embed_uses_batch_embed_contents(make_app, server):
    recorder = serve(server, f"/v1beta/models/{EMBED_MODEL}:batchEmbedContents", EMBEDDINGS)
    app = gemini_app(make_app, server)
    with app.app_context():
        vectors = get_llm().embed(["first text", "second text"], model=f"gemini/{EMBED_MODEL}")
    assert vectors == [[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]]
    assert recorder.body == {
        "requests": [
            {"content": {"parts": [{"text": "first text"}]}, "model": f"models/{EMBED_MODEL}"},
            {"content": {"parts": [{"text": "second text"}]}, "model": f"models/{EMBED_MODEL}"},
        ]
    }
    assert recorder.requests[0].headers["x-goog-api-key"] == CANARY_GEMINI_KEY


def test_async_embed_with_a_multimodal_embedding_model_keeps_one_vector_per_input(make_app, server):
    # For "gemini-embedding-2" the SDK would merge a list of plain strings into one content.
    recorder = serve(server, "/v1beta/models/gemini-embedding-2:batchEmbedContents", EMBEDDINGS)
    app = gemini_app(make_app, server)

    async def main():
        return await get_llm().aembed(["a", "b"], model="gemini/gemini-embedding-2")

    assert run(app, main) == [[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]]
    assert [r["content"]["parts"] for r in recorder.body["requests"]] == [[{"text": "a"}], [{"text": "b"}]]


def test_an_embedding_count_mismatch_is_a_response_error(make_app, server):
    serve(server, f"/v1beta/models/{EMBED_MODEL}:batchEmbedContents", {"embeddings": [{"values": [1.0]}]})
    app = gemini_app(make_app, server)
    with app.app_context(), pytest.raises(LLMResponseError, match="asked for 2 embeddings, got 1"):
        get_llm().embed(["a", "b"], model=f"gemini/{EMBED_MODEL}")


def test_list_models_strips_the_models_prefix(make_app, server):
    serve(
        server,
        "/v1beta/models",
        {"models": [{"name": "models/gemini-2.5-flash"}, {"name": "models/gemini-embedding-001"}]},
        method="GET",
    )
    app = gemini_app(make_app, server)
    with app.app_context():
        assert get_llm().list_models("gemini") == ["gemini-2.5-flash", "gemini-embedding-001"]


# --- errors --------------------------------------------------------------------------


RETRY_INFO = {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "17s"}
QUOTA_FAILURE = {
    "@type": "type.googleapis.com/google.rpc.QuotaFailure",
    "violations": [{"quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests"}],
}
API_KEY_INVALID = {
    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
    "reason": "API_KEY_INVALID",
    "domain": "googleapis.com",
    "metadata": {"service": "generativelanguage.googleapis.com"},
}


@pytest.mark.parametrize(
    ("status", "body", "expected", "retry_after"),
    [
        (
            400,
            error_body(
                400,
                "INVALID_ARGUMENT",
                "The input token count (1200000) exceeds the maximum number of tokens allowed (1048576).",
            ),
            LLMContextLengthError,
            None,
        ),
        (
            400,
            error_body(400, "INVALID_ARGUMENT", f"API key not valid: {CANARY_GEMINI_KEY}", API_KEY_INVALID),
            LLMAuthError,
            None,
        ),
        (
            403,
            error_body(403, "PERMISSION_DENIED", "Method doesn't allow unregistered callers."),
            LLMPermissionError,
            None,
        ),
        (
            404,
            error_body(404, "NOT_FOUND", "models/gemini-2.5-flash is not found for API version v1beta"),
            LLMNotFoundError,
            None,
        ),
        (
            429,
            error_body(
                429, "RESOURCE_EXHAUSTED", "You exceeded your current quota.", QUOTA_FAILURE, RETRY_INFO
            ),
            LLMRateLimitError,
            17.0,
        ),
        (
            503,
            error_body(503, "UNAVAILABLE", "The model is overloaded. Please try again later."),
            LLMServerError,
            None,
        ),
    ],
    # 400, 401, 500 and a Retry-After header: tests/test_provider_contract.py (every provider).
    ids=["400-context-length", "400-api-key-invalid", "403", "404", "429-retry-info", "503"],
)
def test_gemini_error_bodies_become_typed_errors(make_app, server, status, body, expected, retry_after):
    server.expect_request(GENERATE).respond_with_json(body, status=status)
    app = gemini_app(make_app, server)
    with pytest.raises(LLMError) as info:
        chat(app, USER)
    error = info.value
    assert type(error) is expected
    assert error.status_code == status
    assert error.retry_after == retry_after
    assert (error.provider, error.model) == ("gemini", MODEL)
    assert body["error"]["status"] in str(error)
    assert isinstance(error.__cause__, genai_errors.APIError)
    assert error.__cause__.code == status
    assert CANARY_GEMINI_KEY not in str(error)
    assert CANARY_GEMINI_KEY not in error.message
    assert len(server.log) == 1  # the SDK does not retry by default


def test_async_errors_are_typed_too(make_app, server):
    server.expect_request(GENERATE).respond_with_json(
        error_body(429, "RESOURCE_EXHAUSTED", "Quota exceeded.", RETRY_INFO), status=429
    )
    app = gemini_app(make_app, server)

    async def main():
        with pytest.raises(LLMRateLimitError) as info:
            await get_llm().achat(USER, model=ADDRESS)
        return info.value

    error = run(app, main)
    assert error.retry_after == 17.0
    assert isinstance(error.__cause__, genai_errors.ClientError)
