"""``/livez`` and ``/readyz``: what an orchestrator or load balancer asks."""

from __future__ import annotations

from flask import Blueprint, Response, current_app, json

from app.health import run_checks

bp = Blueprint("probes", __name__)

HEALTH_JSON = "application/health+json"


@bp.get("/livez")
def livez() -> Response:
    """The process is up and serving; no dependency is checked."""
    return _health_response({"status": "pass"}, 200)


@bp.get("/readyz")
def readyz() -> Response:
    """Every configured service, checked concurrently; 503 when a required one fails."""
    report = run_checks(current_app._get_current_object())  # type: ignore[attr-defined]
    return _health_response(report.as_health_json(), 503 if report.status == "fail" else 200)


def _health_response(body: dict[str, object], status: int) -> Response:
    response = Response(json.dumps(body), status=status, mimetype=HEALTH_JSON)
    response.headers["Cache-Control"] = "no-store"
    return response
