"""app.serving in one process: capacity, the timeouts' order, warm imports, disconnects, heartbeats.

The same behaviours under a real gunicorn, both worker classes, are in
tests/test_serving_gunicorn.py.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from app import serving
from app.errors import ConfigError
from app.llm import get_llm
from app.llm.testing import install_fake_llm
from app.serving import disconnect
from app.serving import worker as worker_module
from app.serving.disconnect import client_gone, watch_client
from app.serving.timeouts import check_timeouts, enforce_timeouts
from app.serving.warm import LLM_MACHINERY, sdk_modules
from tests.conftest import CANARY_KEY, ROOT, api_key_headers

MESSAGES = [{"role": "user", "content": "Hi"}]


@pytest.fixture
def as_worker() -> Iterator[None]:
    """Restore this process's worker record after a test that sets it."""
    saved = list(worker_module._current)
    yield
    worker_module._current[:] = saved


# --- capacity -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "concurrency", "capacity"),
    [("gthread", 64, 56), ("gevent", 1000, 992), ("gthread", 4, 3), ("gthread", 1, 1), ("gevent", 16, 14)],
)
def test_the_bulkheads_default_is_the_workers_concurrency_less_a_reserve(
    as_worker, kind, concurrency, capacity
):
    serving.set_worker(kind, concurrency)

    assert serving.llm_capacity() == capacity


def test_outside_gunicorn_the_bulkhead_keeps_its_old_default(as_worker):
    worker_module._current[0] = worker_module.WorkerInfo("unknown", None)

    assert serving.llm_capacity() == serving.FALLBACK_CAPACITY == 32


def test_a_call_past_the_workers_capacity_is_a_503_with_retry_after(as_worker, make_app):
    serving.set_worker("gthread", 4)  # three LLM calls at once, one thread kept for probes
    # A shorter wait for a slot than the default 1 s: the refusal comes sooner, nothing else changes.
    app = make_app(LLM_BULKHEAD_MAX_WAIT=0.1)
    fake = install_fake_llm(app)
    headers = api_key_headers(app, rpm=0, tpm=0)
    with app.app_context():
        for _ in range(3):
            fake.add_stream(["held"])
        streams = [get_llm().chat_stream(MESSAGES, "fake/m") for _ in range(3)]  # each holds a slot
        try:
            response = app.test_client().post(
                "/api/chat", json={"model": "fake/m", "messages": MESSAGES}, headers=headers
            )
        finally:
            for stream in streams:
                stream.close()

    assert response.status_code == 503
    assert response.json["error"]["type"] == "bulkhead_full"
    assert "at most 3" in response.json["error"]["message"]
    assert response.headers["Retry-After"] == "1"
    assert fake.methods == ["stream"] * 3  # the refused call reached no provider


def test_an_interrupted_wait_for_a_slot_gives_back_nothing_it_did_not_hold():
    # A greenlet killed while it waits (its client left) must leave the queue, or the next
    # slot freed would be handed to nobody. gevent patches the process, so in a process of its own.
    code = """
import gevent.monkey; gevent.monkey.patch_all()
import gevent
from app.llm.errors import LLMBulkheadFullError
from app.llm.resilience.bulkhead import Bulkheads
from app.llm.resilience.settings import BulkheadPolicy
bulkheads = Bulkheads()
policy = BulkheadPolicy(max_concurrency=1)
held = bulkheads.slot("p", policy, 5.0)
held.__enter__()
waiter = gevent.spawn(lambda: bulkheads.slot("p", policy, 5.0).__enter__())
gevent.sleep(0.05)
assert bulkheads.waiting("p") == 1
waiter.kill()
assert bulkheads.waiting("p") == 0
held.release()
later = bulkheads.slot("p", policy, 0.0)
later.__enter__()  # the freed slot is there to take, not granted to the dead waiter
print("ok")
"""
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=30, check=False
    )
    assert out.stdout.strip() == "ok", out.stderr


