"""Usage detail and cost, read from answers shaped as each provider really sends them.

The bodies below are real answers of each API (ids and text shortened) for a
reasoning model reading a cached prompt: OpenAI's ``usage`` with
``prompt_tokens_details.cached_tokens`` and
``completion_tokens_details.reasoning_tokens``, Gemini's ``usageMetadata``
with ``cachedContentTokenCount`` and ``thoughtsTokenCount``, Anthropic's
``usage`` with cache reads and writes and ``output_tokens_details``; and the
same as streams. Each is served by a local server to the real SDK; the cost
must be genai-prices' own figure for the same usage.
"""

from __future__ import annotations

import asyncio
import pickle
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest
from flask import Flask
from genai_prices import Usage, calc_price

from app.llm import ChatResponse, get_llm
from app.llm.hooks import LLMCall, LLMHook
from app.llm.testing import install_fake_llm
from tests.conftest import CANARY_GEMINI_KEY, CANARY_KEY
from tests.payloads import anthropic_event, gemini_event, sse_data
from tests.servers import Reply, ScriptedServer

USER = [{"role": "user", "content": "Prove that there are infinitely many primes."}]

# --- OpenAI: o4-mini, 1024 of 1117 prompt tokens cached, 704 of 946 completion tokens reasoning ----

OPENAI_COMPLETION = {
    "id": "chatcmpl-CHbX3mPZ1lTq0aUv5jvJQmYzK8rNd",
    "object": "chat.completion",
    "created": 1758706841,
    "model": "o4-mini-2025-04-16",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Suppose there were finitely many...",
                        "refusal": None, "annotations": []},
            "finish_reason": "stop",
        }
    ],
    "usage": {
        "prompt_tokens": 1117,
        "completion_tokens": 946,
        "total_tokens": 2063,
        "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 704, "audio_tokens": 0,
                                      "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0},
    },
    "service_tier": "default",
    "system_fingerprint": None,
}  # fmt: skip


def _openai_chunk(delta: dict[str, Any], finish: str | None = None, usage: Any = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-CHbX3mPZ1lTq0aUv5jvJQmYzK8rNd",
        "object": "chat.completion.chunk",
        "created": 1758706841,
        "model": "o4-mini-2025-04-16",
        "service_tier": "default",
        "system_fingerprint": None,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}] if usage is None else [],
        "usage": usage,
    }


OPENAI_STREAM = [
    sse_data(_openai_chunk({"role": "assistant", "content": "", "refusal": None})),
    sse_data(_openai_chunk({"content": "Suppose there were finitely many..."})),
    sse_data(_openai_chunk({}, "stop")),
    sse_data(_openai_chunk({}, usage=OPENAI_COMPLETION["usage"])),
    sse_data("[DONE]"),
]

# --- Gemini: gemini-2.5-flash, 2048 of 2210 prompt tokens from a cache, 496 thinking tokens ---------

GEMINI_USAGE = {
    "promptTokenCount": 2210,
    "candidatesTokenCount": 187,
    "totalTokenCount": 2893,
    "cachedContentTokenCount": 2048,
    "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 2210}],
    "cacheTokensDetails": [{"modality": "TEXT", "tokenCount": 2048}],
    "thoughtsTokenCount": 496,
}
GEMINI_REPLY = {
    "candidates": [
        {
            "content": {"parts": [{"text": "Suppose there were finitely many..."}], "role": "model"},
            "finishReason": "STOP",
            "index": 0,
        }
    ],
    "usageMetadata": GEMINI_USAGE,
    "modelVersion": "gemini-2.5-flash",
    "responseId": "mXzTaPq7Bo2Yz7IPvKWQsAg",
}
GEMINI_STREAM = [
    gemini_event({"candidates": [{"content": {"parts": [{"text": "Suppose there "}], "role": "model"},
                                  "index": 0}],
                  "usageMetadata": {"promptTokenCount": 2210, "totalTokenCount": 2210,
                                    "cachedContentTokenCount": 2048},
                  "modelVersion": "gemini-2.5-flash", "responseId": "mXzTaPq7Bo2Yz7IPvKWQsAg"}),
    gemini_event({**GEMINI_REPLY, "candidates": [{"content": {"parts": [{"text": "were finitely many..."}],
                                                              "role": "model"}, "finishReason": "STOP",
                                                  "index": 0}]}),
]  # fmt: skip

# --- Anthropic: claude-sonnet-4-6 with thinking; 1500 tokens read from the cache, 188 written -------

