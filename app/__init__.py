"""The application factory.

``create_app(config)`` loads settings (see :mod:`app.config`), registers the
four services (none of which builds a client or imports its SDK here; the
database's engine objects are created, without a connection), the health
probes, the ``/api`` views and the ``flask services`` commands, then the
user's models (:mod:`app.models`), blueprints (:mod:`app.views`) and commands
(:mod:`app.commands`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from importlib import import_module
from pathlib import Path
from typing import Any

from flask import Flask, Response
from werkzeug.exceptions import HTTPException

from app.config import check_secret_key, load_config
from app.redaction import install_log_redaction, redact, register_secret
from app.services import init_services

__all__ = ["create_app"]

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Build the app; ``config`` overrides every other source of settings.

    ``INSTANCE_PATH`` (in ``config`` or the environment) moves the instance
    folder, and ``DOTENV_PATH`` the ``.env`` file (default: the project's).
    """
    overrides = dict(config or {})
    instance_path = overrides.get("INSTANCE_PATH") or os.environ.get("INSTANCE_PATH")
    app = Flask(
        __name__,
        instance_path=str(Path(instance_path).resolve()) if instance_path else None,
        instance_relative_config=True,
    )
    dotenv_path = overrides.get("DOTENV_PATH") or os.environ.get("DOTENV_PATH") or PROJECT_ROOT / ".env"
    load_config(app, overrides, Path(dotenv_path))
    check_secret_key(app)
    install_log_redaction()
    register_secret(app.config.get("SECRET_KEY"))

    init_services(app)
    import_module("app.jobs").init_app(app)  # jobs, media storage, `flask jobs`

    from app import llm

    llm.init_app(app)

    from app import api, commands, probes, views
    from app.cli import LazyMigrateGroup, services_cli
    from app.llm.cli import llm_cli

    app.register_blueprint(probes.bp)
    app.register_blueprint(api.bp)
    app.register_blueprint(import_module("app.usage_api").bp)  # GET /api/usage
    for blueprint in views.blueprints:
        app.register_blueprint(blueprint)
    app.cli.add_command(services_cli)
    app.cli.add_command(llm_cli)
    app.cli.add_command(import_module("app.api_keys").api_keys_cli)
    app.cli.add_command(LazyMigrateGroup("db", migrations_dir=PROJECT_ROOT / "migrations"))
    for command in commands.cli.commands.values():
        app.cli.add_command(command)
    # Importing the user's models defines them on db's metadata, where `flask db migrate` looks.
    import_module("app.models")
    app.register_error_handler(HTTPException, _http_error_as_json)
    app.register_error_handler(Exception, _unexpected_error_as_json)
    return app


def _http_error_as_json(error: HTTPException) -> Response:
    from app.api import error_response

    kind = (error.name or "error").lower().replace(" ", "_")
    response = error_response(error.code or 500, kind, error.description or error.name)
    if error.code == 405 and error.valid_methods:  # type: ignore[attr-defined]
        response.headers["Allow"] = ", ".join(error.valid_methods)  # type: ignore[attr-defined]
    return response


def _unexpected_error_as_json(error: Exception) -> Response:
    from flask import current_app

    from app.api import error_response

    current_app.logger.exception("unhandled error: %s", redact(type(error).__name__))
    return error_response(500, "internal_error", "the server hit an unexpected error")
