"""The expand migration on the reference data set (revision 0001 data), in one run: (a) the old
inline backfill, DDL and copy in one transaction; (b) `alembic upgrade head` while a client
appends to random chats with plain SQL (its longest statement, and the time against (a));
(c) the upgrade killed halfway through its backfill, then run again. Targets: longest client
statement during (b) <= 1 s; (b) <= 1.3 x (a).

    .venv/bin/python -m bench.migration [--scale 1.0] [--quick]
"""

from __future__ import annotations

import importlib.util
import json
import random
import sys
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import psycopg

from bench import dataset, infra
from harness.processes import UpgradeProcess
from migrations.backfill import INLINE

TARGET_WAIT = 1.0
TARGET_RATIO = 1.3
REVISION = infra.ROOT / "migrations" / "versions" / "0002_copilot_chat_messages.py"


def inline_backfill(url: str) -> float:
    """(a): revision 0002's schema and the whole copy in one transaction, as it used to run."""
    spec = importlib.util.spec_from_file_location("revision_0002", REVISION)
    assert spec is not None and spec.loader is not None
    revision = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(revision)
    started = time.perf_counter()
    with psycopg.connect(url) as connection:
        connection.execute("SET timezone = 'UTC'")
        for statement in [
            revision.PARSE_TIMESTAMP,
            revision.VERSION_COLUMN,
            revision.MESSAGES_TABLE,
            *revision.MESSAGES_INDEXES,
            revision.SYNC_STATE_TABLE,
            revision.SYNC_STATE_INDEX,
            INLINE,
            "INSERT INTO copilot_chat_sync_state (chat_id, wanted_version, applied_version, "
            "synced_at) SELECT id, messages_version, messages_version, now() FROM copilot_chats",
        ]:
            connection.execute(statement)
    return time.perf_counter() - started


def appending(url: str, during: Callable[[], Any]) -> list[float]:
    """Seconds per append of a client to random chats, with plain SQL, while `during()` runs."""
    durations: list[float] = []
    stop = threading.Event()

    def client() -> None:
        rng = random.Random(1)
        with psycopg.connect(url, autocommit=True) as connection:
            chats = [r[0] for r in connection.execute("SELECT id FROM copilot_chats")]
            while not stop.is_set():
                element = json.dumps([{"id": uuid.uuid4().hex, "role": "user", "content": "hi"}])
                started = time.perf_counter()
                connection.execute(
                    "UPDATE copilot_chats SET messages = messages || %s::jsonb, "
                    "updated_at = now() WHERE id = %s",
                    (element, rng.choice(chats)),
                )
                durations.append(time.perf_counter() - started)
                time.sleep(0.01)

    thread = threading.Thread(target=client)
    thread.start()
    try:
        during()
    finally:
        stop.set()
        thread.join()
    return durations


def upgraded(url: str, log: str) -> None:
    """`alembic upgrade head` run to its end; the run stops if it fails."""
    process = UpgradeProcess(url, infra.OUT / log).start()
    if process.wait() != 0:
        raise SystemExit(process.log())


def backfilled(url: str) -> tuple[int, int]:
    """Chats done and in all by the online backfill, from its progress table."""
    if not infra.scalar(url, "SELECT to_regclass('dualwrite_backfill')"):
        return 0, 1
    done = infra.scalar(url, "SELECT array[chats_done, total_chats] FROM dualwrite_backfill")
    return (int(done[0]), int(done[1])) if done else (0, 1)


def measure(inline_url: str, online_url: str, resume_url: str) -> dict[str, Any]:
    """(a), (b) with the client's statements before and during it, and (c)."""
    out: dict[str, Any] = {"inline": inline_backfill(inline_url)}
    out["before"] = appending(online_url, lambda: time.sleep(3.0))
    started = time.perf_counter()
    out["during"] = appending(online_url, lambda: upgraded(online_url, "migration-online.log"))
    out["online"] = time.perf_counter() - started

    def halfway() -> bool:
        done, total = backfilled(resume_url)
        return done >= total / 2

    killed = UpgradeProcess(resume_url, infra.OUT / "migration-killed.log").start()
    infra.wait_until(halfway, 600, what="the backfill halfway")
    killed.kill()
    out["killed at"] = backfilled(resume_url)
    started = time.perf_counter()
    upgraded(resume_url, "migration-resumed.log")
    out["resumed"] = time.perf_counter() - started
    return out


def report(out: dict[str, Any]) -> None:
    inline, online, during, before = out["inline"], out["online"], out["during"], out["before"]
    done, total = out["killed at"]
    rows = [
        ["(a) inline backfill, one transaction (s)", f"{inline:.1f}", "", "", ""],
        [
            "(b) alembic upgrade head, online (s)",
            f"{online:.1f}",
            f"{online / inline:.2f}x (a)",
            f"<= {TARGET_RATIO}x",
            infra.verdict(online / inline, TARGET_RATIO),
        ],
        [
            "client: longest statement during (b) (s)",
            f"{max(during):.3f}",
            f"{max(before):.3f} before",
            f"<= {TARGET_WAIT}",
            infra.verdict(max(during), TARGET_WAIT),
        ],
        [
            "client: p99 during (b) (ms)",
            f"{infra.percentile(during, 99) * 1000:.1f}",
            f"{infra.percentile(before, 99) * 1000:.1f} before",
            "",
            "",
        ],
        ["client: statements during (b)", f"{len(during):,}", "", "", ""],
        [
            f"(c) resume after a kill at {done:,}/{total:,} chats (s)",
            f"{out['resumed']:.1f}",
            f"{out['resumed'] / online:.2f}x (b)",
            "",
            "",
        ],
    ]
    print(infra.table(["figure", "value", "reference", "target", "verdict"], rows))


def main() -> int:
    args = infra.options(__doc__, {"scale": 0.01}, scale=(1.0, "of the reference data set"))
    with infra.database("cdw_bench_migration", revision="0001") as template:
        loaded = dataset.load(template, dataset.shape(args.scale))
        print(f"data set: {loaded.chats:,} chats, {loaded.messages:,} messages (revision 0001)")
        with (
            infra.database("cdw_bench_migration_inline", template=template) as inline_url,
            infra.database("cdw_bench_migration_online", template=template) as online_url,
            infra.database("cdw_bench_migration_resume", template=template) as resume_url,
        ):
            out = measure(inline_url, online_url, resume_url)
    report(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
