"""N concurrent streaming clients against gunicorn (``-w 2``) and a slow local upstream.

Every side runs on 127.0.0.1 in its own process:

- the **upstream**: an asyncio server speaking OpenAI's streaming protocol,
  which answers the model ``d{count}x{interval}`` with ``count`` deltas, one
  every ``interval`` seconds (the first after one interval), then usage and
  ``[DONE]``;
- the **app** under gunicorn (``gunicorn.conf.py``, ``-w 2``), gevent or gthread,
  calling the upstream through ``/api/chat`` with ``"stream": true``;
- the **asyncio gateway** peer: one asyncio process that relays the same
  request through ``AsyncOpenAI`` as SSE (what an async LLM gateway does);
- optionally the **LiteLLM proxy** peer (``--litellm PATH``: its virtualenv's
  ``litellm`` executable; a peer only, never a dependency of the project);
- the **clients**: one asyncio process, ``N`` connections at once.

For each server it reports: completed streams (``done`` seen), errors, time to
first delta p50 and p99, wall time, and the peak RSS of each worker process;
the upstream's own time to first delta is measured directly, in the same run,
with the same number of clients. ``--probe`` also times ``/livez`` every 0.1 s
during the run. Nothing here is a test: it prints figures.

    python bench/concurrent_streams.py                       # the acceptance run (1,000 on gevent)
    python bench/concurrent_streams.py --scenario make-run   # `make run`'s defaults: 32 streams of 5 s
    python bench/concurrent_streams.py --clients 50 --seconds 5 --deltas 10 --classes gevent,gthread
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.processes import SMOKE  # noqa: E402

PYTHON = sys.executable
GUNICORN = str(Path(sys.executable).with_name("gunicorn"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        return
    raise RuntimeError(f"nothing listens on {port} after {timeout} s")


# --- a minimal HTTP/1.1 over asyncio streams (the upstream, the gateway, the clients) -----------


async def read_request(reader: asyncio.StreamReader) -> tuple[str, str, dict[str, str], bytes] | None:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    method, path, _version = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return method, path, headers, body


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)


# --- the upstream ----------------------------------------------------------------------------


def _openai_chunk(delta: dict[str, Any], finish: str | None = None, usage: Any = None) -> bytes:
    body = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "bench",
        "choices": [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    if usage:
        body["usage"] = usage
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def completion(count: int) -> dict[str, Any]:
    text = "".join(f"word{index} " for index in range(count))
    return {
        "id": "chatcmpl-bench", "object": "chat.completion", "created": 0, "model": "bench",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": count, "total_tokens": 5 + count},
    }  # fmt: skip


def parse_model(model: str) -> tuple[int, float] | None:
    """``d20x0.5`` -> (20, 0.5); ``hang`` -> None (never answers)."""
    if model == "hang":
        return None
    count, _, interval = model[1:].partition("x")
    return int(count), float(interval)


async def upstream_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            request = await read_request(reader)
            if request is None:
                return
            _method, _path, _headers, body = request
            payload = json.loads(body)
            shape = parse_model(payload.get("model", "d1x0"))
            if shape is None:
                await asyncio.sleep(3600)
                return
            count, interval = shape
            if not payload.get("stream"):
                await asyncio.sleep(count * interval)
                answer = json.dumps(completion(count)).encode()
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                    % (len(answer), answer)
                )
                await writer.drain()
                continue
            writer.write(STREAM_HEAD + chunk(_openai_chunk({"role": "assistant", "content": ""})))
            await writer.drain()
            for index in range(count):
                await asyncio.sleep(interval)
                writer.write(chunk(_openai_chunk({"content": f"word{index} "})))
                await writer.drain()
            usage = {"prompt_tokens": 5, "completion_tokens": count, "total_tokens": 5 + count}
            writer.write(
                chunk(_openai_chunk({}, "stop"))
                + chunk(_openai_chunk({}, usage=usage))
                + chunk(b"data: [DONE]\n\n")
                + b"0\r\n\r\n"
            )
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
        return
    finally:
        writer.close()


async def serve_upstream(port: int) -> None:
    server = await asyncio.start_server(upstream_handler, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


# --- the asyncio gateway peer -----------------------------------------------------------------


async def serve_gateway(port: int, upstream: str) -> None:
    """``POST /api/chat`` (``model``, ``messages``) relayed through AsyncOpenAI as SSE, in one loop."""
    import openai

    client = openai.AsyncOpenAI(api_key="sk-bench", base_url=upstream, max_retries=0)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await read_request(reader)
            if request is None:
                return
            body = json.loads(request[3])
            stream = await client.chat.completions.create(
                model=body["model"], messages=body["messages"], stream=True
            )
            writer.write(STREAM_HEAD)
            async for part in stream:
                if part.choices and part.choices[0].delta.content:
                    event = {"text": part.choices[0].delta.content}
                    writer.write(chunk(b"event: delta\ndata: " + json.dumps(event).encode() + b"\n\n"))
                    await writer.drain()
            writer.write(chunk(b"event: done\ndata: {}\n\n") + b"0\r\n\r\n")
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


# --- the clients ------------------------------------------------------------------------------


#: The first text delta in OpenAI's own stream format (the upstream, LiteLLM), compact or not.
FIRST_WORD = re.compile(rb'"content": ?"word')


@dataclass
class Outcome:
    ok: bool
    ttfb: float | None = None
    total: float | None = None
    error: str | None = None


async def stream_once(port: int, path: str, body: bytes, timeout: float, headers: str = "") -> Outcome:
    started = time.perf_counter()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
    except (OSError, TimeoutError) as exc:
        return Outcome(False, error=f"connect: {type(exc).__name__}")
    try:
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n{headers}\r\n".encode()
            + body
        )
        await writer.drain()
        seen = b""
        ttfb = None
        deadline = started + timeout
        while True:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return Outcome(False, ttfb, error="timeout")
            piece = await asyncio.wait_for(reader.read(65536), remaining)
            if not piece:
                status = seen.split(b"\r\n", 1)[0].decode(errors="replace")
                return Outcome(False, ttfb, error=f"closed ({status})")
            seen = seen[-64:] + piece if ttfb is not None else seen + piece
            if ttfb is None and (b"event: delta" in seen or FIRST_WORD.search(seen)):
                ttfb = time.perf_counter() - started
                if not seen.startswith(b"HTTP/1.1 200"):
                    return Outcome(False, error=seen.split(b"\r\n", 1)[0].decode())
            if b"event: error" in seen:
                return Outcome(False, ttfb, error="error event")
            if b"event: done" in seen or b"data: [DONE]" in seen:
                return Outcome(True, ttfb, time.perf_counter() - started)
            if ttfb is None and seen.startswith(b"HTTP/1.1 ") and not seen.startswith(b"HTTP/1.1 200"):
                return Outcome(False, error=seen.split(b"\r\n", 1)[0].decode())
    except (OSError, TimeoutError) as exc:
        return Outcome(False, error=type(exc).__name__)
    finally:
        writer.close()


async def probe(port: int, stop: asyncio.Event, interval: float = 0.1) -> list[float]:
    """``GET /livez`` every ``interval`` s until ``stop``: each answer's latency (inf if it failed)."""
    latencies = []
    while not stop.is_set():
        started = time.perf_counter()
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
            writer.write(b"GET /livez HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
            await writer.drain()
            answer = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            ok = answer.startswith(b"HTTP/1.1 200")
        except (OSError, TimeoutError):
            ok = False
        latencies.append(time.perf_counter() - started if ok else float("inf"))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)
    return latencies


