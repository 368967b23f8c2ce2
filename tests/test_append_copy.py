"""The copy of what was appended: the version triggers record which versions only appended,
whoever wrote them; a sync of a chat that only grew since its last complete copy maps just the
new elements, and ends in exactly the rows that mapping the whole chat gives; and a copy from an
older snapshot never overwrites a newer one."""

from __future__ import annotations

import json
import secrets
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from app.db import make_engine, make_sessionmaker, transaction
from app.repositories import chats as chats_repo
from app.repositories import messages as messages_repo
from app.repositories import sync_state
from app.services import sync
from app.settings import get_settings
from tests.support import assert_converged, wait_until

SETTINGS = get_settings()
ENGINE = make_engine(SETTINGS, pool_size=4)
FACTORY = make_sessionmaker(ENGINE)
USER = "append-copy-user"

STRAY_APPEND = "UPDATE copilot_chats SET messages = messages || CAST(:e AS jsonb) WHERE id = :id"


def element(message_id: str, content: str = "c", **extra: Any) -> dict[str, Any]:
    return {
        "id": message_id,
        "role": "user",
        "content": content,
        "timestamp": "2026-01-01T00:00:00Z",
        **extra,
    }


def new_chats(count: int, messages: list[Any] | None = None) -> list[uuid.UUID]:
    """Chats created in one statement: the same `created_at`, which rows of elements without a
    timestamp take, so that twins map to equal rows."""
    with ENGINE.begin() as connection:
        return list(
            connection.execute(
                text(
                    "INSERT INTO copilot_chats (user_id, model, messages) "
                    "SELECT :user, 'gpt-4o', CAST(:messages AS jsonb) FROM generate_series(1, :n) "
                    "RETURNING id"
                ),
                {"user": USER, "messages": json.dumps(messages or []), "n": count},
            ).scalars()
        )


def record(chat: uuid.UUID) -> dict[str, Any]:
    with ENGINE.connect() as connection:
        row = connection.execute(
            text(
                "SELECT c.messages_version, s.append_since, s.applied_version, "
                "s.elements_version, s.applied_elements "
                "FROM copilot_chats c JOIN copilot_chat_sync_state s ON s.chat_id = c.id "
                "WHERE c.id = :id"
            ),
            {"id": chat},
        ).one()
    return dict(row._mapping)


def rows(chat: uuid.UUID) -> list[tuple[Any, ...]]:
    """Every row of a chat, everything but its own id and timestamps of the copy."""
    with ENGINE.connect() as connection:
        return [
            tuple(r)
            for r in connection.execute(
                text(
                    "SELECT message_id, seq, role, content, stream_id, model, created_at, "
                    "deleted_at IS NULL AS live, source_version "
                    "FROM copilot_chat_messages WHERE chat_id = :id ORDER BY message_id"
                ),
                {"id": chat},
            )
        ]


def copy(chat: uuid.UUID, *, appended: bool) -> messages_repo.ChatCounts:
    """One convergence of the chat, as a sync or a reconcile holds it."""
    with transaction(FACTORY) as session:
        sync_state.lock_chats(session, [chat])
        (counts,) = messages_repo.converge(session, [chat], appended=appended)
    return counts


def write(sql: str, **params: Any) -> None:
    with ENGINE.begin() as connection:
        connection.execute(text(sql), params)


# ---------------------------------------------------------------------------------------------
# What the triggers record


def test_an_append_by_the_service_copies_only_the_new_elements() -> None:
    (chat,) = new_chats(1, [element("a"), element("b")])
    assert copy(chat, appended=True).first == 0  # never copied: whole
    assert record(chat) == {
        "messages_version": 1,
        "append_since": 1,
        "applied_version": 1,
        "elements_version": 1,
        "applied_elements": 2,
    }
    with transaction(FACTORY) as session:
        written = chats_repo.append(session, chat, USER, [element("c"), element("d")])
    assert written is not None and written.version == 2
    assert record(chat)["append_since"] == 1  # version 2 only appended

    counts = copy(chat, appended=True)
    assert (counts.first, counts.elements, counts.inserted, counts.updated) == (2, 4, 2, 0)
    assert record(chat)["applied_elements"] == 4
    assert_converged(ENGINE, [chat])


