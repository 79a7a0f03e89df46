"""Tool execution: ``llm.run(messages, tools=[functions])`` and ``arun`` against scripted providers.

A loop of two rounds (the model calls a tool, then answers) returns the final
answer, the whole transcript and the usage (and cost) summed over the rounds,
for each provider family; what the tool returned, raised, or could not be
called with reaches the model as that tool's result on the wire; the loop ends
with ``LLMMaxRoundsError`` keeping the transcript; each round goes through the
hooks and the policy; async and sync tools run in both drivers.
"""

from __future__ import annotations

import asyncio
import json
import threading
import weakref
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest
from flask import Flask
from pydantic import BaseModel

from app.llm import ChatResponse, LLMBadRequestError, LLMError, get_llm
from app.llm.errors import LLMMaxRoundsError
from app.llm.hooks import LLMCall, LLMHook
from app.llm.tools_runner import RunResponse
from tests.conftest import CANARY_GEMINI_KEY, CANARY_KEY
from tests.payloads import (
    anthropic_message,
    anthropic_tool_use,
    chat_completion,
    function_call,
    gemini_call,
    gemini_reply,
    gemini_text,
)
from tests.servers import Reply, ScriptedServer

USER = [{"role": "user", "content": "What's the weather in Paris?"}]
CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"
GEMINI = "/v1beta/models/gemini-2.5-flash:generateContent"


@pytest.fixture
def app(make_app: Callable[..., Flask], upstream: ScriptedServer) -> Flask:
    return make_app(
        OPENAI_API_KEY=CANARY_KEY,
        OPENAI_BASE_URL=upstream.url_for("/v1"),
        GEMINI_API_KEY=CANARY_GEMINI_KEY,
        GENAI_BASE_URL=upstream.url_for("/"),
        GENAI_API_VERSION="v1beta",
        ANTHROPIC_API_KEY=CANARY_KEY,
        ANTHROPIC_BASE_URL=upstream.base_url,
    )


seen_threads: list[int] = []


def get_weather(city: str, unit: str = "C") -> dict[str, Any]:
    """Current weather for a city."""
    seen_threads.append(threading.get_ident())
    return {"city": city, "temperature": 21, "unit": unit}


async def aget_weather(city: str, unit: str = "C") -> dict[str, Any]:
    """Current weather for a city (async)."""
    await asyncio.sleep(0)
    return {"city": city, "temperature": 22, "unit": unit}


def broken_weather(city: str) -> str:
    """A weather service that is down."""
    raise ConnectionError(f"weather service unreachable for {city}")


class Place(BaseModel):
    city: str
    country: str


located: list[Any] = []


def locate(place: Place, days: int) -> str:
    """Where (a model argument, validated into a Place)."""
    located.append((place, days))
    return "ok"


# --- a two-round loop, per provider ----------------------------------------------------------------


def openai_rounds(upstream: ScriptedServer) -> None:
    upstream.script(
        CHAT,
        chat_completion(
            None,
            "gpt-4o-mini",
            tool_calls=[function_call("call_1", "get_weather", '{"city": "Paris"}')],
            finish_reason="tool_calls",
            usage=(50, 12),
        ),
        chat_completion("It is 21 °C in Paris.", "gpt-4o-mini", usage=(80, 9)),
    )


def anthropic_rounds(upstream: ScriptedServer) -> None:
    upstream.script(
        MESSAGES,
        anthropic_message(
            [anthropic_tool_use("toolu_1", "get_weather", {"city": "Paris"})],
            stop_reason="tool_use",
            usage={"input_tokens": 50, "output_tokens": 12},
        ),
        anthropic_message(
            [{"type": "text", "text": "It is 21 °C in Paris."}],
            usage={"input_tokens": 80, "output_tokens": 9},
        ),
    )


def gemini_rounds(upstream: ScriptedServer) -> None:
    upstream.script(
        GEMINI,
        gemini_reply(gemini_call("get_weather", {"city": "Paris"}, "fc_1"), usage=(50, 12)),
        gemini_reply(gemini_text("It is 21 °C in Paris."), usage=(80, 9)),
    )


PROVIDERS = {
    "openai": ("openai/gpt-4o-mini", CHAT, openai_rounds),
    "anthropic": ("anthropic/claude-sonnet-4-6", MESSAGES, anthropic_rounds),
    "gemini": ("gemini/gemini-2.5-flash", GEMINI, gemini_rounds),
}


def tool_result_on_the_wire(provider: str, body: dict[str, Any]) -> Any:
    """The tool's result as the second request sent it, in the provider's own form."""
    if provider == "openai":
        (message,) = [m for m in body["messages"] if m["role"] == "tool"]
        return message["tool_call_id"], json.loads(message["content"])
    if provider == "anthropic":
        block = body["messages"][-1]["content"][0]
        return block["tool_use_id"], json.loads(block["content"])
    part = body["contents"][-1]["parts"][0]["functionResponse"]
    return part["id"], part["response"]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", ["run", "arun"])
