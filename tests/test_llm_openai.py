"""The OpenAI adapter of ``app.llm``: what the real ``openai`` SDK sends, and what it makes of the answers.

Two kinds of peer:

* **The official spec** (Stoplight Prism serving ``openai-openapi``, see
  ``tests/test_openai_spec.py``): every request shape the layer sends (chat,
  tools in all three forms, tool choices, tool results, structured output,
  vision parts, embeddings, streams) must get a non-422 answer. A small
  recording proxy sits between the SDK and Prism, so each test also asserts
  on the exact body the SDK sent and on Prism's verdict. Prism's answers are
  placeholders (its tool call has ``arguments: "string"``, which the layer
  rightly rejects as malformed JSON), so once Prism has accepted a chat
  request the proxy answers with a realistic completion instead; one test
  passes the placeholder through to show why.
* **Local HTTP servers** (pytest-httpserver, :class:`tests.servers.ScriptedServer`)
  that answer what the real API answers: SSE chunks with a role delta,
  content deltas, tool-call deltas split across chunks, the finish chunk, the
  usage chunk (``choices: []``) and ``data: [DONE]``; error bodies with their
  headers; slow streams, stalls and dropped connections.

Prism and streams: the SDK sends ``Accept: application/json`` even with
``stream=True``; Prism then answers a JSON completion and the SDK's SSE parser
yields **no chunks and no error**. So streams are exercised against the local
handlers, and against Prism only to prove the request is valid (plus once
with ``Accept: text/event-stream`` forced by the proxy, which makes Prism send
the example stream injected into its spec).
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import http.client
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest
from pydantic import BaseModel
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from app.llm import (
    ChatResponse,
    LLMBadRequestError,
    LLMConnectionError,
    LLMContentFilterError,
    LLMContextLengthError,
    LLMError,
    LLMNotFoundError,
    LLMPermissionError,
    LLMRateLimitError,
    LLMResponseError,
    LLMServerError,
    LLMTimeoutError,
    ToolCall,
    get_llm,
)
from tests.conftest import CANARY_KEY, Prism
from tests.payloads import OPENAI_ID, chat_completion, function_call
from tests.payloads import openai_chunk as chunk
from tests.payloads import openai_error as error_body
from tests.payloads import openai_role_chunk as role_chunk
from tests.payloads import openai_sse as sse
from tests.payloads import openai_text_chunks as text_chunks
from tests.payloads import openai_text_stream as text_stream
from tests.payloads import openai_tool_chunks as tool_chunks
from tests.payloads import sse_data as event
from tests.servers import CLOSE, Recorded, Reply, ScriptedServer

MODEL = "openai/gpt-4o-mini"
SERVED_MODEL = "gpt-4o-mini-2024-07-18"
CHAT_PATH = "/v1/chat/completions"
EMBED_PATH = "/v1/embeddings"
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR-not-really-a-png"
USER = [{"role": "user", "content": "Hi"}]
GROQ_KEY = "gsk-test-groq-key"
AZURE_KEY = "azure-test-key"


# --- what the API sends ------------------------------------------------------------------------


def completion(content: str | None = "hello", *, model: str = SERVED_MODEL, **kwargs: Any) -> dict[str, Any]:
    """A chat completion as the API answers for ``SERVED_MODEL`` (19 prompt and 10 completion tokens)."""
    return chat_completion(content, model, usage=(19, 10), id=OPENAI_ID, **kwargs)


# --- local servers -----------------------------------------------------------------------------


class Upstream:
    """A pytest-httpserver handler that records each request and answers with ``answer(request)``."""

    def __init__(self, answer: Callable[[Request], Response]) -> None:
        self.answer = answer
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.paths: list[str] = []
        self.queries: list[dict[str, str]] = []

    def __call__(self, request: Request) -> Response:
        self.bodies.append(json.loads(request.get_data() or b"{}"))
        self.headers.append({k.lower(): v for k, v in request.headers.items()})
        self.paths.append(request.path)
        self.queries.append(dict(request.args))
        return self.answer(request)


def serve(
    server: HTTPServer,
    body: Any = None,
    *,
    status: int = 200,
    headers: dict[str, str] | None = None,
    stream: bytes | Callable[[], Iterator[bytes]] | None = None,
    delay: float = 0.0,
    path: str = CHAT_PATH,
    **expect: Any,
) -> Upstream:
    """Answer ``path`` with JSON ``body`` (or the SSE ``stream``, bytes or a generator function)."""

    def answer(_request: Request) -> Response:
        if delay:
            time.sleep(delay)
        if stream is not None:
            payload = stream if isinstance(stream, bytes) else stream()
            return Response(payload, status=status, headers=headers, mimetype="text/event-stream")
        data = json.dumps(completion() if body is None else body)
        return Response(data, status=status, headers=headers, mimetype="application/json")

    upstream = Upstream(answer)
    server.expect_request(path, method="POST", **expect).respond_with_handler(upstream)
    return upstream


@pytest.fixture
def app(make_app, local_server):
    return make_app(
        OPENAI_API_KEY=CANARY_KEY,
        OPENAI_BASE_URL=local_server.url_for("/v1"),
        OPENAI_MAX_RETRIES=0,
        OPENAI_TIMEOUT=5,
    )


def in_app(app, function: Callable[[], Any]) -> Any:
    with app.app_context():
        return function()


def run_async(app, coroutine_function: Callable[[], Any]) -> Any:
    with app.app_context():
        return asyncio.run(coroutine_function())


# --- against the official spec (Prism) -----------------------------------------------------------


class SpecProxy:
    """Records what the SDK sends, asks Prism whether the spec accepts it, and answers.

    ``reply(body)`` builds the answer to a chat request Prism accepted (None: pass
    Prism's own answer through). Errors and embeddings always pass through.
    ``force_sse`` asks Prism for ``text/event-stream`` on streamed requests.
    """

    def __init__(self, upstream: Prism) -> None:
        self.prism = upstream
        self.verdicts: list[int] = []
        self.reply: Callable[[dict[str, Any]], dict[str, Any]] | None = None
        self.force_sse = False
        self.server = ScriptedServer(self._respond)

    def reset(self) -> None:
        self.server.requests.clear()
        self.verdicts.clear()
        self.reply = lambda _body: completion()
        self.force_sse = False

    @property
    def bodies(self) -> list[dict[str, Any]]:
        return [request.json for request in self.server.requests]

    def _respond(self, request: Recorded) -> Reply:
        headers = {
            "Content-Type": request.headers.get("content-type", "application/json"),
            "Accept": request.headers.get("accept", "application/json"),
            "Authorization": request.headers.get("authorization", ""),
        }
        body = json.loads(request.body) if request.body else {}
        if self.force_sse and body.get("stream"):
            headers["Accept"] = "text/event-stream"
        connection = http.client.HTTPConnection("127.0.0.1", self.prism.port, timeout=30)
        try:
            connection.request(request.method, request.target, body=request.body, headers=headers)
            answer = connection.getresponse()
            status, payload = answer.status, answer.read()
            content_type = answer.getheader("Content-Type", "application/json")
        finally:
            connection.close()
        self.verdicts.append(status)
        chat = request.path.endswith("/chat/completions") and not body.get("stream")
        if 200 <= status < 300 and chat and self.reply is not None:
            return Reply(body=self.reply(body))
        return Reply(status, payload, {"Content-Type": content_type})

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture(scope="module")
def _spec_proxy(prism) -> Iterator[SpecProxy]:
    proxy = SpecProxy(prism)
    yield proxy
    proxy.stop()


@pytest.fixture
def spec(_spec_proxy: SpecProxy) -> SpecProxy:
    _spec_proxy.reset()
    return _spec_proxy


@pytest.fixture
def spec_app(make_app, spec: SpecProxy):
    return make_app(
        OPENAI_API_KEY=CANARY_KEY,
        OPENAI_BASE_URL=spec.server.url_for("/v1"),
        OPENAI_MAX_RETRIES=0,
        OPENAI_TIMEOUT=30,  # Prism never answers some malformed bodies
        OPENAI_PROFILES={"groq": {"base_url": spec.server.url_for("/v1"), "api_key": GROQ_KEY}},
    )


def get_weather(city: str, unit: str = "celsius") -> str:
    """The current weather in a city."""
    return f"18 {unit} in {city}"


def search_docs(query: str, limit: int = 5, tags: list[str] | None = None) -> list[str]:
    """Search the documentation."""
    return []


THREE_TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "The current time in a time zone.",
            "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]},
        },
    },
    {"name": "ping", "description": "Check the service.", "parameters": {"type": "object", "properties": {}}},
    get_weather,
]


class Address(BaseModel):
    street: str
    city: str


class Invoice(BaseModel):
    number: str
    total_cents: int
    paid: bool | None = None
    billing: Address
    lines: list[str]


INVOICE = {
    "number": "INV-7",
    "total_cents": 1250,
    "paid": None,
    "billing": {"street": "1 Main St", "city": "Paris"},
    "lines": ["tea", "cake"],
}


@pytest.mark.slow
def test_spec_accepts_a_chat_with_system_user_temperature_max_tokens_and_user(spec, spec_app):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]

    response = in_app(
        spec_app,
        lambda: get_llm().chat(messages, model=MODEL, temperature=0, max_tokens=50, user="user-42"),
    )

    assert spec.verdicts == [200]
    assert spec.bodies == [
        {
            "model": "gpt-4o-mini",
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
            "temperature": 0,
            "max_completion_tokens": 50,  # OpenAI itself: max_tokens is deprecated there
            "user": "user-42",
        }
    ]
    assert spec.server.requests[0].headers["authorization"] == f"Bearer {CANARY_KEY}"
    assert response.content == "hello"
    assert (response.input_tokens, response.output_tokens, response.total_tokens) == (19, 10, 29)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("tool_choice", "sent"),
    [
        (None, None),
        ("auto", "auto"),
        ("none", "none"),
        ("required", "required"),
        ("get_weather", {"type": "function", "function": {"name": "get_weather"}}),
        (
            {"type": "function", "function": {"name": "ping"}},
            {"type": "function", "function": {"name": "ping"}},
        ),
    ],
    ids=["unset", "auto", "none", "required", "by-name", "openai-form"],
)
def test_spec_accepts_tools_in_all_three_forms_and_every_tool_choice(spec, spec_app, tool_choice, sent):
    spec.reply = lambda _body: completion(
        None,
        tool_calls=[function_call("call_1", "get_weather", '{"city": "Paris"}')],
        finish_reason="tool_calls",
    )

    response = in_app(
        spec_app, lambda: get_llm().chat(USER, model=MODEL, tools=THREE_TOOLS, tool_choice=tool_choice)
    )

    assert spec.verdicts == [200]
    [body] = spec.bodies
    assert body.get("tool_choice") == sent
    assert [tool["type"] for tool in body["tools"]] == ["function"] * 3
    functions = [tool["function"] for tool in body["tools"]]
    assert [f["name"] for f in functions] == ["get_time", "ping", "get_weather"]
    assert functions[0]["parameters"] == THREE_TOOLS[0]["function"]["parameters"]
    assert functions[1] == {
        "name": "ping",
        "description": "Check the service.",
        "parameters": {"type": "object", "properties": {}},
    }
    assert functions[2]["description"] == "The current weather in a city."
    assert functions[2]["parameters"] == {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"type": "string", "default": "celsius"}},
        "required": ["city"],
    }
    assert response.tool_calls == [ToolCall("call_1", "get_weather", {"city": "Paris"})]
    assert response.has_tool_calls
    assert response.finish_reason == "tool_calls"


@pytest.mark.slow
def test_spec_accepts_tool_results_in_a_conversation(spec, spec_app):
    messages = [
        {"role": "user", "content": "Weather and time in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                function_call("call_1", "get_weather", '{"city": "Paris"}'),
                ToolCall("call_2", "get_time", {"tz": "Europe/Paris"}),
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18C and sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": "14:05"},
    ]

    response = in_app(spec_app, lambda: get_llm().chat(messages, model=MODEL, tools=THREE_TOOLS))

    assert spec.verdicts == [200]
    sent = spec.bodies[0]["messages"]
    assert sent[1] == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            function_call("call_1", "get_weather", '{"city": "Paris"}'),
            function_call("call_2", "get_time", '{"tz": "Europe/Paris"}'),
        ],
    }
    assert sent[2:] == [
        {"role": "tool", "tool_call_id": "call_1", "content": "18C and sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": "14:05"},
    ]
    assert response.content == "hello"


@pytest.mark.slow
def test_spec_accepts_structured_output_from_a_pydantic_model(spec, spec_app):
    spec.reply = lambda _body: completion(json.dumps(INVOICE))

    response = in_app(spec_app, lambda: get_llm().chat(USER, model=MODEL, response_format=Invoice))

    assert spec.verdicts == [200]
    response_format = spec.bodies[0]["response_format"]
    assert response_format["type"] == "json_schema"
    assert response_format["json_schema"]["name"] == "Invoice"
    assert response_format["json_schema"]["strict"] is True
    schema = response_format["json_schema"]["schema"]
    assert schema["additionalProperties"] is False
    assert schema["required"] == ["number", "total_cents", "paid", "billing", "lines"]
    assert schema["$defs"]["Address"]["additionalProperties"] is False
    assert schema["$defs"]["Address"]["required"] == ["street", "city"]
    assert isinstance(response.parsed, Invoice)
    assert response.parsed.billing.city == "Paris"


@pytest.mark.slow
def test_spec_accepts_structured_output_from_a_dict_schema(spec, spec_app):
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}}
    spec.reply = lambda _body: completion('{"answer": 42}')

    response = in_app(spec_app, lambda: get_llm().chat(USER, model=MODEL, response_format=schema))

    assert spec.verdicts == [200]
    assert spec.bodies[0]["response_format"] == {
        "type": "json_schema",
        "json_schema": {
            "name": "response",
            "schema": {
                "type": "object",
                "properties": {"answer": {"type": "integer"}},
                "required": ["answer"],
                "additionalProperties": False,
            },
            "strict": True,
        },
    }
    assert response.parsed == {"answer": 42}


@pytest.mark.slow
def test_spec_accepts_vision_parts_by_url_and_by_bytes(spec, spec_app):
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Compare these."},
                {"type": "image", "url": "https://upload.wikimedia.org/cat.png"},
                {"type": "image", "data": PNG, "mime_type": "image/png"},
            ],
        }
    ]

    in_app(spec_app, lambda: get_llm().chat(messages, model=MODEL))

    assert spec.verdicts == [200]
    assert spec.bodies[0]["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Compare these."},
                {"type": "image_url", "image_url": {"url": "https://upload.wikimedia.org/cat.png"}},
                {
                    "type": "image_url",
                    "image_url": {"url": "data:image/png;base64," + base64.b64encode(PNG).decode()},
                },
            ],
        }
    ]


@pytest.mark.slow
def test_spec_accepts_embeddings_sync_and_async(spec, spec_app):
    vectors = in_app(spec_app, lambda: get_llm().embed(["a", "b"], model="openai/text-embedding-3-small"))
    async_vectors = run_async(
        spec_app, lambda: get_llm().aembed(["c"], model="openai/text-embedding-3-small")
    )

    assert spec.verdicts == [200, 200]
    assert [(b["model"], b["input"]) for b in spec.bodies] == [
        ("text-embedding-3-small", ["a", "b"]),
        ("text-embedding-3-small", ["c"]),
    ]
    for result in (vectors, async_vectors):
        assert result and all(isinstance(v, list) and all(isinstance(x, float) for x in v) for v in result)


@pytest.mark.slow
def test_spec_accepts_an_async_chat(spec, spec_app):
    response = run_async(spec_app, lambda: get_llm().achat(USER, model=MODEL, max_tokens=20))

    assert spec.verdicts == [200]
    assert spec.bodies[0]["max_completion_tokens"] == 20
    assert response.content == "hello"


@pytest.mark.slow
def test_spec_accepts_max_tokens_from_a_compatible_profile(spec, spec_app):
    in_app(spec_app, lambda: get_llm().chat(USER, model="groq/llama-3.1-8b-instant", max_tokens=64))

    assert spec.verdicts == [200]
    [body] = spec.bodies
    assert body["max_tokens"] == 64
    assert "max_completion_tokens" not in body
    assert spec.server.requests[0].headers["authorization"] == f"Bearer {GROQ_KEY}"


@pytest.mark.slow
def test_a_request_the_spec_rejects_is_a_bad_request_error(spec, spec_app):
    with pytest.raises(LLMBadRequestError) as excinfo:
        # The layer refuses a temperature that is not a number; ``extra`` passes it on as given.
        in_app(spec_app, lambda: get_llm().chat(USER, model=MODEL, extra={"temperature": "hot"}))

    assert spec.verdicts == [422]
    error = excinfo.value
    assert type(error) is LLMBadRequestError
    assert error.status_code == 422
    assert (error.provider, error.model) == ("openai", "gpt-4o-mini")
    assert isinstance(error.__cause__, openai.UnprocessableEntityError)
    assert CANARY_KEY not in str(error)


@pytest.mark.slow
def test_prisms_placeholder_tool_call_is_malformed_json(spec, spec_app):
    spec.reply = None  # pass Prism's own answer through

    with pytest.raises(LLMResponseError) as excinfo:
        in_app(spec_app, lambda: get_llm().chat(USER, model=MODEL))

    assert spec.verdicts == [200]
    assert excinfo.value.raw_text == "string"  # Prism's placeholder for function.arguments
    assert "malformed JSON arguments for tool 'string'" in str(excinfo.value)


@pytest.mark.slow
def test_spec_accepts_a_streamed_request_but_prism_sends_the_sdk_no_chunks(spec, spec_app):
    def read() -> tuple[list[str], ChatResponse]:
        stream = get_llm().chat_stream(USER, model=MODEL, max_tokens=20)
        return list(stream), stream.response

    with pytest.raises(LLMResponseError) as excinfo:
        in_app(spec_app, read)

    assert spec.verdicts == [200]
    assert spec.bodies[0]["stream"] is True
    assert spec.bodies[0]["stream_options"] == {"include_usage": True}
    # The SDK asks for JSON; Prism obliges, and the SDK's SSE parser finds no events in it:
    # a stream without its end marker, an error (it used to end as an empty answer).
    assert spec.server.requests[0].headers["accept"] == "application/json"
    assert "ended without its end marker (finish_reason)" in str(excinfo.value)
    assert "the body was application/json, not text/event-stream" in str(excinfo.value)


@pytest.mark.slow
def test_spec_streams_its_example_when_asked_for_event_stream(spec, spec_app):
    spec.force_sse = True

    def read() -> tuple[list[str], ChatResponse]:
        stream = get_llm().chat_stream([{"role": "system", "content": "Greet."}, *USER], model=MODEL)
        return list(stream), stream.response

    deltas, response = in_app(spec_app, read)

    assert spec.verdicts == [200]
    assert deltas == ["Hello", " world"]
    assert response.content == "Hello world"
    assert response.finish_reason == "stop"
    assert response.input_tokens is None  # the spec's example has no usage chunk


# --- chat against local handlers -----------------------------------------------------------------


def test_chat_sends_the_translated_request_and_reads_the_answer(app, local_server):
    upstream = serve(local_server, completion("Paris."))

    response = in_app(
        app,
        lambda: get_llm().chat(
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}],
            model=MODEL,
            temperature=0.2,
        ),
    )

    assert upstream.bodies == [
        {
            "model": "gpt-4o-mini",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Capital of France?"},
            ],
            "temperature": 0.2,
        }
    ]
    assert isinstance(response, ChatResponse)
    assert response.content == "Paris."
    assert (response.provider, response.model) == ("openai", SERVED_MODEL)
    assert response.usage() == {
        "input_tokens": 19,
        "output_tokens": 10,
        "total_tokens": 29,
        "reasoning_tokens": None,  # the answer has no usage details
        "cached_input_tokens": None,
        "cache_write_tokens": None,
    }
    assert response.finish_reason == "stop"
    assert response.tool_calls == [] and not response.has_tool_calls
    assert response.parsed is None
    assert response.latency_ms > 0
    assert response.raw.id == "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG"


SAME_AS_CREATE = {
    "plain": {},
    "every option": {
        "temperature": 0.3,
        "max_tokens": 50,
        "user": "user-42",
        "tools": [get_weather],
        "tool_choice": "get_weather",
        "response_format": {"title": "Answer", "type": "object", "properties": {"text": {"type": "string"}}},
    },
}


@pytest.mark.parametrize("stream", [False, True], ids=["chat", "stream"])
@pytest.mark.parametrize("options", list(SAME_AS_CREATE.values()), ids=list(SAME_AS_CREATE))
def test_the_layer_sends_exactly_what_chat_completions_create_sends(make_app, local_server, options, stream):
    """The adapter posts its body with ``client.post`` (see OpenAIProvider._create): the request on
    the wire, headers included, must be the one ``chat.completions.create`` sends with that body."""
    app = make_app(
        OPENAI_API_KEY=CANARY_KEY,
        OPENAI_BASE_URL=local_server.url_for("/v1"),
        OPENAI_TIMEOUT=5,
        LLM_ATTEMPT_TIMEOUT=2,  # shorter than the client's: sent as this request's timeout
    )
    text = '{"text": "hi"}'  # valid structured output too
    upstream = serve(local_server, completion(text), stream=text_stream(text) if stream else None)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]

    def both() -> None:
        llm = get_llm()
        if stream:
            assert "".join(llm.chat_stream(messages, model=MODEL, **options)) == text
        else:
            assert llm.chat(messages, model=MODEL, **options).content == text
        sent = dict(upstream.bodies[0])
        from app.services.openai_service import get_openai_client

        client = get_openai_client().with_options(max_retries=0)
        if stream:
            for _ in client.chat.completions.create(**sent, timeout=2.0):
                pass
        else:
            client.chat.completions.create(**sent, timeout=2.0)

    in_app(app, both)
    assert len(upstream.bodies) == 2
    ours, theirs = upstream.bodies
    assert ours == theirs
    assert (ours.get("stream"), ours.get("stream_options")) == (
        (True, {"include_usage": True}) if stream else (None, None)
    )
    if options:
        assert ours["max_completion_tokens"] == 50 and ours["tools"][0]["function"]["name"] == "get_weather"
    ours_headers, their_headers = upstream.headers
    assert ours_headers == their_headers
    assert ours_headers["authorization"] == f"Bearer {CANARY_KEY}"
    assert ours_headers["x-stainless-read-timeout"] == "2.0"
    assert upstream.paths == [CHAT_PATH, CHAT_PATH]


def test_tool_choice_is_not_sent_without_tools(app, local_server):
    upstream = serve(local_server)

    in_app(app, lambda: get_llm().chat(USER, model=MODEL, tool_choice="none"))

    assert "tool_choice" not in upstream.bodies[0]  # the API answers 400 to tool_choice without tools
    assert "tools" not in upstream.bodies[0]


@pytest.mark.parametrize("arguments", ['{"city": "Par', '["Paris"]'], ids=["truncated", "not-an-object"])
def test_malformed_tool_call_arguments_are_a_response_error_keeping_the_text(app, local_server, arguments):
    serve(
        local_server,
        completion(
            None, tool_calls=[function_call("call_a", "get_weather", arguments)], finish_reason="tool_calls"
        ),
    )

    with pytest.raises(LLMResponseError) as excinfo:
        in_app(app, lambda: get_llm().chat(USER, model=MODEL, tools=THREE_TOOLS))

    assert excinfo.value.raw_text == arguments
    assert "tool 'get_weather'" in str(excinfo.value)
    assert (excinfo.value.provider, excinfo.value.model) == ("openai", "gpt-4o-mini")


@pytest.mark.parametrize(
    ("sent", "expected"),
    [
        ("stop", "stop"),
        ("length", "length"),
        ("content_filter", "content_filter"),
        ("function_call", "tool_calls"),
    ],
)
def test_finish_reasons_are_normalised(app, local_server, sent, expected):
    serve(local_server, completion("partial", finish_reason=sent))

    response = in_app(app, lambda: get_llm().chat(USER, model=MODEL))

    assert response.finish_reason == expected


def test_structured_output_is_not_parsed_when_the_model_calls_a_tool(app, local_server):
    serve(
        local_server,
        completion(None, tool_calls=[function_call("c", "ping", "{}")], finish_reason="tool_calls"),
    )

    response = in_app(
        app, lambda: get_llm().chat(USER, model=MODEL, tools=THREE_TOOLS, response_format=Invoice)
    )

    assert response.tool_calls == [ToolCall("c", "ping", {})]
    assert response.parsed is None


# --- streams -------------------------------------------------------------------------------------


def test_a_stream_yields_text_deltas_and_ends_with_the_full_response(app, local_server):
    upstream = serve(local_server, stream=text_stream("Hel", "lo", " there"))

    def read() -> tuple[list[str], ChatResponse]:
        stream = get_llm().chat_stream(USER, model=MODEL, max_tokens=30)
        deltas = [next(stream)]
        with pytest.raises(RuntimeError, match="read to the end"):
            stream.response  # not before the stream is exhausted
        deltas += list(stream)
        return deltas, stream.response

    deltas, response = in_app(app, read)

    [body] = upstream.bodies
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["max_completion_tokens"] == 30
    assert upstream.headers[0]["authorization"] == f"Bearer {CANARY_KEY}"
    assert deltas == ["Hel", "lo", " there"]  # the role chunk's empty content is not a delta
    assert response.content == "Hello there"
    assert response.finish_reason == "stop"
    assert (response.input_tokens, response.output_tokens, response.total_tokens) == (9, 3, 12)
    assert (response.provider, response.model) == ("openai", SERVED_MODEL)
    assert response.tool_calls == []


def test_malformed_streamed_tool_call_json_is_a_response_error(app, local_server):
    serve(
        local_server,
        stream=sse(*tool_chunks(0, "call_a", "get_weather", '{"city": ', '"Paris"'), chunk({}, "tool_calls")),
    )

    def read() -> None:
        list(get_llm().chat_stream(USER, model=MODEL, tools=THREE_TOOLS))

    with pytest.raises(LLMResponseError) as excinfo:
        in_app(app, read)

    assert excinfo.value.raw_text == '{"city": "Paris"'
    assert (excinfo.value.provider, excinfo.value.model) == ("openai", "gpt-4o-mini")


def test_a_stream_that_ends_without_a_usage_chunk_still_finishes(app, local_server):
    # Compatible servers (and OpenAI without include_usage) send no usage chunk.
    serve(local_server, stream=sse(role_chunk(), *text_chunks("ok"), chunk({}, "length")))

    def read() -> ChatResponse:
        stream = get_llm().chat_stream(USER, model=MODEL)
        list(stream)
        return stream.response

    response = in_app(app, read)

    assert response.content == "ok"
    assert response.finish_reason == "length"
    assert set(response.usage().values()) == {None}


def test_a_connection_dropped_mid_stream_is_a_connection_error(app, local_server):
    def body() -> Iterator[bytes]:
        yield event(role_chunk()) + event(chunk({"content": "Hel"}))
        raise ConnectionAbortedError("the upstream went away")  # werkzeug drops the connection

    serve(local_server, stream=body)
    received: list[str] = []

    def read() -> None:
        received.extend(get_llm().chat_stream(USER, model=MODEL))

    with pytest.raises(LLMConnectionError) as excinfo:
        in_app(app, read)

    assert received == ["Hel"]
    assert isinstance(excinfo.value.__cause__, openai.APIConnectionError)


def test_a_stream_that_stalls_past_the_timeout_is_a_timeout_error(make_app, local_server):
    app = make_app(
        OPENAI_API_KEY=CANARY_KEY,
        OPENAI_BASE_URL=local_server.url_for("/v1"),
        OPENAI_MAX_RETRIES=0,
        OPENAI_TIMEOUT=0.3,
    )

    def body() -> Iterator[bytes]:
        yield event(role_chunk()) + event(chunk({"content": "Hel"}))
        time.sleep(1.0)
        yield text_stream("lo")

    serve(local_server, stream=body)
    received: list[str] = []

    def read() -> None:
        received.extend(get_llm().chat_stream(USER, model=MODEL))

    with pytest.raises(LLMTimeoutError) as excinfo:
        in_app(app, read)

    assert received == ["Hel"]
    assert isinstance(excinfo.value.__cause__, openai.APITimeoutError)


# --- closing streams early: connection reuse ---------------------------------------------------
# Closing a stream (read or unread, with blocks, async) for every provider:
# tests/test_provider_contract.py. Here, what OpenAI's SDK does with kept-alive connections.


def _whole_sse_bodies(request: Recorded) -> Reply:
    """Whole SSE bodies with a Content-Length, on connections kept alive (like api.openai.com)."""
    if not request.json.get("stream"):
        return Reply(body=completion())
    return Reply(
        body=text_stream(*(f"w{i} " for i in range(50))), headers={"Content-Type": "text/event-stream"}
    )


def test_an_abandoned_stream_closes_its_connection_on_a_keep_alive_server(make_app, upstream):
    upstream.responder = _whole_sse_bodies
    app = make_app(OPENAI_API_KEY=CANARY_KEY, OPENAI_BASE_URL=upstream.url_for("/v1"), OPENAI_MAX_RETRIES=0)

    def run() -> None:
        stream = get_llm().chat_stream(USER, model=MODEL)
        next(stream)
        stream.close()
        assert upstream.wait_closed(upstream.requests[0].port), (
            "the abandoned stream's connection stayed open"
        )
        get_llm().chat(USER, model=MODEL)

    in_app(app, run)
    abandoned, after = (request.port for request in upstream.requests)
    assert after != abandoned  # the next request needed a new connection


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_streams_read_to_the_end_reuse_the_connection_and_an_abandoned_one_closes_it(
    make_app, upstream, mode
):
    # The body is read on past [DONE] to its end, so its connection goes back to the pool: the raw
    # sync SDK closes it at [DONE] instead, and every later stream then needs a new connection.
    upstream.responder = _whole_sse_bodies
    app = make_app(OPENAI_API_KEY=CANARY_KEY, OPENAI_BASE_URL=upstream.url_for("/v1"), OPENAI_MAX_RETRIES=0)

    def run() -> None:
        llm = get_llm()
        for _ in range(2):
            assert len(list(llm.chat_stream(USER, model=MODEL))) == 50
        stream = llm.chat_stream(USER, model=MODEL)
        next(stream)
        stream.close()
        llm.chat(USER, model=MODEL)

    async def arun() -> None:
        llm = get_llm()
        for _ in range(2):
            assert len([text async for text in llm.achat_stream(USER, model=MODEL)]) == 50
        stream = llm.achat_stream(USER, model=MODEL)
        await stream.__anext__()
        await stream.aclose()
        await llm.achat(USER, model=MODEL)

    if mode == "sync":
        in_app(app, run)
    else:
        run_async(app, arun)
    first, second, abandoned, after = (request.port for request in upstream.requests)
    assert first == second == abandoned  # read to the body's end: the connection went back to the pool
    assert upstream.wait_closed(abandoned), "the abandoned stream's connection stayed open"
    assert after != abandoned


def test_a_stream_whose_connection_drops_after_done_is_complete(make_app, upstream):
    # [DONE] was sent: what is left to read is the body's end, and the answer is whole.
    app = make_app(OPENAI_API_KEY=CANARY_KEY, OPENAI_BASE_URL=upstream.url_for("/v1"), OPENAI_MAX_RETRIES=0)
    chunks = [role_chunk(), *text_chunks("Hel", "lo"), chunk({}, "stop"), "[DONE]"]
    upstream.script("/v1/chat/completions", Reply.stream([*(event(item) for item in chunks), CLOSE]))

    def run() -> None:
        with get_llm().chat_stream(USER, model=MODEL) as stream:
            assert list(stream) == ["Hel", "lo"]
        assert stream.response is not None and stream.response.finish_reason == "stop"

    in_app(app, run)


# --- errors --------------------------------------------------------------------------------------


def _http_date(seconds_from_now: float) -> str:
    return email.utils.formatdate(time.time() + seconds_from_now, usegmt=True)


# 401, 400, 429 with Retry-After (seconds and HTTP date) and 500, sync and async:
# tests/test_provider_contract.py (every provider).
ERROR_CASES = [
    pytest.param(
        403,
        {},
        error_body(
            "Country, region, or territory not supported",
            "request_forbidden",
            "unsupported_country_region_territory",
        ),
        LLMPermissionError,
        None,
        id="403",
    ),
    pytest.param(
        404,
        {},
        error_body(
            "The model `gpt-4o-mini` does not exist or you do not have access to it.",
            "invalid_request_error",
            "model_not_found",
        ),
        LLMNotFoundError,
        None,
        id="404",
    ),
    pytest.param(
        400,
        {},
        error_body(
            "This model's maximum context length is 128000 tokens. However, your messages resulted"
            " in 130512 tokens. Please reduce the length of the messages.",
            "invalid_request_error",
            "context_length_exceeded",
            "messages",
        ),
        LLMContextLengthError,
        None,
        id="400-context-length",
    ),
    pytest.param(
        400,
        {},
        {
            "error": {
                "message": "The response was filtered due to the prompt triggering Azure OpenAI's"
                " content management policy.",
                "type": None,
                "param": "prompt",
                "code": "content_filter",
                "status": 400,
            }
        },
        LLMContentFilterError,
        None,
        id="400-content-filter",
    ),
    pytest.param(
        429,
        {"retry-after-ms": "1500", "x-ratelimit-reset-tokens": "1.5s"},
        error_body(
            "Rate limit reached for gpt-4o-mini on tokens per min (TPM).", "tokens", "rate_limit_exceeded"
        ),
        LLMRateLimitError,
        1.5,
        id="429-retry-after-ms",
    ),
    pytest.param(
        503,
        {},
        error_body("The engine is currently overloaded, please try again later.", "server_error", None),
        LLMServerError,
        None,
        id="503",
    ),
]


def _check_error(error: LLMError, cls: type[LLMError], status: int, retry_after: float | None) -> None:
    assert type(error) is cls
    assert (error.provider, error.model, error.status_code) == ("openai", "gpt-4o-mini", status)
    if retry_after is None:
        assert error.retry_after is None
    else:
        assert error.retry_after == pytest.approx(retry_after, abs=2)
    assert isinstance(error.__cause__, openai.APIStatusError)
    assert error.__cause__.status_code == status
    assert CANARY_KEY not in str(error)
    assert CANARY_KEY not in repr(error)
    assert str(error).startswith(f"openai/gpt-4o-mini: HTTP {status}: ")


@pytest.mark.parametrize(("status", "headers", "body", "cls", "retry_after"), ERROR_CASES)
def test_http_errors_are_typed(app, local_server, status, headers, body, cls, retry_after):
    headers = {k: _http_date(30) if v == "DATE+30" else v for k, v in headers.items()}
    upstream = serve(local_server, body, status=status, headers=headers)

    with pytest.raises(LLMError) as excinfo:
        in_app(app, lambda: get_llm().chat(USER, model=MODEL))

    _check_error(excinfo.value, cls, status, retry_after)
    assert len(upstream.bodies) == 1  # OPENAI_MAX_RETRIES=0: no retry


@pytest.mark.parametrize(("status", "headers", "body", "cls", "retry_after"), ERROR_CASES[::2])
def test_http_errors_are_typed_in_async_calls(app, local_server, status, headers, body, cls, retry_after):
    headers = {k: _http_date(30) if v == "DATE+30" else v for k, v in headers.items()}
    serve(local_server, body, status=status, headers=headers)

    async def call() -> None:
        await get_llm().achat(USER, model=MODEL)

    async def stream() -> None:
        async for _ in get_llm().achat_stream(USER, model=MODEL):
            pass

    for attempt in (call, stream):
        with pytest.raises(LLMError) as excinfo:
            run_async(app, attempt)
        _check_error(excinfo.value, cls, status, retry_after)


def test_an_embedding_error_is_typed(app, local_server):
    serve(
        local_server,
        error_body("The model `text-embedding-4` does not exist", "invalid_request_error", "model_not_found"),
        status=404,
        path=EMBED_PATH,
    )

    with pytest.raises(LLMNotFoundError) as excinfo:
        in_app(app, lambda: get_llm().embed(["a"], model="openai/text-embedding-4"))

    assert excinfo.value.model == "text-embedding-4"
    assert isinstance(excinfo.value.__cause__, openai.NotFoundError)


# --- async ---------------------------------------------------------------------------------------


def test_achat(app, local_server):
    upstream = serve(local_server, completion("async hello"))

    response = run_async(app, lambda: get_llm().achat(USER, model=MODEL, max_tokens=10, user="u-1"))

    assert response.content == "async hello"
    assert response.total_tokens == 29
    assert upstream.bodies[0]["max_completion_tokens"] == 10
    assert upstream.bodies[0]["user"] == "u-1"
    assert upstream.headers[0]["x-stainless-async"].startswith("async")


def test_embed_and_aembed(app, local_server):
    answer = {
        "object": "list",
        "data": [  # out of order on purpose: the layer sorts by index
            {"object": "embedding", "index": 1, "embedding": [0.4, 0.5, 0.6]},
            {"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]},
        ],
        "model": "text-embedding-3-small",
        "usage": {"prompt_tokens": 2, "total_tokens": 2},
    }
    upstream = serve(local_server, answer, path=EMBED_PATH)

    vectors = in_app(app, lambda: get_llm().embed(["first", "second"], model="openai/text-embedding-3-small"))
    async_vectors = run_async(
        app, lambda: get_llm().aembed(["first", "second"], model="openai/text-embedding-3-small")
    )

    assert vectors == async_vectors == [[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]]
    sent = [(b["model"], b["input"]) for b in upstream.bodies]
    assert sent == [("text-embedding-3-small", ["first", "second"])] * 2


# --- profiles ------------------------------------------------------------------------------------


def test_a_named_profile_sends_max_tokens_to_its_own_endpoint(make_app, local_server):
    app = make_app(
        OPENAI_PROFILES={"groq": {"base_url": local_server.url_for("/openai/v1"), "max_retries": 0}},
        GROQ_API_KEY=GROQ_KEY,
    )
    upstream = serve(
        local_server, completion("fast", model="llama-3.1-8b-instant"), path="/openai/v1/chat/completions"
    )

    response = in_app(app, lambda: get_llm().chat(USER, model="groq/llama-3.1-8b-instant", max_tokens=64))

    [body] = upstream.bodies
    assert body["model"] == "llama-3.1-8b-instant"
    assert body["max_tokens"] == 64
    assert "max_completion_tokens" not in body
    assert upstream.headers[0]["authorization"] == f"Bearer {GROQ_KEY}"
    assert (response.provider, response.model, response.content) == ("groq", "llama-3.1-8b-instant", "fast")


def test_a_named_profile_streams_with_max_tokens(make_app, local_server):
    app = make_app(OPENAI_PROFILES={"vllm": {"base_url": local_server.url_for("/v1"), "max_retries": 0}})
    upstream = serve(local_server, stream=text_stream("ok"))

    def read() -> ChatResponse:
        stream = get_llm().chat_stream(USER, model="vllm/Qwen/Qwen2.5-7B-Instruct", max_tokens=5)
        list(stream)
        return stream.response

    response = in_app(app, read)

    assert upstream.bodies[0]["model"] == "Qwen/Qwen2.5-7B-Instruct"
    assert upstream.bodies[0]["max_tokens"] == 5
    assert upstream.headers[0]["authorization"] == "Bearer not-needed"  # a keyless endpoint
    assert response.provider == "vllm"


def test_an_azure_profile_calls_the_deployment_path(make_app, local_server):
    endpoint = local_server.url_for("/").rstrip("/")
    app = make_app(
        OPENAI_PROFILES={
            "azure": {
                "azure_endpoint": endpoint,
                "api_version": "2024-10-21",
                "api_key": AZURE_KEY,
                "max_retries": 0,
            }
        }
    )
    chat = serve(
        local_server,
        completion("from azure", model="gpt-4o-2024-08-06"),
        path="/openai/deployments/prod-gpt4o/chat/completions",
        query_string={"api-version": "2024-10-21"},
    )
    embeddings = serve(
        local_server,
        {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [1.0]}], "model": "m",
         "usage": {"prompt_tokens": 1, "total_tokens": 1}},
        path="/openai/deployments/prod-embed/embeddings",
        query_string={"api-version": "2024-10-21"},
    )  # fmt: skip

    def run() -> tuple[ChatResponse, list[list[float]]]:
        llm = get_llm()
        return llm.chat(USER, model="azure/prod-gpt4o", max_tokens=100), llm.embed(
            ["x"], model="azure/prod-embed"
        )

    response, vectors = in_app(app, run)

    assert chat.paths == ["/openai/deployments/prod-gpt4o/chat/completions"]
    assert chat.queries == [{"api-version": "2024-10-21"}]
    assert chat.headers[0]["api-key"] == AZURE_KEY
    assert chat.bodies[0]["max_completion_tokens"] == 100  # Azure follows OpenAI
    assert "max_tokens" not in chat.bodies[0]
    assert (response.provider, response.content) == ("azure", "from azure")
    assert embeddings.paths == ["/openai/deployments/prod-embed/embeddings"]
    assert vectors == [[1.0]]


def test_an_azure_content_filter_error_is_typed(make_app, local_server):
    endpoint = local_server.url_for("/").rstrip("/")
    app = make_app(
        OPENAI_PROFILES={
            "azure": {
                "azure_endpoint": endpoint,
                "api_version": "2024-10-21",
                "api_key": AZURE_KEY,
                "max_retries": 0,
            }
        }
    )
    serve(
        local_server,
        next(case.values[2] for case in ERROR_CASES if case.id == "400-content-filter"),
        status=400,
        path="/openai/deployments/prod-gpt4o/chat/completions",
    )

    with pytest.raises(LLMContentFilterError) as excinfo:
        in_app(app, lambda: get_llm().chat(USER, model="azure/prod-gpt4o"))

    assert (excinfo.value.provider, excinfo.value.model, excinfo.value.status_code) == (
        "azure",
        "prod-gpt4o",
        400,
    )
    assert AZURE_KEY not in str(excinfo.value)
