"""The expand migration on the reference data set (revision 0001 data), in the same run:

  (a) today's inline backfill, for reference: the DDL and the whole copy in one transaction;
  (b) `alembic upgrade head` while a client keeps appending to random chats with plain SQL,
      as the previous release would: the longest wait of any of its statements, and the total
      time against (a);
  (c) the same upgrade killed halfway through its backfill, then run again: time to resume.

Targets: longest client statement during (b) <= 1 s; (b) <= 1.3 x (a).

    .venv/bin/python -m bench.migration [--scale 1.0] [--quick]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psycopg

from bench import dataset, infra
from migrations.backfill import INLINE

TARGET_WAIT = 1.0
TARGET_RATIO = 1.3
REVISION = infra.ROOT / "migrations" / "versions" / "0002_copilot_chat_messages.py"


def clone(template: str, name: str) -> str:
    infra.admin(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    return f"postgresql://postgres@127.0.0.1:5432/{name}"


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


class Client:
    """Appends to random chats with plain SQL, timing every statement."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.stop = threading.Event()
        self.durations: list[float] = []
        with psycopg.connect(url) as connection:
            self.chats = [r[0] for r in connection.execute("SELECT id FROM copilot_chats")]

    def run(self) -> None:
        rng = random.Random(1)
        with psycopg.connect(self.url, autocommit=True) as connection:
            while not self.stop.is_set():
                element = json.dumps([{"id": uuid.uuid4().hex, "role": "user", "content": "hi"}])
                started = time.perf_counter()
                connection.execute(
                    "UPDATE copilot_chats SET messages = messages || %s::jsonb, "
                    "updated_at = now() WHERE id = %s",
                    (element, rng.choice(self.chats)),
                )
                self.durations.append(time.perf_counter() - started)
                time.sleep(0.01)

    def measure(self, seconds: float | None, during: subprocess.Popen[bytes] | None) -> list[float]:
        """Statement durations over `seconds`, or while `during` runs."""
        start = len(self.durations)
        thread = threading.Thread(target=self.run)
        thread.start()
        if during is not None:
            during.wait()
        else:
            time.sleep(seconds or 0)
        self.stop.set()
        thread.join()
        self.stop.clear()
        return self.durations[start:]


def upgrade(url: str, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "alembic", "upgrade", "head"],
            cwd=infra.ROOT,
            env={**os.environ, "DATABASE_URL": url},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def backfilled(url: str) -> tuple[int, int]:
    """Chats done and in all by the online backfill, from its progress table."""
    if not infra.scalar(url, "SELECT to_regclass('dualwrite_backfill')"):
        return 0, 1
    done = infra.scalar(url, "SELECT array[chats_done, total_chats] FROM dualwrite_backfill")
    return (int(done[0]), int(done[1])) if done else (0, 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="of the reference data set")
    parser.add_argument("--quick", action="store_true", help="scale 0.01")
    args = parser.parse_args()
    scale = 0.01 if args.quick else args.scale
    out = infra.OUT
    out.mkdir(parents=True, exist_ok=True)

    infra.services_up()
    with infra.database("cdw_bench_migration", revision="0001") as template:
        loaded = dataset.load(template, dataset.shape(scale))
        print(f"data set: {loaded.chats:,} chats, {loaded.messages:,} messages (revision 0001)")
        base = template.rsplit("/", 1)[1]
        names = [f"{base}_{kind}" for kind in ("inline", "online", "resume")]
        try:
            inline_url, online_url, resume_url = (clone(base, name) for name in names)
            inline = inline_backfill(inline_url)

            client = Client(online_url)
            before = client.measure(3.0, None)
            started = time.perf_counter()
            process = upgrade(online_url, out / "migration-online.log")
            during = client.measure(None, process)
            online = time.perf_counter() - started
            if process.returncode != 0:
                raise SystemExit((out / "migration-online.log").read_text())

            process = upgrade(resume_url, out / "migration-killed.log")

            def halfway() -> bool:
                done, total = backfilled(resume_url)
                return done >= total / 2

            infra.wait_until(halfway, 600, what="the backfill halfway")
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            done, total = backfilled(resume_url)
            started = time.perf_counter()
            process = upgrade(resume_url, out / "migration-resumed.log")
            if process.wait() != 0:
                raise SystemExit((out / "migration-resumed.log").read_text())
            resumed = time.perf_counter() - started
        finally:
            for name in names:
                infra.admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    longest = max(during)
    print(
        infra.table(
            ["figure", "value", "reference", "target", "verdict"],
            [
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
                    f"{longest:.3f}",
                    f"{max(before):.3f} before",
                    f"<= {TARGET_WAIT}",
                    infra.verdict(longest, TARGET_WAIT),
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
                    f"{resumed:.1f}",
                    f"{resumed / online:.2f}x (b)",
                    "",
                    "",
                ],
            ],
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
