"""What the rollout page shows, gathered through the services and repositories that `python -m
app status`, `phase` and `dead-letters list` use, and the page's two actions (replay, pause and
resume), done as their CLI twins do them and logged with who asked."""

from __future__ import annotations

import logging
import math
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.orm import Session, sessionmaker

from app import metrics
from app.broker import QueueDepths
from app.db import transaction
from app.jobs import JobQueue, UnsafePublish, publish_after_commit
from app.repositories import backfill, dead_letters, reconcile_runs, sync_state
from app.repositories import phase as phase_repo
from app.repositories.bulk_paused import Pass, Paused
from app.repositories.bulk_paused import paused as paused_passes
from app.services import bulk, replay
from app.services import phase as phase_service
from app.settings import Phase, Settings

log = logging.getLogger(__name__)

# Open dead letters listed on the page (as `dead-letters list`'s default).
LETTERS_SHOWN = 100
RECONCILES_SHOWN = 5
CHANGES_SHOWN = 5
# How long the page waits for each worker node's metrics.
WORKER_SCRAPE_SECONDS = 1.0


def age(seconds: float) -> str:
    """A duration as `python -m app status` says it: 3d, 5h, 12m, 40s."""
    whole = int(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if whole >= size:
            return f"{whole // size}{unit}"
    return f"{max(whole, 0)}s"


@dataclass(frozen=True, slots=True)
class Step:
    """A step the CLI may take from the current phase, and its gates as `phase set` checks them."""

    to: str
    gates: list[phase_service.Gate]

    @property
    def command(self) -> str:
        return f"python -m app phase set {self.to}"

    @property
    def ok(self) -> bool:
        return all(g.ok for g in self.gates)


@dataclass(frozen=True, slots=True)
class Bucket:
    le: str  # the bucket's upper bound, as in `dualwrite_sync_lag_seconds`
    count: int  # syncs whose lag fell in this bucket (not cumulative)
    percent: float  # of the fullest bucket, for the bar


@dataclass(frozen=True, slots=True)
class Lag:
    buckets: list[Bucket]
    count: int
    mean_seconds: float | None
    nodes: int = 0  # worker nodes whose histograms were added up
    unreachable: tuple[str, ...] = ()  # metrics URLs that did not answer


@dataclass(frozen=True, slots=True)
class BulkPass:
    name: Pass
    schedule: str
    paused: Paused | None


@dataclass(slots=True)
class Overview:
    phase: phase_repo.State
    next_step: Step | None
    previous_step: Step | None
    reverse_backlog: int
    changes: list[phase_repo.Change]
    backfill: backfill.Progress | None
    chats_behind: int
    oldest_behind_seconds: float
    dead_letters_open: dict[str, int]
    letters: list[dead_letters.DeadLetter]
    reconciles: list[reconcile_runs.Run]
    passes: list[BulkPass]
    publish_dropped: dict[str, float]
    enqueue_failures: dict[str, float]
    lag: Lag | None = None
    lag_error: str | None = None
    depths: QueueDepths | None = None
    queues_error: str | None = None

    @property
    def dead_letters_total(self) -> int:
        return sum(self.dead_letters_open.values())


def overview(session: Session, settings: Settings, depths: Callable[[], QueueDepths]) -> Overview:
    """Everything the page shows, read in one transaction (the broker's part from the broker, the
    workers' lag from their nodes' `/metrics`)."""
    state = phase_repo.current(session)
    following = None if state.contracted else phase_service.next_forward(state.phase)
    previous = (
        None
        if state.contracted or state.phase.position == 0
        else list(Phase)[state.phase.position - 1]
    )
    # As `status`: after the contract nothing follows the rows, and nothing is behind.
    live = not state.contracted
    reverse = state.phase is Phase.TABLE_ONLY and live
    behind = sync_state.count_behind(session) if live else 0
    opened = dead_letters.count_open(session)
    found = Overview(
        phase=state,
        next_step=_step(session, settings, state, following),
        previous_step=_step(session, settings, state, previous),
        reverse_backlog=behind if reverse else 0,
        changes=phase_repo.history(session, limit=CHANGES_SHOWN),
        backfill=backfill.progress(session),
        chats_behind=behind,
        oldest_behind_seconds=sync_state.oldest_behind_seconds(session) if live else 0.0,
        dead_letters_open={
            reason: opened.get(reason, 0)
            for reason in sorted({*metrics.DEAD_LETTER_REASONS, *opened})
        },
        letters=sorted(
            dead_letters.list_(session, limit=LETTERS_SHOWN), key=lambda d: (d.reason, d.id)
        ),
        reconciles=reconcile_runs.recent(session, limit=RECONCILES_SHOWN),
        passes=_passes(session, settings),
        publish_dropped=_counter(settings, "dualwrite_publish_dropped", "reason"),
        enqueue_failures=_counter(settings, "dualwrite_enqueue_failures", "task"),
    )
    urls = [url.strip() for url in settings.ops_worker_metrics_urls.split(",") if url.strip()]
    if not urls:
        found.lag_error = (
            "each worker node serves its lag at :WORKER_METRICS_PORT/metrics; set "
            "OPS_WORKER_METRICS_URLS to add them up here"
        )
    else:
        found.lag = worker_lag(urls)
        if not found.lag.nodes:
            found.lag_error = "the worker metrics are unreachable: " + ", ".join(urls)
    try:
        found.depths = depths()
    except Exception as exc:  # whatever the broker's client raises: the page still answers
        found.queues_error = f"the broker is unreachable: {type(exc).__name__}"
    return found


def _step(
    session: Session, settings: Settings, state: phase_repo.State, to: Phase | None
) -> Step | None:
    if to is None:
        return None
    # A step back has only the "one step" gate (`phase_service.gates`).
    return Step(to.value, phase_service.gates(session, settings, state, to))


def _passes(session: Session, settings: Settings) -> list[BulkPass]:
    paused = paused_passes(session)
    schedules = {
        Pass.RECONCILE_NIGHTLY: (
            f"every chat in {settings.reconcile_full_days} night(s), a share on crontab "
            f"'{settings.reconcile_crontab}' UTC"
        ),
        Pass.RECONCILE_RECENT: (
            f"chats changed in the last {age(settings.reconcile_recent_window_seconds)}, every "
            f"{age(settings.reconcile_recent_interval_seconds)}"
        ),
        Pass.BACKFILL: "the copy's chunks on the workers (BACKFILL_ON_WORKERS)",
    }
    return [BulkPass(name, schedules[name], paused.get(name)) for name in Pass]


def _counter(settings: Settings, family: str, label: str) -> dict[str, float]:
    """The counts of a labelled counter of this API instance (every process of it with
    PROMETHEUS_MULTIPROC_DIR, else this one), by that label."""
    registry = (
        metrics.multiprocess_registry(settings.prometheus_multiproc_dir)
        if settings.prometheus_multiproc_dir
        else REGISTRY
    )
    counts: dict[str, float] = {}
    for found in registry.collect():
        if found.name != family:
            continue
        for sample in found.samples:
            if sample.name.endswith("_total"):
                counts[sample.labels[label]] = counts.get(sample.labels[label], 0) + sample.value
    return dict(sorted(counts.items()))


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=WORKER_SCRAPE_SECONDS) as response:
        body: bytes = response.read()
    return body.decode()


