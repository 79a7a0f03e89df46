"""``app.llm.testing``: the fake provider, used as users would, through ``get_llm()``."""

from __future__ import annotations

import asyncio
import time

import pytest
from pydantic import BaseModel

from app.llm import (
    ChatResponse,
    LLMConnectionError,
    LLMError,
    LLMRateLimitError,
    LLMResponseError,
    ToolCall,
    get_llm,
)
from app.llm.providers.base import ChatRequest, EmbedRequest
from app.llm.testing import FakeProvider, FakeScriptError, install_fake_llm

HI = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi to Ada"}]


class City(BaseModel):
    name: str
    population: int


def get_weather(city: str, unit: str = "celsius") -> str:
    """The current weather in a city."""
    return "sunny"


@pytest.fixture
def app(make_app):
    return make_app()


@pytest.fixture
def fake(app) -> FakeProvider:
    return install_fake_llm(app)


@pytest.fixture
def llm(app, fake):
    with app.app_context():
        yield get_llm()


# --- chat --------------------------------------------------------------------------------------


def test_chat_returns_the_scripted_text_and_records_the_request(llm, fake):
    fake.add_response("Hi, Ada!")

    r = llm.chat(HI, model="fake/anything", temperature=0.2, max_tokens=50, user="u-1")

    assert isinstance(r, ChatResponse)
    assert (r.content, r.provider, r.model, r.finish_reason) == ("Hi, Ada!", "fake", "anything", "stop")
    assert (r.input_tokens, r.output_tokens, r.total_tokens) == (6, 2, 8)  # words in, words out
    assert r.has_tool_calls is False
    request = fake.last_request
    assert isinstance(request, ChatRequest)
    assert [(m.role, m.text) for m in request.messages] == [
        ("system", "Be brief."),
        ("user", "Say hi to Ada"),
    ]
    assert (request.model, request.temperature, request.max_tokens) == ("anything", 0.2, 50)
    assert request.user == "u-1"
    assert fake.methods == ["chat"]


def test_scripted_items_are_consumed_in_order(llm, fake):
    fake.add_response("one").add_response("two")
    assert fake.pending == 2

    assert [llm.chat(HI, model="fake/m").content for _ in range(2)] == ["one", "two"]
    assert fake.pending == 0
    assert len(fake.calls) == 2


def test_usage_model_and_finish_reason_can_be_scripted(llm, fake):
    fake.add_response(
        "cut", usage={"input_tokens": 100, "output_tokens": 4}, finish_reason="length", model="m-2025"
    )
    r = llm.chat(HI, model="fake/m")
    assert (r.input_tokens, r.output_tokens, r.total_tokens) == (100, 4, 104)
    assert (r.finish_reason, r.model) == ("length", "m-2025")


def test_a_scripted_chat_response_is_returned_as_given(llm, fake):
    scripted = ChatResponse(content="as is", model="x", provider="fake", input_tokens=1, output_tokens=2)
    fake.add_response(scripted)
    r = llm.chat(HI, model="fake/m")
    assert (r.content, r.model, r.input_tokens, r.output_tokens) == ("as is", "x", 1, 2)
    assert r.latency_ms >= 0 and scripted.latency_ms == 0.0  # the script's object is not mutated


