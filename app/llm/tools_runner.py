"""Tool execution: ``llm.run(messages, tools=[functions])`` asks, runs the tools called, loops.

Each round is one ``chat()`` (``achat()`` for ``arun``), so it goes through the
hooks and the policy like any call; then every tool call of the answer is
run and its result appended to the transcript as a ``role: tool`` message.
The loop ends with the first answer that calls no tool, or after
``max_rounds`` rounds with :class:`~app.llm.errors.LLMMaxRoundsError`, which
keeps the transcript.

A tool's arguments are validated with a pydantic model of its signature
(:func:`~app.llm.tools.arguments_model`, the model its schema comes from).
Whatever goes wrong on the tool's side goes back to the model as that tool's
result, an ``Error: ...`` text it can act on: arguments that do not validate,
a tool it made up, an exception the tool raised. Only the model's and the
layer's own failures (an ``LLMError`` of a round) end the run.

Written once for both drivers, as a flow of steps
(:mod:`app.llm.resilience.steps`): the sync driver calls a round with
``chat()`` and a tool in the calling thread; the async one awaits ``achat()``,
awaits an async tool and runs a sync one in a worker thread
(``asyncio.to_thread``), so a blocking tool never stalls the event loop. Sync
``run()`` runs an async tool to completion in an event loop of its own
(``asyncio.run``), which needs a thread without a running loop: inside one,
``run()`` refuses async tools up front (use ``await llm.arun(...)``).
"""

from __future__ import annotations

import inspect
import json
import logging
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from decimal import Decimal
from functools import partial
from typing import TYPE_CHECKING, Any, NamedTuple

from app.llm.errors import LLMBadRequestError, LLMMaxRoundsError
from app.llm.resilience.steps import Flow, Step
from app.llm.tools import TOOL_NAME, arguments_model, tool_from_function
from app.llm.types import ChatResponse, ToolCall
from app.redaction import redact

if TYPE_CHECKING:
    from pydantic import BaseModel

    from app.llm.client import LLM

logger = logging.getLogger(__name__)

#: ``max_rounds`` at most: a loop this long is a model that will not stop, not a task.
MAX_ROUNDS_LIMIT = 100
#: The usage counts of a response, summed over the rounds of a run.
USAGE_FIELDS = (
    "input_tokens",
    "output_tokens",
    "total_tokens",
    "reasoning_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
)


@dataclass
class RunResponse(ChatResponse):
    """The final answer of ``run()``, with the whole transcript and the usage of every round.

    Usage counts and ``cost`` are summed over the rounds (a count is None when no
    round reported it; ``cost`` when any round's is unknown); ``attempts`` lists
    every round's tries and ``latency_ms`` covers the run, tools included.
    """

    #: The caller's messages, then each round's assistant message and its tools' results.
    messages: list[dict[str, Any]] = field(default_factory=list)
    #: How many rounds (model calls) the run took.
    rounds: int = 0
    #: Each round's own answer, in order.
    responses: list[ChatResponse] = field(default_factory=list, repr=False)


class RunnableTool(NamedTuple):
    """A function the model may call: its schema for the model, its arguments model for the answer."""

    name: str
    function: Callable[..., Any]
    #: The flat ``{"name", "description", "parameters"}`` form sent with every round.
    spec: dict[str, Any]
    arguments: type[BaseModel]
    #: Parameters that can only be passed by position.
    positional: tuple[str, ...]
    is_async: bool


def prepare_tools(tools: Any) -> dict[str, RunnableTool]:
    """The run's tools by name, validated once: each a function with a name the providers take."""
    if isinstance(tools, str | Mapping) or not isinstance(tools, Sequence) or not tools:
        raise LLMBadRequestError("run() needs tools: a non-empty list of functions", field="tools")
    prepared: dict[str, RunnableTool] = {}
    for index, tool in enumerate(tools):
        where = f"tools[{index}]"
        if not callable(tool) or isinstance(tool, Mapping | type):
            raise LLMBadRequestError(
                f"{where} must be a function: run() calls the tools the model asks for", field=where
            )
        name = getattr(tool, "__name__", None)
        if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
            raise LLMBadRequestError(
                f"{where} has the name {name!r}; a tool name is 1 to 64 letters, digits, _ or -", field=where
            )
        if name in prepared:
            raise LLMBadRequestError(
                f"{where} repeats the name {name!r}; tool names must be unique", field=where
            )
        prepared[name] = runnable(tool)
    return prepared


