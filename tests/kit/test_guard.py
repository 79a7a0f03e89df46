"""The real-call guard at the transport of every client the services build, in this process.

Each client is pointed at a name that is not loopback; the call must fail with the guard's
error before any name is resolved or any socket connected (an audit hook watches both).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from app.connectors.outbound import check_request
from app.testing.guard import RealCallBlocked, is_loopback
from app.testing.plugin import GUARD

#: Set in the child pytest that runs the watched cases (see the last test): an audit hook cannot
#: be removed, and in the suite's own process it would run Python code inside every
#: ``sys.settrace``, where CPython 3.11 may switch threads while its process-wide "installing a
#: trace function" flag is set, so that a thread started then under coverage dies ("Cannot install
#: a trace function while another trace function is being installed", python/cpython#98257).
WATCHED = os.environ.get("GUARD_AUDIT") == "1"

_events: list[tuple[str, str]] = []
_watching = threading.Event()


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _watching.is_set() and event in ("socket.connect", "socket.getaddrinfo"):
        _events.append((event, repr(args[1] if event == "socket.connect" else args[0])))


if WATCHED:
    sys.addaudithook(_audit)


@pytest.fixture
def watched() -> Iterator[list[tuple[str, str]]]:
    _events.clear()
    _watching.set()
    yield _events
    _watching.clear()


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return seen


def _openai(asynchronous: bool) -> Callable[[], Any]:
    from app.services.openai_service import get_async_openai_client, get_openai_client

    def call() -> Any:
        if asynchronous:

            async def listed() -> Any:
                return await get_async_openai_client().models.list()

            return asyncio.run(listed())
        return get_openai_client().models.list()

    return call


def _anthropic(asynchronous: bool) -> Callable[[], Any]:
    from app.connectors.anthropic_connector import get_anthropic_client, get_async_anthropic_client

    def call() -> Any:
        if asynchronous:

            async def listed() -> Any:
                return await get_async_anthropic_client().models.list()

            return asyncio.run(listed())
        return get_anthropic_client().models.list()

    return call


def _gemini(asynchronous: bool) -> Callable[[], Any]:
    from app.services.genai_service import get_genai_client

    def call() -> Any:
        client = get_genai_client()
        if asynchronous:
            return asyncio.run(client.aio.models.generate_content(model="gemini-2.5-flash", contents="Hi"))
        return client.models.generate_content(model="gemini-2.5-flash", contents="Hi")

    return call


def _weather(_asynchronous: bool) -> Callable[[], Any]:
    from app.services.weather_service import get_weather_client

    return lambda: get_weather_client().get_json("/forecast")


def _llm_layer(_asynchronous: bool) -> Callable[[], Any]:
    from app.llm import get_llm

    return lambda: get_llm().chat([{"role": "user", "content": "Hi"}], model="openai/gpt-4o-mini")


def _ollama(_asynchronous: bool) -> Callable[[], Any]:
    from app.llm import get_llm

    return lambda: get_llm().ollama.list_models()


#: Each client, and what it needs set (the providers' own default endpoints are used otherwise).
CLIENTS = {
    "openai": (_openai, {}),
    "anthropic": (_anthropic, {}),
    "gemini": (_gemini, {}),
    "weather": (_weather, {"WEATHER_BASE_URL": "http://api.weather.invalid/v1"}),
    "llm-layer": (_llm_layer, {}),
    "ollama": (_ollama, {"OLLAMA_HOST": "http://ollama.invalid:11434"}),
}


CASES = [(name, False) for name in sorted(CLIENTS)] + [
    (name, True) for name in ("anthropic", "gemini", "openai")
]


@pytest.mark.skipif(not WATCHED, reason="run by the next test, in a child pytest with an audit hook")
@pytest.mark.parametrize(("name", "asynchronous"), CASES)
def test_every_client_is_refused_before_it_connects(make_app, watched, name, asynchronous):
    from app.services import weather_service
    from app.testing.plugin import PLACEHOLDER_KEYS

    make_call, settings = CLIENTS[name]
    app = make_app(**PLACEHOLDER_KEYS, **settings)
    weather_service.init_app(app)
    with app.app_context(), pytest.raises(Exception) as caught:
        make_call(asynchronous)()
    refused = GUARD.take_refused()  # taken here, so that the plugin does not fail this test for it
    assert any(isinstance(exc, RealCallBlocked) for exc in _chain(caught.value)) or (
        refused and "real-call guard" in str(caught.value) + "".join(map(str, _chain(caught.value)))
    ), _chain(caught.value)
    assert refused and "real-call guard refused" in refused[0]
    assert watched == [], watched  # no name resolved, no socket connected


@pytest.mark.skipif(WATCHED, reason="the child's own run")
def test_every_client_in_a_child_pytest_watched_by_an_audit_hook():
    child = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
         "-k", "refused_before_it_connects"],
        env={**os.environ, "GUARD_AUDIT": "1"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert child.returncode == 0, child.stdout[-4000:] + child.stderr[-2000:]
    assert f"{len(CASES)} passed" in child.stdout, child.stdout[-2000:]


def test_loopback_is_allowed():
    for host in ("127.0.0.1", "127.8.9.10", "::1", "[::1]", "localhost", "api.localhost"):
        assert is_loopback(host), host
    for host in ("10.0.0.1", "api.openai.com", "0.0.0.0", "localhost.example.com", "2001:db8::1"):
        assert not is_loopback(host), host
    check_request("GET", "127.0.0.1", "/")  # passes


def test_a_refusal_the_app_swallowed_still_fails_the_test(pytester):
    pytester.makeconftest('pytest_plugins = ["app.testing.plugin"]')
    pytester.makepyfile(
        """
        from app.connectors.outbound import check_request

        def test_swallowed():
            try:
                check_request("POST", "api.openai.com", "/v1/chat/completions")
            except ConnectionError:
                pass  # as an app turning it into a 502 would
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q")
    result.assert_outcomes(failed=1)
    assert "real-call guard refused POST api.openai.com/v1/chat/completions" in result.stdout.str()
