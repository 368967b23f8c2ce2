"""The copy of one append, in-process, against the chat's length: the service's sync after one
appended message (`sync.sync_chats`: claim, convergence, commit) on chats of 10 / 1,000 / 5,000
/ 20,000 messages, by the whole-chat convergence (forced) and by the copy of what was appended,
beside a single-row insert of that message (what an inline dual-write pays) on a chat of the
same length. Targets: the appended copy within 2x the row insert, and flat in the chat's length
(20,000 messages within 2x of 10). Writes bench/out/append_sync[_incompressible].csv and .png.

    .venv/bin/python -m bench.append_sync [--runs 15] [--sizes 10,1000,5000,20000]
        [--incompressible] [--quick]

The appended copy still reads the chat's stored array (one detoast, O(its stored size)): the
elements are taken from the JSONB by position. `--incompressible` shows that bound.
"""

from __future__ import annotations

import json
import secrets
import statistics
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from unittest import mock

from sqlalchemy import text
from sqlalchemy.orm import Session

from app.db import transaction
from app.repositories import chats as chats_repo
from app.repositories import messages
from app.services import sync
from bench import infra

USER = "bench"
FLAT = 2.0  # the appended copy at the largest size vs the smallest
INSERT_FACTOR = 2.0  # the appended copy vs the row insert


