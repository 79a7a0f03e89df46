"""``flask llm chat|models|pull``: the LLM layer from a terminal.

Errors print one line (``error: ...``, no traceback, keys redacted) and exit 1.
"""

from __future__ import annotations

import sys
from typing import Any, NoReturn

import click
from flask import Flask, current_app
from flask.cli import AppGroup

from app.connectors._base import Connector
from app.connectors.redis_connector import EXTENSION_KEY as REDIS_KEY
from app.connectors.redis_connector import RedisConnector
from app.llm.catalogue import Catalogue
from app.llm.client import OPENAI_PROVIDER, get_llm
from app.llm.errors import LLMError, LLMNotConfiguredError
from app.llm.types import ChatResponse
from app.redaction import redact

llm_cli = AppGroup("llm", help="Use the LLM layer: chat with a model, list models, pull Ollama models.")


def _fail(exc: BaseException) -> NoReturn:
    """One line on stderr, exit 1."""
    text = str(exc) if isinstance(exc, LLMError) else f"{type(exc).__name__}: {exc}"
    lines = redact(text).strip().splitlines()
    click.echo(f"error: {lines[0] if lines else type(exc).__name__}", err=True)
    sys.exit(1)


def _usage_line(response: ChatResponse) -> str:
    tokens = (
        f"{response.input_tokens if response.input_tokens is not None else '?'} in,"
        f" {response.output_tokens if response.output_tokens is not None else '?'} out"
    )
    if response.total_tokens is not None:
        tokens += f", {response.total_tokens} total"
    return (
        f"[{response.provider}/{response.model}] tokens: {tokens};"
        f" finish: {response.finish_reason or '-'}; {response.latency_ms:.0f} ms"
    )


@llm_cli.command("chat")
@click.argument("prompt")
@click.option("--model", "-m", default=None, help="provider/model (default: LLM_DEFAULT_MODEL).")
@click.option("--system", "-s", default=None, help="A system message sent before the prompt.")
@click.option("--no-stream", is_flag=True, help="Wait for the whole answer instead of streaming it.")
def chat_command(prompt: str, model: str | None, system: str | None, no_stream: bool) -> None:
    """Send PROMPT (``-`` reads it from stdin) and print the answer as it arrives.

    Usage (tokens, finish reason, time) goes to stderr.
    """
    if prompt == "-":
        prompt = sys.stdin.read()
    messages: list[dict[str, Any]] = []
    if system:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": prompt})
    out = sys.stdout
    try:
        llm = get_llm()
        if no_stream:
            response = llm.chat(messages, model=model)
            if response.content:
                click.echo(response.content)
        else:
            printed = False
            with llm.chat_stream(messages, model=model) as stream:
                try:
                    for text in stream:
                        out.write(text)
                        out.flush()
                        printed = True
                finally:
                    if printed:
                        out.write("\n")
                        out.flush()
                response = stream.response
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as exc:
        _fail(exc)
    for call in response.tool_calls:
        click.echo(f"tool call: {call.name}({redact(_json(call.arguments))}) [id {call.id}]")
    click.echo(_usage_line(response), err=True)


def _json(value: Any) -> str:
    import json

    return json.dumps(value, ensure_ascii=False)


def _missing_settings(app: Flask) -> dict[str, str | None]:
    """Provider name -> the setting it still needs (None: configured), from the connectors."""
    missing: dict[str, str | None] = {}
    for extension in app.extensions.values():
        if not isinstance(extension, Connector):
            continue
        for key, info in extension.info().items():
            is_default = extension.extension_key == "openai_service" and key == "default"
            missing[OPENAI_PROVIDER if is_default else key] = (
                None if info.get("configured") else info.get("missing")
            )
    return missing


@llm_cli.command("models")
@click.option("--provider", "-p", "provider_name", default=None, help="Only this provider.")
def models_command(provider_name: str | None) -> None:
    """List the models each configured provider offers; exit 1 when a listing fails.

    Where the model catalogue knows a model: its context window, maximum output, what it
    takes (images, tools, JSON schemas), whether it reasons, and its prices (USD per million
    input, output and cached input tokens); ``-`` where no source says.
    """
    llm = get_llm()
    known = llm.provider_names()
    if provider_name is not None and provider_name not in known:
        _fail(LLMNotConfiguredError(f"unknown provider {provider_name!r}; known: {', '.join(known)}"))
    names = [provider_name] if provider_name else known
    missing = _missing_settings(current_app._get_current_object())  # type: ignore[attr-defined]
    failed = False
    for name in names:
        setting = missing.get(name)
        if setting is not None:
            click.echo(f"{name}: not configured ({setting})")
            failed = failed or provider_name is not None
            continue
        try:
            models = llm.list_models(name)
        except LLMNotConfiguredError as exc:
            click.echo(f"{name}: not configured ({exc.setting or exc.message})")
            failed = failed or provider_name is not None
            continue
        except Exception as exc:
            text = str(exc) if isinstance(exc, LLMError) else f"{type(exc).__name__}: {exc}"
            lines = redact(text).strip().splitlines()
            click.echo(f"{name}: error: {lines[0] if lines else type(exc).__name__}")
            failed = True
            continue
        if not models:
            click.echo(f"{name}: no models listed")
            continue
        click.echo(f"{name}:")
        click.echo(_catalogue_rows(llm.catalogue, name, models))
    if failed:
        sys.exit(1)