def test_tool_calls_are_returned_and_tools_recorded(llm, fake):
    fake.add_response(
        None,
        tool_calls=[
            ToolCall(id="call_1", name="get_weather", arguments={"city": "Paris"}),
            {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
        ],
    )

    r = llm.chat(HI, model="fake/m", tools=[get_weather], tool_choice="required")

    assert r.has_tool_calls and r.finish_reason == "tool_calls" and r.content is None
    assert r.tool_calls == [
        ToolCall(id="call_1", name="get_weather", arguments={"city": "Paris"}),
        ToolCall(id="call_1", name="get_weather", arguments={"city": "Oslo"}),
    ]
    request = fake.last_request
    assert isinstance(request, ChatRequest)
    assert [t.name for t in request.tools] == ["get_weather"]
    assert request.tools[0].parameters["required"] == ["city"]
    assert request.tool_choice is not None and request.tool_choice.mode == "required"


def test_an_empty_script_is_a_clear_error(llm, fake):
    with pytest.raises(FakeScriptError, match=r"nothing scripted for chat\(\).*fake.add_response") as caught:
        llm.chat(HI, model="fake/m")
    assert isinstance(caught.value, LLMError)
    assert len(fake.calls) == 1  # the call is still recorded


def test_echo_mode_answers_with_the_last_user_message(app):
    fake = install_fake_llm(app, echo=True)
    with app.app_context():
        llm = get_llm()
        assert llm.chat(HI, model="fake/m").content == "Say hi to Ada"
        assert "".join(llm.chat_stream(HI, model="fake/m")) == "Say hi to Ada"
        first = llm.embed(["a", "b"], model="fake/e")
        assert first == llm.embed(["a", "b"], model="fake/e")  # deterministic
        assert len(first) == 2 and len(first[0]) == 8 and first[0] != first[1]
    assert fake.methods == ["chat", "stream", "embed", "embed"]


def test_the_wrong_kind_of_item_is_an_error_and_is_not_consumed(llm, fake):
    fake.add_embedding([[0.1, 0.2]])
    with pytest.raises(
        FakeScriptError,
        match=r"chat\(\) was called, but the next scripted item is an embedding",
    ):
        llm.chat(HI, model="fake/m")
    assert llm.embed(["x"], model="fake/e") == [[0.1, 0.2]]


def test_install_uses_the_current_app_and_any_name(app):
    with app.app_context():
        mock = install_fake_llm(name="mock", models=["a", "b"])
        mock.add_response("from mock")
        assert get_llm().chat(HI, model="mock/x").content == "from mock"
        assert get_llm().list_models("mock") == ["a", "b"]
        assert "mock" in get_llm().provider_names()


def test_reset_forgets_script_and_calls(llm, fake):
    fake.add_response("a").add_response("b")
    llm.chat(HI, model="fake/m")
    fake.reset()
    assert (fake.pending, fake.calls, fake.methods) == (0, [], [])
    with pytest.raises(AssertionError, match="not called"):
        fake.last_request


# --- errors ------------------------------------------------------------------------------------


def test_a_scripted_error_is_raised_as_the_typed_error(llm, fake):
    fake.add_error(LLMRateLimitError("slow down", retry_after=3)).add_response("after")

    with pytest.raises(LLMRateLimitError) as caught:
        llm.chat(HI, model="fake/m")

    error = caught.value
    assert (error.retry_after, error.provider, error.model) == (3, "fake", "m")
    assert str(error) == "fake/m: slow down"
    assert llm.chat(HI, model="fake/m").content == "after"  # the error consumed one item


def test_a_scripted_error_raises_when_a_stream_opens_and_on_embed(llm, fake):
    fake.add_error(LLMConnectionError("refused")).add_error(LLMRateLimitError("quota", retry_after=1))
    with pytest.raises(LLMConnectionError):
        llm.chat_stream(HI, model="fake/m")
    with pytest.raises(LLMRateLimitError):
        llm.embed(["a"], model="fake/e")
    assert fake.methods == ["stream", "embed"]


def test_a_foreign_exception_arrives_as_an_llm_error_with_the_cause(llm, fake):
    boom = ValueError("boom")
    fake.add_error(boom)
    with pytest.raises(LLMError) as caught:
        llm.chat(HI, model="fake/m")
    assert caught.value.__cause__ is boom
    assert "ValueError: boom" in str(caught.value)


# --- streams -----------------------------------------------------------------------------------


def test_stream_yields_the_chunks_then_has_the_final_response(llm, fake):
    fake.add_stream(["Hel", "lo", "!"], usage={"input_tokens": 9, "output_tokens": 3})

    stream = llm.chat_stream(HI, model="fake/m")
    chunks = list(stream)

    assert chunks == ["Hel", "lo", "!"]
    r = stream.response
    assert (r.content, r.finish_reason, r.provider, r.model) == ("Hello!", "stop", "fake", "m")
    assert (r.input_tokens, r.output_tokens, r.total_tokens) == (9, 3, 12)
    assert fake.methods == ["stream"] and fake.open_streams == 0


def test_streamed_tool_calls_arrive_in_the_final_response(llm, fake):
    fake.add_stream(["Checking."], tool_calls=[ToolCall("c1", "get_weather", {"city": "Paris"})])
    stream = llm.chat_stream(HI, model="fake/m", tools=[get_weather])
    assert list(stream) == ["Checking."]
    assert stream.response.tool_calls == [ToolCall("c1", "get_weather", {"city": "Paris"})]
    assert stream.response.finish_reason == "tool_calls"


def test_stream_delay_spaces_the_chunks(llm, fake):
    fake.add_stream(["a", "b", "c"], delay=0.15)
    started = time.monotonic()
    arrivals = [(text, time.monotonic() - started) for text in llm.chat_stream(HI, model="fake/m")]
    assert [text for text, _ in arrivals] == ["a", "b", "c"]
    assert arrivals[-1][1] - arrivals[0][1] >= 0.25


def test_a_stream_can_break_after_its_chunks(llm, fake):
    fake.add_stream(["par", "tial"], error=LLMConnectionError("connection reset"))
    stream = llm.chat_stream(HI, model="fake/m")
    received = []
    with pytest.raises(LLMConnectionError, match="connection reset"):
        for text in stream:
            received.append(text)
    assert received == ["par", "tial"]
    assert fake.open_streams == 0


def test_closing_a_stream_early_closes_the_fake_upstream(llm, fake):
    fake.add_stream(["a", "b", "c"])
    stream = llm.chat_stream(HI, model="fake/m")
    assert next(stream) == "a"
    assert fake.open_streams == 1
    stream.close()
    assert fake.open_streams == 0


def test_answers_and_streams_are_interchangeable(llm, fake):
    fake.add_stream(["joi", "ned"]).add_response("whole")
    assert llm.chat(HI, model="fake/m").content == "joined"
    assert list(llm.chat_stream(HI, model="fake/m")) == ["whole"]


# --- structured output -------------------------------------------------------------------------


def test_structured_output_is_validated_into_parsed(llm, fake):
    fake.add_response('{"name": "Paris", "population": 2100000}')
    fake.add_response(City(name="Oslo", population=700000))
    fake.add_response({"name": "Rome", "population": 2800000})

    parsed = [llm.chat(HI, model="fake/m", response_format=City).parsed for _ in range(3)]

    assert parsed == [City(name="Paris", population=2100000), City(name="Oslo", population=700000),
                      City(name="Rome", population=2800000)]  # fmt: skip
    request = fake.last_request
    assert isinstance(request, ChatRequest) and request.response_format is City


def test_structured_output_that_does_not_validate_is_a_response_error(llm, fake):
    fake.add_response('{"name": "Paris"}')
    with pytest.raises(LLMResponseError) as caught:
        llm.chat(HI, model="fake/m", response_format=City)
    assert caught.value.raw_text == '{"name": "Paris"}'


def test_streamed_structured_output_is_parsed_at_the_end(llm, fake):
    fake.add_stream(['{"name": "Pa', 'ris", "population": 1}'])
    stream = llm.chat_stream(HI, model="fake/m", response_format=City)
    list(stream)
    assert stream.response.parsed == City(name="Paris", population=1)


# --- embeddings --------------------------------------------------------------------------------


def test_embed_returns_the_scripted_vectors_and_records_inputs(llm, fake):
    fake.add_embedding([[0.1, 0.2], [0.3, 0.4]])

    assert llm.embed(["a", "b"], model="fake/embed-small") == [[0.1, 0.2], [0.3, 0.4]]

    request = fake.last_request
    assert isinstance(request, EmbedRequest)
    assert (request.model, request.inputs) == ("embed-small", ["a", "b"])


def test_embed_with_a_different_number_of_inputs_is_an_error(llm, fake):
    fake.add_embedding([[0.1, 0.2]])
    with pytest.raises(FakeScriptError, match="2 inputs but the scripted embedding has 1 vectors"):
        llm.embed(["a", "b"], model="fake/e")


def test_add_embedding_wants_a_list_of_vectors(fake):
    with pytest.raises(TypeError):
        fake.add_embedding([0.1, 0.2])


# --- async -------------------------------------------------------------------------------------


def test_async_chat_stream_and_embed(llm, fake):
    fake.add_response("async hi", tool_calls=[ToolCall("c1", "get_weather", {"city": "Oslo"})])
    fake.add_stream(["a", "sync"], usage={"input_tokens": 2, "output_tokens": 2})
    fake.add_embedding([[1.0, 0.0]])
    fake.add_error(LLMRateLimitError("later", retry_after=5))

    async def run():
        r = await llm.achat(HI, model="fake/m")
        stream = llm.achat_stream(HI, model="fake/m")
        chunks = [text async for text in stream]
        vectors = await llm.aembed(["x"], model="fake/e")
        with pytest.raises(LLMRateLimitError) as caught:
            await llm.achat(HI, model="fake/m")
        return r, chunks, stream.response, vectors, caught.value

    r, chunks, final, vectors, error = asyncio.run(run())

    assert r.content == "async hi" and r.tool_calls[0].arguments == {"city": "Oslo"}
    assert chunks == ["a", "sync"]
    assert (final.content, final.total_tokens, final.finish_reason) == ("async", 4, "stop")
    assert vectors == [[1.0, 0.0]]
    assert error.retry_after == 5
    assert fake.methods == ["achat", "astream", "aembed", "achat"]


def test_async_stream_closed_early_closes_the_fake_upstream(llm, fake):
    fake.add_stream(["a", "b", "c"])

    async def run():
        stream = llm.achat_stream(HI, model="fake/m")
        first = await stream.__anext__()
        opened = fake.open_streams
        await stream.aclose()
        return first, opened

    assert asyncio.run(run()) == ("a", 1)
    assert fake.open_streams == 0
