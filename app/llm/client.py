"""The one interface views call: ``get_llm().chat(messages, model="provider/model")``.

:class:`LLM` validates the call once (messages, tools, tool choice), resolves
the provider from the model's prefix, and hands a :class:`ChatRequest` to that
provider's adapter. Adapters, and the SDKs behind them, are imported on first
use of their provider, and use the services' clients
(``get_openai_client(profile)``, ``get_genai_client()``), so they inherit
their laziness, fork safety and reset.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING, Any, TypedDict, TypeVar, Unpack

from flask import Flask, current_app

from app.config import get_bool, get_str
from app.connectors._base import register
from app.connectors.anthropic_connector import AnthropicConnector, parse_anthropic_settings
from app.errors import ConfigError, ServiceNotConfiguredError, UnknownProfileError
from app.llm import params
from app.llm.catalogue import Catalogue, ModelInfo, parse_overrides
from app.llm.errors import LLMBadRequestError, LLMContextLengthError, LLMError, LLMNotConfiguredError
from app.llm.hooks import CallKind, CallLogHook, HookChain, LLMCall, LLMHook, load_hooks
from app.llm.providers.base import ChatRequest, EmbedRequest, Provider, is_json_mode, per_call_key
from app.llm.resilience.settings import ResilienceSettings, parse_resilience_settings
from app.llm.resilience.steps import Flow, Step, run_async, run_sync
from app.llm.streaming import AsyncChatStream, ChatStream
from app.llm.structured import check_response_format
from app.llm.tools import normalise_tool_choice, normalise_tools
from app.llm.types import ChatResponse, normalise_messages
from app.redaction import masking, scrub_exception

if TYPE_CHECKING:
    from redis import Redis

    from app.connectors.redis_gate import RedisGate
    from app.llm.media import ImageResponse, MediaCalls
    from app.llm.ollama import OllamaManager
    from app.llm.pipeline import Build, Pipeline
    from app.llm.resilience.executor import Guards
    from app.llm.tools_runner import RunResponse

logger = logging.getLogger(__name__)

EXTENSION_KEY = "llm"
T = TypeVar("T")
OPENAI_PROVIDER = "openai"  # addresses the "default" OpenAI profile


class CallOptions(TypedDict, total=False):
    """The keywords of ``chat``, ``achat``, ``chat_stream`` and ``achat_stream``.

    The generation parameters are validated by :mod:`app.llm.params` and sent in each
    provider's own form (README, "Parameters, usage and the model catalogue").
    """

    temperature: float | None
    max_tokens: int | None
    tools: Sequence[Any] | None
    tool_choice: Any
    #: A pydantic model class, a JSON schema dict, or ``{"type": "json_object"}`` (JSON mode).
    response_format: Any
    #: Who is calling: sent to providers that take it (OpenAI ``user``), and seen by hooks.
    user: str | None
    #: Whose account the call is on: seen by hooks (cache scope, usage, budgets), never sent.
    tenant: str | None
    fallbacks: Sequence[str] | None
    top_p: float | None
    top_k: int | None
    #: A stop sequence, or a list of them.
    stop: str | Sequence[str] | None
    seed: int | None
    presence_penalty: float | None
    frequency_penalty: float | None
    #: ``minimal``, ``low``, ``medium`` or ``high``.
    reasoning_effort: str | None
    #: Tokens the model may spend thinking (Anthropic, Gemini).
    thinking_budget: int | None
    #: Gemini safety settings: ``{category: threshold}`` or ``[{"category", "threshold"}]``.
    safety: Mapping[str, str] | Sequence[Mapping[str, str]] | None
    #: Merged into the provider's request body, for anything provider-specific.
    extra: Mapping[str, Any] | None
    #: The caller's own provider key for this call (bring your own key), over the profile's pool.
    api_key: str | None
    #: The response cache for this call: False (skip it), True, or seconds to keep the answer
    #: (None: LLM_POLICY's ``cache`` entry, else on with LLM_CACHE_TTL when LLM_CACHE is set).
    cache: bool | float | None


_CALL_OPTIONS = frozenset(CallOptions.__annotations__)


def _is_list(value: object) -> bool:
    """A sequence of items, not a string (of characters) nor bytes."""
    return isinstance(value, Sequence) and not isinstance(value, str | bytes | bytearray)


def split_model(model: str, *, setting: str = "model") -> tuple[str, str]:
    """``"openrouter/meta-llama/llama-3-70b"`` -> ``("openrouter", "meta-llama/llama-3-70b")``."""
    if not isinstance(model, str):
        raise LLMBadRequestError(
            f"{setting} must be 'provider/model', a string, got {type(model).__name__}", field=setting
        )
    provider, sep, name = model.partition("/")
    if not sep or not provider or not name:
        raise LLMBadRequestError(
            f"{setting} must be 'provider/model' (e.g. 'openai/gpt-4o-mini'), got {model!r}", field=setting
        )
    return provider, name


class LLM:
    """One app's LLM layer: provider resolution and the calls."""

    def __init__(
        self,
        app: Flask,
        default_model: str | None,
        resilience: ResilienceSettings,
        hooks: Sequence[LLMHook] = (),
        catalogue: Catalogue | None = None,
        *,
        drop_unsupported: bool = False,
    ) -> None:
        self._app = weakref.ref(app)
        self.default_model = default_model
        self.resilience = resilience
        self.hooks = HookChain(hooks)
        self._guards: Guards | None = None
        self._redis_gate: RedisGate | None = None
        self._pipeline: Pipeline | None = None
        self._providers: dict[str, Provider] = {}
        self._custom: dict[str, Callable[[str], Provider]] = {}
        self._lock = threading.Lock()
        #: Context windows, maximum outputs, capabilities and prices (app.llm.catalogue).
        self.catalogue = catalogue if catalogue is not None else Catalogue()
        #: LLM_DROP_UNSUPPORTED: drop a parameter a provider cannot take instead of refusing the call.
        self.drop_unsupported = drop_unsupported
        self._dropped: set[tuple[str, str]] = set()

    @property
    def guards(self) -> Guards:
        """The resilience state (breakers, rate limits, bulkheads), built on the first call.

        Built lazily so that start-up imports none of it: an app whose first
        request is /livez should not pay for the machinery of LLM calls.
        """
        guards = self._guards
        if guards is None:
            gate = self.redis_gate
            with self._lock:
                if self._guards is None:
                    self._guards = _build_guards(self.resilience, gate)
                guards = self._guards
        return guards

    @property
    def redis_gate(self) -> RedisGate:
        """The app's one Redis gate (app.connectors.redis_gate): breakers, rate limits, the response
        cache and the JSON helpers use Redis through it, so they fail open together."""
        gate = self._redis_gate
        if gate is None:
            with self._lock:
                if self._redis_gate is None:
                    app = self._app()
                    assert app is not None
                    self._redis_gate = _build_gate(app)
                gate = self._redis_gate
        return gate

    @property
    def pipeline(self) -> Pipeline:
        """The call flows (hooks, fallbacks, policy); imported on the first call, like the guards."""
        pipeline = self._pipeline
        if pipeline is None:
            from app.llm.pipeline import Pipeline

            pipeline = self._pipeline = Pipeline(
                self.hooks, lambda: self.guards, self._typed_for, self.catalogue.cost
            )
        return pipeline

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
        return self.builtin_adapter(name)

    def builtin_adapter(self, name: str) -> Provider:
        """A new built-in adapter for ``name``, whatever is registered over it (the test kit wraps it)."""
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
        self, messages: Any, model: str | None, options: Mapping[str, Any]
    ) -> tuple[Provider, ChatRequest]:
        """The validated request of one model of the chain (``options``: the call's keywords)."""
        address = model or self.default_model
        if not address:
            raise LLMBadRequestError("no model given and LLM_DEFAULT_MODEL is not set", field="model")
        provider_name, model_name = split_model(address)
        try:
            normalised = normalise_messages(messages)
            tools = options.get("tools")
            specs = normalise_tools(tools) if tools else []
            tool_choice = options.get("tool_choice")
            choice = normalise_tool_choice(tool_choice, specs) if tool_choice is not None else None
            response_format = options.get("response_format")
            if response_format is not None and not is_json_mode(response_format):
                check_response_format(response_format)
            parameters = params.validate(options)
            api_key = per_call_key(options.get("api_key"))
            provider = self.provider(provider_name)
            request = ChatRequest(
                provider=provider_name,
                model=model_name,
                messages=normalised,
                tools=specs,
                tool_choice=choice,
                response_format=response_format,
                user=options.get("user"),
                api_key=api_key,
                **parameters,
            )
            request = self._supported(provider, request)
            provider.check(request)
            if api_key is not None:
                provider.check_api_key(request)
            self._check_model_limits(request)
        except LLMBadRequestError as exc:  # the layer's own checks: add provider and model
            raise LLMBadRequestError(
                exc.message, field=exc.field, provider=provider_name, model=model_name
            ) from None
        return provider, request

    def _supported(self, provider: Provider, request: ChatRequest) -> ChatRequest:
        """With ``LLM_DROP_UNSUPPORTED``, ``request`` without what ``provider`` cannot send.

        Otherwise unchanged: the provider's ``check()`` refuses those parameters by name.
        """
        unsupported = provider.unsupported_in(request) if self.drop_unsupported else ()
        if not unsupported:
            return request
        for name in unsupported:
            if (provider.name, name) not in self._dropped:  # one line per provider and parameter
                self._dropped.add((provider.name, name))
                logger.warning(
                    "LLM_DROP_UNSUPPORTED: %s is not supported by provider %r and is dropped from its calls",
                    name,
                    provider.name,
                )
        dropped: dict[str, Any] = dict.fromkeys(unsupported)
        return replace(request, **dropped)

    def _check_model_limits(self, request: ChatRequest) -> None:
        """``max_tokens`` within the model's maximum output, when the catalogue knows it."""
        if request.max_tokens is None:
            return
        info = self.catalogue.lookup(request.provider, request.model)
        limit = info.max_output_tokens if info is not None else None
        if limit is not None and request.max_tokens > limit:
            raise LLMBadRequestError(
                f"max_tokens {request.max_tokens} is above the maximum output of"
                f" {request.provider}/{request.model} ({limit} tokens)",
                field="max_tokens",
            )

    def _fits(self, provider: Provider, request: ChatRequest) -> tuple[Provider, ChatRequest]:
        """A fallback model whose context window is smaller than the request's estimate is skipped.

        Raises LLMContextLengthError, which the chain records as that model's attempt and
        passes over; the estimate is the rate limiter's (prompt text / 4) plus ``max_tokens``.
        """
        info = self.catalogue.lookup(request.provider, request.model)
        if info is None or info.context_window is None:
            return provider, request
        from app.llm.resilience.ratelimit import DEFAULT_ANSWER_TOKENS, estimate_tokens

        budget = request.max_tokens if request.max_tokens is not None else DEFAULT_ANSWER_TOKENS
        needed = estimate_tokens(request) - budget + (request.max_tokens or 0)
        if needed > info.context_window:
            raise LLMContextLengthError(
                f"skipped: the request needs about {needed} tokens, more than the"
                f" {info.context_window}-token context window of {request.provider}/{request.model}",
                **request.context(),
            )
        return provider, request

    def model_info(self, address: str) -> ModelInfo:
        """What the catalogue knows of ``"provider/model"`` (context window, maximum output,
        capabilities, prices per million tokens); :class:`UnknownModelError` when nothing."""
        split_model(address)
        return self.catalogue.info(address)

    def _typed_for(
        self, provider: Provider, request: ChatRequest | EmbedRequest
    ) -> Callable[[BaseException], LLMError]:
        """What turns an exception of this call into its typed error (its context built only then)."""
        if request.api_key is not None:
            return partial(self._map_keyed_error, provider, request.context, request.api_key.reveal())
        return partial(self._map_error, provider, request.context)

    @classmethod
    def _map_keyed_error(
        cls, provider: Provider, context_of: Callable[[], dict[str, Any]], key: str, exc: BaseException
    ) -> LLMError:
        """As :meth:`_map_error`, with the call's own key masked wherever the error and its chain
        would show it (a provider may echo the key it refused)."""
        with masking(key):
            if isinstance(exc, LLMError):
                scrub_exception(exc)
                return exc
            return cls._map_error(provider, context_of, exc)

    @staticmethod
    def _map_error(
        provider: Provider, context_of: Callable[[], dict[str, Any]], exc: BaseException
    ) -> LLMError:
        if isinstance(exc, LLMError):
            return exc
        context = context_of()
        if isinstance(exc, ServiceNotConfiguredError):
            return LLMNotConfiguredError(str(exc), setting=exc.setting, **context)
        if isinstance(exc, UnknownProfileError):
            return LLMNotConfiguredError(str(exc), setting="OPENAI_PROFILES", **context)
        return provider.map_error(exc, context)

    def _chain(self, model: str | None, fallbacks: Sequence[str] | None) -> list[str]:
        address = model or self.default_model
        if not address:
            raise LLMBadRequestError("no model given and LLM_DEFAULT_MODEL is not set", field="model")
        split_model(address)  # a string of the right form, before it is looked up or named anywhere
        extra = fallbacks if fallbacks is not None else self.resilience.fallbacks.get(address, ())
        if not extra:
            return [address]
        if not _is_list(extra) or not all(isinstance(name, str) for name in extra):
            raise LLMBadRequestError("fallbacks must be a list of 'provider/model' names", field="fallbacks")
        return list(dict.fromkeys([address, *extra]))  # each model at most once

    def _prepare(
        self, kind: CallKind, is_async: bool, messages: Any, model: str | None, options: CallOptions
    ) -> tuple[LLMCall, list[str], Build]:
        """Validate the call (the primary model's request, now) and describe it for the hooks."""
        if options and not _CALL_OPTIONS.issuperset(options):
            unknown = ", ".join(sorted(options.keys() - _CALL_OPTIONS))
            raise TypeError(f"unexpected keyword argument(s): {unknown}")
        chain = self._chain(model, options.get("fallbacks"))
        first = self._request(messages, chain[0], options)

        def build(address: str) -> tuple[Provider, ChatRequest]:
            # The primary's request is built once; a fallback's only when it is needed.
            if address == chain[0]:
                return first
            return self._fits(*_own_key_stays(first[1], *self._request(messages, address, options)))

        request = first[1]
        cache = options.get("cache")
        call = LLMCall(
            kind,
            request.provider,
            request.model,
            request,
            request.user,
            options.get("tenant"),
            is_async,
            cache if cache is None else _cache_option(cache, request),
        )
        return call, chain, build

    # --- the API -----------------------------------------------------------
    #
    # Each method describes the call and runs one flow of self.pipeline (hooks ->
    # fallback chain -> the policy of self.guards) with the sync or async driver.

    def add_hook(self, hook: LLMHook) -> None:
        """Call ``hook`` around every call of this app (see :mod:`app.llm.hooks`)."""
        self.hooks.add(hook)

    def remove_hook(self, hook: LLMHook) -> None:
        self.hooks.remove(hook)

    def chat(self, messages: Any, model: str | None = None, **options: Unpack[CallOptions]) -> ChatResponse:
        """One answer: ``temperature``, ``max_tokens``, ``tools``, ``tool_choice``, ``response_format``,
        ``user``, ``tenant``, ``fallbacks`` and the generation parameters (see :class:`CallOptions`)."""
        call, chain, build = self._prepare("chat", False, messages, model, options)
        return run_sync(_masked(call, self.pipeline.chat(call, chain, build)))

    async def achat(
        self, messages: Any, model: str | None = None, **options: Unpack[CallOptions]
    ) -> ChatResponse:
        call, chain, build = self._prepare("chat", True, messages, model, options)
        return await run_async(_masked(call, self.pipeline.chat(call, chain, build)))

    def chat_stream(
        self, messages: Any, model: str | None = None, **options: Unpack[CallOptions]
    ) -> ChatStream:
        """Open a stream now (retries and fallbacks happen here, before any text is returned)."""
        call, chain, build = self._prepare("stream", False, messages, model, options)
        relay = run_sync(_masked(call, self.pipeline.open_stream(call, chain, build)))
        return ChatStream(relay.accumulator.request, call.attempts, relay)

    def achat_stream(
        self, messages: Any, model: str | None = None, **options: Unpack[CallOptions]
    ) -> AsyncChatStream:
        """Validated now; opened by the same flow as :meth:`chat_stream`, on its first read."""
        call, chain, build = self._prepare("stream", True, messages, model, options)
        request = call.request
        assert isinstance(request, ChatRequest)
        return AsyncChatStream(
            request, call.attempts, lambda: _masked(call, self.pipeline.open_stream(call, chain, build))
        )

    def run(
        self,
        messages: Any,
        model: str | None = None,
        *,
        tools: Sequence[Callable[..., Any]],
        max_rounds: int = 5,
        **options: Any,
    ) -> RunResponse:
        """Ask the model, run the tools it calls, and loop until it answers (at most ``max_rounds``
        model calls): the final answer with ``messages`` (the transcript) and the usage of every
        round. Each round is a ``chat()`` with ``options`` (see :mod:`app.llm.tools_runner`)."""
        from app.llm.tools_runner import check_max_rounds, check_sync_run, prepare_tools, tool_loop

        prepared, rounds = prepare_tools(tools), check_max_rounds(max_rounds)
        check_sync_run(prepared)
        return run_sync(tool_loop(self, messages, model, prepared, rounds, options))

    async def arun(
        self,
        messages: Any,
        model: str | None = None,
        *,
        tools: Sequence[Callable[..., Any]],
        max_rounds: int = 5,
        **options: Any,
    ) -> RunResponse:
        """:meth:`run` on the event loop: async tools awaited, sync ones run in a worker thread."""
        from app.llm.tools_runner import check_max_rounds, prepare_tools, tool_loop

        prepared, rounds = prepare_tools(tools), check_max_rounds(max_rounds)
        return await run_async(tool_loop(self, messages, model, prepared, rounds, options))

    def embed(
        self,
        inputs: Sequence[str],
        model: str | None = None,
        *,
        user: str | None = None,
        tenant: str | None = None,
        api_key: str | None = None,
        cache: bool | float | None = None,
    ) -> list[list[float]]:
        call, build = self._prepare_embed(inputs, model, user, tenant, api_key, is_async=False, cache=cache)
        return run_sync(_masked(call, self.pipeline.embed(call, build))).vectors

    async def aembed(
        self,
        inputs: Sequence[str],
        model: str | None = None,
        *,
        user: str | None = None,
        tenant: str | None = None,
        api_key: str | None = None,
        cache: bool | float | None = None,
    ) -> list[list[float]]:
        call, build = self._prepare_embed(inputs, model, user, tenant, api_key, is_async=True, cache=cache)
        return (await run_async(_masked(call, self.pipeline.embed(call, build)))).vectors

    def _prepare_embed(
        self,
        inputs: Sequence[str],
        model: str | None,
        user: str | None,
        tenant: str | None,
        api_key: str | None = None,
        *,
        is_async: bool,
        cache: bool | float | None = None,
    ) -> tuple[LLMCall, Build]:
        address = model or self.default_model
        if not address:
            raise LLMBadRequestError("no model given and LLM_DEFAULT_MODEL is not set", field="model")
        provider_name, model_name = split_model(address)
        if not _is_list(inputs) or not inputs or not all(isinstance(i, str) for i in inputs):
            raise LLMBadRequestError(
                "inputs must be a non-empty list of strings",
                field="inputs",
                provider=provider_name,
                model=model_name,
            )
        try:
            key = per_call_key(api_key)
            provider = self.provider(provider_name)
            request = EmbedRequest(provider_name, model_name, list(inputs), api_key=key)
            if key is not None:
                provider.check_api_key(request)
        except LLMBadRequestError as exc:  # the layer's own checks: add provider and model
            raise LLMBadRequestError(
                exc.message, field=exc.field, provider=provider_name, model=model_name
            ) from None
        first = provider, request
        if cache is not None:
            cache = _cache_option(cache, first[1])
        call = LLMCall("embed", provider_name, model_name, first[1], user, tenant, is_async, cache)
        return call, lambda _address: first

    def list_models(self, provider: str) -> list[str]:
        adapter = self.provider(provider)
        try:
            return adapter.list_models()
        except Exception as exc:
            error = self._map_error(adapter, lambda: {"provider": provider, "model": None}, exc)
            if error.__cause__ is None:  # keep a redacted cause the adapter's mapping already set
                error.__cause__ = exc
            raise error from error.__cause__

    # --- media (app.llm.media): images at once, video as a job (app.jobs) ----------

    @property
    def media(self) -> MediaCalls:
        """The media calls of this app, on the same pipeline (built on first use)."""
        media = self.__dict__.get("_media")
        if media is None:
            from app.llm.media import MediaCalls

            app = self._app()
            prices = app.config.get("LLM_MEDIA_PRICES") if app is not None else None
            media = self.__dict__["_media"] = MediaCalls(self, prices)
        return media

    def generate_image(self, prompt: str, model: str | None = None, **options: Any) -> ImageResponse:
        """Images now: ``n``, ``size`` or ``aspect_ratio``, ``negative_prompt``, ``seed``, ``user``,
        ``tenant``."""
        return self.media.generate_image(prompt, model or self.default_model, **options)

    def generate_video(self, prompt: str | None = None, model: str | None = None, **options: Any) -> str:
        """Always a job (app.jobs): its id. ``image``, ``duration_seconds``, ``aspect_ratio``,
        ``resolution``, ``negative_prompt``, ``seed``, ``user``, ``tenant``."""
        from app.jobs import create_video_job

        return str(create_video_job(prompt, model or self.default_model, **options).id)

    @property
    def ollama(self) -> OllamaManager:
        """Ollama's native API at ``OLLAMA_HOST``: is_available, list/has/pull/ensure models."""
        from app.llm.ollama import OllamaManager

        app = self._app()
        assert app is not None
        return OllamaManager.for_app(app)


