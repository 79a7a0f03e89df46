"""The event-stream reader the OpenAI adapter reads its streams with (app/llm/providers/sse_reader.py)."""

from __future__ import annotations

import asyncio
import itertools

from hypothesis import given
from hypothesis import strategies as st

from app.llm.providers.sse_reader import EventParser, ServerSentEvent, aiter_events, iter_events

BODY = (
    b": a comment\r\n"
    b"data: first\r\ndata: second\r\n\r\n"  # a CRLF cut in two must not end the event early
    b'data: {"a": 1}\r\n\r\n'
    b"event: error\n"
    b"data: line one\n"
    b"data:line two\n\n"
    b"id: 7\rretry: 10\rdata: caf\xc3\xa9 \xe2\x80\xa8 ok\r\r"
    b"data: [DONE]\n\n"
    b"data: not dispatched: no blank line after it"
)
EVENTS = [
    ServerSentEvent("message", "first\nsecond"),
    ServerSentEvent("message", '{"a": 1}'),
    ServerSentEvent("error", "line one\nline two"),
    ServerSentEvent("message", "caf\u00e9 \u2028 ok"),  # U+2028 is not a line end in an event stream
    ServerSentEvent("message", "[DONE]"),
]


def pieces(body: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(body), *(cut % (len(body) + 1) for cut in cuts)})
    return [body[start:end] for start, end in itertools.pairwise(points)]


def test_a_body_read_whole_gives_its_events():
    assert EventParser().feed(BODY) == EVENTS


@given(st.lists(st.integers(min_value=0), max_size=40))
def test_a_body_cut_anywhere_gives_the_same_events(cuts):
    # CRLF split between two reads, a UTF-8 character split, one byte at a time: the same events.
    assert list(iter_events(pieces(BODY, cuts))) == EVENTS


def test_byte_by_byte_sync_and_async():
    one_by_one = [BODY[i : i + 1] for i in range(len(BODY))]

    async def read() -> list[ServerSentEvent]:
        async def source():  # type: ignore[no-untyped-def]
            for piece in one_by_one:
                yield piece

        return [event async for event in aiter_events(source())]

    assert list(iter_events(one_by_one)) == EVENTS
    assert asyncio.run(read()) == EVENTS


def test_a_blank_line_without_data_dispatches_nothing_and_resets_the_event_name():
    assert EventParser().feed(b"event: ping\n\n\ndata: x\n\n") == [ServerSentEvent("message", "x")]
