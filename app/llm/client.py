"""The one interface views call: ``get_llm().chat(messages, model="provider/model")``.

:class:`LLM` validates the call once (messages, tools, tool choice), resolves
the provider from the model's prefix, and hands a :class:`ChatRequest` to that
provider's adapter. Adapters, and the SDKs behind them, are imported on first
use of their provider, and use the services' clients
(``get_openai_client(profile)``, ``get_genai_client()``), so they inherit
their laziness, fork safety and reset.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from flask import Flask, current_app

from app.config import get_str
from app.connectors._base import register
from app.connectors.anthropic_connector import AnthropicConnector, parse_anthropic_settings
from app.errors import ConfigError, ServiceNotConfiguredError, UnknownProfileError
from app.llm.errors import LLMBadRequestError, LLMError, LLMNotConfiguredError
from app.llm.providers.base import ChatRequest, EmbedRequest, Provider, StreamEvent
from app.llm.resilience.settings import ResilienceSettings, parse_resilience_settings
from app.llm.streaming import AsyncChatStream, ChatStream
from app.llm.structured import is_response_format, parse_structured
from app.llm.tools import normalise_tool_choice, normalise_tools
from app.llm.types import ChatResponse, normalise_messages

if TYPE_CHECKING:
    from redis import Redis

    from app.llm.ollama import OllamaManager
    from app.llm.resilience.executor import Attempt, Guards

EXTENSION_KEY = "llm"
OPENAI_PROVIDER = "openai"  # addresses the "default" OpenAI profile


def split_model(model: str, *, setting: str = "model") -> tuple[str, str]:
    """``"openrouter/meta-llama/llama-3-70b"`` -> ``("openrouter", "meta-llama/llama-3-70b")``."""
    provider, sep, name = model.partition("/")
    if not sep or not provider or not name:
        raise LLMBadRequestError(
            f"{setting} must be 'provider/model' (e.g. 'openai/gpt-4o-mini'), got {model!r}"
        )
    return provider, name


class LLM:
    """One app's LLM layer: provider resolution and the calls."""

    def __init__(self, app: Flask, default_model: str | None, resilience: ResilienceSettings) -> None:
        self._app = weakref.ref(app)
        self.default_model = default_model
        self.resilience = resilience
        self._guards: Guards | None = None
        self._providers: dict[str, Provider] = {}
        self._custom: dict[str, Callable[[str], Provider]] = {}
        self._lock = threading.Lock()

    @property
    def guards(self) -> Guards:
        """The resilience state (breakers, rate limits, bulkheads), built on the first call.

        Built lazily so that start-up imports none of it: an app whose first
        request is /livez should not pay for the machinery of LLM calls.
        """
        guards = self._guards
        if guards is None:
            with self._lock:
                if self._guards is None:
                    app = self._app()
                    assert app is not None
                    self._guards = _build_guards(app, self.resilience)
                guards = self._guards
        return guards

    # --- providers ---------------------------------------------------------

    def register_provider(self, name: str, factory: Callable[[str], Provider] | Provider) -> None:
        """Address another provider as ``name/model`` (``app.llm.testing`` registers ``fake``)."""
        with self._lock:
            self._custom[name] = (
                factory
                if callable(factory) and not isinstance(factory, Provider)
                else (
                    lambda _name, p=factory: p  # type: ignore[misc]
                )
            )
            self._providers.pop(name, None)

    def provider_names(self) -> list[str]:
        """Every provider this app can address (configured or not)."""
        app = self._app()
        profiles = (
            app.extensions["openai_service"].profiles if app and "openai_service" in app.extensions else {}
        )
        names = {
            OPENAI_PROVIDER,
            *(p for p in profiles if p != "default"),
            "gemini",
            "anthropic",
            *self._custom,
        }
        return sorted(names)

    def provider(self, name: str) -> Provider:
        provider = self._providers.get(name)
        if provider is not None:
            return provider
        with self._lock:
            if name not in self._providers:
                self._providers[name] = self._make_provider(name)
            return self._providers[name]

    def _make_provider(self, name: str) -> Provider:
        if name in self._custom:
            return self._custom[name](name)
        if name == "gemini":
            from app.llm.providers.gemini_provider import GeminiProvider

            return GeminiProvider(name)
        if name == "anthropic":
            from app.llm.providers.anthropic_provider import AnthropicProvider

            return AnthropicProvider(name)
        app = self._app()
        profiles = (
            app.extensions["openai_service"].profiles if app and "openai_service" in app.extensions else {}
        )
        if name == OPENAI_PROVIDER or (name in profiles and name != "default"):
            from app.llm.providers.openai_provider import OpenAIProvider

            return OpenAIProvider(name, profile="default" if name == OPENAI_PROVIDER else name)
        raise LLMNotConfiguredError(
            f"unknown provider {name!r}; known providers: {', '.join(self.provider_names())}"
            " (OpenAI-compatible ones come from OPENAI_PROFILES)",
            provider=name,
            setting="OPENAI_PROFILES",
        )

    # --- requests ----------------------------------------------------------

    def _request(
        self,
        messages: Any,
        model: str | None,
        temperature: float | None,
        max_tokens: int | None,
        tools: Sequence[Any] | None,
        tool_choice: Any,
        response_format: Any,
        user: str | None,
    ) -> tuple[Provider, ChatRequest]:
        address = model or self.default_model
        if not address:
            raise LLMBadRequestError("no model given and LLM_DEFAULT_MODEL is not set")
        provider_name, model_name = split_model(address)
        try:
            normalised = normalise_messages(messages)
            specs = normalise_tools(tools) if tools else []
            choice = normalise_tool_choice(tool_choice, specs) if tool_choice is not None else None
        except LLMBadRequestError as exc:
            raise LLMBadRequestError(exc.message, provider=provider_name, model=model_name) from None
        if response_format is not None and not is_response_format(response_format):
            raise LLMBadRequestError(
                "response_format must be a pydantic model class or a JSON schema dict",
                provider=provider_name,
                model=model_name,
            )
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
            raise LLMBadRequestError(
                f"max_tokens must be a positive integer, got {max_tokens!r}",
                provider=provider_name,
                model=model_name,
            )
        provider = self.provider(provider_name)
        request = ChatRequest(
            provider=provider_name,
            model=model_name,
            messages=normalised,
            temperature=temperature,
            max_tokens=max_tokens,
            tools=specs,
            tool_choice=choice,
            response_format=response_format,
            user=user,
        )
        return provider, request

    @staticmethod
    def _typed(provider: Provider, exc: BaseException, context: dict[str, Any]) -> LLMError:
        if isinstance(exc, LLMError):
            return exc
        if isinstance(exc, ServiceNotConfiguredError):
            return LLMNotConfiguredError(str(exc), setting=exc.setting, **context)
        if isinstance(exc, UnknownProfileError):
            return LLMNotConfiguredError(str(exc), setting="OPENAI_PROFILES", **context)
        return provider.map_error(exc, context)

    def _finish(self, request: ChatRequest, response: ChatResponse, started: float) -> ChatResponse:
        response.latency_ms = (time.perf_counter() - started) * 1000
        if request.response_format is not None and not response.tool_calls and response.parsed is None:
            response.parsed = parse_structured(request.response_format, response.content, **request.context())
        return response

    # --- the API -----------------------------------------------------------
    #
    # Every call runs through self.guards (rate limit -> deadline -> retry ->
    # breaker -> attempt), once per model of its fallback chain.

    def _chain(self, model: str | None, fallbacks: Sequence[str] | None) -> list[str]:
        address = model or self.default_model
        if not address:
            raise LLMBadRequestError("no model given and LLM_DEFAULT_MODEL is not set")
        extra = fallbacks if fallbacks is not None else self.resilience.fallbacks.get(address, ())
        if not extra:
            return [address]
        if isinstance(extra, str):
            raise LLMBadRequestError("fallbacks must be a list of 'provider/model' names")
        return list(dict.fromkeys([address, *extra]))  # each model at most once

    def _mapper(
        self, provider: Provider, request: ChatRequest | EmbedRequest
    ) -> Callable[[BaseException], LLMError]:
        """What the policy calls to turn an exception of this call into its typed error."""
        return lambda exc: self._typed(provider, exc, request.context())

    @staticmethod
    def _skip_fallback(
        index: int,
        chain: list[str],
        address: str,
        unusable: LLMError,
        last_error: LLMError | None,
        attempts: list[Attempt],
    ) -> None:
        """A fallback model that cannot be called (unknown or unconfigured provider).

        The primary's own invalid request is the caller's error and is raised;
        a fallback that cannot be used is skipped (and shown in ``attempts``),
        and when it was the last hope, the previous model's error is raised.
        """
        if index == 0 or last_error is None:
            raise unusable
        from app.llm.resilience.executor import Attempt

        attempts.append(Attempt(address, type(unusable).__name__, 0.0))
        if index + 1 == len(chain):
            raise last_error

    def chat(
        self,
        messages: Any,
        model: str | None = None,
        *,
        temperature: float | None = None,
        max_tokens: int | None = None,
        tools: Sequence[Any] | None = None,
        tool_choice: Any = None,
        response_format: Any = None,
        user: str | None = None,
        fallbacks: Sequence[str] | None = None,
    ) -> ChatResponse:
        chain = self._chain(model, fallbacks)
        attempts: list[Attempt] = []
        started = time.perf_counter()
        guards = self.guards
        last_error: LLMError | None = None
        for index, address in enumerate(chain):
            try:
                provider, request = self._request(
                    messages, address, temperature, max_tokens, tools, tool_choice, response_format, user
                )
            except LLMError as unusable:
                self._skip_fallback(index, chain, address, unusable, last_error, attempts)
                continue
            try:
                response: ChatResponse = guards.call(
                    request,
                    provider.chat,
                    self._mapper(provider, request),
                    usage=_response_tokens,
                    attempts=attempts,
                )
            except LLMError as error:
                error.attempts = attempts  # type: ignore[attr-defined]
                if index + 1 < len(chain) and guards.falls_back(error):
                    last_error = error
                    continue
                raise
            response.attempts = attempts
            return self._finish(request, response, started)
        raise AssertionError("unreachable: the chain is never empty")

    def chat_stream(
        self,
        messages: Any,
        model: str | None = None,
        *,
        temperature: float | None = None,
        max_tokens: int | None = None,
        tools: Sequence[Any] | None = None,
        tool_choice: Any = None,
        response_format: Any = None,
        user: str | None = None,
        fallbacks: Sequence[str] | None = None,
    ) -> ChatStream:
        """Open a stream (retries and fallbacks happen here, before any text is returned)."""
        chain = self._chain(model, fallbacks)
        attempts: list[Attempt] = []
        last_error: LLMError | None = None
        for index, address in enumerate(chain):
            try:
                provider, request = self._request(
                    messages, address, temperature, max_tokens, tools, tool_choice, response_format, user
                )
            except LLMError as unusable:
                self._skip_fallback(index, chain, address, unusable, last_error, attempts)
                continue
            context = request.context()

            def typed(exc: BaseException, p: Provider = provider, c: dict[str, Any] = context) -> LLMError:
                return self._typed(p, exc, c)

            try:
                events = self.guards.stream(request, provider.stream, typed, attempts=attempts)
            except LLMError as error:
                error.attempts = attempts  # type: ignore[attr-defined]
                if index + 1 < len(chain) and self.guards.falls_back(error):
                    last_error = error
                    continue
                raise
            return ChatStream(request, events, typed, attempts=attempts)
        raise AssertionError("unreachable: the chain is never empty")

    def embed(self, inputs: Sequence[str], model: str | None = None) -> list[list[float]]:
        provider, request = self._embed_request(inputs, model)
        result: list[list[float]] = self.guards.call(
            request,
            provider.embed,
            self._mapper(provider, request),
            usage=lambda _vectors: None,
            attempts=[],
            tokens=lambda: sum(len(text) for text in request.inputs) // 4 + 1,
        )
        return result

    async def achat(
        self,
        messages: Any,
        model: str | None = None,
        *,
        temperature: float | None = None,
        max_tokens: int | None = None,
        tools: Sequence[Any] | None = None,
        tool_choice: Any = None,
        response_format: Any = None,
        user: str | None = None,
        fallbacks: Sequence[str] | None = None,
    ) -> ChatResponse:
        chain = self._chain(model, fallbacks)
        attempts: list[Attempt] = []
        started = time.perf_counter()
        last_error: LLMError | None = None
        for index, address in enumerate(chain):
            try:
                provider, request = self._request(
                    messages, address, temperature, max_tokens, tools, tool_choice, response_format, user
                )
            except LLMError as unusable:
                self._skip_fallback(index, chain, address, unusable, last_error, attempts)
                continue
            try:
                response: ChatResponse = await self.guards.acall(
                    request,
                    provider.achat,
                    self._mapper(provider, request),
                    usage=_response_tokens,
                    attempts=attempts,
                )
            except LLMError as error:
                error.attempts = attempts  # type: ignore[attr-defined]
                if index + 1 < len(chain) and self.guards.falls_back(error):
                    last_error = error
                    continue
                raise
            response.attempts = attempts
            return self._finish(request, response, started)
        raise AssertionError("unreachable: the chain is never empty")

    def achat_stream(
        self,
        messages: Any,
        model: str | None = None,
        *,
        temperature: float | None = None,
        max_tokens: int | None = None,
        tools: Sequence[Any] | None = None,
        tool_choice: Any = None,
        response_format: Any = None,
        user: str | None = None,
        fallbacks: Sequence[str] | None = None,
    ) -> AsyncChatStream:
        chain = self._chain(model, fallbacks)

        def build(address: str) -> tuple[Provider, ChatRequest]:
            return self._request(
                messages, address, temperature, max_tokens, tools, tool_choice, response_format, user
            )

        attempts: list[Attempt] = []
        first_provider, first_request = build(chain[0])  # the caller's own request: validated now
        stream = AsyncChatStream(
            first_request,
            self._afallback_events(chain, build, (first_provider, first_request), attempts, lambda: stream),
            lambda exc: self._typed(first_provider, exc, first_request.context()),
            attempts=attempts,
        )
        return stream

    async def _afallback_events(
        self,
        chain: list[str],
        build: Callable[[str], tuple[Provider, ChatRequest]],
        first: tuple[Provider, ChatRequest],
        attempts: list[Attempt],
        stream: Callable[[], AsyncChatStream],
    ) -> AsyncIterator[StreamEvent]:
        last_error: LLMError | None = None
        for index, address in enumerate(chain):
            if index == 0:
                provider, request = first
            else:
                try:
                    provider, request = build(address)  # a fallback is prepared only when needed
                except LLMError as unusable:
                    self._skip_fallback(index, chain, address, unusable, last_error, attempts)
                    continue
            context = request.context()

            def typed(exc: BaseException, p: Provider = provider, c: dict[str, Any] = context) -> LLMError:
                return self._typed(p, exc, c)

            events = self.guards.astream(request, provider.astream, typed, attempts=attempts)
            try:
                first_event = await anext(events, None)
            except LLMError as error:
                await events.aclose()
                error.attempts = attempts  # type: ignore[attr-defined]
                if index + 1 < len(chain) and self.guards.falls_back(error):
                    last_error = error
                    continue
                raise
            stream().retarget(request)  # the answer comes from this model
            try:
                if first_event is not None:
                    yield first_event
                    async for event in events:
                        yield event
            finally:
                await events.aclose()
            return

    async def aembed(self, inputs: Sequence[str], model: str | None = None) -> list[list[float]]:
        provider, request = self._embed_request(inputs, model)
        result: list[list[float]] = await self.guards.acall(
            request,
            provider.aembed,
            self._mapper(provider, request),
            usage=lambda _vectors: None,
            attempts=[],
            tokens=lambda: sum(len(text) for text in request.inputs) // 4 + 1,
        )
        return result

    def _embed_request(self, inputs: Sequence[str], model: str | None) -> tuple[Provider, EmbedRequest]:
        address = model or self.default_model
        if not address:
            raise LLMBadRequestError("no model given and LLM_DEFAULT_MODEL is not set")
        provider_name, model_name = split_model(address)
        if isinstance(inputs, str) or not inputs or not all(isinstance(i, str) for i in inputs):
            raise LLMBadRequestError(
                "inputs must be a non-empty list of strings", provider=provider_name, model=model_name
            )
        return self.provider(provider_name), EmbedRequest(provider_name, model_name, list(inputs))

    def list_models(self, provider: str) -> list[str]:
        adapter = self.provider(provider)
        try:
            return adapter.list_models()
        except Exception as exc:
            raise self._typed(adapter, exc, {"provider": provider, "model": None}) from exc

    @property
    def ollama(self) -> OllamaManager:
        """Ollama's native API at ``OLLAMA_HOST``: is_available, list/has/pull/ensure models."""
        from app.llm.ollama import OllamaManager

        app = self._app()
        assert app is not None
        return OllamaManager.for_app(app)


