"""Reads and writes per chat size (100, 1,000, 5,000 messages), table vs JSONB, in one run:

- last 50 messages: from the table (`app.repositories.messages.page`, the `(chat_id, seq)` index)
  vs the JSONB queries for the same page (`app.repositories.chats.page`, a jsonpath slice, and
  `jsonb_path_query_array`, the page as one value); the fastest per size is the reference. The
  server's own execution time (`EXPLAIN ANALYZE`) beside each;
- a whole transcript paged backwards (pages of 50 and 100) from both;
- one append: to the JSONB (`app.repositories.chats.append`) vs to the table
  (`app.repositories.transcript_rows.append`, the `table_only` store), in milliseconds and WAL
  bytes (`pg_current_wal_lsn()` before and after: other work on the server adds to it); and what
  the worker then does for a JSONB append (`app.services.sync.sync_chats`: converge the chat).

Targets: last-50 from the table >= 3x faster than JSONB on 5,000 messages, and flat (within
1.5x) from 100 to 5,000.

    .venv/bin/python -m bench.reads [--reads 300] [--walks 5] [--appends 30] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from bench import dataset, infra

SIZES = (100, 1_000, 5_000)
PAGE = 50
USER = "bench-reads"
TARGET_FASTER = 3.0
TARGET_FLAT = 1.5
TABLE = "table: messages.page (index on chat_id, seq)"
JSONB_ARRAY = """
SELECT jsonb_path_query_array(messages, '$[last - 49 to last]') FROM copilot_chats WHERE id = :id
"""
JSONB_APPEND = "JSONB append (chats.append, messages || ...)"
ROW_APPEND = "row append (transcript_rows.append)"
SYNC = "then the worker's sync of that chat (sync_chats)"


def setup(url: str, background: float, seed: int) -> dict[int, uuid.UUID]:
    """The background data set (so the table and its indexes are not trivially small), one chat
    per size, and their rows copied with the migration's own backfill statement."""
    from migrations.backfill import INLINE

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


