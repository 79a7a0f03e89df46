"""Images through the layer (hooks, policy) against servers speaking Gemini's and OpenAI's protocols."""

from __future__ import annotations

import base64
import time
from decimal import Decimal

import pytest

from app.llm import LLMBadRequestError, get_llm
from app.llm.hooks import LLMHook
from tests.conftest import CANARY_GEMINI_KEY, api_key_headers
from tests.fake_gemini import PNG, FakeGemini
from tests.servers import Reply

IMAGEN = "gemini/imagen-4.0-generate-001"


@pytest.fixture
def gemini():
    fake = FakeGemini(CANARY_GEMINI_KEY)
    yield fake
    fake.stop()


@pytest.fixture
def media_app(make_app, gemini):
    return make_app(GEMINI_API_KEY=CANARY_GEMINI_KEY, GENAI_BASE_URL=gemini.base_url)


class Recorder(LLMHook):
    def __init__(self):
        self.seen = []

    def before_call(self, call):
        self.seen.append(("before", call.kind, call.provider, call.model, call.tenant))

    def after_call(self, call, response):
        self.seen.append(("after", call.kind, response.usage.unit, response.usage.quantity, response.cost))

    def on_error(self, call, error):
        self.seen.append(("error", call.kind, type(error).__name__))


def test_imagen_through_the_layer_books_each_image(media_app, gemini):
    hook = Recorder()
    with media_app.app_context():
        get_llm().add_hook(hook)
        r = get_llm().generate_image("a red fox", model=IMAGEN, n=2, aspect_ratio="16:9", tenant="acme")
    assert [image.data for image in r.images] == [PNG + b"\x00", PNG + b"\x01"]
    assert r.filtered == [] and r.usage.unit == "image" and r.usage.quantity == 2
    assert r.cost == Decimal("0.08") and len(r.attempts) == 1
    (request,) = gemini.server.requests
    assert request.path.endswith("/models/imagen-4.0-generate-001:predict")
    assert request.json == {
        "instances": [{"prompt": "a red fox"}],
        "parameters": {"sampleCount": 2, "includeRaiReason": True, "aspectRatio": "16:9"},
    }
    assert request.headers["x-goog-api-key"] == CANARY_GEMINI_KEY
    assert hook.seen == [
        ("before", "image", "gemini", "imagen-4.0-generate-001", "acme"),
        ("after", "image", "image", 2, Decimal("0.08")),
    ]


def test_filtered_images_are_reported_one_by_one_with_the_reason(media_app, gemini):
    gemini.filtered_images = {1}
    with media_app.app_context():
        r = get_llm().generate_image("a crowd", model=IMAGEN, n=3)
    assert len(r.images) == 2 and [f.reason for f in r.filtered] == [gemini.filter_reason]
    assert r.usage.quantity == 2 and r.cost == Decimal("0.08")  # filtered images are not booked


def test_gemini_image_model_answers_by_generate_content(media_app, gemini):
    gemini.filtered_images = {1}
    with media_app.app_context():
        r = get_llm().generate_image("a logo", model="gemini/gemini-2.5-flash-image", n=2, aspect_ratio="1:1")
    assert [image.data for image in r.images] == [PNG + b"\x00"]
    assert [f.reason for f in r.filtered] == ["IMAGE_SAFETY"]  # google-genai keeps no finishMessage
    requests = gemini.server.requests
    assert len(requests) == 2 and all(
        q.path.endswith("/gemini-2.5-flash-image:generateContent") for q in requests
    )
    config = requests[0].json["generationConfig"]
    assert config["responseModalities"] == ["IMAGE"] and config["imageConfig"] == {"aspectRatio": "1:1"}
    assert r.cost == Decimal("0.039")


def test_openai_images_api(make_app, upstream):
    b64 = base64.b64encode(PNG).decode()
    upstream.script("/v1/images/generations", {"created": 1, "data": [{"b64_json": b64}, {"b64_json": b64}],
                                                "output_format": "png"})  # fmt: skip
    app = make_app(OPENAI_API_KEY="sk-test", OPENAI_BASE_URL=upstream.url_for("/v1"))
    with app.app_context():
        r = get_llm().generate_image("a boat", model="openai/gpt-image-1", n=2, size="1024x1024", user="ann")
    assert len(r.images) == 2 and r.images[0].mime_type == "image/png"
    assert upstream.only_request().json == {
        "model": "gpt-image-1", "prompt": "a boat", "n": 2, "size": "1024x1024", "user": "ann"
    }  # fmt: skip
    assert r.cost == Decimal("0.084")


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"seed": 3}, "seed"),
        ({"negative_prompt": "dogs"}, "negative_prompt"),
        ({"n": 0}, "n"),
        ({"n": 5}, "n"),
        ({"size": "1024x1024"}, "size"),
        ({"aspect_ratio": "wide"}, "aspect_ratio"),
        ({"prompt": "  "}, "prompt"),
    ],
)
def test_a_bad_request_names_its_field_before_any_request(media_app, gemini, options, field):
    arguments = {"prompt": "a cat", **options}
    with media_app.app_context(), pytest.raises(LLMBadRequestError) as raised:
        get_llm().generate_image(arguments.pop("prompt"), model=IMAGEN, **arguments)
    assert raised.value.field == field and raised.value.http_status == 400
    assert gemini.server.requests == []


