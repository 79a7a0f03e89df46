"""Server-sent events read from a response body: bytes in, events out.

Written here rather than taken from a library: the SDKs' own readers are private
(``openai._streaming``), and httpx-sse reads ``httpx`` responses while the SDKs speak
``httpx2``. The rules are the HTML standard's: a line ends in CRLF, LF or CR; ``data``
lines join with LF; a blank line dispatches the event; a line starting with ``:`` is a
comment. Lines are split as bytes and decoded whole, so a UTF-8 character split across
two reads is never cut.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from dataclasses import dataclass

_LINE_END = re.compile(rb"\r\n|\r|\n")


@dataclass(frozen=True, slots=True)
class ServerSentEvent:
    event: str
    data: str


class EventParser:
    """The events completed by each piece of a body, keeping what is not finished yet."""

    __slots__ = ("_data", "_event", "_rest")

    def __init__(self) -> None:
        self._rest = b""
        self._event = ""
        self._data: list[str] = []

    def feed(self, piece: bytes) -> list[ServerSentEvent]:
        text = self._rest + piece
        held_cr = text.endswith(b"\r")  # maybe the first half of a CRLF: wait for the next piece
        *lines, rest = _LINE_END.split(text[:-1] if held_cr else text)
        self._rest = rest + b"\r" if held_cr else rest
        events: list[ServerSentEvent] = []
        for line in lines:
            if not line:
                if self._data:
                    events.append(ServerSentEvent(self._event or "message", "\n".join(self._data)))
                self._event, self._data = "", []
            elif not line.startswith(b":"):
                name, _, value = line.partition(b":")
                if value.startswith(b" "):
                    value = value[1:]
                if name == b"data":
                    self._data.append(value.decode("utf-8", "replace"))
                elif name == b"event":
                    self._event = value.decode("utf-8", "replace")
        return events


def iter_events(pieces: Iterable[bytes]) -> Iterator[ServerSentEvent]:
    parser = EventParser()
    for piece in pieces:
        yield from parser.feed(piece)


async def aiter_events(pieces: AsyncIterable[bytes]) -> AsyncIterator[ServerSentEvent]:
    parser = EventParser()
    async for piece in pieces:
        for event in parser.feed(piece):
            yield event