ANTHROPIC_USAGE = {
    "input_tokens": 21,
    "cache_creation_input_tokens": 188,
    "cache_read_input_tokens": 1500,
    "cache_creation": {"ephemeral_5m_input_tokens": 188, "ephemeral_1h_input_tokens": 0},
    "output_tokens": 393,
    "output_tokens_details": {"thinking_tokens": 254},
    "service_tier": "standard",
}
ANTHROPIC_MESSAGE = {
    "id": "msg_01Aq9w938a90dw8q",
    "type": "message",
    "role": "assistant",
    "model": "claude-sonnet-4-6",
    "content": [
        {"type": "thinking", "thinking": "Euclid's argument...", "signature": "EqQBCgIYAhIM1gbcDa9GJwZA2b3h"},
        {"type": "text", "text": "Suppose there were finitely many..."},
    ],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": ANTHROPIC_USAGE,
}
ANTHROPIC_STREAM = [
    anthropic_event(event)
    for event in [
        {"type": "message_start", "message": {**ANTHROPIC_MESSAGE, "content": [], "stop_reason": None,
                                              "usage": {**ANTHROPIC_USAGE, "output_tokens": 1,
                                                        "output_tokens_details": None}}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": "",
                                                                      "signature": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta",
                                                              "thinking": "Euclid's argument..."}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta",
                                                              "signature": "EqQBCgIYAhIM1gbcDa9GJwZA2b3h"}},
        {"type": "content_block_stop", "index": 0},
        {"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta",
                                                              "text": "Suppose there were finitely many..."}},
        {"type": "content_block_stop", "index": 1},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
         "usage": {"input_tokens": 21, "cache_creation_input_tokens": 188, "cache_read_input_tokens": 1500,
                   "output_tokens": 393, "output_tokens_details": {"thinking_tokens": 254}}},
        {"type": "message_stop"},
    ]
]  # fmt: skip


# --- the cases ---------------------------------------------------------------------------------


class Case:
    """One provider's recorded answer and what the layer must read from it."""

    def __init__(
        self,
        name: str,
        address: str,
        path: str,
        stream_path: str,
        body: dict[str, Any],
        stream: list[Any],
        expected: dict[str, Any],
        genai_prices: tuple[str, str],
    ) -> None:
        self.name, self.address, self.path, self.stream_path = name, address, path, stream_path
        self.body, self.stream, self.expected, self.genai_prices = body, stream, expected, genai_prices

    def __str__(self) -> str:
        return self.name


CASES = [
    Case("openai", "openai/o4-mini", "/v1/chat/completions", "/v1/chat/completions",
         OPENAI_COMPLETION, OPENAI_STREAM,
         {"input_tokens": 1117, "output_tokens": 946, "total_tokens": 2063, "reasoning_tokens": 704,
          "cached_input_tokens": 1024, "cache_write_tokens": None,
          "response_id": "chatcmpl-CHbX3mPZ1lTq0aUv5jvJQmYzK8rNd"},
         ("o4-mini", "openai")),
    Case("gemini", "gemini/gemini-2.5-flash", "/v1beta/models/gemini-2.5-flash:generateContent",
         "/v1beta/models/gemini-2.5-flash:streamGenerateContent", GEMINI_REPLY, GEMINI_STREAM,
         # output: the answer's 187 tokens and the 496 thinking tokens, billed as output
         {"input_tokens": 2210, "output_tokens": 187 + 496, "total_tokens": 2893, "reasoning_tokens": 496,
          "cached_input_tokens": 2048, "cache_write_tokens": None, "response_id": "mXzTaPq7Bo2Yz7IPvKWQsAg"},
         ("gemini-2.5-flash", "google")),
    Case("anthropic", "anthropic/claude-sonnet-4-6", "/v1/messages", "/v1/messages",
         ANTHROPIC_MESSAGE, ANTHROPIC_STREAM,
         # input: the uncached 21, the 188 written to the cache and the 1500 read from it
         {"input_tokens": 21 + 188 + 1500, "output_tokens": 393, "total_tokens": 21 + 188 + 1500 + 393,
          "reasoning_tokens": 254, "cached_input_tokens": 1500, "cache_write_tokens": 188,
          "response_id": "msg_01Aq9w938a90dw8q"},
         ("claude-sonnet-4-6", "anthropic")),
]  # fmt: skip


@pytest.fixture(params=CASES, ids=str)
def case(request: pytest.FixtureRequest) -> Case:
    return request.param


