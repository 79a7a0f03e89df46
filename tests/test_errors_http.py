"""Every LLM error answers ``/api`` with the status and ``error.type`` its class declares.

The views map errors by lookup (``http_status``, ``kind``, ``field``,
``retry_after``), so these tests script each class through the fake provider
and check the answer a client sees, as JSON and when a stream is opened; and
they check that a bad request is refused, naming the exact field, before
anything reaches the (local) upstream server.
"""

from __future__ import annotations

import json

import pytest

import app.llm as llm_package
from app.llm import (
    LLMAuthError,
    LLMBadRequestError,
    LLMBulkheadFullError,
    LLMCircuitOpenError,
    LLMConnectionError,
    LLMContentFilterError,
    LLMContextLengthError,
    LLMError,
    LLMNotConfiguredError,
    LLMNotFoundError,
    LLMPermissionError,
    LLMRateLimitError,
    LLMResponseError,
    LLMServerError,
    LLMTimeoutError,
)
from app.llm.client import get_llm
from app.llm.testing import install_fake_llm
from tests.conftest import CANARY_KEY, api_key_headers

MESSAGES = [{"role": "user", "content": "Hi"}]
WHERE = {"provider": "fake", "model": "m"}

#: (the error the provider raises, status, error.type, what else the body says, Retry-After).
CASES = [
    (LLMAuthError(f"Incorrect API key {CANARY_KEY}", status_code=401, **WHERE), 502, "upstream_auth",
     {"upstream_status": 401}, None),
    (LLMPermissionError("no access", status_code=403, **WHERE), 502, "upstream_auth",
     {"upstream_status": 403}, None),
    (LLMNotFoundError("HTTP 404: no model m", status_code=404, **WHERE), 400, "upstream_rejected",
     {"reason": "not_found", "upstream_status": 404}, None),
    (LLMBadRequestError("HTTP 400: Invalid value for 'temperature'", status_code=400, **WHERE), 400,
     "upstream_rejected", {"reason": "bad_request", "upstream_status": 400}, None),
    (LLMBadRequestError("an image data: URL must be base64", **WHERE), 400, "invalid_request", {}, None),
    (LLMBadRequestError("max_tokens must be a positive integer", field="max_tokens", **WHERE), 400,
     "invalid_request", {"field": "max_tokens"}, None),
    (LLMContextLengthError("HTTP 400: maximum context length", status_code=400, **WHERE), 400,
     "upstream_rejected", {"reason": "context_length", "upstream_status": 400}, None),
    (LLMContentFilterError("flagged by the safety system", **WHERE), 400, "upstream_rejected",
     {"reason": "content_filter"}, None),
    (LLMRateLimitError("slow down", status_code=429, retry_after=2.5, **WHERE), 429, "rate_limited",
     {"upstream_status": 429}, "3"),
    (LLMTimeoutError("no answer", **WHERE), 504, "upstream_timeout", {}, None),
    (LLMConnectionError("refused", **WHERE), 502, "upstream_unreachable", {}, None),
    (LLMServerError(f"HTTP 503: overloaded ({CANARY_KEY})", status_code=503, retry_after=4, **WHERE), 502,
     "upstream_error", {"upstream_status": 503}, "4"),
    (LLMResponseError("structured output is not valid JSON", raw_text="{", **WHERE), 502, "upstream_error",
     {}, None),
    (LLMNotConfiguredError("fake is not configured: set FAKE_KEY", setting="FAKE_KEY", **WHERE), 503,
     "not_configured", {"setting": "FAKE_KEY"}, None),
    (LLMCircuitOpenError("circuit breaker open: no request made", retry_after=12.2, **WHERE), 503,
     "circuit_open", {}, "13"),
    (LLMBulkheadFullError("8 calls to fake are in flight; no request was made", **WHERE), 503,
     "bulkhead_full", {}, None),
    (LLMError(f"KeyError: 'choices' {CANARY_KEY}", **WHERE), 502, "upstream_error", {}, None),
]  # fmt: skip


@pytest.fixture
def fake_app(make_app):
    """An app whose ``fake`` provider raises what a test scripts; no retries, so one item per call."""
    app = make_app(LLM_MAX_RETRIES=0)
    return app, install_fake_llm(app)


