"""Bring your own key: ``api_key=`` on every call, over the profile's shared pool, never shown anywhere.

Against a real local server speaking each provider's protocol: two tenants'
keys (and the platform's) arrive in order on one reused TCP connection (equal
client ports), for OpenAI-compatible profiles, Azure, Anthropic and Gemini,
sync and async; a profile without a key of its own serves per-call keys and
still says "not configured" without one; an empty key is refused before any
request; per-key clients are bounded and a forked child starts with none; and
a canary tenant key that the upstream echoes back appears 0 times in every
output: DEBUG logs, errors, tracebacks, reprs, the call log, hooks' calls,
cache keys and a recorded cassette.
"""

from __future__ import annotations

import asyncio
import json
import logging
import traceback
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask

from app.llm import LLMAuthError, LLMBadRequestError, LLMError, LLMNotConfiguredError, get_llm
from app.llm.canonical import request_key
from app.llm.hooks import LLMCall, LLMHook
from app.llm.providers.base import PerKeyClients, key_id
from tests.conftest import CANARY_GEMINI_KEY, CANARY_KEY
from tests.payloads import (
    anthropic_error,
    anthropic_message,
    chat_completion,
    gemini_embeddings,
    gemini_error,
    gemini_reply,
    gemini_text,
    openai_embeddings,
    openai_error,
    openai_text_stream,
    sse_data,
)
from tests.servers import Reply, ScriptedServer
from tests.test_fork_threads import run_in_child

USER = [{"role": "user", "content": "Hi"}]
TENANT_A = "sk-tenant-a-0123456789abcdef0123456789abcdef"
TENANT_B = "sk-tenant-b-fedcba9876543210fedcba9876543210"
#: A tenant's key: never configured, never registered as a secret; it must still never show.
TENANT_CANARY = "sk-tenant-canary-5e1f0c3b9a7d4e2f8c6b1a0d9e8f7a6b"

CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"
GEMINI = "/v1beta/models/gemini-2.5-flash:generateContent"
GEMINI_STREAM = "/v1beta/models/gemini-2.5-flash:streamGenerateContent"
GEMINI_EMBED = "/v1beta/models/gemini-embedding-001:batchEmbedContents"


def settings(upstream: ScriptedServer, *, platform_keys: bool = True) -> dict[str, Any]:
    keys = (
        {"OPENAI_API_KEY": CANARY_KEY, "GEMINI_API_KEY": CANARY_GEMINI_KEY, "ANTHROPIC_API_KEY": CANARY_KEY}
        if platform_keys
        else {}
    )
    return {
        **keys,
        "OPENAI_BASE_URL": upstream.url_for("/v1"),
        "GENAI_BASE_URL": upstream.url_for("/"),
        "GENAI_API_VERSION": "v1beta",
        "ANTHROPIC_BASE_URL": upstream.base_url,
        "OPENAI_PROFILES": {
            "azure": {
                "azure_endpoint": upstream.base_url,
                "api_version": "2024-10-21",
                "api_key": "azure-platform-key-0123456789",
            }
        },
    }


@pytest.fixture
def app(make_app: Callable[..., Flask], upstream: ScriptedServer) -> Flask:
    return make_app(settings(upstream))


def key_of(request: Any, provider: str) -> str | None:
    """The key a request carried, in its provider's header (this anthropic SDK sends a bearer too)."""
    headers = request.headers
    if provider == "gemini":
        return headers.get("x-goog-api-key")
    if provider == "azure":
        return headers.get("api-key")
    auth = headers.get("authorization", "")
    return auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else None


# --- on the wire: one pool, the keys in order ------------------------------------------------------

CASES = {
    "openai": ("openai/gpt-4o-mini", CHAT, lambda: chat_completion("hi"), CANARY_KEY),
    "azure": (
        "azure/prod-gpt-4o",
        "/openai/deployments/prod-gpt-4o/chat/completions",
        lambda: chat_completion("hi"),
        "azure-platform-key-0123456789",
    ),
    "anthropic": ("anthropic/claude-sonnet-4-6", MESSAGES, lambda: anthropic_message(), CANARY_KEY),
    "gemini": ("gemini/gemini-2.5-flash", GEMINI, lambda: gemini_reply(gemini_text("hi")), CANARY_GEMINI_KEY),
}


