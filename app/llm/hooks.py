"""Hooks: the public extension point of every LLM call.

A hook sees each *logical* call once (not each attempt): before it, after it,
when it fails, and when a stream is closed early. The response cache, the
usage ledger, budgets, metrics and tracing are all hooks, so the call
pipeline has no special path for any of them.

Register one with ``get_llm().add_hook(hook)`` or list ``"module:attribute"``
paths in ``LLM_HOOKS`` (validated at start). Order: ``before_call`` runs in
registration order; ``after_call``, ``on_error`` and ``on_cancel`` run in
reverse order, as middleware unwinds.

**Async calls.** ``achat``, ``achat_stream`` and ``aembed`` call the ``a*``
twins (``abefore_call`` ...), which by default call the sync methods on the
event loop. A hook whose methods do blocking I/O (a database, Redis) must not
block the loop: override the ``a*`` twins (for example with
``await asyncio.to_thread(self.after_call, call, response)``), or hand the
work to a background thread or queue and return at once.
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

from app.errors import ConfigError
from app.llm.errors import LLMError
from app.llm.resilience.steps import Flow, Step

if TYPE_CHECKING:
    from app.llm.providers.base import ChatRequest, EmbedRequest
    from app.llm.types import ChatResponse

logger = logging.getLogger(__name__)
call_logger = logging.getLogger("app.llm.calls")

CallKind = Literal["chat", "stream", "embed", "image", "video"]  # image, video: app.llm.media


@dataclass
class EmbedResponse:
    """What an embeddings call answered, as hooks see it (``embed()`` returns ``vectors``)."""

    vectors: list[list[float]]
    provider: str
    model: str
    input_tokens: int | None = None
    cached: bool = False


class LLMCall:
    """One logical call as hooks see it; ``provider``/``model`` follow a fallback that answered.

    A plain slotted class rather than a dataclass: one is made per call, on the hot
    path, and its ``id`` and ``metadata`` are only built when something reads them.
    """

    __slots__ = (
        "_id",
        "_metadata",
        "attempts",
        "cache",
        "first_delta_at",
        "is_async",
        "kind",
        "model",
        "provider",
        "request",
        "started",
        "started_at",
        "tenant",
        "user",
    )

    def __init__(
        self,
        kind: CallKind,
        provider: str,
        model: str,
        request: ChatRequest | EmbedRequest,
        user: str | None = None,
        tenant: str | None = None,
        is_async: bool = False,
        cache: bool | float | None = None,
    ) -> None:
        self.kind = kind
        self.provider = provider
        self.model = model
        #: The normalised request of the model being asked (never logged: it holds the prompt).
        self.request = request
        self.user = user
        self.tenant = tenant
        self.is_async = is_async
        #: The call's ``cache=`` (False, True or seconds to keep the answer; None: the settings decide).
        self.cache = cache
        #: Wall-clock start, for records; ``started`` is ``perf_counter()``, for durations.
        self.started_at = time.time()
        self.started = time.perf_counter()
        #: ``perf_counter()`` when a stream's first event arrived.
        self.first_delta_at: float | None = None
        #: Every try behind this call (app.llm.resilience.Attempt), across retries and fallbacks.
        self.attempts: list[Any] = []
        self._id: str | None = None
        self._metadata: dict[str, Any] | None = None

    @property
    def id(self) -> str:
        """128 random bits in hex (as ``uuid4().hex``), made when first read."""
        if self._id is None:
            self._id = os.urandom(16).hex()
        return self._id

    @property
    def metadata(self) -> dict[str, Any]:
        """Free for hooks: what one hook's ``before_call`` leaves for its ``after_call``."""
        if self._metadata is None:
            self._metadata = {}
        return self._metadata

    @property
    def latency_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000

    @property
    def first_delta_ms(self) -> float | None:
        return None if self.first_delta_at is None else (self.first_delta_at - self.started) * 1000

    def __repr__(self) -> str:
        return (
            f"LLMCall(kind={self.kind!r}, provider={self.provider!r}, model={self.model!r},"
            f" user={self.user!r}, tenant={self.tenant!r}, id={self.id!r})"
        )


