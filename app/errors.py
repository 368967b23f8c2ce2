"""Errors the services raise; the API turns each into a 4xx naming the offending field, or a 503
with `Retry-After` (`Unavailable`)."""

from __future__ import annotations


class ServiceError(Exception):
    status_code = 400

    def __init__(self, message: str, *, field: tuple[str | int, ...] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class NotFound(ServiceError):
    status_code = 404


class Forbidden(ServiceError):
    status_code = 403


class Conflict(ServiceError):
    status_code = 409


class TooLarge(ServiceError):
    status_code = 413


class Invalid(ServiceError):
    status_code = 422


class Unavailable(ServiceError):
    """The service cannot answer now, and the same request may well succeed shortly: 503 with
    `Retry-After` (the database went away, a wait for it ran out, a chat has too many writes
    queued)."""

    status_code = 503