def _error(response, status: int, kind: str) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    assert CANARY_KEY not in response.get_data(as_text=True)
    error = json.loads(response.get_data(as_text=True))["error"]
    assert error["type"] == kind
    assert error["message"]
    return error


def test_every_exported_error_class_has_a_case():
    """A new error class must say what it means over HTTP: add it to CASES."""
    exported = {
        value
        for value in vars(llm_package).values()
        if isinstance(value, type) and issubclass(value, LLMError)
    }
    assert exported == {type(error) for error, *_ in CASES}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize(
    ("error", "status", "kind", "extra", "retry_after"),
    CASES,
    ids=[f"{type(case[0]).__name__}-{case[2]}" for case in CASES],
)
def test_each_error_class_answers_its_status_and_kind(
    fake_app, stream, error, status, kind, extra, retry_after
):
    app, fake = fake_app
    fake.add_error(error)

    response = app.test_client().post(
        "/api/chat",
        json={"model": "fake/m", "messages": MESSAGES, "stream": stream},
        headers=api_key_headers(app),
    )

    body = _error(response, status, kind)
    assert (error.http_status, error.kind) == (status, kind)  # what the class declares is what /api said
    assert {key: body[key] for key in extra} == extra
    assert "field" in body if error.field else "field" not in body
    assert (body["provider"], body["model"]) == ("fake", "m")
    assert response.headers.get("Retry-After") == retry_after
    assert fake.methods == ["stream" if stream else "chat"]


def test_an_error_mid_stream_is_an_event_with_the_status_and_kind(fake_app):
    app, fake = fake_app
    fake.add_stream(["Hel", "lo"], error=LLMCircuitOpenError("circuit breaker open", retry_after=3, **WHERE))

    response = app.test_client().post(
        "/api/chat",
        json={"model": "fake/m", "messages": MESSAGES, "stream": True},
        headers=api_key_headers(app),
    )

    assert response.status_code == 200
    events = [block for block in response.get_data(as_text=True).split("\n\n") if block]
    assert events[:2] == ['event: delta\ndata: {"text":"Hel"}', 'event: delta\ndata: {"text":"lo"}']
    name, data = events[2].split("\n")
    assert name == "event: error"
    error = json.loads(data.removeprefix("data: "))["error"]
    assert (error["type"], error["status"]) == ("circuit_open", 503)


def test_embeddings_answer_by_the_same_lookup(fake_app):
    app, fake = fake_app
    fake.add_error(LLMRateLimitError("slow down", retry_after=0.2, **WHERE))

    response = app.test_client().post(
        "/api/embeddings", json={"model": "fake/m", "input": ["a"]}, headers=api_key_headers(app)
    )

    _error(response, 429, "rate_limited")
    assert response.headers["Retry-After"] == "1"


def test_an_open_circuit_from_the_breaker_is_a_503_with_retry_after(make_app):
    """The real breaker, not a scripted error: one failure opens it, the next call is refused."""
    app = make_app(
        LLM_MAX_RETRIES=0, LLM_BREAKER_MIN_CALLS=1, LLM_BREAKER_FAILURE_RATE=0.5, LLM_BREAKER_COOLDOWN=30
    )
    fake = install_fake_llm(app)
    fake.add_error(LLMServerError("HTTP 500", status_code=500, **WHERE))
    client = app.test_client()
    headers = api_key_headers(app)

    first = client.post("/api/chat", json={"model": "fake/m", "messages": MESSAGES}, headers=headers)
    second = client.post("/api/chat", json={"model": "fake/m", "messages": MESSAGES}, headers=headers)

    _error(first, 502, "upstream_error")
    _error(second, 503, "circuit_open")
    assert 1 <= int(second.headers["Retry-After"]) <= 30
    assert len(fake.calls) == 1  # the second call never reached the provider


# --- the layer's own validation: 400 naming the exact field, nothing sent ----------------


@pytest.fixture
def openai_app(make_app, local_server):
    """The ``openai`` provider pointed at ``local_server``: a request that got through would show there."""
    return make_app(
        OPENAI_API_KEY=CANARY_KEY, OPENAI_BASE_URL=local_server.url_for("/v1"), OPENAI_MAX_RETRIES=0
    )


