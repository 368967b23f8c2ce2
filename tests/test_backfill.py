"""The backfill in migration 0002, on messy legacy data, in a database of its own."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from types import ModuleType
from typing import Any

import psycopg
import pytest
from sqlalchemy import create_engine, text

from migrations.backfill import INLINE
from tests.conftest import RUN_ID, alembic, create_database, drop_database
from tests.support import ROOT, expected_rows, mismatch, table_rows

CHAT_CREATED = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)


def msg(id_: object, role: str = "user", **extra: object) -> dict[str, object]:
    return {"id": id_, "role": role, "content": f"content of {id_}", **extra}


LEGACY: dict[str, Any] = {
    "duplicates": [
        msg("a", timestamp="2025-01-01T00:00:00Z"),
        msg("b", "assistant"),
        {**msg("a"), "content": "second a loses"},
        msg("c"),
    ],
    "bad elements": [
        "a bare string",
        None,
        42,
        [msg("nested")],
        {"role": "user", "content": "no id"},
        msg(7),
        msg(""),
        msg(None),
        msg("x" * 1100),  # longer than an index entry may be
        msg("kept", contentBlocks=[{"type": "text"}], fileAttachments=[], requestId="r1"),
    ],
    "timestamps": [
        msg("utc", timestamp="2025-03-01T10:00:00.123Z"),
        msg("offset", timestamp="2025-03-01T12:00:00+02:00"),
        msg("naive", timestamp="2025-03-01T10:00:00"),
        msg("garbage", timestamp="yesterday"),
        msg("impossible", timestamp="2025-13-45T00:00:00Z"),
        msg("number", timestamp=1735689600000),
        msg("missing"),
    ],
    "object, not array": {"id": "not-an-array"},
    "json null": None,
    "empty": [],
    "large": [msg(f"m{i}", "user" if i % 2 else "assistant") for i in range(2000)],
}
BAD_ELEMENTS = 9  # in "bad elements", the 9 before "kept"


@pytest.fixture()
def legacy_db() -> Iterator[tuple[str, dict[str, str]]]:
    """A database at revision 0001 filled with legacy chats; yields its URL and the chat ids."""
    name = f"cdw_backfill_{RUN_ID}"
    url = create_database(name)
    try:
        alembic(url, "upgrade", "0001")
        ids = {}
        with psycopg.connect(url, autocommit=True) as connection:
            for title, messages in LEGACY.items():
                ids[title] = str(
                    connection.execute(
                        "INSERT INTO copilot_chats (user_id, title, model, messages, created_at) "
                        "VALUES ('legacy', %s, 'm', %s::jsonb, %s) RETURNING id",
                        (title, json.dumps(messages), CHAT_CREATED),
                    ).fetchone()[0]  # type: ignore[index]
                )
        yield url, ids
    finally:
        drop_database(name)


def load_migration(revision: str) -> ModuleType:
    path = next((ROOT / "migrations" / "versions").glob(f"{revision}_*.py"))
    spec = importlib.util.spec_from_file_location(f"migration_{revision}", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def snapshot_rows(url: str) -> list[tuple[object, ...]]:
    with psycopg.connect(url) as connection:
        return connection.execute(
            "SELECT chat_id, message_id, role, seq, content, stream_id, model, created_at, "
            "deleted_at, source_version FROM copilot_chat_messages ORDER BY chat_id, message_id"
        ).fetchall()


def test_backfill_copies_messy_legacy_data_by_the_rules(
    legacy_db: tuple[str, dict[str, str]],
) -> None:
    url, ids = legacy_db
    log = alembic(url, "upgrade", "head")
    assert f"skipped {BAD_ELEMENTS} bad elements and 2 chats" in log

    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        for title, chat_id in ids.items():
            assert mismatch(engine, chat_id) is None, title

        live, _ = table_rows(engine, ids["duplicates"])
        assert {k: v.seq for k, v in live.items()} == {"a": 0, "b": 1, "c": 3}
        assert live["a"].content["content"] == "content of a"  # the first occurrence wins

        live, _ = table_rows(engine, ids["bad elements"])
        assert set(live) == {"kept"}
        assert live["kept"].seq == 9
        assert live["kept"].content == LEGACY["bad elements"][9]  # every field kept

        live, _ = table_rows(engine, ids["timestamps"])
        at = {k: v.created_at for k, v in live.items()}
        assert at["utc"] == datetime(2025, 3, 1, 10, 0, 0, 123000, tzinfo=UTC)
        assert at["offset"] == datetime(2025, 3, 1, 10, 0, tzinfo=UTC)
        assert at["naive"] == datetime(2025, 3, 1, 10, 0, tzinfo=UTC)
        for fallback in ("garbage", "impossible", "number", "missing"):
            assert at[fallback] == CHAT_CREATED, fallback

        for title in ("object, not array", "json null", "empty"):
            assert table_rows(engine, ids[title]) == ({}, set()), title
        live, _ = table_rows(engine, ids["large"])
        assert len(live) == 2000 and live["m1999"].seq == 1999

        with engine.connect() as connection:
            states = connection.execute(
                text("SELECT count(*) FROM copilot_chat_sync_state WHERE applied_version = 0")
            ).scalar_one()
        assert states == len(ids)  # every chat starts in sync at version 0
    finally:
        engine.dispose()


def test_backfill_is_idempotent_and_survives_downgrade_and_upgrade(
    legacy_db: tuple[str, dict[str, str]],
) -> None:
    url, _ = legacy_db
    alembic(url, "upgrade", "head")
    first = snapshot_rows(url)
    assert len(first) == 3 + 1 + 7 + 2000

    # The copy, run again over every chat, adds nothing.
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute("SET timezone = 'UTC'")
        assert connection.execute(INLINE).rowcount == 0

    alembic(url, "downgrade", "0001")
    with psycopg.connect(url) as connection:
        tables = connection.execute(
            "SELECT count(*) FROM information_schema.tables "
            "WHERE table_name IN ('copilot_chat_messages', 'copilot_chat_sync_state')"
        ).fetchone()
        assert tables == (0,)
    alembic(url, "upgrade", "head")
    assert snapshot_rows(url) == first


def test_expected_rows_model_agrees_on_a_plain_chat() -> None:
    # Guards the test oracle itself: a plain chat maps one element to one row, in order.
    chat = [msg("x", timestamp="2025-01-01T00:00:00Z"), msg("y", "assistant")]
    rows = expected_rows(chat, CHAT_CREATED)
    assert [(k, v.seq, v.role) for k, v in rows.items()] == [
        ("x", 0, "user"),
        ("y", 1, "assistant"),
    ]
    assert rows["y"].created_at == CHAT_CREATED
