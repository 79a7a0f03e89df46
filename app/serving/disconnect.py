"""Noticing that a client went away while its request waits on an upstream.

WSGI gives an application no signal when its client disconnects: a server
finds out only when a write fails, and a request blocked on an upstream read
writes nothing. gunicorn exposes the client's socket as
``environ["gunicorn.socket"]``, so this module watches it. It is hand-written
because no library does this for WSGI (Flask, Werkzeug and gunicorn have no
disconnect hook; ASGI servers have one, for ASGI apps only).

- :func:`client_gone` asks once, without waiting: has the client closed its
  side (end of stream) or reset the connection? A request that waited in a
  queue is checked with it before any provider is asked.
- :func:`watch_client` calls ``on_gone`` (once) when the client closes while
  the request runs. Under gthread one thread per worker waits on an epoll set
  of every watched socket for ``EPOLLRDHUP`` (the peer's FIN) or a hang-up,
  which never fires for data a client sends ahead; under gevent a greenlet per
  request waits on a peek of the socket, which the hub wakes on the FIN.

``on_gone`` runs in the watcher's thread or greenlet: it must not block (the
stream cancels its producer, which closes the upstream, and wakes the response).
"""

from __future__ import annotations

import logging
import select
import socket
import threading
from collections.abc import Callable, Mapping
from contextlib import suppress
from typing import Any, Protocol

from app.connectors._base import on_fork_in_child
from app.serving.worker import gevent_patched

logger = logging.getLogger(__name__)


class Watch(Protocol):
    def stop(self) -> None:
        """Stop watching (idempotent); ``on_gone`` is not called after this returns."""


class _NoWatch:
    def stop(self) -> None:
        return None


def client_socket(environ: Mapping[str, Any]) -> socket.socket | None:
    """The client's socket, when the server exposes it (gunicorn does)."""
    sock = environ.get("gunicorn.socket")
    return sock if sock is not None and hasattr(sock, "fileno") else None


def client_gone(sock: socket.socket) -> bool:
    """Whether the client has closed or reset the connection (checked now, without waiting).

    Bytes waiting to be read (a pipelined request) mean the client is there.
    """
    try:
        poller = _stdlib_poll()()  # never waits (timeout 0), so gevent's need not schedule it
        poller.register(sock, select.POLLIN | _POLLRDHUP)
        events = poller.poll(0)
        if not events:
            return False
        mask = events[0][1]
        if mask & (select.POLLHUP | select.POLLERR | select.POLLNVAL | _POLLRDHUP):
            return True
        return sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):  # reset, or already closed
        return True


_POLLRDHUP = getattr(select, "POLLRDHUP", 0x2000)


def _stdlib_poll() -> Any:
    """``select.poll`` as the standard library has it (gevent's answers a zero timeout without looking)."""
    if gevent_patched():
        from gevent import monkey

        return monkey.get_original("select", "poll")
    return select.poll


def watch_client(sock: socket.socket | None, on_gone: Callable[[], None]) -> Watch:
    """Call ``on_gone`` once if the client goes away before :meth:`Watch.stop`."""
    if sock is None:
        return _NoWatch()
    if gevent_patched():
        return _GreenletWatch(sock, on_gone)
    watcher = _epoll_watcher()
    if watcher is None:  # no epoll (not Linux): heartbeats still find a gone client when they fail
        return _NoWatch()
    return watcher.watch(sock, on_gone)


# --- gevent: a greenlet per request ------------------------------------------------------


