"""The example fifth service (app/services/weather_service.py) under the services' contract.

Lazy, one client per app and per process (threads, fork), reset, and no secret in any
output: the same guarantees the built-in services have, checked on a local server.
"""

from __future__ import annotations

import logging
import threading
import traceback

import pytest

from app.connectors.http_service import (
    HTTPServiceClient,
    HTTPServiceStatusError,
    HTTPServiceUnavailableError,
)
from app.errors import ConfigError, ServiceNotConfiguredError
from app.services import weather_service
from app.services.weather_service import get_weather_client, reset_weather_client
from tests.servers import CLOSE, HANG, Reply, ScriptedServer
from tests.test_fork_threads import run_in_child

CANARY = "wk-canary-3f9a1c7e5b2d4f60"
PASSWORD = "pw-canary-8e7d6c5b4a39"


@pytest.fixture
def app_settings(upstream: ScriptedServer) -> dict[str, str]:
    return {"WEATHER_BASE_URL": upstream.url_for("/v1"), "WEATHER_API_KEY": CANARY, "WEATHER_TIMEOUT": "0.5"}


@pytest.fixture
def weather_app(app):
    weather_service.init_app(app)
    return app


def forecast() -> dict[str, object]:
    return get_weather_client().get_json("/forecast", params={"city": "Paris"})


def test_init_app_validates_and_builds_nothing(weather_app, upstream):
    connector = weather_app.extensions["weather_service"]
    assert connector.built is False
    assert upstream.requests == []
    info = connector.info()["weather"]
    assert info["configured"] is True and info["client_built"] is False
    assert PASSWORD not in str(info) and CANARY not in str(info)


def test_a_bad_setting_stops_start_up_naming_the_key(app):
    app.config["WEATHER_BASE_URL"] = "ftp://example"
    with pytest.raises(ConfigError, match="WEATHER_BASE_URL"):
        weather_service.init_app(app)
    app.config.update(WEATHER_BASE_URL="http://127.0.0.1:1", WEATHER_TIMEOUT="-1")
    with pytest.raises(ConfigError, match="WEATHER_TIMEOUT"):
        weather_service.init_app(app)


def test_without_a_base_url_the_client_says_what_to_set(app):
    app.config["WEATHER_BASE_URL"] = ""
    weather_service.init_app(app)
    with app.app_context(), pytest.raises(ServiceNotConfiguredError, match="WEATHER_BASE_URL"):
        get_weather_client()


def test_first_get_builds_one_client_and_calls_the_service(weather_app, upstream):
    upstream.script("/v1/forecast", {"city": "Paris", "celsius": 12})
    with weather_app.app_context():
        assert forecast() == {"city": "Paris", "celsius": 12}
        assert get_weather_client() is get_weather_client()
    request = upstream.only_request()
    assert request.query == {"city": "Paris"}
    assert request.headers["authorization"] == f"Bearer {CANARY}"


def test_sixteen_threads_build_one_client(weather_app):
    clients: list[HTTPServiceClient] = []
    barrier = threading.Barrier(16)

    def build() -> None:
        with weather_app.app_context():
            barrier.wait()
            clients.append(get_weather_client())

    threads = [threading.Thread(target=build) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(clients) == 16 and len({id(client) for client in clients}) == 1


def test_two_apps_have_their_own_clients(weather_app, make_app, upstream):
    other = make_app(WEATHER_BASE_URL=upstream.url_for("/v1"))
    weather_service.init_app(other)
    with weather_app.app_context():
        first = get_weather_client()
    with other.app_context():
        second = get_weather_client()
    assert first is not second


def test_a_forked_child_builds_its_own_client(weather_app, upstream):
    upstream.script("/v1/forecast", {"n": 1}, {"n": 2}, {"n": 3})
    with weather_app.app_context():
        parent = get_weather_client()
        forecast()

        def child() -> bool:
            with weather_app.app_context():
                mine = get_weather_client()
                forecast()
                return mine is not parent

        assert run_in_child(child) is True
        forecast()  # the parent's connection still works after the child exited
    parent_port, child_port, parent_again = (request.port for request in upstream.requests)
    assert child_port != parent_port  # the child opened a connection of its own
    assert parent_again == parent_port  # and left the parent's alone (kept alive, reused)


def test_reset_closes_the_connection_and_forgets_the_client(weather_app, upstream):
    upstream.script("/v1/forecast", {"n": 1}, {"n": 2})
    with weather_app.app_context():
        first = get_weather_client()
        forecast()
        reset_weather_client()
        assert upstream.wait_closed(upstream.requests[0].port)
        second = get_weather_client()
        forecast()
    assert second is not first


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        (Reply(503, {"error": f"down, key {CANARY}"}), HTTPServiceStatusError),
        (HANG, HTTPServiceUnavailableError),
        (CLOSE, HTTPServiceUnavailableError),
    ],
)
def test_failures_are_typed_and_carry_no_secret(app, upstream, caplog, reply, error):
    app.config["WEATHER_BASE_URL"] = f"http://user:{PASSWORD}@127.0.0.1:{upstream.port}/v1"
    weather_service.init_app(app)
    upstream.script("/v1/forecast", reply)
    with app.app_context(), caplog.at_level(logging.DEBUG), pytest.raises(error) as caught:
        forecast()
    shown = "".join(traceback.format_exception(caught.value)) + caplog.text + repr(get_weather_client_safe())
    assert caught.value.service == "weather"
    assert CANARY not in shown and PASSWORD not in shown


def get_weather_client_safe() -> object:
    try:
        return get_weather_client()
    except RuntimeError:
        return None


def test_services_info_shows_the_service_without_its_secrets(app, upstream):
    app.config["WEATHER_BASE_URL"] = f"http://user:{PASSWORD}@127.0.0.1:{upstream.port}/v1"
    weather_service.init_app(app)
    result = app.test_cli_runner().invoke(args=["services", "info"])
    assert result.exit_code == 0, result.output
    assert "weather" in result.output
    assert CANARY not in result.output and PASSWORD not in result.output