# --- timeouts that nest -----------------------------------------------------------------------


def messages_of(app, worker_timeout):
    return [(d.level, d.message) for d in check_timeouts(app, worker_timeout)]


def test_the_defaults_nest(make_app):
    app = make_app(OPENAI_API_KEY=CANARY_KEY, GEMINI_API_KEY="g" * 39, ANTHROPIC_API_KEY="sk-ant-" + "a" * 30)

    assert messages_of(app, 130) == []


def test_a_worker_timeout_not_longer_than_an_attempt_is_an_error_naming_both(make_app):
    app = make_app(OPENAI_API_KEY=CANARY_KEY)

    assert messages_of(app, 60) == [
        (
            "error",
            "GUNICORN_TIMEOUT (60 s) must be longer than OPENAI_TIMEOUT (60 s) for openai: a worker whose"
            " heartbeat one upstream wait held would be killed before the call could answer its JSON 504",
        )
    ]
    with pytest.raises(ConfigError, match=r"GUNICORN_TIMEOUT \(60 s\) must be longer than OPENAI_TIMEOUT"):
        enforce_timeouts(app, 60)


def test_a_worker_timeout_within_the_deadline_is_a_warning(make_app, caplog):
    app = make_app(OPENAI_API_KEY=CANARY_KEY)

    enforce_timeouts(app, 100)

    assert [r.getMessage() for r in caplog.records if "timeouts out of order" in r.getMessage()] == [
        "timeouts out of order: GUNICORN_TIMEOUT (100 s) is not longer than LLM_DEADLINE (120 s) for openai:"
        " keep the worker timeout the outermost"
    ]


@pytest.mark.parametrize(
    ("settings", "worker_timeout", "expected"),
    [
        (
            {"LLM_ATTEMPT_TIMEOUT": 20},
            15,
            [("error", "GUNICORN_TIMEOUT (15 s) must be longer than LLM_ATTEMPT_TIMEOUT (20 s) for openai")],
        ),
        (
            {"OPENAI_TIMEOUT": 150},
            200,
            [("warning", "OPENAI_TIMEOUT (150 s) is longer than LLM_DEADLINE (120 s) for openai")],
        ),
        (
            {"LLM_POLICY": {"openai": {"deadline": 30}}},
            130,
            [
                (
                    "warning",
                    "OPENAI_TIMEOUT (60 s) is longer than LLM_POLICY['openai'].deadline (30 s) for openai",
                )
            ],
        ),
        (
            {"LLM_SSE_HEARTBEAT": 90},
            130,
            [("warning", "LLM_SSE_HEARTBEAT (90 s) is not shorter than OPENAI_TIMEOUT (60 s) for openai")],
        ),
        (
            {"OPENAI_PROFILES": {"groq": {"api_key": "gsk_" + "k" * 30, "timeout": 140}}},
            130,
            [
                (
                    "warning",
                    "OPENAI_PROFILES['groq'].timeout (140 s) is longer than LLM_DEADLINE (120 s) for groq",
                ),
                (
                    "error",
                    "GUNICORN_TIMEOUT (130 s) must be longer than OPENAI_PROFILES['groq'].timeout (140 s)",
                ),
            ],
        ),
        (
            {"GEMINI_API_KEY": "g" * 39, "GENAI_TIMEOUT": 200},
            130,
            [
                ("warning", "GENAI_TIMEOUT (200 s) is longer than LLM_DEADLINE (120 s) for gemini"),
                ("error", "GUNICORN_TIMEOUT (130 s) must be longer than GENAI_TIMEOUT (200 s) for gemini"),
            ],
        ),
    ],
    ids=["attempt-timeout", "client-timeout", "provider-deadline", "heartbeat", "profile", "gemini"],
)
def test_each_disagreement_names_both_settings(make_app, settings, worker_timeout, expected):
    app = make_app(OPENAI_API_KEY=CANARY_KEY, **settings)

    found = messages_of(app, worker_timeout)

    assert len(found) == len(expected), found
    for (level, message), (expected_level, prefix) in zip(found, expected, strict=True):
        assert (level, message[: len(prefix)]) == (expected_level, prefix)


