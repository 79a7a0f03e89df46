"""Jobs without Redis (the in-process pool), ``flask jobs``, recovery, and their settings."""

from __future__ import annotations

import json
import logging
import time

import pytest

from app import create_app
from app.errors import ConfigError
from app.jobs import create_image_job, get_job
from app.services.db_service import db
from tests.conftest import CANARY_GEMINI_KEY
from tests.fake_gemini import FakeGemini

IMAGEN = "gemini/imagen-4.0-generate-001"


@pytest.fixture
def gemini():
    fake = FakeGemini(CANARY_GEMINI_KEY)
    yield fake
    fake.stop()


@pytest.fixture
def jobs_app(make_app, gemini):
    app = make_app(GEMINI_API_KEY=CANARY_GEMINI_KEY, GENAI_BASE_URL=gemini.base_url)
    with app.app_context():
        db.create_all()
    return app


def _final(app, job_id, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with app.app_context():
            job = get_job(job_id)
            if job.final:
                return job.as_dict()
        time.sleep(0.02)
    raise AssertionError("the job did not end")


def test_without_redis_a_job_runs_on_the_in_process_pool_and_succeeds(jobs_app, gemini):
    with jobs_app.app_context():
        from app.jobs import current_jobs

        assert current_jobs().backend.name == "threads"
        job = create_image_job("a lighthouse", IMAGEN, n=1, tenant="acme", user="ann")
        assert job.status == "queued"
    done = _final(jobs_app, job.id)
    assert done["status"] == "succeeded" and len(done["media"]) == 1 and done["user"] == "ann"
    assert gemini.count(":predict") == 1


def test_the_start_up_log_says_the_pool_is_for_development_only(tmp_path, caplog):
    settings = {"SECRET_KEY": "k" * 40, "INSTANCE_PATH": str(tmp_path), "DOTENV_PATH": str(tmp_path / "none")}
    with caplog.at_level(logging.WARNING, logger="app.jobs"):
        create_app(settings)
    (record,) = [r for r in caplog.records if r.name == "app.jobs"]
    assert "in-process thread pool" in record.getMessage() and "development only" in record.getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="app.jobs"):
        create_app({**settings, "REDIS_URL": "redis://127.0.0.1:1/0"})
    assert [r for r in caplog.records if r.name == "app.jobs"] == []


def test_all_filtered_images_fail_with_the_reasons(jobs_app, gemini):
    gemini.filtered_images = {0, 1}
    with jobs_app.app_context():
        job = create_image_job("x", IMAGEN, n=2)
    done = _final(jobs_app, job.id)
    assert done["status"] == "failed" and done["error"]["type"] == "content_filter"
    assert gemini.filter_reason in done["error"]["message"] and done["usage"]["cost"] == "0.000000"
    assert done["filtered"] == [{"reason": gemini.filter_reason}] * 2


def test_a_provider_error_is_stored_typed_and_redacted(make_app, gemini):
    app = make_app(GEMINI_API_KEY=CANARY_GEMINI_KEY, GENAI_BASE_URL=gemini.base_url)
    from tests.servers import Reply

    gemini.server.script(
        "/v1/models/imagen-4.0-generate-001:predict",
        Reply(
            400,
            {"error": {"code": 400, "message": f"bad key {CANARY_GEMINI_KEY}", "status": "INVALID_ARGUMENT"}},
        ),
    )
    with app.app_context():
        db.create_all()
        job = create_image_job("x", IMAGEN)
    done = _final(app, job.id)
    assert done["status"] == "failed" and done["error"]["type"] == "bad_request"
    assert CANARY_GEMINI_KEY not in json.dumps(done)


def test_flask_jobs_list_show_cancel_and_retry(jobs_app, gemini):
    runner = jobs_app.test_cli_runner()
    with jobs_app.app_context():
        job = create_image_job("a bridge", IMAGEN)
    _final(jobs_app, job.id)
    listed = runner.invoke(args=["jobs", "list"])
    assert listed.exit_code == 0 and job.id in listed.output and "succeeded" in listed.output
    shown = runner.invoke(args=["jobs", "show", job.id])
    assert json.loads(shown.output)["status"] == "succeeded" and "a bridge" not in shown.output
    assert runner.invoke(args=["jobs", "cancel", job.id]).exit_code == 1  # already ended
    assert runner.invoke(args=["jobs", "show", "nope"]).exit_code == 1
    # A failed job runs again on retry.
    gemini.filtered_images = {0}
    with jobs_app.app_context():
        failing = create_image_job("a bridge", IMAGEN)
    assert _final(jobs_app, failing.id)["status"] == "failed"
    gemini.filtered_images = set()
    retried = runner.invoke(args=["jobs", "retry", failing.id])
    assert retried.exit_code == 0, retried.output
    assert _final(jobs_app, failing.id)["status"] == "succeeded"
    assert runner.invoke(args=["jobs", "retry", failing.id]).exit_code == 1  # only failed or cancelled


