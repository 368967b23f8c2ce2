"""The API's background publisher: the jobs of committed requests, sent to the broker by one
thread per process, in batches, off the requests' path.

A request hands its jobs over (`submit`: an append to a bounded buffer) and its response goes
out without waiting for the broker. The thread takes up to `publish_batch_size` jobs at a time
and sends them with one call of the bounded publisher (`app.broker.BoundedPublisher.many`: the
sends through one producer connection). Nothing here ever blocks or fails a request: a full
buffer drops the jobs it cannot hold, a broker that is down fails the batch, a shutdown drops
what it could not send in time, and each is counted and logged once per burst. The sweep
repairs those chats: the commit already recorded them as behind in their sync state. Every job
that is not sent has its chat's queued mark released, once and never on a request's thread, so
that the chat's next write sends a sync again instead of waiting for the mark to expire.

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

# How long `close` waits, after the drain, for the queued marks of the jobs it dropped to be
# released: a database that does not answer must not hold the shutdown up for longer. Marks it
# could not release expire after `COALESCE_TTL_SECONDS`, and the sweep takes their chats.
RELEASE_SECONDS = 2.0


class BackgroundPublisher:
    """A bounded buffer of jobs and the thread that sends them; one per API process.

    `start` (the app's lifespan; `submit` also starts it if nothing did) runs the thread,
    `close` (the lifespan's end) drains the buffer for at most `drain_seconds`, then drops and
    counts what is left and releases its queued marks for at most `release_seconds`. After a
    fork the child starts afresh: the parent's buffer and thread are not its own.

    `send_many` must not release marks itself (a `BoundedPublisher` without `release`): the
    publisher releases those of the jobs it could not send, and only it knows which jobs a
    shutdown gave up on.
    """

    def __init__(
        self,
        send_many: UnsafePublishMany,
        *,
        release: Release | None = None,
        buffer_size: int,
        batch_size: int,
        drain_seconds: float,
        release_seconds: float = RELEASE_SECONDS,
    ) -> None:
        self._send_many = send_many
        self._release = release
        self.buffer_size = buffer_size
        self.batch_size = batch_size
        self.drain_seconds = drain_seconds
        self.release_seconds = release_seconds
        self._reset(os.getpid())

    def _reset(self, pid: int) -> None:
        self._pid = pid
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._buffer: deque[Job] = deque()
        self._in_flight: list[Job] = []
        self._releasing = 0  # failed jobs of the last batch whose marks are being released
        # Chats whose jobs were dropped (a full buffer, a shutdown): their queued marks are
        # released off the request, by the thread or by `close`, whichever takes them first.
        self._unsent: list[str] = []
        self._thread: threading.Thread | None = None
        self._closing = False
        # Set by `close` once it has taken every job and mark left: a job dropped after that
        # has its mark released by a thread of its own.
        self._collected = False
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
        """Jobs handed over and not done with yet: buffered, in the batch being sent, or failed
        with their marks being released."""
        with self._lock:
            return len(self._buffer) + len(self._in_flight) + self._releasing

    def _show_pending(self) -> None:
        # Set, not read at scrape time: the process that answers a scrape is not this one
        # under several API processes (`app.metrics`).
        metrics.PUBLISH_BUFFERED.set(self.pending())

    def submit(self, jobs: Sequence[Job]) -> None:
        """Hand committed jobs over for sending. Never blocks on the broker and never raises:
        the jobs the buffer cannot hold are dropped and counted."""
        if not jobs:
            return
        if self._thread is None or self._pid != os.getpid():
            self.start()
        recovered = 0
        late: list[str] = []
        with self._wake:
            if self._closing:
                dropped, reason, first = len(jobs), "shutdown", False
                marks = [job.queued for job in jobs if job.queued is not None]
                if self._collected:
                    late = marks
                else:
                    self._unsent.extend(marks)  # released by `close` with the rest
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
        self._show_pending()
        if dropped:
            metrics.PUBLISH_DROPPED.labels(reason).inc(dropped)
        if late:
            self._release_off_thread(late)  # starting a thread never waits for the database
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
        (with the batch still being sent, if its send has not returned), and release the
        queued marks of every job dropped, waiting at most `release_seconds` for that. Returns
        how many jobs were dropped at shutdown. Later submits are dropped, counted and released
        too."""
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
            left = list(self._buffer)
            self._buffer.clear()
            if thread is not None and thread.is_alive():
                # Its send (or a release) hangs: give up on its batch; the thread stops at its
                # next step and neither counts nor releases that batch again.
                left += self._in_flight
                self._in_flight = []
                self._abandoned = True
            marks = self._unsent + [job.queued for job in left if job.queued is not None]
            self._unsent = []
            self._collected = True
        if left:
            metrics.PUBLISH_DROPPED.labels("shutdown").inc(len(left))
            log.warning(
                "publish: %d jobs not sent within %.1fs of shutdown were dropped; the sweep "
                "repairs their chats",
                len(left),
                self.drain_seconds,
            )
        if marks:
            releasing = self._release_off_thread(marks)
            if releasing is not None:
                releasing.join(self.release_seconds)
            if releasing is not None and releasing.is_alive():
                log.warning(
                    "publish: the queued marks of %d chats were not released within %.1fs of "
                    "shutdown; the sweep takes those chats after COALESCE_TTL_SECONDS",
                    len(marks),
                    self.release_seconds,
                )
        self._show_pending()
        return len(left)

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._buffer and not self._unsent and not self._closing:
                    self._wake.wait()
                if self._abandoned or (
                    self._closing
                    and (time.monotonic() >= self._deadline or not (self._buffer or self._unsent))
                ):
                    return  # `close` counts and releases whatever is left
                unsent, self._unsent = self._unsent, []
                batch = [] if unsent else self._take_batch()
                self._in_flight = batch
            if unsent:
                self._release_quietly(unsent)
                continue
            try:
                self._send(batch)
            except Exception:  # a bug here must not stop the publishing of later jobs
                log.exception("publish: batch of %d jobs failed unexpectedly", len(batch))
                with self._lock:
                    self._in_flight = []
            self._show_pending()

    def _take_batch(self) -> list[Job]:
        return [self._buffer.popleft() for _ in range(min(self.batch_size, len(self._buffer)))]

    def _release_quietly(self, chats: list[str]) -> None:
        if self._release is None:
            return
        try:
            self._release(chats)
        except Exception as exc:  # the sweep takes them after `COALESCE_TTL_SECONDS`
            log.warning("publish: could not release %d queued marks: %s", len(chats), exc)

    def _release_off_thread(self, chats: list[str]) -> threading.Thread | None:
        """Release these marks from a thread of their own (the caller may not wait on the
        database: a request, or a shutdown with a bound to keep). None if no thread could be
        started: the marks then expire after `COALESCE_TTL_SECONDS`."""
        thread = threading.Thread(
            target=self._release_quietly, args=(chats,), name="dualwrite-release", daemon=True
        )
        try:
            thread.start()
        except RuntimeError as exc:  # out of threads: never an error for the caller
            log.warning("publish: could not release %d queued marks: %s", len(chats), exc)
            return None
        return thread

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
            failed = [
                job.queued
                for job, outcome in zip(batch, outcomes, strict=True)
                if outcome is not None and job.queued is not None
            ]
            # Out of `close`'s reach (the thread releases them), yet still pending until
            # released: an idle publisher has released every mark it will.
            self._in_flight = []
            self._releasing = len(failed)
        metrics.PUBLISH_SECONDS.observe(time.perf_counter() - started)
        if failed:
            try:
                self._release_quietly(failed)
            finally:
                with self._lock:
                    self._releasing = 0
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
    default a `BoundedPublisher` of these settings) and releasing the queued marks of what it
    does not send through `release`."""
    if send_many is None:
        # Without `release`: the background publisher releases what was not sent, exactly once.
        send_many = BoundedPublisher(settings).many
    return BackgroundPublisher(
        send_many,
        release=release,
        buffer_size=settings.publish_buffer_size,
        batch_size=settings.publish_batch_size,
        drain_seconds=settings.publish_drain_seconds,
    )
