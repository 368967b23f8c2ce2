"""What the broker and the workers say about themselves, for `python -m app status`."""

from __future__ import annotations

import redis

from app.settings import get_settings
from tasks import celery
from tasks.queues import Queue

# kombu's Redis transport keeps a queue as a list per priority step, and messages taken but not
# acked yet in one hash for the whole broker.
PRIORITY_SEPARATOR = "\x06\x16"
UNACKED = "unacked"


def queue_lengths() -> tuple[dict[str, int], int]:
    """Messages waiting per queue, and messages delivered to a worker but not acked yet."""
    client = redis.Redis.from_url(get_settings().redis_url, socket_timeout=1)
    waiting = {}
    for queue in Queue:
        keys = [queue.value, *(f"{queue.value}{PRIORITY_SEPARATOR}{p}" for p in range(1, 10))]
        waiting[queue.value] = sum(int(client.llen(key)) for key in keys)
    return waiting, int(client.hlen(UNACKED))


def workers_seen(timeout: float = 1.0) -> list[str]:
    replies = celery.control.ping(timeout=timeout) or []
    return sorted(name for reply in replies for name in reply)
