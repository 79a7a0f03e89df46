"""What the app sends through the real openai SDK, validated against the official OpenAI spec.

Stoplight Prism (``../shared/peers/openai-spec-mock``) serves the OpenAI OpenAPI
spec in mock mode and answers 422 to any request the spec rejects. The first
start installs Prism with npm (about 15 s) and boots it (about 20 s).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from app.llm import LLMError, LLMResponseError, get_llm
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
    # Valid for the layer's own checks (an image URL is passed on as given), but the spec
    # wants a URI there. (A temperature above 2, the example this used, is now the layer's 400.)
    response = _chat(spec_app, [{"role": "user", "content": [{"type": "image", "url": "not a url"}]}])

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


# --- every generation parameter, through the layer ----------------------------------------------

#: Each OpenAI parameter alone, then all of them together (and the layer's other options with them).
PARAMETERS: list[dict[str, Any]] = [
    {"top_p": 0.9},
    {"top_p": 0},
    {"stop": "END"},
    {"stop": ["a", "b", "c", "d"]},
    {"seed": 42},
    {"seed": -(2**63)},
    {"presence_penalty": 2},
    {"presence_penalty": -2.0},
    {"frequency_penalty": 0.5},
    {"reasoning_effort": "minimal"},
    {"reasoning_effort": "low"},
    {"reasoning_effort": "medium"},
    {"reasoning_effort": "high"},
    {"response_format": {"type": "json_object"}},
    {"extra": {"service_tier": "flex", "logit_bias": {"50256": -100}, "n": 1}},
    {"temperature": 2, "max_tokens": 16384, "user": "u-1", "top_p": 0.5, "stop": ["\n\n"], "seed": 7,
     "presence_penalty": 0.1, "frequency_penalty": 0.2, "reasoning_effort": "high",
     "response_format": {"type": "json_object"}, "extra": {"metadata": {"run": "spec"}, "store": False}},
]  # fmt: skip


def _outcome(call: Any) -> str:
    """ "accepted", or the status of a rejection (422: the spec refused the request).

    To a request the spec accepts, Prism answers its example completion, whose placeholder
    tool arguments the layer rightly refuses (an LLMResponseError: an answer came), or, to a
    stream, JSON instead of events (see the peer's README).
    """
    try:
        call()
    except LLMResponseError:
        return "accepted"
    except LLMError as exc:
        return str(exc.status_code)
    return "accepted"


def test_every_generation_parameter_the_layer_sends_to_openai_is_valid_by_the_spec(spec_app):
    messages = [{"role": "system", "content": "Answer in JSON."}, {"role": "user", "content": "Hi"}]
    outcomes: list[str] = []
    with spec_app.app_context():
        llm = get_llm()
        for options in PARAMETERS:
            outcomes.append(_outcome(lambda o=options: llm.chat(messages, model="openai/gpt-4o-mini", **o)))
            outcomes.append(
                _outcome(lambda o=options: asyncio.run(llm.achat(messages, model="openai/gpt-4o-mini", **o)))
            )
            # Streams too: the request is what counts here.
            outcomes.append(
                _outcome(lambda o=options: list(llm.chat_stream(messages, model="openai/gpt-4o-mini", **o)))
            )

    assert len(outcomes) == 3 * len(PARAMETERS)
    assert [o for o in outcomes if o != "accepted"] == []  # 0 rejected


def test_the_spec_mock_would_reject_a_parameter_out_of_its_range(spec_app):
    # The same path, with a value only ``extra`` can carry past the layer's own checks:
    # the mock does reject it, so the test above could fail.
    with spec_app.app_context():
        outcome = _outcome(
            lambda: get_llm().chat([{"role": "user", "content": "Hi"}], model="openai/gpt-4o-mini",
                                   extra={"presence_penalty": 3})
        )  # fmt: skip
    assert outcome == "422"