def test_a_bad_heartbeat_stops_the_app_naming_it(make_app):
    with pytest.raises(
        ConfigError, match="LLM_SSE_HEARTBEAT must be a positive number of seconds, got 'soon'"
    ):
        make_app(LLM_SSE_HEARTBEAT="soon")


# --- warm workers -------------------------------------------------------------------------------


def test_the_sdks_to_import_are_those_of_the_configured_services(make_app):
    assert sdk_modules(make_app()) == []
    assert sdk_modules(make_app(REDIS_URL="redis://127.0.0.1:1")) == ["redis"]
    assert sdk_modules(make_app(OPENAI_API_KEY=CANARY_KEY)) == [
        "openai", "app.llm.providers.openai_provider", *LLM_MACHINERY,
    ]  # fmt: skip
    assert sdk_modules(make_app(GEMINI_API_KEY="g" * 39))[:2] == [
        "google.genai",
        "app.llm.providers.gemini_provider",
    ]


def test_importing_the_sdks_builds_no_client(tmp_path):
    code = """
import json, sys
from app import create_app
from app.serving.warm import import_sdks
app = create_app({"TESTING": True, "INSTANCE_PATH": sys.argv[1], "OPENAI_API_KEY": "sk-test-" + "k" * 20})
before = "openai" in sys.modules
imported = import_sdks(app)
print(json.dumps({"before": before, "after": "openai" in sys.modules, "imported": imported,
                  "built": app.extensions["openai_service"].info()["default"]["client_built"]}))
"""
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["before"] is False  # the app alone imports no SDK
    assert result["after"] is True
    assert "openai" in result["imported"]
    assert result["built"] is False


# --- disconnects ----------------------------------------------------------------------------------


