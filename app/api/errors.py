"""Database trouble as the client sees it: 503 with `Retry-After`, never a 500.

A lost connection, a lock or statement timeout, a pool with no connection free in time: the
same request may well succeed a moment later, and the client is told so. What the unit of work
could retry safely it already has (`app.api.deps.UnitOfWork`).
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy import exc as sa_exc

from app.db import connection_lost
from app.errors import Unavailable
from app.settings import Settings

LOCK_NOT_AVAILABLE = "55P03"
QUERY_CANCELED = "57014"
# Errors a later try cannot fix (program_limit_exceeded: a value too large for an index...).
PERMANENT_CLASSES = ("54",)


def _sqlstate(error: BaseException) -> str:
    return getattr(getattr(error, "orig", None), "sqlstate", None) or ""


def explain(error: Exception, settings: Settings) -> str | None:
    """What a 503 says about a database error, or None if it is no reason for a 503."""
    if isinstance(error, Unavailable):
        return error.message
    if isinstance(error, sa_exc.TimeoutError):
        return (
            "no database connection came free within "
            f"API_POOL_TIMEOUT_SECONDS={settings.api_pool_timeout_seconds}"
        )
    state = _sqlstate(error)
    if state == LOCK_NOT_AVAILABLE:
        return f"a lock wait exceeded API_LOCK_TIMEOUT_MS={settings.api_lock_timeout_ms}"
    if state == QUERY_CANCELED:
        return f"a statement exceeded API_STATEMENT_TIMEOUT_MS={settings.api_statement_timeout_ms}"
    if connection_lost(error) or isinstance(error, sa_exc.DisconnectionError):
        return "the database connection was lost"
    transient = isinstance(error, sa_exc.OperationalError | sa_exc.InterfaceError)
    if transient and not state.startswith(PERMANENT_CLASSES):
        # A database that refuses connections (restarting, failing over), a serialization
        # failure, a deadlock: a later try can succeed.
        return "the database is unavailable"
    return None


def install(api: FastAPI, settings: Settings) -> None:
    """Answer `Unavailable`, pool timeouts and transient database errors with 503."""

    async def unavailable(request: Request, error: Exception) -> JSONResponse:
        reason = explain(error, settings)
        if reason is None and _sqlstate(error).startswith(PERMANENT_CLASSES):
            # A value past what PostgreSQL can store (a jsonb above its size limit, an index
            # row too large): the request is too large, not the server broken.
            return JSONResponse(
                {
                    "detail": [
                        {
                            "loc": ["body"],
                            "msg": "the change is larger than the database can store",
                            "type": "too_large",
                        }
                    ]
                },
                status_code=413,
            )
        if reason is None:
            raise error  # not transient: the server's own 500
        field = list(error.field) if isinstance(error, Unavailable) else []
        return JSONResponse(
            {"detail": [{"loc": field, "msg": f"{reason}; retry later", "type": "Unavailable"}]},
            status_code=503,
            headers={"Retry-After": str(settings.api_retry_after_seconds)},
        )

    for kind in (Unavailable, sa_exc.TimeoutError, sa_exc.DBAPIError, sa_exc.DisconnectionError):
        api.add_exception_handler(kind, unavailable)
