"""Request dependencies: settings, the current user, and the unit of work of a request.

The unit of work is the request's only transaction: it commits after the handler returns and
before the response is sent, then hands the jobs the handler recorded to the process's background
publisher (`app.publisher`), which sends them after the response, off the request's path.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.auth import InvalidToken, User, verify_token
from app.jobs import JobQueue
from app.publisher import BackgroundPublisher
from app.services.chats import Context
from app.settings import Settings

bearer = HTTPBearer(auto_error=False)


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


def unit_of_work(request: Request, settings: SettingsDep, user: CurrentUser) -> Iterator[Context]:
    """One transaction per request; its jobs go to the publisher only once it has committed
    (a rollback drops them)."""
    queue = JobQueue()  # the phase, read inside the transaction, may disable it
    with request.app.state.sessionmaker() as session, session.begin():
        yield Context(session=session, jobs=queue, settings=settings, user_id=user.id)
    publisher: BackgroundPublisher = request.app.state.publisher
    publisher.submit(queue.jobs)  # never blocks on the broker, never raises


# `scope="function"`: the commit runs when the handler returns, before the response is sent, so
# a 2xx always means the JSONB change is durable.
Ctx = Annotated[Context, Depends(unit_of_work, scope="function")]
