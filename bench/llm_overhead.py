"""``get_llm().chat(...)`` against the raw openai SDK, on the same request to the same local server.

A plain threaded ``http.server`` (HTTP/1.1, keep-alive) answers a fixed chat
completion, or a fixed SSE stream when the request asks for one. The raw side
is an ``openai.OpenAI`` client built once; the layer's side goes through
``get_llm()`` inside an app context, so it pays for validation, translation
and the normalised response. Calls alternate one by one (swapping which side
goes first) over 15 rounds, so that machine noise hits both alike; a
process's figure is the ratio of the medians of the rounds' median per-call
times, and the figure reported is the median over 3 fresh processes (see
:mod:`bench.processes`), with their range.
Target: under 1.05x, for a chat call and for a stream's time to its first text
delta. (The sync SDK closes a stream's connection after ``[DONE]`` without
reading the end of the body, so every stream, raw or not, opens a new one.)

The layer posts the body it builds with the SDK's ``client.post`` instead of
``chat.completions.create`` (see ``OpenAIProvider._create``), which skips
create()'s walk of the body against the SDK's type annotations; that walk
costs more than the layer does, so the first two ratios come out below 1.
For the layer's own cost, a third figure compares ``get_llm().chat`` with the
raw SDK doing what the layer does underneath: ``client.post`` of the same body.

It also checks, in a fresh interpreter, that ``import app.llm`` imports no SDK.
"""

from __future__ import annotations

import gc
import json
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.processes import SMOKE, in_processes, is_worker, ratio_text, report, spread  # noqa: E402

ROUNDS = 2 if SMOKE else 15
CALLS = 4 if SMOKE else 200
STREAM_CALLS = 2 if SMOKE else 50
MODEL = "gpt-4o-mini"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."}]
SDKS = ("openai", "google.genai", "anthropic", "redis")

COMPLETION = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello!", "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15},
    }
).encode()


def _chunk(delta: dict[str, Any], finish: str | None = None, usage: dict[str, int] | None = None) -> bytes:
    body = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": MODEL,
        "choices": [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish}],
        "usage": usage,
    }
    return f"data: {json.dumps(body)}\n\n".encode()


