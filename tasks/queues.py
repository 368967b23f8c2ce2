"""The queue names, used by the task definitions and by `celeryconfig.py` alike."""

from __future__ import annotations

from enum import StrEnum


class Queue(StrEnum):
    SYNC = "dualwrite.sync"  # per-chat copies enqueued by handlers and the sweep
    MAINTENANCE = "dualwrite.maintenance"  # sweep and reconcile
