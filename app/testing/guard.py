"""The real-call guard: while tests run, no SDK client may reach past this machine.

It sits in front of the HTTP transport of every SDK client the services build
(:mod:`app.connectors.outbound`), so it sees each request before a connection
is opened. A request to a host that is not loopback is refused at once with
:class:`RealCallBlocked`, which names the guard and how to allow a real call;
the refusal is also remembered, so the plugin fails the test even when the
app turned the error into a 502. Loopback stays allowed, for local servers.
"""

from __future__ import annotations

import ipaddress
import threading
from typing import Any

HOW_TO_ALLOW = "mark the test @pytest.mark.allow_real_llm, or run pytest --allow-real-llm"


class RealCallBlocked(ConnectionError):
    """A request to a non-loopback address, refused by the test kit's real-call guard."""

    def __init__(self, method: str, host: str, path: str) -> None:
        super().__init__(
            f"the test kit's real-call guard refused {method} {host}{path}: a test may only reach"
            f" loopback (127.0.0.1, ::1, localhost); to allow a real provider call, {HOW_TO_ALLOW}"
        )
        self.host = host


def is_loopback(host: str) -> bool:
    """Whether ``host`` is this machine's loopback (no name resolution: a name is taken at its word)."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class RealCallGuard:
    """Decides, and remembers what it refused (thread-safe)."""

    def __init__(self) -> None:
        self.allowed = False
        self.refused: list[str] = []
        self._lock = threading.Lock()

    def check(self, method: str, host: str, path: str) -> None:
        if self.allowed or is_loopback(host):
            return
        error = RealCallBlocked(method, host, path)
        with self._lock:
            self.refused.append(str(error))
        raise error

    def take_refused(self) -> list[str]:
        """What was refused since the last call (the plugin reports it after each test)."""
        with self._lock:
            refused, self.refused = self.refused, []
        return refused

    def wrap(self, transport: Any) -> Any:
        """``transport`` (an httpx2 sync or async transport) behind this guard."""
        import httpx2

        guard = self
        if isinstance(transport, httpx2.AsyncBaseTransport):

            class AsyncGuarded(httpx2.AsyncBaseTransport):
                async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
                    guard.check(request.method, request.url.host, request.url.path)
                    response: httpx2.Response = await transport.handle_async_request(request)
                    return response

                async def aclose(self) -> None:
                    await transport.aclose()

            return AsyncGuarded()

        class Guarded(httpx2.BaseTransport):
            def handle_request(self, request: httpx2.Request) -> httpx2.Response:
                guard.check(request.method, request.url.host, request.url.path)
                response: httpx2.Response = transport.handle_request(request)
                return response

            def close(self) -> None:
                transport.close()

        return Guarded()


__all__ = ["HOW_TO_ALLOW", "RealCallBlocked", "RealCallGuard", "is_loopback"]
