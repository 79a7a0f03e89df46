"""Real servers for tests: redis-server, PostgreSQL, and one scripted upstream HTTP server.

redis-server and PostgreSQL each run on a free port on 127.0.0.1 in a
temporary folder and are stopped when the session ends. PostgreSQL refuses to
run as root, so as root the cluster runs as the ``postgres`` user that
Debian's package creates.

:class:`ScriptedServer` stands in for every HTTP upstream (OpenAI, Gemini,
Anthropic, OpenAI-compatible servers): the one place where tests script
answers, streams, hangs and dropped connections, and read back what arrived.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pwd
import secrets
import select
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from app.testing.servers import RedisServer, free_port, start_redis, wait_for_port


def _pg_bin(name: str) -> str:
    found = shutil.which(name)
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)
    if candidates:
        return candidates[0]  # Debian's real binaries, not the pg_wrapper scripts
    if found:
        return found
    raise RuntimeError(f"{name} not found (make test installs PostgreSQL from Debian)")


@dataclass
class PostgresServer:
    port: int
    datadir: Path
    user: str
    password: str
    database: str
    run_as: str | None

    @property
    def url(self) -> str:
        return f"postgresql://{self.user}:{self.password}@127.0.0.1:{self.port}/{self.database}"

    def _run(self, *args: str) -> None:
        command = list(args)
        if self.run_as:
            command = ["runuser", "-u", self.run_as, "--", *command]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def start(self) -> None:
        self._run(
            _pg_bin("pg_ctl"),
            "-D",
            str(self.datadir),
            "-w",
            "-t",
            "60",
            "-l",
            str(self.datadir / "server.log"),
            "-o",
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.datadir} -c fsync=off",
            "start",
        )

    def stop(self) -> None:
        self._run(_pg_bin("pg_ctl"), "-D", str(self.datadir), "-m", "fast", "-w", "stop")

    def psql(self, sql: str) -> str:
        env = {**os.environ, "PGPASSWORD": self.password}
        out = subprocess.run(
            [
                _pg_bin("psql"),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                self.user,
                "-d",
                self.database,
                "-Atc",
                sql,
            ],
            check=True,
            capture_output=True,
            text=True,
            env=env,
        )
        return out.stdout.strip()


def start_postgres() -> PostgresServer:
    run_as = "postgres" if os.geteuid() == 0 else None
    base = Path(tempfile.mkdtemp(prefix="pg-"))
    datadir = base / "data"
    datadir.mkdir()
    if run_as:
        entry = pwd.getpwnam(run_as)
        os.chown(base, entry.pw_uid, entry.pw_gid)
        os.chown(datadir, entry.pw_uid, entry.pw_gid)
    server = PostgresServer(free_port(), datadir, "app", "pg-" + secrets.token_hex(8), "app", run_as)
    pwfile = base / "pw"
    pwfile.write_text(server.password)
    if run_as:
        os.chown(pwfile, entry.pw_uid, entry.pw_gid)
    server._run(
        _pg_bin("initdb"),
        "-D",
        str(datadir),
        "-U",
        server.user,
        "--pwfile",
        str(pwfile),
        "-A",
        "scram-sha-256",
        "--no-sync",
        "-E",
        "UTF8",
    )
    server.start()
    env = {**os.environ, "PGPASSWORD": server.password}
    subprocess.run(
        [_pg_bin("createdb"), "-h", "127.0.0.1", "-p", str(server.port), "-U", server.user, server.database],
        check=True,
        env=env,
        capture_output=True,
    )
    return server


# --- the scripted upstream HTTP server --------------------------------------------------------

#: Seconds the server waits on a test (a gate, a hung request) before giving up: a failure, never a hang.
WAIT = 10.0


class Action(Enum):
    """What the server does instead of answering (as a whole reply) or in the middle of a streamed body."""

    HANG = "hang"  # read the request, never answer; hold the connection until the client leaves
    CLOSE = "close"  # drop the connection (before the status line, or mid-body in ``chunks``)


HANG = Action.HANG
CLOSE = Action.CLOSE

#: One item of a streamed body: data to send as one HTTP chunk, a pause in seconds, a gate the
#: test opens (``threading.Event``), or ``CLOSE`` to drop the connection there.
Chunk = bytes | str | float | threading.Event | Action


@dataclass
class Reply:
    """One scripted answer. ``body`` as JSON when a dict or list; ``chunks`` stream it instead."""

    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    #: A streamed body (``Transfer-Encoding: chunked``), one flushed write per item.
    chunks: Sequence[Chunk] | None = None
    #: ``HANG`` or ``CLOSE`` instead of any answer.
    action: Action | None = None
    #: Seconds to wait before the status line (a slow upstream).
    delay: float = 0.0

    @classmethod
    def stream(cls, chunks: Sequence[Chunk], status: int = 200, **headers: str) -> Reply:
        return cls(status, headers={"Content-Type": "text/event-stream", **headers}, chunks=list(chunks))


@dataclass
class Recorded:
    """One request as it reached the server, and how its answer ended."""

    method: str
    #: The path without its query string; ``target`` is the request line's whole target.
    path: str
    target: str
    headers: dict[str, str]
    body: bytes
    #: The client's port: one per connection, so equal ports mean a reused connection.
    port: int
    chunks_sent: int = 0
    #: None while answering, then "complete", "client_closed" (the client went away first),
    #: "closed" (the script dropped it), "hung" (the server stopped first) or "timed_out" (a gate).
    outcome: str | None = None
    finished: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def json(self) -> Any:
        return json.loads(self.body) if self.body else None

    @property
    def query(self) -> dict[str, str]:
        return dict(parse_qsl(urlsplit(self.target).query))


Responder = Callable[[Recorded], Reply]


def default_responder(request: Recorded) -> Reply:
    """A chat completion for OpenAI paths, a generateContent reply for Gemini paths, else 404."""
    from tests.payloads import chat_completion, gemini_reply, gemini_text

    if request.path.endswith(":generateContent"):
        return Reply(body=gemini_reply(gemini_text("hi"), usage=(3, 1), model_version=None))
    if request.path.endswith("/chat/completions"):
        model = (request.json or {}).get("model", "gpt-4o-mini")
        return Reply(body=chat_completion("hi", model))
    return Reply(404, {"error": {"message": f"no script for {request.method} {request.path}"}})


class _Handler(BaseHTTPRequestHandler):
    """Reads each request of a kept-alive connection, records it, and plays the script's reply."""

    protocol_version = "HTTP/1.1"
    server: ScriptedServer  # type: ignore[assignment]

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while size := int(self.rfile.readline().split(b";")[0], 16):
                data += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
            return data
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _serve(self) -> None:
        request = Recorded(
            self.command,
            urlsplit(self.path).path,
            self.path,
            {k.lower(): v for k, v in self.headers.items()},
            self._read_body(),
            self.client_address[1],
        )
        owner = self.server
        reply = owner._record(request)
        try:
            request.outcome = self._play(reply, request)
        except OSError:  # BrokenPipe, ConnectionReset: a write found the client gone
            request.outcome = self._gone()
        finally:
            if request.outcome != "complete":
                self.close_connection = True
            request.finished.set()
            with owner._changed:
                owner._changed.notify_all()

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve

    def _play(self, reply: Reply, request: Recorded) -> str:
        if reply.delay and not self._wait(reply.delay):
            return self._gone()
        if reply.action is Action.CLOSE:
            self._drop()
            return "closed"
        if reply.action is Action.HANG:
            while self._wait(WAIT):  # until the client leaves or the server stops
                pass
            return self._gone()
        self.send_response(reply.status)
        body = reply.body
        if isinstance(body, dict | list):
            body, content_type = json.dumps(body).encode(), "application/json"
        else:
            body = body.encode() if isinstance(body, str) else (body or b"")
            content_type = "text/event-stream" if reply.chunks is not None else "application/json"
        headers = {"Content-Type": content_type, **reply.headers}
        for name, value in headers.items():
            self.send_header(name, value)
        if reply.chunks is None:
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return "complete"
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for item in reply.chunks:
            if isinstance(item, Action):
                self._drop()
                return "closed"
            if isinstance(item, float | int):
                if not self._wait(float(item)):
                    return self._gone()
                continue
            if isinstance(item, threading.Event):
                deadline = time.monotonic() + WAIT
                while not item.wait(0.01):
                    if self._peer_closed() or self.server.stopping.is_set():
                        return self._gone()
                    if time.monotonic() > deadline:
                        self._drop()
                        return "timed_out"
                continue
            if self._peer_closed():
                return self._gone()
            data = item.encode() if isinstance(item, str) else item
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            request.chunks_sent += 1
        self.wfile.write(b"0\r\n\r\n")
        return "complete"

    def _gone(self) -> str:
        return "hung" if self.server.stopping.is_set() else "client_closed"

    def _drop(self) -> None:
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def _peer_closed(self, timeout: float = 0.0) -> bool:
        """Whether the client closed its end (EOF), waiting up to ``timeout`` for a sign of it."""
        readable, _, _ = select.select([self.connection], [], [], timeout)
        if not readable:
            return False
        try:
            if self.connection.recv(1, socket.MSG_PEEK) == b"":
                return True
        except OSError:
            return True
        time.sleep(min(timeout, 0.01))  # data, not EOF (a client's next bytes): not a sign of leaving
        return False

    def _wait(self, seconds: float) -> bool:
        """Sleep ``seconds`` unless the client leaves or the server stops first (then False)."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if self.server.stopping.is_set() or self._peer_closed(min(left, 0.05)):
                return False
        return not self.server.stopping.is_set()


class ScriptedServer:
    """A real HTTP/1.1 upstream on 127.0.0.1 that plays a script of replies per path.

    ``script(path, *replies)`` queues replies for a path (without its query);
    a path with nothing queued gets ``responder(request)``. Every request is
    recorded in ``requests`` with how its answer ended, and every connection's
    end in ``closed_ports``, so tests assert on what really reached the server
    and on what the client did with the connection. It starts and stops in
    about a millisecond: the accept loop blocks in ``accept()`` (no polling),
    and ``stop()`` shuts the listener and every open connection down.
    """

    def __init__(self, responder: Responder = default_responder, *, mute: bool = False) -> None:
        self.responder = responder
        #: Accept connections and never read from or write to them: a hung peer of any protocol
        #: (redis, PostgreSQL), where ``HANG`` needs an HTTP request first.
        self.mute = mute
        self.accepted = 0
        self.requests: list[Recorded] = []
        self.closed_ports: set[int] = set()
        self.stopping = threading.Event()
        self._scripts: dict[str, deque[Reply]] = defaultdict(deque)
        self._changed = threading.Condition()
        self._connections: set[socket.socket] = set()
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.port = int(self._listener.getsockname()[1])
        self._thread = threading.Thread(target=self._accept, name=f"upstream-{self.port}", daemon=True)
        self._thread.start()

    # --- scripting ---

    def script(self, path: str, *replies: Reply | Action | dict[str, Any] | list[Any]) -> None:
        """Queue replies for ``path``, one per request, in order (a dict or list: a 200 JSON reply)."""
        with self._changed:
            for reply in replies:
                if isinstance(reply, Action):
                    reply = Reply(action=reply)
                self._scripts[path].append(reply if isinstance(reply, Reply) else Reply(body=reply))

    def clear(self) -> None:
        """Forget the scripts and the recorded requests (for a server shared between tests)."""
        with self._changed:
            self._scripts.clear()
            self.requests.clear()
            self.closed_ports.clear()

    def url_for(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # --- what reached the server ---

    def requests_to(self, path: str) -> list[Recorded]:
        return [request for request in self.requests if request.path == path]

    def only_request(self) -> Recorded:
        assert len(self.requests) == 1, f"{len(self.requests)} requests reached the server: {self.requests}"
        return self.requests[0]

    def wait_for_requests(self, count: int, timeout: float = 5.0) -> list[Recorded]:
        with self._changed:
            self._changed.wait_for(lambda: len(self.requests) >= count, timeout)
            return list(self.requests)

    def wait_closed(self, port: int, timeout: float = 5.0) -> bool:
        """Whether the client closed its connection from ``port`` (waits for it, up to ``timeout``)."""
        with self._changed:
            return self._changed.wait_for(lambda: port in self.closed_ports, timeout)

    # --- running ---

    def _record(self, request: Recorded) -> Reply:
        with self._changed:
            self.requests.append(request)
            self._changed.notify_all()
            queue = self._scripts.get(request.path)
            if queue:
                return queue.popleft()
        return self.responder(request)

    def _accept(self) -> None:
        while True:
            try:
                connection, address = self._listener.accept()
            except OSError:
                return  # stop() shut the listener down
            with self._changed:
                if self.stopping.is_set():
                    connection.close()
                    return
                self._connections.add(connection)
                self.accepted += 1
            threading.Thread(target=self._handle, args=(connection, address), daemon=True).start()

    def _handle(self, connection: socket.socket, address: tuple[str, int]) -> None:
        try:
            if self.mute:
                self.stopping.wait()
            else:
                _Handler(connection, address, self)  # type: ignore[arg-type]
        except OSError:
            pass
        finally:
            with self._changed:
                self._connections.discard(connection)
                self.closed_ports.add(address[1])
                self._changed.notify_all()
            with contextlib.suppress(OSError):
                connection.close()

    def stop(self) -> None:
        """Stop accepting and shut every open connection down: hung and streaming handlers end at once."""
        self.stopping.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._thread.join(timeout=1)
        with self._changed:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> ScriptedServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


#: The redis-server launcher moved to the test kit (app.testing.servers); these names stay importable here.
__all__ = ["RedisServer", "free_port", "start_redis", "wait_for_port"]