def test_a_two_round_loop_returns_the_answer_the_transcript_and_the_summed_usage(
    app, upstream, provider, mode
):
    model, path, script = PROVIDERS[provider]
    script(upstream)
    with app.app_context():
        llm = get_llm()
        if mode == "run":
            r = llm.run(USER, model=model, tools=[get_weather], max_rounds=5)
        else:
            r = asyncio.run(llm.arun(USER, model=model, tools=[get_weather], max_rounds=5))
    assert isinstance(r, RunResponse) and isinstance(r, ChatResponse)
    assert r.content == "It is 21 °C in Paris." and r.tool_calls == [] and r.rounds == 2
    call_id = {"openai": "call_1", "anthropic": "toolu_1", "gemini": "fc_1"}[provider]
    assert r.messages == [
        *USER,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {
            "role": "tool",
            "tool_call_id": call_id,
            "name": "get_weather",
            "content": '{"city":"Paris","temperature":21,"unit":"C"}',
        },
        {"role": "assistant", "content": "It is 21 °C in Paris."},
    ]
    assert (r.input_tokens, r.output_tokens, r.total_tokens) == (130, 21, 151)
    first, second = r.responses
    assert r.cost is not None and r.cost == first.cost + second.cost and r.cost > Decimal(0)
    assert len(r.attempts) == 2
    # On the wire: the second request carries the tool's result for the call the model made.
    one, two = upstream.requests_to(path)
    assert tool_result_on_the_wire(provider, two.json) == (
        call_id,
        {"city": "Paris", "temperature": 21, "unit": "C"},
    )
    assert "tools" in one.json or "tools" in one.json.get("config", one.json)


def test_a_tool_that_raises_is_reported_back_to_the_model(app, upstream):
    upstream.script(
        CHAT,
        chat_completion(None, tool_calls=[function_call("c1", "broken_weather", '{"city": "Paris"}')]),
        chat_completion("Sorry, the weather service is down."),
    )
    with app.app_context():
        r = get_llm().run(USER, model="openai/gpt-4o-mini", tools=[broken_weather])
    assert r.content == "Sorry, the weather service is down."
    sent = [m for m in upstream.requests[1].json["messages"] if m["role"] == "tool"]
    assert sent == [
        {
            "role": "tool",
            "tool_call_id": "c1",
            "content": "Error: ConnectionError: weather service unreachable for Paris",
        }
    ]
    assert r.messages[2]["content"] == sent[0]["content"]


def test_arguments_that_do_not_validate_and_unknown_tools_are_reported_too(app, upstream):
    located.clear()
    upstream.script(
        CHAT,
        chat_completion(
            None,
            tool_calls=[
                function_call("c1", "locate", '{"place": {"city": "Paris"}, "days": "many"}'),
                function_call(
                    "c2", "locate", '{"place": {"city": "Paris", "country": "FR"}, "days": "3", "x": 1}'
                ),
                function_call("c3", "teleport", '{"to": "Mars"}'),
                function_call("c4", "locate", '{"place": {"city": "Paris", "country": "FR"}, "days": "3"}'),
            ],
        ),
        chat_completion("done"),
    )
    with app.app_context():
        get_llm().run(USER, model="openai/gpt-4o-mini", tools=[locate])
    results = [m["content"] for m in upstream.requests[1].json["messages"] if m["role"] == "tool"]
    assert results[0].startswith("Error: invalid arguments for locate: ")
    assert (
        "place.country: Field required" in results[0]
        and "days: Input should be a valid integer" in results[0]
    )
    assert results[1] == "Error: invalid arguments for locate: x: Extra inputs are not permitted"
    assert results[2] == "Error: there is no tool named 'teleport'; the tools are: locate"
    assert results[3] == "ok"
    assert located == [(Place(city="Paris", country="FR"), 3)]  # validated: a model instance and an int


def test_after_max_rounds_a_typed_error_keeps_the_transcript(app, upstream):
    calls = [chat_completion(None, tool_calls=[function_call(f"c{n}", "get_weather", '{"city": "Paris"}')],
                             usage=(10, 2)) for n in range(3)]  # fmt: skip
    upstream.script(CHAT, *calls)
    seen_threads.clear()
    with app.app_context(), pytest.raises(LLMMaxRoundsError) as caught:
        get_llm().run(USER, model="openai/gpt-4o-mini", tools=[get_weather], max_rounds=3)
    error = caught.value
    assert (error.http_status, error.kind, error.rounds) == (502, "max_rounds_exceeded", 3)
    assert isinstance(error, LLMError) and "after 3 round(s) (get_weather)" in error.message
    roles = [m["role"] for m in error.messages]
    assert roles == ["user", "assistant", "tool", "assistant", "tool", "assistant"]
    assert error.messages[-1]["tool_calls"][0]["id"] == "c2"
    assert len(seen_threads) == 2, "the last round's call is not run: no round is left to read it"
    assert error.response.input_tokens == 30 and error.response.rounds == 3
    assert len(upstream.requests) == 3


