"""Deployment: gunicorn with ``--preload -w 2`` on real PostgreSQL, Redis and a local OpenAI server.

The app under gunicorn is :mod:`tests.gunicorn_app` (the real app plus a
``/_diag`` route). Each gunicorn is started in a session of its own and
killed, with its workers, in a ``finally`` block.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from werkzeug import Request, Response

from app.config import DEFAULTS
from tests.conftest import ROOT, chat_completion
from tests.servers import free_port

GUNICORN = str(Path(sys.executable).with_name("gunicorn"))
#: gunicorn.conf.py's own value; a clean shutdown must finish well inside it.
GRACEFUL_TIMEOUT = 30
#: Variables that must not leak from the machine into the processes under test.
CLEARED = {*DEFAULTS, "TESTING", "FLASK_DEBUG", "FLASK_APP", "PORT", "BIND", "WEB_CONCURRENCY",
           "GUNICORN_THREADS", "GUNICORN_TIMEOUT", "GUNICORN_PRELOAD", "GUNICORN_ACCESS_LOG",
           "GUNICORN_WORKER_CLASS", "GUNICORN_WORKER_CONNECTIONS", "GEVENT_MONITOR_THREAD_ENABLE",
           "GUNICORN_CMD_ARGS", "INSTANCE_PATH", "DOTENV_PATH", "GUNICORN_DIAG_DIR"}  # fmt: skip


def clean_env(tmp_path: Path, **settings: str) -> dict[str, str]:
    """The environment of a child process: no machine settings, no .env, a private instance folder."""
    env = {k: v for k, v in os.environ.items() if k not in CLEARED}
    env.update(INSTANCE_PATH=str(tmp_path / "instance"), DOTENV_PATH=str(tmp_path / "no.env"))
    env.update(settings)
    return env


@dataclass
class Gunicorn:
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def run_gunicorn(env: dict[str, str], *args: str, log: Path) -> Iterator[Gunicorn]:
    """Start gunicorn on ``env["PORT"]``; always kill it and its workers on the way out."""
    control_dir = tempfile.mkdtemp(prefix="gctl-")  # short: a Unix socket path has ~100 chars
    with log.open("wb") as out:
        process = subprocess.Popen(
            [GUNICORN, "-c", "gunicorn.conf.py", "--control-socket", f"{control_dir}/gunicorn.ctl", *args],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        yield Gunicorn(process, int(env["PORT"]), log)
    finally:
        if process.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
        shutil.rmtree(control_dir, ignore_errors=True)


def wait_until_listening(server: Gunicorn, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"gunicorn exited with {server.process.returncode}:\n{server.output()}")
        with suppress(OSError), socket.create_connection(("127.0.0.1", server.port), timeout=0.5):
            return
        time.sleep(0.05)
    pytest.fail(f"gunicorn did not listen on {server.port} within {timeout} s:\n{server.output()}")


def get_json(url: str) -> dict[str, Any]:
    """One request on a connection of its own (urllib sends ``Connection: close``)."""
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        return json.load(response)


def diag_until_two_workers(port: int, max_requests: int = 200, budget: float = 20.0) -> list[dict[str, Any]]:
    """Concurrent ``/_diag`` requests until two workers answered (bounded), then a few more."""
    url = f"http://127.0.0.1:{port}/_diag"
    answers: list[dict[str, Any]] = []
    deadline = time.monotonic() + budget
    with ThreadPoolExecutor(max_workers=4) as pool:
        while len(answers) < max_requests and time.monotonic() < deadline:
            answers += pool.map(get_json, [url] * 4)
            if len({a["pid"] for a in answers}) >= 2 and len(answers) >= 8:
                break
    return answers


# --- the local OpenAI server ---------------------------------------------------


def openai_upstream(local_server: Any) -> None:
    """Chat completions, a little slow so that concurrent requests spread over both workers."""

    def handler(request: Request) -> Response:
        time.sleep(0.02)
        return Response(json.dumps(chat_completion("from upstream")), content_type="application/json")

    local_server.expect_request("/v1/chat/completions", method="POST").respond_with_handler(handler)


def upstream_connections(local_server: Any) -> dict[int, set[int]]:
    """Client ports the local server saw, by the worker pid each request named."""
    ports: dict[int, set[int]] = defaultdict(set)
    for request, _response in local_server.log:
        ports[int(request.headers["X-Worker-Pid"])].add(int(request.environ["REMOTE_PORT"]))
    return ports


def redis_client_ids(redis_url: str) -> set[str]:
    """``CLIENT LIST`` ids, asked over a connection of our own (excluded from the answer)."""
    import redis

    observer = redis.Redis.from_url(redis_url, socket_timeout=2)
    try:
        own = str(observer.client_id())
        return {c["id"] for c in observer.client_list()} - {own}
    finally:
        observer.close()


def pg_backends(postgres_server: Any) -> set[int]:
    out = postgres_server.psql(
        "SELECT pid FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
    )
    return {int(line) for line in out.split()}


def eventually(check: Any, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# --- gunicorn --preload -w 2 ---------------------------------------------------


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.parametrize(
    ("worker_class", "threads"),
    [("gthread", "1"), ("gthread", "4"), ("gevent", "1")],
    ids=["gthread-1", "gthread-4", "gevent"],
)
def test_preload_two_workers_each_build_their_own_clients_and_close_them_on_exit(
    worker_class, threads, tmp_path, postgres_server, redis_server, local_server
):
    openai_upstream(local_server)
    report_dir = tmp_path / "reports"
    report_dir.mkdir()
    env = clean_env(
        tmp_path,
        PORT=str(free_port()),
        GUNICORN_WORKER_CLASS=worker_class,
        GUNICORN_THREADS=threads,
        SECRET_KEY=secrets.token_hex(32),
        DATABASE_URL=postgres_server.url,
        REDIS_URL=redis_server.url,
        OPENAI_API_KEY="sk-gunicorn-test",
        OPENAI_BASE_URL=local_server.url_for("/v1"),
        GUNICORN_DIAG_DIR=str(report_dir),
    )
    redis_before = redis_client_ids(redis_server.url)
    with run_gunicorn(
        env, "--preload", "-w", "2", "tests.gunicorn_app:app", log=tmp_path / "g.log"
    ) as server:
        wait_until_listening(server)
        master = server.process.pid
        try:
            answers = diag_until_two_workers(server.port)
        except OSError as exc:
            pytest.fail(f"/_diag failed: {exc!r}; gunicorn said:\n{server.output()}")
        by_worker: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for answer in answers:
            by_worker[answer["pid"]].append(answer)
        assert len(by_worker) == 2, f"{len(answers)} requests reached only {sorted(by_worker)}"
        assert master not in by_worker
        redis_running = redis_client_ids(redis_server.url)
        pg_running = pg_backends(postgres_server)

        for pid, seen in by_worker.items():
            first = seen[0]
            assert first["content"] == "from upstream"
            # --preload: the module (and the app) was imported once, in the master ...
            assert {a["master_pid"] for a in seen} == {a["ppid"] for a in seen} == {master}
            # ... which imported the SDKs of the configured services, but opened no database
            # connection and built no client (importing is fork-safe, clients are not) ...
            assert first["master_state"] == {
                "sdks_loaded": ["httpx2", "openai", "redis"], "db_connections": False, "clients_built": [],
            }  # fmt: skip
            # ... and handed no client down: each worker built its own. The LLM clients were built
            # when the worker warmed up, before its first request; Redis and the database connect
            # on first use.
            assert first["first_use"]["inherited_clients"] == []
            assert first["first_use"]["sdks_loaded"] == ["httpx2", "openai", "redis"]
            built = first["first_use"]["clients_built"]
            assert built["openai_service"]["default"] is True
            assert built["redis_service"]["redis"] is False
            assert built["db_service"]["database"] is False
            assert first["worker"] == {
                "kind": worker_class,
                "concurrency": 1000 if worker_class == "gevent" else int(threads),
                "gevent_patched": worker_class == "gevent",
            }
            # One client per worker, reused by every request it serves.
            assert {(a["openai_client"], a["openai_client_again"]) for a in seen} == {
                (first["openai_client"], first["openai_client"])
            }
            assert {a["redis_client"] for a in seen} == {first["redis_client"]}

        (one, two) = by_worker.values()
        pg_one, pg_two = ({a["pg_backend_pid"] for a in s} for s in (one, two))
        redis_one, redis_two = ({str(a["redis_client_id"]) for a in s} for s in (one, two))
        assert not pg_one & pg_two, "two workers shared a PostgreSQL backend"
        assert not redis_one & redis_two, "two workers shared a Redis connection"
        assert pg_one | pg_two <= pg_running
        assert redis_one | redis_two <= redis_running
        if threads == "1" and worker_class == "gthread":  # one thread: one request, one connection at a time
            assert len(pg_one) == len(pg_two) == len(redis_one) == len(redis_two) == 1

        ports = upstream_connections(local_server)
        assert set(ports) == set(by_worker)
        (ports_one, ports_two) = ports.values()
        assert not ports_one & ports_two, "two workers shared a connection to the OpenAI server"

        # A graceful stop: SIGTERM, the workers run worker_exit, everything exits 0.
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        try:
            code = server.process.wait(timeout=GRACEFUL_TIMEOUT + 5)
        except subprocess.TimeoutExpired:
            pytest.fail(f"gunicorn did not stop after SIGTERM:\n{server.output()}")
        elapsed = time.monotonic() - started
        output = server.output()
        assert code == 0, output
        assert elapsed < GRACEFUL_TIMEOUT / 2, f"stopping took {elapsed:.1f} s"
        for pid in by_worker:
            assert f"Worker exiting (pid: {pid})" in output
        assert "Exception during worker exit" not in output, output
        assert "Traceback" not in output, output

    # Each worker, after worker_exit and while still alive, found its clients closed:
    # the servers no longer listed its connections, so the kernel did not have to end them.
    for pid in by_worker:
        path = report_dir / f"exit-{pid}.json"
        assert path.is_file(), f"worker {pid} wrote no exit report:\n{output}"
        report = json.loads(path.read_text())
        assert report["openai_closed"] is True, report
        assert report["redis_connections_gone"] is True, report
        assert report["pg_backends_gone"] is True, report
        assert report["clients_built_at_exit"]["openai_service"]["default"] is False, report
        assert report["clients_built_at_exit"]["redis_service"]["redis"] is False, report

    # And from outside, after the shutdown: Redis and PostgreSQL list none of the workers' connections.
    assert eventually(lambda: redis_client_ids(redis_server.url) <= redis_before)
    assert eventually(lambda: not (pg_one | pg_two) & pg_backends(postgres_server))


@pytest.mark.slow
def test_preload_without_secret_key_stops_gunicorn_with_the_message(tmp_path):
    env = clean_env(tmp_path, PORT=str(free_port()))
    with run_gunicorn(env, "--preload", "wsgi:app", log=tmp_path / "g.log") as server:
        code = server.process.wait(timeout=20)
        output = server.output()
    assert code != 0
    assert "SECRET_KEY must be set outside debug and testing" in output
    assert "Booting worker" not in output


# --- gunicorn.conf.py reads the environment ------------------------------------


def print_config(tmp_path: Path, **settings: str) -> dict[str, str]:
    """gunicorn's own view of the settings: ``--print-config`` (it loads the app, and exits)."""
    env = clean_env(tmp_path, SECRET_KEY=secrets.token_hex(32), **settings)
    out = subprocess.run(
        [GUNICORN, "-c", "gunicorn.conf.py", "--print-config", "wsgi:app"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    values = {}
    for line in out.stdout.splitlines():
        name, sep, value = line.partition("=")
        if sep:
            values[name.strip()] = value.strip()
    return values


@pytest.mark.slow
def test_gunicorn_takes_its_settings_from_the_environment(tmp_path):
    defaults = print_config(tmp_path)
    assert defaults["bind"] == "['127.0.0.1:8000']"
    assert (defaults["workers"], defaults["threads"], defaults["timeout"]) == ("2", "64", "130")
    gthread = (defaults["worker_class"], defaults["worker_connections"], defaults["keepalive"])
    assert gthread == ("gthread", "64", "0")  # a worker takes no connection it has no thread for
    assert defaults["preload_app"] == "False"

    gevent = print_config(tmp_path, GUNICORN_WORKER_CLASS="gevent", GUNICORN_WORKER_CONNECTIONS="500")
    assert (gevent["worker_class"], gevent["worker_connections"], gevent["threads"]) == ("gevent", "500", "1")
    assert print_config(tmp_path, GUNICORN_WORKER_CLASS="gevent")["worker_connections"] == "1000"

    configured = print_config(
        tmp_path, PORT="8123", WEB_CONCURRENCY="3", GUNICORN_THREADS="4",
        GUNICORN_TIMEOUT="7.5", GUNICORN_PRELOAD="true",
    )  # fmt: skip
    assert configured["bind"] == "['127.0.0.1:8123']"
    assert (configured["workers"], configured["threads"]) == ("3", "4")
    assert configured["timeout"] == "8"  # rounded up: 0 would mean "no timeout" to gunicorn
    assert configured["preload_app"] == "True"

    assert print_config(tmp_path, PORT="8123", BIND="0.0.0.0:9000")["bind"] == "['0.0.0.0:9000']"


def run_conf(tmp_path: Path, **settings: str) -> dict[str, Any]:
    """Execute gunicorn.conf.py as gunicorn does (as a file), in a fresh interpreter."""
    code = (
        "import json, runpy\n"
        "try:\n"
        "    ns = runpy.run_path('gunicorn.conf.py')\n"
        "except Exception as exc:\n"
        "    print(json.dumps({'error': type(exc).__name__, 'message': str(exc)}))\n"
        "else:\n"
        "    keys = ('bind', 'workers', 'threads', 'timeout', 'graceful_timeout', 'preload_app',\n"
        "            'worker_class', 'worker_connections')\n"
        "    print(json.dumps({k: ns[k] for k in keys} | {'worker_exit': callable(ns['worker_exit'])}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=clean_env(tmp_path, **settings),
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    return json.loads(out.stdout)


@pytest.mark.slow
def test_gunicorn_conf_values(tmp_path):
    values = run_conf(
        tmp_path, PORT="9001", WEB_CONCURRENCY="5", GUNICORN_THREADS="3", GUNICORN_TIMEOUT="0.5"
    )  # fmt: skip
    assert values == {
        "bind": "127.0.0.1:9001", "workers": 5, "threads": 3, "timeout": 1,
        "graceful_timeout": GRACEFUL_TIMEOUT, "preload_app": False, "worker_exit": True,
        "worker_class": "gthread", "worker_connections": 3,
    }  # fmt: skip
    zero = run_conf(tmp_path, WEB_CONCURRENCY="0", GUNICORN_THREADS="0")
    assert (zero["workers"], zero["threads"], zero["worker_connections"]) == (1, 1, 1)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("GUNICORN_TIMEOUT", "abc", "GUNICORN_TIMEOUT must be a positive number of seconds, got 'abc'"),
        ("GUNICORN_TIMEOUT", "0", "GUNICORN_TIMEOUT must be a positive number of seconds, got '0'"),
        ("WEB_CONCURRENCY", "-1", "WEB_CONCURRENCY must be a whole number of 0 or more, got '-1'"),
        ("GUNICORN_THREADS", "two", "GUNICORN_THREADS must be a whole number of 0 or more, got 'two'"),
        ("PORT", "http", "PORT must be a whole number of 0 or more, got 'http'"),
        ("PORT", "70000", "PORT must be a TCP port from 1 to 65535, got 70000"),
        ("GUNICORN_PRELOAD", "maybe", "GUNICORN_PRELOAD must be true or false, got 'maybe'"),
        ("GUNICORN_WORKER_CLASS", "sync", "GUNICORN_WORKER_CLASS must be one of gthread, gevent, got 'sync'"),
    ],
)
def test_gunicorn_conf_bad_value_is_a_config_error_naming_the_key(tmp_path, key, value, message):
    assert run_conf(tmp_path, **{key: value}) == {"error": "ConfigError", "message": message}


@pytest.mark.slow
def test_gunicorn_reports_a_bad_setting_and_exits(tmp_path):
    env = clean_env(tmp_path, SECRET_KEY=secrets.token_hex(32), GUNICORN_TIMEOUT="abc")
    out = subprocess.run(
        [GUNICORN, "-c", "gunicorn.conf.py", "--print-config", "wsgi:app"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert out.returncode != 0
    assert "ConfigError: GUNICORN_TIMEOUT must be a positive number of seconds, got 'abc'" in out.stderr


# --- wsgi.py --------------------------------------------------------------------


def import_wsgi(tmp_path: Path, **settings: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "import wsgi; print(type(wsgi.app).__name__, wsgi.app.debug)"],
        cwd=ROOT, env=clean_env(tmp_path, **settings), capture_output=True, text=True, timeout=30,
    )  # fmt: skip


@pytest.mark.slow
def test_wsgi_refuses_to_start_without_a_secret_key(tmp_path):
    out = import_wsgi(tmp_path)
    assert out.returncode != 0
    assert "ConfigError: SECRET_KEY must be set outside debug and testing" in out.stderr

    weak = import_wsgi(tmp_path, SECRET_KEY="changeme")
    assert weak.returncode != 0
    assert "SECRET_KEY must be a random string of at least 32 characters" in weak.stderr
    assert "changeme" not in weak.stderr


@pytest.mark.slow
def test_wsgi_starts_in_debug_or_with_a_strong_key(tmp_path):
    debug = import_wsgi(tmp_path, FLASK_DEBUG="1")
    assert debug.returncode == 0, debug.stderr
    assert debug.stdout.split() == ["Flask", "True"]

    production = import_wsgi(tmp_path, SECRET_KEY=secrets.token_hex(32))
    assert production.returncode == 0, production.stderr
    assert production.stdout.split() == ["Flask", "False"]