IMAGE = "data:image/png;base64,iVBORw0KGgo="
ARRAY_SCHEMA = {"name": "x", "schema": {"type": "array"}}  # the layer decodes into an object only


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"messages": [{"role": "user", "content": "Hi"},
                       {"role": "user", "content": [{"type": "text", "text": "Look"}, {"type": "image"}]}]},
         "messages[1].content[1].url"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"detail": "low"}}]}]},
         "messages[0].content[0].image_url.url"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": 7}]}]},
         "messages[0].content[0].text"),
        ({"messages": [{"role": "user", "content": [{"type": "video", "url": IMAGE}]}]},
         "messages[0].content[0].type"),
        ({"messages": [{"role": "user", "content": "Hi"},
                       {"role": "assistant", "content": None, "tool_calls": [
                           {"id": "c1", "function": {"name": "f", "arguments": "{oops"}}]}]},
         "messages[1].tool_calls[0].function.arguments"),
        ({"messages": MESSAGES, "tools": [{"name": "ok"}, {"name": "no spaces allowed"}]}, "tools[1].name"),
        ({"messages": MESSAGES, "tools": [{"name": "f"}], "tool_choice": "required_or_not"}, "tool_choice"),
        ({"messages": MESSAGES, "response_format": {"type": "json_schema", "json_schema": ARRAY_SCHEMA}},
         "response_format.json_schema.schema"),
    ],
)  # fmt: skip
def test_a_bad_request_names_the_exact_field_and_sends_nothing(openai_app, local_server, stream, body, field):
    response = openai_app.test_client().post(
        "/api/chat",
        json={**body, "model": "openai/gpt-4o", "stream": stream},
        headers=api_key_headers(openai_app),
    )

    error = _error(response, 400, "invalid_request")
    assert error["field"] == field
    assert local_server.log == []  # refused before any request reached the provider


def test_developer_messages_are_the_layers_to_translate(openai_app, local_server):
    """``developer`` is accepted by the layer itself (as ``system``), not rewritten by the view."""
    from app.llm import get_llm
    from app.llm.types import normalise_messages

    [message] = normalise_messages([{"role": "developer", "content": "Be terse."}])
    assert message.role == "system"
    with openai_app.app_context(), pytest.raises(LLMBadRequestError) as excinfo:
        get_llm().chat([{"role": "wizard", "content": "x"}], model="openai/gpt-4o")
    assert excinfo.value.field == "messages[0].role"
    assert "'developer'" in excinfo.value.message
    assert local_server.log == []


# --- the errors themselves -------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "field"),
    [
        ({"messages": [{"role": "robot", "content": "Hi"}]}, "messages[0].role"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"response_format": "json"}, "response_format"),
        ({"fallbacks": "openai/gpt-4o"}, "fallbacks"),
        ({"model": "gpt-4o"}, "model"),
    ],
)
def test_the_layer_names_the_field_and_adds_provider_and_model(app, call, field):
    """The layer adds provider and model to its validators' errors; the field survives it."""
    arguments = {"messages": [{"role": "user", "content": "Hi"}], "model": "openai/gpt-4o", **call}
    with app.app_context(), pytest.raises(LLMBadRequestError) as caught:
        get_llm().chat(arguments.pop("messages"), arguments.pop("model"), **arguments)
    assert caught.value.field == field
    assert caught.value.kind == "invalid_request"
    if field not in {"model", "fallbacks"}:
        assert (caught.value.provider, caught.value.model) == ("openai", "gpt-4o")


def test_a_different_error_raised_while_handling_one_does_not_take_its_field():
    try:
        raise LLMBadRequestError(
            "tools[0].parameters must be a JSON schema object", field="tools[0].parameters"
        )
    except LLMBadRequestError:
        other = LLMBadRequestError("fallbacks must be a list of 'provider/model' names")

    assert other.field is None


def test_a_bad_request_is_the_providers_when_it_has_a_status_or_a_cause():
    assert LLMBadRequestError("local check").kind == "invalid_request"
    assert LLMBadRequestError("HTTP 422: no", status_code=422).kind == "upstream_rejected"
    try:
        raise LLMBadRequestError("error in the stream: invalid prompt") from ValueError("the SDK's error")
    except LLMBadRequestError as error:
        assert error.kind == "upstream_rejected"
    assert {
        LLMBadRequestError.http_status,
        LLMContextLengthError.http_status,
        LLMNotFoundError.http_status,
    } == {400}
