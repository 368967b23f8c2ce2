"""The Celery application (`celery -A tasks worker|beat|flower`) and its tasks."""

from __future__ import annotations

from celery import Celery

celery = Celery("chat-dualwrite")
celery.config_from_object("celeryconfig")

# Registers the tasks (and the worker's start-up checks and logging) on the app; imported last
# because the modules use `celery`.
from tasks import dead, logs, maintenance, metrics, startup, sync  # noqa: E402, F401

logs.install(celery)

__all__ = ["celery"]
