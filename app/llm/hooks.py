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
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from app.errors import ConfigError
from app.llm.errors import LLMError
from app.llm.resilience.steps import Flow, Step

if TYPE_CHECKING:
    from app.llm.providers.base import ChatRequest, EmbedRequest
    from app.llm.types import ChatResponse

logger = logging.getLogger(__name__)
call_logger = logging.getLogger("app.llm.calls")

CallKind = Literal["chat", "stream", "embed"]


@dataclass
class EmbedResponse:
    """What an embeddings call answered, as hooks see it (``embed()`` returns ``vectors``)."""

    vectors: list[list[float]]
    provider: str
    model: str
    input_tokens: int | None = None
    cached: bool = False


@dataclass(eq=False)
class LLMCall:
    """One logical call as hooks see it; ``provider``/``model`` follow a fallback that answered."""

    kind: CallKind
    provider: str
    model: str
    #: The normalised request of the model being asked (never sent to logs: it holds the prompt).
    request: ChatRequest | EmbedRequest = field(repr=False)
    user: str | None = None
    tenant: str | None = None
    is_async: bool = False
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    #: Wall-clock start (``time.time()``), for records; ``started`` is ``perf_counter()`` for durations.
    started_at: float = field(default_factory=time.time)
    started: float = field(default_factory=time.perf_counter)
    #: ``perf_counter()`` when a stream's first event arrived.
    first_delta_at: float | None = None
    #: Every try behind this call (app.llm.resilience.Attempt), across retries and fallbacks.
    attempts: list[Any] = field(default_factory=list)
    #: Free for hooks: what one hook's ``before_call`` leaves for its ``after_call``.
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def latency_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000

    @property
    def first_delta_ms(self) -> float | None:
        return None if self.first_delta_at is None else (self.first_delta_at - self.started) * 1000


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


class HookChain:
    """The hooks of one app, and the flows that call them (each hook isolated from the call)."""

    def __init__(self, hooks: Iterable[LLMHook] = (), *, warn_interval: float = 60.0) -> None:
        self.warn_interval = warn_interval
        self._last_warning: dict[int, float] = {}
        self.hooks: tuple[LLMHook, ...] = ()
        self._before: tuple[LLMHook, ...] = ()
        self._after: tuple[LLMHook, ...] = ()
        self._error: tuple[LLMHook, ...] = ()
        self._cancel: tuple[LLMHook, ...] = ()
        for hook in hooks:
            self.add(hook)

    def add(self, hook: LLMHook) -> None:
        if not isinstance(hook, LLMHook):
            raise TypeError(f"a hook must be an LLMHook instance, got {type(hook).__name__}")
        self.hooks = (*self.hooks, hook)
        # Which hooks act at each point, so that a call pays nothing for a no-op method.
        self._before = tuple(h for h in self.hooks if _overrides(h, "before_call", "abefore_call"))
        reverse = self.hooks[::-1]
        self._after = tuple(h for h in reverse if _overrides(h, "after_call", "aafter_call"))
        self._error = tuple(h for h in reverse if _overrides(h, "on_error", "aon_error"))
        self._cancel = tuple(h for h in reverse if _overrides(h, "on_cancel", "aon_cancel"))

    def remove(self, hook: LLMHook) -> None:
        hooks = [h for h in self.hooks if h is not hook]
        self.hooks = ()
        self._before = self._after = self._error = self._cancel = ()
        for h in hooks:
            self.add(h)

    # --- flows: one step per hook that acts, run by the call's sync or async driver -------

    def before(self, call: LLMCall) -> Flow[ChatResponse | EmbedResponse | None]:
        for hook in self._before:
            try:
                answer = yield Step(
                    lambda h=hook: h.before_call(call),  # type: ignore[misc]
                    lambda h=hook: h.abefore_call(call),  # type: ignore[misc]
                )
            except LLMError:
                raise  # a hook refuses the call (a budget, a policy)
            except Exception as exc:
                self._failed(hook, "before_call", exc)
                continue
            if answer is not None:
                return answer  # type: ignore[no-any-return]
        return None

    def after(self, call: LLMCall, response: ChatResponse | EmbedResponse) -> Flow[None]:
        for hook in self._after:
            try:
                yield Step(
                    lambda h=hook: h.after_call(call, response),  # type: ignore[misc]
                    lambda h=hook: h.aafter_call(call, response),  # type: ignore[misc]
                )
            except Exception as exc:
                self._failed(hook, "after_call", exc)

    def error(self, call: LLMCall, error: LLMError) -> Flow[None]:
        for hook in self._error:
            try:
                yield Step(
                    lambda h=hook: h.on_error(call, error),  # type: ignore[misc]
                    lambda h=hook: h.aon_error(call, error),  # type: ignore[misc]
                )
            except Exception as exc:
                self._failed(hook, "on_error", exc)

    def cancel(self, call: LLMCall, partial: ChatResponse) -> Flow[None]:
        for hook in self._cancel:
            try:
                yield Step(
                    lambda h=hook: h.on_cancel(call, partial),  # type: ignore[misc]
                    lambda h=hook: h.aon_cancel(call, partial),  # type: ignore[misc]
                )
            except Exception as exc:
                self._failed(hook, "on_cancel", exc)

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
