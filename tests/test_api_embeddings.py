"""``POST /api/embeddings`` against a local server speaking the OpenAI protocol."""

from __future__ import annotations

import base64
import json
import struct
import time

import pytest
from werkzeug import Request, Response

from tests.conftest import CANARY_KEY, api_key_headers

EMBED_PATH = "/v1/embeddings"
VECTORS = [[0.25, -0.5, 1.0], [0.125, 0.75, -1.0]]


@pytest.fixture
def embed_app(make_app, local_server):
    return make_app(
        OPENAI_API_KEY=CANARY_KEY, OPENAI_BASE_URL=local_server.url_for("/v1"), OPENAI_MAX_RETRIES=0
    )


def embeddings_handler(request: Request) -> Response:
    """Embeddings as the API sends them: one per input, in any order, floats or base64 as asked."""
    body = json.loads(request.get_data())
    inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
    data = []
    for index in reversed(range(len(inputs))):  # the order the API promises is by "index", not position
        vector = VECTORS[index % len(VECTORS)]
        if body.get("encoding_format") == "base64":
            encoded = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append({"object": "embedding", "index": index, "embedding": encoded})
        else:
            data.append({"object": "embedding", "index": index, "embedding": vector})
    answer = {
        "object": "list",
        "data": data,
        "model": body["model"],
        "usage": {"prompt_tokens": 4, "total_tokens": 4},
    }
    return Response(json.dumps(answer), content_type="application/json")


def _post(app, body=None, **kwargs):
    if body is not None:
        kwargs["json"] = body
    return app.test_client().post("/api/embeddings", headers=api_key_headers(app), **kwargs)


def _assert_json_error(response, status: int, kind: str) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    text = response.get_data(as_text=True)
    assert "Traceback" not in text
    assert CANARY_KEY not in text
    error = json.loads(text)["error"]
    assert error["type"] == kind
    assert error["message"]
    return error


def _sent(local_server) -> list[dict]:
    return [json.loads(request.get_data()) for request, _ in local_server.log]


# --- success -------------------------------------------------------------------------


def test_embeddings_of_a_list_in_input_order(embed_app, local_server):
    local_server.expect_request(EMBED_PATH, method="POST").respond_with_handler(embeddings_handler)

    response = _post(embed_app, {"model": "openai/text-embedding-3-small", "input": ["first", "second"]})

    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.json == {
        "model": "text-embedding-3-small",
        "provider": "openai",
        "data": [{"index": 0, "embedding": VECTORS[0]}, {"index": 1, "embedding": VECTORS[1]}],
    }
    (sent,) = _sent(local_server)
    assert sent["model"] == "text-embedding-3-small"
    assert sent["input"] == ["first", "second"]
    (request, _) = local_server.log[0]
    assert request.headers["Authorization"] == f"Bearer {CANARY_KEY}"


def test_embeddings_of_a_single_string(embed_app, local_server):
    local_server.expect_request(EMBED_PATH, method="POST").respond_with_handler(embeddings_handler)

    response = _post(embed_app, {"model": "text-embedding-3-small", "input": "just one"})

    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.json["provider"] == "openai"
    assert response.json["data"] == [{"index": 0, "embedding": VECTORS[0]}]
    assert _sent(local_server)[0]["input"] == ["just one"]


def test_embeddings_through_a_profile(make_app, local_server):
    app = make_app(
        OPENAI_PROFILES={
            "local": {"base_url": local_server.url_for("/local/v1"), "api_key": "sk-" + "5" * 24}
        }
    )
    local_server.expect_request("/local/v1/embeddings").respond_with_handler(embeddings_handler)

    by_address = _post(app, {"model": "local/nomic-embed-text", "input": ["a"]})
    by_profile = _post(app, {"model": "nomic-embed-text", "profile": "local", "input": ["a"]})

    assert by_address.status_code == by_profile.status_code == 200, by_address.get_data(as_text=True)
    assert by_address.json == by_profile.json
    assert by_address.json["provider"] == "local"
    assert [body["model"] for body in _sent(local_server)] == ["nomic-embed-text"] * 2


