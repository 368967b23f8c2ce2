"""The bulk passes at scale, per message: the fleet backfill and the chunked full reconcile with
1 and 2 worker processes, and the sweep's and `status`'s time with every chat in sync, at each
size given (default: the 580 k reference and 100 k chats x 10 M messages). Prints the figures,
the large-vs-small per-message ratio (target <= 1.3: linear) and the 2-vs-1 worker speed-up.

    .venv/bin/python -m bench.scale [--scales 1.0,17.233] [--chunk-chats 200] [--quick]

Scale 1.0 is bench/dataset.py's reference (5,800 chats, 580,300 messages); 17.233 is ~100 k
chats and ~10 M messages. Each size loads its data at revision 0001, then runs, in order:

- `alembic upgrade head` with BACKFILL_ON_WORKERS (the time it takes to return);
- the copy by one worker process (`-c 1`, BULK_MAX_CONCURRENT_CHUNKS=1), then again by two
  (cap 2) after emptying the table, then again by the upgrade's own single-process backfill
  (the reference of the same run);
- `python -m app reconcile`'s code in this process, the first full read after the copy (the
  cold figure; it leaves the cache warm for what follows);
- a rolling reconcile pass over every chat (RECONCILE_FULL_DAYS=1) by one worker, then by two,
  then `python -m app reconcile`'s code in this process again (the reference);
- in sync: the sweep (in process) and `python -m app status` (a process, as an operator runs it).

A pass's time is from its first chunk's start to its last chunk's end.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from datetime import timedelta
from typing import Any

from sqlalchemy import create_engine

from app.broker import producer
from app.db import transaction
from app.services import reconcile as reconcile_service
from app.services import sync
from app.settings import Settings
from bench import dataset, infra
from harness.processes import RedisServer, WorkerProcess
from migrations import backfill

REFERENCE_SCALE = 1.0
TARGET_LINEAR = 1.3


def _passes_done(url: str, kind: str, pass_id: int) -> bool:
    return bool(
        infra.scalar(
            url,
            "SELECT state = 'finished' FROM dualwrite_bulk_passes WHERE id = %s AND kind = %s",
            (pass_id, kind),
        )
    )


def _pass_seconds(url: str, pass_id: int) -> tuple[float, int, int]:
    """(seconds from first chunk start to last chunk end, chats, rows) of a pass."""
    with_row = infra.scalar(
        url,
        "SELECT json_build_array(extract(epoch FROM max(finished_at) - min(started_at)), "
        "sum(chats), sum(rows)) FROM dualwrite_bulk_chunks WHERE pass_id = %s",
        (pass_id,),
    )
    seconds, chats, rows = with_row
    return float(seconds), int(chats), int(rows)


def _chunks(url: str, pass_id: int) -> str:
    """What a pass that counted wrong did, chunk by chunk, and every pass beside it."""
    return str(
        infra.scalar(
            url,
            "SELECT json_build_object("
            "'pass', %s::bigint, "
            "'table_rows', (SELECT count(*) FROM copilot_chat_messages), "
            "'passes', (SELECT json_agg(p ORDER BY p.id) FROM dualwrite_bulk_passes p), "
            "'chunks', (SELECT json_agg(json_build_object('pass', c.pass_id, 'n', c.ordinal, "
            "'state', c.state, 'attempts', c.attempts, 'chats', c.chats, 'rows', c.rows, "
            "'worker', c.worker, 'error', c.error, 'started', c.started_at, "
            "'finished', c.finished_at) ORDER BY c.pass_id, c.ordinal) "
            "FROM dualwrite_bulk_chunks c))",
            (pass_id,),
        )
    )


def _reconcile_passes(url: str) -> int:
    return int(
        infra.scalar(url, "SELECT count(*) FROM dualwrite_bulk_passes WHERE kind = 'reconcile'")
    )


def _last_pass(url: str, kind: str) -> int:
    return int(
        infra.scalar(url, "SELECT max(id) FROM dualwrite_bulk_passes WHERE kind = %s", (kind,))
    )


class Fleet:
    """N maintenance worker processes (`-c 1` each) on the bench's broker and database."""

    def __init__(self, env: dict[str, str], workers: int, tag: str) -> None:
        self.processes = [
            WorkerProcess(
                env,
                infra.OUT / f"scale-{tag}-{n}-{os.getpid()}.log",
                f"scale-{tag}-{n}-{os.getpid()}",
                "-c",
                "1",
            )
            for n in range(workers)
        ]

    def __enter__(self) -> Fleet:
        for process in self.processes:
            process.start()
        return self

    def __exit__(self, *_: Any) -> None:
        for process in self.processes:
            process.stop()


