"""Reads and writes per chat size (100, 1,000, 5,000 messages), table vs JSONB, in one run: the
last 50 messages from the table and by each JSONB query (the server's EXPLAIN ANALYZE time
beside each), a whole transcript paged backwards, and one append to each store in ms and WAL
bytes, with the worker's sync after a JSONB append. Targets: last-50 from the table >= 3x faster
than the fastest JSONB query at 5,000 messages, and flat (within 1.5x) from 100 to 5,000.

    .venv/bin/python -m bench.reads [--reads 300] [--walks 5] [--appends 30] [--quick]
"""

from __future__ import annotations

import itertools
import random
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from sqlalchemy import event, text
from sqlalchemy.exc import OperationalError

from app.repositories import chats as chats_repo
from app.repositories import messages as messages_repo
from app.repositories import transcript_rows
from app.services import sync
from bench import dataset, infra
from migrations.backfill import INLINE

SIZES = (100, 1_000, 5_000)
PAGE = 50
USER = "bench-reads"
TARGET_FASTER = 3.0
TARGET_FLAT = 1.5
JSONB_ARRAY = """
SELECT jsonb_path_query_array(messages, '$[last - 49 to last]') FROM copilot_chats WHERE id = :id
"""
TABLE = "table: messages.page (index on chat_id, seq)"
JSONB_APPEND = "JSONB append (chats.append, messages || ...)"
ROW_APPEND = "row append (transcript_rows.append)"
SYNC = "then the worker's sync of that chat (sync_chats)"
Samples = dict[tuple[str, int], list[float]]  # by (what, chat size)


def jsonb_array(session: Any, chat_id: uuid.UUID, **_: Any) -> Any:
    return session.execute(text(JSONB_ARRAY), {"id": chat_id}).scalar_one()


READS = {
    TABLE: messages_repo.page,
    "JSONB: chats.page (jsonpath slice, rows)": chats_repo.page,
    "JSONB: jsonb_path_query_array (one value)": jsonb_array,
}
PAGERS = {"table": messages_repo.page, "JSONB": chats_repo.page}


def setup(url: str, background: float, seed: int) -> dict[int, uuid.UUID]:
    """The background data set, one chat per size, and their rows copied by the backfill."""
    if background > 0:
        dataset.load(url, dataset.shape(background, seed))
    rng, chats = random.Random(seed), {}
    with psycopg.connect(url) as connection:
        for size in SIZES:
            chats[size] = uuid.UUID(int=rng.getrandbits(128), version=4)
            created = datetime(2026, 6, 1, tzinfo=UTC)
            messages = dataset.dumps(dataset.transcript(rng, size, created))
            connection.execute(
                "INSERT INTO copilot_chats (id, user_id, title, model, messages, "
                "messages_version, created_at) VALUES (%s, %s, %s, 'gpt-4o', %s, 1, %s)",
                (chats[size], USER, f"{size} messages", messages, created),
            )
        connection.execute(INLINE)
        connection.execute(
            "INSERT INTO copilot_chat_sync_state (chat_id, wanted_version, applied_version, "
            "synced_at) SELECT id, messages_version, messages_version, now() FROM copilot_chats "
            "ON CONFLICT (chat_id) DO UPDATE SET applied_version = EXCLUDED.applied_version"
        )
    infra.scalar(url, "VACUUM ANALYZE")
    infra.scalar(url, "CHECKPOINT")
    return chats


def timed(samples: Samples, key: tuple[str, int], call: Callable[..., Any], *args: Any) -> Any:
    """`call(*args)`, its milliseconds added to `samples[key]`."""
    began = time.perf_counter()
    result = call(*args)
    samples.setdefault(key, []).append((time.perf_counter() - began) * 1e3)
    return result


def last_page(read: Callable[..., Any], session: Any, chat: uuid.UUID) -> Any:
    return read(session, chat, limit=PAGE, before_seq=None)