def test_cancel_a_queued_job(make_app, gemini):
    from app.jobs import create_job

    jobs_app = make_app(
        GEMINI_API_KEY=CANARY_GEMINI_KEY,
        GENAI_BASE_URL=gemini.base_url,
        JOBS_THREADS=1,
        JOBS_POLL_INTERVAL=0.05,
    )
    with jobs_app.app_context():
        db.create_all()

    release, arrived = gemini.gate("submit")
    with jobs_app.app_context():
        first = create_job(
            "video", "gemini", "veo-3.0-generate-001", {"prompt": "x"}, user=None, tenant=None
        ).id
        queued = create_job(
            "video", "gemini", "veo-3.0-generate-001", {"prompt": "y"}, user=None, tenant=None
        ).id
    try:
        assert arrived.wait(5)
        result = jobs_app.test_cli_runner().invoke(args=["jobs", "cancel", queued])
        assert result.exit_code == 0 and "cancelled" in result.output
    finally:
        release.set()
    with jobs_app.app_context():
        assert get_job(queued).status == "cancelled" and get_job(queued).error_kind == "cancelled"
    _final(jobs_app, first)
    assert gemini.submits == {"x": 1}  # the cancelled job never submitted


def test_the_worker_needs_redis(jobs_app):
    result = jobs_app.test_cli_runner().invoke(args=["jobs", "worker"])
    assert result.exit_code == 1 and "REDIS_URL" in result.output


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ({"JOBS_POLL_INTERVAL": 0}, "JOBS_POLL_INTERVAL"),
        ({"JOBS_THREADS": 0}, "JOBS_THREADS"),
        ({"JOBS_POLL_TIMEOUT": 1, "JOBS_POLL_INTERVAL": 5}, "JOBS_POLL_TIMEOUT"),
        ({"LLM_MEDIA_PRICES": '{"gemini/x": {"per_pixel": 1}}'}, "per_pixel"),
        ({"LLM_MEDIA_PRICES": '{"gemini/x": {"per_image": -1}}'}, "LLM_MEDIA_PRICES"),
        ({"MEDIA_STORAGE_URL": "nosuchfs://bucket/media"}, "MEDIA_STORAGE_URL"),
    ],
)
def test_bad_settings_stop_start_up_naming_the_key(make_app, settings, words):
    with pytest.raises(ConfigError, match=words):
        make_app(**settings)


def test_media_prices_from_settings(make_app, gemini):
    from decimal import Decimal

    app = make_app(GEMINI_API_KEY=CANARY_GEMINI_KEY, GENAI_BASE_URL=gemini.base_url,
                   LLM_MEDIA_PRICES='{"gemini/imagen-4.0-generate-001": {"per_image": 0.5}}')  # fmt: skip
    with app.app_context():
        from app.llm import get_llm

        assert get_llm().generate_image("x", model=IMAGEN, n=2).cost == Decimal("1.0")


def test_the_migration_makes_the_job_table_the_model_describes(tmp_path):
    """``flask db upgrade`` then ``flask db check``: nothing left to migrate, and one head."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    env = {**{k: v for k, v in os.environ.items() if k.startswith(("PATH", "LANG", "COV_", "COVERAGE"))},
           "SECRET_KEY": "k" * 40, "INSTANCE_PATH": str(tmp_path), "DOTENV_PATH": str(tmp_path / "none"),
           "DATABASE_URL": f"sqlite:///{tmp_path}/app.db"}  # fmt: skip

    def flask(*args):
        command = [sys.executable, "-m", "flask", "--app", "wsgi", "db", *args]
        return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=True)

    flask("upgrade")
    assert "No new upgrade operations detected" in flask("check").stdout
    heads = flask("heads").stdout.split()
    assert heads.count("(head)") == 1 and heads[0] == "d93d09aef2fb"
