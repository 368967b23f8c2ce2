"""Readiness (`GET /readyz`): does this API process have what a request needs right now, the
database, its rollout phase and the broker? Bounded in time and cached, so that a hung
dependency or a storm of probes costs the process (and the database) next to nothing.

Liveness (`GET /healthz`) checks none of this: a probe that restarts the process when the
database is down would restart every API process during a database outage, and fix nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from app.broker import BrokerInspector
from app.repositories import phase as phase_repo
from app.settings import BrokerKind, Settings

OK = "ok"
NOT_CHECKED = "not checked"
# How long one broker round trip may take, at most: a broker that does not answer a PING (or a
# passive declare) in half a second cannot take a publish in the publisher's bound either.
BROKER_TIMEOUT_SECONDS = 0.5


@dataclass(frozen=True)
class Check:
    """One dependency check: `run` returns a state per name (`ok` or why not) and may raise or
    hang; `names` are what it reports, the first being what fails when it raises or times out."""

    names: tuple[str, ...]
    run: Callable[[], dict[str, str]]


@dataclass(frozen=True)
class Report:
    checks: dict[str, str]

    @property
    def failed(self) -> list[str]:
        """The checks that failed; one not run because another failed first is not named."""
        return [name for name, state in self.checks.items() if state not in (OK, NOT_CHECKED)]

    @property
    def ready(self) -> bool:
        return all(state == OK for state in self.checks.values())

    def body(self) -> dict[str, Any]:
        """What `/readyz` answers: every check's state and the names of those that failed.
        Only exception class names, never a message: it could carry a host or a user name."""
        status = "ok" if self.ready else "unavailable"
        return {"status": status, **self.checks, "failed": self.failed}


def reason(exc: BaseException) -> str:
    return f"down: {type(exc).__name__}"


def database_check(factory: sessionmaker[Session]) -> Check:
    """The database answers (on the check's own pool: `app.main`), and the phase row that every
    request reads is there (it is not before `alembic upgrade head` created it)."""

    def run() -> dict[str, str]:
        with factory() as session:
            try:
                session.execute(text("SELECT 1"))
            except Exception as exc:
                return {"database": reason(exc), "phase": NOT_CHECKED}
            try:
                phase_repo.current(session)
            except Exception as exc:
                return {"database": OK, "phase": f"unreadable: {type(exc).__name__}"}
            return {"database": OK, "phase": OK}

    return Check(("database", "phase"), run)


def broker_check(settings: Settings, timeout: float = BROKER_TIMEOUT_SECONDS) -> Check:
    """The broker answers: on Redis a PING, on RabbitMQ a passive declare of the sync queue."""
    if settings.broker_kind is BrokerKind.AMQP:
        return amqp_check(settings, timeout)
    return redis_check(settings.broker, timeout)


def amqp_check(settings: Settings, timeout: float = BROKER_TIMEOUT_SECONDS) -> Check:
    """A passive `queue.declare` of the sync queue on RabbitMQ, on one connection kept between
    checks (opened again after a failure: RabbitMQ pays for every new connection, and a probe
    comes every second), every round trip bounded by `timeout`. A queue no worker declared yet
    still counts as an answer: the broker is there."""
    inspector = BrokerInspector(settings, timeout)

    def run() -> dict[str, str]:
        inspector.depths()
        return {"broker": OK}

    return Check(("broker",), run)


def redis_check(url: str, timeout: float = BROKER_TIMEOUT_SECONDS) -> Check:
    """A PING to the broker's Redis, with short connect and read timeouts and no retry (redis-py
    retries three times with backoff by default, which would stretch a hung broker's answer)."""
    client = redis.Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
    )

    def run() -> dict[str, str]:
        client.ping()
        return {"broker": OK}

    return Check(("broker",), run)


class Readiness:
    """Runs the checks at most once per `cache_seconds` and for at most `timeout` seconds.

    Each check runs in a daemon thread of its own, so that one hung dependency neither delays
    the others' answers, nor holds up the process's exit, nor piles up threads: while a check
    is still stuck from an earlier refresh, later ones report it as not answering without
    starting another. Concurrent probes share one refresh and wait for it in the event loop,
    holding no thread.
    """

    def __init__(
        self,
        checks: list[Check],
        timeout: float,
        cache_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.checks = checks
        self.timeout = timeout
        self.cache_seconds = cache_seconds
        self.clock = clock
        self._threads: dict[str, threading.Thread] = {}
        self._cached: Report | None = None
        self._cached_at = 0.0
        self._refresh: asyncio.Future[Report] | None = None

    async def report(self) -> Report:
        if self._cached is not None and self.clock() - self._cached_at < self.cache_seconds:
            return self._cached
        if self._refresh is None:
            self._refresh = asyncio.ensure_future(self._run())
        # Shielded: a probe that hangs up does not cancel the refresh the others wait for.
        return await asyncio.shield(self._refresh)

    async def _run(self) -> Report:
        try:
            loop = asyncio.get_running_loop()
            futures = [self._start(check, loop) for check in self.checks]
            await asyncio.wait(futures, timeout=self.timeout)
            states: dict[str, str] = {}
            for future, check in zip(futures, self.checks, strict=True):
                if future.done():
                    states.update(future.result())
                else:
                    states[check.names[0]] = f"no answer within {self.timeout:g}s"
                    states.update(dict.fromkeys(check.names[1:], NOT_CHECKED))
            report = Report(states)
            self._cached, self._cached_at = report, self.clock()
            return report
        finally:
            self._refresh = None

    def _start(
        self, check: Check, loop: asyncio.AbstractEventLoop
    ) -> asyncio.Future[dict[str, str]]:
        future: asyncio.Future[dict[str, str]] = loop.create_future()
        busy = self._threads.get(check.names[0])
        if busy is not None and busy.is_alive():
            return future  # still stuck in an earlier refresh: never done, so it times out

        def deliver(result: dict[str, str]) -> None:
            if not future.done():
                future.set_result(result)

        def target() -> None:
            result = guarded(check)
            with contextlib.suppress(RuntimeError):  # the loop closed while the check hung
                loop.call_soon_threadsafe(deliver, result)

        thread = threading.Thread(target=target, name=f"readyz-{check.names[0]}", daemon=True)
        self._threads[check.names[0]] = thread
        thread.start()
        return future


def guarded(check: Check) -> dict[str, str]:
    """The check's states; an exception fails its first name and leaves the rest unchecked."""
    try:
        return check.run()
    except Exception as exc:
        return {check.names[0]: reason(exc), **dict.fromkeys(check.names[1:], NOT_CHECKED)}
