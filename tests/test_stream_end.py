"""A stream is done only when the provider says so: its end marker, or an error.

OpenAI ends an answer with a chunk carrying ``finish_reason`` (then usage and
``[DONE]``), Anthropic with ``message_stop``, Gemini with a chunk carrying a
``finishReason``. A body that stops before it (a proxy cutting a chunked body
cleanly, a truncated answer) or that is not an event stream at all (a JSON
reply) used to end as an empty or partial success with null usage; each is an
:class:`LLMResponseError` now, from sync and async streams and through
``/api/chat`` (an ``error`` event after the deltas, never ``done``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask

from app.llm import LLMResponseError, get_llm
from tests.conftest import CANARY_GEMINI_KEY, CANARY_KEY, api_key_headers
from tests.payloads import (
    anthropic_message,
    anthropic_message_end,
    anthropic_message_start,
    anthropic_sse,
    anthropic_text_block,
    gemini_reply,
    gemini_sse,
    gemini_text,
    gemini_text_chunk,
    openai_chunk,
    openai_role_chunk,
    openai_text_chunks,
    openai_text_stream,
    openai_usage_chunk,
    sse_data,
)
from tests.servers import Reply, ScriptedServer
from tests.test_api_stream import body_lines, sse_events

MESSAGES = [{"role": "user", "content": "Hi"}]
OPENAI_CHAT = "/v1/chat/completions"
ANTHROPIC_CHAT = "/v1/messages"
GEMINI_STREAM = "/v1beta/models/gemini-2.5-flash:streamGenerateContent"

#: model, path, a complete stream, the same stream cut before its end marker, a JSON reply.
PROVIDERS: dict[str, tuple[str, str, Reply, Reply, Reply]] = {
    "openai": (
        "openai/gpt-4o-mini",
        OPENAI_CHAT,
        Reply.stream([openai_text_stream("Hel", "lo")]),
        Reply.stream([sse_data(chunk) for chunk in (openai_role_chunk(), *openai_text_chunks("Hel", "lo"))]),
        Reply(body='{"id": "chatcmpl-1", "object": "chat.completion", "choices": [{"index": 0, "mess'),
    ),
    "anthropic": (
        "anthropic/claude-sonnet-4-6",
        ANTHROPIC_CHAT,
        Reply.stream(
            [
                anthropic_sse(
                    anthropic_message_start(), *anthropic_text_block(0, "Hel", "lo"), *anthropic_message_end()
                )
            ]
        ),
        Reply.stream([anthropic_sse(anthropic_message_start(), *anthropic_text_block(0, "Hel", "lo"))]),
        Reply(body=anthropic_message([{"type": "text", "text": "Hello"}])),
    ),
    "gemini": (
        "gemini/gemini-2.5-flash",
        GEMINI_STREAM,
        Reply.stream([gemini_sse(gemini_text_chunk("Hel"), gemini_reply(gemini_text("lo")))]),
        Reply.stream([gemini_sse(gemini_text_chunk("Hel"), gemini_text_chunk("lo"))]),
        Reply(body=gemini_reply(gemini_text("Hello"), finish=None)),
    ),
}


@pytest.fixture
def app(make_app, upstream: ScriptedServer) -> Flask:
    return make_app(
        OPENAI_API_KEY=CANARY_KEY,
        OPENAI_BASE_URL=upstream.url_for("/v1"),
        ANTHROPIC_API_KEY=CANARY_KEY,
        ANTHROPIC_BASE_URL=upstream.base_url,
        GEMINI_API_KEY=CANARY_GEMINI_KEY,
        GENAI_BASE_URL=upstream.url_for("/"),
        GENAI_API_VERSION="v1beta",
    )


def read_sync(app: Flask, model: str) -> tuple[list[str], Any]:
    """The texts read, and the final response or the LLMResponseError (at opening or while reading)."""
    texts: list[str] = []
    with app.app_context():
        try:
            with get_llm().chat_stream(MESSAGES, model=model) as stream:
                for text in stream:
                    texts.append(text)
        except LLMResponseError as exc:
            return texts, exc
        return texts, stream.response


def read_async(app: Flask, model: str) -> tuple[list[str], Any]:
    async def read() -> tuple[list[str], Any]:
        texts: list[str] = []
        stream = get_llm().achat_stream(MESSAGES, model=model)
        try:
            async for text in stream:
                texts.append(text)
        except LLMResponseError as exc:
            return texts, exc
        finally:
            await stream.aclose()
        return texts, stream.response

    with app.app_context():
        return asyncio.run(read())


READERS: dict[str, Callable[[Flask, str], tuple[list[str], Any]]] = {"sync": read_sync, "async": read_async}


@pytest.mark.parametrize("mode", READERS)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_complete_stream_is_done(app, upstream, provider, mode):
    model, path, complete, _cut, _json = PROVIDERS[provider]
    upstream.script(path, complete)

    texts, response = READERS[mode](app, model)

    assert texts == ["Hel", "lo"]
    assert response.content == "Hello"
    assert response.finish_reason == "stop"


@pytest.mark.parametrize("mode", READERS)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_stream_cut_before_its_end_marker_is_an_error_after_its_deltas(app, upstream, provider, mode):
    model, path, _complete, cut, _json = PROVIDERS[provider]
    upstream.script(path, cut)

    texts, error = READERS[mode](app, model)

    assert texts == ["Hel", "lo"]  # what arrived reached the caller
    assert isinstance(error, LLMResponseError)
    assert "the stream ended without its end marker" in str(error)
    assert (error.provider, error.model) == (provider, model.split("/", 1)[1])
    assert upstream.only_request().outcome == "complete"  # the upstream ended its body cleanly


@pytest.mark.parametrize("mode", READERS)
@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_a_json_reply_to_a_stream_is_an_error(app, upstream, provider, mode):
    model, path, _complete, _cut, json_reply = PROVIDERS[provider]
    upstream.script(path, json_reply)

    texts, error = READERS[mode](app, model)

    assert texts == []
    assert isinstance(error, LLMResponseError)
    assert "the body was application/json, not text/event-stream" in str(error)
    assert error.url == upstream.url_for(path)


@pytest.mark.parametrize("mode", READERS)
def test_a_gemini_json_reply_without_a_finish_reason_is_an_error(app, upstream, mode):
    # google-genai reads a JSON reply to a stream as one chunk: complete only with its finish reason.
    model, path, _complete, _cut, json_reply = PROVIDERS["gemini"]
    upstream.script(path, json_reply)

    texts, error = READERS[mode](app, model)

    assert texts == ["Hello"]
    assert isinstance(error, LLMResponseError)
    assert "ended without its end marker (a finish reason)" in str(error)


def test_an_openai_stream_with_a_finish_reason_but_no_done_is_complete(app, upstream):
    # finish_reason is the answer's end; usage and [DONE] may be lost to a proxy without harm.
    chunks = [openai_role_chunk(), *openai_text_chunks("Hel", "lo"), openai_chunk({}, "length")]
    upstream.script(OPENAI_CHAT, Reply.stream([sse_data(chunk) for chunk in chunks]))

    texts, response = read_sync(app, "openai/gpt-4o-mini")

    assert texts == ["Hel", "lo"]
    assert response.finish_reason == "length"


def test_an_openai_stream_with_an_unknown_finish_reason_is_complete(app, upstream):
    chunks = [openai_role_chunk(), *openai_text_chunks("Hi"), openai_chunk({}, "abort"), openai_usage_chunk()]
    upstream.script(OPENAI_CHAT, Reply.stream([*(sse_data(chunk) for chunk in chunks), sse_data("[DONE]")]))

    texts, response = read_sync(app, "openai/gpt-4o-mini")

    assert texts == ["Hi"]
    assert response.input_tokens == 9


def test_a_gemini_stream_of_a_blocked_prompt_is_complete(app, upstream):
    blocked = {"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": {"promptTokenCount": 4}}
    upstream.script(GEMINI_STREAM, Reply.stream([gemini_sse(blocked)]))

    texts, response = read_sync(app, "gemini/gemini-2.5-flash")

    assert texts == []
    assert response.finish_reason == "content_filter"


# --- through /api/chat ---------------------------------------------------------------------------


def post_stream(app: Flask, model: str) -> Any:
    return app.test_client().post(
        "/api/chat",
        json={"stream": True, "model": model, "messages": MESSAGES},
        buffered=False,
        headers=api_key_headers(app),
    )


@pytest.mark.parametrize("provider", PROVIDERS)
def test_api_a_cut_stream_ends_with_an_error_event_never_done(app, upstream, provider):
    model, path, _complete, cut, _json = PROVIDERS[provider]
    upstream.script(path, cut)

    response = post_stream(app, model)

    assert response.status_code == 200
    events = list(sse_events(body_lines(response)))
    assert [name for name, _ in events] == ["delta", "delta", "error"]
    error = events[-1][1]["error"]
    assert (error["type"], error["status"]) == ("upstream_error", 502)
    assert "ended without its end marker" in error["message"]
    assert "127.0.0.1" not in error["message"]  # the upstream's address is for logs and the CLI


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_api_a_json_reply_to_a_stream_is_a_502_before_any_event(app, upstream, provider):
    model, path, _complete, _cut, json_reply = PROVIDERS[provider]
    upstream.script(path, json_reply)

    response = post_stream(app, model)

    assert response.status_code == 502, response.get_data(as_text=True)
    error = json.loads(response.get_data(as_text=True))["error"]
    assert error["type"] == "upstream_error"
    assert "not text/event-stream" in error["message"]


# --- chunks of the wrong shape (OpenAI streams are read as JSON, unparsed) -------------------------


@pytest.mark.parametrize("mode", READERS)
def test_openai_chunks_of_odd_shapes_are_skipped_and_a_chunk_that_is_not_an_object_is_an_error(
    app, upstream, mode
):
    odd = [
        {"id": "c", "model": "m", "choices": "none"},  # not a list: no choices
        {"id": "c", "model": "m", "choices": [7, {"index": 0, "delta": None}]},  # no delta
        {"id": "c", "model": "m", "choices": [{"delta": {"tool_calls": ["x"]}}], "usage": "n/a"},
    ]
    chunks = [openai_role_chunk(), *openai_text_chunks("Hel"), *odd, [1, 2]]
    upstream.script(OPENAI_CHAT, Reply.stream([sse_data(chunk) for chunk in chunks]))

    texts, error = READERS[mode](app, "openai/gpt-4o-mini")

    assert texts == ["Hel"]
    assert isinstance(error, LLMResponseError)
    assert "a stream chunk that is not an object: [1, 2]" in str(error)
    assert (error.provider, error.model) == ("openai", "gpt-4o-mini")


def test_api_an_openai_chunk_that_is_not_an_object_ends_in_an_error_event(app, upstream):
    chunks = [openai_role_chunk(), *openai_text_chunks("Hel"), "just text"]
    upstream.script(OPENAI_CHAT, Reply.stream([sse_data(chunk) for chunk in chunks]))

    response = post_stream(app, "openai/gpt-4o-mini")

    assert response.status_code == 200
    events = list(sse_events(body_lines(response)))
    assert [name for name, _ in events] == ["delta", "error"]
    error = events[-1][1]["error"]
    assert (error["type"], error["status"]) == ("upstream_error", 502)
