"""Per-process resources of a worker, created after the fork: database engine, Redis client."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import redis
from sqlalchemy import Connection, Engine
from sqlalchemy.orm import Session, sessionmaker

from app.db import make_engine, make_sessionmaker, transaction
from app.settings import get_settings

_engines: dict[int, tuple[Engine, sessionmaker[Session]]] = {}
_redis: dict[int, redis.Redis] = {}


def _database() -> tuple[Engine, sessionmaker[Session]]:
    # A connection pool must never cross a fork: each worker process builds its own.
    pid = os.getpid()
    if pid not in _engines:
        engine = make_engine(get_settings(), worker=True, pool_size=2)
        _engines[pid] = (engine, make_sessionmaker(engine))
    return _engines[pid]


def worker_sessionmaker() -> sessionmaker[Session]:
    return _database()[1]


@contextmanager
def worker_transaction() -> Iterator[Session]:
    """The task wrapper's unit of work: commit on success, roll back on error."""
    with transaction(worker_sessionmaker()) as session:
        yield session


@contextmanager
def worker_connection() -> Iterator[Connection]:
    """One pooled connection for a task's transactions, one after another (see
    `session_on`): a single checkout per task instead of one per transaction."""
    engine, _ = _database()
    with engine.connect() as connection:
        yield connection


@contextmanager
def session_on(connection: Connection) -> Iterator[Session]:
    """A unit of work on `connection`, which must not be in a transaction: commit on success,
    roll back on error (the connection can then run the next one)."""
    with (
        Session(bind=connection, expire_on_commit=False, autoflush=False) as session,
        session.begin(),
    ):
        yield session


def broker_redis() -> redis.Redis:
    """A client of the service's Redis (`Settings.redis`: the broker's on a Redis broker), for
    delivery counts. Raises `redis.ConnectionError` when there is none (RabbitMQ without
    `REDIS_URL`): callers treat it as a Redis that does not answer."""
    pid = os.getpid()
    if pid not in _redis:
        url = get_settings().redis
        if url is None:
            raise redis.ConnectionError("no Redis: the broker is RabbitMQ and REDIS_URL is unset")
        _redis[pid] = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
    return _redis[pid]
