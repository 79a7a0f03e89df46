"""API keys for ``/api``: made and revoked with ``flask api-keys``, checked on every request.

A key is ``fsk_`` and 43 random URL-safe characters (256 bits), printed once
by ``flask api-keys create`` and never stored: the table keeps its HMAC-SHA256
under the app's ``SECRET_KEY`` (a keyed hash, so a copy of the database alone
cannot even test a guess), and a request's key is found by that hash. So
changing ``SECRET_KEY`` invalidates every key. No part of a key is kept, shown
by ``list`` or written to a log; keys are named by their id.

A key carries a ``name`` and an optional ``tenant``, which become the call's
``user`` and ``tenant`` (hooks, the call log), its own quotas (``rpm``,
``tpm``; unset: ``API_DEFAULT_RPM`` / ``API_DEFAULT_TPM``; 0: none), an
optional expiry and a revocation time. Times are stored as naive UTC.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

import click
from flask import Flask, current_app
from flask.cli import AppGroup
from sqlalchemy import DateTime, String, false, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Mapped, mapped_column

from app.config import get_bool
from app.errors import ConfigError
from app.services.db_service import Base, db, transaction

__all__ = [
    "ApiCaller",
    "ApiKey",
    "ApiKeyError",
    "ApiKeysUnavailableError",
    "NewApiKey",
    "api_keys_cli",
    "caller_for_key",
    "create_api_key",
    "revoke_api_key",
]

KEY_PREFIX = "fsk_"
#: Longer than any key this module makes; a longer header is refused without hashing it.
MAX_KEY_LENGTH = 128
#: Longest name and tenant.
MAX_NAME_LENGTH = 100


class ApiKey(Base):
    """One API key: who it is for, its quotas and its state; the key itself only as a keyed hash."""

    __tablename__ = "api_key"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(MAX_NAME_LENGTH))
    tenant: Mapped[str | None] = mapped_column(String(MAX_NAME_LENGTH))
    #: HMAC-SHA256 of the key under SECRET_KEY, hex.
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    #: Requests and tokens per minute; None: the app's defaults; 0: no limit.
    rpm: Mapped[int | None]
    tpm: Mapped[int | None]
    created_at: Mapped[datetime] = mapped_column(DateTime())
    expires_at: Mapped[datetime | None] = mapped_column(DateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime())
    #: Sees every user's and tenant's usage on ``GET /api/usage`` (others see their own).
    admin: Mapped[bool] = mapped_column(default=False, server_default=false())

    def status(self, now: datetime) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return "active"


@dataclass(frozen=True)
class ApiCaller:
    """The key a request authenticated with: what the views, quotas and hooks need of it."""

    key_id: int
    name: str
    tenant: str | None
    rpm: int | None
    tpm: int | None
    #: A public handle for the key's quota counters (a prefix of its hash, never the key).
    bucket: str
    admin: bool = False


class NewApiKey(NamedTuple):
    """What ``create_api_key`` made: the stored row's id, and the key, which exists only here.

    A tuple, so ``key_id, secret = create_api_key(...)`` works; its repr never shows the key.
    """

    id: int
    secret: str

    def __repr__(self) -> str:
        return f"NewApiKey(id={self.id}, secret='***')"


class ApiKeyError(Exception):
    """A request's key is missing, unknown, expired or revoked (401); the message never quotes it."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ApiKeysUnavailableError(Exception):
    """The key table cannot be read (database down, or ``flask db upgrade`` not run): 503."""


def _utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def hash_key(key: str) -> str:
    """HMAC-SHA256 of ``key`` under the current app's ``SECRET_KEY``, hex."""
    secret = current_app.config["SECRET_KEY"]
    secret_bytes = secret if isinstance(secret, bytes) else str(secret).encode()
    return hmac.new(secret_bytes, key.encode(), hashlib.sha256).hexdigest()


def _check_name(value: str, what: str) -> str:
    value = value.strip()
    if not value or len(value) > MAX_NAME_LENGTH or not value.isprintable():
        raise ValueError(f"{what} must be 1 to {MAX_NAME_LENGTH} printable characters")
    return value