# --- invalid requests ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"data": "{nope", "content_type": "application/json"}, "body"),
        ({"json": ["input"]}, "body"),
        ({"json": {"model": "openai/m"}}, "input"),
        ({"json": {"model": "openai/m", "input": []}}, "input"),
        ({"json": {"model": "openai/m", "input": ""}}, "input[0]"),
        ({"json": {"model": "openai/m", "input": 42}}, "input"),
        ({"json": {"model": "openai/m", "input": ["ok", 7]}}, "input[1]"),
        ({"json": {"model": "openai/m", "input": ["ok", ""]}}, "input[1]"),
        ({"json": {"input": ["a"]}}, "model"),
        ({"json": {"model": "", "input": ["a"]}}, "model"),
        ({"json": {"model": "nope/m", "input": ["a"]}}, "model"),
        ({"json": {"model": "m", "profile": "nope", "input": ["a"]}}, "profile"),
    ],
)
def test_invalid_body_is_a_400_naming_the_field(embed_app, local_server, kwargs, field):
    response = embed_app.test_client().post("/api/embeddings", headers=api_key_headers(embed_app), **kwargs)

    error = _assert_json_error(response, 400, "invalid_request")
    assert error["field"] == field
    assert local_server.log == []


def test_get_is_a_json_405(embed_app):
    _assert_json_error(embed_app.test_client().get("/api/embeddings"), 405, "method_not_allowed")


# --- errors --------------------------------------------------------------------------


def test_not_configured_is_a_503_naming_the_setting(make_app, local_server):
    app = make_app(OPENAI_BASE_URL=local_server.url_for("/v1"))

    error = _assert_json_error(_post(app, {"model": "openai/m", "input": ["a"]}), 503, "not_configured")

    assert error["setting"] == "OPENAI_API_KEY"
    assert local_server.log == []


def test_upstream_401_is_a_502_without_the_key(embed_app, local_server):
    local_server.expect_request(EMBED_PATH).respond_with_json(
        {"error": {"message": f"Incorrect API key provided: {CANARY_KEY}", "code": "invalid_api_key"}},
        status=401,
    )

    error = _assert_json_error(_post(embed_app, {"model": "m", "input": ["a"]}), 502, "upstream_auth")

    assert error["upstream_status"] == 401


def test_upstream_429_passes_retry_after_on(embed_app, local_server):
    local_server.expect_request(EMBED_PATH).respond_with_json(
        {"error": {"message": "Rate limit reached"}}, status=429, headers={"retry-after-ms": "4200"}
    )

    response = _post(embed_app, {"model": "m", "input": ["a"]})

    _assert_json_error(response, 429, "rate_limited")
    assert response.headers["Retry-After"] == "5"
    assert len(local_server.log) == 1


def test_upstream_404_is_a_400_upstream_rejected(embed_app, local_server):
    local_server.expect_request(EMBED_PATH).respond_with_json(
        {"error": {"message": "The model `nope` does not exist", "code": "model_not_found"}}, status=404
    )

    error = _assert_json_error(_post(embed_app, {"model": "nope", "input": ["a"]}), 400, "upstream_rejected")

    assert error["upstream_status"] == 404
    assert "The model `nope` does not exist" in error["message"]


def test_upstream_500_is_a_502(embed_app, local_server):
    local_server.expect_request(EMBED_PATH).respond_with_json({"error": {"message": "oops"}}, status=500)

    error = _assert_json_error(_post(embed_app, {"model": "m", "input": ["a"]}), 502, "upstream_error")

    assert error["upstream_status"] == 500


def test_upstream_timeout_is_a_504(make_app, local_server):
    app = make_app(
        OPENAI_API_KEY=CANARY_KEY,
        OPENAI_BASE_URL=local_server.url_for("/v1"),
        OPENAI_MAX_RETRIES=0,
        OPENAI_TIMEOUT=0.3,
    )

    def slow(request: Request) -> Response:
        time.sleep(1.2)
        return embeddings_handler(request)

    local_server.expect_request(EMBED_PATH).respond_with_handler(slow)

    started = time.monotonic()
    _assert_json_error(_post(app, {"model": "m", "input": ["a"]}), 504, "upstream_timeout")
    elapsed = time.monotonic() - started
    assert elapsed < 1.1
    time.sleep(max(0.0, 1.3 - elapsed))


def test_upstream_unreachable_is_a_502(make_app):
    from tests.servers import free_port

    app = make_app(
        OPENAI_API_KEY=CANARY_KEY,
        OPENAI_BASE_URL=f"http://127.0.0.1:{free_port()}/v1",
        OPENAI_MAX_RETRIES=0,
    )

    _assert_json_error(_post(app, {"model": "m", "input": ["a"]}), 502, "upstream_unreachable")


def test_upstream_2xx_that_is_not_embeddings_is_a_502(embed_app, local_server):
    local_server.expect_request(EMBED_PATH).respond_with_data("<html>proxy</html>", content_type="text/html")

    error = _assert_json_error(_post(embed_app, {"model": "m", "input": ["a"]}), 502, "upstream_error")

    assert "could not be read" in error["message"]
