"""Sync tasks: copy a chat's JSONB into `copilot_chat_messages`. Thin wrappers over the service.

Arguments are keys only (chat id, message ids, version): the worker reads the JSONB when it runs,
so no message content sits in the broker and no delivery order can write old data.

Failure policy (`app.retry.RetryPolicy`): a transient error is retried with capped exponential
backoff and jitter up to `max_retries`; a permanent error, or a transient one past the limit, is
recorded as a dead letter at once. A statement timeout is retried once: a second one means the
chat is too large for the worker's `statement_timeout`, and its dead letter says so. A delivery
whose worker died under it (SIGKILL, OOM: the broker hands the message out again) is counted (by
RabbitMQ's quorum queue, or in Redis per task id and attempt), and past `max_redeliveries` it is
dead-lettered instead of run.
Nothing loops.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import redis
from celery import Task
from sqlalchemy import Connection

from app import topology
from app.repositories import dead_letters, sync_state
from app.retry import RetryPolicy
from app.services import sync
from app.settings import BrokerKind, get_settings
from app.task_names import SYNC_CHAT, SYNC_MESSAGES, Queue
from tasks import celery
from tasks.metrics import WorkerMetrics
from tasks.runtime import broker_redis, session_on, worker_connection, worker_transaction

log = logging.getLogger(__name__)

SETTINGS = get_settings()
POLICY = RetryPolicy.from_settings(SETTINGS)
METRICS = WorkerMetrics()
DELIVERY_KEY = "dualwrite:deliveries:{task_id}:{attempt}"


def _count_delivery(task: Task[Any, Any]) -> int:
    """Which delivery of this attempt of the task this is (1 for the first).

    On RabbitMQ the quorum queue counts: a message handed back after its consumer was lost
    carries `x-delivery-count`, the times it was handed back. On Redis the worker counts, in
    Redis per task id and attempt: one round trip."""
    request = task.request
    if SETTINGS.broker_kind is BrokerKind.AMQP:
        returned = request.get("x-delivery-count") or 0
        try:
            return int(returned) + 1
        except (TypeError, ValueError):
            return 1
    key = DELIVERY_KEY.format(task_id=request.id or "", attempt=request.retries)
    try:
        pipe = broker_redis().pipeline(transaction=False)
        pipe.incr(key)
        pipe.expire(key, SETTINGS.broker_visibility_timeout_seconds * 2)
        count, _ = pipe.execute()
        return int(count)
    except redis.RedisError as exc:  # the count is a guard, not a reason to drop the task
        log.warning("could not count delivery of %s: %s", request.id, exc)
        return 1


def _unqueue(connection: Connection, chat: uuid.UUID) -> None:
    """Let new changes of the chat send a sync again: from here on, this one reads them
    (`sync_state.clear_queued_before_sync`, committed before the sync reads anything). If this
    fails, the sync fails the same way and is retried.

    Its own transaction, not the sync's: the clear locks the chat's sync state row, and every
    write of the chat updates that row (its version trigger, its queued mark), so a clear held
    until the sync commits would make the chat's writers wait for the whole convergence (in
    `table_only` for the rewrite of the JSONB). Committed first, it only waits for the writes
    in flight, and no write ever waits for it."""
    sync_state.clear_queued_before_sync(connection, [chat])
    connection.commit()


def _hold_chat(chat: uuid.UUID, countdown: float) -> None:
    """Mark the chat as queued again while its retry waits for its countdown, so that neither
    its handlers nor the sweep send another sync meanwhile (each would fail the same way and
    start a retry chain of its own)."""
    try:
        with worker_transaction() as session:
            sync_state.hold_queued(session, chat, seconds=countdown)
    except Exception as exc:  # at worst a duplicate sync, which changes nothing
        log.warning("could not mark %s as waiting for its retry: %s", chat, exc)


def _dead_letter(
    task: Task[Any, Any],
    chat_id: uuid.UUID,
    args: list[Any],
    reason: dead_letters.Reason,
    error: str,
    attempts: int,
) -> None:
    try:
        with worker_transaction() as session:
            dead_letters.record(
                session,
                task=task.name,
                chat_id=chat_id,
                args=args,
                reason=reason,
                error=error,
                attempts=attempts,
            )
    except Exception as exc:  # the chat stays behind in its sync state; the sweep sees it
        log.error("could not record dead letter for %s%r: %s", task.name, args, exc)
    METRICS.task(task.name, f"dead_letter_{reason.value}")


def _sync(task: Task[Any, Any], chat: uuid.UUID, version: int, *, batch: bool) -> sync.SyncReport:
    """Clear the chat's queued mark, then sync the task's chat, and with `batch` up to
    `SYNC_BATCH_EXTRA` other chats behind, on one connection. If the batch fails, the task's
    chat alone is tried at once: another chat of the batch must not make this one wait for a
    retry (nor a retry carry other chats: a failing chat goes alone)."""
    extra = SETTINGS.sync_batch_extra if batch else 0
    with worker_connection() as connection:
        _unqueue(connection, chat)
        try:
            with session_on(connection) as session:
                return sync.sync_chats(session, {chat: version}, task=task.name, extra=extra)
        except Exception as error:
            if not extra:
                raise
            log.warning(
                "%s for %s with other chats failed, trying it alone: %s", task.name, chat, error
            )
        with session_on(connection) as session:
            return sync.sync_chats(session, {chat: version}, task=task.name)


def _run(task: Task[Any, Any], args: list[Any], chat_id: str, version: int) -> None:
    request = task.request
    try:
        chat = uuid.UUID(chat_id)
        version = int(version)
    except (TypeError, ValueError):
        log.error("dropping %s%r: arguments are not (chat id, version)", task.name, args)
        METRICS.task(task.name, "malformed")
        return
    deliveries = _count_delivery(task)
    if deliveries > SETTINGS.max_redeliveries + 1:
        error = f"delivered {deliveries} times, its worker lost each time before it finished"
        log.error("%s%r: %s", task.name, args, error)
        _dead_letter(task, chat, args, dead_letters.Reason.WORKER_LOST, error, deliveries - 1)
        return
    try:
        report = _sync(task, chat, version, batch=request.retries == 0)
    except Exception as error:
        retries = request.retries
        if POLICY.should_retry(error, retries):
            METRICS.task(task.name, "retry")
            log.warning(
                "%s%r failed, retry %d of %d: %s",
                task.name,
                args,
                retries + 1,
                POLICY.max_retries,
                error,
            )
            countdown = topology.countdown(SETTINGS, POLICY.countdown(retries)) or 0.0
            _hold_chat(chat, countdown)
            raise task.retry(exc=error, countdown=countdown) from error
        reason = POLICY.describe(error, retries)
        if POLICY.timed_out_again(error, retries):
            log.error("%s%r: %s", task.name, args, reason)
        _dead_letter(task, chat, args, dead_letters.Reason.FAILED, reason, retries + 1)
        raise
    outcome = "missing" if report.missing else "skipped" if report.skipped else "applied"
    METRICS.task(
        task.name,
        outcome,
        lags=report.lag_seconds,
        rows={"inserted": report.inserted, "updated": report.updated, "removed": report.removed},
    )


@celery.task(
    name=SYNC_MESSAGES,
    bind=True,
    queue=Queue.SYNC.value,
    ignore_result=True,
    max_retries=POLICY.max_retries,
)
def sync_messages(self: Task[Any, Any], chat_id: str, message_ids: list[str], version: int) -> None:
    """Copy a chat after messages were appended. `message_ids` name them for operators (and in
    Flower); the whole chat is converged, so deliveries in any order end in the same rows."""
    _run(self, [chat_id, message_ids, version], chat_id, version)


@celery.task(
    name=SYNC_CHAT,
    bind=True,
    queue=Queue.SYNC.value,
    ignore_result=True,
    max_retries=POLICY.max_retries,
)
def sync_chat(self: Task[Any, Any], chat_id: str, version: int) -> None:
    """Copy a whole chat (snapshot replace, fork, import, sweep, replay)."""
    _run(self, [chat_id, version], chat_id, version)
