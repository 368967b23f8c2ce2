"""RabbitMQ only: moves what the quorum queues dead-lettered past their delivery limit
(`app.topology.DELIVERY_LIMIT`) from the broker's dead-letter queue into the database's dead
letters, where operators see, list and replay them. A sync is normally dead-lettered by its
worker first (`tasks.sync`, `MAX_REDELIVERIES`); what reaches this queue is what no worker could
count: a message that killed its worker before the count, or a maintenance task."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from app import topology
from app.repositories import dead_letters
from app.settings import BrokerKind, get_settings
from app.task_names import COLLECT_DEAD_LETTERS, Queue
from tasks import celery
from tasks.runtime import worker_transaction

log = logging.getLogger(__name__)

# Messages taken per run; the next run (every sweep interval) takes the rest.
BATCH = 500


def _chat(args: Any) -> uuid.UUID | None:
    try:
        return uuid.UUID(str(args[0]))
    except (TypeError, ValueError, IndexError, KeyError):
        return None


def _record(task: str, args: list[Any], deaths: Any) -> bool:
    """Record one dead-lettered task; False when it names no chat (only logged)."""
    chat = _chat(args)
    count = sum(int(d.get("count", 1)) for d in deaths or [] if isinstance(d, dict))
    error = (
        f"dead-lettered by RabbitMQ: handed back more than {topology.DELIVERY_LIMIT} times "
        "(its worker lost each time)"
    )
    if chat is None:
        log.error("%s%r: %s; it names no chat, nothing to record", task, args, error)
        return False
    with worker_transaction() as session:
        dead_letters.record(
            session,
            task=task,
            chat_id=chat,
            args=args,
            reason=dead_letters.Reason.WORKER_LOST,
            error=error,
            attempts=max(count, 1) * (topology.DELIVERY_LIMIT + 1),
        )
    log.error("%s%r: %s; recorded as a dead letter", task, args, error)
    return True


@celery.task(
    name=COLLECT_DEAD_LETTERS, queue=Queue.MAINTENANCE.value, ignore_result=True, max_retries=0
)
def collect_dead_letters() -> dict[str, int]:
    """Take up to `BATCH` messages from the dead-letter queue, record each, then ack it: a
    message is only removed once its record is committed (a crash in between records it twice,
    which adds to the same open dead letter)."""
    if get_settings().broker_kind is not BrokerKind.AMQP:
        return {"recorded": 0, "dropped": 0}
    recorded = dropped = 0
    with celery.connection_for_write() as connection:
        queue = topology.dead_letter_queue().bind(connection.default_channel)  # type: ignore[no-untyped-call]
        queue.declare()
        for _ in range(BATCH):
            message = queue.get(no_ack=False)
            if message is None:
                break
            headers = message.headers or {}
            body = message.decode()
            args = list(body[0]) if isinstance(body, list | tuple) and body else []
            if _record(str(headers.get("task", "?")), args, headers.get("x-death")):
                recorded += 1
            else:
                dropped += 1
            message.ack()
    return {"recorded": recorded, "dropped": dropped}
