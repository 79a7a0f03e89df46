"""The generation parameters: each provider's exact wire field, refusals by name, and the drop switch.

Every case calls the layer as a user does (``get_llm().chat(...)`` /
``chat_stream``) and asserts on the body that really reached a local server
speaking that provider's protocol (:class:`tests.servers.ScriptedServer`,
through the real SDKs). OpenAI requests are also sent to the official spec
(Prism) in ``tests/test_openai_spec.py``.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask

from app.llm import LLMBadRequestError, get_llm
from app.llm.testing import install_fake_llm
from tests import payloads as p
from tests.conftest import CANARY_GEMINI_KEY, CANARY_KEY
from tests.servers import Reply, ScriptedServer

USER = [{"role": "user", "content": "Hi"}]
OPENAI_PATH = "/v1/chat/completions"
GEMINI_PATH = "/v1beta/models/gemini-2.5-flash:generateContent"
GEMINI_STREAM_PATH = "/v1beta/models/gemini-2.5-flash:streamGenerateContent"
ANTHROPIC_PATH = "/v1/messages"


@pytest.fixture
def app(make_app: Callable[..., Flask], upstream: ScriptedServer) -> Flask:
    """Every provider pointed at the test's upstream, with the settings a user gives."""
    return make_app(
        OPENAI_API_KEY=CANARY_KEY,
        OPENAI_BASE_URL=upstream.url_for("/v1"),
        OPENAI_PROFILES={"vllm": {"base_url": upstream.url_for("/v1"), "api_key": "local"}},
        GEMINI_API_KEY=CANARY_GEMINI_KEY,
        GENAI_BASE_URL=upstream.url_for("/"),
        GENAI_API_VERSION="v1beta",
        ANTHROPIC_API_KEY=CANARY_KEY,
        ANTHROPIC_BASE_URL=upstream.base_url,
    )


def chat(app: Flask, model: str, **options: Any) -> Any:
    with app.app_context():
        return get_llm().chat(USER, model=model, **options)


def sent(upstream: ScriptedServer) -> dict[str, Any]:
    body: dict[str, Any] = upstream.only_request().json
    return body


def script(upstream: ScriptedServer, provider: str) -> None:
    """One answer of ``provider`` (a JSON object as text, so that JSON mode can parse it)."""
    answer = '{"ok": true}'
    if provider == "openai":
        upstream.script(OPENAI_PATH, p.chat_completion(answer))
    elif provider == "gemini":
        upstream.script(GEMINI_PATH, p.gemini_reply(p.gemini_text(answer)))
    else:
        upstream.script(ANTHROPIC_PATH, p.anthropic_message([{"type": "text", "text": answer}]))


# --- each provider's wire field, per parameter -------------------------------------------------