@pytest.fixture
def connection() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(server side, client side) of a real TCP connection on 127.0.0.1."""
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    listener.close()
    yield server, client
    server.close()
    client.close()


def test_a_client_that_closed_or_reset_is_gone(connection):
    server, client = connection
    assert not client_gone(server)

    client.sendall(b"GET /next HTTP/1.1\r\n")  # a pipelined request: bytes to read, the client is there
    assert not client_gone(server)

    client.close()
    assert client_gone(server)


def test_the_watcher_calls_back_once_when_the_client_leaves(connection):
    server, client = connection
    called = threading.Event()
    watch = watch_client(server, called.set)
    assert not called.wait(0.1)

    client.close()

    assert called.wait(1.0)
    watch.stop()


def test_a_stopped_watch_never_calls_back(connection):
    server, client = connection
    called = threading.Event()
    watch_client(server, called.set).stop()

    client.close()

    assert not called.wait(0.3)


# --- SSE heartbeats ---------------------------------------------------------------------------


def test_an_idle_stream_sends_heartbeats_between_its_deltas(make_app):
    # A heartbeat every 0.1 s rather than 15 s, so that a short pause shows them.
    app = make_app(LLM_SSE_HEARTBEAT=0.1)
    fake = install_fake_llm(app)
    fake.add_stream(["Hel", "lo"], delay=0.45)

    response = app.test_client().post(
        "/api/chat",
        json={"model": "fake/m", "messages": MESSAGES, "stream": True},
        headers=api_key_headers(app, rpm=0, tpm=0),
    )
    text = response.get_data(as_text=True)

    assert response.status_code == 200
    assert text.count(": heartbeat\n\n") >= 2
    events = [block for block in text.split("\n\n") if block and not block.startswith(":")]
    assert [block.split("\n")[0] for block in events] == ["event: delta", "event: delta", "event: done"]


def test_an_event_left_over_from_an_earlier_socket_of_the_same_number_is_not_a_disconnect(connection):
    # epoll reports a number; by the time the watcher looks, the socket it was about may have
    # closed and a new request's socket may have the number. That client is still there.
    server, client = connection
    called = threading.Event()
    watch = watch_client(server, called.set)

    disconnect._epoll_watcher()._handle(server.fileno())  # a stale report for this number

    assert not called.wait(0.2)
    client.close()  # and the watch is still armed for the real one
    assert called.wait(1.0)
    watch.stop()


# --- the gthread path in one process: the reader on the worker's loop, the epoll watcher ----------


def test_a_stream_read_on_the_loop_is_stopped_when_its_client_leaves(make_app, upstream, connection):
    # As under gunicorn's gthread worker: the environ carries the client's socket, so the stream
    # is read by a task on the worker's loop, and the epoll watcher stops it when the client goes.
    from tests.test_api_stream import CHAT_PATH, sse_events, trickle

    server, client = connection
    app = make_app(OPENAI_API_KEY=CANARY_KEY, OPENAI_BASE_URL=upstream.url_for("/v1"))
    upstream.script(CHAT_PATH, trickle(100, 0.1))

    response = app.test_client().post(
        "/api/chat",
        json={"model": "openai/m", "messages": MESSAGES, "stream": True},
        headers=api_key_headers(app, rpm=0, tpm=0),
        environ_overrides={"gunicorn.socket": server},
        buffered=False,
    )
    events = sse_events(line.decode() + "\n" for piece in response.response for line in piece.split(b"\n"))
    assert next(events) == ("delta", {"text": "t0 "})

    client.close()

    exchange = upstream.only_request()
    assert exchange.finished.wait(1.0), "the upstream was still streaming a second after the client left"
    assert exchange.outcome == "client_closed"
    response.close()


def test_a_request_whose_client_left_while_it_waited_is_never_sent(make_app, upstream, connection):
    server, client = connection
    app = make_app(OPENAI_API_KEY=CANARY_KEY, OPENAI_BASE_URL=upstream.url_for("/v1"))
    headers = api_key_headers(app, rpm=0, tpm=0)
    client.close()  # gone before the app got to the request

    response = app.test_client().post(
        "/api/chat",
        json={"model": "openai/m", "messages": MESSAGES, "stream": True},
        headers=headers,
        environ_overrides={"gunicorn.socket": server},
    )

    assert response.status_code == 499
    assert upstream.requests == []


# --- warm workers, in one process -------------------------------------------------------------------


def test_warming_a_worker_builds_its_llm_clients_and_sends_nothing(make_app, upstream):
    app = make_app(OPENAI_API_KEY=CANARY_KEY, OPENAI_BASE_URL=upstream.url_for("/v1"))
    from app.serving.warm import warm_worker

    warmed = warm_worker(app, on_loop=True)

    assert warmed["providers"] == ["openai"]
    assert "openai" in warmed["modules"]
    openai = app.extensions["openai_service"]
    assert openai.info()["default"]["client_built"] is True
    assert openai._async["default"].built  # on the worker's loop, which gthread streams use
    assert upstream.requests == []


@pytest.mark.parametrize(
    ("settings", "kind", "concurrency"),
    [({}, "gthread", 64), ({"worker_class": "gevent"}, "gevent", 1000), ({"threads": 8}, "gthread", 8)],
)
def test_gunicorns_own_settings_give_the_workers_kind_and_concurrency(settings, kind, concurrency):
    from gunicorn.config import Config

    from app.serving.gunicorn_hooks import check_worker_class, worker_concurrency, worker_kind

    cfg = Config()
    cfg.set("worker_class", "gthread")
    cfg.set("threads", 64)
    for name, value in settings.items():
        cfg.set(name, value)

    assert (worker_kind(cfg), worker_concurrency(cfg)) == (kind, concurrency)
    check_worker_class(cfg, kind)
    with pytest.raises(SystemExit, match=f"set GUNICORN_WORKER_CLASS={kind} instead"):
        check_worker_class(cfg, "gevent" if kind == "gthread" else "gthread")
