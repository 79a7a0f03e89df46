"""The four services behind one contract.

Each has ``init_app(app)`` (validates config, builds nothing), a
``get_*_client()`` resolved from ``current_app`` and built on first use, once
per app and per process, and a ``reset_*`` for tests.
"""

from __future__ import annotations

from flask import Flask

from app.connectors._base import Connector
from app.services import db_service, genai_service, openai_service, redis_service

__all__ = [
    "db_service",
    "genai_service",
    "init_services",
    "openai_service",
    "redis_service",
    "reset_services",
]


def init_services(app: Flask) -> None:
    """Register all four services on ``app``."""
    db_service.init_app(app)
    redis_service.init_app(app)
    openai_service.init_app(app)
    genai_service.init_app(app)


def reset_services(app: Flask) -> None:
    """Close every client ``app`` built in this process (tests; worker exit), after writing the
    usage rows that wait (their writes may need the database's client)."""
    usage = app.extensions.get("llm_usage")
    ledger = getattr(usage, "ledger", None)
    if ledger is not None:
        ledger.drain()
    for extension in list(app.extensions.values()):
        if isinstance(extension, Connector):
            extension.reset()
