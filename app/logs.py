"""Logging of every process: the API, the Celery worker and beat, the CLI.

`configure` puts one handler on the root logger, writing to stderr from `LOG_LEVEL` up, in
`LOG_FORMAT`: text for people, or one JSON object a line for a log pipeline. The loggers that
bring handlers of their own (uvicorn's, Celery's) are routed through it, and Python warnings
too, so that in `json` every line a process writes parses.

Fields bound with `bind` (a running task's id and its chat) ride on every line logged meanwhile,
from any module: `tasks.logs` binds them around each task.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar, Token
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, TextIO

from app.settings import LogFormat, Settings, get_settings

__all__ = ["JsonFormatter", "TextFormatter", "bind", "bound", "clear", "configure", "reset"]

Fields = Mapping[str, Any]

_bound: ContextVar[Fields] = ContextVar("log_fields", default=MappingProxyType({}))

# Loggers that uvicorn (its dictConfig at start-up) or Celery give handlers of their own. Their
# handlers go, and their lines reach the root's instead. A logger left with no handler and
# `propagate` off is one silenced on purpose (uvicorn's `--no-access-log`): it stays silent.
OWN_HANDLERS = (
    "uvicorn",
    "uvicorn.error",
    "uvicorn.access",
    "uvicorn.asgi",
    "celery",
    "celery.task",
    "celery.redirected",
)

# What every record has; any other attribute came from `extra=` or from the bound fields (but
# uvicorn's `color_message`, its message with terminal colours).
_RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
    "bound",
    "color_message",
}

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(process)d]: %(message)s"


def bind(**fields: Any) -> Token[Fields]:
    """Add `fields` to every line logged in this context until `reset` with the token."""
    return _bound.set(MappingProxyType({**_bound.get(), **fields}))


def reset(token: Token[Fields]) -> None:
    _bound.reset(token)


@contextmanager
def bound(**fields: Any) -> Iterator[None]:
    token = bind(**fields)
    try:
        yield
    finally:
        reset(token)


def clear() -> None:
    _bound.set(MappingProxyType({}))


class BoundFields(logging.Filter):
    """Copies the bound fields onto each record (`record.bound`, and one attribute each)."""

    def filter(self, record: logging.LogRecord) -> bool:
        fields = _bound.get()
        record.bound = fields
        for key, value in fields.items():
            record.__dict__.setdefault(key, value)
        # Celery's lines about a task outside it (received, retried) name it in `data`.
        data = record.__dict__.get("data")
        if isinstance(data, dict) and isinstance(data.get("id"), str):
            record.__dict__.setdefault("task_id", data["id"])
        return True


def _message(record: logging.LogRecord) -> str:
    """The record's message; a call whose arguments do not fit its format (a bug in the
    caller) still makes one line, not the logging module's multi-line error report."""
    try:
        return record.getMessage()
    except Exception as exc:
        try:
            args = repr(record.args)
        except Exception:
            args = "<unprintable>"
        return f"{record.msg!s} (arguments {args} did not format: {type(exc).__name__})"


class JsonFormatter(logging.Formatter):
    """One JSON object a line: timestamp (UTC), level, logger, message, process id, the bound
    fields and any `extra=`; a traceback goes in `exception`, newlines escaped."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": _message(record),
            "process": record.process,
        }
        if record.name == "uvicorn.access" and isinstance(record.args, tuple):
            entry.update(_access_fields(record.args))
        extra = {
            key: value
            for key, value in record.__dict__.items()
            if key not in _RECORD_ATTRIBUTES and key not in entry and not key.startswith("_")
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        try:
            return json.dumps({**entry, **extra}, default=str, allow_nan=False)
        except (TypeError, ValueError):
            # An `extra=` value JSON cannot hold (a NaN, a dict with tuple keys): its text.
            shown = {key: str(value) for key, value in extra.items()}
            return json.dumps({**entry, **shown}, default=str)


def _access_fields(args: tuple[Any, ...]) -> dict[str, Any]:
    """uvicorn's access line carries (client, method, path, HTTP version, status)."""
    if len(args) != 5:
        return {}
    client, method, path, _, status = args
    return {"client": client, "method": method, "path": path, "status": status}


class TextFormatter(logging.Formatter):
    """`2024-05-01 12:00:00,123 INFO tasks.sync [4242]: message [task_id=... chat_id=...]`."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        fields = getattr(record, "bound", None)
        if fields:
            line += " [" + " ".join(f"{key}={value}" for key, value in fields.items()) + "]"
        return line


def configure(settings: Settings | None = None, stream: TextIO | None = None) -> None:
    """Route every log line of this process through one handler on the root logger, in
    `LOG_FORMAT`, from `LOG_LEVEL` up. Called once at start-up by each entry point (never on
    import: a test process keeps its own logging)."""
    settings = settings or get_settings()
    handler = logging.StreamHandler(stream or sys.stderr)
    if settings.log_format is LogFormat.JSON:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
    handler.addFilter(BoundFields())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.log_level)
    for name in OWN_HANDLERS:
        logger = logging.getLogger(name)
        if logger.handlers:
            logger.handlers.clear()
            logger.propagate = True
    # `warnings.warn` otherwise writes its own two-line text to stderr. A `fileConfig` run
    # earlier in the process (alembic's, in-process) disables loggers that existed then.
    # Off first: a capture left on by an earlier call would keep `warnings.showwarning` as
    # whoever replaced it since (a test runner's recorder, say).
    logging.captureWarnings(False)
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").disabled = False