def create_api_key(
    name: str,
    *,
    tenant: str | None = None,
    rpm: int | None = None,
    tpm: int | None = None,
    expires_at: datetime | None = None,
    admin: bool = False,
) -> NewApiKey:
    """Make a key (in the current app's database) and return it: the only time it exists in clear."""
    name = _check_name(name, "name")
    tenant = _check_name(tenant, "tenant") if tenant is not None else None
    for what, value in (("rpm", rpm), ("tpm", tpm)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_QUOTA
        ):
            raise ValueError(f"{what} must be a whole number from 0 to {MAX_QUOTA} (0: no limit)")
    if expires_at is not None:
        expires_at = expires_at.astimezone(UTC).replace(tzinfo=None) if expires_at.tzinfo else expires_at
        if expires_at <= _utcnow():
            raise ValueError("expires must be in the future")
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(
        name=name,
        tenant=tenant,
        key_hash=hash_key(secret),
        rpm=rpm,
        tpm=tpm,
        created_at=_utcnow(),
        expires_at=expires_at,
        admin=admin,
    )
    with transaction() as session:
        session.add(row)
    return NewApiKey(row.id, secret)


def revoke_api_key(key_id: int) -> bool:
    """Revoke a key by id; False when it was already revoked. ``LookupError`` when there is none."""
    with transaction() as session:
        row = session.get(ApiKey, key_id)
        if row is None:
            raise LookupError(f"no API key has the id {key_id}")
        if row.revoked_at is not None:
            return False
        row.revoked_at = _utcnow()
    return True


def caller_for_key(key: str | None) -> ApiCaller:
    """The caller a presented key stands for, or :class:`ApiKeyError` saying why not (never quoting it)."""
    if not key:
        raise ApiKeyError("an API key is required: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'")
    if len(key) > MAX_KEY_LENGTH or not key.startswith(KEY_PREFIX):
        raise ApiKeyError("the API key is not valid")
    digest = hash_key(key)
    try:
        row = db.session.scalar(select(ApiKey).where(ApiKey.key_hash == digest))
    except SQLAlchemyError as exc:
        db.session.rollback()
        raise ApiKeysUnavailableError(type(exc).__name__) from exc
    # The hash is looked up by an index; compare it again in constant time all the same.
    if row is None or not hmac.compare_digest(row.key_hash, digest):
        raise ApiKeyError("the API key is not valid")
    status = row.status(_utcnow())
    if status != "active":
        raise ApiKeyError(f"the API key is {status}")
    return ApiCaller(row.id, row.name, row.tenant, row.rpm, row.tpm, digest[:16], bool(row.admin))


def auth_required(app: Flask) -> bool:
    """``API_AUTH`` (default on). Off is allowed only in debug, testing or on a loopback bind.

    The bind is gunicorn's, from the environment as ``gunicorn.conf.py`` reads
    it: ``BIND``, else ``127.0.0.1:$PORT``. A Unix socket does not count as
    loopback (a proxy in front of it may be public), and neither does an
    address given on gunicorn's command line, which the app cannot see.
    """
    if get_bool(app.config, "API_AUTH"):
        return True
    bind = os.environ.get("BIND") or "127.0.0.1"
    if not (app.debug or app.testing or binds_to_loopback(bind)):
        raise ConfigError(
            f"API_AUTH=off is allowed only in debug, testing or on a loopback address, but BIND is {bind!r}:"
            " anyone who reaches it could spend the providers' credits; create keys with"
            " `flask api-keys create NAME` instead"
        )
    return False


def binds_to_loopback(bind: str) -> bool:
    """Whether a gunicorn bind (``host:port``, ``[::1]:port``, ``host``) is on a loopback address."""
    bind = bind.strip()
    if bind.startswith(("unix:", "fd://")) or not bind:
        return False
    if bind.startswith("["):
        host = bind[1:].partition("]")[0]
    else:
        host = bind.rpartition(":")[0] if bind.count(":") == 1 else bind
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def presented_key(headers: Any) -> str | None:
    """The key of ``Authorization: Bearer <key>`` or, without it, of ``X-API-Key``."""
    authorization = headers.get("Authorization", "")
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return str(value.strip())
    key = headers.get("X-API-Key", "").strip()
    return str(key) or None