@pytest.mark.parametrize("provider", CASES)
def test_two_tenants_keys_arrive_in_order_over_one_reused_connection(app, upstream, provider):
    model, path, body, platform = CASES[provider]
    upstream.script(path, *(body() for _ in range(5)))
    with app.app_context():
        llm = get_llm()
        for key in (TENANT_A, TENANT_B, None, TENANT_A, TENANT_B):
            llm.chat(USER, model=model, api_key=key)
    requests = upstream.requests
    assert [r.path for r in requests] == [path] * 5
    assert [key_of(r, provider) for r in requests] == [TENANT_A, TENANT_B, platform, TENANT_A, TENANT_B]
    assert len({r.port for r in requests}) == 1, "every key went over the profile's one connection"
    assert upstream.accepted == 1


@pytest.mark.parametrize("provider", CASES)
def test_async_calls_share_the_loops_pool_too(app, upstream, provider):
    model, path, body, platform = CASES[provider]
    upstream.script(path, *(body() for _ in range(3)))

    async def calls() -> None:
        llm = get_llm()
        for key in (TENANT_A, TENANT_B, None):
            await llm.achat(USER, model=model, api_key=key)

    with app.app_context():
        asyncio.run(calls())
    requests = upstream.requests
    assert [key_of(r, provider) for r in requests] == [TENANT_A, TENANT_B, platform]
    assert len({r.port for r in requests}) == 1


def test_streams_and_embeddings_send_the_callers_key(app, upstream):
    upstream.script(CHAT, Reply.stream([openai_text_stream("Hel", "lo")]))
    upstream.script("/v1/embeddings", openai_embeddings([0.1, 0.2]))
    upstream.script(
        GEMINI_STREAM, Reply.stream([f"data: {json.dumps(gemini_reply(gemini_text('hi')))}\r\n\r\n"])
    )
    upstream.script(GEMINI_EMBED, gemini_embeddings([0.3, 0.4]))
    with app.app_context():
        llm = get_llm()
        with llm.chat_stream(USER, model="openai/gpt-4o-mini", api_key=TENANT_A) as stream:
            assert "".join(stream) == "Hello"
        assert llm.embed(["a"], model="openai/text-embedding-3-small", api_key=TENANT_B) == [[0.1, 0.2]]

        async def gemini() -> tuple[str, list[list[float]]]:
            stream = llm.achat_stream(USER, model="gemini/gemini-2.5-flash", api_key=TENANT_B)
            text = "".join([delta async for delta in stream])
            return text, await llm.aembed(["a"], model="gemini/gemini-embedding-001", api_key=TENANT_A)

        assert asyncio.run(gemini()) == ("hi", [[0.3, 0.4]])
    got = [(r.path, key_of(r, "gemini" if "models/" in r.path else "openai")) for r in upstream.requests]
    assert got == [
        (CHAT, TENANT_A),
        ("/v1/embeddings", TENANT_B),
        (GEMINI_STREAM, TENANT_B),
        (GEMINI_EMBED, TENANT_A),
    ]


def test_a_profile_without_a_key_of_its_own_serves_per_call_keys_only(make_app, upstream):
    app = make_app(settings(upstream, platform_keys=False))
    upstream.script(CHAT, chat_completion("hi"))
    upstream.script(MESSAGES, anthropic_message())
    upstream.script(GEMINI, gemini_reply(gemini_text("hi")))
    with app.app_context():
        llm = get_llm()
        assert llm.chat(USER, model="openai/gpt-4o-mini", api_key=TENANT_A).content == "hi"
        assert llm.chat(USER, model="anthropic/claude-sonnet-4-6", api_key=TENANT_B).content == "Hello!"
        assert llm.chat(USER, model="gemini/gemini-2.5-flash", api_key=TENANT_A).content == "hi"
        for model, setting in [
            ("openai/gpt-4o-mini", "OPENAI_API_KEY"),
            ("anthropic/claude-sonnet-4-6", "ANTHROPIC_API_KEY"),
            ("gemini/gemini-2.5-flash", "GEMINI_API_KEY"),
        ]:
            with pytest.raises(LLMNotConfiguredError) as caught:  # without a key: no platform key to use
                llm.chat(USER, model=model)
            assert caught.value.setting == setting
    assert [
        key_of(r, p) for r, p in zip(upstream.requests, ["openai", "anthropic", "gemini"], strict=True)
    ] == [
        TENANT_A,
        TENANT_B,
        TENANT_A,
    ]
    assert len(upstream.requests) == 3


