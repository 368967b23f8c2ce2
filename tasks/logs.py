"""Celery's side of `app.logs`: the worker and beat log through it, and every line logged while a
task runs carries the task's id, its name and the chat(s) it works on."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping, Sequence
from contextvars import Token
from functools import lru_cache
from typing import Any

from celery import Celery, Task
from celery.apps import worker as celery_worker_app
from celery.apps.beat import Beat
from celery.signals import (
    celeryd_after_setup,
    celeryd_init,
    setup_logging,
    task_postrun,
    task_prerun,
)
from celery.utils.log import get_multiprocessing_logger

from app import logs
from app.settings import LogFormat, get_settings

log = logging.getLogger(__name__)

# The task ids running in this process (one at a time in a prefork child), with what to reset.
_running: dict[str, Token[logs.Fields]] = {}


def _json() -> bool:
    return get_settings().log_format is LogFormat.JSON


def _configure_logging() -> None:
    logs.configure()
    # The pool's own logger (a child lost: "Process ... exited with 'signal 9 (SIGKILL)'")
    # does not propagate, and Celery would give it a handler of its own at ERROR: its lines go
    # through the root's handler, at ERROR as Celery has it.
    pool = get_multiprocessing_logger()
    if pool is not None:
        pool.handlers.clear()
        pool.propagate = True
        pool.setLevel(logging.ERROR)


@setup_logging.connect
def _configure(**_: Any) -> None:
    # Any receiver of this signal stops Celery from configuring logging (and from redirecting
    # stdout to it): `app.logs` does it, as for every other process.
    _configure_logging()


@celeryd_init.connect
def _configure_worker_early(**_: Any) -> None:
    # The worker warns (running as root, say) before it sets up logging: set it up first.
    _configure_logging()
    if _json():
        # The worker writes what it does on a signal (`worker: Warm shutdown (MainProcess)`)
        # straight to the file descriptor, through this one function: in json, a log line.
        celery_worker_app.safe_say = _say


@celeryd_after_setup.connect
def _banner(sender: str, instance: Any, **_: Any) -> None:
    # The worker prints a many-line banner to stdout after this signal, unless quiet: in json,
    # one log line says what it held that an operator looks for.
    if not _json():
        return
    instance.quiet = True
    queues = sorted(instance.app.amqp.queues.consume_from)
    log.info(
        "%s starting: concurrency %s, queues %s",
        sender,
        instance.concurrency,
        ", ".join(queues),
        extra={"queues": queues, "concurrency": instance.concurrency},
    )


def _say(msg: str, f: Any = None) -> None:
    logging.getLogger(celery_worker_app.__name__).warning(msg.strip())


class QuietInJsonBeat(Beat):  # type: ignore[misc]
    """Beat prints its banner to stdout before it sets up logging; in json, it prints none (its
    `beat: Starting...` line is logged)."""

    def __init__(self, *args: Any, quiet: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, quiet=quiet or _json(), **kwargs)


def install(app: Celery) -> None:
    app.Beat = app.subclass_with_self(QuietInJsonBeat)


@lru_cache(maxsize=64)
def _signature(task: Task[Any, Any]) -> inspect.Signature | None:
    try:
        return inspect.signature(task.run)
    except (TypeError, ValueError):
        return None


def chat_fields(
    task: Task[Any, Any], args: Sequence[Any], kwargs: Mapping[str, Any]
) -> dict[str, Any]:
    """The chat a task works on, from its `chat_id` (or `chat_ids`) argument, however passed."""
    signature = _signature(task)
    if signature is None:
        return {}
    try:
        arguments = signature.bind_partial(*args, **kwargs).arguments
    except TypeError:  # arguments that do not fit: the task itself drops them, saying so
        return {}
    fields: dict[str, Any] = {}
    if "chat_id" in arguments:
        fields["chat_id"] = str(arguments["chat_id"])
    chat_ids = arguments.get("chat_ids")
    if isinstance(chat_ids, list | tuple):
        fields["chat_ids"] = [str(chat) for chat in chat_ids]
    return fields


@task_prerun.connect
def _bind_task(
    task_id: str,
    task: Task[Any, Any],
    args: Sequence[Any] | None = None,
    kwargs: Mapping[str, Any] | None = None,
    **_: Any,
) -> None:
    fields = chat_fields(task, args or (), kwargs or {})
    _running[task_id] = logs.bind(task_id=task_id, task_name=task.name, **fields)


@task_postrun.connect
def _unbind_task(task_id: str, **_: Any) -> None:
    token = _running.pop(task_id, None)
    if token is None:
        return
    try:
        logs.reset(token)
    except ValueError:  # bound in another context (a pool that runs tasks elsewhere)
        logs.clear()