class _GreenletWatch:
    """A greenlet blocked on a peek of the client's socket: it returns b'' when the client closes."""

    def __init__(self, sock: socket.socket, on_gone: Callable[[], None]) -> None:
        import gevent

        self._on_gone = on_gone
        self._greenlet = gevent.spawn(self._wait, sock)

    def _wait(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(1, socket.MSG_PEEK)
        except OSError:
            data = b""
        if data == b"":
            _call(self._on_gone)
        # Bytes ahead (a pipelined request): the client is there, and its close can't be told apart.

    def stop(self) -> None:
        # Blocking: the greenlet must have left the socket before gunicorn reads from it again.
        self._greenlet.kill(block=True)


# --- gthread: one epoll thread per worker ---------------------------------------------------


class _EpollWatcher:
    """Every watched socket of this process in one epoll set, waited on by one daemon thread."""

    _MASK = getattr(select, "EPOLLRDHUP", 0x2000) | getattr(select, "EPOLLONESHOT", 1 << 30)

    def __init__(self) -> None:
        self._epoll = select.epoll()
        #: fd -> (its socket, its callback). An fd's number is reused once its socket closes.
        self._watched: dict[int, tuple[socket.socket, Callable[[], None]]] = {}
        self._lock = threading.Lock()
        threading.Thread(target=self._run, name="client-disconnect-watcher", daemon=True).start()

    def watch(self, sock: socket.socket, on_gone: Callable[[], None]) -> Watch:
        fd = sock.fileno()
        if fd < 0:
            _call(on_gone)
            return _NoWatch()
        with self._lock:
            self._watched[fd] = (sock, on_gone)
            try:
                self._epoll.register(fd, self._MASK)
            except FileExistsError:  # a closed socket's number, reused before it was unwatched
                self._epoll.modify(fd, self._MASK)
        return _EpollWatch(self, fd, on_gone)

    def unwatch(self, fd: int, on_gone: Callable[[], None]) -> None:
        with self._lock:
            entry = self._watched.get(fd)
            if entry is not None and entry[1] is on_gone:
                del self._watched[fd]
                with suppress(OSError):
                    self._epoll.unregister(fd)

    def _run(self) -> None:
        while True:
            try:
                events = self._epoll.poll()
            except InterruptedError:
                continue
            except (OSError, ValueError):  # closed: a forked child's copy
                return
            for fd, _mask in events:
                self._handle(fd)

    def _handle(self, fd: int) -> None:
        with self._lock:
            entry = self._watched.get(fd)
        if entry is None:
            return
        sock, callback = entry
        # The event may be an earlier socket's of the same number (it closed, and this one was
        # registered, after epoll reported it): call back only for a client that has really gone.
        gone = client_gone(sock)
        with self._lock:
            if self._watched.get(fd) is not entry:
                return
            if not gone:
                with suppress(OSError):
                    self._epoll.modify(fd, self._MASK)  # watch on (the mask is one-shot)
                return
            del self._watched[fd]
            with suppress(OSError):
                self._epoll.unregister(fd)
        _call(callback)


class _EpollWatch:
    __slots__ = ("_fd", "_on_gone", "_watcher")

    def __init__(self, watcher: _EpollWatcher, fd: int, on_gone: Callable[[], None]) -> None:
        self._watcher = watcher
        self._fd = fd
        self._on_gone = on_gone

    def stop(self) -> None:
        self._watcher.unwatch(self._fd, self._on_gone)


class _Holder:
    """This process's epoll watcher, started on first use (a forked child starts its own)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.watcher: _EpollWatcher | None = None


_held = _Holder()


def _epoll_watcher() -> _EpollWatcher | None:
    if not hasattr(select, "epoll"):
        return None
    watcher = _held.watcher
    if watcher is None:
        with _held.lock:
            if _held.watcher is None:
                _held.watcher = _EpollWatcher()
            watcher = _held.watcher
    return watcher


def _call(callback: Callable[[], None]) -> None:
    try:
        callback()
    except Exception:  # a watcher outlives any one request: log, never die
        logger.exception("a disconnect callback failed")


def _forget_after_fork() -> None:
    # The parent's watcher thread did not come along; its epoll set is the parent's.
    _held.__init__()  # type: ignore[misc]


on_fork_in_child(_forget_after_fork)

__all__ = ["Watch", "client_gone", "client_socket", "watch_client"]