# --- refused before any request ------------------------------------------------------------------


def _every_call(llm: Any, key: Any) -> list[Callable[[], Any]]:
    def stream() -> None:
        with llm.chat_stream(USER, model="openai/gpt-4o-mini", api_key=key) as opened:
            list(opened)

    async def astream() -> None:
        async with llm.achat_stream(USER, model="openai/gpt-4o-mini", api_key=key) as opened:
            [delta async for delta in opened]

    def tool(city: str) -> str:
        return city

    return [
        lambda: llm.chat(USER, model="openai/gpt-4o-mini", api_key=key),
        lambda: asyncio.run(llm.achat(USER, model="gemini/gemini-2.5-flash", api_key=key)),
        stream,
        lambda: asyncio.run(astream()),
        lambda: llm.embed(["a"], model="openai/text-embedding-3-small", api_key=key),
        lambda: asyncio.run(llm.aembed(["a"], model="gemini/gemini-embedding-001", api_key=key)),
        lambda: llm.run(USER, model="anthropic/claude-sonnet-4-6", tools=[tool], api_key=key),
        lambda: asyncio.run(llm.arun(USER, model="openai/gpt-4o-mini", tools=[tool], api_key=key)),
    ]


@pytest.mark.parametrize(
    "key", ["", "   ", "\t", 123, b"sk-bytes", "sk with space", "sk-line\nbreak", "sk-é-nonascii", "k" * 4097]
)
def test_an_empty_or_malformed_key_is_refused_by_name_before_any_request(app, upstream, key):
    with app.app_context():
        llm = get_llm()
        for call in _every_call(llm, key):
            with pytest.raises(LLMBadRequestError) as caught:
                call()
            error = caught.value
            assert (error.field, error.kind, error.http_status) == ("api_key", "invalid_request", 400)
            assert error.provider is not None
            if isinstance(key, str) and key.strip():
                assert key.strip() not in str(error)
    assert upstream.requests == []


def test_empty_is_never_the_platform_key_even_through_the_api_of_a_hook(app, upstream):
    seen: list[LLMCall] = []

    class Spy(LLMHook):
        def before_call(self, call: LLMCall) -> None:
            seen.append(call)

    with app.app_context():
        get_llm().add_hook(Spy())
        with pytest.raises(LLMBadRequestError):
            get_llm().chat(USER, model="openai/gpt-4o-mini", api_key="")
    assert seen == [] and upstream.requests == []


def test_vertex_ai_refuses_a_per_call_key(make_app, upstream):
    app = make_app(
        GOOGLE_GENAI_USE_VERTEXAI=True,
        GOOGLE_CLOUD_PROJECT="p",
        GOOGLE_CLOUD_LOCATION="europe-west4",
        GENAI_BASE_URL=upstream.url_for("/"),
    )
    with app.app_context():
        for call in (
            lambda: get_llm().chat(USER, model="gemini/gemini-2.5-flash", api_key=TENANT_A),
            lambda: get_llm().embed(["a"], model="gemini/gemini-embedding-001", api_key=TENANT_A),
        ):
            with pytest.raises(LLMBadRequestError) as caught:
                call()
            assert caught.value.field == "api_key" and "Vertex AI" in caught.value.message
    assert upstream.requests == []


# --- per-key clients: bounded, sharing the pool, none in a forked child -----------------------------


def test_per_key_clients_are_bounded_and_an_evicted_one_leaves_the_pool_open(app, upstream):
    keys = [f"sk-tenant-{n}-0123456789abcdef" for n in range(5)]
    upstream.script(CHAT, *(chat_completion("hi") for _ in range(len(keys) + 2)))
    with app.app_context():
        llm = get_llm()
        llm.chat(USER, model="openai/gpt-4o-mini")
        adapter = llm.provider("openai")
        cache: PerKeyClients = adapter._per_key
        cache.size = 2
        for key in keys:
            llm.chat(USER, model="openai/gpt-4o-mini", api_key=key)
            assert len(cache) <= 2
        assert len(cache) == 2
        llm.chat(USER, model="openai/gpt-4o-mini")  # the platform's key, after three evictions
    assert [key_of(r, "openai") for r in upstream.requests] == [CANARY_KEY, *keys, CANARY_KEY]
    assert len({r.port for r in upstream.requests}) == 1, "no eviction closed the shared pool"
    assert upstream.closed_ports == set()


