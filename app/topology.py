"""What the service declares on its broker and how Celery talks to it, per kind of broker
(`Settings.broker_kind`). `celeryconfig.py` (workers, beat) and the API's producer
(`app.broker.producer`) both take their broker options from here.

On Redis the queues are kombu's lists, as they always were. On RabbitMQ each queue is a durable
quorum queue (replicated, survives a node), bound to a topic exchange so that Celery's native
delayed delivery holds a countdown in RabbitMQ instead of in a worker's prefetch, with a delivery
limit and a dead-letter queue: a message whose workers keep dying under it ends there instead of
looping, also when no worker got to count it.
"""

from __future__ import annotations

from typing import Any

from kombu.entity import Exchange
from kombu.entity import Queue as KombuQueue

from app.settings import AMQP_DELIVERY_LIMIT, BrokerKind, Settings
from app.task_names import Queue

# RabbitMQ only: the exchange every task queue is bound to, by its own name. Topic, because
# native delayed delivery routes a delayed message back through it with a longer routing key
# (`0.1.1...dualwrite.sync`); a direct exchange would make Celery hold countdowns in the worker.
EXCHANGE = "dualwrite"
# Where RabbitMQ puts a message past its queue's delivery limit (see `delivery_limit`).
DEAD_LETTER_EXCHANGE = "dualwrite.dead"
DEAD_LETTER_QUEUE = "dualwrite.dead"


# The quorum queues' `x-delivery-limit`: how often RabbitMQ may hand a message back after its
# consumer was lost before it dead-letters it (RabbitMQ 4's own default). A constant, not a
# setting: a queue's arguments must be the same in every process that declares it (API and
# workers alike), or the declare fails with PRECONDITION_FAILED and nothing is sent; and they
# cannot change once the queue exists. It stays above the worker's own cap (`MAX_REDELIVERIES`,
# counted from the message's `x-delivery-count` in `tasks.sync`, checked by the settings), so
# that a sync's dead letter is recorded by the worker first; the broker's limit catches the rest
# (a maintenance task, a message that kills its worker before it is counted).
DELIVERY_LIMIT = AMQP_DELIVERY_LIMIT


def task_queues(settings: Settings) -> list[KombuQueue]:
    """The project's queues as this broker holds them."""
    if settings.broker_kind is BrokerKind.REDIS:
        return [KombuQueue(q.value, routing_key=q.value) for q in Queue]  # type: ignore[no-untyped-call]
    exchange = Exchange(EXCHANGE, type="topic", durable=True)  # type: ignore[no-untyped-call]
    return [
        KombuQueue(  # type: ignore[no-untyped-call]
            q.value,
            exchange,
            routing_key=q.value,
            durable=True,
            queue_arguments={
                "x-queue-type": "quorum",
                "x-delivery-limit": DELIVERY_LIMIT,
                "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
                "x-dead-letter-routing-key": DEAD_LETTER_QUEUE,
            },
        )
        for q in Queue
    ]


def dead_letter_queue() -> KombuQueue:
    """RabbitMQ only: the durable queue that keeps what the task queues dead-letter, until
    `tasks.dead` records it in the database."""
    exchange = Exchange(DEAD_LETTER_EXCHANGE, type="direct", durable=True)  # type: ignore[no-untyped-call]
    return KombuQueue(  # type: ignore[no-untyped-call]
        DEAD_LETTER_QUEUE,
        exchange,
        routing_key=DEAD_LETTER_QUEUE,
        durable=True,
        queue_arguments={"x-queue-type": "quorum"},
    )


def countdown(settings: Settings, seconds: float | None) -> float | None:
    """A countdown as this broker can hold it. RabbitMQ's delay queues count whole seconds and
    Celery refuses a delay that rounds down to none (`ValueError` from the send), so a positive
    countdown under a second waits one second there."""
    if seconds and 0 < seconds < 1 and settings.broker_kind is BrokerKind.AMQP:
        return 1.0
    return seconds


def transport_options(settings: Settings, *, producer: bool = False) -> dict[str, Any]:
    """kombu transport options for this broker. A `producer` (the API's sends, the CLI's) gets
    the publish bounds: a send to a broker that is hung gives up after the socket timeout."""
    if settings.broker_kind is BrokerKind.AMQP:
        # Publisher confirms: a send returns once RabbitMQ has the message (on a quorum queue:
        # on a majority of its nodes), not once it is in a socket buffer.
        options: dict[str, Any] = {"confirm_publish": True}
        if producer:
            options["read_timeout"] = settings.publish_socket_timeout_seconds
            options["write_timeout"] = settings.publish_socket_timeout_seconds
        return options
    timeout = settings.publish_socket_timeout_seconds if producer else 5
    connect = settings.publish_connect_timeout_seconds if producer else 5
    return {
        # A message not acked within this time is delivered again; it must exceed every time
        # limit plus retry countdown (checked by the settings at start-up).
        "visibility_timeout": settings.broker_visibility_timeout_seconds,
        "socket_connect_timeout": connect,
        "socket_timeout": timeout,
        "socket_keepalive": True,
        "retry_on_timeout": False,
    }


def celery_options(settings: Settings) -> dict[str, Any]:
    """The Celery settings that depend on the broker, for workers and beat."""
    amqp = settings.broker_kind is BrokerKind.AMQP
    return {
        "broker_url": settings.broker,
        "broker_transport_options": transport_options(settings),
        "task_queues": task_queues(settings),
        # Quorum queues have no global QoS: Celery detects them and uses a static per-consumer
        # prefetch (`worker_prefetch_multiplier` x children), and sends countdowns through
        # RabbitMQ's delay queues (quorum too, Celery's default) instead of holding them in a
        # worker's prefetch, where a few retries waiting would stop it taking new tasks.
        "task_default_queue_type": "quorum" if amqp else "classic",
        "worker_detect_quorum_queues": True,
    }