@pytest.fixture
def app(make_app: Callable[..., Flask], upstream: ScriptedServer) -> Flask:
    return make_app(
        OPENAI_API_KEY=CANARY_KEY,
        OPENAI_BASE_URL=upstream.url_for("/v1"),
        GEMINI_API_KEY=CANARY_GEMINI_KEY,
        GENAI_BASE_URL=upstream.url_for("/"),
        GENAI_API_VERSION="v1beta",
        ANTHROPIC_API_KEY=CANARY_KEY,
        ANTHROPIC_BASE_URL=upstream.base_url,
    )


def genai_prices_cost(case: Case) -> Decimal:
    """genai-prices' own figure for the case's usage, computed here from the raw numbers."""
    e = case.expected
    model, provider = case.genai_prices
    usage = Usage(
        input_tokens=e["input_tokens"],
        output_tokens=e["output_tokens"],
        cache_read_tokens=e["cached_input_tokens"],
        cache_write_tokens=e["cache_write_tokens"],
    )
    total: Decimal = calc_price(usage, model, provider_id=provider).total_price
    return total


def assert_usage(response: ChatResponse, case: Case) -> None:
    got = {name: getattr(response, name) for name in case.expected}
    assert got == case.expected
    assert isinstance(response.cost, Decimal)
    assert response.cost == genai_prices_cost(case)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_call_reads_reasoning_and_cached_tokens_and_costs_what_genai_prices_says(app, upstream, case, mode):
    upstream.script(case.path, case.body)
    with app.app_context():
        if mode == "sync":
            response = get_llm().chat(USER, model=case.address)
        else:
            response = asyncio.run(get_llm().achat(USER, model=case.address))

    assert response.content == "Suppose there were finitely many..."  # thinking is not content
    assert_usage(response, case)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_stream_reads_the_same_usage_and_cost(app, upstream, case, mode):
    upstream.script(case.stream_path, Reply.stream(case.stream))

    def read() -> tuple[str, ChatResponse]:
        stream = get_llm().chat_stream(USER, model=case.address)
        return "".join(stream), stream.response

    async def aread() -> tuple[str, ChatResponse]:
        stream = get_llm().achat_stream(USER, model=case.address)
        return "".join([delta async for delta in stream]), stream.response

    with app.app_context():
        text, response = read() if mode == "sync" else asyncio.run(aread())

    assert text == "Suppose there were finitely many..."
    assert_usage(response, case)


def test_the_cost_bills_reasoning_as_output_and_cached_input_at_its_price():
    # The figure by hand from genai-prices' prices for o4-mini (USD per million tokens:
    # input 1.1, cached input 0.275, output 4.4), for the OpenAI case above.
    uncached, cached, output = 1117 - 1024, 1024, 946  # output includes the 704 reasoning tokens
    by_hand = (uncached * Decimal("1.1") + cached * Decimal("0.275") + output * Decimal("4.4")) / 1_000_000

    assert genai_prices_cost(CASES[0]) == by_hand


def test_anthropic_cache_writes_are_priced_as_cache_writes():
    # claude-sonnet-4-6: input 3, cache read 0.3, cache write (5 minutes) 3.75, output 15 per million.
    by_hand = (
        21 * Decimal(3) + 1500 * Decimal("0.3") + 188 * Decimal("3.75") + 393 * Decimal(15)
    ) / 1_000_000

    assert genai_prices_cost(CASES[2]) == by_hand


def test_hooks_see_the_cost_in_after_call(app, upstream):
    seen: list[Any] = []

    class Budget(LLMHook):
        def after_call(self, call: LLMCall, response: Any) -> None:
            seen.append((response.cost, response.reasoning_tokens))

    upstream.script(CASES[0].path, CASES[0].body)
    with app.app_context():
        get_llm().add_hook(Budget())
        response = get_llm().chat(USER, model=CASES[0].address)

    assert seen == [(response.cost, 704)]
    assert response.cost is not None


def test_an_unknown_model_has_no_cost_rather_than_a_guess(app, upstream):
    upstream.script("/v1/chat/completions", {**OPENAI_COMPLETION, "model": "my-finetune"})
    with app.app_context():
        response = get_llm().chat(USER, model="openai/my-finetune")
    assert response.cost is None
    assert response.reasoning_tokens == 704


