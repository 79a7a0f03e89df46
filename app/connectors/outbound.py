"""Where every SDK client's HTTP transport is built, so that a guard can sit in front of it.

In production nothing is installed and the SDKs build their transports as they
always do (these functions answer ``{}``). The test kit's real-call guard
(:mod:`app.testing.guard`) installs a wrapper here before any client is built:
each connector then gives its SDK an HTTP client whose transport asks the
guard first, which is the SDKs' documented way in (``http_client=`` for openai
and anthropic, ``HttpOptions.client_args`` for google-genai), not a patch of
their internals.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, Protocol


class OutboundGuard(Protocol):
    """What the test kit installs: a check of each request, and a transport wrapper that applies it."""

    def check(self, method: str, host: str, path: str) -> None: ...

    def wrap(self, transport: Any) -> Any: ...


_guard: OutboundGuard | None = None
#: Wraps a transport (sync or async) in another that asks the guard first; None in production.
_wrapper: Callable[[Any], Any] | None = None


def install_guard(guard: OutboundGuard | None) -> None:
    """Put ``guard`` in front of every SDK client built from now on (None: remove it)."""
    global _guard, _wrapper
    _guard, _wrapper = guard, (guard.wrap if guard is not None else None)


def check_request(method: str, host: str, path: str) -> None:
    """For clients that are not httpx-based (Ollama's ``http.client``): ask the guard, if any."""
    if _guard is not None:
        _guard.check(method, host, path)


def sdk_http_client(sdk: Literal["openai", "anthropic"], *, asynchronous: bool = False) -> dict[str, Any]:
    """``http_client=`` for an openai or anthropic client: ``{}`` unless a wrapper is installed."""
    if _wrapper is None:
        return {}
    import httpx2

    module: Any
    if sdk == "openai":
        import openai as module
    else:
        import anthropic as module
    if asynchronous:
        return {
            "http_client": module.DefaultAsyncHttpxClient(transport=_wrapper(httpx2.AsyncHTTPTransport()))
        }
    return {"http_client": module.DefaultHttpxClient(transport=_wrapper(httpx2.HTTPTransport()))}


def genai_client_args() -> dict[str, Any]:
    """``HttpOptions`` fields for google-genai: ``{}`` unless a wrapper is installed."""
    if _wrapper is None:
        return {}
    import httpx2

    return {
        "client_args": {"transport": _wrapper(httpx2.HTTPTransport())},
        "async_client_args": {"transport": _wrapper(httpx2.AsyncHTTPTransport())},
    }


__all__ = [
    "OutboundGuard",
    "check_request",
    "genai_client_args",
    "install_guard",
    "plain_http_transport",
    "sdk_http_client",
]


def plain_http_transport() -> dict[str, Any]:
    """``transport=`` for an ``httpx2.Client`` of our own (an HTTP service): ``{}`` unless guarded."""
    if _wrapper is None:
        return {}
    import httpx2

    return {"transport": _wrapper(httpx2.HTTPTransport())}