def _cli(env: dict[str, str], *args: str) -> tuple[float, subprocess.CompletedProcess[str]]:
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "app", *args],
        cwd=infra.ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return time.perf_counter() - started, result


def _reset_copy(url: str) -> None:
    """Back to the state the upgrade left: nothing copied, the backfill not finished."""
    infra.scalar(
        url,
        "TRUNCATE copilot_chat_messages, copilot_chat_sync_state; "
        "DELETE FROM dualwrite_bulk_passes; "
        "UPDATE dualwrite_backfill SET finished_at = NULL, cursor = NULL, chats_done = 0, "
        "rows_copied = 0, bad_elements = 0, bad_chats = 0",
    )
    infra.scalar(url, "VACUUM ANALYZE copilot_chat_messages")


def _reconcile_in_process(url: str) -> float:
    """Seconds `python -m app reconcile`'s code takes over every chat, in this process."""
    with infra.sessions(url, worker=True, pool_size=2) as factory:
        began = time.perf_counter()
        ran = reconcile_service.reconcile(factory, batch_size=200, trigger="bench")
        took = time.perf_counter() - began
    assert ran is not None and ran.drift == 0, ran
    return took


def one_size(scale: float, chunk_chats: int, timeout: float) -> dict[str, float]:
    shape = dataset.shape(scale)
    figures: dict[str, float] = {}
    with infra.database("bench_scale", revision="0001") as url:
        loaded = dataset.load(url, shape)
        print(
            f"\nscale {scale}: loaded {loaded.chats:,} chats, {loaded.messages:,} messages "
            f"in {loaded.seconds:.0f}s",
            flush=True,
        )
        figures["messages"] = loaded.messages
        figures["chats"] = loaded.chats
        broker = RedisServer().start()
        try:
            base = {
                **os.environ,
                "DATABASE_URL": url,
                "REDIS_URL": broker.url,
                "BULK_CHUNK_CHATS": str(chunk_chats),
                "BACKFILL_ON_WORKERS": "true",
                "RECONCILE_FULL_DAYS": "1",
            }
            started = time.perf_counter()
            upgrade = subprocess.run(
                [sys.executable, "-m", "alembic", "upgrade", "head"],
                cwd=infra.ROOT,
                env={**base, "BULK_MAX_CONCURRENT_CHUNKS": "1"},
                capture_output=True,
                text=True,
            )
            assert upgrade.returncode == 0, upgrade.stderr
            figures["upgrade_seconds"] = time.perf_counter() - started
            print(f"  upgrade head returned in {figures['upgrade_seconds']:.1f}s", flush=True)

            for workers in (1, 2):
                env = {**base, "BULK_MAX_CONCURRENT_CHUNKS": str(workers)}
                if workers == 2:
                    _reset_copy(url)
                with Fleet(env, workers, f"backfill{workers}"):
                    if workers == 2:
                        _, resumed = _cli(env, "backfill", "resume")
                        assert resumed.returncode == 0, resumed.stderr
                    else:
                        _, resumed = _cli(env, "backfill", "resume")  # queued by the upgrade
                    pass_id = _last_pass(url, "backfill")
                    infra.wait_until(
                        lambda: _passes_done(url, "backfill", pass_id),  # noqa: B023
                        timeout,
                        1.0,
                        what=f"the backfill with {workers} workers",
                    )
                seconds, chats, rows = _pass_seconds(url, pass_id)
                assert chats == loaded.chats and rows == loaded.messages, _chunks(url, pass_id)
                figures[f"backfill_{workers}"] = seconds
                print(
                    f"  backfill, {workers} worker(s): {seconds:.1f}s, "
                    f"{rows / seconds:,.0f} messages/s",
                    flush=True,
                )
            # The reference, same data, same machine, same moment: the migration's own
            # single-process backfill.
            _reset_copy(url)
            engine = create_engine(
                url.replace("postgresql://", "postgresql+psycopg://"),
                connect_args={"options": "-c timezone=UTC"},
            )
            try:
                began = time.perf_counter()
                state = backfill.run(engine, backfill.Config())
                figures["backfill_ref"] = time.perf_counter() - began
            finally:
                engine.dispose()
            assert state.rows_copied == loaded.messages, state.rows_copied
            # What the table costs on disk per message (heap, TOAST and its indexes).
            figures["bytes_per_message"] = (
                infra.scalar(url, "SELECT pg_total_relation_size('copilot_chat_messages')")
                / loaded.messages
            )
            print(
                f"  reference: the upgrade's own backfill, one process: "
                f"{figures['backfill_ref']:.1f}s, {loaded.messages / figures['backfill_ref']:,.0f} "
                "messages/s",
                flush=True,
            )
            infra.scalar(url, "VACUUM ANALYZE copilot_chat_messages")
            infra.scalar(url, "VACUUM ANALYZE copilot_chat_sync_state")
            # The first full read after the copy finds the older part of the table out of the
            # cache (the copy wrote it in chat id order, the newest pages are cached): timed as
            # the cold figure, it also warms the cache, so that each pass below reads the same
            # warm cache instead of the first one paying for all of them.
            figures["reconcile_cold"] = _reconcile_in_process(url)
            print(
                f"  cold: the first full reconcile after the copy, one process: "
                f"{figures['reconcile_cold']:.1f}s, "
                f"{loaded.messages / figures['reconcile_cold']:,.0f} messages/s",
                flush=True,
            )

            for workers in (1, 2):
                env = {**base, "BULK_MAX_CONCURRENT_CHUNKS": str(workers)}
                with Fleet(env, workers, f"reconcile{workers}"):
                    producer(Settings(redis_url=broker.url)).send_task(
                        "chats.reconcile", kwargs={"rolling": True}
                    )
                    infra.wait_until(
                        lambda: _reconcile_passes(url) == workers,  # noqa: B023
                        60,
                        0.2,
                        what="the rolling pass to start",
                    )
                    pass_id = _last_pass(url, "reconcile")
                    infra.wait_until(
                        lambda: _passes_done(url, "reconcile", pass_id),  # noqa: B023
                        timeout,
                        1.0,
                        what=f"the reconcile with {workers} workers",
                    )
                seconds, chats, rows = _pass_seconds(url, pass_id)
                drift = infra.scalar(
                    url,
                    "SELECT sum(inserted + updated + soft_deleted) FROM dualwrite_bulk_chunks "
                    "WHERE pass_id = %s",
                    (pass_id,),
                )
                assert chats >= loaded.chats and drift == 0, (chats, drift)
                figures[f"reconcile_{workers}"] = seconds
                print(
                    f"  reconcile, {workers} worker(s): {seconds:.1f}s, "
                    f"{rows / seconds:,.0f} messages/s",
                    flush=True,
                )

            figures["reconcile_ref"] = _reconcile_in_process(url)
            print(
                f"  reference: `python -m app reconcile`'s code, one process: "
                f"{figures['reconcile_ref']:.1f}s, "
                f"{loaded.messages / figures['reconcile_ref']:,.0f} messages/s",
                flush=True,
            )
            with infra.sessions(url) as factory:
                times = []
                for _ in range(5):
                    began = time.perf_counter()
                    with transaction(factory) as session:
                        due = sync.sweep(
                            session, grace=timedelta(0), ttl=timedelta(minutes=2), limit=5000
                        )
                    times.append(time.perf_counter() - began)
                    assert not due
            figures["sweep"] = statistics.median(times)
            status_times = []
            for _ in range(3):
                took, shown = _cli(base, "status")
                assert shown.returncode == 0, shown.stderr
                status_times.append(took)
            figures["status"] = statistics.median(status_times)
            # What an interpreter and the CLI's imports cost alone, to tell from status's queries.
            figures["cli_start"] = statistics.median(_cli(base, "--help")[0] for _ in range(3))
            print(
                f"  in sync: sweep {figures['sweep'] * 1000:.1f} ms, "
                f"status {figures['status']:.2f}s (a bare `--help`: {figures['cli_start']:.2f}s)",
                flush=True,
            )
        finally:
            broker.stop()
    return figures


