"""Per-process resources of a worker: the database engine, created after the fork."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from app.db import make_engine, make_sessionmaker, transaction
from app.settings import get_settings

_engines: dict[int, tuple[Engine, sessionmaker[Session]]] = {}


def _factory() -> sessionmaker[Session]:
    # A connection pool must never cross a fork: each worker process builds its own.
    pid = os.getpid()
    if pid not in _engines:
        engine = make_engine(get_settings(), worker=True, pool_size=2)
        _engines[pid] = (engine, make_sessionmaker(engine))
    return _engines[pid][1]


@contextmanager
def worker_transaction() -> Iterator[Session]:
    """The task wrapper's unit of work: commit on success, roll back on error."""
    with transaction(_factory()) as session:
        yield session