def _response_tokens(response: ChatResponse) -> int | None:
    if response.total_tokens is not None:
        return response.total_tokens
    if response.input_tokens is not None and response.output_tokens is not None:
        return response.input_tokens + response.output_tokens
    return None


def init_app(app: Flask) -> None:
    """Validate the LLM settings and register the layer (and the Anthropic client service)."""
    default_model = get_str(app.config, "LLM_DEFAULT_MODEL")
    if default_model is not None:
        try:
            split_model(default_model, setting="LLM_DEFAULT_MODEL")
        except LLMBadRequestError as exc:
            raise ConfigError(exc.message) from None
    host = get_str(app.config, "OLLAMA_HOST")
    if host is not None and not host.startswith(("http://", "https://")):
        raise ConfigError(f"OLLAMA_HOST must be an http:// or https:// URL, got {host!r}")
    if "anthropic_service" not in app.extensions:
        register(app, AnthropicConnector(parse_anthropic_settings(app.config)))
    if EXTENSION_KEY in app.extensions:
        raise RuntimeError(f"app.llm.init_app() was already called on app {app.name!r}")
    app.extensions[EXTENSION_KEY] = LLM(app, default_model, parse_resilience_settings(app.config))


def _build_guards(app: Flask, settings: ResilienceSettings) -> Guards:
    """The app's resilience state: breakers and rate limits in Redis when REDIS_URL is set."""
    from app.connectors.redis_connector import EXTENSION_KEY as REDIS_KEY
    from app.connectors.redis_connector import RedisConnector
    from app.llm.resilience.breaker import CircuitBreakers
    from app.llm.resilience.bulkhead import Bulkheads
    from app.llm.resilience.executor import Guards
    from app.llm.resilience.ratelimit import RateLimiter

    app_ref = weakref.ref(app)

    def redis_connector() -> RedisConnector | None:
        target = app_ref()
        connector = target.extensions.get(REDIS_KEY) if target is not None else None
        return connector if isinstance(connector, RedisConnector) and connector.configured else None

    def redis_client() -> Redis | None:
        connector = redis_connector()
        return connector.client() if connector is not None else None

    def redis_url() -> str | None:
        connector = redis_connector()
        url = connector.settings.url if connector is not None else None
        return url.reveal() if url is not None else None

    return Guards(settings, CircuitBreakers(redis_client), RateLimiter(redis_url), Bulkheads())


def get_llm() -> LLM:
    """The current app's LLM layer."""
    try:
        extensions: Mapping[str, Any] = current_app.extensions
    except RuntimeError:
        raise RuntimeError(
            "get_llm() needs an application context: call it inside a view or a `flask` command,"
            " or wrap the call in `with app.app_context():`"
        ) from None
    llm = extensions.get(EXTENSION_KEY)
    if not isinstance(llm, LLM):
        raise RuntimeError("get_llm(): the LLM layer is not registered; call app.llm.init_app(app)")
    return llm
