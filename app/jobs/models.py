"""The job table: what RQ's TTLs forget, kept for as long as the app wants it.

One row per job (an image or a video): who asked (``tenant``, ``user``), where
it is (``status``, ``phase``, ``progress``), what the provider knows it by
(``operation_name``: a restarted worker resumes from it and never submits
again), what it made (``result``: media ids, and the images the provider
filtered with their reasons), and how it failed (``error_kind``,
``error_message``, redacted). ``submitted_at`` is set just before a
generation request is sent: a job found with it and without an answer may
have started a generation, so it is never sent again by itself.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import JSON, DateTime, Integer, Numeric, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from app.services.db_service import Base

#: Every status a job can have; the last three are final.
STATUSES = ("queued", "running", "waiting_on_provider", "succeeded", "failed", "cancelled")
FINAL = frozenset({"succeeded", "failed", "cancelled"})
ACTIVE = tuple(status for status in STATUSES if status not in FINAL)


class Job(Base):
    __tablename__ = "job"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(24), index=True)
    #: Within ``running``/``waiting_on_provider``: ``submitting``, ``polling``, ``downloading``, ``storing``.
    phase: Mapped[str | None] = mapped_column(String(24))
    progress: Mapped[int] = mapped_column(Integer, default=0)
    tenant: Mapped[str | None] = mapped_column(String(100), index=True)
    user: Mapped[str | None] = mapped_column(String(100))
    provider: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(200))
    #: The validated parameters (prompt, n, size...); an input image is a media id, never bytes.
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    #: The LLM call's id, the same in every step: hooks see one call per job.
    call_id: Mapped[str] = mapped_column(String(32))
    operation_name: Mapped[str | None] = mapped_column(String(500))
    submitted_at: Mapped[datetime | None] = mapped_column(DateTime)
    #: The provider's files still to download (``files/<id>``): names, never links.
    pending_files: Mapped[list[str] | None] = mapped_column(JSON)
    #: ``{"media": [ids], "filtered": [{"reason": ...}]}``
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error_kind: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    usage_unit: Mapped[str | None] = mapped_column(String(16))
    usage_quantity: Mapped[Decimal | None] = mapped_column(Numeric(12, 3))
    cost: Mapped[Decimal | None] = mapped_column(Numeric(14, 6))
    #: How many steps were enqueued, and the queue's id of the latest (``<id>-<step>``).
    step: Mapped[int] = mapped_column(Integer, default=0)
    queue_job_id: Mapped[str | None] = mapped_column(String(64))
    #: When the latest step is due (a poll waits until then).
    next_step_at: Mapped[datetime | None] = mapped_column(DateTime)
    #: Polling stops here (JOBS_POLL_TIMEOUT after the submit).
    deadline_at: Mapped[datetime | None] = mapped_column(DateTime)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    started_at: Mapped[datetime | None] = mapped_column(DateTime)
    updated_at: Mapped[datetime] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)

    @property
    def final(self) -> bool:
        return self.status in FINAL

    def as_dict(self) -> dict[str, Any]:
        """What ``GET /api/jobs/<id>`` and ``flask jobs show`` say (never the prompt or a link)."""
        result = self.result or {}
        error = (
            {"type": self.error_kind, "message": self.error_message} if self.error_kind is not None else None
        )
        return {
            "id": self.id,
            "kind": self.kind,
            "status": self.status,
            "phase": self.phase,
            "progress": self.progress,
            "model": f"{self.provider}/{self.model}",
            "tenant": self.tenant,
            "user": self.user,
            "operation": self.operation_name,
            "media": list(result.get("media", [])),
            "filtered": list(result.get("filtered", [])),
            "error": error,
            "usage": {
                "unit": self.usage_unit,
                "quantity": float(self.usage_quantity) if self.usage_quantity is not None else None,
                "cost": str(self.cost) if self.cost is not None else None,
            },
            "created_at": _iso(self.created_at),
            "started_at": _iso(self.started_at),
            "updated_at": _iso(self.updated_at),
            "finished_at": _iso(self.finished_at),
        }


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat() + "Z"


__all__ = ["ACTIVE", "FINAL", "STATUSES", "Job"]
