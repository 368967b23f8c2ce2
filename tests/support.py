"""Test helpers: an independent model of the element-to-row mapping and waits on it; the process
launchers come from `harness.processes`."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from harness.processes import WorkerProcess as WorkerProcess
from harness.processes import wait_until as wait_until

if TYPE_CHECKING:
    from fastapi.testclient import TestClient

ROOT = Path(__file__).resolve().parent.parent

# What the shared fixtures of `conftest.py` hand to a test.
SessionFactory = sessionmaker[Session]
SetPhase = Callable[[str], None]


class AuthHeaders(Protocol):
    def __call__(self, user: str = "alice", admin: bool = False) -> dict[str, str]: ...


class WaitConverged(Protocol):
    def __call__(self, *chat_ids: object, timeout: float = 30.0) -> None: ...


# ---------------------------------------------------------------------------------------------
# The mapping, written again in plain Python from DESIGN section 2, to check the SQL against.


@dataclass(frozen=True)
class Row:
    seq: int
    role: str
    content: Any
    stream_id: str | None
    model: str | None
    created_at: datetime


def parse_timestamp(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def expected_rows(messages: Any, chat_created_at: datetime) -> dict[str, Row]:
    """What the live rows of a chat must be, by message id."""
    rows: dict[str, Row] = {}
    if not isinstance(messages, list):
        return rows
    for position, element in enumerate(messages):
        if not isinstance(element, dict):
            continue
        message_id = element.get("id")
        if not isinstance(message_id, str) or not message_id:
            continue
        if len(message_id.encode()) > 1024 or message_id in rows:
            continue
        role = element.get("role")
        stream = element.get("streamId")
        model = element.get("model")
        rows[message_id] = Row(
            seq=position,
            role=role if isinstance(role, str) else "unknown",
            content=element,
            stream_id=stream if isinstance(stream, str) else None,
            model=model if isinstance(model, str) else None,
            created_at=parse_timestamp(element.get("timestamp")) or chat_created_at,
        )
    return rows


def table_rows(engine: Engine, chat_id: uuid.UUID | str) -> tuple[dict[str, Row], set[str]]:
    """The live rows of a chat by message id, and the ids of its soft-deleted rows."""
    with engine.connect() as connection:
        result = connection.execute(
            text(
                "SELECT message_id, seq, role, content, stream_id, model, created_at, deleted_at "
                "FROM copilot_chat_messages WHERE chat_id = :id"
            ),
            {"id": str(chat_id)},
        ).all()
    live = {
        r.message_id: Row(r.seq, r.role, r.content, r.stream_id, r.model, r.created_at)
        for r in result
        if r.deleted_at is None
    }
    deleted = {r.message_id for r in result if r.deleted_at is not None}
    return live, deleted


def chat_jsonb(engine: Engine, chat_id: uuid.UUID | str) -> tuple[Any, datetime] | None:
    with engine.connect() as connection:
        row = connection.execute(
            text("SELECT messages, created_at FROM copilot_chats WHERE id = :id"),
            {"id": str(chat_id)},
        ).one_or_none()
    return (row.messages, row.created_at) if row else None


def mismatch(engine: Engine, chat_id: uuid.UUID | str) -> str | None:
    """Why the rows of a chat differ from its JSONB, or None when they are equal."""
    chat = chat_jsonb(engine, chat_id)
    live, _ = table_rows(engine, chat_id)
    if chat is None:
        return f"chat is gone but {len(live)} rows remain" if live else None
    expected = expected_rows(*chat)
    if set(live) != set(expected):
        return f"ids differ: missing {set(expected) - set(live)}, extra {set(live) - set(expected)}"
    for message_id, row in expected.items():
        if live[message_id] != row:
            return f"row {message_id!r} differs: {live[message_id]} != {row}"
    return None


def assert_converged(engine: Engine, chat_ids: Iterable[uuid.UUID | str]) -> None:
    for chat_id in chat_ids:
        problem = mismatch(engine, chat_id)
        assert problem is None, f"chat {chat_id}: {problem}"


def wait_converged(
    engine: Engine, chat_ids: Iterable[uuid.UUID | str], timeout: float = 30.0
) -> None:
    """Wait until every chat's rows equal its JSONB and its sync state is up to date."""
    ids = [str(c) for c in chat_ids]

    def done() -> bool:
        with engine.connect() as connection:
            behind = connection.execute(
                text(
                    "SELECT count(*) FROM copilot_chat_sync_state "
                    "WHERE chat_id = ANY(CAST(:ids AS uuid[])) AND applied_version < wanted_version"
                ),
                {"ids": ids},
            ).scalar_one()
        return behind == 0 and all(mismatch(engine, c) is None for c in ids)

    try:
        wait_until(done, timeout=timeout, interval=0.1)
    except AssertionError:
        assert_converged(engine, ids)  # names the chat and the row that differ
        raise


def snapshot(engine: Engine, chat_id: uuid.UUID | str) -> dict[str, Any]:
    """The whole chat row, byte for byte (JSONB as text), for "nothing changed" assertions."""
    with engine.connect() as connection:
        row = (
            connection.execute(
                text("SELECT *, messages::text AS raw FROM copilot_chats WHERE id = :id"),
                {"id": str(chat_id)},
            )
            .mappings()
            .one()
        )
    return dict(row)


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def read_terminal(controller: int) -> bytes:
    """Everything a process wrote to a pseudo-terminal, until it closed; closes our end."""
    shown = b""
    while True:
        try:
            chunk = os.read(controller, 4096)
        except OSError:  # the terminal closed with the process
            break
        if not chunk:
            break
        shown += chunk
    os.close(controller)
    return shown


def app_state(client: TestClient) -> Any:
    """The `state` of the app behind a test client (its engine, publisher, gates)."""
    return cast(Any, client.app).state
