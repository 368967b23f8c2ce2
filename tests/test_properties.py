"""Any sequence of mutations and task deliveries (dropped, duplicated, reordered) ends, after the
sweep, with the table equal to the JSONB; and no row's `source_version` ever goes backwards."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import TypeVar

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from sqlalchemy import text

from app import schemas
from app.db import make_engine, make_sessionmaker, transaction
from app.errors import Conflict, Invalid
from app.jobs import JobQueue
from app.repositories import sync_state
from app.services import chats as service
from app.services import sync
from app.settings import get_settings
from tests.support import assert_converged

SETTINGS = get_settings()
ENGINE = make_engine(SETTINGS, pool_size=2)
FACTORY = make_sessionmaker(ENGINE)
USER = "property-user"

T = TypeVar("T")
ids = st.sampled_from([f"m{i}" for i in range(8)])
contents = st.sampled_from(["a", "b", "c"])


def element(message_id: str, content: str) -> dict[str, object]:
    return {
        "id": message_id,
        "role": "user",
        "content": content,
        "timestamp": "2026-01-01T00:00:00Z",
    }


class DualWrite(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.chats: list[uuid.UUID] = []
        self.deleted: set[uuid.UUID] = set()
        self.pending: list[tuple[uuid.UUID, int]] = []  # tasks in the "queue"
        self.lost: set[uuid.UUID] = set()  # chats one of whose tasks was dropped
        self.versions: dict[tuple[uuid.UUID, str], int] = {}

    def _do(self, operation: Callable[..., T], *args: object) -> T:
        jobs = JobQueue()
        with transaction(FACTORY) as session:
            ctx = service.Context(session=session, jobs=jobs, settings=SETTINGS, user_id=USER)
            result = operation(ctx, *args)
        for job in jobs.jobs:
            self.pending.append((uuid.UUID(job.args[0]), int(job.args[-1])))
        return result

    def _live(self) -> list[uuid.UUID]:
        return [c for c in self.chats if c not in self.deleted]

    @rule()
    def create(self) -> None:
        if len(self.chats) < 4:
            chat = self._do(service.create_chat, schemas.CreateChat())
            self.chats.append(chat.id)

    @precondition(lambda self: self._live())
    @rule(data=st.data(), message_id=ids, content=contents)
    def append(self, data: st.DataObject, message_id: str, content: str) -> None:
        chat = data.draw(st.sampled_from(self._live()))
        body = schemas.AppendMessage.model_validate(
            {"message": element(message_id, content)}, strict=False
        )
        # Conflict: the id is there with other content; refused, nothing changed.
        with contextlib.suppress(Conflict):
            self._do(service.append_user_message, chat, body)

    @precondition(lambda self: self._live())
    @rule(
        data=st.data(),
        snapshot=st.lists(st.tuples(ids, contents), max_size=6, unique_by=lambda t: t[0]),
    )
    def replace(self, data: st.DataObject, snapshot: list[tuple[str, str]]) -> None:
        chat = data.draw(st.sampled_from(self._live()))
        body = schemas.ReplaceMessages.model_validate(
            {"messages": [element(i, c) for i, c in snapshot]}, strict=False
        )
        self._do(service.replace_messages, chat, body)

    @precondition(lambda self: self._live())
    @rule(data=st.data(), message_id=ids)
    def fork(self, data: st.DataObject, message_id: str) -> None:
        chat = data.draw(st.sampled_from(self._live()))
        try:
            forked = self._do(service.fork_chat, chat, schemas.Fork(up_to_message_id=message_id))
        except Invalid:
            return  # no such message in that chat
        self.chats.append(forked.id)

    @precondition(lambda self: self._live())
    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        chat = data.draw(st.sampled_from(self._live()))
        self._do(service.delete_chat, chat)
        self.deleted.add(chat)

    @precondition(lambda self: self.pending)
    @rule(data=st.data(), keep=st.booleans())
    def deliver(self, data: st.DataObject, keep: bool) -> None:
        """Deliver any pending task (reordering); keep it queued to deliver it again later."""
        index = data.draw(st.integers(0, len(self.pending) - 1))
        self._run(*(self.pending[index] if keep else self.pending.pop(index)))

    def _run(self, chat: uuid.UUID, version: int) -> None:
        """What the task does: clear the chat's queued mark (committed), then sync."""
        with transaction(FACTORY) as session:
            sync_state.clear_queued(session, [chat])
        with transaction(FACTORY) as session:
            sync.sync_chats(session, {chat: version})

    @precondition(lambda self: self.pending)
    @rule(data=st.data())
    def drop(self, data: st.DataObject) -> None:
        chat, _ = self.pending.pop(data.draw(st.integers(0, len(self.pending) - 1)))
        self.lost.add(chat)

    @invariant()
    def source_version_never_goes_backwards(self) -> None:
        if not self.chats:
            return
        with ENGINE.connect() as connection:
            rows = connection.execute(
                text(
                    "SELECT chat_id, message_id, source_version FROM copilot_chat_messages "
                    "WHERE chat_id = ANY(:ids)"
                ),
                {"ids": self.chats},
            ).all()
        for chat_id, message_id, version in rows:
            key = (chat_id, message_id)
            assert version >= self.versions.get(key, -1), key
            self.versions[key] = version

    def teardown(self) -> None:
        # Every write that sent no task (coalesced) is read by a task still queued: once those
        # run, each chat none of whose tasks was dropped equals its JSONB.
        while self.pending:
            self._run(*self.pending.pop())
        assert_converged(ENGINE, [c for c in self.chats if c not in self.lost])
        # Whatever was dropped, the sweep finds; then every chat equals its JSONB.
        with transaction(FACTORY) as session:
            behind = sync.sweep(session, grace=timedelta(0), ttl=timedelta(0), limit=100_000)
        with transaction(FACTORY) as session:
            sync.sync_chats(session, {b.chat_id: b.wanted_version for b in behind})
        assert_converged(ENGINE, self.chats)


TestDualWrite = DualWrite.TestCase
TestDualWrite.settings = settings(
    max_examples=40,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
