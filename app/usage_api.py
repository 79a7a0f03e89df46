"""``GET /api/usage?from=&to=&group_by=day|model|user|tenant``: the caller's usage, from the rollup.

A blueprint of its own (``/api``'s views are :mod:`app.api`'s), so it checks
the caller's API key itself, as ``/api`` does: 401 without a valid one (unless
``API_AUTH=off``, allowed only in debug, testing or on loopback, where it shows
everything). A key sees its own usage: the calls made with its name as user,
within its tenant. An admin key (``flask api-keys create NAME --admin``) sees
every user and tenant. ``from`` and ``to`` are UTC days (``YYYY-MM-DD``, ``to``
included; defaults: the 30 days to today); a bad one is a 400 naming it.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime

from flask import Blueprint, Response, current_app, jsonify, request
from sqlalchemy.exc import SQLAlchemyError

from app.api import error_response
from app.api_keys import ApiCaller, ApiKeyError, ApiKeysUnavailableError, caller_for_key, presented_key
from app.llm.usage.report import GROUPS, Scope, default_start, usage_report
from app.services.db_service import db

__all__ = ["bp"]

bp = Blueprint("usage_api", __name__, url_prefix="/api")

#: Days a report covers when ``from`` is not given, and the most it may cover.
MAX_DAYS = 3660


class _BadParameter(Exception):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def _day(name: str, default: date) -> date:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    try:
        if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", raw):
            raise ValueError(raw)
        return date.fromisoformat(raw)
    except ValueError:
        raise _BadParameter(name, f"{name} must be a UTC day as YYYY-MM-DD, got {raw[:40]!r}") from None


@bp.get("/usage")
def usage() -> Response:
    """``{"from", "to", "group_by", "scope", "rows": [...], "total": {...}}``; costs as exact USD strings."""
    caller: ApiCaller | None = None
    if current_app.extensions.get("api_auth", True):
        try:
            caller = caller_for_key(presented_key(request.headers))
        except ApiKeyError as exc:
            return error_response(
                401, "unauthorized", exc.message, {"WWW-Authenticate": 'Bearer realm="api"'}
            )
        except ApiKeysUnavailableError:
            return error_response(
                503, "unavailable", "API keys cannot be checked now (the database is unavailable)"
            )
    try:
        end = _day("to", datetime.now(UTC).date())
        start = _day("from", default_start(end))
        if start > end:
            raise _BadParameter("from", f"from ({start}) is after to ({end})")
        if (end - start).days >= MAX_DAYS:
            raise _BadParameter("from", f"a report covers at most {MAX_DAYS} days")
        group_by = request.args.get("group_by") or "day"
        if group_by not in GROUPS:
            raise _BadParameter(
                "group_by", f"group_by must be one of {', '.join(GROUPS)}, got {group_by[:40]!r}"
            )
    except _BadParameter as exc:
        return error_response(400, "invalid_request", exc.message, field=exc.field)
    scope = None if caller is None or caller.admin else Scope(caller.tenant or "", caller.name)
    try:
        report = usage_report(db.session, start, end, group_by, scope)
    except SQLAlchemyError as exc:
        db.session.rollback()
        current_app.logger.error("usage report failed: %s", type(exc).__name__)
        return error_response(
            503, "unavailable", "usage cannot be read now (the database is unavailable or not migrated)"
        )
    report["scope"] = "all" if scope is None else {"user": scope.user, "tenant": scope.tenant or None}
    return jsonify(report)