def test_the_policy_retries_an_image_call(make_app, gemini):
    app = make_app(GEMINI_API_KEY=CANARY_GEMINI_KEY, GENAI_BASE_URL=gemini.base_url, LLM_MAX_RETRIES=1,
                   LLM_BACKOFF_BASE=0.01)  # fmt: skip
    gemini.server.script(
        "/v1/models/imagen-4.0-generate-001:predict",
        Reply(503, {"error": {"code": 503, "message": "overloaded", "status": "UNAVAILABLE"}}),
    )
    with app.app_context():
        r = get_llm().generate_image("a cat", model=IMAGEN)
    assert len(r.images) == 1 and [a.outcome for a in r.attempts] == ["LLMServerError", "ok"]


def _wait_for(client, url, headers, until=("succeeded", "failed"), timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answer = client.get(url, headers=headers).json
        if answer["status"] in until:
            return answer
        time.sleep(0.02)
    raise AssertionError(f"the job did not end: {answer}")


def test_post_images_n2_serves_two_files_to_its_tenant_only(media_app, gemini):
    client = media_app.test_client()
    mine = api_key_headers(media_app, "ann", tenant="acme")
    theirs = api_key_headers(media_app, "bob", tenant="other")
    posted = client.post("/api/images", headers=mine, json={"prompt": "two foxes", "model": IMAGEN, "n": 2})
    assert posted.status_code == 202, posted.json
    location = posted.headers["Location"]
    assert location == f"/api/jobs/{posted.json['id']}" and posted.json["status"] == "queued"
    job = _wait_for(client, location, mine)
    assert job["status"] == "succeeded" and job["error"] is None and job["progress"] == 100
    assert job["usage"] == {"unit": "image", "quantity": 2.0, "cost": "0.080000"}
    assert len(job["media"]) == 2
    for number, media in enumerate(job["media"]):
        served = client.get(media["url"], headers=mine)
        assert served.status_code == 200 and served.mimetype == "image/png"
        assert served.data == PNG + bytes([number])
        assert client.get(media["url"], headers=theirs).status_code == 404
    assert client.get(location, headers=theirs).status_code == 404
    assert client.get(job["media"][0]["url"]).status_code == 401


def test_post_images_refuses_a_bad_body_by_field(media_app, gemini):
    client = media_app.test_client()
    headers = api_key_headers(media_app)
    for body, field in [
        ({"prompt": "x", "model": IMAGEN, "n": "2"}, "n"),
        ({"prompt": "x", "model": IMAGEN, "colour": "red"}, "colour"),
        ({"prompt": "x"}, "model"),
        ({"prompt": 3, "model": IMAGEN}, "prompt"),
        ({"prompt": "x", "model": "nope/imagen"}, "model"),  # a 503 "not configured" before
        ({"prompt": "x", "model": "gemini/"}, "model"),
    ]:
        answer = client.post("/api/images", headers=headers, json=body)
        assert answer.status_code == 400 and answer.json["error"]["field"] == field, answer.json
    assert gemini.server.requests == []


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"aspect_ratio": "16:9"}, "aspect_ratio"),
        ({"seed": 1}, "seed"),
        ({"size": "999x999"}, "size"),
        ({"n": 11}, "n"),
    ],
)
def test_openai_images_refuse_what_the_api_cannot_take(make_app, upstream, options, field):
    app = make_app(OPENAI_API_KEY="sk-test", OPENAI_BASE_URL=upstream.url_for("/v1"))
    with app.app_context(), pytest.raises(LLMBadRequestError) as raised:
        get_llm().generate_image("a boat", model="openai/gpt-image-1", **options)
    assert raised.value.field == field and upstream.requests == []


def test_dall_e_is_asked_for_base64(make_app, upstream):
    upstream.script(
        "/v1/images/generations", {"created": 1, "data": [{"b64_json": base64.b64encode(PNG).decode()}]}
    )
    app = make_app(OPENAI_API_KEY="sk-test", OPENAI_BASE_URL=upstream.url_for("/v1"))
    with app.app_context():
        r = get_llm().generate_image("a boat", model="openai/dall-e-3", aspect_ratio=None)
    assert upstream.only_request().json["response_format"] == "b64_json" and len(r.images) == 1
    assert r.cost is None  # no price known for it: never a guess
    with app.app_context(), pytest.raises(LLMBadRequestError) as raised:
        get_llm().generate_image("x", model="anthropic/claude-sonnet-4-5")
    assert raised.value.field == "model"