def worker_lag(urls: Sequence[str], scrape: Callable[[str], str] = _scrape) -> Lag:
    """The sync lag histogram of the worker nodes at `urls` (`dualwrite_sync_lag_seconds`),
    added up, with a count per bucket (not cumulative). Read in parallel; a node that does not
    answer in time, or answers something else, is named and left out."""
    cumulative: dict[float, float] = {}
    total = sum_seconds = 0.0
    nodes, unreachable = 0, []
    with ThreadPoolExecutor(max_workers=min(len(urls), 8) or 1) as pool:
        bodies = list(pool.map(lambda url: _quietly(scrape, url), urls))
    for url, body in zip(urls, bodies, strict=True):
        try:
            samples = [
                sample
                for family in text_string_to_metric_families(body or "")
                if family.name == "dualwrite_sync_lag_seconds"
                for sample in family.samples
            ]
        except ValueError:
            samples = []
        if body is None or not samples:
            unreachable.append(url)
            continue
        nodes += 1
        for sample in samples:
            if not math.isfinite(sample.value):
                continue
            if sample.name.endswith("_bucket"):
                bound = float(sample.labels["le"])
                cumulative[bound] = cumulative.get(bound, 0.0) + sample.value
            elif sample.name.endswith("_count"):
                total += sample.value
            elif sample.name.endswith("_sum"):
                sum_seconds += sample.value
    counts, below = [], 0.0
    for bound in sorted(cumulative):
        counts.append((bound, int(cumulative[bound] - below)))
        below = cumulative[bound]
    fullest = max((count for _, count in counts), default=0) or 1
    return Lag(
        buckets=[Bucket(_bound(bound), count, 100.0 * count / fullest) for bound, count in counts],
        count=int(total),
        mean_seconds=sum_seconds / total if total else None,
        nodes=nodes,
        unreachable=tuple(unreachable),
    )