def test_a_script_that_appends_to_a_small_chat_is_recognised() -> None:
    (chat,) = new_chats(1, [element("a")])
    copy(chat, appended=True)
    write(STRAY_APPEND, id=chat, e=json.dumps([element("b")]))
    assert record(chat)["append_since"] == 1
    assert copy(chat, appended=True).first == 1
    assert_converged(ENGINE, [chat])


@pytest.mark.parametrize(
    "change",
    [
        "messages = jsonb_build_array(messages -> 1, messages -> 0)",  # reorder
        "messages = messages - 0",  # remove
        "messages = jsonb_set(messages, '{0,content}', '\"edited\"')",  # edit
        'messages = jsonb_build_array(messages -> 1, messages -> 0) || \'[{"id": "z"}]\'',
        'messages = \'{"not": "an array"}\'',
    ],
)
def test_anything_but_an_append_is_recorded_as_such(change: str) -> None:
    (chat,) = new_chats(1, [element("a"), element("b")])
    copy(chat, appended=True)
    write(f"UPDATE copilot_chats SET {change} WHERE id = :id", id=chat)
    assert record(chat)["append_since"] == 2
    assert copy(chat, appended=True).first == 0
    assert_converged(ENGINE, [chat])


def test_a_large_chat_written_without_a_claim_counts_as_anything_else() -> None:
    """Comparing a large array with the new one's prefix would cost the writer more than the
    whole copy costs the sync: a script's append to it is not compared, and copied whole."""
    big = [element(f"m{i}", secrets.token_hex(1000)) for i in range(400)]
    (chat,) = new_chats(1, big)
    copy(chat, appended=True)
    write(STRAY_APPEND, id=chat, e=json.dumps([element("late")]))
    assert record(chat)["append_since"] == 2
    with transaction(FACTORY) as session:
        chats_repo.append(session, chat, USER, [element("later")])
    assert record(chat)["append_since"] == 2  # the service's append claims itself
    assert copy(chat, appended=True).first == 0  # version 2 was a write of anything else
    with transaction(FACTORY) as session:
        chats_repo.append(session, chat, USER, [element("last")])
    assert copy(chat, appended=True).first == 402
    assert_converged(ENGINE, [chat])


def test_a_claim_applies_only_to_the_row_of_its_own_statement() -> None:
    """A claim left by a statement whose row was not written (here: made by hand, without an
    UPDATE) does not make a later write of the same chat at the same version an append."""
    (chat,) = new_chats(1, [element("a")])
    copy(chat, appended=True)
    with ENGINE.begin() as connection:
        connection.execute(
            text(
                "SELECT copilot_chats_append(id, messages_version, messages, "
                "CAST(:e AS jsonb)) FROM copilot_chats WHERE id = :id"
            ),
            {"id": chat, "e": json.dumps([element("b")])},
        )
        # Same length as the claim says, but not an append of the old array.
        connection.execute(
            text("UPDATE copilot_chats SET messages = CAST(:m AS jsonb) WHERE id = :id"),
            {"id": chat, "m": json.dumps([element("x"), element("b")])},
        )
    assert record(chat)["append_since"] == 2
    assert copy(chat, appended=True).first == 0
    assert_converged(ENGINE, [chat])


def test_a_write_of_several_chats_in_one_statement_is_never_taken_for_an_append_wrongly() -> None:
    chats = new_chats(2, [element("a")])
    for chat in chats:
        copy(chat, appended=True)
    write(
        "UPDATE copilot_chats SET messages = CASE WHEN id = :first "
        'THEN messages || \'[{"id": "b"}]\' ELSE \'[{"id": "other"}]\' END '
        "WHERE id = ANY(:ids)",
        first=chats[0],
        ids=chats,
    )
    assert record(chats[1])["append_since"] == 2
    for chat in chats:
        copy(chat, appended=True)
    assert_converged(ENGINE, chats)


def test_bad_elements_keep_the_copy_whole_until_they_are_gone() -> None:
    (chat,) = new_chats(1, [element("a"), {"role": "user", "content": "no id"}])
    counts = copy(chat, appended=True)
    assert counts.bad_elements == 1
    assert record(chat)["elements_version"] is None
    with transaction(FACTORY) as session:
        chats_repo.append(session, chat, USER, [element("b")])
    counts = copy(chat, appended=True)
    assert (counts.first, counts.bad_elements) == (0, 1)
    with transaction(FACTORY) as session:
        chats_repo.replace_messages(session, chat, USER, [element("a"), element("b")])
    copy(chat, appended=True)
    with transaction(FACTORY) as session:
        chats_repo.append(session, chat, USER, [element("c")])
    assert copy(chat, appended=True).first == 2
    assert_converged(ENGINE, [chat])


