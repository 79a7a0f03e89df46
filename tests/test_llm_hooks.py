"""Hooks around every logical call, in all six modes, against a real local OpenAI-protocol server."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import Any

import pytest

from app.errors import ConfigError
from app.llm import ChatResponse, LLMBadRequestError, LLMError, LLMRateLimitError, get_llm
from app.llm.hooks import EmbedResponse, LLMCall, LLMHook
from tests.payloads import chat_completion, openai_embeddings, openai_error, openai_text_events
from tests.servers import Reply, ScriptedServer

CHAT = "/v1/chat/completions"
EMBED = "/v1/embeddings"
MESSAGES = [{"role": "user", "content": "Hi"}]
CANARY_PROMPT = "canary-prompt-5e1d7c0a-do-not-log"


class CountingHook(LLMHook):
    """Counts each method and keeps what it was given."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.calls: list[LLMCall] = []
        self.responses: list[Any] = []
        self.errors: list[LLMError] = []
        self.partials: list[ChatResponse] = []

    def before_call(self, call: LLMCall) -> None:
        self.counts["before"] += 1
        self.calls.append(call)

    def after_call(self, call: LLMCall, response: ChatResponse | EmbedResponse) -> None:
        self.counts["after"] += 1
        self.responses.append(response)

    def on_error(self, call: LLMCall, error: LLMError) -> None:
        self.counts["error"] += 1
        self.errors.append(error)

    def on_cancel(self, call: LLMCall, partial: ChatResponse) -> None:
        self.counts["cancel"] += 1
        self.partials.append(partial)


class Answering(LLMHook):
    """Answers every call itself (as a cache hit would)."""

    def before_call(self, call: LLMCall) -> ChatResponse | EmbedResponse:
        if call.kind == "embed":
            return EmbedResponse([[1.0, 2.0]], call.provider, call.model)
        return ChatResponse("from the hook", call.model, call.provider, input_tokens=1, output_tokens=3)


class Refusing(LLMHook):
    def before_call(self, call: LLMCall) -> None:
        raise LLMRateLimitError("over budget", retry_after=7, provider=call.provider, model=call.model)


class Broken(LLMHook):
    def before_call(self, call: LLMCall) -> None:
        raise RuntimeError("hook bug")

    def after_call(self, call: LLMCall, response: Any) -> None:
        raise RuntimeError("hook bug")

    def on_error(self, call: LLMCall, error: LLMError) -> None:
        raise RuntimeError("hook bug")

    def on_cancel(self, call: LLMCall, partial: ChatResponse) -> None:
        raise RuntimeError("hook bug")


#: An instance for LLM_HOOKS to load by path.
counting_for_settings = CountingHook()


@pytest.fixture
def app(make_app, upstream: ScriptedServer):
    return make_app(OPENAI_API_KEY="sk-test", OPENAI_BASE_URL=upstream.url_for("/v1"))


@pytest.fixture
def hook(app) -> CountingHook:
    hook = CountingHook()
    with app.app_context():
        get_llm().add_hook(hook)
    return hook


def _script_answer(upstream: ScriptedServer, mode: str) -> None:
    if mode in {"embed", "aembed"}:
        upstream.script(EMBED, openai_embeddings([0.1, 0.2]))
    elif mode in {"stream", "astream"}:
        upstream.script(CHAT, Reply.stream(openai_text_events("Hel", "lo")))
    else:
        upstream.script(CHAT, chat_completion("Hello"))


def _run(mode: str, **kwargs: Any) -> Any:
    """One call in ``mode``; returns what the caller got (text for streams)."""
    llm = get_llm()
    model = kwargs.pop("model", "openai/gpt-4o-mini")
    if mode == "chat":
        return llm.chat(MESSAGES, model, **kwargs).content
    if mode == "achat":
        return asyncio.run(llm.achat(MESSAGES, model, **kwargs)).content
    if mode == "stream":
        with llm.chat_stream(MESSAGES, model, **kwargs) as stream:
            return "".join(stream)
    if mode == "astream":

        async def read() -> str:
            async with llm.achat_stream(MESSAGES, model, **kwargs) as stream:
                return "".join([text async for text in stream])

        return asyncio.run(read())
    if mode == "embed":
        return llm.embed(["a"], "openai/text-embedding-3-small", **kwargs)
    return asyncio.run(llm.aembed(["a"], "openai/text-embedding-3-small", **kwargs))


MODES = ["chat", "achat", "stream", "astream", "embed", "aembed"]