def _cache_option(value: Any, request: ChatRequest | EmbedRequest) -> bool | float:
    """A call's ``cache=``, checked like its other keywords (a 400 naming ``cache``)."""
    from app.llm.cache.settings import check_cache_option

    try:
        checked = check_cache_option(value)
    except LLMBadRequestError as exc:
        raise LLMBadRequestError(exc.message, field="cache", **request.context()) from None
    assert checked is not None
    return checked


def _own_key_stays(
    primary: ChatRequest, provider: Provider, request: ChatRequest
) -> tuple[Provider, ChatRequest]:
    """A caller's own key goes only to the provider it was given for: a fallback model of another
    provider is skipped (shown in ``attempts``), never sent that key nor the platform's instead."""
    if request.api_key is not None and request.provider != primary.provider:
        raise LLMBadRequestError(
            f"skipped: the call's own api_key is for provider {primary.provider!r}",
            field="api_key",
            **request.context(),
        )
    return provider, request


def _masked(call: LLMCall, flow: Flow[T]) -> Flow[T]:
    """``flow``, with each of its steps run with the call's own key masked (when it has one).

    A per-call key is not registered process-wide (there may be one per tenant), so what
    the SDKs log while they send it (an upstream that echoes it in a header, at DEBUG)
    is masked by :func:`app.redaction.masking`, set around each step in the caller's
    context; errors are masked where they are mapped (:meth:`LLM._map_keyed_error`).
    """
    key = call.request.api_key
    if key is None:
        return flow
    return _masking_steps(flow, key.reveal())


