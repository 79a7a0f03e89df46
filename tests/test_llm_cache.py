"""The LLM response cache against a real local upstream, with each back end (memory, disk, real Redis).

Every assertion on "a request was made" reads what reached the scripted
server (``upstream.requests``), never a counter of the cache itself.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from decimal import Decimal
from typing import Any

import pytest
import redis as redis_lib
from pydantic import BaseModel

from app.errors import ConfigError
from app.llm import LLMBadRequestError, LLMServerError, get_llm
from app.llm.cache import current_cache
from app.llm.cache.redis_store import PREFIX
from tests.conftest import CANARY_KEY
from tests.payloads import (
    chat_completion,
    function_call,
    openai_embeddings,
    openai_error,
    openai_text_events,
)
from tests.servers import Reply, ScriptedServer

CHAT = "/v1/chat/completions"
EMBED = "/v1/embeddings"
MODEL = "openai/gpt-4o-mini"
MESSAGES = [{"role": "user", "content": "Hi"}]
BACKENDS = ["memory", "disk", "redis"]
MODES = ["chat", "achat", "stream", "astream", "embed", "aembed"]


def flushed(url: str) -> str:
    client = redis_lib.Redis.from_url(url)
    client.flushdb()
    client.close()
    return url


@pytest.fixture
def settings_for(upstream: ScriptedServer, request: pytest.FixtureRequest):
    """The app settings of one back end (Redis: the session's redis-server, flushed)."""

    def settings(backend: str, **extra: Any) -> dict[str, Any]:
        values: dict[str, Any] = {
            "OPENAI_API_KEY": CANARY_KEY,
            "OPENAI_BASE_URL": upstream.url_for("/v1"),
            "LLM_CACHE": backend,
        }
        if backend == "redis":
            values["REDIS_URL"] = flushed(request.getfixturevalue("redis_server").url)
        return {**values, **extra}

    return settings


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def app(make_app, settings_for, backend):
    return make_app(settings_for(backend))


def script(upstream: ScriptedServer, mode: str, text: str = "Hello") -> None:
    if "embed" in mode:
        upstream.script(EMBED, openai_embeddings([0.25, -1.5, 3e-8]))
    elif "stream" in mode:
        upstream.script(CHAT, Reply.stream(openai_text_events("Hel", "lo", " there")))
    else:
        upstream.script(CHAT, chat_completion(text, usage=(11, 4)))


def run(mode: str, model: str = MODEL, messages: list[dict[str, Any]] = MESSAGES, **options: Any) -> Any:
    """One call in ``mode``: the response (a stream's final response, with the deltas it yielded)."""
    llm = get_llm()
    if mode == "chat":
        return llm.chat(messages, model, **options)
    if mode == "achat":
        return asyncio.run(llm.achat(messages, model, **options))
    if mode == "stream":
        with llm.chat_stream(messages, model, **options) as stream:
            deltas = list(stream)
        return stream.response, deltas
    if mode == "astream":

        async def read() -> Any:
            stream = llm.achat_stream(messages, model, **options)
            deltas = [text async for text in stream]
            return stream.response, deltas

        return asyncio.run(read())
    if mode == "embed":
        return llm.embed(["a", "b"], "openai/text-embedding-3-small", **options)
    return asyncio.run(llm.aembed(["a", "b"], "openai/text-embedding-3-small", **options))


# --- hits and misses ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_a_second_identical_call_makes_no_request(app, upstream, mode):
    script(upstream, mode)
    with app.app_context():
        first, second = run(mode), run(mode)

    assert len(upstream.requests) == 1
    if "embed" in mode:
        assert first == second == [[0.25, -1.5, 3e-8]]
        return
    if "stream" in mode:
        (first, first_deltas), (second, second_deltas) = first, second
        assert first_deltas == second_deltas == ["Hel", "lo", " there"]  # the same deltas, not one chunk
    assert (first.cached, second.cached) == (False, True)
    assert second.content == first.content
    assert second.usage() == first.usage()  # the original's usage: a ledger bills the hit at zero
    assert (second.finish_reason, second.model, second.provider) == (
        first.finish_reason,
        first.model,
        first.provider,
    )
    assert second.attempts == []  # no provider was asked


def test_a_hit_restores_tool_calls_and_cost(make_app, settings_for, backend, upstream):
    app = make_app(settings_for(backend))
    calls = [function_call("call_1", "get_weather", '{"city": "Paris", "days": [1, 2]}')]
    upstream.script(CHAT, chat_completion(None, tool_calls=calls, finish_reason="tool_calls"))
    tools = [{"name": "get_weather", "description": "w", "parameters": {"type": "object"}}]
    with app.app_context():
        first = run("chat", tools=tools)
        second = run("chat", tools=tools)
    assert len(upstream.requests) == 1
    assert second.cached and second.tool_calls == first.tool_calls
    assert second.tool_calls[0].arguments == {"city": "Paris", "days": [1, 2]}
    assert isinstance(first.cost, Decimal) and second.cost == first.cost


class City(BaseModel):
    name: str
    population: int


@pytest.mark.parametrize("mode", ["chat", "stream"])
def test_a_hit_restores_parsed_as_the_model(make_app, settings_for, backend, upstream, mode):
    app = make_app(settings_for(backend))
    text = '{"name": "Paris", "population": 2100000}'
    if mode == "stream":
        upstream.script(CHAT, Reply.stream(openai_text_events(text[:10], text[10:])))
    else:
        upstream.script(CHAT, chat_completion(text))
    with app.app_context():
        first, second = run(mode, response_format=City), run(mode, response_format=City)
    if mode == "stream":
        first, second = first[0], second[0]
    assert len(upstream.requests) == 1
    assert second.cached and second.parsed == City(name="Paris", population=2100000)
    assert isinstance(second.parsed, City) and second.parsed is not first.parsed


PNG = "image/png"
OPENAI_VARIANTS: list[dict[str, Any]] = [
    {"temperature": 0.5},
    {"temperature": 1},  # the canonical form keeps 1 and 1.0 apart, as JSON does
    {"max_tokens": 50},
    {"top_p": 0.9},
    {"stop": "END"},
    {"stop": ["END", "STOP"]},
    {"seed": 7},
    {"presence_penalty": 0.5},
    {"frequency_penalty": 0.5},
    {"reasoning_effort": "low"},
    {"extra": {"service_tier": "flex"}},
    {"extra": {"service_tier": "default"}},
    {"user": "bob"},
    {"tenant": "acme"},
    {"tenant": "globex"},
    {"tools": [{"name": "f", "parameters": {"type": "object"}}]},
    {"tools": [{"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "string"}}}}]},
    {"tools": [{"name": "f", "parameters": {"type": "object"}}], "tool_choice": "required"},
    {"response_format": {"type": "json_object"}},
    {"messages": [{"role": "system", "content": "Be brief."}, *MESSAGES]},
    {"messages": [{"role": "user", "content": "Hi!"}]},
    {"messages": [{"role": "user", "content": [{"type": "image", "data": b"\x89PNG1", "mime_type": PNG}]}]},
    {"messages": [{"role": "user", "content": [{"type": "image", "data": b"\x89PNG2", "mime_type": PNG}]}]},
    {"model": "openai/gpt-4o"},
]


def test_any_changed_parameter_or_tenant_misses(make_app, settings_for, backend, upstream):
    app = make_app(settings_for(backend))
    upstream.responder = lambda _request: Reply(body=chat_completion('{"a": 1}'))  # JSON mode takes it too
    with app.app_context():
        run("chat")
        for variant in OPENAI_VARIANTS:
            options = dict(variant)
            messages = options.pop("messages", MESSAGES)
            model = options.pop("model", MODEL)
            run("chat", model, messages, **options)
        for variant in OPENAI_VARIANTS:  # each again: now a hit
            options = dict(variant)
            messages = options.pop("messages", MESSAGES)
            model = options.pop("model", MODEL)
            assert run("chat", model, messages, **options).cached, variant
    assert len(upstream.requests) == 1 + len(OPENAI_VARIANTS)


GEMINI_VARIANTS = [
    {"top_k": 40},
    {"top_k": 41},
    {"thinking_budget": 512},
    {"safety": {"HARM_CATEGORY_HARASSMENT": "BLOCK_ONLY_HIGH"}},
]


@pytest.mark.parametrize("options", GEMINI_VARIANTS)
def test_gemini_parameters_change_the_key(make_app, settings_for, upstream, options):
    app = make_app(settings_for("memory", GEMINI_API_KEY="AIza-test", GENAI_BASE_URL=upstream.base_url))
    with app.app_context():
        run("chat", "gemini/gemini-2.5-flash")
        run("chat", "gemini/gemini-2.5-flash", **options)
        assert run("chat", "gemini/gemini-2.5-flash", **options).cached
    assert len(upstream.requests) == 2


def test_a_per_call_key_is_part_of_the_key_and_never_stored(make_app, settings_for, upstream, redis_server):
    app = make_app(settings_for("redis"))
    other_key = "sk-percall-b2f0e4c6a8d1"
    with app.app_context():
        run("chat")
        run("chat", api_key=CANARY_KEY + "-own")
        run("chat", api_key=other_key)
        assert run("chat", api_key=other_key).cached
        assert not run("chat", api_key=CANARY_KEY + "-again").cached
    assert len(upstream.requests) == 4
    dump = _redis_dump(redis_server.url)
    assert CANARY_KEY not in dump and other_key not in dump


def test_the_same_request_to_another_base_url_misses(make_app, settings_for, upstream):
    other = ScriptedServer()
    try:
        profiles = {"a": {"base_url": upstream.url_for("/v1"), "api_key": "k"},
                    "b": {"base_url": other.url_for("/v1"), "api_key": "k"}}  # fmt: skip
        one = make_app(settings_for("memory", OPENAI_PROFILES=profiles))
        two = make_app(settings_for("memory", OPENAI_PROFILES={**profiles, "a": profiles["b"]}))
        with one.app_context():
            run("chat", "a/m")
            assert run("chat", "a/m").cached
        with two.app_context():
            assert not run("chat", "a/m").cached
    finally:
        other.stop()
    assert len(upstream.requests) == 1 and len(other.requests) == 1


def test_a_stream_and_a_call_keep_separate_entries(app, upstream):
    script(upstream, "stream")
    script(upstream, "chat")
    with app.app_context():
        _response, deltas = run("stream")
        assert not run("chat").cached
        assert run("stream")[1] == deltas
    assert len(upstream.requests) == 2


# --- streams ---------------------------------------------------------------------------------------


def test_a_stream_closed_early_is_not_cached(app, upstream):
    upstream.script(CHAT, Reply.stream([*openai_text_events("one ", "two ", "three")[:2], 5.0]))
    script(upstream, "stream")
    with app.app_context():
        stream = get_llm().chat_stream(MESSAGES, MODEL)
        assert next(stream) == "one "
        stream.close()
        response, deltas = run("stream")
        assert not response.cached and deltas == ["Hel", "lo", " there"]
        assert run("stream")[0].cached
    assert len(upstream.requests) == 2


def test_an_async_stream_closed_early_is_not_cached(app, upstream):
    upstream.script(CHAT, Reply.stream([*openai_text_events("one ", "two ")[:2], 5.0]))
    script(upstream, "astream")

    async def read_one() -> str:
        stream = get_llm().achat_stream(MESSAGES, MODEL)
        first = await anext(stream)
        await stream.aclose()
        return first

    with app.app_context():
        assert asyncio.run(read_one()) == "one "
        assert not run("astream")[0].cached
    assert len(upstream.requests) == 2


def test_a_broken_stream_is_not_cached(app, upstream):
    from tests.servers import CLOSE

    upstream.script(CHAT, Reply.stream([*openai_text_events("one ", "two ")[:2], CLOSE]))
    script(upstream, "stream")
    with app.app_context():
        with pytest.raises(Exception), get_llm().chat_stream(MESSAGES, MODEL) as stream:
            list(stream)
        assert not run("stream")[0].cached
    assert len(upstream.requests) == 2


def test_a_cached_stream_replays_the_same_deltas_without_the_upstreams_pauses(app, upstream):
    events = openai_text_events("A", "b", "", "c d")
    paced: list[Any] = []
    for event in events:
        paced += [event, 0.3]
    upstream.script(CHAT, Reply.stream(paced))
    with app.app_context():
        started = time.monotonic()
        first = run("stream")
        first_took = time.monotonic() - started
        started = time.monotonic()
        second = run("stream")
        replay_took = time.monotonic() - started
    assert first[1] == second[1] == ["A", "b", "c d"]
    assert second[0].cached and second[0].content == "Abc d"
    assert first_took > 1.0  # the upstream's pauses
    assert replay_took < 0.3  # none of them, nor any of its own: one pause is 0.3 s


# --- per call and per model --------------------------------------------------------------------


def test_cache_false_neither_reads_nor_stores(app, upstream):
    with app.app_context():
        run("chat")
        assert not run("chat", cache=False).cached
        run("chat", messages=[{"role": "user", "content": "other"}], cache=False)
        assert not run("chat", messages=[{"role": "user", "content": "other"}]).cached
        assert run("chat").cached
    assert len(upstream.requests) == 4


def test_cache_seconds_is_the_entrys_ttl(make_app, settings_for, backend, upstream):
    app = make_app(settings_for(backend))
    with app.app_context():
        run("chat", cache=0.3)
        assert run("chat").cached
        time.sleep(0.5)
        assert not run("chat").cached
    assert len(upstream.requests) == 2


@pytest.mark.parametrize("value", [0, -1, float("nan"), float("inf"), "yes", [1]])
def test_a_bad_cache_option_is_a_400_naming_it(app, upstream, value):
    with app.app_context(), pytest.raises(LLMBadRequestError) as caught:
        run("chat", cache=value)
    assert caught.value.field == "cache" and caught.value.http_status == 400
    assert upstream.requests == []


def test_llm_policy_turns_the_cache_off_or_on_per_provider_and_model(make_app, settings_for, upstream):
    policy = {"openai": {"cache": False}, "openai/gpt-4o": {"cache": 60}}
    app = make_app(settings_for("memory", LLM_POLICY=policy))
    with app.app_context():
        run("chat"), run("chat")  # openai: off
        run("chat", "openai/gpt-4o"), run("chat", "openai/gpt-4o")  # its model: on
        assert run("chat", cache=True).cached is False  # the call's own option first (stored now)
        assert run("chat", cache=True).cached
    assert len(upstream.requests) == 4


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"LLM_CACHE": "sqlite"}, "LLM_CACHE must be one of memory, disk, redis"),
        ({"LLM_CACHE": "redis"}, "LLM_CACHE=redis needs REDIS_URL"),
        ({"LLM_CACHE": "memory", "LLM_CACHE_TTL": 0}, "LLM_CACHE_TTL"),
        ({"LLM_CACHE": "memory", "LLM_CACHE_MAX_BYTES": 10}, "LLM_CACHE_MAX_BYTES"),
        ({"LLM_CACHE": "memory", "LLM_CACHE_WAIT": "soon"}, "LLM_CACHE_WAIT"),
        ({"LLM_POLICY": {"openai": {"cache": "often"}}}, "LLM_POLICY['openai'].cache"),
        ({"LLM_POLICY": {"openai": {"cache": 0}}}, "LLM_POLICY['openai'].cache"),
        ({"LLM_CACHES": "memory"}, "did you mean 'LLM_CACHE'"),
    ],
)
def test_settings_are_checked_at_start(make_app, settings, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        make_app(settings)


def test_unset_means_no_cache(make_app, upstream):
    app = make_app(OPENAI_API_KEY="sk-test", OPENAI_BASE_URL=upstream.url_for("/v1"))
    with app.app_context():
        assert current_cache() is None
        run("chat"), run("chat", cache=True)
    assert len(upstream.requests) == 2


# --- entries ---------------------------------------------------------------------------------------


def _only_name(app) -> str:
    with app.app_context():
        cache = current_cache()
        from app.llm.hooks import LLMCall

        request = get_llm()._request(MESSAGES, MODEL, {})[1]
        return cache.name_of(LLMCall("chat", "openai", "gpt-4o-mini", request))


@pytest.mark.parametrize(
    "entry",
    [
        b"not json",
        b'{"f": 999, "k": "chat"}',
        b'{"f": 1, "k": "stream"}',
        b'{"f": 1, "k": "chat", "u": 3}',
        b"[1, 2]",
        "\ud800".encode("utf-8", "surrogatepass"),
    ],
)
def test_a_corrupt_or_other_format_entry_is_a_miss_and_is_deleted(app, upstream, entry, caplog):
    name = _only_name(app)
    with app.app_context():
        store = current_cache().store
        store.set(name, entry, 60)
        assert store.get(name) == entry
        response = run("chat")
        assert not response.cached and response.content == "hi"
        assert store.get(name) != entry  # deleted, then the answer stored
        assert run("chat").cached
    assert len(upstream.requests) == 1
    assert "could not be used" in caplog.text


def test_a_fallbacks_answer_is_not_stored_under_the_primary(app, upstream):
    upstream.script(CHAT, Reply(500, openai_error("down", "server_error", None)))
    with app.app_context():
        answer = run("chat", fallbacks=["openai/gpt-4o"])
        assert answer.model == "gpt-4o"
        again = run("chat", fallbacks=["openai/gpt-4o"])
        assert not again.cached and again.model == "gpt-4o-mini"
        assert run("chat", fallbacks=["openai/gpt-4o"]).cached
    assert [r.json["model"] for r in upstream.requests] == ["gpt-4o-mini", "gpt-4o", "gpt-4o-mini"]


def test_the_memory_back_end_is_bounded_in_bytes_least_recently_used_first(make_app, settings_for, upstream):
    app = make_app(settings_for("memory", LLM_CACHE_MAX_BYTES=2048))
    with app.app_context():
        for n in range(30):  # about 150 bytes each
            run("chat", messages=[{"role": "user", "content": f"question {n}"}])
        entries, size = current_cache().store.size()
        assert size <= 2048 and 0 < entries < 30
        assert run("chat", messages=[{"role": "user", "content": "question 29"}]).cached
        assert not run("chat", messages=[{"role": "user", "content": "question 0"}]).cached


def test_no_secret_reaches_an_entry_a_key_or_a_log(make_app, settings_for, upstream, redis_server, caplog):
    app = make_app(settings_for("redis"))
    caplog.set_level("DEBUG")
    with app.app_context():
        run("chat"), run("chat")
        script(upstream, "embed"), script(upstream, "stream")
        run("embed"), run("stream")
    dump = _redis_dump(redis_server.url)
    assert PREFIX.encode() in dump.encode("latin-1", "replace") or PREFIX in dump
    assert CANARY_KEY not in dump and CANARY_KEY not in caplog.text


def _redis_dump(url: str) -> str:
    client = redis_lib.Redis.from_url(url)
    try:
        parts = []
        for name in client.scan_iter():
            kind = client.type(name)
            value = (
                client.get(name)
                if kind == b"string"
                else json.dumps({k.decode(): v.decode() for k, v in client.hgetall(name).items()}).encode()
            )
            parts.append(name + b"=" + (value or b""))
        return b"\n".join(parts).decode("utf-8", "replace")
    finally:
        client.close()


# --- single flight -----------------------------------------------------------------------------------


def _concurrently(app, count: int, call: Any) -> list[Any]:
    results: list[Any] = [None] * count
    start = threading.Barrier(count)

    def worker(index: int) -> None:
        with app.app_context():
            start.wait()
            try:
                results[index] = call()
            except Exception as exc:
                results[index] = exc

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return results


@pytest.mark.parametrize("mode", ["chat", "stream", "embed"])
def test_20_concurrent_identical_calls_make_one_request(make_app, settings_for, backend, upstream, mode):
    app = make_app(settings_for(backend))
    if mode == "embed":
        upstream.script(EMBED, Reply(body=openai_embeddings([1.0, 2.0]), delay=0.3))
    elif mode == "stream":
        upstream.script(CHAT, Reply.stream([0.3, *openai_text_events("Hel", "lo")]))
    else:
        upstream.script(CHAT, Reply(body=chat_completion("Hello"), delay=0.3))

    results = _concurrently(app, 20, lambda: run(mode))

    assert len(upstream.requests) == 1
    assert not [r for r in results if isinstance(r, Exception)], results
    if mode == "chat":
        assert {r.content for r in results} == {"Hello"}
        assert sorted(r.cached for r in results) == [False] + [True] * 19
    elif mode == "stream":
        assert all(deltas == ["Hel", "lo"] for _response, deltas in results)
    else:
        assert all(vectors == [[1.0, 2.0]] for vectors in results)


def test_20_concurrent_async_calls_make_one_request(app, upstream):
    upstream.script(CHAT, Reply(body=chat_completion("Hello"), delay=0.3))

    async def twenty() -> list[Any]:
        llm = get_llm()
        return await asyncio.gather(*(llm.achat(MESSAGES, MODEL) for _ in range(20)))

    with app.app_context():
        results = asyncio.run(twenty())
    assert len(upstream.requests) == 1 and {r.content for r in results} == {"Hello"}


def test_two_apps_on_one_redis_make_one_request(make_app, settings_for, upstream):
    """Two apps stand for two workers: their in-process flights are separate, the Redis lock is shared."""
    settings = settings_for("redis")
    one, two = make_app(settings), make_app(settings)
    upstream.script(CHAT, Reply(body=chat_completion("Hello"), delay=0.4))
    both: list[Any] = []

    def side(app) -> None:
        both.extend(_concurrently(app, 10, lambda: run("chat")))

    threads = [threading.Thread(target=side, args=(app,)) for app in (one, two)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(upstream.requests) == 1
    assert len(both) == 20 and {r.content for r in both} == {"Hello"}


def test_when_the_leader_fails_the_waiters_call_themselves(app, upstream):
    upstream.script(CHAT, Reply(500, openai_error("down", "server_error", None), delay=0.3))
    results = _concurrently(app, 5, lambda: run("chat"))
    failed = [r for r in results if isinstance(r, LLMServerError)]
    assert len(failed) == 1  # the leader's own error; never given to the waiters
    assert {r.content for r in results if not isinstance(r, Exception)} == {"hi"}
    assert len(upstream.requests) == 5


def test_a_waiter_calls_itself_after_the_bounded_wait(make_app, settings_for, backend, upstream):
    app = make_app(settings_for(backend, LLM_CACHE_WAIT=0.2))
    upstream.script(CHAT, Reply(body=chat_completion("slow"), delay=1.5))
    results = _concurrently(app, 3, lambda: run("chat"))
    assert not [r for r in results if isinstance(r, Exception)], results
    assert len(upstream.requests) == 3  # the two waiters gave up on the slow leader after 0.2 s


def test_a_leader_that_never_lands_holds_no_call_back_past_the_wait(make_app, settings_for, upstream):
    """An async leader cancelled mid-call runs no hook: its flight is replaced once LLM_CACHE_WAIT passed."""
    app = make_app(settings_for("memory", LLM_CACHE_WAIT=0.3))
    upstream.script(CHAT, Reply(body=chat_completion("slow"), delay=5.0))

    async def cancelled_leader() -> None:
        task = asyncio.ensure_future(get_llm().achat(MESSAGES, MODEL))
        while not upstream.requests:  # in flight
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with app.app_context():
        asyncio.run(cancelled_leader())
        flights = current_cache().flights
        assert len(flights) == 1  # never landed
        time.sleep(0.3)
        assert run("chat").content == "hi"  # led at once, and landed
        assert len(flights) == 0
        assert run("chat").cached
    assert len(upstream.requests) == 2


# --- Redis down ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_redis_killed_mid_run_every_call_succeeds_as_a_miss_and_hits_resume(
    make_app, upstream, disposable_redis, record_property, caplog
):
    caplog.set_level("WARNING")
    app = make_app(
        OPENAI_API_KEY="sk-test",
        OPENAI_BASE_URL=upstream.url_for("/v1"),
        LLM_CACHE="redis",
        REDIS_URL=disposable_redis.url,
    )
    results: list[tuple[float, bool, bool]] = []  # (started, ok, cached)
    stop = threading.Event()

    def calls() -> None:
        with app.app_context():
            while not stop.is_set():
                started = time.monotonic()
                try:
                    cached = run("chat").cached
                except Exception:
                    results.append((started, False, False))
                else:
                    results.append((started, True, cached))
                time.sleep(0.01)

    caller = threading.Thread(target=calls)
    caller.start()
    try:
        deadline = time.monotonic() + 10
        while not any(cached for _, _, cached in results) and time.monotonic() < deadline:
            time.sleep(0.05)  # until the cache is in use (the first calls build the clients)
        time.sleep(0.2)
        assert disposable_redis.process is not None
        disposable_redis.process.kill()  # SIGKILL: no goodbye to the clients
        disposable_redis.process.wait(timeout=5)
        killed = time.monotonic()
        time.sleep(1.5)
        disposable_redis.start()  # the same port, empty
        restarted = time.monotonic()
        time.sleep(1.5)
    finally:
        stop.set()
        caller.join(timeout=10)

    down = [r for r in results if killed <= r[0] < restarted]
    record_property("calls_while_redis_was_down", len(down))
    assert len(down) >= 20
    assert all(ok for _, ok, _ in results), [r for r in results if not r[1]]
    assert not any(cached for _, _, cached in down)  # every call a miss
    hits_before = [r for r in results if r[0] < killed and r[2]]
    assert hits_before  # the cache was in use before
    first_hit = next(started for started, _, cached in results if started >= restarted and cached)
    record_property("hits_resumed_after_s", round(first_hit - restarted, 3))
    # The gate's probe runs once a second: within 1 s of Redis answering, plus two calls' spacing
    # (the first call after it opens stores, the next one hits).
    assert first_hit - restarted <= 1.1, first_hit - restarted
    warnings = [r.getMessage() for r in caplog.records if "Redis is unavailable" in r.getMessage()]
    assert len(warnings) == 1 and "the LLM response cache" in warnings[0]
    assert not [r for r in caplog.records if r.exc_info]


def test_without_redis_at_start_every_call_is_a_miss_and_none_fails(make_app, upstream, disposable_redis):
    url = disposable_redis.url
    disposable_redis.stop()
    app = make_app(OPENAI_API_KEY="sk-test", OPENAI_BASE_URL=upstream.url_for("/v1"), LLM_CACHE="redis",
                   REDIS_URL=url)  # fmt: skip
    with app.app_context():
        assert [run("chat").cached for _ in range(5)] == [False] * 5
    assert len(upstream.requests) == 5


def test_a_disk_store_that_fails_makes_every_call_a_miss_and_logs_once(make_app, upstream, tmp_path, caplog):
    """Its folder cannot be made (a file stands there: a full or read-only disk fails the same way,
    with an OSError or an SQLite error): every read, write and lock fails, and calls go on uncached."""
    blocked = tmp_path / "llm-cache"
    blocked.write_text("not a folder")
    app = make_app(OPENAI_API_KEY="sk-test", OPENAI_BASE_URL=upstream.url_for("/v1"), LLM_CACHE="disk",
                   LLM_CACHE_DIR=str(blocked))  # fmt: skip
    script(upstream, "chat")
    script(upstream, "chat")
    script(upstream, "chat")
    with app.app_context():
        assert [run("chat").cached for _ in range(3)] == [False] * 3
    assert len(upstream.requests) == 3
    warnings = [r.getMessage() for r in caplog.records if "LLM response cache (disk)" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "failed (" in warnings[0] and "calls go on uncached" in warnings[0]


# --- the README ---------------------------------------------------------------------------------------


def test_the_readme_caching_examples_run_as_written(make_app, upstream, redis_server):
    """The README's "Caching" blocks, run twice with a user's settings (LLM_CACHE=redis) on a local server."""
    from tests.readme import python_blocks

    def answer(request):
        if request.path == EMBED:
            return Reply(body=openai_embeddings([0.1, 0.2], [0.3, 0.4]))
        if (request.json or {}).get("stream"):
            return Reply.stream(openai_text_events("Par", "is"))
        return Reply(body=chat_completion("Paris"))

    upstream.responder = answer
    app = make_app(
        OPENAI_API_KEY="sk-test",
        OPENAI_BASE_URL=upstream.url_for("/v1"),
        LLM_CACHE="redis",
        REDIS_URL=flushed(redis_server.url),
    )
    calls, helpers = python_blocks("Caching")
    with app.app_context():
        first: dict[str, Any] = {}
        exec(compile(calls, "README.md", "exec"), first)
        made = len(upstream.requests)
        second: dict[str, Any] = {}
        exec(compile(calls, "README.md", "exec"), second)
        data: dict[str, Any] = {}
        exec(compile(helpers, "README.md", "exec"), data)
        assert data["totals"](2026) == data["totals"](2026) == {"year": 2026, "calls": 412}
        assert data["get_json"]("settings:acme") == {"theme": "dark"}
    assert made == 6  # acme, globex, cache=False, cache=600, the stream, the embeddings
    assert len(upstream.requests) == made + 1  # the second time: only the cache=False call
    assert first["deltas"] == second["deltas"] == ["Par", "is"]
    assert first["vectors"] == second["vectors"] == [[0.1, 0.2], [0.3, 0.4]]
    client = redis_lib.Redis.from_url(redis_server.url)
    assert client.get("cached:totals:2026") == b'{"year":2026,"calls":412}'
    client.close()
