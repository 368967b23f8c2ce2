"""Task names and queues: the one place the producers (handlers, sweep, CLI), the task
definitions in `tasks/` and `celeryconfig.py` (routes, beat schedule) take them from."""

from __future__ import annotations

from enum import StrEnum


class Queue(StrEnum):
    SYNC = "dualwrite.sync"  # per-chat copies enqueued by handlers and the sweep
    # sweep, reconcile, and the chunks of the bulk passes (backfill, rolling reconcile): a
    # worker of its own (`-Q dualwrite.maintenance`) keeps long passes off the sync slots
    MAINTENANCE = "dualwrite.maintenance"


SYNC_MESSAGES = "chats.sync_messages"
SYNC_CHAT = "chats.sync_chat"
SWEEP = "chats.sweep"
RECONCILE = "chats.reconcile"
BACKFILL_CHUNK = "chats.backfill_chunk"
RECONCILE_CHUNK = "chats.reconcile_chunk"
DISPATCH_CHUNKS = "chats.dispatch_chunks"
# RabbitMQ only: what the broker dead-lettered, into the database's dead letters (`tasks.dead`).
COLLECT_DEAD_LETTERS = "chats.collect_dead_letters"

# Where each task goes; the task definitions declare the same queue.
ROUTES: dict[str, Queue] = {
    SYNC_MESSAGES: Queue.SYNC,
    SYNC_CHAT: Queue.SYNC,
    SWEEP: Queue.MAINTENANCE,
    RECONCILE: Queue.MAINTENANCE,
    BACKFILL_CHUNK: Queue.MAINTENANCE,
    RECONCILE_CHUNK: Queue.MAINTENANCE,
    DISPATCH_CHUNKS: Queue.MAINTENANCE,
    COLLECT_DEAD_LETTERS: Queue.MAINTENANCE,
}
