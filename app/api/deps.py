"""Request dependencies: settings, the current user, the per-user and per-chat gates, and the
unit of work that runs a request's operation in its transaction (`UnitOfWork.run`).

The handler commits through `run`, before the response is sent: a 2xx always means the change is
durable. Its jobs go to the process's background publisher only after that commit.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Concatenate, ParamSpec, TypeVar

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from app.api.gate import Gates
from app.auth import InvalidToken, User, verify_token
from app.db import connection_lost
from app.errors import Unavailable
from app.jobs import JobQueue
from app.publisher import BackgroundPublisher
from app.services.chats import Context
from app.settings import Settings

log = logging.getLogger(__name__)
bearer = HTTPBearer(auto_error=False)
P = ParamSpec("P")
R = TypeVar("R")


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(get_settings)]


def get_current_user(
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> User:
    if credentials is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing bearer token in the Authorization header",
            headers={"WWW-Authenticate": "Bearer"},
        )
    try:
        return verify_token(settings.signing_secret, credentials.credentials)
    except InvalidToken as exc:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            f"invalid bearer token: {exc}",
            headers={"WWW-Authenticate": "Bearer"},
        ) from None


CurrentUser = Annotated[User, Depends(get_current_user)]


def get_admin(user: CurrentUser) -> User:
    if not user.admin:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "admin token required")
    return user


AdminUser = Annotated[User, Depends(get_admin)]


async def user_gate(request: Request, user: CurrentUser) -> AsyncIterator[None]:
    """Every request of a user that reads a body or uses the database passes the user's gate
    (`app.api.gate`, USER_CONCURRENCY) before it reads its body, takes a thread or checks out a
    connection. Both the body (`app.api.body.json_body`) and the unit of work depend on it
    through `UserGate`, so a request takes it once, whichever of them comes first."""
    gates: Gates = request.app.state.user_gates
    async with gates.hold(user.id):
        yield


# `scope="function"`: released when the handler returns (its commit done), not once the
# response has been sent. One annotation for every use, so FastAPI's cache runs it once.
UserGate = Annotated[None, Depends(user_gate, scope="function")]


async def chat_gate(request: Request, user: CurrentUser) -> AsyncIterator[None]:
    """A write to an existing chat (any method but GET or HEAD on a path with a chat id) passes
    the chat's gate, per user, before its transaction checks out a connection: see
    `app.api.gate`. Waiting here costs no thread and no connection."""
    raw = request.path_params.get("chat_id")
    try:
        chat_id = uuid.UUID(raw) if raw is not None else None
    except ValueError:
        chat_id = None  # the route answers 422 before any database work
    if chat_id is None or request.method in ("GET", "HEAD"):
        yield
        return
    gates: Gates = request.app.state.chat_gates
    async with gates.hold((user.id, chat_id)):
        yield


class UnitOfWork:
    """A request's transaction: `run(operation, *args)` runs one of `app.services.chats` in a
    transaction of its own, commits, then hands the jobs it recorded to the process's background
    publisher (`app.publisher`), which sends them after the response, off the request's path.

    A connection that dies before the commit (the database restarted or failed over, a pooler
    or an operator ended the backend) rolled the whole transaction back in the server: nothing
    of it was stored, so the operation runs again on a fresh connection, up to
    `api_connection_retries` times. That holds for every operation, the ones that are not
    idempotent included (create, fork and import make a new chat on each run): a run is only
    repeated when its transaction never reached COMMIT. A connection lost during the COMMIT
    itself leaves the outcome unknown: never repeated here, answered 503 with `Retry-After`
    saying so. A client may then send it again: appends, turn completions and snapshots are
    idempotent on message ids; a create, fork or import sent again may make a second chat.
    """

    def __init__(
        self,
        factory: sessionmaker[Session],
        publisher: BackgroundPublisher,
        settings: Settings,
        user_id: str,
    ) -> None:
        self.factory = factory
        self.publisher = publisher
        self.settings = settings
        self.user_id = user_id

    def run(
        self, operation: Callable[Concatenate[Context, P], R], *args: P.args, **kwargs: P.kwargs
    ) -> R:
        retries = 0
        while True:
            jobs = JobQueue()  # the phase, read inside the transaction, may disable it
            with self.factory() as session:
                context = Context(
                    session=session, jobs=jobs, settings=self.settings, user_id=self.user_id
                )
                try:
                    result = operation(context, *args, **kwargs)
                except DBAPIError as exc:
                    if not connection_lost(exc) or retries >= self.settings.api_connection_retries:
                        raise
                    retries += 1
                    log.warning(
                        "database connection lost before the commit (%s); run %d of %d",
                        type(exc.orig).__name__,
                        retries + 1,
                        self.settings.api_connection_retries + 1,
                    )
                    continue
                try:
                    session.commit()
                except DBAPIError as exc:
                    if connection_lost(exc):
                        raise Unavailable(
                            "the database connection was lost during the commit: the change "
                            "may or may not be stored"
                        ) from exc
                    raise
            self.publisher.submit(jobs.jobs)  # never blocks on the broker, never raises
            return result


def unit_of_work(
    request: Request,
    settings: SettingsDep,
    user: CurrentUser,
    _user: UserGate,
    _chat: Annotated[None, Depends(chat_gate, scope="function")],
) -> UnitOfWork:
    state = request.app.state
    return UnitOfWork(state.sessionmaker, state.publisher, settings, user.id)


# The gates' `scope="function"`: they are released when the handler returns (its commit done), not
# once the response has been sent.
Uow = Annotated[UnitOfWork, Depends(unit_of_work)]
