"""A small TCP fault proxy for tests: put it between a client and a real server.

::

    with FaultProxy(("127.0.0.1", redis_server.port)) as proxy:
        client = redis.Redis.from_url(proxy.url_for("redis", "/0"))
        proxy.blackhole()        # the next PING hangs until the client's timeout
        proxy.reset_after(10)    # 10 bytes of the reply, then a TCP RST
        proxy.refuse()           # new connections are refused (the port stays reserved)
        proxy.pass_through()     # listening again, on the same port

One fault is active at a time; switching is thread-safe. A fault applies to
new connections and, where it makes sense, to connections in progress:

* ``latency`` delays every chunk forwarded after the switch;
* ``blackhole`` swallows what either side sends from then on (a new
  connection is accepted but never connected upstream);
* ``reset_after(n)`` / ``close_after(n)`` count ``n`` response bytes from the
  switch (from the start, for new connections), then abort or close;
* ``refuse`` closes the listening socket only: connections in progress go on.
  Use :meth:`FaultProxy.drop_connections` to cut them too.

Threads: one acceptor while listening, two per connection (one per
direction), all daemon, all bounded by ``max_connections`` and all joined by
:meth:`FaultProxy.stop`. Blocking calls wait on sockets or events, never poll.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import select
import selectors
import socket
import struct
import termios
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

Direction = Literal["both", "upstream", "downstream"]

_PASS = "pass_through"
_LATENCY = "latency"
_BLACKHOLE = "blackhole"
_RESET = "reset_after"
_CLOSE = "close_after"
_REFUSE = "refuse"

_CHUNK = 65536


@dataclass(frozen=True)
class Fault:
    """The active fault: what it is, its parameters, and a generation number that changes on every switch."""

    kind: str = _PASS
    seconds: float = 0.0
    direction: Direction = "both"
    n_bytes: int = 0
    generation: int = 0

    def delays(self, direction: Literal["upstream", "downstream"]) -> float:
        if self.kind == _LATENCY and self.direction in ("both", direction):
            return self.seconds
        return 0.0


class _Connection:
    """One client connection and, unless black-holed, its upstream connection."""

    def __init__(self, proxy: FaultProxy, client: socket.socket, fault: Fault) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream: socket.socket | None = None
        self.closing = threading.Event()  # set when the connection is being torn down
        self._lock = threading.Lock()
        self._ending: str | None = None  # "reset" or "close" once decided
        self._alive = 1  # pumps still running: run() is the first
        self._sockets_closed = False
        # reset_after / close_after budgets count from the fault's switch.
        self._budget_generation = fault.generation
        self._budget_start = 0
        self.down_sent = 0

    # -- lifecycle -----------------------------------------------------------------

    def run(self, fault: Fault) -> None:
        """The connection's first thread: connects upstream, then pumps client → upstream."""
        try:
            if fault.kind == _BLACKHOLE:
                self._swallow()
                return
            try:
                self.upstream = socket.create_connection(
                    self.proxy.target, timeout=self.proxy.connect_timeout
                )
                self.upstream.settimeout(None)
                self.upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                self.abort(reset=True)  # the target is down: the client sees its connection reset
                return
            if self.closing.is_set():  # stopped while connecting
                return
            with self._lock:
                self._alive += 1
            self.proxy._spawn(self._pump_down, "faultproxy-down")
            self._pump_up()
        finally:
            self._pump_done()

    def _swallow(self) -> None:
        """Black hole: read what the client sends and drop it, until it closes or the proxy stops."""
        while not self.closing.is_set():
            try:
                data = self.client.recv(_CHUNK)
            except OSError:
                return
            if not data:
                return

    def abort(self, *, reset: bool) -> None:
        """Tear the connection down: with a TCP RST to the client, or a clean FIN close."""
        with self._lock:
            if self._ending is None:
                self._ending = "reset" if reset else "close"
        self.closing.set()
        # Wake the pumps without putting anything on the client's wire: SHUT_RD sends
        # nothing, so the final close() decides between FIN and RST.
        _shutdown(self.client, socket.SHUT_RD)
        if not reset:
            _shutdown(self.client, socket.SHUT_WR)  # the FIN, now, after every byte already sent
        if self.upstream is not None:
            _shutdown(self.upstream, socket.SHUT_RDWR)

    def force_wake(self) -> None:
        """Last resort on stop(): also wakes a pump blocked sending to a client that does not read."""
        self.closing.set()
        _shutdown(self.client, socket.SHUT_RDWR)
        if self.upstream is not None:
            _shutdown(self.upstream, socket.SHUT_RDWR)

    def _pump_done(self) -> None:
        with self._lock:
            self._alive -= 1
            if self._alive > 0 or self._sockets_closed:
                return
            self._sockets_closed = True
            ending = self._ending
        if ending == "reset":
            with contextlib.suppress(OSError):
                self.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        else:
            _drain(self.client)  # unread bytes at close() would turn the FIN into a RST
        self.client.close()
        if self.upstream is not None:
            self.upstream.close()
        self.proxy._forget(self)

    # -- pumps ---------------------------------------------------------------------

    def _pump_up(self) -> None:
        """Client → upstream."""
        assert self.upstream is not None
        while True:
            try:
                data = self.client.recv(_CHUNK)
            except OSError:
                self.abort(reset=False)
                return
            if self.closing.is_set():
                return
            if not data:  # the client half-closed: pass it on
                _shutdown(self.upstream, socket.SHUT_WR)
                return
            fault = self.proxy.fault
            if fault.kind == _BLACKHOLE:
                continue
            delay = fault.delays("upstream")
            if delay and self.closing.wait(delay):
                return
            try:
                self.upstream.sendall(data)
            except OSError:
                self.abort(reset=True)
                return
            self.proxy._count(up=len(data))

    def _pump_down(self) -> None:
        """Upstream → client, where the response faults apply."""
        assert self.upstream is not None
        try:
            while True:
                try:
                    data = self.upstream.recv(_CHUNK)
                except OSError:
                    self.abort(reset=True)
                    return
                if self.closing.is_set():
                    return
                if not data:  # the server closed or half-closed: pass it on
                    _shutdown(self.client, socket.SHUT_WR)
                    return
                fault = self.proxy.fault
                if fault.kind == _BLACKHOLE:
                    continue
                delay = fault.delays("downstream")
                if delay and self.closing.wait(delay):
                    return
                cut = False
                if fault.kind in (_RESET, _CLOSE):
                    if fault.generation != self._budget_generation:
                        self._budget_generation = fault.generation
                        self._budget_start = self.down_sent
                    left = max(fault.n_bytes - (self.down_sent - self._budget_start), 0)
                    if len(data) >= left:
                        data, cut = data[:left], True
                try:
                    if data:
                        self.client.sendall(data)
                except OSError:
                    self.abort(reset=True)
                    return
                self.down_sent += len(data)
                self.proxy._count(down=len(data))
                if cut:
                    if fault.kind == _RESET:
                        # A RST throws away what the kernel has not sent yet: let the n bytes out first.
                        self._wait_sent()
                    self.abort(reset=fault.kind == _RESET)
                    return
        finally:
            self._pump_done()

    def _wait_sent(self, timeout: float = 5.0) -> None:
        """Wait until the client has acknowledged every byte sent to it (Linux; elsewhere, do not wait).

        The kernel has no event for an empty send queue, so this polls it every few
        milliseconds: only on the way to a reset, bounded by ``timeout`` and by stop().
        """
        request = getattr(termios, "TIOCOUTQ", None)
        if request is None:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                (unsent,) = struct.unpack("i", fcntl.ioctl(self.client.fileno(), request, b"\0" * 4))
            except OSError:
                return
            if unsent <= 0 or self.closing.wait(0.002):
                return


