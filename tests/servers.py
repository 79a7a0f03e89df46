"""Real servers for the test session: a private redis-server and PostgreSQL cluster.

Each runs on a free port on 127.0.0.1 in a temporary folder and is stopped
when the session ends. PostgreSQL refuses to run as root, so as root the
cluster runs as the ``postgres`` user that Debian's package creates.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


@dataclass
class RedisServer:
    """A redis-server process that tests may stop and start again on the same port."""

    port: int
    workdir: Path
    password: str | None = None
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (make test installs it from Debian)")
        args = [
            binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.workdir),
            "--daemonize",
            "no",
        ]
        if self.password:
            args += ["--requirepass", self.password]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port)
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None


def start_redis(password: str | None = None) -> RedisServer:
    return RedisServer(free_port(), Path(tempfile.mkdtemp(prefix="redis-")), password).start()


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


GEMINI_REPLY = {
    "candidates": [{"content": {"parts": [{"text": "hi"}], "role": "model"}, "finishReason": "STOP"}],
    "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 1, "totalTokenCount": 4},
}


def chat_completion(content: str = "hello", model: str = "gpt-4o-mini") -> dict[str, Any]:
    """A chat completion as the OpenAI API sends it."""
    return {
        "id": "chatcmpl-123",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": model,
        "choices": [
            {
                "index": 0,
                "finish_reason": "stop",
                "message": {"role": "assistant", "content": content, "refusal": None},
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
    }


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    port: int

    @property
    def json(self) -> Any:
        return json.loads(self.body)


Responder = Callable[[Recorded], tuple[int, dict[str, str], bytes]]


def default_responder(request: Recorded) -> tuple[int, dict[str, str], bytes]:
    """Chat completions for OpenAI paths, a generateContent reply for Gemini paths."""
    if request.path.split("?", 1)[0].endswith(":generateContent"):
        return 200, {"Content-Type": "application/json"}, json.dumps(GEMINI_REPLY).encode()
    if request.path.split("?", 1)[0].endswith("/chat/completions"):
        model = request.json.get("model", "gpt-4o-mini") if request.body else "gpt-4o-mini"
        return 200, {"Content-Type": "application/json"}, json.dumps(chat_completion("hi", model)).encode()
    return 404, {"Content-Type": "application/json"}, b'{"error": {"message": "not found"}}'


class KeepAliveServer:
    """A threaded HTTP/1.1 server on 127.0.0.1 that keeps connections alive."""

    def __init__(self, responder: Responder = default_responder) -> None:
        self.requests: list[Recorded] = []
        self.closed_ports: set[int] = set()
        self.responder = responder
        self._changed = threading.Condition()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def handle(self) -> None:
                try:
                    super().handle()
                finally:
                    with owner._changed:
                        owner.closed_ports.add(self.client_address[1])
                        owner._changed.notify_all()

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                request = Recorded(
                    self.command,
                    self.path,
                    {k.lower(): v for k, v in self.headers.items()},
                    self.rfile.read(length),
                    self.client_address[1],
                )
                with owner._changed:
                    owner.requests.append(request)
                    owner._changed.notify_all()
                status, headers, body = owner.responder(request)
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _serve

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def url_for(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def wait_closed(self, port: int, timeout: float = 5.0) -> bool:
        """Whether the client closed its connection from ``port`` (waits for it, up to ``timeout``)."""
        with self._changed:
            return self._changed.wait_for(lambda: port in self.closed_ports, timeout)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