def _quietly(scrape: Callable[[str], str], url: str) -> str | None:
    try:
        return scrape(url)
    except (OSError, ValueError) as exc:  # urllib's errors are OSErrors; a bad URL ValueError
        log.warning("could not read the worker metrics at %s: %s", url, exc)
        return None


def _bound(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else f"{bound:g}"


# A confirmation lists at most this many of the letters it would replay (after an incident
# there may be tens of thousands), and says how many there are.
SHOWN = 100


@dataclass(frozen=True, slots=True)
class ToReplay:
    letters: list[dead_letters.DeadLetter]  # the first `SHOWN`
    total: int
    through: int | None  # for every open letter: the newest one now, which the POST carries


def letters_to_replay(session: Session, ids: Sequence[int] | None) -> ToReplay:
    """The first `SHOWN` open dead letters a replay of these ids (every open one for None) would
    take, and how many it would take. A replay of every open letter is bounded by the newest
    one shown here: letters opened after the confirmation are not what the operator agreed to."""
    through = dead_letters.newest_open_id(session) if ids is None else None
    letters = dead_letters.get_open(session, ids, limit=SHOWN, through=through)
    if len(letters) < SHOWN:
        total = len(letters)
    else:
        total = len(dead_letters.get_open(session, ids, through=through))
    return ToReplay(letters, total, through)


@dataclass(frozen=True, slots=True)
class ReplayOutcome:
    done: list[replay.Replayed]
    missing: list[int]  # asked-for ids with no open dead letter
    failed: int  # jobs that could not be enqueued (the sweep repairs those chats)


def replay_letters(
    factory: sessionmaker[Session],
    publish: UnsafePublish,
    ids: Sequence[int] | None,
    *,
    who: str,
    through: int | None = None,
) -> ReplayOutcome:
    """`dead-letters replay IDS` (or `--all` for None): replay in one transaction, publish the
    jobs after its commit, log each outcome with who asked."""
    jobs = JobQueue()
    with transaction(factory) as session:
        done = replay.replay(session, jobs, ids, through=through)
    failed = publish_after_commit(jobs, publish)
    missing = sorted(set(ids or ()) - {item.letter.id for item in done})
    for item in done:
        log.info(
            "dead-letters replay by %s: %s  chat %s: %s",
            who,
            item.letter.id,
            item.letter.chat_id,
            item.action,
        )
    log.info(
        "dead-letters replay by %s: %d replayed%s%s",
        who,
        len(done),
        f", {failed} could not be enqueued" if failed else "",
        f"; no open dead letter with ids {missing}" if missing else "",
    )
    return ReplayOutcome(done, missing, failed)


def pause(factory: sessionmaker[Session], names: Sequence[Pass], *, who: str) -> list[Pass]:
    with transaction(factory) as session:
        return bulk.pause(session, names, who=who)


def resume(factory: sessionmaker[Session], names: Sequence[Pass], *, who: str) -> list[Pass]:
    with transaction(factory) as session:
        return bulk.resume(session, names, who=who)