@dataclass
class Row:
    server: str
    clients: int
    outcomes: list[Outcome]
    wall: float
    rss_mb: list[float] = field(default_factory=list)
    probes: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        ok = [o for o in self.outcomes if o.ok]
        ttfbs = sorted(o.ttfb for o in self.outcomes if o.ttfb is not None)
        errors: dict[str, int] = {}
        for outcome in self.outcomes:
            if not outcome.ok:
                errors[outcome.error or "?"] = errors.get(outcome.error or "?", 0) + 1
        result: dict[str, Any] = {
            "server": self.server,
            "clients": self.clients,
            "completed": len(ok),
            "errors": errors,
            "ttfb_p50": percentile(ttfbs, 50),
            "ttfb_p99": percentile(ttfbs, 99),
            "wall": round(self.wall, 2),
            "rss_mb_per_worker": [round(r, 1) for r in self.rss_mb],
        }
        if self.probes:
            answered = [p for p in self.probes if p != float("inf")]
            result["livez"] = {
                "probes": len(self.probes),
                "answered": len(answered),
                "max_ms": round(max(answered) * 1000, 1) if answered else None,
                "p50_ms": round(percentile(sorted(answered), 50) * 1000, 1) if answered else None,
            }
        return result


def percentile(values: list[float], pct: float) -> float:
    if not values:
        return float("nan")
    index = min(len(values) - 1, max(0, round(pct / 100 * (len(values) - 1))))
    return round(values[index], 3)


