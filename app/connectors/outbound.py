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
from typing import Any, Literal

#: Wraps a transport (sync or async) in another that may refuse a request; None in production.
TransportWrapper = Callable[[Any], Any]

_wrapper: TransportWrapper | None = None


def install_transport_wrapper(wrapper: TransportWrapper | None) -> None:
    """Put ``wrapper`` in front of the transport of every SDK client built from now on (None: remove)."""
    global _wrapper  # noqa: PLW0603 (one process-wide switch, set by the test kit only)
    _wrapper = wrapper


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


__all__ = ["genai_client_args", "install_transport_wrapper", "sdk_http_client"]


def plain_http_transport() -> dict[str, Any]:
    """``transport=`` for an ``httpx2.Client`` of our own (an HTTP service): ``{}`` unless guarded."""
    if _wrapper is None:
        return {}
    import httpx2

    return {"transport": _wrapper(httpx2.HTTPTransport())}