def test_a_copy_per_key_is_made_once_and_reused(app, upstream):
    upstream.script(CHAT, *(chat_completion("hi") for _ in range(3)))
    with app.app_context():
        llm = get_llm()
        llm.chat(USER, model="openai/gpt-4o-mini", api_key=TENANT_A)
        cache: PerKeyClients = llm.provider("openai")._per_key
        (copies,) = cache._by_base.values()
        first = copies[key_id(_secret(TENANT_A))]
        llm.chat(USER, model="openai/gpt-4o-mini", api_key=TENANT_A)
        llm.chat(USER, model="openai/gpt-4o-mini", api_key=TENANT_B)
        assert copies[key_id(_secret(TENANT_A))] is first
        assert list(copies) == [key_id(_secret(TENANT_A)), key_id(_secret(TENANT_B))]
        assert all(TENANT_A not in name and TENANT_B not in name for name in copies)


def _secret(value: str) -> Any:
    from app.redaction import Secret

    return Secret(value)


def test_a_forked_child_starts_with_no_per_key_clients(app, upstream):
    upstream.script(CHAT, *(chat_completion("hi") for _ in range(3)))
    with app.app_context():
        llm = get_llm()
        llm.chat(USER, model="openai/gpt-4o-mini", api_key=TENANT_A)
        cache: PerKeyClients = llm.provider("openai")._per_key
        assert len(cache) == 1

        def child() -> dict[str, Any]:
            with app.app_context():
                before = len(cache)
                llm.chat(USER, model="openai/gpt-4o-mini", api_key=TENANT_A)
                return {"before": before, "after": len(cache)}

        assert run_in_child(child) == {"before": 0, "after": 1}
        llm.chat(USER, model="openai/gpt-4o-mini", api_key=TENANT_A)
    first, in_child, again = upstream.requests
    assert [key_of(r, "openai") for r in (first, in_child, again)] == [TENANT_A] * 3
    assert again.port == first.port and in_child.port != first.port


# --- a canary tenant key: 0 times in all output ---------------------------------------------------