async def run_clients(
    port: int, path: str, body: bytes, clients: int, timeout: float, probe_port: int | None, headers: str = ""
) -> tuple[list[Outcome], float, list[float]]:
    stop = asyncio.Event()
    prober = asyncio.create_task(probe(probe_port, stop)) if probe_port else None
    started = time.perf_counter()
    outcomes = await asyncio.gather(
        *(stream_once(port, path, body, timeout, headers) for _ in range(clients))
    )
    wall = time.perf_counter() - started
    stop.set()
    probes = await prober if prober else []
    return list(outcomes), wall, probes


# --- processes ----------------------------------------------------------------------------------


def spawn(
    args: list[str], env: dict[str, str] | None = None, log: Path | None = None
) -> subprocess.Popen[bytes]:
    out = log.open("wb") if log else subprocess.DEVNULL
    return subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=35)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


async def sample_rss(pids: list[int], stop: asyncio.Event, peaks: dict[int, float]) -> None:
    while not stop.is_set():
        for pid in pids:
            peaks[pid] = max(peaks.get(pid, 0.0), rss_mb(pid))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.5)


def app_env(worker_class: str, upstream_port: int, tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GUNICORN_", "LLM_", "OPENAI_"))}
    env.update(
        SECRET_KEY=secrets.token_hex(32),
        INSTANCE_PATH=str(tmp / "instance"),
        DOTENV_PATH=str(tmp / "no.env"),
        OPENAI_API_KEY="sk-bench",
        OPENAI_BASE_URL=f"http://127.0.0.1:{upstream_port}/v1",
        API_AUTH="false",
        API_DEFAULT_RPM="0",
        API_DEFAULT_TPM="0",
        LLM_CALL_LOG="false",
        GUNICORN_WORKER_CLASS=worker_class,
        GUNICORN_ACCESS_LOG="/dev/null",
        WEB_CONCURRENCY="2",
    )
    env.pop("GUNICORN_CMD_ARGS", None)
    env.update(extra)
    migrated = tmp / "instance" / ".migrated"
    if not migrated.exists():  # the usage ledger writes its rows, as in a deployed app
        flask = str(Path(sys.executable).with_name("flask"))
        subprocess.run([flask, "db", "upgrade"], cwd=ROOT, env=env, check=True, capture_output=True)
        migrated.touch()
    return env


async def measure_server(
    name: str,
    port: int,
    path: str,
    body: bytes,
    clients: int,
    timeout: float,
    worker_pids: list[int],
    probe_port: int | None = None,
    headers: str = "",
) -> Row:
    stop_sampling = asyncio.Event()
    peaks: dict[int, float] = {}
    sampler = asyncio.create_task(sample_rss(worker_pids, stop_sampling, peaks))
    outcomes, wall, probes = await run_clients(port, path, body, clients, timeout, probe_port, headers)
    stop_sampling.set()
    await sampler
    return Row(name, clients, outcomes, wall, [peaks[p] for p in worker_pids if p in peaks], probes)


async def run_gunicorn_row(
    worker_class: str, upstream_port: int, body: bytes, clients: int, timeout: float, probe: bool, tmp: Path
) -> Row:
    port = free_port()
    env = app_env(worker_class, upstream_port, tmp, PORT=str(port))
    log = tmp / f"gunicorn-{worker_class}.log"
    master = spawn([GUNICORN, "-c", "gunicorn.conf.py", "-w", "2", "wsgi:app"], env, log)
    try:
        await wait_for_port(port)
        deadline = time.monotonic() + 60
        while log.read_text(errors="replace").count(" warm: ") < 2:  # both workers booted and warm
            if time.monotonic() > deadline or master.poll() is not None:
                raise RuntimeError(f"gunicorn did not boot two workers:\n{log.read_text(errors='replace')}")
            await asyncio.sleep(0.1)
        workers = children(master.pid)
        row = await measure_server(
            f"gunicorn {worker_class} -w 2", port, "/api/chat", body, clients, timeout, workers,
            port if probe else None,
        )  # fmt: skip
    finally:
        stop(master)
    text = log.read_text(errors="replace")
    if "Traceback" in text or "WORKER TIMEOUT" in text:
        print(f"  ({worker_class}: the log has errors, see {log})", file=sys.stderr)
    return row


async def run_peer_row(
    name: str,
    args: list[str],
    port: int,
    path: str,
    body: bytes,
    clients: int,
    timeout: float,
    tmp: Path,
    env: dict[str, str] | None = None,
    headers: str = "",
) -> Row:
    process = spawn(args, env, log=tmp / f"{name.split(maxsplit=1)[0]}.log")
    try:
        await wait_for_port(port, 120)
        await asyncio.sleep(0.5)
        return await measure_server(name, port, path, body, clients, timeout, [process.pid], headers=headers)
    finally:
        stop(process)


async def scenario(args: argparse.Namespace) -> list[dict[str, Any]]:
    model = f"d{args.deltas}x{args.seconds / args.deltas:g}"
    messages = [{"role": "user", "content": "Tell me a long story."}]
    app_body = json.dumps({"model": f"openai/{model}", "messages": messages, "stream": True}).encode()
    upstream_body = json.dumps({"model": model, "messages": messages, "stream": True}).encode()
    timeout = args.seconds * 3 + 30
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-streams-") as folder:
        tmp = Path(folder)
        upstream_port = free_port()
        upstream = spawn([PYTHON, __file__, "--serve-upstream", str(upstream_port)], log=tmp / "upstream.log")
        try:
            await wait_for_port(upstream_port)
            direct = await measure_server(
                "upstream alone", upstream_port, "/v1/chat/completions", upstream_body, args.clients,
                timeout, [upstream.pid],
            )  # fmt: skip
            rows.append(direct.summary())
            if args.gateway:
                gateway_port = free_port()
                rows.append((await run_peer_row(
                    "asyncio gateway (AsyncOpenAI, 1 process)",
                    [PYTHON, __file__, "--serve-gateway", str(gateway_port), str(upstream_port)],
                    gateway_port, "/api/chat", upstream_body, args.clients, timeout, tmp,
                )).summary())  # fmt: skip
            if args.litellm:
                litellm = await run_litellm_row(
                    args.litellm, upstream_port, model, args.clients, timeout, tmp
                )
                rows.append(litellm)
            for worker_class in args.classes.split(","):
                row = await run_gunicorn_row(
                    worker_class, upstream_port, app_body, args.clients, timeout, args.probe, tmp
                )
                rows.append(row.summary())
        finally:
            stop(upstream)
    return rows


async def run_litellm_row(
    litellm: str, upstream_port: int, model: str, clients: int, timeout: float, tmp: Path
) -> dict[str, Any]:
    port = free_port()
    master_key = "sk-bench-" + secrets.token_hex(16)
    config = tmp / "litellm.yaml"
    config.write_text(
        "model_list:\n"
        f"  - model_name: {model}\n"
        "    litellm_params:\n"
        f"      model: openai/{model}\n"
        f"      api_base: http://127.0.0.1:{upstream_port}/v1\n"
        "      api_key: sk-bench\n"
    )
    body = json.dumps(
        {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    ).encode()
    row = await run_peer_row(
        "LiteLLM proxy (1 worker)",
        [litellm, "--config", str(config), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"],
        port, "/v1/chat/completions", body, clients, timeout, tmp,
        # Everything on this machine: the bundled model cost map, no telemetry; a master key it requires.
        {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_TELEMETRY": "False",
         "LITELLM_MASTER_KEY": master_key},
        f"Authorization: Bearer {master_key}\r\n",
    )  # fmt: skip
    return row.summary()


async def first_call(
    worker_class: str, preload: bool, tmp: Path, upstream_port: int, warm: int = 3 if SMOKE else 20
) -> dict[str, Any]:
    """A fresh gunicorn (``-w 1``): its first ``/api/chat`` against the median of the ``warm`` after it."""
    port = free_port()
    env = app_env(worker_class, upstream_port, tmp, PORT=str(port))
    log = tmp / f"first-{worker_class}-{preload}.log"
    args = [GUNICORN, "-c", "gunicorn.conf.py", "-w", "1", *(["--preload"] if preload else []), "wsgi:app"]
    master = spawn(args, env, log)
    body = json.dumps({"model": "openai/d1x0", "messages": [{"role": "user", "content": "hi"}]}).encode()
    try:
        await wait_for_port(port)
        while " warm: " not in log.read_text(errors="replace"):
            await asyncio.sleep(0.05)
        timings = []
        for _ in range(warm + 1):
            started = time.perf_counter()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(
                b"POST /api/chat HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            answer = await reader.read()
            writer.close()
            assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
            timings.append(time.perf_counter() - started)
    finally:
        stop(master)
    warm_median = statistics.median(timings[1:])
    return {"first_ms": timings[0] * 1000, "warm_ms": warm_median * 1000, "ratio": timings[0] / warm_median}


async def first_call_scenario(processes: int) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-first-") as folder:
        tmp = Path(folder)
        upstream_port = free_port()
        upstream = spawn([PYTHON, __file__, "--serve-upstream", str(upstream_port)], log=tmp / "upstream.log")
        try:
            await wait_for_port(upstream_port)
            for worker_class in ("gthread", "gevent"):
                for preload in (False, True):
                    runs = [
                        await first_call(worker_class, preload, tmp, upstream_port) for _ in range(processes)
                    ]
                    ratios = sorted(run["ratio"] for run in runs)
                    rows.append({
                        "server": f"{worker_class}{' --preload' if preload else ''}",
                        "ratio_median": round(statistics.median(ratios), 2),
                        "ratio_range": [round(ratios[0], 2), round(ratios[-1], 2)],
                        "first_ms": [round(run["first_ms"], 1) for run in runs],
                        "warm_ms": [round(run["warm_ms"], 1) for run in runs],
                    })  # fmt: skip
        finally:
            stop(upstream)
    return rows


def print_rows(rows: list[dict[str, Any]], load: str) -> None:
    print(f"concurrent streams ({load}); load average {os.getloadavg()[0]:.2f}")
    header = f"{'server':<42} {'done':>6} {'errors':>8} {'ttfb p50':>9} {'ttfb p99':>9} {'wall':>7}"
    print(f"  {header}  rss MB/worker")
    for row in rows:
        errors = sum(row["errors"].values())
        rss = ", ".join(f"{r:.0f}" for r in row["rss_mb_per_worker"])
        print(
            f"  {row['server']:<42} {row['completed']:>6} {errors:>8} {row['ttfb_p50']:>8.3f}s"
            f" {row['ttfb_p99']:>8.3f}s {row['wall']:>6.2f}s  {rss}"
        )
        if row["errors"]:
            print(f"    errors: {row['errors']}")
        if "livez" in row:
            print(f"    /livez during the run: {row['livez']}")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--scenario", choices=["all", "acceptance", "make-run", "first-call", "custom"], default="custom"
    )
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--deltas", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--classes", default="gevent")
    parser.add_argument("--no-gateway", dest="gateway", action="store_false")
    parser.add_argument("--probe", action="store_true", help="time /livez every 0.1 s during the run")
    parser.add_argument("--litellm", help="path of a LiteLLM virtualenv's litellm executable (a peer)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.scenario == "all":  # what `make bench` prints
        return [
            *main(["--scenario", "acceptance", *(["--litellm", args.litellm] if args.litellm else [])]),
            *main(["--scenario", "make-run"]),
            *main(["--scenario", "first-call"]),
        ]
    if args.scenario == "first-call":  # a new worker's first /api/chat against its warm ones
        first = asyncio.run(first_call_scenario(1 if SMOKE else 3))
        print(f"first /api/chat in a new worker vs a warm one (3 processes); load {os.getloadavg()[0]:.2f}")
        for row in first:
            print(f"  {row}")
        return first
    if args.scenario == "make-run":  # `make run`: gthread, its default threads, 32 streams of 5 s
        args.clients, args.deltas, args.seconds, args.classes, args.probe = 32, 10, 5.0, "gthread", True
        args.gateway = False
    elif args.scenario == "acceptance":  # 1,000 streams of 20 deltas over 10 s on gevent
        args.clients, args.deltas, args.seconds, args.classes = 1000, 20, 10.0, "gevent"
    if SMOKE:
        args.clients, args.deltas, args.seconds = min(args.clients, 4), 2, 0.2
    rows = asyncio.run(scenario(args))
    if args.json:
        print(json.dumps(rows))
    else:
        print_rows(rows, f"{args.clients} clients, {args.deltas} deltas over {args.seconds:g} s")
    return rows


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve-upstream"]:
        asyncio.run(serve_upstream(int(sys.argv[2])))
    elif sys.argv[1:2] == ["--serve-gateway"]:
        asyncio.run(serve_gateway(int(sys.argv[2]), f"http://127.0.0.1:{sys.argv[3]}/v1"))
    else:
        main()
