"""The database: plain Flask-SQLAlchemy on a typed declarative base, fork-safe.

``db`` is an ordinary ``flask_sqlalchemy.SQLAlchemy`` built on :class:`Base`,
an SQLAlchemy 2.0 ``DeclarativeBase``. Models subclass :class:`Base` (one
registry and one metadata with ``db.Model``, so ``db.session``,
``db.create_all()`` and ``flask db migrate`` see them) rather than
``db.Model``: ``db.Model`` is an attribute of an instance, which mypy cannot
take as a base class, while :class:`Base` is a real class, so ``Mapped[...]``
columns type-check. What ``db.Model`` adds on top, an automatic
``__tablename__`` and the legacy ``Model.query``, is not used here: models name
their table and queries go through ``db.session``.

``init_app`` validates the settings and hands them to Flask-SQLAlchemy, which
creates the engine objects (no connection yet). ``DATABASE_URL`` (or
``SQLALCHEMY_DATABASE_URI``) accepts ``sqlite:///...``, ``postgres://`` and
``postgresql://`` (PostgreSQL through psycopg 3); the default is SQLite at
``instance/app.db``. Engines ping connections before use (``pool_pre_ping``),
and a forked child disposes of its inherited pools without closing the
parent's connections (``dispose(close=False)``, SQLAlchemy's advice for
``os.fork()``), so it opens its own.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flask import Flask, current_app
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import Engine
from sqlalchemy.orm import DeclarativeBase, scoped_session

from app.config import check_database_url, get_bool, get_seconds, get_str
from app.connectors._base import Connector, current_connector, on_fork_in_child, register
from app.errors import ConfigError
from app.redaction import redact_url

__all__ = ["Base", "db", "get_db", "init_app", "transaction"]

EXTENSION_KEY = "db_service"


class Base(DeclarativeBase):
    """The declarative base of every model: ``class Note(Base)`` with ``Mapped[...]`` columns."""


db = SQLAlchemy(model_class=Base)


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
    check_database_url(url, key)  # host and port as SQLAlchemy reads them; registers its passwords
    return DatabaseSettings(
        url=url,
        connect_timeout=get_seconds(config, "DATABASE_CONNECT_TIMEOUT"),
        pool_pre_ping=get_bool(config, "DATABASE_POOL_PRE_PING"),
    )


class DatabaseConnector(Connector):
    """The validated settings of one app and the engines Flask-SQLAlchemy made for it."""

    extension_key = EXTENSION_KEY
    accessor = "db"

    def __init__(self, settings: DatabaseSettings) -> None:
        self.settings = settings
        self.engines: list[Engine] = []

    @property
    def holds_connections(self) -> bool:
        """Whether this process has connections in its pools (none after reset or a fork)."""
        for engine in self.engines:
            pool = engine.pool
            checked_in = getattr(pool, "checkedin", None)
            checked_out = getattr(pool, "checkedout", None)
            if checked_in is None or checked_out is None:
                return True  # a pool that does not count (StaticPool): it holds its one connection
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


_connectors: weakref.WeakSet[DatabaseConnector] = weakref.WeakSet()


def _forget_engines_after_fork() -> None:
    for connector in list(_connectors):
        connector.forget_after_fork()


on_fork_in_child(_forget_engines_after_fork)


def init_app(app: Flask) -> None:
    """Validate the database settings, register the service and attach ``db`` to ``app``."""
    settings = parse_database_settings(app.config, app.instance_path)
    connector = DatabaseConnector(settings)
    register(app, connector)
    app.config["SQLALCHEMY_DATABASE_URI"] = settings.url
    app.config["SQLALCHEMY_ENGINE_OPTIONS"] = {
        **settings.engine_options(),
        **app.config.get("SQLALCHEMY_ENGINE_OPTIONS", {}),
    }
    if settings.dialect == "sqlite":
        Path(app.instance_path).mkdir(parents=True, exist_ok=True)
    db.init_app(app)
    with app.app_context():  # Flask-SQLAlchemy's public way to reach this app's engines
        connector.engines = list(db.engines.values())
    _connectors.add(connector)


def get_db() -> SQLAlchemy:
    """``db``, for callers that prefer a function (the ``flask db`` stand-in, health checks)."""
    return db


def current_database() -> DatabaseConnector:
    return current_connector(EXTENSION_KEY, "db", DatabaseConnector)


def engine() -> Engine:
    """The current app's default engine."""
    current_database()
    return db.engine


@contextmanager
def transaction() -> Iterator[scoped_session[Any]]:
    """``with transaction() as session:`` commits on success, rolls back on any error."""
    current_database()
    session = db.session
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
