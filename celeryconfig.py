"""Celery configuration (`celery -A tasks ...` loads it). Values come from `app.settings`."""

from __future__ import annotations

from celery.schedules import crontab

from app import topology
from app.settings import BrokerKind, get_settings
from app.task_names import COLLECT_DEAD_LETTERS, DISPATCH_CHUNKS, RECONCILE, ROUTES, SWEEP, Queue

_settings = get_settings()

# The broker (`BROKER_URL`, else `REDIS_URL`), its transport options and the queues as that
# broker holds them: Redis lists, or RabbitMQ quorum queues (`app.topology`).
_broker = topology.celery_options(_settings)
broker_url = _broker["broker_url"]
broker_transport_options = _broker["broker_transport_options"]
task_queues = _broker["task_queues"]
task_default_queue_type = _broker["task_default_queue_type"]
worker_detect_quorum_queues = _broker["worker_detect_quorum_queues"]
broker_connection_retry_on_startup = True
# Workers and beat ride out a slow broker; the API's publishes are bounded much tighter by the
# producer of `app/broker.py`, which overrides these timeouts.
broker_connection_timeout = 5

task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
task_ignore_result = True
result_backend = None

# At-least-once: a task is acked after it ran, and re-queued if its worker died under it.
task_acks_late = True
task_reject_on_worker_lost = True
worker_prefetch_multiplier = 1

# Children per worker and their recycling: see the reasons beside these settings in
# `app/settings.py`. A `-c` on the command line still wins over the concurrency here.
worker_concurrency = _settings.worker_concurrency
worker_max_tasks_per_child = _settings.worker_max_tasks_per_child or None
worker_max_memory_per_child = _settings.worker_max_memory_per_child_kb or None

task_soft_time_limit = _settings.task_soft_time_limit_seconds
task_time_limit = _settings.task_time_limit_seconds

# Flower shows tasks from the workers' events (`WORKER_TASK_EVENTS`; off, Flower still turns
# them on while it runs). The producers' "task-sent" events would add the "sent" state at a cost
# of ~40% of every publish: off unless asked for.
worker_send_task_events = _settings.worker_task_events
task_send_sent_event = _settings.task_sent_events
# Celery's consumer, its task events batched (`WORKER_TASK_EVENTS_FLUSH_SECONDS`).
worker_consumer = "tasks.consumer:Consumer"

task_default_queue = Queue.SYNC.value
task_routes = {task: {"queue": queue.value} for task, queue in ROUTES.items()}

# Standard crontab field order; celery's `crontab()` takes them in another positional order.
_CRON_FIELDS = ("minute", "hour", "day_of_month", "month_of_year", "day_of_week")

beat_schedule = {
    # Re-enqueue chats whose copy is behind; a run that could not start in time is dropped.
    "sweep": {
        "task": SWEEP,
        "schedule": _settings.sweep_interval_seconds,
        "options": {"expires": _settings.sweep_interval_seconds},
    },
    # Every chat, nightly: a night's share (1/RECONCILE_FULL_DAYS) of the rolling full pass,
    # whose chunks any maintenance worker runs.
    "reconcile-nightly": {
        "task": RECONCILE,
        "kwargs": {"rolling": True},
        "schedule": crontab(
            **dict(zip(_CRON_FIELDS, _settings.reconcile_crontab.split(), strict=True))
        ),
        "options": {"expires": 3600},
    },
    # The bulk passes' chunks: queue up to the fleet's cap, take back those lost with a worker.
    "bulk-dispatch": {
        "task": DISPATCH_CHUNKS,
        "schedule": _settings.bulk_dispatch_interval_seconds,
        "options": {"expires": _settings.bulk_dispatch_interval_seconds},
    },
    # Chats changed recently, often: drift is found while it is fresh.
    "reconcile-recent": {
        "task": RECONCILE,
        "schedule": _settings.reconcile_recent_interval_seconds,
        "kwargs": {"since_seconds": _settings.reconcile_recent_window_seconds},
        "options": {"expires": _settings.reconcile_recent_interval_seconds},
    },
}

if _settings.broker_kind is BrokerKind.AMQP:
    # What RabbitMQ dead-lettered past a queue's delivery limit, into the database's dead
    # letters (`tasks/dead.py`), as often as the sweep runs.
    beat_schedule["collect-dead-letters"] = {
        "task": COLLECT_DEAD_LETTERS,
        "schedule": _settings.sweep_interval_seconds,
        "options": {"expires": _settings.sweep_interval_seconds},
    }

# Beat writes its schedule file after every job it sends (not only every three minutes), so
# the file's age tells a healthcheck that beat is alive and ticking: with the sweep every
# `SWEEP_INTERVAL_SECONDS`, the file is never older than that while beat works.
beat_sync_every = 1

timezone = "UTC"
enable_utc = True
worker_hijack_root_logger = False