STREAM = b"".join(
    [
        _chunk({"role": "assistant", "content": ""}),
        *(_chunk({"content": piece}) for piece in ("Hel", "lo", "!")),
        _chunk({}, "stop"),
        _chunk({}, usage={"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}),
        b"data: [DONE]\n\n",
    ]
)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out as two writes: no 40 ms delayed-ACK stall

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        stream = b'"stream":true' in body.replace(b" ", b"")
        payload, kind = (STREAM, "text/event-stream") if stream else (COMPLETION, "application/json")
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def start_server() -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _first_delta(open_stream: Callable[[], Any], first_text: Callable[[Any], bool]) -> float:
    """Seconds from the call to its first text delta (the rest of the stream is read, untimed)."""
    started = time.perf_counter()
    stream = open_stream()
    for item in stream:
        if first_text(item):
            elapsed = time.perf_counter() - started
            break
    else:
        raise AssertionError("the stream sent no text")
    for _ in stream:
        pass
    return elapsed


def _timed(function: Callable[[], object]) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def _interleaved(
    raw: Callable[[], float], ours: Callable[[], float], calls: int
) -> tuple[list[float], list[float]]:
    """Per round, the median per-call time of each side; calls alternate one by one within a round.

    Alternating call by call (and swapping which side goes first every call)
    spreads any slow patch of the machine over both sides alike.
    """
    raw_rounds, our_rounds = [], []
    for _ in range(ROUNDS):
        gc.collect()
        raw_times, our_times = [], []
        for call in range(calls):
            if call % 2:
                our_times.append(ours())
                raw_times.append(raw())
            else:
                raw_times.append(raw())
                our_times.append(ours())
        raw_rounds.append(statistics.median(raw_times))
        our_rounds.append(statistics.median(our_times))
    return raw_rounds, our_rounds


def imported_sdks() -> list[str]:
    """The SDKs a fresh interpreter has loaded after ``import app.llm``."""
    code = f"import sys, app.llm; print(','.join(m for m in {SDKS!r} if m in sys.modules))"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return [name for name in result.stdout.strip().split(",") if name]


def measure() -> dict[str, Any]:
    import openai

    from app.llm import get_llm
    from bench.apps import bench_app

    server = start_server()
    base_url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    app = bench_app(OPENAI_API_KEY="sk-bench", OPENAI_BASE_URL=base_url, OPENAI_MAX_RETRIES=0)
    client = openai.OpenAI(api_key="sk-bench", base_url=base_url, max_retries=0)
    model = f"openai/{MODEL}"

    def raw_chat() -> object:
        return client.chat.completions.create(model=MODEL, messages=MESSAGES)

    def our_chat() -> object:
        return get_llm().chat(MESSAGES, model=model)

    def raw_stream() -> Any:
        return client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )

    def our_stream() -> Any:
        return get_llm().chat_stream(MESSAGES, model=model)

    from openai.types.chat import ChatCompletion

    body = {"model": MODEL, "messages": MESSAGES}

    def raw_post() -> object:
        return client.post("/chat/completions", body=body, cast_to=ChatCompletion)

    def raw_has_text(chunk: Any) -> bool:
        return bool(chunk.choices and chunk.choices[0].delta.content)

    def our_has_text(text: str) -> bool:
        return bool(text)

    try:
        with app.app_context():
            assert raw_chat().choices[0].message.content == our_chat().content == "Hello!"
            assert raw_post().choices[0].message.content == "Hello!"
            for _ in range(20):  # warm both paths: imports, clients, pools
                raw_chat(), our_chat(), raw_post()
                _first_delta(raw_stream, raw_has_text), _first_delta(our_stream, our_has_text)
            raw_calls, our_calls = _interleaved(lambda: _timed(raw_chat), lambda: _timed(our_chat), CALLS)
            post_calls, layer_calls = _interleaved(lambda: _timed(raw_post), lambda: _timed(our_chat), CALLS)
            raw_ttfd, our_ttfd = _interleaved(
                lambda: _first_delta(raw_stream, raw_has_text),
                lambda: _first_delta(our_stream, our_has_text),
                STREAM_CALLS,
            )
    finally:
        client.close()
        server.shutdown()
        server.server_close()
    chat_raw, chat_ours = statistics.median(raw_calls), statistics.median(our_calls)
    ttfd_raw, ttfd_ours = statistics.median(raw_ttfd), statistics.median(our_ttfd)
    post, layer = statistics.median(post_calls), statistics.median(layer_calls)
    return {
        "post_ms": post * 1000,
        "layer_ms": layer * 1000,
        "layer_us": (layer - post) * 1e6,
        "layer_ratio": layer / post,
        "chat_raw_ms": chat_raw * 1000,
        "chat_ours_ms": chat_ours * 1000,
        "chat_ratio": chat_ours / chat_raw,
        "ttfd_raw_ms": ttfd_raw * 1000,
        "ttfd_ours_ms": ttfd_ours * 1000,
        "ttfd_ratio": ttfd_ours / ttfd_raw,
        "imported_sdks": imported_sdks(),
    }


def main() -> None:
    if is_worker():
        report(measure())
        return
    results = in_processes("bench.llm_overhead")

    def ms(name: str) -> float:
        return spread(results, name)[0]

    chat_ratio = ratio_text(results, "chat_ratio")
    print(
        f"get_llm().chat(): {ms('chat_ours_ms'):.3f} ms/call,"
        f" raw openai SDK: {ms('chat_raw_ms'):.3f} ms/call, ratio {chat_ratio} (target < 1.05x)"
    )
    print(
        f"chat_stream() first delta: {ms('ttfd_ours_ms'):.3f} ms, raw openai SDK: {ms('ttfd_raw_ms'):.3f} ms,"
        f" ratio {ratio_text(results, 'ttfd_ratio')} (target < 1.05x)"
    )
    print(
        f"the layer's own cost: get_llm().chat() {ms('layer_ms'):.3f} ms/call against the raw SDK's"
        f" client.post of the same body {ms('post_ms'):.3f} ms/call: {ms('layer_us'):.0f} µs,"
        f" ratio {ratio_text(results, 'layer_ratio')} (no target: what the layer adds to the SDK's transport)"
    )
    loaded = sorted({name for result in results for name in result["imported_sdks"]})
    verdict = f"imported {', '.join(loaded)}" if loaded else "no SDK imported"
    print(f"import app.llm: {verdict} (checked {', '.join(SDKS)})")
    if loaded:
        raise SystemExit(f"import app.llm must not import an SDK, but it imported {', '.join(loaded)}")


if __name__ == "__main__":
    main()
