"""Jobs on a real RQ worker and a real redis-server: fork safety, and a video that survives SIGKILLs.

The worker test runs ``flask jobs worker`` as a user would (``wsgi:app``, settings in the
environment) against PostgreSQL, redis-server and the fake Gemini server, and kills its whole
process group (worker, work horse, scheduler) with SIGKILL at three points: while the submit
step runs (the test holds the job's row locked, so the step waits there, before any request),
while a poll is in flight and while the download is in flight (the fake server holds those
requests open). Each time a new worker must take the job on from where it was. Short settings
keep it to seconds: polls every 0.2 s, leases of 1 s, recovery every second.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from app.jobs import create_image_job, get_job
from app.services.db_service import db
from app.services.genai_service import get_genai_client
from tests.conftest import CANARY_GEMINI_KEY, ROOT
from tests.fake_gemini import FakeGemini

VEO = "gemini/veo-3.0-generate-001"


@pytest.fixture
def gemini():
    fake = FakeGemini(CANARY_GEMINI_KEY)
    yield fake
    fake.stop()


def test_a_work_horse_builds_its_own_sdk_client(make_app, gemini, redis):
    """The parent's connection (one client port) is never used nor closed by the horse (another)."""
    from app.jobs.worker import build_worker

    queue = f"q{uuid.uuid4().hex[:8]}"
    app = make_app(
        GEMINI_API_KEY=CANARY_GEMINI_KEY,
        GENAI_BASE_URL=gemini.base_url,
        REDIS_URL=_url(redis),
        JOBS_QUEUE=queue,
    )
    with app.app_context():
        db.create_all()
        client = get_genai_client()
        client.models.generate_content(model="gemini-2.5-flash-image", contents="warm up")
        parent_port = gemini.server.requests[-1].port
        job = create_image_job("a cat", "gemini/imagen-4.0-generate-001")
        worker = build_worker(app, [queue])
        handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
        try:
            assert worker.work(burst=True) is True
        finally:
            signal.signal(signal.SIGINT, handlers[0])
            signal.signal(signal.SIGTERM, handlers[1])
        db.session.expire_all()
        assert get_job(job.id).status == "succeeded"
        (predict,) = [r for r in gemini.server.requests if r.path.endswith(":predict")]
        assert predict.port != parent_port  # the horse's own connection
        assert parent_port not in gemini.server.closed_ports  # the parent's, left open by the child
        assert get_genai_client() is client
        client.models.generate_content(model="gemini-2.5-flash-image", contents="again")
        assert gemini.server.requests[-1].port == parent_port  # and still the parent's to use


def _url(redis) -> str:
    kwargs = redis.connection_pool.connection_kwargs
    return f"redis://{kwargs['host']}:{kwargs['port']}/0"


# --- the video under SIGKILL ----------------------------------------------------------------


