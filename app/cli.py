"""``flask services check`` and ``flask services info``: the operator's view."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
from flask import current_app
from flask.cli import AppGroup, ScriptInfo

from app.connectors._base import Connector
from app.health import run_checks
from app.redaction import redact
from app.services.db_service import get_db


class LazyMigrateGroup(click.Command):
    """``flask db ...``: Flask-Migrate's commands, with Flask-Migrate loaded only when they run.

    Flask-Migrate brings Alembic, which takes longer to import than Flask
    itself, and only these commands need it. So the app registers this
    stand-in, which takes every argument as it is, registers Flask-Migrate
    on the app, and runs Flask-Migrate's own ``db`` group with them.
    """

    def __init__(self, name: str, migrations_dir: Path) -> None:
        super().__init__(
            name,
            help="Database migrations (Flask-Migrate / Alembic); see `flask db --help`.",
            context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
            add_help_option=False,
        )
        self.migrations_dir = migrations_dir

    def invoke(self, ctx: click.Context) -> Any:
        from flask_migrate import Migrate
        from flask_migrate.cli import db as migrate_group

        info = ctx.ensure_object(ScriptInfo)
        app = info.load_app()
        if "migrate" not in app.extensions:
            Migrate(app, get_db(), directory=str(self.migrations_dir))
        return migrate_group.main(args=ctx.args, prog_name=ctx.command_path, obj=info)


services_cli = AppGroup("services", help="Inspect the app's services (database, Redis, LLM providers).")


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=False)]
    lines = [headers, *rows]
    return "\n".join(
        "  ".join(str(cell).ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


@services_cli.command("check")
def check_command() -> None:
    """Run the readiness checks; exit 1 when one fails."""
    report = run_checks(current_app._get_current_object())  # type: ignore[attr-defined]
    rows = []
    for check in report.checks:
        timing = f"{check.observed_value:.1f} ms" if check.observed_unit == "ms" else "-"
        rows.append((check.component, check.status.upper(), timing, check.detail or check.output or ""))
    click.echo(redact(_table(("SERVICE", "STATUS", "TIME", "DETAIL"), rows)))
    click.echo(f"overall: {report.status}")
    if any(check.status == "fail" for check in report.checks):
        sys.exit(1)


def _timeouts(info: dict[str, Any]) -> str:
    parts = []
    for key, label in (
        ("timeout", "read"),
        ("socket_timeout", "socket"),
        ("connect_timeout", "connect"),
    ):
        if key in info:
            parts.append(f"{label} {info[key]:g}s")
    return ", ".join(parts) or "-"


#: The LLM provider each connector's entries are addressed as (``openai/...`` is the default profile).
_LLM_CONNECTORS = {"openai_service", "genai_service", "anthropic_service"}


def _retries(extension: Connector, name: str, info: dict[str, Any]) -> str:
    """The retries that really apply: the LLM layer's for a provider (its SDK's are off under it),
    and the SDK's for code that calls the client itself (``get_openai_client()``...)."""
    client = f"client {info['max_retries']}" if "max_retries" in info else None
    llm = current_app.extensions.get("llm")
    if extension.extension_key not in _LLM_CONNECTORS or llm is None:
        return client or "-"
    provider = "openai" if extension.extension_key == "openai_service" and name == "default" else name
    settings = llm.resilience
    layer = (settings.overrides.get(provider) or settings.base).retry.max_retries
    return f"llm {layer}" + (f", {client}" if client else ", client 0")


@services_cli.command("info")
def info_command() -> None:
    """Each service: configured or not, endpoint (credentials redacted), timeouts, retries, client built.

    RETRIES: ``llm N`` is what an LLM-layer call retries (LLM_MAX_RETRIES or its LLM_POLICY
    override; the SDK's own retries are off under the layer); ``client N`` is what the SDK or
    redis-py retries when your code calls the client itself.
    """
    rows = []
    for extension in current_app.extensions.values():
        if not isinstance(extension, Connector):
            continue
        for name, info in extension.info().items():
            configured = "yes" if info["configured"] else f"no (set {info['missing']})"
            rows.append(
                (
                    f"{name}" if extension.extension_key != "openai_service" else f"openai:{name}",
                    configured,
                    info.get("endpoint") or "-",
                    _timeouts(info),
                    _retries(extension, name, info),
                    "yes" if info["client_built"] else "no",
                )
            )
    from app.llm.cache.cli import services_row  # the response cache's back end (LLM_CACHE)

    rows.append(services_row())
    headers = ("SERVICE", "CONFIGURED", "ENDPOINT", "TIMEOUTS", "RETRIES", "CLIENT BUILT")
    click.echo(redact(_table(headers, rows)))
