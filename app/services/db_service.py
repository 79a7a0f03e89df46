"""The database: Flask-SQLAlchemy, attached lazily, fork-safe.

``db`` is the Flask-SQLAlchemy instance users define models on. It is created
on first access, not at import, and attached to an app (its engines created)
the first time that app needs an engine, not in ``init_app``: SQLAlchemy
alone takes longer to import than Flask, and an app whose first request is
``/livez`` (or a ``flask`` command that never touches the database) should
not pay for it. Models defined on ``db`` work as with plain Flask-SQLAlchemy.

``DATABASE_URL`` (or ``SQLALCHEMY_DATABASE_URI``) accepts ``sqlite:///...``,
``postgres://`` and ``postgresql://`` (PostgreSQL through psycopg 3); the
default is SQLite at ``instance/app.db``. Engines ping connections before use
(``pool_pre_ping``), and a forked child disposes of its inherited pool without
closing the parent's connections (``dispose(close=False)``).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flask import Flask, current_app

from app.config import get_bool, get_seconds, get_str
from app.connectors._base import Connector, current_connector, on_fork_in_child, register
from app.errors import ConfigError
from app.redaction import redact_url, register_secret

if TYPE_CHECKING:
    from flask_sqlalchemy import SQLAlchemy
    from sqlalchemy import Engine
    from sqlalchemy.orm import scoped_session

    db: SQLAlchemy

__all__ = ["db", "get_db", "init_app", "transaction"]

EXTENSION_KEY = "db_service"

_lock = threading.RLock()
_db: SQLAlchemy | None = None


@dataclass(frozen=True)
class DatabaseSettings:
    #: Out of the repr: it may carry the password (``endpoint`` is the redacted form).
    url: str = field(repr=False)
    connect_timeout: float
    pool_pre_ping: bool

    @property
    def dialect(self) -> str:
        return self.url.split(":", 1)[0].split("+", 1)[0]

    @property
    def endpoint(self) -> str:
        return redact_url(self.url)

    def engine_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"pool_pre_ping": self.pool_pre_ping}
        if self.dialect == "postgresql":
            options["connect_args"] = {"connect_timeout": max(1, round(self.connect_timeout))}
        elif self.dialect == "sqlite":
            options["connect_args"] = {"timeout": self.connect_timeout}
        return options


def parse_database_settings(config: Mapping[str, Any], instance_path: str) -> DatabaseSettings:
    key = "DATABASE_URL" if get_str(config, "DATABASE_URL") else "SQLALCHEMY_DATABASE_URI"
    url = get_str(config, key)
    if url is None:
        url = f"sqlite:///{Path(instance_path) / 'app.db'}"
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme in ("postgres", "postgresql"):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    elif not scheme or scheme.split("+", 1)[0] not in ("sqlite", "postgresql"):
        raise ConfigError(
            f"{key} must be a sqlite:///, postgres:// or postgresql:// URL, got {redact_url(url)!r}"
        )
    from urllib.parse import urlsplit

    register_secret(urlsplit(url).password)
    return DatabaseSettings(
        url=url,
        connect_timeout=get_seconds(config, "DATABASE_CONNECT_TIMEOUT"),
        pool_pre_ping=get_bool(config, "DATABASE_POOL_PRE_PING"),
    )


class DatabaseConnector(Connector):
    """The validated settings of one app, and its engines once attached."""

    extension_key = EXTENSION_KEY
    accessor = "db"

    def __init__(self, app: Flask, settings: DatabaseSettings) -> None:
        self.app_ref = weakref.ref(app)
        self.settings = settings
        self.engines: list[Engine] = []

    @property
    def attached(self) -> bool:
        return bool(self.engines)

    @property
    def holds_connections(self) -> bool:
        """Whether this process has connections in its pools (none after reset or a fork)."""
        for engine in self.engines:
            pool = engine.pool
            checked_in = getattr(pool, "checkedin", None)
            checked_out = getattr(pool, "checkedout", None)
            if checked_in is None or checked_out is None:
                return True  # a pool that does not count (StaticPool): attached is all we know
            if checked_in() + checked_out() > 0:
                return True
        return False

    def reset(self) -> None:
        """Close every pooled connection; the pool opens new ones on demand."""
        for engine in self.engines:
            engine.dispose()

    def forget_after_fork(self) -> None:
        for engine in self.engines:
            engine.dispose(close=False)

    def info(self) -> dict[str, Any]:
        return {
            "database": {
                "configured": True,
                "kind": self.settings.dialect,
                "endpoint": self.settings.endpoint,
                "connect_timeout": self.settings.connect_timeout,
                "pool_pre_ping": self.settings.pool_pre_ping,
                "client_built": self.holds_connections,
            }
        }


_attached: weakref.WeakSet[DatabaseConnector] = weakref.WeakSet()


def _forget_engines_after_fork() -> None:
    for connector in list(_attached):
        connector.forget_after_fork()


on_fork_in_child(_forget_engines_after_fork)


def init_app(app: Flask) -> None:
    """Validate the database settings and register the service; imports nothing heavy."""
    settings = parse_database_settings(app.config, app.instance_path)
    connector = DatabaseConnector(app, settings)
    register(app, connector)
    app.config["SQLALCHEMY_DATABASE_URI"] = settings.url
    app.config["SQLALCHEMY_ENGINE_OPTIONS"] = {
        **settings.engine_options(),
        **app.config.get("SQLALCHEMY_ENGINE_OPTIONS", {}),
    }
    if settings.dialect == "sqlite":
        Path(app.instance_path).mkdir(parents=True, exist_ok=True)
    # Flask-SQLAlchemy registers these two in its own init_app; Flask refuses
    # such setup calls once an app has served a request, and the attach may
    # come later than that, so they are registered here, up front.
    app.teardown_appcontext(_remove_session)
    app.shell_context_processor(lambda: {"db": get_db()})


def _remove_session(_exc: BaseException | None) -> None:
    if _db is not None:
        _db.session.remove()


def _ignore_setup(f: Any) -> Any:
    return f


def _attach(database: SQLAlchemy, app: Flask) -> None:
    """Run Flask-SQLAlchemy's ``init_app`` for ``app`` on its first use of the database.

    Its one setup-method call (the session teardown) was made by
    :func:`init_app` already, and Flask refuses such calls once the app has
    served a request, which a lazy attach usually follows; so it is passed
    over here. Called with ``_lock`` held.
    """
    app.__dict__["teardown_appcontext"] = _ignore_setup
    try:
        database.init_app(app)
    finally:
        del app.__dict__["teardown_appcontext"]


def get_db() -> SQLAlchemy:
    """The Flask-SQLAlchemy instance users define models on, created on first use."""
    database = _db
    if database is not None:
        return database
    with _lock:
        if _db is None:
            _create()
        assert _db is not None
        return _db


def _create() -> None:
    global _db  # noqa: PLW0603 - the one shared instance, created lazily
    from flask_sqlalchemy import SQLAlchemy

    class ServicesSQLAlchemy(SQLAlchemy):
        """Flask-SQLAlchemy, attached to an app the first time that app needs an engine."""

        @property
        def engines(self) -> Mapping[str | None, Engine]:
            app = current_app._get_current_object()  # type: ignore[attr-defined]
            connector = app.extensions.get(EXTENSION_KEY)
            # ``connector.engines`` is published last: Flask-SQLAlchemy registers
            # itself in app.extensions before it has created the engines, so that
            # entry cannot tell other threads that the attach is complete.
            if isinstance(connector, DatabaseConnector) and not connector.attached:
                with _lock:
                    if not connector.attached:
                        if app.extensions.get("sqlalchemy") is not self:
                            _attach(self, app)
                        engines = list(super().engines.values())
                        _attached.add(connector)
                        connector.engines = engines
            return super().engines

    _db = ServicesSQLAlchemy(add_models_to_shell=False)


def __getattr__(name: str) -> Any:
    if name == "db":
        return get_db()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def current_database() -> DatabaseConnector:
    return current_connector(EXTENSION_KEY, "db", DatabaseConnector)


def engine() -> Engine:
    """The current app's default engine (attaching the database if needed)."""
    current_database()
    return get_db().engine


@contextmanager
def transaction() -> Iterator[scoped_session[Any]]:
    """``with transaction() as session:`` commits on success, rolls back on any error."""
    current_database()
    session = get_db().session
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise


def reset_database(app: Flask | None = None) -> None:
    """Close the pooled connections of ``app`` (default: the current app) in this process."""
    target = app if app is not None else current_app._get_current_object()  # type: ignore[attr-defined]
    connector = target.extensions.get(EXTENSION_KEY)
    if isinstance(connector, DatabaseConnector):
        connector.reset()