class Recorder(logging.Handler):
    """Every record of every logger, formatted with its traceback, as a handler would write it."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(
            logging.Formatter("%(name)s %(levelname)s %(message)s %(llm_call)s", defaults={"llm_call": ""})
        )
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


class SeeEverything(LLMHook):
    def __init__(self) -> None:
        self.texts: list[str] = []

    def _see(self, call: LLMCall, *more: Any) -> None:
        self.texts += [
            repr(call),
            repr(call.request),
            str(vars(call.request) if hasattr(call.request, "__dict__") else ""),
        ]
        self.texts += [request_key(call.request, tenant=call.tenant), repr(call.metadata), repr(more)]

    def before_call(self, call: LLMCall) -> None:
        self._see(call)

    def after_call(self, call: LLMCall, response: Any) -> None:
        self._see(call, response)

    def on_error(self, call: LLMCall, error: LLMError) -> None:
        self._see(call, error)


def _echoing_upstream(upstream: ScriptedServer) -> None:
    """Every provider answers with the tenant's key in its error bodies, its headers and a stream."""
    echo = {"X-Echo": TENANT_CANARY}
    upstream.script(
        CHAT,
        Reply(
            401,
            openai_error(
                f"Incorrect API key provided: {TENANT_CANARY}", "invalid_request_error", "invalid_api_key"
            ),
            headers=echo,
        ),
        Reply.stream(
            [sse_data({"error": {"message": f"boom {TENANT_CANARY}", "type": "server_error"}})], **echo
        ),
        Reply(body=f'{{"id": "{TENANT_CANARY}", "choices": "broken"}}', headers=echo),
        chat_completion(f"fine (you sent {TENANT_CANARY[:6]}...)"),
    )
    upstream.script(MESSAGES, Reply(401, anthropic_error("authentication_error", f"bad key {TENANT_CANARY}")))
    reason = {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"}
    upstream.script(
        GEMINI,
        Reply(400, gemini_error(400, "INVALID_ARGUMENT", f"API key not valid: {TENANT_CANARY}", reason)),
    )


def test_a_canary_tenant_key_appears_nowhere(make_app, upstream, tmp_path, caplog):
    from app.testing.cassettes import Cassette, CassetteProvider

    app = make_app(settings(upstream), LLM_CALL_LOG=True)
    _echoing_upstream(upstream)
    recorder = Recorder()
    root = logging.getLogger()
    root.addHandler(recorder)
    old_level = root.level
    root.setLevel(logging.DEBUG)
    spy = SeeEverything()
    errors: list[BaseException] = []
    cassette = Cassette(tmp_path / "byok.json", record=True)
    try:
        with app.app_context():
            llm = get_llm()
            llm.add_hook(spy)
            llm.register_provider(
                "openai", CassetteProvider("openai", lambda: llm.builtin_adapter("openai"), cassette)
            )

            def stream() -> None:
                with llm.chat_stream(USER, model="openai/gpt-4o-mini", api_key=TENANT_CANARY) as opened:
                    list(opened)

            for call in (
                lambda: llm.chat(USER, model="openai/gpt-4o-mini", api_key=TENANT_CANARY),
                stream,
                lambda: llm.chat(USER, model="openai/gpt-4o-mini", api_key=TENANT_CANARY),
                lambda: llm.chat(USER, model="anthropic/claude-sonnet-4-6", api_key=TENANT_CANARY),
                lambda: asyncio.run(llm.achat(USER, model="gemini/gemini-2.5-flash", api_key=TENANT_CANARY)),
            ):
                with pytest.raises(LLMError) as caught:
                    call()
                errors.append(caught.value)
            answer = llm.chat(USER, model="openai/gpt-4o-mini", api_key=TENANT_CANARY)  # recorded
            cassette.save()
    finally:
        root.removeHandler(recorder)
        root.setLevel(old_level)

    # The key went out, and the upstream echoed it back in every error.
    assert [key_of(r, "openai") for r in upstream.requests if r.path != GEMINI] == [TENANT_CANARY] * 5
    assert [key_of(r, "gemini") for r in upstream.requests if r.path == GEMINI] == [TENANT_CANARY]
    assert all(TENANT_CANARY in json.dumps(r.headers) for r in upstream.requests if r.path == CHAT)
    assert isinstance(errors[0], LLMAuthError) and isinstance(errors[3], LLMAuthError)
    texts = [*recorder.lines, *caplog.messages, *spy.texts, (tmp_path / "byok.json").read_text()]
    for error in errors:
        texts += ["".join(traceback.format_exception(error)), str(error), repr(error), repr(vars(error))]
        cause = error.__cause__
        while cause is not None:
            texts += [str(cause), repr(cause), repr(getattr(cause, "__dict__", ""))]
            cause = cause.__cause__ or cause.__context__
    texts += [repr(answer), repr(answer.attempts)]
    assert any("app.llm.calls" in line for line in recorder.lines), "the call log ran"
    assert any(line.startswith("openai") or "httpcore" in line for line in recorder.lines), "DEBUG logs ran"
    leaked = [text for text in texts if TENANT_CANARY in text]
    assert leaked == [], f"the tenant's key showed in {len(leaked)} output(s): {leaked[0][:300]}"
    # ... while the cassette and the cache keys still tell two keys apart, by their hash.
    recorded = json.loads((tmp_path / "byok.json").read_text())["entries"]
    assert recorded[0]["request"]["api_key"] == key_id(_secret(TENANT_CANARY))


def test_a_provider_that_does_not_send_per_call_keys_refuses_them(app, upstream):
    from app.llm.testing import FakeProvider

    class Legacy(FakeProvider):
        """An adapter written before per-call keys: it would send its own credentials."""

        takes_api_key = False

    legacy = Legacy("legacy")
    legacy.add_response("from its own key")
    with app.app_context():
        get_llm().register_provider("legacy", legacy)
        with pytest.raises(LLMBadRequestError) as caught:
            get_llm().chat(USER, model="legacy/m", api_key=TENANT_A)
        assert caught.value.field == "api_key" and "'legacy'" in caught.value.message
        with pytest.raises(LLMBadRequestError):
            get_llm().embed(["a"], model="legacy/m", api_key=TENANT_A)
        assert get_llm().chat(USER, model="legacy/m").content == "from its own key"
    assert legacy.pending == 0


def test_the_test_kits_fake_records_a_calls_own_key(app, upstream):
    from app.llm.testing import install_fake_llm

    fake = install_fake_llm(app)
    fake.add_response("hi")
    with app.app_context():
        assert get_llm().chat(USER, model="fake/m", api_key=TENANT_A).content == "hi"
    assert fake.last_request.api_key == _secret(TENANT_A)
    assert TENANT_A not in repr(fake.last_request)


def test_a_callers_key_never_reaches_a_fallback_of_another_provider(app, upstream):
    from app.llm import LLMRateLimitError

    busy = Reply(429, openai_error("Rate limit reached", "rate_limit_exceeded", None))
    upstream.script(CHAT, busy, busy, chat_completion("from the same provider"))
    with app.app_context():
        llm = get_llm()
        with pytest.raises(LLMRateLimitError) as caught:  # the tenant's own quota: not Gemini's turn
            llm.chat(USER, model="openai/gpt-4o", api_key=TENANT_A, fallbacks=["gemini/gemini-2.5-flash"])
        attempts = [(a.model, a.outcome) for a in caught.value.attempts]  # type: ignore[attr-defined]
        assert attempts == [
            ("openai/gpt-4o", "LLMRateLimitError"),
            ("gemini/gemini-2.5-flash", "LLMBadRequestError"),
        ]
        r = llm.chat(USER, model="openai/gpt-4o", api_key=TENANT_B, fallbacks=["openai/gpt-4o-mini"])
    assert r.content == "from the same provider" and r.model == "gpt-4o-mini"
    assert [key_of(req, "openai") for req in upstream.requests] == [TENANT_A, TENANT_B, TENANT_B]
    assert all(req.path == CHAT for req in upstream.requests), "nothing reached Gemini"


# --- breakers: a tenant's quota is not the provider's health ----------------------------------------


@pytest.mark.parametrize("kind", ["chat", "achat", "stream"])
def test_a_tenants_own_429s_do_not_open_the_breaker_every_tenant_shares(make_app, upstream, kind):
    from app.llm import LLMCircuitOpenError, LLMRateLimitError

    # Two calls in the window are enough to judge; no retries, so each call is one 429.
    app = make_app({**settings(upstream), "LLM_BREAKER_MIN_CALLS": 2, "LLM_MAX_RETRIES": 0})
    busy = Reply(429, openai_error("You exceeded your current quota", "insufficient_quota", None))
    answer: Any = chat_completion("platform answer")
    if kind == "stream":
        answer = Reply.stream([openai_text_stream("platform ", "answer")])
    upstream.script(CHAT, busy, busy, busy, busy, answer, busy)

    def call(key: str | None) -> str:
        llm = get_llm()
        if kind == "stream":
            with llm.chat_stream(USER, model="openai/gpt-4o", api_key=key) as deltas:
                return "".join(deltas)
        if kind == "achat":
            return asyncio.run(llm.achat(USER, model="openai/gpt-4o", api_key=key)).content or ""
        return llm.chat(USER, model="openai/gpt-4o", api_key=key).content or ""

    with app.app_context():
        for _ in range(4):  # a tenant whose quota is spent, again and again
            with pytest.raises(LLMRateLimitError):
                call(TENANT_A)
        assert call(None) == "platform answer", "the breaker stayed closed for everyone else"
        # The platform's own key running out is the provider failing for everyone: one 429 in
        # two counted calls (the tenant's four count nothing) reaches the 50 % and opens it.
        with pytest.raises(LLMRateLimitError):
            call(None)
        with pytest.raises(LLMCircuitOpenError):
            call(TENANT_B)
    assert [key_of(r, "openai") for r in upstream.requests] == [TENANT_A] * 4 + [CANARY_KEY] * 2