WIRE: list[tuple[str, dict[str, Any], Callable[[dict[str, Any]], Any], Any]] = [
    # OpenAI-compatible: the Chat Completions names.
    ("openai", {"top_p": 0.9}, lambda b: b["top_p"], 0.9),
    ("openai", {"stop": "END"}, lambda b: b["stop"], ["END"]),
    ("openai", {"stop": ["a", "b"]}, lambda b: b["stop"], ["a", "b"]),
    ("openai", {"seed": 42}, lambda b: b["seed"], 42),
    ("openai", {"presence_penalty": 0.5}, lambda b: b["presence_penalty"], 0.5),
    ("openai", {"frequency_penalty": -0.5}, lambda b: b["frequency_penalty"], -0.5),
    ("openai", {"reasoning_effort": "low"}, lambda b: b["reasoning_effort"], "low"),
    ("openai", {"response_format": {"type": "json_object"}}, lambda b: b["response_format"],
     {"type": "json_object"}),
    ("openai", {"extra": {"service_tier": "flex", "logit_bias": {"50256": -100}}},
     lambda b: (b["service_tier"], b["logit_bias"]), ("flex", {"50256": -100})),
    # Gemini: generationConfig, thinkingConfig, safetySettings.
    ("gemini", {"top_p": 0.9}, lambda b: b["generationConfig"]["topP"], 0.9),
    ("gemini", {"top_k": 40}, lambda b: b["generationConfig"]["topK"], 40),
    ("gemini", {"stop": "END"}, lambda b: b["generationConfig"]["stopSequences"], ["END"]),
    ("gemini", {"seed": 7}, lambda b: b["generationConfig"]["seed"], 7),
    ("gemini", {"presence_penalty": 0.5}, lambda b: b["generationConfig"]["presencePenalty"], 0.5),
    ("gemini", {"frequency_penalty": 0.25}, lambda b: b["generationConfig"]["frequencyPenalty"], 0.25),
    # google-genai writes the fields inside thinkingConfig under their proto names, which the
    # API reads as it reads lowerCamelCase (thinkingBudget, thinkingLevel).
    ("gemini", {"thinking_budget": 512}, lambda b: b["generationConfig"]["thinkingConfig"],
     {"thinking_budget": 512}),
    ("gemini", {"thinking_budget": 0}, lambda b: b["generationConfig"]["thinkingConfig"],
     {"thinking_budget": 0}),
    ("gemini", {"reasoning_effort": "high"}, lambda b: b["generationConfig"]["thinkingConfig"],
     {"thinking_level": "HIGH"}),
    ("gemini", {"safety": {"HARM_CATEGORY_HARASSMENT": "BLOCK_ONLY_HIGH"}}, lambda b: b["safetySettings"],
     [{"category": "HARM_CATEGORY_HARASSMENT", "threshold": "BLOCK_ONLY_HIGH"}]),
    ("gemini", {"safety": [{"category": "harm_category_hate_speech", "threshold": "block_none"}]},
     lambda b: b["safetySettings"], [{"category": "HARM_CATEGORY_HATE_SPEECH", "threshold": "BLOCK_NONE"}]),
    ("gemini", {"response_format": {"type": "json_object"}},
     lambda b: (b["generationConfig"]["responseMimeType"], "responseJsonSchema" in b["generationConfig"]),
     ("application/json", False)),
    ("gemini", {"temperature": 0.5, "extra": {"generationConfig": {"candidateCount": 1},
                                              "cachedContent": "cachedContents/abc"}},
     lambda b: (b["generationConfig"], b["cachedContent"]),
     ({"temperature": 0.5, "candidateCount": 1}, "cachedContents/abc")),
    # Anthropic: the Messages API names.
    ("anthropic", {"top_p": 0.9}, lambda b: b["top_p"], 0.9),
    ("anthropic", {"top_k": 40}, lambda b: b["top_k"], 40),
    ("anthropic", {"stop": ["END", "STOP"]}, lambda b: b["stop_sequences"], ["END", "STOP"]),
    ("anthropic", {"thinking_budget": 2048}, lambda b: (b["thinking"], b["max_tokens"]),
     ({"type": "enabled", "budget_tokens": 2048}, 2048 + 1024)),
    ("anthropic", {"thinking_budget": 2048, "max_tokens": 4096}, lambda b: (b["thinking"], b["max_tokens"]),
     ({"type": "enabled", "budget_tokens": 2048}, 4096)),
    ("anthropic", {"user": "u1", "extra": {"metadata": {"tag": "x"}, "service_tier": "auto"}},
     lambda b: (b["metadata"], b["service_tier"]), ({"user_id": "u1", "tag": "x"}, "auto")),
]  # fmt: skip

ADDRESS = {
    "openai": "openai/gpt-4o-mini",
    "gemini": "gemini/gemini-2.5-flash",
    "anthropic": "anthropic/claude-sonnet-4-6",
}


@pytest.mark.parametrize(
    ("provider", "options", "field", "expected"),
    WIRE,
    ids=[f"{case[0]}-{'+'.join(case[1])}-{i}" for i, case in enumerate(WIRE)],
)
def test_each_parameter_reaches_the_wire_as_the_providers_field(
    app, upstream, provider, options, field, expected
):
    script(upstream, provider)

    chat(app, ADDRESS[provider], **options)

    assert field(sent(upstream)) == expected