def walk(pager: Callable[..., Any], session: Any, chat: uuid.UUID, limit: int) -> None:
    """A whole transcript, page by page backwards."""
    before = None
    while True:
        page = pager(session, chat, limit=limit, before_seq=before)
        if len(page) < limit or page[0][0] == 0:
            return
        before = page[0][0]


def reads(session: Any, chats: dict[int, uuid.UUID], args: Any) -> tuple[Samples, ...]:
    """Milliseconds per last-50 read, in shuffled order; its EXPLAIN ANALYZE time; milliseconds
    per paged walk."""
    ms: Samples = {}
    server: Samples = {}
    walks: Samples = {}
    rng, order = random.Random(args.seed), [(r, s) for r in READS for s in SIZES]
    for _ in range(args.reads):
        rng.shuffle(order)
        for read, size in order:
            timed(ms, (read, size), last_page, READS[read], session, chats[size])
            session.rollback()
    sent: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        sent.append((statement, parameters))

    event.listen(session.get_bind(), "before_cursor_execute", capture)
    for read, size in order * args.server_runs:
        last_page(READS[read], session, chats[size])
        statement, parameters = sent[-1]
        explain = "EXPLAIN (ANALYZE, FORMAT JSON) " + statement
        plan = session.connection().exec_driver_sql(explain, parameters).scalar_one()
        server.setdefault((read, size), []).append(plan[0]["Execution Time"])
        session.rollback()
    event.remove(session.get_bind(), "before_cursor_execute", capture)
    for _ in range(args.walks):
        paged = [(p, s, n) for p in PAGERS for s in SIZES for n in args.page_sizes]
        rng.shuffle(paged)
        for pager, size, limit in paged:
            key = (f"{pager}: whole transcript, pages of {limit}", size)
            timed(walks, key, walk, PAGERS[pager], session, chats[size], limit)
            session.rollback()
    return ms, server, walks


def writes(
    session: Any, worker_session: Any, chats: dict[int, uuid.UUID], args: Any
) -> tuple[Samples, Samples, int]:
    """Ms and WAL bytes per append to each store and per sync after one; syncs failed."""
    ms: Samples = {}
    wal: Samples = {}
    diff = text("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), CAST(:b AS pg_lsn))")

    def write(key: tuple[str, int], on: Any, call: Callable[..., Any], *call_args: Any) -> Any:
        """`call(*call_args)` and the commit of session `on`: ms and WAL bytes."""
        before = str(session.execute(text("SELECT pg_current_wal_lsn()")).scalar_one())
        session.commit()
        began = time.perf_counter()
        result = call(*call_args)
        on.commit()
        ms.setdefault(key, []).append((time.perf_counter() - began) * 1e3)
        wal.setdefault(key, []).append(int(session.execute(diff, {"b": before}).scalar_one()))
        session.commit()
        return result

    rng, clock, failed = random.Random(args.seed + 1), datetime(2026, 7, 1, tzinfo=UTC), 0
    stores = {ROW_APPEND: transcript_rows.append, JSONB_APPEND: chats_repo.append}
    for (size, chat), (store, append) in itertools.product(chats.items(), stores.items()):
        for i in range(args.appends):
            clock += timedelta(seconds=1)
            item = dataset.element(rng, "user", clock)
            written = write((store, size), session, append, session, chat, USER, [item])
            if store != JSONB_APPEND or i >= args.syncs or size not in args.sync_sizes:
                continue
            try:  # on a worker connection, its statement timeout included
                wanted = {chat: written.version}
                write((SYNC, size), worker_session, sync.sync_chats, worker_session, wanted)
            except OperationalError as exc:
                worker_session.rollback()
                failed += 1
                print(f"  sync of the {size}-message chat failed: {exc.orig}", file=sys.stderr)
    return ms, wal, failed


def by_size(samples: dict[tuple[str, int], Any]) -> list[tuple[tuple[str, int], Any]]:
    return sorted(samples.items(), key=lambda kv: (kv[0][1], kv[0][0]))