# --- flask api-keys ------------------------------------------------------------------

api_keys_cli = AppGroup("api-keys", help="API keys for /api: create, list, revoke.")
#: The largest quota and key id: the columns are 32-bit integers in PostgreSQL.
MAX_QUOTA = MAX_ID = 2**31 - 1


def _database_errors(command: Callable[..., None]) -> Callable[..., None]:
    """A database that cannot be read (not migrated, down) is one line and exit 1, not a traceback."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> None:
        try:
            command(*args, **kwargs)
        except SQLAlchemyError as exc:
            db.session.rollback()
            raise click.ClickException(
                f"the api_key table cannot be read ({type(exc).__name__}; run `flask db upgrade`?)"
            ) from None

    return run


def _describe(value: int | None, default_key: str) -> str:
    if value is None:
        return f"default ({current_app.config.get(default_key)})"
    return "no limit" if value == 0 else str(value)


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S UTC") if value is not None else "-"


@api_keys_cli.command("create")
@click.argument("name")
@click.option("--tenant", help="Whose account the key's calls are on (the calls' tenant).")
@click.option(
    "--rpm",
    type=click.IntRange(0, MAX_QUOTA),
    help="Requests per minute (default API_DEFAULT_RPM; 0: none).",
)
@click.option(
    "--tpm",
    type=click.IntRange(0, MAX_QUOTA),
    help="Tokens per minute (default API_DEFAULT_TPM; 0: none).",
)
@click.option(
    "--expires",
    type=click.DateTime(formats=["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S"]),
    help="When the key stops working, in UTC (a date alone: its midnight).",
)
@click.option("--admin", is_flag=True, help="The key sees every user's usage on GET /api/usage.")
@_database_errors
def create_command(
    name: str, tenant: str | None, rpm: int | None, tpm: int | None, expires: datetime | None, admin: bool
) -> None:
    """Create a key for NAME and print it, once: only its keyed hash is stored.

    The key alone goes to standard output (KEY=$(flask api-keys create me)),
    what was made to standard error.
    """
    try:
        created = create_api_key(name, tenant=tenant, rpm=rpm, tpm=tpm, expires_at=expires, admin=admin)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(
        f"created API key {created.id} for {name.strip()!r}"
        f"{f' (tenant {tenant!r})' if tenant else ''}: rpm {_describe(rpm, 'API_DEFAULT_RPM')},"
        f" tpm {_describe(tpm, 'API_DEFAULT_TPM')}, expires {_when(expires)}{', admin' if admin else ''}."
        " The key is shown only now; it cannot be recovered.",
        err=True,
    )
    click.echo(created.secret)


@api_keys_cli.command("list")
@_database_errors
def list_command() -> None:
    """List the keys: id, name, tenant, quotas, dates and state (never the keys)."""
    from app.cli import _table

    now = _utcnow()
    rows = db.session.scalars(select(ApiKey).order_by(ApiKey.id)).all()
    if not rows:
        click.echo("no API keys yet: flask api-keys create NAME")
        return
    click.echo(
        _table(
            ["id", "name", "tenant", "rpm", "tpm", "created", "expires", "state"],
            [
                [
                    str(row.id),
                    row.name,
                    row.tenant or "-",
                    _describe(row.rpm, "API_DEFAULT_RPM"),
                    _describe(row.tpm, "API_DEFAULT_TPM"),
                    _when(row.created_at),
                    _when(row.expires_at),
                    row.status(now) if row.revoked_at is None else f"revoked {_when(row.revoked_at)}",
                ]
                for row in rows
            ],
        )
    )


@api_keys_cli.command("revoke")
@click.argument("key_id", type=click.IntRange(1, MAX_ID))
@_database_errors
def revoke_command(key_id: int) -> None:
    """Revoke the key KEY_ID (see `flask api-keys list`): its next request gets 401."""
    try:
        revoked = revoke_api_key(key_id)
    except LookupError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"revoked API key {key_id}" if revoked else f"API key {key_id} was already revoked")