def test_every_parameter_together_in_a_stream_of_each_provider(app, upstream):
    upstream.script(OPENAI_PATH, Reply.stream(p.openai_text_events("ok")))
    upstream.script(GEMINI_STREAM_PATH, Reply.stream([p.gemini_event(p.gemini_reply(p.gemini_text("ok")))]))
    events = [p.anthropic_message_start(), *p.anthropic_text_block(0, "ok"), *p.anthropic_message_end()]
    upstream.script(ANTHROPIC_PATH, Reply.stream([p.anthropic_event(e) for e in events]))
    common = {"top_p": 0.8, "stop": ["END"], "extra": {"x_trace": "t1"}}

    def read(model: str, **options: Any) -> str:
        with app.app_context():
            return "".join(get_llm().chat_stream(USER, model=model, **common, **options))

    assert read("openai/gpt-4o-mini", seed=1, presence_penalty=0.1, frequency_penalty=0.2,
                reasoning_effort="minimal") == "ok"  # fmt: skip
    assert read("gemini/gemini-2.5-flash", top_k=5, seed=1, thinking_budget=256,
                safety={"HARM_CATEGORY_DANGEROUS_CONTENT": "OFF"}) == "ok"  # fmt: skip
    assert read("anthropic/claude-sonnet-4-6", thinking_budget=1024, max_tokens=2048) == "ok"

    openai_body, gemini_body, anthropic_body = (r.json for r in upstream.requests)
    assert {k: openai_body[k] for k in ("top_p", "stop", "seed", "presence_penalty", "frequency_penalty",
                                        "reasoning_effort", "x_trace", "stream")} == {
        "top_p": 0.8, "stop": ["END"], "seed": 1, "presence_penalty": 0.1, "frequency_penalty": 0.2,
        "reasoning_effort": "minimal", "x_trace": "t1", "stream": True}  # fmt: skip
    assert gemini_body["generationConfig"] == {"topP": 0.8, "topK": 5, "stopSequences": ["END"], "seed": 1,
                                               "thinkingConfig": {"thinking_budget": 256}}  # fmt: skip
    assert gemini_body["safetySettings"] == [
        {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "threshold": "OFF"}
    ]
    assert gemini_body["x_trace"] == "t1"
    assert {k: anthropic_body[k] for k in ("top_p", "stop_sequences", "thinking", "max_tokens", "x_trace",
                                           "stream")} == {
        "top_p": 0.8, "stop_sequences": ["END"], "thinking": {"type": "enabled", "budget_tokens": 1024},
        "max_tokens": 2048, "x_trace": "t1", "stream": True}  # fmt: skip


def test_async_calls_send_the_same_fields(app, upstream):
    script(upstream, "anthropic")
    script(upstream, "openai")

    async def both() -> None:
        await get_llm().achat(USER, model="anthropic/claude-sonnet-4-6", top_k=3, stop="X")
        await get_llm().achat(USER, model="openai/gpt-4o-mini", seed=3, stop="X")

    with app.app_context():
        asyncio.run(both())

    anthropic_body, openai_body = (r.json for r in upstream.requests)
    assert (anthropic_body["top_k"], anthropic_body["stop_sequences"]) == (3, ["X"])
    assert (openai_body["seed"], openai_body["stop"]) == (3, ["X"])


def test_a_compatible_server_gets_the_openai_names_and_more_than_four_stops(app, upstream):
    upstream.script(OPENAI_PATH, p.chat_completion("ok"))

    chat(app, "vllm/qwen", stop=["1", "2", "3", "4", "5"], extra={"top_k": 20}, max_tokens=10)

    body = sent(upstream)
    assert (body["stop"], body["top_k"], body["max_tokens"]) == (["1", "2", "3", "4", "5"], 20, 10)


# --- refused by name, before anything is sent ---------------------------------------------------

UNSUPPORTED = [
    ("openai", "top_k", 40),
    ("openai", "thinking_budget", 1024),
    ("openai", "safety", {"HARM_CATEGORY_HARASSMENT": "BLOCK_NONE"}),
    ("anthropic", "seed", 1),
    ("anthropic", "presence_penalty", 0.5),
    ("anthropic", "frequency_penalty", 0.5),
    ("anthropic", "reasoning_effort", "high"),
    ("anthropic", "safety", {"HARM_CATEGORY_HARASSMENT": "BLOCK_NONE"}),
]