def runnable(tool: Callable[..., Any]) -> RunnableTool:
    """A function as a tool: its schema and arguments model are made once per function.

    They are two pydantic models, whose making costs more than a call to a local model
    (about 1 ms), so each is kept for as long as its function lives (weakly: a closure
    made per request takes its entry with it); every instance's bound method shares one.
    """
    function = getattr(tool, "__func__", tool)
    shapes = _bound_shapes if function is not tool else _shapes
    try:
        shape = shapes.get(function)
    except TypeError:  # not weakly referenceable, or unhashable: made each time
        return _shape(tool)._replace(function=tool)
    if shape is None:
        # Kept without the function: a value that held its key would keep it alive.
        shape = _shape(tool)._replace(function=_unset)
        with _shapes_lock:
            shapes[function] = shape
    return shape._replace(function=tool)


def _shape(tool: Callable[..., Any]) -> RunnableTool:
    spec = tool_from_function(tool)
    parameters = inspect.signature(tool).parameters.values()
    return RunnableTool(
        name=spec.name,
        function=tool,
        spec={"name": spec.name, "description": spec.description, "parameters": spec.parameters},
        arguments=arguments_model(tool, forbid_extra=True),
        positional=tuple(p.name for p in parameters if p.kind is p.POSITIONAL_ONLY),
        is_async=_is_async(tool),
    )


def _unset() -> None:
    """Where a kept shape's function would be."""


_shapes: weakref.WeakKeyDictionary[Any, RunnableTool] = weakref.WeakKeyDictionary()
#: Bound methods by their function: a method bound to another instance has the same shape.
_bound_shapes: weakref.WeakKeyDictionary[Any, RunnableTool] = weakref.WeakKeyDictionary()
_shapes_lock = threading.Lock()


def check_max_rounds(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_ROUNDS_LIMIT:
        raise LLMBadRequestError(
            f"max_rounds must be an integer from 1 to {MAX_ROUNDS_LIMIT}, got {value!r}", field="max_rounds"
        )
    return value


def check_sync_run(tools: Mapping[str, RunnableTool]) -> None:
    """Sync ``run()`` runs async tools with ``asyncio.run``, which a thread with a running loop cannot."""
    import asyncio

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    names = [tool.name for tool in tools.values() if tool.is_async]
    if names:
        raise RuntimeError(
            f"run() was called inside a running event loop with async tools ({', '.join(names)});"
            " use `await llm.arun(...)` there"
        )


def tool_loop(
    llm: LLM,
    messages: Any,
    model: str | None,
    tools: Mapping[str, RunnableTool],
    max_rounds: int,
    options: Mapping[str, Any],
) -> Flow[RunResponse]:
    """The run as a flow: one step per round (a chat call) and per tool call."""
    started = time.perf_counter()
    transcript: list[Any] = list(messages) if isinstance(messages, list | tuple) else messages
    specs = [tool.spec for tool in tools.values()]
    first = {**options, "tools": specs}
    later = {key: value for key, value in first.items() if key != "tool_choice"}
    responses: list[ChatResponse] = []
    for number in range(1, max_rounds + 1):
        # tool_choice applies to the first round only: "required" or a named tool every round
        # would never let the model answer.
        round_options = first if number == 1 else later
        snapshot = list(transcript) if isinstance(transcript, list) else transcript
        response: ChatResponse = yield Step(
            partial(llm.chat, snapshot, model, **round_options),
            partial(llm.achat, snapshot, model, **round_options),
        )
        responses.append(response)
        transcript.append(assistant_message(response))
        if not response.tool_calls:
            return summed(response, responses, transcript, started)
        if number == max_rounds:
            break  # no round is left to read the results: the last calls are not run
        for call in response.tool_calls:
            text: str = yield tool_step(tools, call)
            transcript.append({"role": "tool", "tool_call_id": call.id, "name": call.name, "content": text})
    last = summed(responses[-1], responses, transcript, started)
    raise LLMMaxRoundsError(
        f"the model still called tools after {max_rounds} round(s) ({_names(responses[-1])});"
        " raise max_rounds, or change the prompt or the tools",
        messages=last.messages,
        rounds=len(responses),
        response=last,
        provider=last.provider,
        model=last.model,
    )


def assistant_message(response: ChatResponse) -> dict[str, Any]:
    """A round's answer as a message of the transcript (the OpenAI form, which every call takes)."""
    if not response.tool_calls:
        return {"role": "assistant", "content": response.content if response.content is not None else ""}
    return {
        "role": "assistant",
        "content": response.content,
        "tool_calls": [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": json.dumps(call.arguments)},
            }
            for call in response.tool_calls
        ],
    }