def _shutdown(sock: socket.socket, how: int) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(how)


def _drain(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setblocking(False)
        for _ in range(64):
            if not sock.recv(_CHUNK):
                return


class FaultProxy:
    """A TCP proxy on 127.0.0.1 in front of ``target`` whose faults can be switched at run time."""

    def __init__(
        self,
        target: tuple[str, int],
        *,
        port: int = 0,
        max_connections: int = 64,
        connect_timeout: float = 5.0,
    ) -> None:
        self.target = target
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        self._port = port
        self._lock = threading.Lock()
        self._generations = itertools.count(1)
        self._fault = Fault()
        self._running = False
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._live: set[_Connection] = set()
        self._gone = threading.Condition(self._lock)
        self._threads: list[threading.Thread] = []
        self._connections = 0
        self._bytes_up = 0
        self._bytes_down = 0

    # -- addresses -----------------------------------------------------------------

    @property
    def port(self) -> int:
        if not self._port:
            raise RuntimeError("the proxy has no port before start()")
        return self._port

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def url_for(self, scheme: str, path: str = "") -> str:
        """``scheme://127.0.0.1:port`` + ``path``, e.g. ``url_for("redis", "/0")``."""
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    def rewrite_url(self, url: str) -> str:
        """``url`` with its host and port replaced by the proxy's; user, password, path and query kept."""
        parts = urlsplit(url)
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@127.0.0.1:{self.port}" if userinfo else f"127.0.0.1:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> FaultProxy:
        with self._lock:
            if self._running:
                return self
            self._running = True
            refusing = self._fault.kind == _REFUSE
        if not refusing:
            self._listen()
        elif not self._port:
            raise RuntimeError("start() while refuse() is active needs a port")
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop listening, cut every connection and join every thread of the proxy."""
        with self._lock:
            self._running = False
        self._unlisten()
        self.drop_connections(reset=False)
        with self._lock:
            self._gone.wait_for(lambda: not self._live, timeout / 2)
            stragglers = list(self._live)
        for connection in stragglers:
            connection.force_wake()
        with self._lock:
            self._gone.wait_for(lambda: not self._live, timeout / 2)
            threads, self._threads = self._threads, []
        for thread in threads:
            thread.join(timeout / 2)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def drop_connections(self, *, reset: bool = True) -> int:
        """Cut every connection in progress (RST, or FIN with ``reset=False``); returns how many."""
        with self._lock:
            live = list(self._live)
        for connection in live:
            connection.abort(reset=reset)
        return len(live)

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Whether every connection through the proxy has ended (waits for it, up to ``timeout``)."""
        with self._lock:
            return self._gone.wait_for(lambda: not self._live, timeout)

    # -- faults --------------------------------------------------------------------

    @property
    def fault(self) -> Fault:
        with self._lock:
            return self._fault

    def pass_through(self) -> None:
        """Forward everything untouched (the default); listens again after refuse()."""
        self._switch(Fault(_PASS))

    def latency(self, seconds: float, direction: Direction = "both") -> None:
        """Wait ``seconds`` before forwarding each chunk going ``direction``."""
        if seconds < 0 or direction not in ("both", "upstream", "downstream"):
            raise ValueError(f"bad latency: {seconds!r}, {direction!r}")
        self._switch(Fault(_LATENCY, seconds=seconds, direction=direction))

    def blackhole(self) -> None:
        """Accept, read what the client sends, never forward nor answer: the client's timeout fires."""
        self._switch(Fault(_BLACKHOLE))

    def reset_after(self, n_bytes: int) -> None:
        """Forward the first ``n_bytes`` of the response, then abort the client connection with a RST."""
        if n_bytes < 0:
            raise ValueError("n_bytes must be >= 0")
        self._switch(Fault(_RESET, n_bytes=n_bytes))

    def close_after(self, n_bytes: int) -> None:
        """Forward the first ``n_bytes`` of the response, then close the client connection (FIN)."""
        if n_bytes < 0:
            raise ValueError("n_bytes must be >= 0")
        self._switch(Fault(_CLOSE, n_bytes=n_bytes))

    def refuse(self) -> None:
        """Close the listening socket: new connections are refused until another fault is set."""
        self._switch(Fault(_REFUSE))

    def _switch(self, fault: Fault) -> None:
        with self._lock:
            self._fault = Fault(
                fault.kind, fault.seconds, fault.direction, fault.n_bytes, next(self._generations)
            )
            running = self._running
        if not running:
            return
        if fault.kind == _REFUSE:
            self._unlisten()
        else:
            self._listen()

    # -- counters ------------------------------------------------------------------

    @property
    def connections(self) -> int:
        """Connections accepted (including ones cut at once for exceeding ``max_connections``)."""
        with self._lock:
            return self._connections

    @property
    def active(self) -> int:
        """Connections in progress."""
        with self._lock:
            return len(self._live)

    @property
    def bytes_up(self) -> int:
        """Bytes forwarded from clients to the target."""
        with self._lock:
            return self._bytes_up

    @property
    def bytes_down(self) -> int:
        """Bytes forwarded from the target to clients."""
        with self._lock:
            return self._bytes_down

    def reset_stats(self) -> None:
        with self._lock:
            self._connections = self._bytes_up = self._bytes_down = 0

    def _count(self, up: int = 0, down: int = 0) -> None:
        with self._lock:
            self._bytes_up += up
            self._bytes_down += down

    def _forget(self, connection: _Connection) -> None:
        with self._lock:
            self._live.discard(connection)
            self._gone.notify_all()

    # -- listening -----------------------------------------------------------------

    def _listen(self) -> None:
        with self._lock:
            if self._listener is not None:
                return
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                listener.bind(("127.0.0.1", self._port))
                listener.listen(128)
            except OSError:
                listener.close()
                raise
            listener.setblocking(False)
            self._port = int(listener.getsockname()[1])
            self._wake_r, self._wake_w = socket.socketpair()
            self._listener = listener
            self._acceptor = threading.Thread(
                target=self._accept_loop,
                args=(listener, self._wake_r),
                name=f"faultproxy-accept-{self._port}",
                daemon=True,
            )
            self._acceptor.start()

    def _unlisten(self) -> None:
        with self._lock:
            listener, acceptor = self._listener, self._acceptor
            wake_r, wake_w = self._wake_r, self._wake_w
            self._listener = self._acceptor = self._wake_r = self._wake_w = None
        if listener is None or acceptor is None or wake_r is None or wake_w is None:
            return
        wake_w.send(b"x")
        acceptor.join()
        # Closing the listener refuses connections still waiting in its backlog.
        listener.close()
        wake_r.close()
        wake_w.close()

    def _accept_loop(self, listener: socket.socket, wake: socket.socket) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(listener, selectors.EVENT_READ)
            selector.register(wake, selectors.EVENT_READ)
            while True:
                events = selector.select()
                if any(key.fileobj is wake for key, _ in events):
                    return
                try:
                    client, _ = listener.accept()
                except BlockingIOError:  # the pending connection went away
                    continue
                except OSError:  # out of descriptors, say: wait a little rather than spin
                    if select.select([wake], [], [], 0.05)[0]:
                        return
                    continue
                self._admit(client)

    def _admit(self, client: socket.socket) -> None:
        client.setblocking(True)
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self._connections += 1
            fault = self._fault
            full = len(self._live) >= self.max_connections
            connection = None if full else _Connection(self, client, fault)
            if connection is not None:
                self._live.add(connection)
        if connection is None:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()
            return
        self._spawn(lambda: connection.run(fault), "faultproxy-up")

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=f"{name}-{self._port}", daemon=True)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        thread.start()
