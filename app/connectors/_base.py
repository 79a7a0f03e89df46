"""The contract every connector shares: one client per app and per process.

:class:`LazyClient` builds its client on first use, under a lock so that
concurrent first calls build exactly one, and forgets it in a forked child.
Forgetting is not closing: the child keeps a reference to the parent's client
(:data:`_inherited`) so that no finaliser ever shuts down a socket the parent
still uses, and builds a fresh client of its own on first use. The openai,
google-genai and httpx clients do nothing about ``os.fork()`` themselves; this
is the same move SQLAlchemy recommends for engines (``dispose(close=False)``).
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any, Generic, Protocol, TypeVar, cast

from flask import Flask, current_app

ClientT = TypeVar("ClientT")
ConnectorT = TypeVar("ConnectorT", bound="Connector")

logger = logging.getLogger(__name__)

#: Clients a forked child inherited from its parent: held, never used, never closed.
_inherited: list[object] = []
_live_slots: weakref.WeakSet[LazyClient[Any]] = weakref.WeakSet()


class LazyClient(Generic[ClientT]):
    """At most one client, built on first :meth:`get`, per process."""

    __slots__ = ("__weakref__", "_build", "_client", "_close", "_lock")

    def __init__(self, build: Callable[[], ClientT], close: Callable[[ClientT], None]) -> None:
        self._build = build
        self._close = close
        self._lock = threading.Lock()
        self._client: ClientT | None = None
        _live_slots.add(self)

    def get(self) -> ClientT:
        client = self._client
        if client is not None:  # the hot path: one attribute read
            return client
        with self._lock:
            if self._client is None:
                self._client = self._build()
            return self._client

    @property
    def built(self) -> bool:
        """Whether this process has built the client."""
        return self._client is not None

    def peek(self) -> ClientT | None:
        return self._client

    def reset(self) -> None:
        """Close the client's connections and forget it; the next get() builds anew."""
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            try:
                self._close(client)
            except Exception:  # closing is best effort; a dead peer must not break a reset
                logger.warning("closing a %s failed", type(client).__name__, exc_info=True)

    def _forget_after_fork(self) -> None:
        # The parent may have held the lock while forking; the child has a fresh one.
        self._lock = threading.Lock()
        if self._client is not None:
            keep_inherited(self._client)
            self._client = None


class AsyncClosable(Protocol):
    async def close(self) -> None: ...


AsyncClientT = TypeVar("AsyncClientT", bound=AsyncClosable)


class LoopBoundClients(Generic[AsyncClientT]):
    """Async clients, one per event loop (keyed weakly by loop), built on first use in each.

    An async SDK client's connection pool belongs to the loop that opened its
    connections; Flask runs each async view in a loop of its own, and a
    client shared across loops ends in "Event loop is closed". A client asked
    for outside any loop is kept apart and closed with ``asyncio.run``.
    """

    def __init__(self, build: Callable[[], AsyncClientT]) -> None:
        self._build = build
        self._lock = threading.Lock()
        self._by_loop: weakref.WeakKeyDictionary[Any, AsyncClientT] = weakref.WeakKeyDictionary()
        self._outside_loop: AsyncClientT | None = None
        _live_loop_clients.add(self)

    def get(self) -> AsyncClientT:
        import asyncio  # only async callers pay for it

        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        with self._lock:
            client = self._outside_loop if loop is None else self._by_loop.get(loop)
            if client is None:
                client = self._build()
                if loop is None:
                    self._outside_loop = client
                else:
                    self._by_loop[loop] = client
            return client

    @property
    def built(self) -> bool:
        return self._outside_loop is not None or len(self._by_loop) > 0

    def reset(self) -> None:
        """Close every client (in its own loop where that loop still runs) and forget them."""
        import asyncio

        with self._lock:
            clients = list(self._by_loop.items())
            self._by_loop.clear()
            outside, self._outside_loop = self._outside_loop, None
        for loop, client in clients:
            if loop.is_closed():
                continue  # its transports died with the loop
            try:
                if loop.is_running():
                    loop.call_soon_threadsafe(_schedule_close, loop, client)
                else:
                    loop.run_until_complete(client.close())
            except Exception:  # closing is best effort; a dead peer must not break a reset
                logger.warning("closing a %s failed", type(client).__name__, exc_info=True)
        if outside is not None:
            try:
                asyncio.run(outside.close())
            except Exception:
                logger.warning("closing a %s failed", type(outside).__name__, exc_info=True)

    def _forget_after_fork(self) -> None:
        self._lock = threading.Lock()
        inherited = [c for c in (*self._by_loop.values(), self._outside_loop) if c is not None]
        if inherited:
            keep_inherited(inherited)
        self._by_loop = weakref.WeakKeyDictionary()
        self._outside_loop = None