def report(results: dict[float, dict[str, float]]) -> None:
    rows: list[list[Any]] = []
    for scale, f in results.items():
        per = f["messages"]
        rows.append(
            [
                scale,
                f"{int(f['chats']):,}",
                f"{int(per):,}",
                f"{f['upgrade_seconds']:.1f}",
                *(
                    f"{f[k] / per * 1e6:.1f}"
                    for k in (
                        "backfill_ref",
                        "backfill_1",
                        "backfill_2",
                        "reconcile_cold",
                        "reconcile_ref",
                        "reconcile_1",
                        "reconcile_2",
                    )
                ),
                f"{f['backfill_1'] / f['backfill_2']:.2f}x",
                f"{f['reconcile_1'] / f['reconcile_2']:.2f}x",
                f"{f['sweep'] * 1000:.1f}",
                f"{f['status']:.2f}",
                f"{f['cli_start']:.2f}",
                f"{f['bytes_per_message']:,.0f}",
            ]
        )
    infra.show(
        "Per message (microseconds; a pass from its first chunk's start to its last's end; ref: "
        "the same work in one process, the upgrade's backfill and `python -m app reconcile`)",
        [
            "scale",
            "chats",
            "messages",
            "upgrade s",
            "backfill ref",
            "backfill 1w",
            "backfill 2w",
            "reconcile cold",
            "reconcile ref",
            "reconcile 1w",
            "reconcile 2w",
            "2w/1w backfill",
            "2w/1w reconcile",
            "sweep ms",
            "status s",
            "--help s",
            "table B/msg",
        ],
        rows,
    )
    scales = sorted(results)
    if len(scales) >= 2:
        small, large = results[scales[0]], results[scales[-1]]
        figure_rows = []
        for key, what in (
            ("backfill_1", "backfill, 1 worker"),
            ("backfill_2", "backfill, 2 workers"),
            ("reconcile_cold", "reconcile, first after the copy (cold cache), 1 process"),
            ("reconcile_1", "reconcile, 1 worker"),
            ("reconcile_2", "reconcile, 2 workers"),
        ):
            ratio = (large[key] / large["messages"]) / (small[key] / small["messages"])
            figure_rows.append(
                [
                    f"{what}: large / small per message",
                    f"{ratio:.2f}",
                    f"scale {scales[0]}",
                    f"<= {TARGET_LINEAR}",
                    infra.verdict(ratio, TARGET_LINEAR),
                ]
            )
        for key, what in (("sweep", "sweep in sync"), ("status", "status in sync")):
            ratio = large[key] / small[key]
            figure_rows.append(
                [
                    f"{what}: large / small",
                    f"{ratio:.2f}",
                    f"scale {scales[0]}",
                    "~1 (flat)",
                    infra.verdict(ratio, TARGET_LINEAR),
                ]
            )
        infra.show("Large against small", infra.FIGURE, figure_rows)
    infra.write_csv(
        "scale.csv",
        ["scale", *sorted(next(iter(results.values())))],
        [[s, *(f[k] for k in sorted(f))] for s, f in results.items()],
    )


def main() -> int:
    args = infra.options(
        __doc__,
        {"scales": "0.01,0.02", "chunk_chats": 20, "timeout": 300.0},
        scales=(f"{REFERENCE_SCALE},17.233", "comma-separated dataset scales"),
        chunk_chats=(200, "chats per chunk (BULK_CHUNK_CHATS)"),
        timeout=(7200.0, "seconds a pass may take"),
    )
    scales = [float(s) for s in args.scales.split(",")]
    results = {scale: one_size(scale, args.chunk_chats, args.timeout) for scale in scales}
    report(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
