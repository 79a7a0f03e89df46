"""Veo video jobs: submit, polls, download into media storage, and how operations end.

These run on the in-process pool (no REDIS_URL) with polls every 0.05 s
(``JOBS_POLL_INTERVAL``); tests/test_jobs_rq.py runs the same steps on a real
RQ worker and redis-server, and kills it.
"""

from __future__ import annotations

import time
from decimal import Decimal

import pytest

from app.jobs import get_job
from app.llm import get_llm
from app.llm.hooks import LLMHook
from app.services.db_service import db
from tests.conftest import CANARY_GEMINI_KEY, api_key_headers
from tests.fake_gemini import MP4, PNG, FakeGemini

VEO = "gemini/veo-3.0-generate-001"


@pytest.fixture
def gemini():
    fake = FakeGemini(CANARY_GEMINI_KEY)
    yield fake
    fake.stop()


@pytest.fixture
def video_app(make_app, gemini):
    app = make_app(GEMINI_API_KEY=CANARY_GEMINI_KEY, GENAI_BASE_URL=gemini.base_url, JOBS_POLL_INTERVAL=0.05)
    with app.app_context():
        db.create_all()
    return app


class Ledger(LLMHook):
    def __init__(self):
        self.seen = []

    def before_call(self, call):
        self.seen.append(("before", call.kind, call.id))

    def after_call(self, call, response):
        self.seen.append(
            ("after", call.kind, call.id, response.usage.unit, response.usage.quantity, response.cost)
        )

    def on_error(self, call, error):
        self.seen.append(("error", call.kind, call.id, type(error).__name__))


def wait_until_final(app, job_id, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with app.app_context():
            job = get_job(job_id)
            if job is not None and job.final:
                return job.as_dict()
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} did not end")


def test_a_video_job_submits_once_polls_and_downloads_into_storage(video_app, gemini):
    ledger = Ledger()
    gemini.polls_until_done = 2
    with video_app.app_context():
        get_llm().add_hook(ledger)
        job_id = get_llm().generate_video(
            "a fox in snow", model=VEO, duration_seconds=6, aspect_ratio="16:9", resolution="720p",
            negative_prompt="people", tenant="acme",
        )  # fmt: skip
    job = wait_until_final(video_app, job_id)
    assert job["status"] == "succeeded", job
    assert job["usage"] == {"unit": "second", "quantity": 6.0, "cost": "2.400000"}
    assert gemini.count(":predictLongRunning") == 1 and gemini.count(":download") == 1
    assert gemini.count("/operations/" + job["operation"].rsplit("/", 1)[1]) == 3  # two not done, one done
    (submit,) = [r for r in gemini.server.requests if r.path.endswith(":predictLongRunning")]
    assert submit.path.endswith("/models/veo-3.0-generate-001:predictLongRunning")
    assert submit.json == {
        "instances": [{"prompt": "a fox in snow"}],
        "parameters": {"sampleCount": 1, "durationSeconds": 6, "aspectRatio": "16:9", "resolution": "720p",
                       "negativePrompt": "people"},
    }  # fmt: skip
    (download,) = [r for r in gemini.server.requests if r.path.endswith(":download")]
    assert download.query == {"alt": "media"} and download.headers["x-goog-api-key"] == CANARY_GEMINI_KEY
    with video_app.app_context():
        from app.media import get_media_storage

        storage = get_media_storage()
        (media_id,) = job["media"]
        found = storage.find(media_id, "acme")
        assert found is not None and found.content_type == "video/mp4" and storage.read(found, "acme") == MP4
        assert storage.find(media_id, "other") is None
        row = get_job(job_id)
        assert "files/" in str(row.result) or row.pending_files is None
        assert "https://" not in repr(row.as_dict()) and "key" not in str(row.pending_files)
    call_id = ledger.seen[0][2]
    assert ledger.seen == [
        ("before", "video", call_id),
        ("after", "video", call_id, "second", 6, Decimal("2.4")),
    ]


@pytest.mark.parametrize(
    ("outcome", "kind", "words", "error"),
    [
        ("no_response", "empty_response", "neither a response nor an error", "LLMResponseError"),
        ("filtered", "content_filter", "The video violates policy (code 58061214)", "LLMContentFilterError"),
        ("error", "bad_request", "prompt rejected", "LLMBadRequestError"),
    ],
)
def test_operations_that_end_without_a_video_fail_with_the_reason_at_zero_cost(
    video_app, gemini, outcome, kind, words, error
):
    ledger = Ledger()
    gemini.outcome = outcome
    with video_app.app_context():
        get_llm().add_hook(ledger)
        job_id = get_llm().generate_video("a storm", model=VEO)
    job = wait_until_final(video_app, job_id)
    assert job["status"] == "failed" and job["error"]["type"] == kind and words in job["error"]["message"]
    assert job["usage"]["cost"] == "0.000000" and job["media"] == []
    assert gemini.count(":predictLongRunning") == 1 and gemini.count(":download") == 0
    assert [entry[0] for entry in ledger.seen] == ["before", "error"] and ledger.seen[1][3] == error