@pytest.mark.parametrize(("provider", "name", "value"), UNSUPPORTED)
def test_a_parameter_a_provider_cannot_take_is_a_400_naming_it_and_the_provider(
    app, upstream, provider, name, value
):
    with pytest.raises(LLMBadRequestError) as excinfo:
        chat(app, ADDRESS[provider], **{name: value})

    error = excinfo.value
    assert error.field == name
    assert (error.http_status, error.kind) == (400, "invalid_request")
    assert f"{name} is not supported by provider {provider!r}" in error.message
    assert error.provider == provider
    assert upstream.requests == []


PROVIDER_LIMITS = [
    ("openai", {"stop": ["1", "2", "3", "4", "5"]}, "stop"),
    ("gemini", {"seed": 2**31}, "seed"),
    ("gemini", {"reasoning_effort": "low", "thinking_budget": 100}, "thinking_budget"),
    ("gemini", {"safety": {"HARM_CATEGORY_NOPE": "BLOCK_NONE"}}, "safety[0].category"),
    ("gemini", {"safety": [{"category": "HARM_CATEGORY_HARASSMENT", "threshold": "SOMETIMES"}]},
     "safety[0].threshold"),
    ("anthropic", {"temperature": 1.5}, "temperature"),
    ("anthropic", {"thinking_budget": 1000}, "thinking_budget"),
    ("anthropic", {"thinking_budget": 2048, "max_tokens": 2048}, "thinking_budget"),
    ("anthropic", {"thinking_budget": 2048, "temperature": 0.5}, "temperature"),
    ("anthropic", {"response_format": {"type": "json_object"}}, "response_format"),
]  # fmt: skip


@pytest.mark.parametrize(("provider", "options", "field"), PROVIDER_LIMITS)
def test_a_value_a_provider_cannot_take_is_a_400_naming_the_field(app, upstream, provider, options, field):
    with pytest.raises(LLMBadRequestError) as excinfo:
        chat(app, ADDRESS[provider], **options)

    assert excinfo.value.field == field
    assert upstream.requests == []


INVALID = [
    ({"temperature": math.nan}, "temperature"),
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": True}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_p": math.inf}, "top_p"),
    ({"top_p": -0.1}, "top_p"),
    ({"top_k": 0}, "top_k"),
    ({"top_k": 2.5}, "top_k"),
    ({"top_k": True}, "top_k"),
    ({"stop": []}, "stop"),
    ({"stop": ""}, "stop"),
    ({"stop": ["ok", ""]}, "stop[1]"),
    ({"stop": ["ok", 3]}, "stop[1]"),
    ({"stop": b"x"}, "stop"),
    ({"stop": ["s"] * 17}, "stop"),
    ({"seed": 1.0}, "seed"),
    ({"seed": 2**63}, "seed"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"presence_penalty": math.nan}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"reasoning_effort": "max"}, "reasoning_effort"),
    ({"reasoning_effort": "LOW"}, "reasoning_effort"),
    ({"thinking_budget": -2}, "thinking_budget"),
    ({"thinking_budget": 1.5}, "thinking_budget"),
    ({"safety": "BLOCK_NONE"}, "safety"),
    ({"safety": {}}, "safety"),
    ({"safety": [{"category": "HARM_CATEGORY_HARASSMENT"}]}, "safety[0]"),
    ({"safety": [{"category": "x", "threshold": "y", "method": "z"}]}, "safety[0]"),
    ({"extra": ["x"]}, "extra"),
    ({"extra": {"temperature": math.nan}}, "extra"),
    ({"extra": {"when": object()}}, "extra"),
    ({"extra": {"messages": []}}, "extra.messages"),
    ({"extra": {"model": "other"}}, "extra.model"),
    ({"extra": {"stream": True}}, "extra.stream"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 1.5}, "max_tokens"),
]