@pytest.mark.parametrize("mode", MODES)
def test_one_before_and_one_after_per_call_in_every_mode(app, upstream, hook, mode):
    _script_answer(upstream, mode)
    with app.app_context():
        _run(mode, user="u1", tenant="acme")
    assert hook.counts == {"before": 1, "after": 1}
    call = hook.calls[0]
    assert (call.user, call.tenant, call.is_async) == ("u1", "acme", mode.startswith("a"))
    assert call.kind == {"achat": "chat", "astream": "stream", "aembed": "embed"}.get(mode, mode)
    assert len(call.id) == 32 and call.attempts and call.attempts[-1].outcome == "ok"
    assert (call.first_delta_at is not None) == (mode in {"stream", "astream"})
    assert len(upstream.requests) == 1


@pytest.mark.parametrize("mode", ["chat", "achat", "stream", "astream"])
def test_a_call_through_a_fallback_is_one_call_to_the_hooks(app, upstream, hook, mode):
    upstream.script(CHAT, Reply(500, openai_error("down", "server_error", None)))
    _script_answer(upstream, mode)
    with app.app_context():
        assert _run(mode, fallbacks=["openai/gpt-4o"]) == "Hello"
    assert hook.counts == {"before": 1, "after": 1}
    call = hook.calls[0]
    assert call.model == "gpt-4o"  # the model that answered
    assert [a.outcome for a in call.attempts] == ["LLMServerError", "ok"]
    assert [r.json["model"] for r in upstream.requests] == ["gpt-4o-mini", "gpt-4o"]


@pytest.mark.parametrize("mode", MODES)
def test_a_failed_call_is_one_on_error(app, upstream, hook, mode):
    path = EMBED if "embed" in mode else CHAT
    upstream.script(path, Reply(400, openai_error("bad", "invalid_request_error", None)))
    with app.app_context(), pytest.raises(LLMBadRequestError):
        _run(mode)
    assert hook.counts == {"before": 1, "error": 1}
    assert isinstance(hook.errors[0], LLMBadRequestError)


def test_a_sync_stream_closed_after_its_first_delta_is_one_on_cancel(app, upstream, hook):
    upstream.script(CHAT, Reply.stream([*openai_text_events("one ", "two ", "three")[:2], 5.0]))
    with app.app_context():
        stream = get_llm().chat_stream(MESSAGES, "openai/gpt-4o-mini")
        assert next(stream) == "one "
        stream.close()
        stream.close()  # twice is harmless
    assert hook.counts == {"before": 1, "cancel": 1}
    assert hook.partials[0].content == "one "
    request = upstream.only_request()
    assert request.finished.wait(2) and request.outcome == "client_closed"


def test_an_async_stream_closed_after_its_first_delta_is_one_on_cancel(app, upstream, hook):
    upstream.script(CHAT, Reply.stream([*openai_text_events("one ", "two ")[:2], 5.0]))

    async def read_one() -> str:
        stream = get_llm().achat_stream(MESSAGES, "openai/gpt-4o-mini")
        first = await anext(stream)
        await stream.aclose()
        return first

    with app.app_context():
        assert asyncio.run(read_one()) == "one "
    assert hook.counts == {"before": 1, "cancel": 1}
    assert hook.partials[0].content == "one "
    request = upstream.only_request()
    assert request.finished.wait(2) and request.outcome == "client_closed"


@pytest.mark.parametrize("mode", MODES)
def test_a_hook_that_answers_makes_no_request(app, upstream, hook, mode):
    with app.app_context():
        get_llm().add_hook(Answering())
        answer = _run(mode)
    assert answer == ([[1.0, 2.0]] if "embed" in mode else "from the hook")
    assert upstream.requests == []
    assert hook.counts == {"before": 1, "after": 1}  # hooks before the answering one run; all see the end


@pytest.mark.parametrize("mode", ["stream", "astream"])
def test_a_hook_answer_is_replayed_as_a_stream_with_its_response(app, upstream, mode):
    with app.app_context():
        llm = get_llm()
        llm.add_hook(Answering())
        if mode == "stream":
            stream = llm.chat_stream(MESSAGES, "openai/gpt-4o-mini")
            assert list(stream) == ["from the hook"]
            response = stream.response
        else:

            async def read() -> ChatResponse:
                stream = llm.achat_stream(MESSAGES, "openai/gpt-4o-mini")
                assert [text async for text in stream] == ["from the hook"]
                return stream.response

            response = asyncio.run(read())
    assert (response.content, response.output_tokens) == ("from the hook", 3)
    assert upstream.requests == []


@pytest.mark.parametrize("mode", MODES)
def test_a_hook_may_refuse_a_call(app, upstream, hook, mode):
    with app.app_context():
        get_llm().add_hook(Refusing())
        with pytest.raises(LLMRateLimitError) as caught:
            _run(mode)
    assert caught.value.retry_after == 7
    assert upstream.requests == []
    assert hook.counts == {"before": 1, "error": 1}