#: The catalogue's columns (``app.llm.catalogue.ModelInfo``); prices are USD per million tokens.
CATALOGUE_COLUMNS = (
    ("CONTEXT", "context_window"),
    ("MAX OUT", "max_output_tokens"),
    ("IMAGES", "supports_images"),
    ("TOOLS", "supports_tools"),
    ("JSON SCHEMA", "supports_json_schema"),
    ("REASONING", "supports_reasoning"),
    ("IN $/M", "input_price"),
    ("OUT $/M", "output_price"),
    ("CACHED $/M", "cached_input_price"),
)


def _catalogue_rows(catalogue: Catalogue, provider: str, models: list[str]) -> str:
    """The models, indented, with the catalogue's columns when it knows any of them ("-": unknown)."""
    infos = [catalogue.lookup(provider, model) for model in models]
    if not any(infos):
        return "\n".join(f"  {model}" for model in models)
    rows = [
        (model, *(_cell(getattr(info, attribute) if info else None) for _, attribute in CATALOGUE_COLUMNS))
        for model, info in zip(models, infos, strict=True)
    ]
    from app.cli import _table

    table = _table(("MODEL", *(header for header, _ in CATALOGUE_COLUMNS)), rows)
    return "\n".join(f"  {line}" for line in table.splitlines())


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


class _PullProgress:
    """One status line, rewritten in place while a layer downloads (percent of its size)."""

    def __init__(self) -> None:
        self.out = sys.stdout
        self.open_line = False
        self.last: tuple[str, int] | None = None

    def __call__(self, line: dict[str, Any]) -> None:
        status = str(line.get("status") or "")
        total, completed = line.get("total"), line.get("completed")
        if isinstance(total, int) and total > 0 and isinstance(completed, int):
            percent = min(100, completed * 100 // total)
            if self.last == (status, percent):
                return
            self.last = (status, percent)
            self.out.write(f"\r{status}: {percent:3d}% ({_size(completed)} / {_size(total)})")
            self.open_line = True
        else:
            if self.last is not None and self.last[0] == status:
                return
            self.last = (status, -1)
            self.end()
            self.out.write(f"{status}\n")
        self.out.flush()

    def end(self) -> None:
        if self.open_line:
            self.out.write("\n")
            self.open_line = False
        self.out.flush()


def _size(count: int) -> str:
    size = float(count)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"  # pragma: no cover - the loop returns


@llm_cli.command("pull")
@click.argument("model")
def pull_command(model: str) -> None:
    """Pull MODEL into Ollama (OLLAMA_HOST), showing the download's progress."""
    ollama = get_llm().ollama
    progress = _PullProgress()
    try:
        ollama.pull_model(model, progress)
    except KeyboardInterrupt:
        progress.end()
        click.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as exc:
        progress.end()
        _fail(exc)
    progress.end()
    click.echo(f"pulled {model} into Ollama at {ollama.endpoint}")


@llm_cli.command("breakers")
def breakers_command() -> None:
    """The state of every circuit breaker: provider/model, state, failure rate, time left open.

    The breakers live in Redis when REDIS_URL is set. When Redis does not answer, this says so,
    shows this process's own breakers instead (a new process has none) and exits 1.
    """
    from app.cli import _table
    from app.llm import get_llm

    breakers = get_llm().guards.breakers
    states = breakers.states()
    redis = current_app.extensions.get(REDIS_KEY)
    configured = isinstance(redis, RedisConnector) and redis.configured
    unreachable = configured and not breakers.gate.available
    if isinstance(redis, RedisConnector) and unreachable:
        click.echo(
            f"Redis ({redis.settings.endpoint}) is unreachable: the shared breakers cannot be read;"
            " showing this process's own",
            err=True,
        )
    elif not configured:
        click.echo("REDIS_URL is not set: each process keeps its own breakers; showing this one's", err=True)
    if not states:
        click.echo("no breaker has seen a call yet" if not unreachable else "this process has no breaker")
        if unreachable:
            sys.exit(1)
        return
    rows = [
        (
            s.key,
            s.state,
            f"{s.failure_rate:.0%} of {s.calls}",
            f"{s.open_for:.1f}s" if s.state == "open" else "-",
            s.backend,
        )
        for s in sorted(states, key=lambda s: s.key)
    ]
    click.echo(_table(("MODEL", "STATE", "FAILURES", "OPEN FOR", "BACKEND"), rows))
    if unreachable:
        sys.exit(1)


from app.llm.cache.cli import cache_cli  # noqa: E402 (flask llm cache stats|clear, app/llm/cache/cli.py)

llm_cli.add_command(cache_cli)
