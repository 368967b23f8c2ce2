"""Checks a worker makes once, when it is ready: things that would otherwise fail silently."""

from __future__ import annotations

import logging
from typing import Any

import redis
from celery.signals import worker_ready

from app import topology
from app.settings import BrokerKind, get_settings

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
    settings = get_settings()
    if settings.broker_kind is not BrokerKind.REDIS or settings.redis is None:
        return  # RabbitMQ keeps a queue until it is deleted; memory:// has nothing to check
    client = redis.Redis.from_url(settings.broker, socket_timeout=5, socket_connect_timeout=5)
    try:
        warning = broker_eviction_warning(client)
    finally:
        client.close()
    if warning is None:
        log.info("broker maxmemory-policy is noeviction: queued tasks cannot be evicted")
    else:
        log.warning(warning)


@worker_ready.connect
def declare_dead_letter_queue(sender: Any = None, **_: Any) -> None:
    """On RabbitMQ, the queue that keeps what the task queues dead-letter past their delivery
    limit: without it RabbitMQ drops those messages. Declared by every worker (it is idempotent)
    before any delivery can reach the limit."""
    if get_settings().broker_kind is not BrokerKind.AMQP:
        return
    from tasks import celery

    try:
        with celery.connection_for_write() as connection:
            queue = topology.dead_letter_queue().bind(connection.default_channel)  # type: ignore[no-untyped-call]
            queue.declare()
    except Exception as exc:  # the limit still ends the loop; only the record would be lost
        log.error("could not declare the dead-letter queue %s: %s", topology.DEAD_LETTER_QUEUE, exc)
    else:
        log.info("dead-letter queue %s declared", topology.DEAD_LETTER_QUEUE)