@pytest.fixture
def pg_database(postgres_server):
    name = f"jobs_{uuid.uuid4().hex[:8]}"
    postgres_server.psql(f"CREATE DATABASE {name}")
    url = postgres_server.url.rsplit("/", 1)[0] + "/" + name
    yield url
    postgres_server.psql(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'")
    postgres_server.psql(f"DROP DATABASE IF EXISTS {name}")


class Workers:
    """``flask jobs worker`` processes, each the leader of its own process group."""

    def __init__(self, env, log_dir):
        self.env = env
        self.log_dir = log_dir
        self.started = []

    def start(self):
        log = open(self.log_dir / f"worker{len(self.started)}.log", "wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "flask", "--app", "wsgi", "jobs", "worker"],
            cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        self.started.append(process)
        return process

    def kill(self, process):
        """SIGKILL the worker and everything it started, as a machine that dies would.

        RQ's work horse calls ``setsid()``, so the worker's process group does not hold it:
        the tree is read from /proc.
        """
        tree = [process.pid, *_descendants(process.pid)]
        assert len(tree) >= 2, "the worker has no work horse or scheduler to kill"
        for pid in tree:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        process.wait(10)
        _wait(lambda: not any(_alive(pid) for pid in tree), "the killed processes to go", self)

    def stop_all(self):
        last = self.started[-1] if self.started else None
        if last is not None and last.poll() is None:  # a warm shutdown: its coverage data is written
            last.send_signal(signal.SIGTERM)
            try:
                last.wait(10)
            except subprocess.TimeoutExpired:
                pass
        for process in self.started:
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                process.wait(10)

    def logs(self):
        return "\n".join(
            path.read_text(errors="replace")[-3000:] for path in sorted(self.log_dir.glob("*.log"))
        )


def _descendants(pid):
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parent = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(parent, []).append(int(entry))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait(predicate, what, workers, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}\n{workers.logs()}")


@pytest.mark.postgres
@pytest.mark.slow
def test_a_video_survives_sigkill_in_each_phase(make_app, gemini, redis, pg_database, tmp_path):
    queue = f"q{uuid.uuid4().hex[:8]}"
    settings = {
        "SECRET_KEY": "s" * 40,
        "DATABASE_URL": pg_database,
        "REDIS_URL": _url(redis),
        "GEMINI_API_KEY": CANARY_GEMINI_KEY,
        "GENAI_BASE_URL": gemini.base_url,
        "JOBS_QUEUE": queue,
        "JOBS_POLL_INTERVAL": "0.2",
        "JOBS_LEASE": "1",
        "JOBS_RECOVERY_INTERVAL": "1",
        "MEDIA_STORAGE_URL": str(tmp_path / "media"),
        "LLM_MAX_RETRIES": "0",
    }
    inherited = {
        k: v for k, v in os.environ.items() if k.startswith(("PATH", "LANG", "LC_", "COV_", "COVERAGE"))
    }
    env = {**inherited, **settings, "INSTANCE_PATH": str(tmp_path / "instance"),
           "DOTENV_PATH": str(tmp_path / "no.env")}  # fmt: skip
    app = make_app(settings)
    with app.app_context():
        db.create_all()
        from app.llm import get_llm

        job_id = get_llm().generate_video("a fox at dawn", model=VEO, tenant="acme")
    workers = Workers(env, tmp_path)

    def job():
        with app.app_context():
            db.session.expire_all()
            row = get_job(job_id)
            db.session.remove()
            return row

    import psycopg

    try:
        # 1. submitting: the step waits on the job's row, which the test holds; kill it there.
        with psycopg.connect(pg_database, autocommit=False) as lock:
            lock.execute("SELECT id FROM job WHERE id = %s FOR UPDATE", (job_id,))
            first = workers.start()
            with psycopg.connect(pg_database, autocommit=True) as watch:
                _wait(lambda: watch.execute(
                    "SELECT count(*) FROM pg_locks WHERE NOT granted AND locktype = 'transactionid'"
                ).fetchone()[0] > 0, "the submit step to wait on the row", workers)  # fmt: skip
            workers.kill(first)
            lock.rollback()
        time.sleep(0.5)  # what a surviving work horse would do now, it would have done
        assert gemini.count(":predictLongRunning") == 0 and job().status == "queued"

        # 2. polling: the next worker submits; its poll is held open; kill it there.
        release_poll, poll_arrived = gemini.gate("poll")
        second = workers.start()
        _wait(poll_arrived.is_set, "a poll", workers)
        assert job().operation_name is not None and job().status == "waiting_on_provider"
        workers.kill(second)
        release_poll.set()

        # 3. downloading: the next worker polls on (no submit); its download is held open; kill it.
        release_download, download_arrived = gemini.gate("download")
        third = workers.start()
        _wait(download_arrived.is_set, "the download", workers)
        assert job().phase == "downloading"
        workers.kill(third)
        release_download.set()

        # 4. a last worker finishes the job.
        workers.start()
        _wait(lambda: job().final, "the job to end", workers)
        final = job()
        assert final.status == "succeeded", (final.as_dict(), workers.logs())
        assert gemini.submits == {"a fox at dawn": 1}
        assert gemini.count(":predictLongRunning") == 1
        assert len(final.result["media"]) == 1 and final.cost is not None
        logs = workers.logs()
        assert logs.count("its step started on a worker that is gone") >= 3, logs  # one per kill
    finally:
        workers.stop_all()


# --- recovery, step by step ---------------------------------------------------------------


@pytest.fixture
def rq_app(make_app, gemini, redis):
    app = make_app(GEMINI_API_KEY=CANARY_GEMINI_KEY, GENAI_BASE_URL=gemini.base_url, REDIS_URL=_url(redis),
                   JOBS_QUEUE=f"q{uuid.uuid4().hex[:8]}", JOBS_LEASE=1)  # fmt: skip
    with app.app_context():
        db.create_all()
    return app


def test_recovery_leaves_queued_and_leased_steps_and_restarts_lost_ones(rq_app):
    from datetime import timedelta

    from app.jobs import current_jobs, utcnow
    from app.jobs.recovery import recover_stalled, stalled

    with rq_app.app_context():
        job = create_image_job("a cat", "gemini/imagen-4.0-generate-001")
        assert stalled(job) is None  # queued, waiting for a worker
        backend = current_jobs().backend
        assert backend.lease.acquire(job.id, "t", 5) and stalled(job) is None  # a step holds it
        backend.lease.release(job.id, "t")
        from rq.job import Job as RQJob

        from app.services.redis_service import get_redis_client

        RQJob.fetch(job.queue_job_id, connection=get_redis_client()).delete()
        assert stalled(job) == "its latest step is gone"
        assert recover_stalled() == [job.id]
        job = get_job(job.id)
        assert job.step == 2 and backend.status(job.queue_job_id) == "queued"
        # A poll scheduled long ago that no scheduler moved to the queue.
        backend.cancel(job.queue_job_id)
        backend.enqueue(job.id, f"{job.id}-3", delay=60)
        job.queue_job_id, job.next_step_at = f"{job.id}-3", utcnow() - timedelta(seconds=10)
        db.session.commit()
        assert stalled(job) == "its scheduled step is overdue (no scheduler took it)"
        job.next_step_at = utcnow() + timedelta(seconds=30)
        db.session.commit()
        assert stalled(job) is None