def _masking_steps(flow: Flow[T], key: str) -> Flow[T]:
    try:
        step = next(flow)
        while True:
            try:
                result = yield Step(
                    partial(_masked_sync, key, step.sync), partial(_masked_async, key, step.async_)
                )
            except BaseException as exc:  # the flow decides, as the drivers let it
                step = flow.throw(exc)
            else:
                step = flow.send(result)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]


def _masked_sync(key: str, run: Callable[[], T]) -> T:
    with masking(key):
        return run()


async def _masked_async(key: str, run: Callable[[], Awaitable[T]]) -> T:
    with masking(key):
        return await run()


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
    hooks: list[LLMHook] = [CallLogHook()] if get_bool(app.config, "LLM_CALL_LOG") else []
    cache = _cache_hook(app)  # first to decide: a hit makes no request and asks no other hook
    hooks += [cache] if cache is not None else []
    hooks += load_hooks(_hook_paths(app.config.get("LLM_HOOKS")))
    app.extensions[EXTENSION_KEY] = LLM(
        app,
        default_model,
        parse_resilience_settings(app.config),
        hooks,
        Catalogue(parse_overrides(app.config.get("LLM_MODELS"))),
        drop_unsupported=get_bool(app.config, "LLM_DROP_UNSUPPORTED"),
    )
    from app.llm.usage import install  # last: ledger and budgets see a call no hook answered (a cache hit)

    install(app, app.extensions[EXTENSION_KEY])


