"""The API's background publisher: the jobs of committed requests, sent to the broker by one
thread per process, in batches, off the requests' path.

A request hands its jobs over (`submit`: an append to a bounded buffer) and its response goes
out without waiting for the broker. The thread takes up to `publish_batch_size` jobs at a time
and sends them with one call of the bounded publisher (`app.broker.BoundedPublisher.many`: the
sends through one producer connection). Nothing here ever blocks or fails a request: a full
buffer drops the jobs it cannot hold, a broker that is down fails the batch, and both are
counted and logged once per burst. The sweep repairs those chats: the commit already recorded
them as behind in their sync state, and the thread releases their queued marks so that their
next write sends a sync again.

Not Starlette's background tasks: those run on the request's connection, so on a kept-alive
connection the next request waits for them.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Sequence

from app import metrics
from app.broker import BoundedPublisher, Release
from app.jobs import Job, UnsafePublishMany, count_outcomes
from app.settings import Settings

log = logging.getLogger(__name__)


class BackgroundPublisher:
    """A bounded buffer of jobs and the thread that sends them; one per API process.

    `start` (the app's lifespan; `submit` also starts it if nothing did) runs the thread,
    `close` (the lifespan's end) drains the buffer for at most `drain_seconds` and drops and
    counts what is left. After a fork the child starts afresh: the parent's buffer and thread
    are not its own.
    """

    def __init__(
        self,
        send_many: UnsafePublishMany,
        *,
        release: Release | None = None,
        buffer_size: int,
        batch_size: int,
        drain_seconds: float,
    ) -> None:
        self._send_many = send_many
        self._release = release
        self.buffer_size = buffer_size
        self.batch_size = batch_size
        self.drain_seconds = drain_seconds
        self._reset(os.getpid())

    def _reset(self, pid: int) -> None:
        self._pid = pid
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._buffer: deque[Job] = deque()
        self._in_flight: list[Job] = []
        # Chats whose jobs were dropped for a full buffer: their queued marks are released by
        # the thread (off the request), so that their next write sends a sync again.
        self._unsent: list[str] = []
        self._thread: threading.Thread | None = None
        self._closing = False
        self._deadline = 0.0
        # Set by `close` when it gave up on a batch still being sent: that batch is counted as
        # dropped, and the thread must not count it again if its send ever returns.
        self._abandoned = False
        self._full_burst = 0  # jobs dropped since the buffer last had room (under the lock)
        self._failed_burst = 0  # jobs failed since the last batch that went out (thread only)

    def start(self) -> None:
        if self._pid != os.getpid():
            self._reset(os.getpid())
        with self._lock:
            if self._thread is None and not self._closing:
                self._thread = threading.Thread(
                    target=self._run, name="dualwrite-publisher", daemon=True
                )
                self._thread.start()

    @property
    def closing(self) -> bool:
        return self._closing

    def pending(self) -> int:
        """Jobs handed over and not sent yet: buffered or in the batch being sent."""
        with self._lock:
            return len(self._buffer) + len(self._in_flight)

    def submit(self, jobs: Sequence[Job]) -> None:
        """Hand committed jobs over for sending. Never blocks on the broker and never raises:
        the jobs the buffer cannot hold are dropped and counted."""
        if not jobs:
            return
        if self._thread is None or self._pid != os.getpid():
            self.start()
        recovered = 0
        with self._wake:
            if self._closing:
                dropped, reason, first = len(jobs), "shutdown", False
            else:
                room = max(self.buffer_size - len(self._buffer), 0)
                self._buffer.extend(jobs[:room])
                self._unsent.extend(job.queued for job in jobs[room:] if job.queued is not None)
                self._wake.notify()
                dropped, reason = len(jobs) - min(room, len(jobs)), "buffer_full"
                first = dropped > 0 and self._full_burst == 0
                if dropped:
                    self._full_burst += dropped
                elif self._full_burst:
                    recovered, self._full_burst = self._full_burst, 0
        if dropped:
            metrics.PUBLISH_DROPPED.labels(reason).inc(dropped)
        if first:
            log.warning(
                "publish buffer full (%d jobs): dropping jobs, the sweep repairs their chats; "
                "counted in dualwrite_publish_dropped_total, logged again once it has room",
                self.buffer_size,
            )
        elif recovered:
            log.warning("publish buffer has room again; %d jobs were dropped", recovered)

    def close(self) -> int:
        """Send what is buffered, for at most `drain_seconds`; then drop and count the rest
        (with the batch still being sent, if its send has not returned). Returns how many jobs
        were dropped. Later submits are dropped and counted too."""
        with self._wake:
            if self._closing:
                return 0
            self._closing = True
            self._deadline = time.monotonic() + self.drain_seconds
            self._wake.notify_all()
            thread = self._thread if self._pid == os.getpid() else None
        if thread is not None:
            thread.join(max(self._deadline - time.monotonic(), 0.0))
        with self._lock:
            left = len(self._buffer)
            self._buffer.clear()
            if thread is not None and thread.is_alive():
                left += len(self._in_flight)
                self._in_flight = []
                self._abandoned = True
        if left:
            metrics.PUBLISH_DROPPED.labels("shutdown").inc(left)
            log.warning(
                "publish: %d jobs not sent within %.1fs of shutdown were dropped; the sweep "
                "repairs their chats",
                left,
                self.drain_seconds,
            )
        return left

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._buffer and not self._unsent and not self._closing:
                    self._wake.wait()
                if self._closing and (not self._buffer or time.monotonic() >= self._deadline):
                    return  # `close` counts whatever is left
                batch = [
                    self._buffer.popleft() for _ in range(min(self.batch_size, len(self._buffer)))
                ]
                self._in_flight = batch
                unsent, self._unsent = self._unsent, []
            if unsent and self._release is not None:
                try:
                    self._release(unsent)
                except Exception as exc:  # the sweep takes them after `COALESCE_TTL_SECONDS`
                    log.warning("publish: could not release %d queued marks: %s", len(unsent), exc)
            try:
                if batch:
                    self._send(batch)
            except Exception:  # a bug here must not stop the publishing of later jobs
                log.exception("publish: batch of %d jobs failed unexpectedly", len(batch))
                with self._lock:
                    self._in_flight = []
            if self._abandoned:
                return

    def _send(self, batch: list[Job]) -> None:
        started = time.perf_counter()
        try:
            outcomes: Sequence[Exception | None] = list(self._send_many(batch))
        except Exception as exc:  # any broker failure: the sweep repairs the chats
            outcomes = [exc] * len(batch)
        with self._lock:
            if self._abandoned:
                return  # counted as dropped by `close`
            # Counted before the batch leaves `pending`, so that an idle publisher's counters
            # are final.
            published, first_error = count_outcomes(batch, outcomes)
            self._in_flight = []
        metrics.PUBLISH_SECONDS.observe(time.perf_counter() - started)
        if published.failed:
            if not self._failed_burst and first_error is not None:
                job, error = first_error
                log.warning(
                    "publish: %d of %d jobs not sent, the first %s%r: %s; the sweep repairs "
                    "their chats; counted in dualwrite_enqueue_failures_total, logged again "
                    "once a batch goes out",
                    published.failed,
                    len(batch),
                    job.task,
                    job.args,
                    error,
                )
            self._failed_burst += published.failed
        elif self._failed_burst:
            log.warning("publish: sending again; %d jobs had failed", self._failed_burst)
            self._failed_burst = 0


def background_publisher(
    settings: Settings,
    send_many: UnsafePublishMany | None = None,
    *,
    release: Release | None = None,
) -> BackgroundPublisher:
    """The API's publisher with these settings' bounds, sending through `send_many` (by
    default a `BoundedPublisher` of these settings, releasing the queued marks of what it
    could not send through `release`)."""
    if send_many is None:
        send_many = BoundedPublisher(settings, release).many
    return BackgroundPublisher(
        send_many,
        release=release,
        buffer_size=settings.publish_buffer_size,
        batch_size=settings.publish_batch_size,
        drain_seconds=settings.publish_drain_seconds,
    )
