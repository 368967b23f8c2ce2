"""Reads and writes per chat size (100, 1,000, 5,000 messages), table vs JSONB, in one run:

- last 50 messages: from the table (`app.repositories.messages.page`, the `(chat_id, seq)` index)
  vs the fastest JSONB query for the same page (`app.repositories.chats.page`, a jsonpath slice,
  and two other slices; the fastest per size is the reference);
- a whole transcript paged backwards (pages of 50 and 100) from both;
- one append: as JSONB (`app.repositories.chats.append`, `messages || ...`) vs one row insert
  (the guarded upsert of one row), in milliseconds and WAL bytes (`pg_current_wal_lsn()` before
  and after; other work on the server adds to that, so the WAL of the statement alone, from
  `EXPLAIN (ANALYZE, WAL)`, is shown too); and what the worker then does for that append
  (`app.services.sync.sync_chats`: converge the whole chat).

Targets: last-50 from the table >= 3x faster than JSONB on 5,000 messages, and flat (within
1.5x) from 100 to 5,000.

    .venv/bin/python bench/reads.py [--reads 300] [--walks 20] [--appends 30] [--quick]
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
from pathlib import Path
from typing import Any

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import dataset, infra

SIZES = (100, 1_000, 5_000)
PAGE = 50
USER = "bench-reads"
TARGET_FASTER = 3.0
TARGET_FLAT = 1.5

# The two JSONB slices tried besides the service's own (`chats.page`): the page as one array
# value, and element by element through the subscript operator.
JSONB_ARRAY = """
SELECT jsonb_path_query_array(messages, '$[last - 49 to last]')
FROM copilot_chats WHERE id = :id
"""
JSONB_SUBSCRIPT = """
SELECT g AS seq, c.messages -> g AS elem
FROM copilot_chats c
CROSS JOIN LATERAL generate_series(greatest(jsonb_array_length(c.messages) - 50, 0),
                                   jsonb_array_length(c.messages) - 1) AS g
WHERE c.id = :id
ORDER BY g
"""
# `chats.page` with its bounds computed once: in the service's statement the inlined CTE
# recomputes `jsonb_array_length(messages)` (a full detoast of the array) for every output row.
JSONB_PAGE_ONCE = """
WITH bounds AS MATERIALIZED (
    SELECT id, greatest(jsonb_array_length(messages) - :limit, 0) AS first,
           jsonb_array_length(messages) - 1 AS last
    FROM copilot_chats WHERE id = :id AND jsonb_typeof(messages) = 'array'
)
SELECT b.first + p.ord - 1 AS seq, p.elem
FROM bounds b
JOIN copilot_chats c ON c.id = b.id
CROSS JOIN LATERAL jsonb_path_query(
    c.messages, '$[$first to $last]', jsonb_build_object('first', b.first, 'last', b.last)
) WITH ORDINALITY AS p(elem, ord)
WHERE b.last >= b.first
ORDER BY p.ord
"""
TABLE_PAGE_RAW = """
SELECT seq, content FROM (
    SELECT seq, content FROM copilot_chat_messages
    WHERE chat_id = %(chat_id)s AND deleted_at IS NULL
    ORDER BY seq DESC
    LIMIT %(limit)s
) newest ORDER BY seq
"""
JSONB_ARRAY_RAW = JSONB_ARRAY.replace(":id", "%(id)s")
TABLE_AGG_RAW = """
SELECT jsonb_agg(content ORDER BY seq) FROM (
    SELECT seq, content FROM copilot_chat_messages
    WHERE chat_id = %(chat_id)s AND deleted_at IS NULL
    ORDER BY seq DESC
    LIMIT %(limit)s
) newest
"""
ROW_INSERT = """
INSERT INTO copilot_chat_messages AS m
    (chat_id, message_id, role, seq, content, stream_id, model, created_at, updated_at,
     source_version)
VALUES (:chat_id, :message_id, :role, :seq, CAST(:content AS jsonb), NULL, NULL, :created_at,
        now(), :version)