class LLMHook:
    """Base class: override what you need; every method is optional.

    ``before_call`` may return a response (``ChatResponse`` for chat and
    streams, ``EmbedResponse`` for embeddings): the call is then answered
    without any provider request, and a stream replays it as deltas. It may
    raise an ``LLMError`` to refuse the call. Any other exception a hook
    raises is logged (once a minute per hook) and never fails the call.
    """

    def before_call(self, call: LLMCall) -> ChatResponse | EmbedResponse | None:
        return None

    def after_call(self, call: LLMCall, response: ChatResponse | EmbedResponse) -> None:
        """The call was answered (by a provider, or by a hook's ``before_call``)."""

    def on_error(self, call: LLMCall, error: LLMError) -> None:
        """The call failed, after its retries and fallbacks (or a hook refused it)."""

    def on_cancel(self, call: LLMCall, partial: ChatResponse) -> None:
        """A stream closed after its first delta and before its end; ``partial`` has what arrived."""

    async def abefore_call(self, call: LLMCall) -> ChatResponse | EmbedResponse | None:
        return self.before_call(call)

    async def aafter_call(self, call: LLMCall, response: ChatResponse | EmbedResponse) -> None:
        self.after_call(call, response)

    async def aon_error(self, call: LLMCall, error: LLMError) -> None:
        self.on_error(call, error)

    async def aon_cancel(self, call: LLMCall, partial: ChatResponse) -> None:
        self.on_cancel(call, partial)


def _overrides(hook: LLMHook, *names: str) -> bool:
    """Whether ``hook`` does anything in these methods (the base class's no-ops cost no step)."""
    return any(getattr(type(hook), name) is not getattr(LLMHook, name) for name in names)


class CallLogHook(LLMHook):
    """One INFO record per call on ``app.llm.calls``: who, what, how it went. Never content or keys."""

    def after_call(self, call: LLMCall, response: ChatResponse | EmbedResponse) -> None:
        if call_logger.isEnabledFor(logging.INFO):
            self._log(call, "ok", response)

    def on_error(self, call: LLMCall, error: LLMError) -> None:
        if call_logger.isEnabledFor(logging.INFO):
            self._log(call, type(error).__name__, None)

    def on_cancel(self, call: LLMCall, partial: ChatResponse) -> None:
        if call_logger.isEnabledFor(logging.INFO):
            self._log(call, "cancelled", partial)

    @staticmethod
    def _log(call: LLMCall, outcome: str, response: ChatResponse | EmbedResponse | None) -> None:
        fields: dict[str, Any] = {
            "call_id": call.id,
            "kind": call.kind,
            "provider": call.provider,
            "model": call.model,
            "user": call.user,
            "tenant": call.tenant,
            "outcome": outcome,
            "latency_ms": round(call.latency_ms, 1),
            "first_delta_ms": None if call.first_delta_ms is None else round(call.first_delta_ms, 1),
            "input_tokens": getattr(response, "input_tokens", None),
            "output_tokens": getattr(response, "output_tokens", None),
            "attempts": len(call.attempts),
            "cached": bool(getattr(response, "cached", False)),
        }
        call_logger.info(
            " ".join(f"{name}=%s" for name in fields), *fields.values(), extra={"llm_call": fields}
        )


#: Each point of a call: the hook method, and its async twin.
_POINTS: dict[str, tuple[str, str]] = {
    "before": ("before_call", "abefore_call"),
    "after": ("after_call", "aafter_call"),
    "error": ("on_error", "aon_error"),
    "cancel": ("on_cancel", "aon_cancel"),
}

#: One hook at one point: its method, its own async twin (None: the default, which calls the
#: method), and the hook (for the log line).
_Acting = tuple[Callable[..., Any], Callable[..., Awaitable[Any]] | None, LLMHook]