def _cache_hook(app: Flask) -> LLMHook | None:
    """The response cache of LLM_CACHE (app.llm.cache), or None when it is unset; checked now."""
    from app.llm.cache.settings import parse_cache_settings

    settings = parse_cache_settings(app.config, app.instance_path)
    if settings is None:
        return None
    from app.llm.cache.wiring import response_cache

    return response_cache(app, settings)


def _hook_paths(value: Any) -> list[str]:
    """``LLM_HOOKS``: a list of ``"module:attribute"``, or a comma-separated string (from the environment)."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    if isinstance(value, list | tuple) and all(isinstance(part, str) for part in value):
        return list(value)
    raise ConfigError(f"LLM_HOOKS must be a list of 'module:attribute' strings, got {type(value).__name__}")


def _build_guards(settings: ResilienceSettings, gate: RedisGate) -> Guards:
    """The app's resilience state: breakers and rate limits in Redis when REDIS_URL is set."""
    from app.llm.resilience.breaker import CircuitBreakers
    from app.llm.resilience.bulkhead import Bulkheads
    from app.llm.resilience.executor import Guards
    from app.llm.resilience.ratelimit import RateLimiter

    return Guards(settings, CircuitBreakers(gate), RateLimiter(gate), Bulkheads())


def _build_gate(app: Flask) -> RedisGate:
    """The app's Redis gate, on the Redis connector's client (one per app: its users fail open together)."""
    from app.connectors.redis_connector import EXTENSION_KEY as REDIS_KEY
    from app.connectors.redis_connector import RedisConnector
    from app.connectors.redis_gate import RedisGate

    app_ref = weakref.ref(app)

    def redis_connector() -> RedisConnector | None:
        target = app_ref()
        connector = target.extensions.get(REDIS_KEY) if target is not None else None
        return connector if isinstance(connector, RedisConnector) and connector.configured else None

    def redis_client() -> Redis | None:
        connector = redis_connector()
        return connector.client() if connector is not None else None

    return RedisGate(redis_client)


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