def test_polling_stops_at_the_time_limit(make_app, gemini):
    app = make_app(GEMINI_API_KEY=CANARY_GEMINI_KEY, GENAI_BASE_URL=gemini.base_url, JOBS_POLL_INTERVAL=0.05,
                   JOBS_POLL_TIMEOUT=0.3)  # fmt: skip
    gemini.polls_until_done = 10_000
    with app.app_context():
        db.create_all()
        job_id = get_llm().generate_video("slow", model=VEO)
    job = wait_until_final(app, job_id)
    assert job["status"] == "failed" and job["error"]["type"] == "poll_timeout"
    assert 2 <= gemini.count(job["operation"].rsplit("/", 1)[1]) <= 12  # polls every 0.05 s, none after
    assert gemini.count(":predictLongRunning") == 1


def test_a_submit_sent_by_a_step_that_died_is_never_sent_again(video_app, gemini):
    """``submitted_at`` without an operation name: the generation may have started; no second one."""
    from app.jobs import create_job
    from app.jobs.steps import run_step

    with video_app.app_context():
        job = create_job("video", "gemini", "veo-3.0-generate-001", {"prompt": "x"}, user=None, tenant=None)
        wait_until_final(video_app, job.id)  # the pool ran it: one submit
        db.session.expire_all()
        row = get_job(job.id)
        row.status, row.operation_name, row.finished_at = "running", None, None  # as if the answer was lost
        db.session.commit()
        assert run_step(job.id) == "failed"
        row = get_job(job.id)
        assert row.error_kind == "submit_outcome_unknown"
    assert gemini.count(":predictLongRunning") == 1


def test_a_timeout_on_submit_is_not_retried_by_the_policy(make_app, gemini):
    app = make_app(GEMINI_API_KEY=CANARY_GEMINI_KEY, GENAI_BASE_URL=gemini.base_url, LLM_MAX_RETRIES=2,
                   LLM_ATTEMPT_TIMEOUT=1, LLM_BACKOFF_BASE=0.01)  # fmt: skip
    release, _arrived = gemini.gate("submit")
    with app.app_context():
        db.create_all()
        job_id = get_llm().generate_video("a slow start", model=VEO)
    try:
        job = wait_until_final(app, job_id)
    finally:
        release.set()
    assert job["status"] == "failed" and job["error"]["type"] == "submit_outcome_unknown", job
    assert gemini.count(":predictLongRunning") == 1


def test_post_videos_with_an_image_and_the_job_url(video_app, gemini):
    import base64

    client = video_app.test_client()
    headers = api_key_headers(video_app, "ann", tenant="acme")
    body = {"prompt": "the cat walks", "model": VEO, "image": {"data": base64.b64encode(PNG).decode()}}
    posted = client.post("/api/videos", headers=headers, json=body)
    assert posted.status_code == 202 and posted.headers["Location"].endswith(posted.json["id"])
    job = wait_until_final(video_app, posted.json["id"])
    assert job["status"] == "succeeded"
    (submit,) = [r for r in gemini.server.requests if r.path.endswith(":predictLongRunning")]
    assert submit.json["instances"][0]["image"] == {
        "bytesBase64Encoded": base64.b64encode(PNG).decode(), "mimeType": "image/png"
    }  # fmt: skip
    answer = client.get(posted.headers["Location"], headers=headers).json
    (media,) = answer["media"]
    whole = client.get(media["url"], headers=headers)
    assert whole.status_code == 200 and whole.mimetype == "video/mp4" and whole.data == MP4
    part = client.get(media["url"], headers={**headers, "Range": "bytes=10-19"})
    assert part.status_code == 206 and part.data == MP4[10:20]
    assert part.headers["Content-Range"] == f"bytes 10-19/{len(MP4)}"
    other = api_key_headers(video_app, "bob", tenant="other")
    assert client.get(media["url"], headers=other).status_code == 404


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": "x", "model": VEO, "seed": 4}, "seed"),
        ({"prompt": "x", "model": "gemini/imagen-4.0-generate-001"}, "model"),
        ({"prompt": "x", "model": "openai/gpt-4o"}, "model"),
        ({"model": VEO}, "prompt"),
        ({"prompt": "x", "model": VEO, "duration_seconds": 0}, "duration_seconds"),
        ({"prompt": "x", "model": VEO, "image": {"data": "%%%"}}, "image.data"),
        ({"prompt": "x", "model": VEO, "image": {"media": "f" * 64 + ".png"}}, "image"),
        ({"prompt": "x", "model": "nope/veo"}, "model"),  # a 503 "not configured" before
    ],
)
def test_post_videos_refuses_a_bad_body_by_field(video_app, gemini, body, field):
    client = video_app.test_client()
    answer = client.post("/api/videos", headers=api_key_headers(video_app), json=body)
    assert answer.status_code == 400 and answer.json["error"]["field"] == field, answer.json
    assert gemini.server.requests == []


def test_the_readme_example_runs_as_written(video_app, gemini):
    from tests.readme import python_blocks

    (example,) = python_blocks("Jobs and media")
    namespace: dict = {}
    with video_app.app_context():
        exec(compile(example, "README.md", "exec"), namespace)
    r = namespace["r"]
    assert (r.usage.unit, r.usage.quantity, r.cost) == ("image", 2, Decimal("0.08"))
    assert wait_until_final(video_app, namespace["job_id"])["status"] == "succeeded"
    with video_app.app_context():
        assert get_job(namespace["job_id"]).tenant == "acme"