def report(read: tuple[Samples, ...], written: tuple[Samples, Samples, int]) -> None:
    (ms, server, walks), (write_ms, wal, failed) = read, written
    median = {key: statistics.median(values) for key, values in ms.items()}
    server_median = {key: statistics.median(values) for key, values in server.items()}
    infra.show(
        "last 50 messages (ms)",
        ["read", "messages", *infra.STATS, "server ms"],
        [[*key, *infra.stats(values), server_median[key]] for key, values in by_size(ms)],
    )
    infra.show(
        "paged transcript (ms per walk)",
        ["walk", "messages", *infra.STATS],
        [[*key, *infra.stats(values)] for key, values in sorted(walks.items())],
    )
    infra.show(
        f"one append (ms; WAL bytes){f'; {failed} sync(s) FAILED' if failed else ''}",
        ["append", "messages", *infra.STATS, "WAL median", "WAL min"],
        [
            [*key, *infra.stats(values), statistics.median(wal[key]), min(wal[key])]
            for key, values in by_size(write_ms)
        ],
    )
    fastest = min((r for r in READS if r != TABLE), key=lambda r: median[(r, 5_000)])
    faster = median[(fastest, 5_000)] / median[(TABLE, 5_000)]
    flat = median[(TABLE, 5_000)] / median[(TABLE, 100)]
    on_server = server_median[(fastest, 5_000)] / server_median[(TABLE, 5_000)]
    jsonb, row = (JSONB_APPEND, 5_000), (ROW_APPEND, 5_000)
    time_ratio = statistics.median(write_ms[jsonb]) / statistics.median(write_ms[row])
    wal_ratio = statistics.median(wal[jsonb]) / max(1, statistics.median(wal[row]))
    reference = f"fastest JSONB: {fastest} {median[(fastest, 5_000)]:.2f} ms"
    infra.show(
        "targets and ratios (medians, same run)",
        infra.FIGURE,
        [
            [
                "last-50 at 5,000: JSONB / table",
                f"{faster:.2f}x",
                reference,
                f">= {TARGET_FASTER}x",
                infra.at_least(faster, TARGET_FASTER),
            ],
            [
                "last-50 from the table: 5,000 / 100 messages",
                f"{flat:.2f}x",
                f"{median[(TABLE, 100)]:.2f} ms at 100",
                f"<= {TARGET_FLAT}x",
                infra.verdict(flat, TARGET_FLAT),
            ],
            [
                "  server execution time only: JSONB / table at 5,000",
                f"{on_server:.1f}x",
                "",
                f">= {TARGET_FASTER}x",
                infra.at_least(on_server, TARGET_FASTER),
            ],
            ["append at 5,000: JSONB / row (ms)", f"{time_ratio:.0f}x", "ref. ~290x", "", ""],
            ["append at 5,000: JSONB / row (WAL)", f"{wal_ratio:.0f}x", "ref. ~1,900x", "", ""],
        ],
    )


def main() -> int:
    args = infra.options(
        __doc__,
        {"reads": 20, "walks": 1, "appends": 3, "syncs": 1, "server_runs": 3, "background": 0.0},
        reads=(300, "repetitions of each last-50 read"),
        walks=(5, "repetitions of each paged walk"),
        appends=(30, "appends per store and chat size"),
        syncs=(2, "worker syncs after an append"),
        server_runs=(20, "EXPLAIN ANALYZE of reads"),
        background=(0.1, "data set scale around"),
        seed=dataset.SEED,
    )
    args.page_sizes = (100,) if args.quick else (50, 100)
    args.sync_sizes = SIZES[:1] if args.quick else SIZES
    with (
        infra.database("cdw_bench_reads") as url,
        infra.sessions(url, pool_size=2) as sessions,
        infra.sessions(url, worker=True) as worker_sessions,
        sessions() as session,
        worker_sessions() as worker_session,
    ):
        print("setting up the chats...", file=sys.stderr)
        chats = setup(url, args.background, args.seed)
        read = reads(session, chats, args)
        written = writes(session, worker_session, chats, args)
    report(read, written)
    return 0


if __name__ == "__main__":
    sys.exit(main())