def summed(
    final: ChatResponse, responses: Sequence[ChatResponse], transcript: list[dict[str, Any]], started: float
) -> RunResponse:
    """``final`` with the usage and cost of every round, and the transcript."""
    values = {f.name: getattr(final, f.name) for f in fields(ChatResponse) if f.init and f.name != "cost"}
    values["pricing"] = partial(_summed_cost, tuple(responses))  # worked out when first read, as a call's
    for name in USAGE_FIELDS:
        counts = [getattr(r, name) for r in responses if getattr(r, name) is not None]
        values[name] = sum(counts) if counts else None
    values["attempts"] = [attempt for r in responses for attempt in r.attempts]
    values["latency_ms"] = (time.perf_counter() - started) * 1000
    return RunResponse(**values, messages=list(transcript), rounds=len(responses), responses=list(responses))


def _summed_cost(responses: Sequence[ChatResponse], _run: ChatResponse) -> Decimal | None:
    """The rounds' costs added up; None when any round's is unknown."""
    total = Decimal(0)
    for response in responses:
        cost = response.cost
        if cost is None:
            return None
        total += cost
    return total


# --- running one tool call ------------------------------------------------------------------


def tool_step(tools: Mapping[str, RunnableTool], call: ToolCall) -> Step:
    """Run one tool call: its result as text, or the error the model should read instead."""
    tool = tools.get(call.name)
    if tool is None:
        text = f"Error: there is no tool named {call.name!r}; the tools are: {', '.join(tools)}"
        return Step(lambda: text, lambda: _value(text))
    try:
        args, kwargs = _arguments(tool, call.arguments)
    except Exception as exc:  # pydantic's ValidationError
        text = f"Error: invalid arguments for {tool.name}: {_validation_text(exc)}"
        return Step(lambda: text, lambda: _value(text))
    return Step(lambda: _run_sync(tool, args, kwargs), lambda: _run_async(tool, args, kwargs))


def _arguments(tool: RunnableTool, arguments: Mapping[str, Any]) -> tuple[list[Any], dict[str, Any]]:
    """The validated arguments, split into those passed by position and by keyword."""
    validated = tool.arguments.model_validate(dict(arguments))
    values = {name: getattr(validated, name) for name in type(validated).model_fields}
    return [values.pop(name) for name in tool.positional], values


def _run_sync(tool: RunnableTool, args: list[Any], kwargs: dict[str, Any]) -> str:
    try:
        result = tool.function(*args, **kwargs)
        if inspect.isawaitable(result):
            import asyncio

            result = asyncio.run(_awaited(result))
    except Exception as exc:
        return _failed(tool, exc)
    return result_text(result)


async def _run_async(tool: RunnableTool, args: list[Any], kwargs: dict[str, Any]) -> str:
    import asyncio

    try:
        if tool.is_async:
            result = await tool.function(*args, **kwargs)
        else:
            result = await asyncio.to_thread(tool.function, *args, **kwargs)
            if inspect.isawaitable(result):
                result = await result
    except Exception as exc:
        return _failed(tool, exc)
    return result_text(result)


def _failed(tool: RunnableTool, exc: Exception) -> str:
    """What the model reads when a tool raised: the exception's type and message, secrets masked."""
    logger.warning("tool %s raised %s; the error goes back to the model", tool.name, type(exc).__name__,
                   exc_info=exc)  # fmt: skip
    return redact(f"Error: {type(exc).__name__}: {exc}")


def result_text(value: Any) -> str:
    """A tool's return value as the text of its result: a string as is, anything else as JSON."""
    if isinstance(value, str):
        return value
    from pydantic_core import to_json

    return to_json(value, fallback=str).decode()


def _validation_text(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return str(exc)
    parts = []
    for error in errors(include_url=False, include_input=False):
        where = ".".join(str(part) for part in error.get("loc", ())) or "arguments"
        parts.append(f"{where}: {error.get('msg')}")
    return "; ".join(parts)


def _is_async(tool: Callable[..., Any]) -> bool:
    if inspect.iscoroutinefunction(tool):
        return True
    return not inspect.isroutine(tool) and inspect.iscoroutinefunction(type(tool).__call__)


def _names(response: ChatResponse) -> str:
    return ", ".join(call.name for call in response.tool_calls)


async def _value(value: str) -> str:
    return value


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


__all__ = ["RunResponse", "RunnableTool", "prepare_tools", "tool_loop"]
