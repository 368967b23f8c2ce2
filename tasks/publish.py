"""The sweep's publisher: one `app.broker.BoundedPublisher` per worker process, kept between
sweeps. The producer itself lives in `app.broker` (re-exported here for scripts and tests)."""

from __future__ import annotations

import os

from app.broker import BoundedPublisher, bounded_publisher, producer
from app.services.sync import releaser
from app.settings import get_settings
from tasks.runtime import worker_sessionmaker

__all__ = ["BoundedPublisher", "bounded_publisher", "process_publisher", "producer"]

_shared: dict[int, BoundedPublisher] = {}


def process_publisher() -> BoundedPublisher:
    """This process's publisher (the sweep's), built on first use and kept: its producer is
    reused by every later sweep. Never shared across a fork."""
    pid = os.getpid()
    if pid not in _shared:
        _shared[pid] = BoundedPublisher(get_settings(), releaser(worker_sessionmaker()))
    return _shared[pid]