@pytest.mark.parametrize(("options", "field"), INVALID, ids=[f"{f}-{i}" for i, (_, f) in enumerate(INVALID)])
def test_invalid_values_are_a_400_naming_the_field_before_any_hook_or_request(app, upstream, options, field):
    fake = install_fake_llm(app, echo=True)

    for model in ("fake/m", "openai/gpt-4o-mini"):
        with pytest.raises(LLMBadRequestError) as excinfo:
            chat(app, model, **options)
        assert excinfo.value.field == field
        assert excinfo.value.http_status == 400
    assert fake.calls == []
    assert upstream.requests == []


def test_the_fake_provider_takes_and_records_every_parameter(app):
    fake = install_fake_llm(app, echo=True)

    chat(app, "fake/m", temperature=0.1, max_tokens=5, top_p=0.5, top_k=3, stop="END", seed=9,
         presence_penalty=0.1, frequency_penalty=0.2, reasoning_effort="medium", thinking_budget=64,
         safety={"harm_category_harassment": "off"}, extra={"options": {"num_ctx": 8192}})  # fmt: skip

    request = fake.last_request
    assert (request.temperature, request.max_tokens, request.top_p, request.top_k) == (0.1, 5, 0.5, 3)
    assert (request.stop, request.seed, request.presence_penalty, request.frequency_penalty) == (
        ("END",), 9, 0.1, 0.2)  # fmt: skip
    assert (request.reasoning_effort, request.thinking_budget) == ("medium", 64)
    assert request.safety == (("HARM_CATEGORY_HARASSMENT", "OFF"),)
    assert request.extra == {"options": {"num_ctx": 8192}}


def test_extra_is_copied_so_the_callers_dict_can_change_afterwards(app):
    fake = install_fake_llm(app, echo=True)
    extra = {"options": {"num_ctx": 8192}}

    chat(app, "fake/m", extra=extra)
    extra["options"]["num_ctx"] = 1

    assert fake.last_request.extra == {"options": {"num_ctx": 8192}}


def test_an_unknown_keyword_is_still_a_type_error(app):
    install_fake_llm(app, echo=True)
    with pytest.raises(TypeError, match="top_q"):
        chat(app, "fake/m", top_q=0.5)


# --- LLM_DROP_UNSUPPORTED ----------------------------------------------------------------------


def test_drop_unsupported_drops_with_one_log_line_per_provider_and_parameter(make_app, upstream, caplog):
    app = make_app(
        OPENAI_API_KEY=CANARY_KEY,
        OPENAI_BASE_URL=upstream.url_for("/v1"),
        ANTHROPIC_API_KEY=CANARY_KEY,
        ANTHROPIC_BASE_URL=upstream.base_url,
        LLM_DROP_UNSUPPORTED="true",
    )
    for _ in range(3):
        upstream.script(OPENAI_PATH, p.chat_completion("ok"))
        upstream.script(ANTHROPIC_PATH, p.anthropic_message())

    with caplog.at_level(logging.WARNING, logger="app.llm.client"):
        for _ in range(3):
            chat(app, "openai/gpt-4o-mini", top_k=40, top_p=0.5, safety={"HARM_CATEGORY_HARASSMENT": "OFF"})
            chat(app, "anthropic/claude-sonnet-4-6", top_k=40, seed=3)

    bodies = [r.json for r in upstream.requests]
    assert len(bodies) == 6
    for body in bodies[0::2]:
        assert body["top_p"] == 0.5 and "top_k" not in body and "safety" not in body
    for body in bodies[1::2]:
        assert body["top_k"] == 40 and "seed" not in body
    dropped = sorted(r.getMessage() for r in caplog.records if "LLM_DROP_UNSUPPORTED" in r.getMessage())
    assert dropped == [
        "LLM_DROP_UNSUPPORTED: safety is not supported by provider 'openai' and is dropped from its calls",
        "LLM_DROP_UNSUPPORTED: seed is not supported by provider 'anthropic' and is dropped from its calls",
        "LLM_DROP_UNSUPPORTED: top_k is not supported by provider 'openai' and is dropped from its calls",
    ]


