"""The worker's consumer (`worker_consumer` in `celeryconfig.py`): Celery's own, with its task
events sent in batches of a moment instead of one publish per event.

Celery buffers task events (received, started, succeeded) and publishes the buffer at the next
turn of the event loop: with one task at a time that is a publish to the broker per event, three
per task, about a tenth of a sync's whole worker-side CPU. Here the buffer goes out at most
`WORKER_TASK_EVENTS_FLUSH_SECONDS` after its first event (or at once when it holds Celery's
`buffer_limit`): the events of one task, and of every task of that moment, in one publish.
Flower shows a task that much later; nothing else reads the events.
"""

from __future__ import annotations

import threading
from typing import Any

from celery.worker.consumer import Consumer as CeleryConsumer
from vine import promise

from app.settings import get_settings


class Consumer(CeleryConsumer):  # type: ignore[misc]
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._events_delay = get_settings().worker_task_events_flush_seconds
        self._events_pending = False
        self._events_lock = threading.Lock()
        # Runs on the loop's thread (a task thread may send an event too).
        self._schedule_events_promise = promise(self._schedule_events_flush)

    def on_send_event_buffered(self) -> None:
        if not self.hub or self._events_delay <= 0:
            super().on_send_event_buffered()
            return
        with self._events_lock:
            if self._events_pending:
                return
            self._events_pending = True
        self.hub.call_soon(self._schedule_events_promise)

    def _schedule_events_flush(self) -> None:
        self.hub.call_later(self._events_delay, self._flush_events_batch)

    def _flush_events_batch(self) -> None:
        with self._events_lock:
            self._events_pending = False
        self._flush_events()

    def shutdown(self) -> None:
        # The events of the last moment, before the dispatcher closes.
        self._flush_events()
        super().shutdown()
