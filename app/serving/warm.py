"""Warm workers: import the SDKs of the configured services before the first request.

The services import their SDKs on first use, so that ``flask`` commands and
``/livez`` never pay for them; under gunicorn that first use is a user's
request, which then waits for the imports (openai about 1.6 s, google-genai
about 1.8 s). gunicorn's hooks call :func:`import_sdks` in the master when the
app is preloaded (importing is fork-safe: a module holds no socket; clients
are built per process, never here), and :func:`warm_worker` in each worker
before it takes requests: the imports again (free when the master did them),
then the LLM layer's own machinery, so that the first call in a new worker
costs what later calls do.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import platform
import time
from typing import Any, cast

from flask import Flask

from app.config import get_str

logger = logging.getLogger(__name__)

#: What every LLM call imports on first use, whichever the provider.
LLM_MACHINERY = (
    "app.llm.pipeline",
    "app.llm.resilience.executor",
    "app.llm.resilience.breaker",
    "app.llm.resilience.bulkhead",
    "app.llm.resilience.ratelimit",
    "app.connectors.redis_gate",
)
#: Service -> modules to import when it is configured (an SDK, then the layer's adapter for it).
SERVICE_MODULES: dict[str, tuple[str, ...]] = {
    "redis_service": ("redis",),
    "openai_service": ("openai", "app.llm.providers.openai_provider"),
    "genai_service": ("google.genai", "app.llm.providers.gemini_provider"),
    "anthropic_service": ("anthropic", "app.llm.providers.anthropic_provider"),
}


def configured_services(app: Flask) -> list[str]:
    """The services of ``app`` with at least one configured client."""
    names = []
    for key in SERVICE_MODULES:
        connector = app.extensions.get(key)
        if connector is not None and any(entry.get("configured") for entry in connector.info().values()):
            names.append(key)
    return names


def sdk_modules(app: Flask) -> list[str]:
    """The modules the configured services will import on their first use."""
    modules = [module for key in configured_services(app) for module in SERVICE_MODULES[key]]
    if any(key != "redis_service" for key in configured_services(app)):
        modules += LLM_MACHINERY
    # An optional SDK that is not installed is left to fail, as before, on its first use.
    return [m for m in modules if _installed(m)]


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


def import_sdks(app: Flask) -> list[str]:
    """Import the SDKs (and adapters) of the configured services; builds no client.

    The openai SDK's response models also build their pydantic schemas on the
    first answer they parse (about 10 ms): a sample of each answer the layer
    reads is parsed here, as the SDK parses one, so that no user's call pays it.
    """
    started = time.perf_counter()
    modules = sdk_modules(app)
    for module in modules:
        importlib.import_module(module)
    if "openai" in modules:
        _parse_openai_sample()
    logger.info("imported %s in %.2f s", ", ".join(modules) or "nothing", time.perf_counter() - started)
    return modules


#: An answer the OpenAI adapter reads, with every nested part it may hold.
_OPENAI_USAGE = {
    "prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2,
    "prompt_tokens_details": {"cached_tokens": 0}, "completion_tokens_details": {"reasoning_tokens": 0},
}  # fmt: skip
_OPENAI_CALL = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
_OPENAI_COMPLETION = {
    "id": "x", "object": "chat.completion", "created": 0, "model": "m", "usage": _OPENAI_USAGE,
    "choices": [{
        "index": 0, "finish_reason": "stop", "logprobs": None,
        "message": {"role": "assistant", "content": "hi", "tool_calls": [_OPENAI_CALL]},
    }],
}  # fmt: skip


def _parse_openai_sample() -> None:
    from openai.types.chat import ChatCompletion

    # The SDK's own lazy parse (openai's construct, as its responses use), not validation. Stream
    # chunks are read as JSON, unparsed (the OpenAI adapter's ``_create_stream``).
    cast(Any, ChatCompletion).construct(**_OPENAI_COMPLETION)


def warm_worker(app: Flask, *, on_loop: bool = False) -> dict[str, Any]:
    """In a worker, before its first request: the imports, the LLM clients, the layer's state.

    The LLM services' clients are built here (a worker is a process of its own:
    building is fork-safe there), with the modules they load on construction
    (the HTTP transport, TLS); with ``on_loop`` (gthread) the async clients too,
    on the worker's loop, which streams use. Then the layer's guards, pipeline
    and provider adapters, as the first call would build them. Redis and the
    database connect on first use, as before.
    """
    modules = import_sdks(app)
    # The SDKs' first request describes the platform in its headers (openai, anthropic: once per
    # process, cached), and platform.uname() asks `uname -p` in a subprocess: under gevent, a
    # thousand first requests at once would each fork one. Asked once here, it is cached.
    platform.processor()
    from app.llm import get_llm

    providers: list[str] = []
    with app.app_context():
        llm = get_llm()
        if any(key != "redis_service" for key in configured_services(app)):
            llm.guards  # noqa: B018 (built on first access)
            llm.pipeline  # noqa: B018
            for name in _configured_providers(app):
                llm.provider(name)
                providers.append(name)
            _load_model_catalogue(llm, providers, get_str(app.config, "LLM_DEFAULT_MODEL"))
        for build in _client_builders(app):
            build()
        if on_loop:
            from app.serving.background import run_on_loop

            run_on_loop(app, _build_async_clients, timeout=30)
    # One request through the app (routing, request and response objects, before_request hooks),
    # the first of which costs several times a later one.
    app.test_client().get("/livez")
    return {"modules": modules, "providers": providers}


def _load_model_catalogue(llm: Any, providers: list[str], default_model: str | None) -> None:
    """Load the model catalogue's data (genai-prices' snapshot: about 60 ms on a call's first answer).

    Every answer is priced from it; the first lookup loads the data every model shares.
    """
    catalogue = getattr(llm, "catalogue", None)
    if catalogue is None:
        return
    addresses = [default_model] if default_model else [f"{name}/warm-up" for name in providers[:1]]
    for address in addresses:
        provider, _, model = address.partition("/")
        catalogue.lookup(provider, model)


def _client_builders(app: Flask) -> list[Any]:
    """How to build each configured LLM client (sync), in an app context."""
    builders: list[Any] = []
    openai = app.extensions.get("openai_service")
    if openai is not None:
        builders += [
            (lambda name=name: openai.client(name))
            for name, entry in openai.info().items()
            if entry.get("configured")
        ]
    for key in ("genai_service", "anthropic_service"):
        connector = app.extensions.get(key)
        if connector is None or not _installed(SERVICE_MODULES[key][0]):
            continue
        if any(e.get("configured") for e in connector.info().values()):
            builders.append(connector.client)
    return builders


async def _build_async_clients(app: Flask) -> None:
    """The async clients of the running loop (streams under gthread read through them)."""
    openai = app.extensions.get("openai_service")
    if openai is not None:
        for name, entry in openai.info().items():
            if entry.get("configured"):
                openai.async_client(name)
    anthropic = app.extensions.get("anthropic_service")
    if anthropic is None or not _installed("anthropic"):
        return
    if any(e.get("configured") for e in anthropic.info().values()):
        anthropic.async_client()


def _configured_providers(app: Flask) -> list[str]:
    names = []
    openai = app.extensions.get("openai_service")
    if openai is not None:
        names += [
            "openai" if name == "default" else name
            for name, entry in openai.info().items()
            if entry.get("configured")
        ]
    for key, provider in (("genai_service", "gemini"), ("anthropic_service", "anthropic")):
        connector = app.extensions.get(key)
        configured = connector is not None and any(e.get("configured") for e in connector.info().values())
        if configured and _installed(SERVICE_MODULES[key][0]):
            names.append(provider)
    return names


__all__ = ["configured_services", "import_sdks", "sdk_modules", "warm_worker"]
