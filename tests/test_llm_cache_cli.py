"""``flask llm cache stats|clear`` and the cache's row in ``flask services info``, by the CLI runner."""

from __future__ import annotations

from typing import Any

import pytest
import redis as redis_lib

from app.llm import get_llm
from tests.conftest import CANARY_KEY
from tests.servers import ScriptedServer

MESSAGES = [{"role": "user", "content": "Hi"}]


@pytest.fixture
def cache_app(make_app, upstream: ScriptedServer, request: pytest.FixtureRequest):
    def build(backend: str, **extra: Any):
        settings: dict[str, Any] = {
            "OPENAI_API_KEY": CANARY_KEY,
            "OPENAI_BASE_URL": upstream.url_for("/v1"),
            "LLM_CACHE": backend,
            **extra,
        }
        if backend == "redis":
            server = request.getfixturevalue("redis_server")
            redis_lib.Redis.from_url(server.url).flushdb()
            settings.setdefault("REDIS_URL", server.url)
        return make_app(settings)

    return build


def parsed(output: str) -> dict[str, str]:
    """The stats' lines: name, then two spaces or more, then the value."""
    import re

    return dict(re.split(r"\s{2,}", line, maxsplit=1) for line in output.splitlines() if line)  # type: ignore[misc]


def calls(app, *models: str) -> None:
    with app.app_context():
        for model in models:
            get_llm().chat(MESSAGES, model)


@pytest.mark.parametrize("backend", ["memory", "disk", "redis"])
def test_stats_show_hits_misses_ratio_entries_bytes_and_back_end(cache_app, backend):
    app = cache_app(backend)
    calls(app, "openai/a", "openai/a", "openai/a", "openai/b")
    result = app.test_cli_runner().invoke(args=["llm", "cache", "stats"])
    assert result.exit_code == 0, result.output
    stats = parsed(result.output)
    assert stats["back end"].startswith(f"{backend} (")
    assert (stats["hits"], stats["misses"], stats["hit ratio"]) == ("2", "2", "50.0%")
    assert int(stats["entries"]) >= 2 and int(stats["bytes"]) > 0
    assert CANARY_KEY not in result.output


def test_disk_and_redis_counts_are_every_processs(cache_app, redis_server):
    """Two apps stand for two processes: each adds its counts to the shared ones."""
    one, two = cache_app("redis"), cache_app("redis", REDIS_URL=redis_server.url)
    calls(one, "openai/a", "openai/a")
    calls(two, "openai/a")
    with one.app_context():
        from app.llm.cache import current_cache

        current_cache().stats()  # adds one's counts now (a process adds them about once a second)
    stats = parsed(two.test_cli_runner().invoke(args=["llm", "cache", "stats"]).output)
    assert (stats["hits"], stats["misses"]) == ("2", "1"), stats


@pytest.mark.parametrize("backend", ["memory", "disk", "redis"])
def test_clear_one_model_then_all(cache_app, upstream, backend):
    app = cache_app(backend)
    calls(app, "openai/a", "openai/b", "openai/b")
    runner = app.test_cli_runner()
    result = runner.invoke(args=["llm", "cache", "clear", "--model", "openai/b"])
    assert result.exit_code == 0 and result.output == "removed 1 entry of openai/b\n"
    calls(app, "openai/a", "openai/b")  # a: still cached; b: asked again
    assert [r.json["model"] for r in upstream.requests] == ["a", "b", "b"]
    result = runner.invoke(args=["llm", "cache", "clear"])
    assert result.exit_code == 0 and result.output.startswith("removed ")
    calls(app, "openai/a")
    assert len(upstream.requests) == 4


def test_clear_refuses_a_model_that_is_not_provider_slash_model(cache_app):
    result = cache_app("memory").test_cli_runner().invoke(args=["llm", "cache", "clear", "--model", "gpt-4o"])
    assert result.exit_code == 1 and "--model must be 'provider/model'" in result.output


def test_without_llm_cache_the_commands_say_so(make_app):
    runner = make_app().test_cli_runner()
    for args in (["llm", "cache", "stats"], ["llm", "cache", "clear"]):
        result = runner.invoke(args=args)
        assert result.exit_code == 1 and "LLM_CACHE is not set" in result.output


def test_stats_with_redis_down_fail_in_one_line(cache_app, disposable_redis):
    app = cache_app("redis", REDIS_URL=disposable_redis.url)
    disposable_redis.stop()
    result = app.test_cli_runner().invoke(args=["llm", "cache", "stats"])
    assert result.exit_code == 1
    assert (
        result.output.startswith("error: the redis back end did not answer")
        and "Traceback" not in result.output
    )


@pytest.mark.parametrize(
    ("backend", "shown"),
    [
        ("memory", "yes (memory)"),
        ("disk", "yes (disk)"),
        ("redis", "yes (redis)"),
        (None, "no (set LLM_CACHE)"),
    ],
)
def test_services_info_shows_the_back_end(cache_app, make_app, backend, shown, tmp_path):
    password = "s3cret-" + CANARY_KEY[-8:]
    if backend is None:
        app = make_app()
    elif backend == "redis":
        app = cache_app(backend, REDIS_URL=f"redis://:{password}@127.0.0.1:6399/0")
    else:
        app = cache_app(backend, LLM_CACHE_DIR=str(tmp_path / "c"))
    result = app.test_cli_runner().invoke(args=["services", "info"])
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if line.startswith("llm-cache"))
    assert shown in row
    if backend == "disk":
        assert str(tmp_path / "c") in row
    if backend == "redis":
        assert "127.0.0.1:6399" in row and password not in result.output