ON CONFLICT (chat_id, message_id) DO UPDATE SET
    role = EXCLUDED.role, seq = EXCLUDED.seq, content = EXCLUDED.content,
    created_at = EXCLUDED.created_at, updated_at = now(), deleted_at = NULL,
    source_version = EXCLUDED.source_version
WHERE m.source_version <= EXCLUDED.source_version
"""


class Explain:
    """While on, prefixes every statement of the engine with EXPLAIN (ANALYZE, WAL, FORMAT JSON):
    the repository function runs its statement for real and returns the plan, whose top node
    counts the WAL that statement wrote, and nothing else's."""

    def __init__(self, engine: Any) -> None:
        from sqlalchemy import event

        self.on = False

        @event.listens_for(engine, "before_cursor_execute", retval=True)
        def before(conn: Any, cursor: Any, statement: str, parameters: Any, *rest: Any) -> Any:
            if self.on:
                statement = "EXPLAIN (ANALYZE, WAL, FORMAT JSON) " + statement
            return statement, parameters


class Capture:
    """While on, remembers the last statement and parameters sent (as the driver got them)."""

    def __init__(self, engine: Any) -> None:
        from sqlalchemy import event

        self.on = False
        self.last: tuple[str, Any] = ("", None)

        @event.listens_for(engine, "before_cursor_execute")
        def before(conn: Any, cursor: Any, statement: str, parameters: Any, *rest: Any) -> None:
            if self.on:
                self.last = (statement, parameters)


def wal_bytes(plan: Any) -> int:
    if isinstance(plan, str):
        plan = json.loads(plan)
    node = plan[0]["Plan"] if isinstance(plan, list) else plan["Plan"]
    return int(node.get("WAL Bytes", 0))


def lsn(session: Any) -> str:
    from sqlalchemy import text

    return str(session.execute(text("SELECT pg_current_wal_lsn()")).scalar_one())


def lsn_diff(session: Any, before: str) -> int:
    from sqlalchemy import text

    return int(
        session.execute(
            text("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), CAST(:b AS pg_lsn))"), {"b": before}
        ).scalar_one()
    )


def setup(url: str, background: float, seed: int) -> dict[int, uuid.UUID]:
    """The background data set (so the table and its indexes are not trivially small), one chat
    per size, and their rows copied with the migration's own backfill statement."""
    from migrations.backfill import INLINE

    if background > 0:
        dataset.load(url, dataset.shape(background, seed))
    rng = random.Random(seed)
    chats: dict[int, uuid.UUID] = {}
    with psycopg.connect(url) as connection:
        for size in SIZES:
            chat_id = uuid.UUID(int=rng.getrandbits(128), version=4)
            created = datetime(2026, 6, 1, tzinfo=UTC)
            messages = dataset.transcript(rng, size, created)
            connection.execute(
                "INSERT INTO copilot_chats (id, user_id, title, model, messages, "
                "messages_version, created_at) VALUES (%s, %s, %s, 'gpt-4o', %s, 1, %s)",
                (chat_id, USER, f"{size} messages", dataset.dumps(messages), created),
            )
            chats[size] = chat_id
        connection.execute(INLINE)
        connection.execute(
            "INSERT INTO copilot_chat_sync_state (chat_id, wanted_version, applied_version, "
            "synced_at) SELECT id, messages_version, messages_version, now() FROM copilot_chats "
            "ON CONFLICT (chat_id) DO UPDATE SET applied_version = EXCLUDED.applied_version"
        )
        connection.commit()
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute("VACUUM ANALYZE")
        connection.execute("CHECKPOINT")
    return chats