class HookChain:
    """The hooks of one app, and the flows that call them (each hook isolated from the call)."""

    def __init__(self, hooks: Iterable[LLMHook] = (), *, warn_interval: float = 60.0) -> None:
        self.warn_interval = warn_interval
        self._last_warning: dict[int, float] = {}
        self.hooks: tuple[LLMHook, ...] = ()
        self._acting: dict[str, tuple[_Acting, ...]] = dict.fromkeys(_POINTS, ())
        for hook in hooks:
            self.add(hook)

    def add(self, hook: LLMHook) -> None:
        if not isinstance(hook, LLMHook):
            raise TypeError(f"a hook must be an LLMHook instance, got {type(hook).__name__}")
        self._set((*self.hooks, hook))

    def remove(self, hook: LLMHook) -> None:
        self._set(tuple(h for h in self.hooks if h is not hook))

    def _set(self, hooks: tuple[LLMHook, ...]) -> None:
        # Which hooks act at each point, so that a call pays nothing for a no-op method.
        acting: dict[str, tuple[_Acting, ...]] = {}
        for point, (name, async_name) in _POINTS.items():
            order = hooks if point == "before" else hooks[::-1]
            acting[point] = tuple(
                (getattr(h, name), getattr(h, async_name) if _overrides(h, async_name) else None, h)
                for h in order
                if _overrides(h, name, async_name)
            )
        self.hooks, self._acting = hooks, acting

    # --- flows, run by the call's sync or async driver ---------------------------------

    # Each answers ``()`` when no hook acts there: ``yield from ()`` costs a call nothing.

    def before(self, call: LLMCall) -> Flow[ChatResponse | EmbedResponse | None] | tuple[()]:
        return self._dispatch("before", call) if self._acting["before"] else ()

    def after(self, call: LLMCall, response: ChatResponse | EmbedResponse) -> Flow[Any] | tuple[()]:
        return self._dispatch("after", call, response) if self._acting["after"] else ()

    def error(self, call: LLMCall, error: LLMError) -> Flow[Any] | tuple[()]:
        return self._dispatch("error", call, error) if self._acting["error"] else ()

    def cancel(self, call: LLMCall, partial: ChatResponse) -> Flow[Any] | tuple[()]:
        return self._dispatch("cancel", call, partial) if self._acting["cancel"] else ()

    def _dispatch(self, point: str, *args: Any) -> Flow[Any]:
        """Each acting hook in turn; only ``before_call`` may answer (or refuse) the call.

        A hook without an async twin of its own is called in place: its default twin
        would make the same call on the event loop, so no step is needed for it.
        """
        for method, async_method, hook in self._acting[point]:
            try:
                if async_method is None:
                    answer = method(*args)
                else:
                    answer = yield Step(partial(method, *args), partial(async_method, *args))
            except LLMError as exc:
                if point == "before":
                    raise  # a hook refuses the call (a budget, a policy)
                self._failed(hook, method.__name__, exc)
            except Exception as exc:
                self._failed(hook, method.__name__, exc)
            else:
                if answer is not None and point == "before":
                    return answer
        return None

    def _failed(self, hook: LLMHook, method: str, exc: Exception) -> None:
        now = time.monotonic()
        key = id(hook)
        if now - self._last_warning.get(key, -self.warn_interval) >= self.warn_interval:
            self._last_warning[key] = now
            logger.error(
                "LLM hook %s.%s raised %s; the call goes on (logged at most every %.0f s per hook)",
                type(hook).__name__,
                method,
                type(exc).__name__,
                self.warn_interval,
                exc_info=exc,
            )


def load_hooks(paths: Sequence[str], setting: str = "LLM_HOOKS") -> list[LLMHook]:
    """``"module:attribute"`` paths to hooks: an ``LLMHook`` instance, or a class or factory of one."""
    hooks: list[LLMHook] = []
    for path in paths:
        module_name, sep, attribute = str(path).partition(":")
        if not sep or not module_name or not attribute:
            raise ConfigError(f"{setting}: {path!r} must be 'module:attribute'")
        try:
            target: Any = importlib.import_module(module_name)
            for part in attribute.split("."):
                target = getattr(target, part)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"{setting}: cannot load {path!r} ({type(exc).__name__}: {exc})") from None
        hook = target if isinstance(target, LLMHook) else target() if callable(target) else target
        if not isinstance(hook, LLMHook):
            raise ConfigError(f"{setting}: {path!r} is not an LLMHook (nor a class or factory of one)")
        hooks.append(hook)
    return hooks


__all__ = ["CallLogHook", "EmbedResponse", "HookChain", "LLMCall", "LLMHook", "load_hooks"]