def test_tool_choice_applies_to_the_first_round_only(app, upstream):
    openai_rounds(upstream)
    with app.app_context():
        get_llm().run(USER, model="openai/gpt-4o-mini", tools=[get_weather], tool_choice="required")
    first, second = upstream.requests
    assert first.json["tool_choice"] == "required"
    assert "tool_choice" not in second.json and second.json["tools"] == first.json["tools"]


def test_each_round_goes_through_the_hooks_and_the_policy(make_app, upstream):
    app = make_app(
        OPENAI_API_KEY=CANARY_KEY, OPENAI_BASE_URL=upstream.url_for("/v1"), LLM_MAX_RETRIES=1,
        LLM_BACKOFF_BASE=0.01, LLM_BACKOFF_MAX=0.01,
    )  # fmt: skip
    upstream.script(
        CHAT,
        chat_completion(None, tool_calls=[function_call("c1", "get_weather", '{"city": "Paris"}')]),
        Reply(503, {"error": {"message": "overloaded", "type": "server_error"}}),
        chat_completion("21 °C"),
    )
    seen: list[tuple[str, int]] = []

    class Count(LLMHook):
        def after_call(self, call: LLMCall, response: Any) -> None:
            seen.append((call.kind, len(call.attempts)))

    with app.app_context():
        get_llm().add_hook(Count())
        r = get_llm().run(USER, model="openai/gpt-4o-mini", tools=[get_weather], user="alice")
    assert r.content == "21 °C"
    assert seen == [("chat", 1), ("chat", 2)], "each round is one call the hooks see, retried by the policy"
    assert [a.outcome for a in r.attempts] == ["ok", "LLMServerError", "ok"]
    assert all(req.json["user"] == "alice" for req in upstream.requests)


# --- sync and async tools in both drivers ---------------------------------------------------------


def test_arun_awaits_async_tools_and_runs_sync_ones_off_the_loop(app, upstream):
    upstream.script(
        CHAT,
        chat_completion(
            None,
            tool_calls=[
                function_call("c1", "aget_weather", '{"city": "Paris"}'),
                function_call("c2", "get_weather", '{"city": "Oslo"}'),
            ],
        ),
        chat_completion("done"),
    )
    seen_threads.clear()

    async def main() -> tuple[RunResponse, int]:
        r = await get_llm().arun(USER, model="openai/gpt-4o-mini", tools=[aget_weather, get_weather])
        return r, threading.get_ident()

    with app.app_context():
        r, loop_thread = asyncio.run(main())
    results = [json.loads(m["content"]) for m in r.messages if m["role"] == "tool"]
    assert [x["temperature"] for x in results] == [22, 21]
    assert seen_threads and seen_threads[0] != loop_thread, "the sync tool ran in a worker thread"


def app_name() -> str:
    """The app's name: a tool may use the app context, in arun's worker thread too."""
    from flask import current_app

    return current_app.name


def test_a_sync_tool_in_arun_keeps_the_app_context(app, upstream):
    upstream.script(
        CHAT,
        chat_completion(None, tool_calls=[function_call("c1", "app_name", "{}")]),
        chat_completion("done"),
    )
    with app.app_context():
        r = asyncio.run(get_llm().arun(USER, model="openai/gpt-4o-mini", tools=[app_name]))
    assert r.messages[2]["content"] == app.name


def test_run_runs_an_async_tool_in_a_loop_of_its_own(app, upstream):
    upstream.script(
        CHAT,
        chat_completion(None, tool_calls=[function_call("c1", "aget_weather", '{"city": "Paris"}')]),
        chat_completion("done"),
    )
    with app.app_context():
        r = get_llm().run(USER, model="openai/gpt-4o-mini", tools=[aget_weather])
    assert json.loads(r.messages[2]["content"])["temperature"] == 22


def test_run_inside_a_running_loop_refuses_async_tools_up_front(app, upstream):
    async def main() -> None:
        get_llm().run(USER, model="openai/gpt-4o-mini", tools=[aget_weather])

    with app.app_context(), pytest.raises(RuntimeError, match=r"use `await llm.arun\(...\)`"):
        asyncio.run(main())
    assert upstream.requests == []