@pytest.mark.parametrize("mode", MODES)
def test_a_hook_that_raises_does_not_fail_the_call(app, upstream, hook, mode, caplog):
    _script_answer(upstream, mode)
    with app.app_context(), caplog.at_level(logging.ERROR, "app.llm.hooks"):
        get_llm().add_hook(Broken())
        assert _run(mode)
    assert hook.counts == {"before": 1, "after": 1}
    assert [r.getMessage().split(";")[0] for r in caplog.records] == [
        "LLM hook Broken.before_call raised RuntimeError"  # once a minute per hook: after_call is quiet
    ]


def test_a_broken_hook_is_logged_once_per_interval(app, upstream):
    broken = Broken()
    with app.app_context():
        llm = get_llm()
        llm.add_hook(broken)
        llm.hooks.warn_interval = 0.0
        llm.chat(MESSAGES, "openai/gpt-4o-mini")
        llm.hooks.warn_interval = 3600.0
        llm.chat(MESSAGES, "openai/gpt-4o-mini")
    assert len(upstream.requests) == 2


def test_the_call_log_has_one_record_per_call_and_no_content(app, upstream, caplog):
    upstream.script(CHAT, chat_completion("Hello"), Reply(429, openai_error("slow", "rate_limit", None)))
    messages = [{"role": "user", "content": CANARY_PROMPT}]
    with app.app_context(), caplog.at_level(logging.INFO, "app.llm.calls"):
        llm = get_llm()
        llm.chat(messages, "openai/gpt-4o-mini", user="alice", tenant="acme")
        with pytest.raises(LLMRateLimitError):
            llm.chat(messages, "openai/gpt-4o-mini", user="alice", tenant="acme")
    records = [r for r in caplog.records if r.name == "app.llm.calls"]
    assert len(records) == 2
    ok, failed = (r.llm_call for r in records)  # type: ignore[attr-defined]
    assert set(ok) >= {
        "call_id", "provider", "model", "user", "tenant", "outcome", "latency_ms",
        "first_delta_ms", "input_tokens", "output_tokens", "attempts",
    }  # fmt: skip
    assert (ok["provider"], ok["model"], ok["user"], ok["tenant"], ok["outcome"]) == (
        "openai", "gpt-4o-mini", "alice", "acme", "ok",
    )  # fmt: skip
    assert ok["input_tokens"] is not None and ok["attempts"] == 1
    assert failed["outcome"] == "LLMRateLimitError"
    for record in records:
        assert CANARY_PROMPT not in record.getMessage()
        assert CANARY_PROMPT not in repr(record.__dict__)
        assert "sk-test" not in repr(record.__dict__)


def test_the_call_log_can_be_turned_off(make_app, upstream, caplog):
    app = make_app(OPENAI_API_KEY="sk-test", OPENAI_BASE_URL=upstream.url_for("/v1"), LLM_CALL_LOG=False)
    with app.app_context(), caplog.at_level(logging.INFO, "app.llm.calls"):
        get_llm().chat(MESSAGES, "openai/gpt-4o-mini")
    assert [r for r in caplog.records if r.name == "app.llm.calls"] == []


def test_llm_hooks_loads_hooks_by_path(make_app, upstream):
    app = make_app(
        OPENAI_API_KEY="sk-test",
        OPENAI_BASE_URL=upstream.url_for("/v1"),
        LLM_HOOKS="tests.test_llm_hooks:counting_for_settings, tests.test_llm_hooks:CountingHook",
    )
    before = counting_for_settings.counts["before"]
    with app.app_context():
        llm = get_llm()
        llm.chat(MESSAGES, "openai/gpt-4o-mini")
        made = [h for h in llm.hooks.hooks if isinstance(h, CountingHook) and h is not counting_for_settings]
    assert counting_for_settings.counts["before"] == before + 1
    assert made[0].counts == {"before": 1, "after": 1}


@pytest.mark.parametrize(
    "value",
    [
        "tests.test_llm_hooks",
        "no.such.module:hook",
        "tests.test_llm_hooks:missing",
        "tests.test_llm_hooks:MODES",
    ],
)
def test_a_bad_llm_hooks_entry_stops_start_up_naming_the_setting(make_app, value):
    with pytest.raises(ConfigError, match="LLM_HOOKS"):
        make_app(LLM_HOOKS=[value])


def test_the_readme_hook_example_runs_as_written(app, upstream):
    """The README's hooks example, executed with a user's settings against a local server."""
    from tests.readme import python_blocks

    (example,) = python_blocks("Hooks: one extension point around every call")
    upstream.script(CHAT, chat_completion("Hello"))
    namespace: dict[str, Any] = {"messages": MESSAGES}
    with app.app_context():
        exec(compile(example, "README.md", "exec"), namespace)
        audit = next(h for h in get_llm().hooks.hooks if type(h).__name__ == "Audit")
    assert namespace["r"].content == "Hello"
    assert isinstance(audit, LLMHook)
    assert upstream.only_request().json["user"] == "alice"