def test_an_answer_without_usage_has_no_cost(app, upstream):
    upstream.script("/v1/chat/completions", {**OPENAI_COMPLETION, "usage": None})
    with app.app_context():
        response = get_llm().chat(USER, model="openai/o4-mini")
    assert (response.input_tokens, response.cost) == (None, None)


def test_llm_models_prices_price_a_deployment_with_genai_prices_arithmetic(make_app, upstream):
    app = make_app(
        OPENAI_PROFILES={"azure": {"azure_endpoint": upstream.base_url, "api_version": "2024-10-21",
                                   "api_key": CANARY_KEY}},
        LLM_MODELS={"azure/prod-gpt": {"input_price": 2, "output_price": "8.5", "cached_input_price": 0.5,
                                       "context_window": 128000}},
    )  # fmt: skip
    upstream.script("/openai/deployments/prod-gpt/chat/completions", {**OPENAI_COMPLETION, "model": "gpt-4o"})

    with app.app_context():
        response = get_llm().chat(USER, model="azure/prod-gpt")

    by_hand = ((1117 - 1024) * 2 + 1024 * Decimal("0.5") + 946 * Decimal("8.5")) / Decimal(1_000_000)
    assert response.cost == by_hand


def test_a_hooks_answer_keeps_its_own_cost_and_the_fake_reports_usage(app):
    fake = install_fake_llm(app)
    fake.add_response("hi", usage={"input_tokens": 10, "output_tokens": 5, "reasoning_tokens": 3,
                                   "cached_input_tokens": 4})  # fmt: skip
    fake.add_stream(["h", "i"], usage={"input_tokens": 10, "output_tokens": 5, "reasoning_tokens": 3,
                                       "cached_input_tokens": 4, "cache_write_tokens": 2})  # fmt: skip
    with app.app_context():
        answer = get_llm().chat(USER, model="fake/m")
        stream = get_llm().chat_stream(USER, model="fake/m")
        assert "".join(stream) == "hi"

    assert (answer.reasoning_tokens, answer.cached_input_tokens, answer.cost) == (3, 4, None)
    streamed = stream.response
    assert (streamed.reasoning_tokens, streamed.cached_input_tokens, streamed.cache_write_tokens) == (3, 4, 2)

    class Cached(LLMHook):
        def before_call(self, call: LLMCall) -> ChatResponse:
            return ChatResponse("from cache", call.model, call.provider, 1, 1, cost=Decimal("0"))

    with app.app_context():
        get_llm().add_hook(Cached())
        assert get_llm().chat(USER, model="openai/o4-mini").cost == Decimal("0")
        replay = get_llm().chat_stream(USER, model="openai/o4-mini")
        assert "".join(replay) == "from cache"
        assert replay.response.cost == Decimal("0")


def test_a_hooks_answer_without_a_cost_is_not_priced(app):
    class Cached(LLMHook):
        def before_call(self, call: LLMCall) -> ChatResponse:
            return ChatResponse("from cache", call.model, call.provider, 1117, 946)

    with app.app_context():
        get_llm().add_hook(Cached())
        answer = get_llm().chat(USER, model="openai/o4-mini")
        replay = get_llm().chat_stream(USER, model="openai/o4-mini")
        assert "".join(replay) == "from cache"

    assert (answer.cost, replay.response.cost) == (None, None)  # no provider was asked


def test_a_pickled_response_keeps_its_cost(app, upstream):
    upstream.script(CASES[0].path, CASES[0].body)
    with app.app_context():
        response = get_llm().chat(USER, model=CASES[0].address)

    copy = pickle.loads(pickle.dumps(response))  # as a response cache would store it

    assert copy.cost == response.cost == genai_prices_cost(CASES[0])
    assert copy.pricing is None


def test_inconsistent_usage_gives_no_cost_and_one_warning_not_an_error(app, upstream, caplog):
    usage = {**OPENAI_COMPLETION["usage"], "prompt_tokens_details": {"cached_tokens": 5000}}  # > prompt
    upstream.script(
        CASES[0].path, {**OPENAI_COMPLETION, "usage": usage}, {**OPENAI_COMPLETION, "usage": usage}
    )
    with app.app_context():
        first = get_llm().chat(USER, model=CASES[0].address)
        second = get_llm().chat(USER, model=CASES[0].address)

    assert (first.cost, second.cost) == (None, None)
    assert first.content == "Suppose there were finitely many..."
    warnings = [r.getMessage() for r in caplog.records if r.name == "app.llm.catalogue"]
    assert len(warnings) == 1 and warnings[0].startswith("no cost for openai/o4-mini")