def test_drop_unsupported_does_not_drop_a_bad_value(make_app, upstream):
    app = make_app(
        OPENAI_API_KEY=CANARY_KEY, OPENAI_BASE_URL=upstream.url_for("/v1"), LLM_DROP_UNSUPPORTED=True
    )
    with pytest.raises(LLMBadRequestError) as excinfo:
        chat(app, "openai/gpt-4o-mini", top_k=-1)
    assert excinfo.value.field == "top_k"
    assert upstream.requests == []


def test_drop_unsupported_must_be_a_boolean(make_app):
    from app.errors import ConfigError

    with pytest.raises(ConfigError, match="LLM_DROP_UNSUPPORTED"):
        make_app(LLM_DROP_UNSUPPORTED="sometimes")


# --- fallbacks: each model's own support ------------------------------------------------------


def test_a_fallback_that_cannot_take_a_parameter_is_skipped_and_shown(app, upstream):
    upstream.script(OPENAI_PATH, Reply(503, p.openai_error("overloaded", "server_error", None)))

    with pytest.raises(Exception) as excinfo:
        chat(app, "openai/gpt-4o-mini", seed=5, fallbacks=["anthropic/claude-sonnet-4-6"])

    assert [a.model for a in excinfo.value.attempts] == ["openai/gpt-4o-mini", "anthropic/claude-sonnet-4-6"]
    assert excinfo.value.attempts[-1].outcome == "LLMBadRequestError"
    assert [r.path for r in upstream.requests] == [OPENAI_PATH]  # Anthropic was never asked


def test_the_context_length_fallback_skips_a_model_whose_window_is_too_small(make_app, upstream):
    app = make_app(
        OPENAI_API_KEY=CANARY_KEY,
        OPENAI_BASE_URL=upstream.url_for("/v1"),
        GEMINI_API_KEY=CANARY_GEMINI_KEY,
        GENAI_BASE_URL=upstream.url_for("/"),
        GENAI_API_VERSION="v1beta",
        LLM_MODELS={"vllm/small": {"context_window": 4096}},
        OPENAI_PROFILES={"vllm": {"base_url": upstream.url_for("/v1"), "api_key": "local"}},
    )
    too_long = "word " * 150_000  # about 190k tokens by the estimate (characters / 4)
    upstream.script(OPENAI_PATH, Reply(400, p.openai_error("maximum context length", "invalid_request_error",
                                                            "context_length_exceeded")))  # fmt: skip
    upstream.script(GEMINI_PATH, p.gemini_reply(p.gemini_text("read it all")))

    with app.app_context():
        response = get_llm().chat(
            [{"role": "user", "content": too_long}],
            model="openai/gpt-4o-mini",
            fallbacks=["vllm/small", "gemini/gemini-2.5-flash"],
        )

    assert response.content == "read it all"
    assert [(a.model, a.outcome) for a in response.attempts] == [
        ("openai/gpt-4o-mini", "LLMContextLengthError"),
        ("vllm/small", "LLMContextLengthError"),  # skipped: 4096 tokens < the estimate
        ("gemini/gemini-2.5-flash", "ok"),
    ]
    assert [r.path for r in upstream.requests] == [OPENAI_PATH, GEMINI_PATH]


def test_a_fallback_whose_window_fits_is_tried(make_app, upstream):
    app = make_app(
        OPENAI_API_KEY=CANARY_KEY,
        OPENAI_BASE_URL=upstream.url_for("/v1"),
        LLM_MODELS={"vllm/small": {"context_window": 4096}},
        OPENAI_PROFILES={"vllm": {"base_url": upstream.url_for("/v1"), "api_key": "local"}},
    )
    upstream.script(
        OPENAI_PATH, Reply(503, p.openai_error("overloaded", "server_error", None)), p.chat_completion("ok")
    )

    response = chat(app, "openai/gpt-4o-mini", fallbacks=["vllm/small"], max_tokens=100)

    assert response.content == "ok"
    assert [a.model for a in response.attempts] == ["openai/gpt-4o-mini", "vllm/small"]
