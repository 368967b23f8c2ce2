"""Task names and queues: the one place the producers (handlers, sweep, CLI), the task
definitions in `tasks/` and `celeryconfig.py` (routes, beat schedule) take them from."""

from __future__ import annotations

from enum import StrEnum


class Queue(StrEnum):
    SYNC = "dualwrite.sync"  # per-chat copies enqueued by handlers and the sweep
    MAINTENANCE = "dualwrite.maintenance"  # sweep and reconcile


SYNC_MESSAGES = "chats.sync_messages"
SYNC_CHAT = "chats.sync_chat"
SWEEP = "chats.sweep"
RECONCILE = "chats.reconcile"
# RabbitMQ only: what the broker dead-lettered, into the database's dead letters (`tasks.dead`).
COLLECT_DEAD_LETTERS = "chats.collect_dead_letters"

# Where each task goes; the task definitions declare the same queue.
ROUTES: dict[str, Queue] = {
    SYNC_MESSAGES: Queue.SYNC,
    SYNC_CHAT: Queue.SYNC,
    SWEEP: Queue.MAINTENANCE,
    RECONCILE: Queue.MAINTENANCE,
    COLLECT_DEAD_LETTERS: Queue.MAINTENANCE,
}