class Timer:
    """Milliseconds per call, by (what, chat size); each call in a transaction rolled back."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.ms: dict[tuple[str, int], list[float]] = {}

    def __call__(self, key: tuple[str, int], call: Callable[[], Any]) -> Any:
        began = time.perf_counter()
        result = call()
        self.ms.setdefault(key, []).append((time.perf_counter() - began) * 1e3)
        self.session.rollback()
        return result


def reads(session: Any, chats: dict[int, uuid.UUID], args: argparse.Namespace) -> dict[str, Any]:
    """Last-50 reads of every variant on every size, interleaved in shuffled order, the server's
    execution time of each, and whole transcripts paged backwards."""
    from sqlalchemy import event, text

    from app.repositories import chats as chats_repo
    from app.repositories import messages as messages_repo

    variants: dict[str, Callable[[uuid.UUID], Any]] = {
        TABLE: lambda c: messages_repo.page(session, c, limit=PAGE, before_seq=None),
        "JSONB: chats.page (jsonpath slice, rows)": lambda c: chats_repo.page(
            session, c, limit=PAGE, before_seq=None
        ),
        "JSONB: jsonb_path_query_array (one value)": lambda c: session.execute(
            text(JSONB_ARRAY), {"id": c}
        ).scalar_one(),
    }
    timer, rng, server = Timer(session), random.Random(args.seed), {}
    order = [(v, s) for v in variants for s in SIZES]
    for _ in range(args.reads):
        rng.shuffle(order)
        for variant, size in order:
            timer((variant, size), lambda v=variant, s=size: variants[v](chats[s]))
    sent: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        sent.append((statement, parameters))

    for variant, size in order * args.server_runs:
        event.listen(session.get_bind(), "before_cursor_execute", capture)
        variants[variant](chats[size])
        event.remove(session.get_bind(), "before_cursor_execute", capture)
        statement, parameters = sent.pop()
        plan = (
            session.connection()
            .exec_driver_sql("EXPLAIN (ANALYZE, FORMAT JSON) " + statement, parameters)
            .scalar_one()
        )
        plan = json.loads(plan) if isinstance(plan, str) else plan
        server.setdefault((variant, size), []).append(plan[0]["Execution Time"])
        session.rollback()

    def walk(pager: Callable[..., Any], chat: uuid.UUID, limit: int) -> int:
        before, total = None, 0
        while True:
            page = pager(session, chat, limit=limit, before_seq=before)
            total += len(page)
            if len(page) < limit or page[0][0] == 0:
                return total
            before = page[0][0]

    pagers = {"table": messages_repo.page, "JSONB": chats_repo.page}
    walks = Timer(session)
    for _ in range(args.walks):
        order = [(p, s, n) for p in pagers for s in SIZES for n in args.page_sizes]
        rng.shuffle(order)
        for name, size, limit in order:
            key = (f"{name}: whole transcript, pages of {limit}", size)
            walks(key, lambda n=name, s=size, lim=limit: walk(pagers[n], chats[s], lim))
    return {"reads": timer.ms, "server": server, "walks": walks.ms}


def writes(
    session: Any, worker_session: Any, chats: dict[int, uuid.UUID], args: argparse.Namespace
) -> tuple[dict[tuple[str, int], tuple[list[float], list[int]]], int]:
    """Appends of one element to each store, ms and WAL bytes each, and the worker's sync after
    the first JSONB appends; the number of syncs that failed (worker statement timeout)."""
    from sqlalchemy import text
    from sqlalchemy.exc import OperationalError

    from app.repositories import chats as chats_repo
    from app.repositories import transcript_rows
    from app.services import sync

    out: dict[tuple[str, int], tuple[list[float], list[int]]] = {}
    diff = text("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), CAST(:b AS pg_lsn))")

    def write(key: tuple[str, int], call: Callable[[], Any], on: Any) -> Any:
        before = str(session.execute(text("SELECT pg_current_wal_lsn()")).scalar_one())
        session.commit()
        began = time.perf_counter()
        result = call()
        on.commit()
        ms, wal = out.setdefault(key, ([], []))
        ms.append((time.perf_counter() - began) * 1e3)
        wal.append(int(session.execute(diff, {"b": before}).scalar_one()))
        session.commit()
        return result

    rng, clock, failed = random.Random(args.seed + 1), datetime(2026, 7, 1, tzinfo=UTC), 0
    for size in SIZES:
        chat = chats[size]
        for store, append in (
            (ROW_APPEND, transcript_rows.append),
            (JSONB_APPEND, chats_repo.append),
        ):
            for i in range(args.appends):
                clock += timedelta(seconds=1)
                item = dataset.element(rng, "user", clock)
                version = write(
                    (store, size),
                    lambda a=append, e=item, c=chat: a(session, c, USER, [e]),
                    session,
                )
                if store != JSONB_APPEND or i >= args.syncs or size not in args.sync_sizes:
                    continue
                try:  # on a worker connection, its statement timeout included
                    converge = {chat: version}
                    write(
                        (SYNC, size),
                        lambda w=converge: sync.sync_chats(worker_session, w),
                        worker_session,
                    )
                except OperationalError as exc:
                    worker_session.rollback()
                    failed += 1
                    print(f"  sync of the {size}-message chat failed: {exc.orig}", file=sys.stderr)
    return out, failed


def report(measured: dict[str, Any], written: dict[Any, Any], failed: int) -> None:
    ms, server = measured["reads"], measured["server"]
    median = {key: statistics.median(values) for key, values in ms.items()}
    infra.show(
        "last 50 messages (ms)",
        ["read", "messages", *infra.STATS, "server ms"],
        [
            [name, size, *infra.stats(values), statistics.median(server[(name, size)])]
            for (name, size), values in sorted(ms.items(), key=lambda kv: (kv[0][1], kv[0][0]))
        ],
    )
    infra.show(
        "paged transcript (ms per walk)",
        ["walk", "messages", *infra.STATS],
        [[name, size, *infra.stats(v)] for (name, size), v in sorted(measured["walks"].items())],
    )
    infra.show(
        f"one append (ms; WAL bytes){f'; {failed} sync(s) FAILED' if failed else ''}",
        ["append", "messages", *infra.STATS, "WAL median", "WAL min"],
        [
            [name, size, *infra.stats(t), statistics.median(w), min(w)]
            for (name, size), (t, w) in sorted(written.items(), key=lambda kv: (kv[0][1], kv[0][0]))
        ],
    )
    jsonb = [n for n, s in ms if n.startswith("JSONB") and s == 5_000]
    fastest = min(jsonb, key=lambda n: median[(n, 5_000)])
    table_5k, table_100 = median[(TABLE, 5_000)], median[(TABLE, 100)]
    on_server = statistics.median(server[(fastest, 5_000)]) / statistics.median(
        server[(TABLE, 5_000)]
    )
    jsonb_5k, row_5k = written[(JSONB_APPEND, 5_000)], written[(ROW_APPEND, 5_000)]
    time_ratio = statistics.median(jsonb_5k[0]) / statistics.median(row_5k[0])
    wal_ratio = statistics.median(jsonb_5k[1]) / max(1, statistics.median(row_5k[1]))
    faster = median[(fastest, 5_000)] / table_5k
    infra.show(
        "targets and ratios (medians, same run)",
        infra.FIGURE,
        [
            [
                "last-50 at 5,000: JSONB / table",
                f"{faster:.2f}x",
                f"fastest JSONB: {fastest} {median[(fastest, 5_000)]:.2f} ms",
                f">= {TARGET_FASTER}x",
                infra.at_least(faster, TARGET_FASTER),
            ],
            [
                "last-50 from the table: 5,000 / 100 messages",
                f"{table_5k / table_100:.2f}x",
                f"{table_100:.2f} ms at 100",
                f"<= {TARGET_FLAT}x",
                infra.verdict(table_5k / table_100, TARGET_FLAT),
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reads", type=int, default=300, help="repetitions of each last-50 read")
    parser.add_argument("--walks", type=int, default=5, help="repetitions of each paged walk")
    parser.add_argument("--appends", type=int, default=30, help="appends per store and chat size")
    parser.add_argument("--syncs", type=int, default=2, help="worker syncs after an append")
    parser.add_argument("--server-runs", type=int, default=20, help="EXPLAIN ANALYZE of reads")
    parser.add_argument("--background", type=float, default=0.1, help="data set scale around")
    parser.add_argument("--seed", type=int, default=dataset.SEED)
    parser.add_argument("--quick", action="store_true", help="few repetitions, no background")
    args = parser.parse_args()
    args.page_sizes, args.sync_sizes = (50, 100), SIZES
    if args.quick:
        args.reads, args.walks, args.appends, args.syncs, args.server_runs = 20, 1, 3, 1, 3
        args.background, args.page_sizes, args.sync_sizes = 0.0, (100,), SIZES[:1]
    infra.services_up()
    with infra.database("cdw_bench_reads") as url:
        os.environ["DATABASE_URL"] = url
        from sqlalchemy.orm import Session

        from app.db import make_engine
        from app.settings import Settings

        print("setting up the chats...", file=sys.stderr)
        chats = setup(url, args.background, args.seed)
        engine = make_engine(Settings(database_url=url), pool_size=2)
        worker_engine = make_engine(Settings(database_url=url), worker=True, pool_size=1)
        try:
            with Session(engine) as session, Session(worker_engine) as worker_session:
                measured = reads(session, chats, args)
                written, failed = writes(session, worker_session, chats, args)
        finally:
            engine.dispose()
            worker_engine.dispose()
    report(measured, written, failed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
