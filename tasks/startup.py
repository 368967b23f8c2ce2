"""Checks a worker makes once, when it is ready: things that would otherwise fail silently."""

from __future__ import annotations

import logging
from typing import Any

import redis
from celery.signals import worker_ready

from app.settings import get_settings

log = logging.getLogger(__name__)


def broker_eviction_warning(client: redis.Redis) -> str | None:
    """Why the broker's Redis may lose queued tasks, or None when it cannot evict keys.

    Under memory pressure a Redis with any `maxmemory-policy` but `noeviction` deletes keys, a
    queue or an unacked hash among them: every task in it is gone, with no error anywhere.
    """
    try:
        config = client.config_get("maxmemory-policy")
        policy = config.get("maxmemory-policy")
    except redis.RedisError as exc:  # CONFIG renamed or refused, as managed Redis often has it
        return (
            f"could not check the broker's maxmemory-policy ({type(exc).__name__}: {exc}); "
            "make sure it is noeviction, or an evicted queue loses its tasks silently"
        )
    if policy is None:
        return (
            "could not check the broker's maxmemory-policy (CONFIG GET returned nothing); make "
            "sure it is noeviction, or an evicted queue loses its tasks silently"
        )
    if isinstance(policy, bytes):
        policy = policy.decode()
    if policy == "noeviction":
        return None
    return (
        f"the broker's Redis has maxmemory-policy {policy}: under memory pressure it may evict "
        "a queue, and every task in it is lost silently; set maxmemory-policy noeviction"
    )


@worker_ready.connect
def check_broker_eviction(**_: Any) -> None:
    client = redis.Redis.from_url(
        get_settings().redis_url, socket_timeout=5, socket_connect_timeout=5
    )
    try:
        warning = broker_eviction_warning(client)
    finally:
        client.close()
    if warning is None:
        log.info("broker maxmemory-policy is noeviction: queued tasks cannot be evicted")
    else:
        log.warning(warning)