def test_the_service_sync_takes_the_appended_path() -> None:
    (chat,) = new_chats(1, [element("a")])
    with transaction(FACTORY) as session:
        assert sync.sync_chats(session, {chat: 1}).appended == 0
    with transaction(FACTORY) as session:
        written = chats_repo.append(session, chat, USER, [element("b")])
    assert written is not None
    with transaction(FACTORY) as session:
        report = sync.sync_chats(session, {chat: written.version})
    assert (report.appended, report.inserted) == (1, 1)
    assert_converged(ENGINE, [chat])


def test_an_append_that_waited_for_another_claims_the_row_it_writes() -> None:
    """The second of two appends waits for the first's row lock, then computes its array again
    on the row the first left: its claim names that row, and both versions count as appends."""
    (chat,) = new_chats(1, [element("a")])
    copy(chat, appended=True)
    second_done = threading.Event()
    errors: list[BaseException] = []

    def second() -> None:
        try:
            with transaction(FACTORY) as session:
                chats_repo.append(session, chat, USER, [element("c")])
            second_done.set()
        except BaseException as error:  # reported by the test's thread
            errors.append(error)

    with transaction(FACTORY) as first:
        chats_repo.append(first, chat, USER, [element("b")])
        thread = threading.Thread(target=second)
        thread.start()
        wait_until(row_lock_waited, timeout=30)
        assert not second_done.is_set()
    thread.join(30)
    assert not errors, errors
    assert record(chat)["messages_version"] == 3
    assert record(chat)["append_since"] == 1
    counts = copy(chat, appended=True)
    assert (counts.first, counts.inserted) == (1, 2)
    assert_converged(ENGINE, [chat])


def row_lock_waited() -> bool:
    """Some backend of this database waits for a lock on a row (a transaction id)."""
    with ENGINE.connect() as connection:
        return bool(
            connection.execute(
                text(
                    "SELECT EXISTS (SELECT 1 FROM pg_stat_activity "
                    "WHERE datname = current_database() AND wait_event_type = 'Lock' "
                    "AND wait_event IN ('transactionid', 'tuple'))"
                )
            ).scalar_one()
        )