# --- refused before any request -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"tools": []}, "tools"),
        ({"tools": get_weather}, "tools"),
        ({"tools": [get_weather, {"name": "x", "parameters": {}}]}, "tools[1]"),
        ({"tools": [lambda city: city]}, "tools[0]"),
        ({"tools": [get_weather, get_weather]}, "tools[1]"),
        ({"tools": [get_weather], "max_rounds": 0}, "max_rounds"),
        ({"tools": [get_weather], "max_rounds": True}, "max_rounds"),
        ({"tools": [get_weather], "max_rounds": 101}, "max_rounds"),
        ({"tools": [get_weather], "temperature": 9}, "temperature"),
        ({"tools": [get_weather], "api_key": ""}, "api_key"),
    ],
)
def test_bad_arguments_are_refused_by_name_before_any_request(app, upstream, kwargs, field):
    with app.app_context():
        for call in (
            lambda: get_llm().run(USER, model="openai/gpt-4o-mini", **kwargs),
            lambda: asyncio.run(get_llm().arun(USER, model="openai/gpt-4o-mini", **kwargs)),
        ):
            with pytest.raises(LLMBadRequestError) as caught:
                call()
            assert caught.value.field == field
    assert upstream.requests == []


def test_the_readme_example_runs_as_written(app, upstream):
    from tests.readme import python_blocks

    blocks = python_blocks("Per-call keys, Azure AD and tool execution")
    upstream.script(
        CHAT,
        chat_completion("Hello"),  # the tenant's call
        chat_completion(None, tool_calls=[function_call("c1", "get_weather", '{"city": "Paris"}')]),
        chat_completion("It is 21 °C in Paris."),
    )
    namespace: dict[str, Any] = {"tenant_key": "sk-tenant-0123456789abcdef"}
    with app.app_context():
        for block in blocks:
            exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["r"].content == "It is 21 °C in Paris."
    assert upstream.requests[0].headers["authorization"] == "Bearer sk-tenant-0123456789abcdef"
    assert [m["role"] for m in namespace["r"].messages] == ["user", "assistant", "tool", "assistant"]


# --- a tool's models are made once per function -----------------------------------------------------


class Thermometer:
    def __init__(self, offset: int) -> None:
        self.offset = offset

    def read(self, city: str) -> int:
        """The temperature in a city, by this thermometer."""
        return 20 + self.offset


def test_a_functions_models_are_made_once_and_go_with_it():
    import gc

    from app.llm import tools_runner

    first, again = tools_runner.runnable(get_weather), tools_runner.runnable(get_weather)
    assert first.arguments is again.arguments and first.function is get_weather

    def make_closure() -> Callable[..., Any]:
        def closure_tool(city: str) -> str:
            """Made per request."""
            return city

        return closure_tool

    closure = make_closure()
    tools_runner.runnable(closure)
    assert closure in tools_runner._shapes
    alive = weakref.ref(closure)
    del closure
    gc.collect()
    assert alive() is None, "the kept models do not keep a closure alive: its entry goes with it"

    one, two = Thermometer(1), Thermometer(5)
    a, b = tools_runner.runnable(one.read), tools_runner.runnable(two.read)
    assert a.arguments is b.arguments and a.spec["parameters"]["required"] == ["city"]
    assert (a.function("x"), b.function("x")) == (21, 25)


def test_bound_methods_are_tools_of_their_own_instance(app, upstream):
    upstream.script(
        CHAT,
        chat_completion(None, tool_calls=[function_call("c1", "read", '{"city": "Paris"}')]),
        chat_completion("done"),
    )
    with app.app_context():
        r = get_llm().run(USER, model="openai/gpt-4o-mini", tools=[Thermometer(7).read])
    assert r.messages[2]["content"] == "27"
    assert upstream.requests[0].json["tools"][0]["function"]["parameters"]["required"] == ["city"]


def test_the_cost_is_none_when_a_rounds_is_unknown_and_a_pickled_run_keeps_it(app, upstream):
    import pickle

    for model in ("my-private-model", "gpt-4o-mini"):
        upstream.script(
            CHAT,
            chat_completion(None, model, tool_calls=[function_call("c1", "get_weather", '{"city": "Oslo"}')]),
            chat_completion("done", model),
        )
    with app.app_context():
        unknown = get_llm().run(USER, model="openai/my-private-model", tools=[get_weather])
        known = get_llm().run(USER, model="openai/gpt-4o-mini", tools=[get_weather])
    assert unknown.cost is None and unknown.input_tokens == 10
    copy = pickle.loads(pickle.dumps(known))
    assert isinstance(copy, RunResponse) and copy.cost == known.cost is not None
    assert copy.messages == known.messages and copy.rounds == 2
