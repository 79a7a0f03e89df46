"""``flask llm cache stats|clear``: the response cache from a terminal; its ``flask services info`` row."""

from __future__ import annotations

import sys
from typing import Any, NoReturn

import click
from flask import current_app
from flask.cli import AppGroup

from app.redaction import redact

cache_cli = AppGroup("cache", help="The LLM response cache (LLM_CACHE): counts and sizes, or forget entries.")


def _fail(text: str) -> NoReturn:
    click.echo(f"error: {redact(text)}", err=True)
    sys.exit(1)


def _cache() -> Any:
    from app.llm.cache import current_cache

    cache = current_cache()
    if cache is None:
        _fail("LLM_CACHE is not set: there is no response cache (set it to memory, disk or redis)")
    return cache


def _where(cache: Any) -> str:
    """Where the back end keeps entries, credentials masked."""
    backend = cache.settings.backend
    if backend == "disk":
        return str(cache.settings.directory)
    if backend == "redis":
        from app.connectors.redis_connector import EXTENSION_KEY, RedisConnector

        connector = current_app.extensions.get(EXTENSION_KEY)
        return str(connector.settings.endpoint) if isinstance(connector, RedisConnector) else "-"
    return f"this process, at most {cache.settings.max_bytes} bytes"


@cache_cli.command("stats")
def stats_command() -> None:
    """Hits, misses, hit ratio, entries and bytes of the response cache.

    Disk and Redis: every process's counts (each adds its own about once a second) and
    the whole store. Memory: this process's only, so a ``flask`` command shows zeros; a
    worker's are in its own memory.
    """
    cache = _cache()
    try:
        stats = cache.stats()
    except Exception as exc:
        _fail(f"the {cache.settings.backend} back end did not answer ({type(exc).__name__}: {exc})")
    ratio = stats["hit_ratio"]
    rows = [
        ("back end", f"{stats['backend']} ({_where(cache)})"),
        ("hits", str(stats["hits"])),
        ("misses", str(stats["misses"])),
        ("hit ratio", "-" if ratio is None else f"{ratio:.1%}"),
        ("entries", str(stats["entries"])),
        ("bytes", str(stats["bytes"])),
        ("ttl", f"{cache.settings.ttl:g} s"),
    ]
    width = max(len(name) for name, _ in rows)
    click.echo(redact("\n".join(f"{name.ljust(width)}  {value}" for name, value in rows)))


@cache_cli.command("clear")
@click.option("--model", "-m", default=None, help="Only this provider/model's entries.")
def clear_command(model: str | None) -> None:
    """Forget the cached answers (of one provider/model with --model)."""
    from app.llm.client import split_model
    from app.llm.errors import LLMBadRequestError

    cache = _cache()
    if model is not None:
        try:
            split_model(model, setting="--model")
        except LLMBadRequestError as exc:
            _fail(exc.message)
    try:
        removed = cache.store.clear(model)
    except Exception as exc:
        _fail(f"the {cache.settings.backend} back end did not answer ({type(exc).__name__}: {exc})")
    click.echo(f"removed {removed} entr{'y' if removed == 1 else 'ies'}" + (f" of {model}" if model else ""))


def services_row() -> tuple[str, str, str, str, str, str]:
    """``flask services info``'s row of the response cache: its back end and where it keeps entries."""
    from app.llm.cache import current_cache

    cache: Any = current_cache()
    if cache is None:
        return ("llm-cache", "no (set LLM_CACHE)", "-", "-", "-", "no")
    built = "yes" if cache._store is not None else "no"
    return ("llm-cache", f"yes ({cache.settings.backend})", _where(cache), "-", "-", built)


__all__ = ["cache_cli", "services_row"]