def summary(values: list[float]) -> list[Any]:
    return [
        len(values),
        statistics.median(values),
        infra.percentile(values, 50),
        infra.percentile(values, 99),
        min(values),
        max(values),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reads", type=int, default=300, help="repetitions of each last-50 read")
    parser.add_argument("--walks", type=int, default=5, help="repetitions of each paged walk")
    parser.add_argument("--appends", type=int, default=30, help="JSONB appends per chat size")
    parser.add_argument("--inserts", type=int, default=300, help="row inserts per chat size")
    parser.add_argument("--explains", type=int, default=5, help="EXPLAIN (ANALYZE, WAL) runs")
    parser.add_argument("--syncs", type=int, default=2, help="worker syncs after an append")
    parser.add_argument("--server-runs", type=int, default=20, help="EXPLAIN ANALYZE of reads")
    parser.add_argument("--background", type=float, default=0.1, help="data set scale around")
    parser.add_argument("--seed", type=int, default=dataset.SEED)
    parser.add_argument("--quick", action="store_true", help="few repetitions, no background")
    args = parser.parse_args()
    if args.quick:
        args.reads, args.walks, args.appends, args.inserts, args.explains = 20, 2, 3, 20, 2
        args.syncs, args.server_runs, args.walks = 1, 3, 1
        args.background = 0.0

    infra.services_up()
    with infra.database("cdw_bench_reads") as url:
        os.environ["DATABASE_URL"] = url
        from sqlalchemy import text
        from sqlalchemy.exc import OperationalError
        from sqlalchemy.orm import Session

        from app.db import make_engine
        from app.repositories import chats as chats_repo
        from app.repositories import messages as messages_repo
        from app.services import sync
        from app.settings import Settings

        print("setting up the chats...", file=sys.stderr)
        chats = setup(url, args.background, args.seed)
        engine = make_engine(Settings(database_url=url), pool_size=2)
        worker_engine = make_engine(Settings(database_url=url), worker=True, pool_size=1)
        explain = Explain(engine)
        capture = Capture(engine)
        server: dict[tuple[str, int], list[float]] = {}
        failed: dict[tuple[str, int], int] = {}
        sync_sizes = SIZES[:1] if args.quick else SIZES
        try:
            session = Session(engine)
            raw = psycopg.connect(url, autocommit=True)
            worker_session = Session(worker_engine)
            reads: dict[tuple[str, int], list[float]] = {}

            def timed(key: tuple[str, int], call: Callable[[], Any]) -> Any:
                began = time.perf_counter()
                result = call()
                reads.setdefault(key, []).append((time.perf_counter() - began) * 1000)
                session.rollback()
                return result

            # Last 50: every variant on every size, interleaved, in shuffled order.
            print("last-50 reads...", file=sys.stderr)
            variants: dict[str, Callable[[uuid.UUID], Any]] = {
                "table: messages.page (index on chat_id, seq)": lambda c: messages_repo.page(
                    session, c, limit=PAGE, before_seq=None
                ),
                "JSONB: chats.page (jsonpath slice, rows)": lambda c: chats_repo.page(
                    session, c, limit=PAGE, before_seq=None
                ),
                "JSONB: jsonb_path_query_array (one value)": lambda c: session.execute(
                    text(JSONB_ARRAY), {"id": c}
                ).scalar_one(),
                "JSONB: messages -> i for the last 50 i": lambda c: session.execute(
                    text(JSONB_SUBSCRIPT), {"id": c}
                ).all(),
                "JSONB: jsonpath slice, bounds computed once": lambda c: session.execute(
                    text(JSONB_PAGE_ONCE), {"id": c, "limit": PAGE}
                ).all(),
                # The same SQL without SQLAlchemy: how much of the time is the client's.
                "raw psycopg, table: messages.page's SQL": lambda c: raw.execute(
                    TABLE_PAGE_RAW, {"chat_id": c, "limit": PAGE}
                ).fetchall(),
                "raw psycopg, JSONB: jsonb_path_query_array (one value)": lambda c: raw.execute(
                    JSONB_ARRAY_RAW, {"id": c}
                ).fetchall(),
                # The table page aggregated on the server: one value to parse, like the above.
                "raw psycopg, table: the page as one jsonb_agg value": lambda c: raw.execute(
                    TABLE_AGG_RAW, {"chat_id": c, "limit": PAGE}
                ).fetchall(),
            }
            rng = random.Random(args.seed)
            checks: dict[tuple[str, int], int] = {}
            for _ in range(args.reads):
                order = [(v, s) for v in variants for s in SIZES]
                rng.shuffle(order)
                for variant, size in order:
                    result = timed((variant, size), lambda v=variant, s=size: variants[v](chats[s]))
                    checks[(variant, size)] = len(result)
            # Where the time goes: the server's own execution time of the same statements.
            for _ in range(args.server_runs):
                for variant in variants:
                    for size in SIZES:
                        if variant.startswith("raw"):
                            continue
                        capture.on = True
                        variants[variant](chats[size])
                        capture.on = False
                        statement, parameters = capture.last
                        plan = (
                            session.connection()
                            .exec_driver_sql(
                                "EXPLAIN (ANALYZE, FORMAT JSON) " + statement, parameters
                            )
                            .scalar_one()
                        )
                        plan = json.loads(plan) if isinstance(plan, str) else plan
                        server.setdefault((variant, size), []).append(plan[0]["Execution Time"])
                        session.rollback()
            for (variant, size), count in checks.items():
                if count != PAGE and "one value" not in variant and "jsonb_agg" not in variant:
                    print(f"PROBLEM: {variant} on {size} gave {count} rows", file=sys.stderr)

            # Whole transcripts, paged backwards.
            print("paged walks...", file=sys.stderr)

            def walk(pager: Callable[..., Any], chat: uuid.UUID, limit: int) -> int:
                before: int | None = None
                total = 0
                while True:
                    page = pager(session, chat, limit=limit, before_seq=before)
                    total += len(page)
                    if len(page) < limit or page[0][0] == 0:
                        return total
                    before = page[0][0]

            pagers = {"table": messages_repo.page, "JSONB": chats_repo.page}
            walked: dict[tuple[str, int], int] = {}
            page_sizes = (100,) if args.quick else (50, 100)
            for _ in range(args.walks):
                order = [(p, s, n) for p in pagers for s in SIZES for n in page_sizes]
                rng.shuffle(order)
                for name, size, limit in order:
                    key = (f"{name}: whole transcript, pages of {limit}", size)
                    walked[key] = timed(
                        key, lambda n=name, s=size, lim=limit: walk(pagers[n], chats[s], lim)
                    )

            # Appends: JSONB (the service's statement) vs one row, and the worker's converge.
            print("appends...", file=sys.stderr)
            writes: dict[tuple[str, int], tuple[list[float], list[int], list[int]]] = {}

            def write(
                key: tuple[str, int],
                call: Callable[[], Any],
                explained: bool,
                on: Session | None = None,
            ) -> Any:
                times, wal, plan_wal = writes.setdefault(key, ([], [], []))
                before = lsn(session)
                session.commit()
                explain.on = explained
                try:
                    began = time.perf_counter()
                    result = call()
                    (on or session).commit()
                    elapsed = (time.perf_counter() - began) * 1000
                finally:
                    explain.on = False
                    if on is not None:
                        times.append((time.perf_counter() - began) * 1000)
                if explained:
                    plan_wal.append(wal_bytes(result))
                else:
                    if on is None:
                        times.append(elapsed)
                    wal.append(lsn_diff(session, before))
                    session.commit()
                return result

            def insert_row(params: dict[str, Any]) -> Any:
                result = session.execute(text(ROW_INSERT), params)
                return result.scalar_one() if explain.on else None

            clock = datetime(2026, 7, 1, tzinfo=UTC)
            element_rng = random.Random(args.seed + 1)
            seq = {size: size for size in SIZES}
            for size in SIZES:
                chat = chats[size]
                # Row inserts first: the JSONB appends below grow the chat.
                for i in range(args.inserts + args.explains):
                    clock += timedelta(seconds=1)
                    item = dataset.element(element_rng, "user", clock)
                    seq[size] += 1
                    write(
                        ("one row insert (guarded upsert)", size),
                        lambda c=chat, item=item, n=seq[size], at=clock: insert_row(
                            {
                                "chat_id": c,
                                "message_id": item["id"],
                                "role": item["role"],
                                "seq": 10_000_000 + n,
                                "content": json.dumps(item),
                                "created_at": at,
                                "version": 1,
                            }
                        ),
                        explained=i >= args.inserts,
                    )
                for i in range(args.appends + args.explains):
                    clock += timedelta(seconds=1)
                    item = dataset.element(element_rng, "user", clock)
                    explained = i >= args.appends
                    version = write(
                        ("JSONB append (chats.append, messages || ...)", size),
                        lambda c=chat, item=item: chats_repo.append(session, c, USER, [item]),
                        explained=explained,
                    )
                    if explained or i >= args.syncs or size not in sync_sizes:
                        continue
                    # What the worker then does for this append, on a worker connection (its
                    # statement timeout included): converge the whole chat.
                    key = ("then the worker's sync of that chat (sync_chats)", size)
                    try:
                        write(
                            key,
                            lambda c=chat, v=version: sync.sync_chats(worker_session, {c: v}),
                            explained=False,
                            on=worker_session,
                        )
                    except OperationalError as exc:
                        worker_session.rollback()
                        failed[key] = failed.get(key, 0) + 1
                        print(
                            f"  sync of the {size}-message chat failed: {exc.orig}", file=sys.stderr
                        )
        finally:
            session.close()
            raw.close()
            worker_session.close()
            engine.dispose()
            worker_engine.dispose()

    read_rows = []
    for (name, size), values in reads.items():
        if "whole transcript" in name:
            continue
        reference = ""
        if name.startswith("table") and size == 5_000:
            reference = "~0.8 ms ref."
        elif "chats.page" in name and size == 5_000:
            reference = "~2.9 ms ref."
        on_server = server.get((name, size))
        read_rows.append(
            [
                name,
                size,
                *summary(values),
                statistics.median(on_server) if on_server else "",
                reference,
            ]
        )
    read_rows.sort(key=lambda r: (r[1], r[0]))
    print(
        infra.table(
            [
                "last 50 messages (ms)",
                "messages",
                "runs",
                "median",
                "p50",
                "p99",
                "min",
                "max",
                "server ms",
                "ref.",
            ],
            read_rows,
        )
    )
    print()
    walk_rows = [
        [name, size, walked[(name, size)], *summary(values)]
        for (name, size), values in sorted(reads.items(), key=lambda kv: (kv[0][1], kv[0][0]))
        if "whole transcript" in name
    ]
    print(
        infra.table(
            [
                "paged transcript (ms per walk)",
                "messages",
                "rows",
                "runs",
                "median",
                "p50",
                "p99",
                "min",
                "max",
            ],
            walk_rows,
        )
    )
    print()
    write_rows = []
    for (name, size), (times, wal, plan_wal) in sorted(
        writes.items(), key=lambda kv: (kv[0][1], kv[0][0])
    ):
        reference = ""
        if size == 5_000 and name.startswith("JSONB"):
            reference = "~175 ms, ~8.5 MB ref."
        elif size == 5_000 and name.startswith("one row"):
            reference = "~0.6 ms, ~4.5 KB ref."
        if failed.get((name, size)):
            reference = f"{failed[(name, size)]} FAILED (worker statement timeout)"
        write_rows.append(
            [
                name,
                size,
                *summary(times),
                round(statistics.median(wal)) if wal else "",
                min(wal) if wal else "",
                round(statistics.median(plan_wal)) if plan_wal else "",
                reference,
            ]
        )
    print(
        infra.table(
            [
                "one append (ms; WAL bytes)",
                "messages",
                "runs",
                "median",
                "p50",
                "p99",
                "min",
                "max",
                "WAL median",
                "WAL min",
                "WAL (EXPLAIN)",
                "ref.",
            ],
            write_rows,
        )
    )
    print()

    def median(name: str, size: int) -> float:
        return statistics.median(reads[(name, size)])

    table_name = next(n for n, _ in reads if n.startswith("table:"))
    jsonb_names = [
        n for n, _ in {k: 0 for k in reads} if n.startswith("JSONB:") and "whole" not in n
    ]
    fastest = min(jsonb_names, key=lambda n: median(n, 5_000))
    faster = median(fastest, 5_000) / median(table_name, 5_000)
    flat = median(table_name, 5_000) / median(table_name, 100)
    raw_table, raw_jsonb = (
        "raw psycopg, table: messages.page's SQL",
        "raw psycopg, JSONB: jsonb_path_query_array (one value)",
    )
    raw_agg = "raw psycopg, table: the page as one jsonb_agg value"
    raw_faster = median(raw_jsonb, 5_000) / median(raw_table, 5_000)
    raw_flat = median(raw_table, 5_000) / median(raw_table, 100)
    server_faster = statistics.median(server[(fastest, 5_000)]) / statistics.median(
        server[(table_name, 5_000)]
    )
    service_jsonb = "JSONB: chats.page (jsonpath slice, rows)"
    jsonb_5k = writes[("JSONB append (chats.append, messages || ...)", 5_000)]
    row_5k = writes[("one row insert (guarded upsert)", 5_000)]
    ratio_rows = [
        [
            f"last-50 at 5,000: fastest JSONB ({fastest.split(': ')[1]}) / table",
            f"{faster:.2f}x",
            f">= {TARGET_FASTER}x",
            "met" if faster >= TARGET_FASTER else f"MISSED by {1 - faster / TARGET_FASTER:.0%}",
        ],
        [
            "last-50 from the table: 5,000 / 100 messages",
            f"{flat:.2f}x",
            f"<= {TARGET_FLAT}x",
            "met" if flat <= TARGET_FLAT else f"MISSED by {flat / TARGET_FLAT - 1:.0%}",
        ],
        [
            "  the same without SQLAlchemy (raw psycopg): JSONB / table at 5,000",
            f"{raw_faster:.2f}x",
            f">= {TARGET_FASTER}x",
            "met" if raw_faster >= TARGET_FASTER else "missed",
        ],
        [
            "  the same without SQLAlchemy (raw psycopg): table 5,000 / 100",
            f"{raw_flat:.2f}x",
            f"<= {TARGET_FLAT}x",
            "met" if raw_flat <= TARGET_FLAT else "missed",
        ],
        [
            "  raw psycopg, JSONB / table page as one jsonb_agg value, at 5,000",
            f"{median(raw_jsonb, 5_000) / median(raw_agg, 5_000):.2f}x",
            f">= {TARGET_FASTER}x",
            "met"
            if median(raw_jsonb, 5_000) / median(raw_agg, 5_000) >= TARGET_FASTER
            else "missed",
        ],
        [
            "  server execution time only: fastest JSONB / table at 5,000",
            f"{server_faster:.1f}x",
            f">= {TARGET_FASTER}x",
            "met" if server_faster >= TARGET_FASTER else "missed",
        ],
        [
            "  the service's JSONB page (chats.page) / table at 5,000",
            f"{median(service_jsonb, 5_000) / median(table_name, 5_000):.1f}x",
            "",
            "",
        ],
        [
            "append at 5,000: JSONB / row insert (ms)",
            f"{statistics.median(jsonb_5k[0]) / statistics.median(row_5k[0]):.0f}x",
            "ref. ~290x",
            "",
        ],
        [
            "append at 5,000: JSONB / row insert (WAL, EXPLAIN)",
            f"{statistics.median(jsonb_5k[2]) / max(1, statistics.median(row_5k[2])):.0f}x"
            if jsonb_5k[2] and row_5k[2]
            else "",
            "ref. ~1,900x",
            "",
        ],
    ]
    print(infra.table(["ratio (medians, same run)", "measured", "target", "outcome"], ratio_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