def test_concurrent_appends_each_claim_the_row_they_write() -> None:
    """Appends to one chat at once wait for each other's row lock, and each computes its new
    array again on the row it finally writes: every version is still recorded as an append,
    and the copies of what was appended end in the chat's rows."""
    (chat,) = new_chats(1, [element("a")])
    copy(chat, appended=True)
    errors: list[BaseException] = []
    copies: list[int] = []

    def appender(worker: int) -> None:
        try:
            for i in range(8):
                with transaction(FACTORY) as session:
                    chats_repo.append(session, chat, USER, [element(f"w{worker}-{i}")])
                if i % 3 == 0:
                    with transaction(FACTORY) as session:
                        copies.append(sync.sync_chats(session, {chat: 0}).appended)
        except BaseException as error:  # reported by the test's thread
            errors.append(error)

    threads = [threading.Thread(target=appender, args=(w,)) for w in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    assert record(chat)["messages_version"] == 1 + 3 * 8
    assert record(chat)["append_since"] == 1
    with transaction(FACTORY) as session:
        copies.append(sync.sync_chats(session, {chat: 0}).appended)
    assert sum(copies) >= 1
    assert record(chat)["applied_elements"] == 1 + 3 * 8
    assert_converged(ENGINE, [chat])


# ---------------------------------------------------------------------------------------------
# The appended path against the whole one, for random histories

ids = st.sampled_from([f"m{i}" for i in range(10)])
good = st.builds(
    lambda i, c, stamped, stream: {
        "id": i,
        "role": "assistant",
        "content": c,
        **({"timestamp": "2026-01-02T03:04:05Z"} if stamped else {}),
        **({"streamId": "s1", "model": "gpt-4o"} if stream else {}),
    },
    ids,
    st.sampled_from(["a", "b"]),
    st.booleans(),
    st.booleans(),
)
bad = st.sampled_from([42, "text", {"role": "user"}, {"id": ""}, {"id": 7}, None])
# Mostly good: one bad element keeps a chat's copies whole until it is gone.
some_element = st.sampled_from([True] * 8 + [False]).flatmap(lambda ok: good if ok else bad)
elements = st.lists(some_element, min_size=0, max_size=3)

ARGUMENTS: dict[str, st.SearchStrategy[Any]] = {
    "append": st.lists(good, min_size=1, max_size=3, unique_by=lambda e: e["id"]),
    "stray_append": elements,
    "replace": st.lists(good, max_size=4),
    "remove": st.integers(0, 5),
    "reorder": st.none(),
    "edit": st.integers(0, 5),
    "sync": st.none(),
}
# Appends and syncs weigh most: the appended path needs a copy, appends, then another copy.
KINDS = ["append"] * 3 + ["stray_append"] * 2 + ["sync"] * 3 + ["replace", "remove", "reorder"]
operations = st.sampled_from([*KINDS, "edit"]).flatmap(
    lambda kind: st.tuples(st.just(kind), ARGUMENTS[kind])
)

REORDER = (
    "UPDATE copilot_chats SET messages = (SELECT coalesce(jsonb_agg(e ORDER BY o DESC), '[]') "
    "FROM jsonb_array_elements(messages) WITH ORDINALITY AS x(e, o)) WHERE id = :id"
)
EDIT = (
    "UPDATE copilot_chats SET messages = jsonb_set(messages, ARRAY[CAST(:i AS text)], "
    'CAST(\'{"id": "m0", "content": "edited"}\' AS jsonb)) WHERE id = :id'
)


def apply(session: Session, chat: uuid.UUID, kind: str, arg: Any) -> None:
    if kind == "append":  # the service's own append (refused when an id is there already)
        chats_repo.append(session, chat, USER, arg)
    elif kind == "stray_append":
        session.execute(text(STRAY_APPEND), {"id": chat, "e": json.dumps(arg)})
    elif kind == "replace":
        chats_repo.replace_messages(session, chat, USER, arg)
    elif kind == "remove":
        session.execute(
            text("UPDATE copilot_chats SET messages = messages - :i WHERE id = :id"),
            {"id": chat, "i": arg},
        )
    elif kind == "reorder":
        session.execute(text(REORDER), {"id": chat})
    elif kind == "edit":
        session.execute(text(EDIT), {"id": chat, "i": arg})


@given(
    start=st.lists(some_element, max_size=3),
    history=st.lists(operations, min_size=1, max_size=14),
)
@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
def test_the_appended_path_gives_the_rows_of_the_whole_one(
    start: list[Any], history: list[tuple[str, Any]]
) -> None:
    """Twin chats live the same history; one is synced by the service (which copies what was
    appended when it can), the other converged whole each time. Their rows are equal after every
    sync: ids, positions, contents, liveness and the version each was copied from."""
    delta, whole = new_chats(2, start)
    for kind, arg in [*history, ("sync", None)]:
        if kind != "sync":
            for chat in (delta, whole):
                with transaction(FACTORY) as session:
                    apply(session, chat, kind, arg)
            continue
        with transaction(FACTORY) as session:
            sync.sync_chats(session, {delta: 0})
        copy(whole, appended=False)
        assert rows(delta) == rows(whole)
    assert_converged(ENGINE, [delta, whole])


# ---------------------------------------------------------------------------------------------
# A copy from an older snapshot that writes after a newer one

BARRIER_KEY = {"c": 7399, "o": 1}


@pytest.fixture()
def barrier() -> Iterator[Engine]:
    """A trigger that holds a transaction which set `test.barrier` at its first row write to
    `copilot_chat_messages`, until the advisory lock `BARRIER_KEY` is free: a convergence so
    marked has taken its snapshot and mapped the chat, and waits there to write."""
    with ENGINE.begin() as connection:
        connection.execute(
            text(
                f"""
                CREATE OR REPLACE FUNCTION test_barrier() RETURNS trigger
                LANGUAGE plpgsql AS $$
                BEGIN
                    IF current_setting('test.barrier', true) = 'on' THEN
                        PERFORM pg_advisory_lock_shared({BARRIER_KEY["c"]}, {BARRIER_KEY["o"]});
                        PERFORM pg_advisory_unlock_shared({BARRIER_KEY["c"]}, {BARRIER_KEY["o"]});
                    END IF;
                    RETURN NEW;
                END
                $$
                """
            )
        )
        connection.execute(
            text(
                "CREATE OR REPLACE TRIGGER test_barrier BEFORE INSERT OR UPDATE "
                "ON copilot_chat_messages FOR EACH ROW EXECUTE FUNCTION test_barrier()"
            )
        )
    try:
        yield ENGINE
    finally:
        with ENGINE.begin() as connection:
            connection.execute(text("DROP TRIGGER IF EXISTS test_barrier ON copilot_chat_messages"))
            connection.execute(text("DROP FUNCTION IF EXISTS test_barrier()"))


def waiting_for_lock(objid: int, classid: int) -> bool:
    """Some backend waits for the advisory lock (classid, objid)."""
    with ENGINE.connect() as connection:
        return bool(
            connection.execute(
                text(
                    "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' "
                    "AND NOT granted AND classid = :c AND objid = :o)"
                ),
                {"c": classid, "o": objid},
            ).scalar_one()
        )


def sync_waiting() -> bool:
    """Some backend waits for a per-chat sync lock."""
    with ENGINE.connect() as connection:
        return bool(
            connection.execute(
                text(
                    "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' "
                    "AND NOT granted AND classid = :c)"
                ),
                {"c": sync_state.SYNC_LOCK_CLASS},
            ).scalar_one()
        )


@pytest.mark.parametrize("path", ["whole", "appended"])
def test_a_copy_from_an_older_snapshot_never_overwrites_a_newer_one(
    barrier: Engine, path: str
) -> None:
    """The older sync has read version 2 and waits to write it; version 3 is written and its
    sync runs meanwhile (or waits for the older one: the per-chat lock); then the older one
    writes. The rows are version 3's, whichever protection stopped version 2's copy."""
    (chat,) = new_chats(1, [element("a", "v1")])
    copy(chat, appended=True)
    with transaction(FACTORY) as session:
        if path == "whole":  # version 2 edits "a": no append
            chats_repo.replace_messages(session, chat, USER, [element("a", "v2")])
        else:  # version 2 appends "b": the older sync copies just that
            chats_repo.append(session, chat, USER, [element("b", "v2")])

    errors: list[BaseException] = []
    reports: dict[str, sync.SyncReport] = {}

    def run(name: str, marked: bool) -> None:
        try:
            with transaction(FACTORY) as session:
                if marked:
                    session.execute(text("SET LOCAL test.barrier = 'on'"))
                reports[name] = sync.sync_chats(session, {chat: 0})
        except BaseException as error:  # reported by the test's thread
            errors.append(error)

    with ENGINE.connect() as holder:
        holder.execute(text("SELECT pg_advisory_lock(:c, :o)"), BARRIER_KEY)
        holder.commit()
        older = threading.Thread(target=run, args=("older", True))
        older.start()
        wait_until(lambda: waiting_for_lock(BARRIER_KEY["o"], BARRIER_KEY["c"]), timeout=30)

        with transaction(FACTORY) as session:  # version 3 changes what version 2 copies
            chats_repo.replace_messages(
                session, chat, USER, [element("a", "v3"), element("b", "v3")]
            )
        newer = threading.Thread(target=run, args=("newer", False))
        newer.start()
        # The newer sync either finishes, or waits for the older one's per-chat lock.
        wait_until(lambda: not newer.is_alive() or sync_waiting(), timeout=30)
        holder.execute(text("SELECT pg_advisory_unlock(:c, :o)"), BARRIER_KEY)
        holder.commit()
        older.join(60)
        newer.join(60)
    assert not errors, errors
    assert not older.is_alive() and not newer.is_alive()
    stamp = datetime(2026, 1, 1, tzinfo=UTC)
    assert rows(chat) == [
        ("a", 0, "user", element("a", "v3"), None, None, stamp, True, 3),
        ("b", 1, "user", element("b", "v3"), None, None, stamp, True, 3),
    ]
    assert_converged(ENGINE, [chat])
    assert record(chat)["applied_version"] == 3
