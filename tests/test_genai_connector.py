"""Gemini through google-genai, against a local server speaking generateContent."""

from __future__ import annotations

import json
import time

import httpx2
import pytest
from google import genai
from werkzeug import Request, Response

from app.errors import ServiceNotConfiguredError
from app.services.genai_service import get_genai_client, reset_genai_client
from tests.conftest import CANARY_GEMINI_KEY

MODEL = "gemini-2.0-flash"
PATH = f"/v1beta/models/{MODEL}:generateContent"
REPLY = {
    "candidates": [{"content": {"parts": [{"text": "hi"}], "role": "model"}, "finishReason": "STOP"}],
    "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 1, "totalTokenCount": 4},
}


def gemini_app(make_app, server, **settings):
    return make_app(
        {
            "GEMINI_API_KEY": CANARY_GEMINI_KEY,
            "GENAI_BASE_URL": server.url_for("/"),
            "GENAI_API_VERSION": "v1beta",
        },
        **settings,
    )


def only_request(server) -> Request:
    ((request, _),) = server.log
    return request


def test_generate_content_sends_key_path_and_body(make_app, local_server):
    local_server.expect_request(PATH, method="POST").respond_with_json(REPLY)
    app = gemini_app(make_app, local_server)
    with app.app_context():
        client = get_genai_client()
        assert isinstance(client, genai.Client)
        assert client.vertexai is False
        response = client.models.generate_content(model=MODEL, contents="Say hi")
    assert response.text == "hi"
    assert response.usage_metadata.total_token_count == 4
    request = only_request(local_server)
    assert request.path == PATH
    assert request.headers["x-goog-api-key"] == CANARY_GEMINI_KEY
    assert request.json == {"contents": [{"parts": [{"text": "Say hi"}], "role": "user"}]}


def test_default_timeout_is_sixty_seconds(make_app, local_server):
    # google-genai has no timeout by default; with one, it tells the server too (X-Server-Timeout).
    local_server.expect_request(PATH).respond_with_json(REPLY)
    app = gemini_app(make_app, local_server)
    with app.app_context():
        get_genai_client().models.generate_content(model=MODEL, contents="hi")
    assert only_request(local_server).headers["X-Server-Timeout"] == "60"


def test_configured_timeout_reaches_the_request(make_app, local_server):
    local_server.expect_request(PATH).respond_with_json(REPLY)
    app = gemini_app(make_app, local_server, GENAI_TIMEOUT="2.5")
    with app.app_context():
        get_genai_client().models.generate_content(model=MODEL, contents="hi")
    assert only_request(local_server).headers["X-Server-Timeout"] == "3"


def test_a_slow_server_makes_the_client_time_out(make_app, local_server):
    def slow(_request: Request) -> Response:
        time.sleep(1.5)
        return Response(json.dumps(REPLY), content_type="application/json")

    local_server.expect_request(PATH).respond_with_handler(slow)
    app = gemini_app(make_app, local_server, GENAI_TIMEOUT=0.5)
    with app.app_context(), pytest.raises(httpx2.TimeoutException):
        get_genai_client().models.generate_content(model=MODEL, contents="hi")


def test_google_api_key_is_used_when_gemini_api_key_is_absent(make_app, local_server):
    local_server.expect_request(PATH).respond_with_json(REPLY)
    app = make_app(
        GOOGLE_API_KEY="AIza-google-fallback-0000",
        GENAI_BASE_URL=local_server.url_for("/"),
        GENAI_API_VERSION="v1beta",
    )
    with app.app_context():
        get_genai_client().models.generate_content(model=MODEL, contents="hi")
    assert only_request(local_server).headers["x-goog-api-key"] == "AIza-google-fallback-0000"


def test_api_version_default_is_the_sdks(make_app, local_server):
    local_server.expect_request(f"/v1/models/{MODEL}:generateContent").respond_with_json(REPLY)
    app = make_app(GEMINI_API_KEY=CANARY_GEMINI_KEY, GENAI_BASE_URL=local_server.url_for("/"))
    with app.app_context():
        assert get_genai_client().models.generate_content(model=MODEL, contents="hi").text == "hi"


def test_missing_key_names_the_setting(make_app):
    app = make_app()
    with app.app_context(), pytest.raises(ServiceNotConfiguredError) as info:
        get_genai_client()
    assert info.value.setting == "GEMINI_API_KEY"
    assert "GEMINI_API_KEY" in str(info.value)
    assert "GOOGLE_API_KEY" in str(info.value)


@pytest.mark.parametrize(
    ("settings", "missing"),
    [
        ({}, "GOOGLE_CLOUD_PROJECT"),
        ({"GOOGLE_CLOUD_PROJECT": "my-project"}, "GOOGLE_CLOUD_LOCATION"),
    ],
)
def test_vertex_ai_names_the_missing_setting(make_app, settings, missing):
    app = make_app(settings, GOOGLE_GENAI_USE_VERTEXAI="true", GEMINI_API_KEY=CANARY_GEMINI_KEY)
    with app.app_context(), pytest.raises(ServiceNotConfiguredError) as info:
        get_genai_client()
    assert info.value.setting == missing


def test_vertex_ai_client(make_app):
    # Credentials come from Application Default Credentials at the first request; building needs none.
    app = make_app(
        GOOGLE_GENAI_USE_VERTEXAI="1", GOOGLE_CLOUD_PROJECT="my-project", GOOGLE_CLOUD_LOCATION="europe-west4"
    )
    with app.app_context():
        client = get_genai_client()
    assert client.vertexai is True
    info = app.extensions["genai_service"].info()["gemini"]
    assert info["kind"] == "vertex-ai"
    assert info["endpoint"] == "https://europe-west4-aiplatform.googleapis.com"
    assert info["client_built"] is True


def test_reset_genai_client_builds_anew(make_app, local_server):
    local_server.expect_request(PATH).respond_with_json(REPLY)
    app = gemini_app(make_app, local_server)
    with app.app_context():
        old = get_genai_client()
        reset_genai_client()
        new = get_genai_client()
        assert new is not old
        assert get_genai_client() is new
        assert new.models.generate_content(model=MODEL, contents="hi").text == "hi"