def _schedule_close(loop: Any, client: AsyncClosable) -> None:
    loop.create_task(client.close())


_live_loop_clients: weakref.WeakSet[LoopBoundClients[Any]] = weakref.WeakSet()


def keep_inherited(client: object) -> None:
    """Hold a client inherited across a fork so that it is never finalised in the child."""
    _inherited.append(client)


def _after_fork_in_child() -> None:
    for slot in list(_live_slots):
        slot._forget_after_fork()
    for clients in list(_live_loop_clients):
        clients._forget_after_fork()
    for callback in list(_fork_callbacks):
        callback()


_fork_callbacks: list[Callable[[], None]] = []


def on_fork_in_child(callback: Callable[[], None]) -> None:
    """Run ``callback`` in every forked child, after the clients are forgotten."""
    _fork_callbacks.append(callback)


os.register_at_fork(after_in_child=_after_fork_in_child)


class Connector(ABC):
    """One service's settings and clients for one app."""

    #: The key in ``app.extensions`` and the name used in messages and health output.
    extension_key: str
    #: How users reach it, for error messages: ``get_redis_client()``.
    accessor: str

    @abstractmethod
    def reset(self) -> None:
        """Close and forget every client this connector built in this process."""

    @abstractmethod
    def info(self) -> dict[str, Any]:
        """What operators may see: configured, endpoint (redacted), timeouts, built."""

    def reconfigure(self, config: Mapping[str, Any]) -> None:  # noqa: B027 - optional hook
        """Validate ``config`` again so that the next client is built from it (before a reset)."""


SettingsT = TypeVar("SettingsT")


class SingleClientConnector(Connector, Generic[SettingsT, ClientT]):
    """A connector with one client, built lazily from one settings object.

    Subclasses say how settings are parsed from config and how the client is
    built and closed; this class holds them and the :class:`LazyClient`.
    """

    def __init__(self, settings: SettingsT) -> None:
        self.settings = settings
        self._client: LazyClient[ClientT] = LazyClient(self._build, self.close_client)

    def _build(self) -> ClientT:
        return self.build_client(self.settings)  # the settings of the moment, after a reconfigure

    @staticmethod
    @abstractmethod
    def parse_settings(config: Mapping[str, Any]) -> SettingsT:
        """Validate the service's keys in ``config``."""

    @staticmethod
    @abstractmethod
    def build_client(settings: SettingsT) -> ClientT:
        """Build the client (importing its SDK)."""

    @staticmethod
    @abstractmethod
    def close_client(client: ClientT) -> None:
        """Close the client's connections."""

    def reconfigure(self, config: Mapping[str, Any]) -> None:
        self.settings = self.parse_settings(config)

    def client(self) -> ClientT:
        return self._client.get()

    @property
    def built(self) -> bool:
        return self._client.built

    def reset(self) -> None:
        self._client.reset()


def register(app: Flask, connector: Connector) -> None:
    """Attach ``connector`` to ``app``; a second registration is a mistake worth a clear error."""
    key = connector.extension_key
    if key in app.extensions:
        raise RuntimeError(
            f"{key}.init_app() was already called on app {app.name!r};"
            " each service is initialised once per app"
        )
    app.extensions[key] = connector


def current_connector(key: str, accessor: str, kind: type[ConnectorT]) -> ConnectorT:
    """The connector registered under ``key`` on ``current_app``, with errors that say what to do."""
    try:
        extensions = current_app.extensions
    except RuntimeError:
        raise RuntimeError(
            f"{accessor} needs an application context: call it inside a view or a"
            " `flask` command, or wrap the call in `with app.app_context():`"
        ) from None
    try:
        connector = extensions[key]
    except KeyError:
        raise RuntimeError(
            f"{accessor}: {key} is not registered on app {current_app.name!r};"
            f" call app.services.init_services(app) or {key}.init_app(app)"
        ) from None
    return cast(ConnectorT, connector)  # registered by our own init_app, so of this kind


def reset_registered(key: str, app: Flask | None) -> None:
    """Reset the connector under ``key`` on ``app`` (default: the current app).

    The settings are read again from ``app.config`` first, so that the next
    client is built from the current config (a rotated key, a moved endpoint).
    """
    target = app if app is not None else current_app._get_current_object()  # type: ignore[attr-defined]
    connector = target.extensions.get(key)
    if isinstance(connector, Connector):
        connector.reconfigure(target.config)
        connector.reset()