class ConvergeClock:
    """Wraps `messages.converge` as the sync calls it: times the convergence statement alone,
    and with `whole`, maps every chat whole (the service as before the appended copy)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._converge = messages.converge

    @contextmanager
    def patched(self, *, whole: bool) -> Iterator[None]:
        def converge(session: Session, chat_ids: Sequence[uuid.UUID], **kw: Any) -> Any:
            started = time.perf_counter()
            try:
                return self._converge(session, chat_ids, appended=not whole and kw["appended"])
            finally:
                self.seconds.append(time.perf_counter() - started)

        with mock.patch.object(messages, "converge", converge):
            yield


def create(factory: Any, size: int, *, incompressible: bool = False) -> uuid.UUID:
    elements = [infra.message(f"m{i}", "user" if i % 2 else "assistant") for i in range(size)]
    if incompressible:  # what TOAST compression cannot shrink: the whole array is read as is
        for e in elements:
            e["content"] = secrets.token_hex(infra.CONTENT_BYTES // 2)
    with transaction(factory) as session:
        chat = chats_repo.create(
            session, user_id=USER, title=None, model="gpt-4o", workflow_id=None, messages=elements
        )
    with transaction(factory) as session:
        sync.sync_chats(session, {chat.id: chat.messages_version})
    return chat.id


def timed(run: Callable[[], Any]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def append_then_sync(factory: Any, chat: uuid.UUID, n: int, *, appended: bool) -> float:
    """Seconds of the sync of one appended message (the append itself not counted); checks
    which path the sync took."""
    with transaction(factory) as session:
        written = chats_repo.append(session, chat, USER, [infra.message(f"new{n}")])
    assert written is not None

    def copy() -> None:
        with transaction(factory) as session:
            report = sync.sync_chats(session, {chat: written.version})
        assert report.inserted == 1 and report.appended == appended, report

    return timed(copy)


def insert_row(factory: Any, chat: uuid.UUID, n: int) -> float:
    element = infra.message(f"ref{n}")

    def insert() -> None:
        with transaction(factory) as session:
            session.execute(
                text(
                    """
                    INSERT INTO copilot_chat_messages
                        (chat_id, message_id, role, seq, content, created_at, source_version)
                    VALUES (:chat, :id, 'user', :seq, CAST(:content AS jsonb), now(), 0)
                    """
                ),
                {
                    "chat": chat,
                    "id": element["id"],
                    "seq": 1_000_000 + n,
                    "content": json.dumps(element),
                },
            )

    return timed(insert)


def main() -> None:
    args = infra.options(
        __doc__,
        {"runs": 3, "sizes": "10,100"},
        runs=15,
        sizes="10,1000,5000,20000",
        incompressible=(False, "random message contents (the array is stored uncompressed)"),
    )
    sizes = [int(s) for s in args.sizes.split(",")]
    results: list[list[Any]] = []
    with infra.database("bench_append") as url, infra.sessions(url, worker=True) as factory:
        for size in sizes:
            whole_chat, appended_chat, reference = (
                create(factory, size, incompressible=args.incompressible) for _ in range(3)
            )
            # Statistics for the grown tables, as a production database has: a plan cached on
            # the connection while the tables were small is planned again (without, both
            # paths read every row of the chat through it until autovacuum gets there).
            with transaction(factory) as session:
                session.execute(text("ANALYZE copilot_chat_messages, copilot_chats"))
            samples: dict[str, list[float]] = {}
            for n in range(args.runs + 1):  # the first round warms up
                taken: dict[str, float] = {}
                for name, chat, whole in (
                    ("whole", whole_chat, True),
                    ("appended", appended_chat, False),
                ):
                    clock = ConvergeClock()
                    with clock.patched(whole=whole):
                        taken[name] = append_then_sync(factory, chat, n, appended=not whole)
                    taken[f"{name} statement"] = clock.seconds[0]
                taken["insert"] = insert_row(factory, reference, n)
                for name, seconds in taken.items():
                    if n:
                        samples.setdefault(name, []).append(seconds)
            ms = {k: statistics.median(v) * 1000 for k, v in samples.items()}
            drift = sum(c.drift for c in _diff(factory, [whole_chat, appended_chat]))
            results.append(
                [
                    size,
                    ms["whole"],
                    ms["whole statement"],
                    ms["appended"],
                    ms["appended statement"],
                    ms["insert"],
                    ms["appended"] / ms["insert"],
                    drift,
                ]
            )
            print(f"{size:>6} messages: done", flush=True)
    headers = [
        "messages",
        "whole: sync ms",
        "(its convergence)",
        "appended: sync ms",
        "(its convergence)",
        "row insert ms",
        "appended sync / insert",
        "drift after",
    ]
    infra.show(
        f"Sync of one appended message (claim, convergence, commit), p50 of {args.runs} runs",
        headers,
        results,
    )
    smallest, largest = results[0], results[-1]
    flat = largest[3] / smallest[3]
    worst = max(row[6] for row in results)
    inserts = [r[5] for r in results]
    infra.show(
        "Targets",
        infra.FIGURE,
        [
            [
                f"appended sync, {largest[0]:,} vs {smallest[0]:,} messages",
                f"{flat:.2f}x",
                f"whole-chat: {largest[1] / smallest[1]:.1f}x",
                f"<= {FLAT}x",
                infra.verdict(flat, FLAT),
            ],
            [
                "appended sync vs row insert, worst size",
                f"{worst:.2f}x",
                f"row insert {min(inserts):.2f}-{max(inserts):.2f} ms",
                f"<= {INSERT_FACTOR}x",
                infra.verdict(worst, INSERT_FACTOR),
            ],
            [
                "drift after the runs (rows vs JSONB)",
                str(sum(r[7] for r in results)),
                "",
                "0",
                "met" if not any(r[7] for r in results) else "MISSED",
            ],
        ],
    )
    name = "append_sync_incompressible" if args.incompressible else "append_sync"
    infra.write_csv(f"{name}.csv", headers, results)

    def draw(ax: Any) -> None:
        xs = [r[0] for r in results]
        ax.plot(xs, [r[1] for r in results], "o-", label="sync, whole-chat convergence")
        ax.plot(xs, [r[3] for r in results], "o-", label="sync, copy of what was appended")
        ax.plot(xs, [r[4] for r in results], "o:", label="(the appended copy's statement)")
        ax.plot(xs, [r[5] for r in results], "o--", label="single-row insert (reference)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("messages in the chat")
        ax.set_ylabel("ms per append (p50)")
        ax.set_title("Copy of one append vs the chat's length")

    infra.plot(infra.OUT / f"{name}.png", draw)


def _diff(factory: Any, chat_ids: list[uuid.UUID]) -> list[messages.ChatCounts]:
    with transaction(factory) as session:
        return messages.diff(session, chat_ids)


if __name__ == "__main__":
    main()
