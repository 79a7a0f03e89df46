"""What the app sends through the real openai SDK, validated against the official OpenAI spec.

Stoplight Prism (``../shared/peers/openai-spec-mock``) serves the OpenAI OpenAPI
spec in mock mode and answers 422 to any request the spec rejects. The first
start installs Prism with npm (about 15 s) and boots it (about 20 s).
"""

from __future__ import annotations

import pytest

from app.services.openai_service import get_openai_client
from tests.conftest import CANARY_KEY, api_key_headers

pytestmark = pytest.mark.slow


@pytest.fixture
def spec_app(make_app, prism):
    return make_app(
        OPENAI_API_KEY=CANARY_KEY,
        OPENAI_BASE_URL=prism.base_url,
        OPENAI_MAX_RETRIES=0,
        OPENAI_TIMEOUT=30,  # Prism never answers some malformed bodies
    )


def _chat(app, messages, model="gpt-4o-mini", **extra):
    return app.test_client().post(
        "/api/chat", json={"messages": messages, "model": model, **extra}, headers=api_key_headers(app)
    )


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": "Hi"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "And?"}],
        [{"role": "user", "content": [{"type": "text", "text": "Describe this"}]}],
    ],
    ids=["user", "system", "conversation", "content-parts"],
)  # fmt: skip
def test_what_api_chat_sends_is_valid_by_the_spec(spec_app, messages):
    response = _chat(spec_app, messages)

    # Prism answers the spec's example completion, whose tool call carries the
    # placeholder arguments "string": the layer rightly refuses those as
    # malformed (502). What matters here is that the spec accepted the request
    # (a rejection is a 422, which /api/chat turns into 400 upstream_rejected).
    body = response.json
    if response.status_code == 502:
        assert "malformed JSON arguments" in body["error"]["message"], body
        return
    assert response.status_code == 200, body
    assert set(body) == {"content", "model", "provider", "usage", "finish_reason", "tool_calls"}
    assert set(body["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}


def test_a_request_the_spec_rejects_comes_back_as_400_upstream_rejected(spec_app):
    # Valid for /api/chat's own checks, but the spec caps temperature at 2.
    response = _chat(spec_app, [{"role": "user", "content": "Hi"}], temperature=5)

    assert response.status_code == 400, response.get_data(as_text=True)
    error = response.json["error"]
    assert error["type"] == "upstream_rejected"
    assert error["upstream_status"] == 422


@pytest.mark.parametrize(
    "kwargs",
    [
        {"messages": [], "model": "gpt-4o-mini"},
        {"messages": [{"role": "bogus", "content": "hi"}], "model": "gpt-4o-mini"},
        {"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4o-mini",
         "extra_body": {"temperature": "hot"}},
        {"messages": [{"role": "user", "content": "hi"}], "model": 123},
    ],
    ids=["no-messages", "bad-role", "bad-temperature", "bad-model"],
)  # fmt: skip
def test_the_mock_does_reject_invalid_requests(spec_app, kwargs):
    import openai

    with spec_app.app_context():
        client = get_openai_client()
        with pytest.raises(openai.UnprocessableEntityError) as excinfo:
            client.chat.completions.create(**kwargs)

    assert excinfo.value.status_code == 422


def test_the_clients_own_request_is_valid_by_the_spec(spec_app):
    with spec_app.app_context():
        completion = get_openai_client().chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "hi"}],
            temperature=0.2,
            max_completion_tokens=16,
        )
    assert completion.object == "chat.completion"
    assert completion.choices
