"""A chat's size is capped on every path that adds to it, in both stores (the JSONB up to
`read_table`, the rows in `table_only`), and `GET /chats/{id}` returns one page, not the whole
transcript."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text

from app import schemas
from app.db import transaction
from app.errors import TooLarge
from app.jobs import JobQueue
from app.main import create_app
from app.services import chats as service
from app.settings import Settings
from tests.support import AuthHeaders, SessionFactory, SetPhase, snapshot, table_rows
from tests.test_handlers import message

MAX_MESSAGES = 5  # odd: a full chat can end in an open turn
MAX_BYTES = 20_000
PAGE = 5


@pytest.fixture(scope="module")
def small_settings(settings: Settings) -> Settings:
    return settings.model_copy(
        update={
            "max_chat_messages": MAX_MESSAGES,
            "max_chat_bytes": MAX_BYTES,
            "max_page_size": PAGE,
        }
    )


@pytest.fixture(scope="module")
def small(small_settings: Settings) -> Iterator[TestClient]:
    app = create_app(small_settings, send_many=lambda jobs: [None] * len(jobs))
    try:
        with TestClient(app) as client:
            yield client
    finally:
        app.state.engine.dispose()


def state(engine: Engine, chat_id: str) -> tuple[Any, ...]:
    """Everything a write to the chat could change: its row, its rows, its head."""
    with engine.connect() as connection:
        head = connection.execute(
            text(
                "SELECT wanted_version, next_seq, active_stream_id FROM copilot_chat_sync_state "
                "WHERE chat_id = :id"
            ),
            {"id": chat_id},
        ).one_or_none()
    return snapshot(engine, chat_id), table_rows(engine, chat_id), head


def full_chat(
    client: TestClient, auth: AuthHeaders, count: int
) -> tuple[str, list[dict[str, Any]]]:
    """A chat of `count` messages (user, assistant, ...), its last turn open when it ends with
    a user message."""
    created = client.post("/chats", json={}, headers=auth())
    assert created.status_code == 201, created.text
    chat_id = created.json()["id"]
    sent = []
    for i in range(count):
        if i % 2 == 0:
            sent.append(message("user"))
            response = client.post(
                f"/chats/{chat_id}/messages", json={"message": sent[-1]}, headers=auth()
            )
        else:
            sent.append(message("assistant"))
            url = f"/chats/{chat_id}/turns/{sent[-2]['id']}/complete"
            response = client.post(url, json={"message": sent[-1]}, headers=auth())
        assert response.status_code == 201, response.text
    return chat_id, sent


def grow(
    client: TestClient,
    auth: AuthHeaders,
    route: str,
    chat_id: str,
    sent: list[Any],
    extra: int,
) -> Any:
    """A request that takes the chat to len(sent) + `extra` messages by `route`."""
    new = [message("user" if i % 2 == 0 else "assistant") for i in range(extra)]
    if route == "append":
        return client.post(f"/chats/{chat_id}/messages", json={"message": new[0]}, headers=auth())
    if route == "complete":
        url = f"/chats/{chat_id}/turns/{sent[-1]['id']}/complete"
        return client.post(url, json={"message": message("assistant")}, headers=auth())
    if route == "inbox":
        body: dict[str, Any] = {"user": message(), "assistant": message("assistant")}
        return client.post(f"/chats/{chat_id}/inbox", json=body, headers=auth())
    if route == "replace":
        body = {"messages": [*sent, *new]}
        return client.put(f"/chats/{chat_id}/messages", json=body, headers=auth())
    body = {"user_id": f"imported-{chat_id}", "messages": [*sent, *new]}
    return client.post("/admin/chats/import", json=body, headers=auth("root", admin=True))


ROUTES = ["append", "complete", "inbox", "replace", "import"]


@pytest.mark.parametrize("phase", ["dual_write", "table_only"])
@pytest.mark.parametrize("route", ROUTES)
def test_a_write_past_the_message_limit_is_413_and_stores_nothing(
    small: TestClient,
    auth: AuthHeaders,
    engine: Engine,
    set_phase: SetPhase,
    phase: str,
    route: str,
) -> None:
    set_phase(phase)
    # A full chat (its last turn open, for complete); inbox adds two to one place left.
    before_count = MAX_MESSAGES - 1 if route == "inbox" else MAX_MESSAGES
    chat_id, sent = full_chat(small, auth, before_count)
    before = state(engine, chat_id)
    response = grow(small, auth, route, chat_id, sent, 2 if route == "inbox" else 1)
    assert response.status_code == 413, response.text
    (error,) = response.json()["detail"]
    assert "MAX_CHAT_MESSAGES" in error["msg"] and str(MAX_MESSAGES) in error["msg"]
    assert error["loc"][0] == "body"
    assert state(engine, chat_id) == before
    with engine.connect() as connection:
        imported = connection.execute(
            text("SELECT count(*) FROM copilot_chats WHERE user_id = :u"),
            {"u": f"imported-{chat_id}"},
        ).scalar_one()
    assert imported == 0


@pytest.mark.parametrize("phase", ["dual_write", "table_only"])
@pytest.mark.parametrize("route", ["append", "replace"])
def test_a_write_past_the_byte_limit_is_413_and_stores_nothing(
    small: TestClient,
    auth: AuthHeaders,
    engine: Engine,
    set_phase: SetPhase,
    phase: str,
    route: str,
) -> None:
    set_phase(phase)
    chat_id, _ = full_chat(small, auth, 0)
    # Random text, so that compression does not shrink it below the limit.
    big = [
        message(content="".join(uuid.uuid4().hex for _ in range(MAX_BYTES // 2 // 32)))
        for _ in range(3)
    ]
    first = small.post(f"/chats/{chat_id}/messages", json={"message": big[0]}, headers=auth())
    assert first.status_code == 201, first.text
    small.put(f"/chats/{chat_id}/messages", json={"messages": big[:1]}, headers=auth())
    before = state(engine, chat_id)
    if route == "append":
        for extra in big[1:]:
            response = small.post(
                f"/chats/{chat_id}/messages", json={"message": extra}, headers=auth()
            )
            if response.status_code != 201:
                break
            before = state(engine, chat_id)
    else:
        response = small.put(f"/chats/{chat_id}/messages", json={"messages": big}, headers=auth())
    assert response.status_code == 413, response.text
    assert "MAX_CHAT_BYTES" in response.json()["detail"][0]["msg"]
    assert state(engine, chat_id) == before


@pytest.mark.parametrize("phase", ["dual_write", "table_only"])
def test_the_byte_limit_counts_a_chat_uncompressed(
    small: TestClient, auth: AuthHeaders, engine: Engine, set_phase: SetPhase, phase: str
) -> None:
    """Text that compresses well still counts at its full size: what reads, forks and copies
    of the chat handle (and what PostgreSQL's jsonb size limit applies to)."""
    set_phase(phase)
    chat_id, _ = full_chat(small, auth, 0)
    codes = []
    for _ in range(4):
        response = small.post(
            f"/chats/{chat_id}/messages",
            json={"message": message(content="a" * (MAX_BYTES // 3))},
            headers=auth(),
        )
        codes.append(response.status_code)
    assert codes[:2] == [201, 201]
    assert 413 in codes, codes


@pytest.mark.parametrize("phase", ["dual_write", "table_only"])
def test_of_two_concurrent_appends_for_the_last_slot_one_is_refused(
    small: TestClient,
    small_settings: Settings,
    auth: AuthHeaders,
    sessionmaker: SessionFactory,
    set_phase: SetPhase,
    phase: str,
) -> None:
    set_phase(phase)
    chat_id, _ = full_chat(small, auth, MAX_MESSAGES - 1)
    # Two appends for the last place, the second waiting on the first's lock: the first
    # commits, and the second must judge the chat the first left.
    first_wrote, outcomes = threading.Event(), {}

    def append(name: str, hold: float) -> None:
        body = schemas.AppendMessage.model_validate({"message": message()})
        try:
            with transaction(sessionmaker) as session:
                ctx = service.Context(session, JobQueue(), small_settings, "alice")
                service.append_user_message(ctx, uuid.UUID(chat_id), body)
                first_wrote.set()
                threading.Event().wait(hold)
            outcomes[name] = "appended"
        except TooLarge as exc:
            outcomes[name] = exc.message

    first = threading.Thread(target=append, args=("first", 1.0))
    first.start()
    assert first_wrote.wait(10)
    second = threading.Thread(target=append, args=("second", 0))
    second.start()
    first.join(20)
    second.join(20)
    assert outcomes["first"] == "appended"
    assert "MAX_CHAT_MESSAGES" in outcomes["second"], outcomes


@pytest.mark.parametrize("phase", ["dual_write", "table_only"])
def test_get_chat_returns_the_last_page_and_a_cursor(
    small: TestClient,
    auth: AuthHeaders,
    set_phase: SetPhase,
    phase: str,
) -> None:
    set_phase(phase)
    created = small.post("/chats", json={}, headers=auth())
    chat_id = created.json()["id"]
    sent = [message() for _ in range(MAX_MESSAGES)]
    response = small.put(
        f"/chats/{chat_id}/messages", json={"messages": sent[:MAX_MESSAGES]}, headers=auth()
    )
    assert response.status_code == 200, response.text
    whole = small.get(f"/chats/{chat_id}", headers=auth()).json()
    assert whole["messages"] == sent[:MAX_MESSAGES] and whole["next_before_seq"] is None
    page = small.get(f"/chats/{chat_id}?limit=3", headers=auth()).json()
    assert [m["id"] for m in page["messages"]] == [m["id"] for m in sent[-3:]]
    assert page["seqs"] == [2, 3, 4] and page["next_before_seq"] == 2
    older = small.get(
        f"/chats/{chat_id}/messages?limit=3&before_seq={page['next_before_seq']}", headers=auth()
    ).json()
    assert [m["id"] for m in older["messages"]] == [m["id"] for m in sent[:2]]
    assert small.get(f"/chats/{chat_id}?limit={PAGE + 1}", headers=auth()).status_code == 422


def test_get_chat_never_returns_more_than_a_page(
    api: TestClient, auth: AuthHeaders, settings: Settings
) -> None:
    created = api.post("/chats", json={}, headers=auth())
    chat_id = created.json()["id"]
    count = settings.max_page_size + 2
    sent = [message() for _ in range(count)]
    assert api.put(f"/chats/{chat_id}/messages", json={"messages": sent}, headers=auth()).is_success
    got = api.get(f"/chats/{chat_id}", headers=auth()).json()
    assert len(got["messages"]) == settings.max_page_size
    assert got["messages"][-1]["id"] == sent[-1]["id"] and got["next_before_seq"] == 2
