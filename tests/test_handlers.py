"""Each callsite end to end: request, the real worker drains, then the table equals the JSONB."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from tests.support import AuthHeaders, WaitConverged, table_rows


def message(role: str = "user", /, **fields: object) -> dict[str, Any]:
    return {
        "id": fields.pop("id", f"m-{uuid.uuid4().hex[:10]}"),
        "role": role,
        "content": fields.pop("content", f"hello from {role}"),
        "timestamp": fields.pop("timestamp", "2026-11-26T10:00:00.000Z"),
        **fields,
    }


def new_chat(api: TestClient, auth: AuthHeaders, user: str = "alice", **body: object) -> str:
    response = api.post("/chats", json=body, headers=auth(user))
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def jsonb(
    api: TestClient, auth: AuthHeaders, chat_id: str, user: str = "alice"
) -> list[dict[str, Any]]:
    response = api.get(f"/chats/{chat_id}", headers=auth(user))
    assert response.status_code == 200, response.text
    messages: list[dict[str, Any]] = response.json()["messages"]
    return messages


def test_create_chat_returns_it_and_starts_empty(api: TestClient, auth: AuthHeaders) -> None:
    response = api.post("/chats", json={"title": "plans", "model": "m1"}, headers=auth())
    assert response.status_code == 201
    body = response.json()
    assert (body["title"], body["model"], body["messages_version"]) == ("plans", "m1", 0)
    assert jsonb(api, auth, body["id"]) == []


def test_append_user_message_is_copied_with_its_stream(
    api: TestClient, auth: AuthHeaders, engine: Engine, converged: WaitConverged
) -> None:
    chat_id = new_chat(api, auth)
    sent = message("user", toolCalls=[{"name": "search", "args": {"q": "x"}}])
    response = api.post(f"/chats/{chat_id}/messages", json={"message": sent}, headers=auth())
    assert response.status_code == 201, response.text

    converged(chat_id)
    live, deleted = table_rows(engine, chat_id)
    row = live[sent["id"]]
    assert row.stream_id == sent["id"]
    assert row.content == {**sent, "streamId": sent["id"]}  # nothing dropped, stream recorded
    assert row.seq == 0 and not deleted
    chat = api.get(f"/chats/{chat_id}", headers=auth()).json()
    assert chat["active_stream_id"] == sent["id"]


def test_append_is_idempotent_on_message_id(
    api: TestClient, auth: AuthHeaders, engine: Engine, converged: WaitConverged
) -> None:
    chat_id = new_chat(api, auth)
    sent = message("user")
    first = api.post(f"/chats/{chat_id}/messages", json={"message": sent}, headers=auth())
    retry = api.post(f"/chats/{chat_id}/messages", json={"message": sent}, headers=auth())
    assert (first.status_code, retry.status_code) == (201, 200)
    assert retry.json()["created"] is False
    assert [m["id"] for m in jsonb(api, auth, chat_id)] == [sent["id"]]

    changed = {**sent, "content": "something else"}
    conflict = api.post(f"/chats/{chat_id}/messages", json={"message": changed}, headers=auth())
    assert conflict.status_code == 409
    assert conflict.json()["detail"][0]["loc"] == ["body", "message", "id"]
    converged(chat_id)


def test_turn_completion_appends_reply_and_clears_stream(
    api: TestClient, auth: AuthHeaders, engine: Engine, converged: WaitConverged
) -> None:
    chat_id = new_chat(api, auth)
    question = message("user")
    api.post(f"/chats/{chat_id}/messages", json={"message": question}, headers=auth())
    reply = message("assistant", model="m-large", contentBlocks=[{"type": "text", "text": "hi"}])
    url = f"/chats/{chat_id}/turns/{question['id']}/complete"
    response = api.post(url, json={"message": reply}, headers=auth())
    assert response.status_code == 201, response.text
    assert api.post(url, json={"message": reply}, headers=auth()).status_code == 200  # retry

    converged(chat_id)
    live, _ = table_rows(engine, chat_id)
    assert [live[question["id"]].seq, live[reply["id"]].seq] == [0, 1]
    assert live[reply["id"]].stream_id == question["id"]
    assert live[reply["id"]].model == "m-large"
    assert api.get(f"/chats/{chat_id}", headers=auth()).json()["active_stream_id"] is None


def test_turn_completion_refuses_a_turn_that_is_not_active_or_not_last(
    api: TestClient, auth: AuthHeaders
) -> None:
    chat_id = new_chat(api, auth)
    first, second = message("user"), message("user")
    api.post(f"/chats/{chat_id}/messages", json={"message": first}, headers=auth())
    api.post(f"/chats/{chat_id}/messages", json={"message": second}, headers=auth())
    stale = api.post(
        f"/chats/{chat_id}/turns/{first['id']}/complete",
        json={"message": message("assistant")},
        headers=auth(),
    )
    assert stale.status_code == 409
    assert stale.json()["detail"][0]["loc"] == ["path", "user_message_id"]
    assert [m["id"] for m in jsonb(api, auth, chat_id)] == [first["id"], second["id"]]


def test_inbox_pair_appends_both(
    api: TestClient, auth: AuthHeaders, engine: Engine, converged: WaitConverged
) -> None:
    chat_id = new_chat(api, auth)
    body = {"user": message("user"), "assistant": message("assistant")}
    response = api.post(f"/chats/{chat_id}/inbox", json=body, headers=auth())
    assert response.status_code == 201, response.text
    converged(chat_id)
    live, _ = table_rows(engine, chat_id)
    assert {k: (v.seq, v.stream_id) for k, v in live.items()} == {
        body["user"]["id"]: (0, None),
        body["assistant"]["id"]: (1, None),
    }


def test_fork_copies_the_transcript_up_to_a_message(
    api: TestClient, auth: AuthHeaders, engine: Engine, converged: WaitConverged
) -> None:
    chat_id = new_chat(api, auth, title="original")
    sent = [message("user"), message("assistant"), message("user")]
    api.put(f"/chats/{chat_id}/messages", json={"messages": sent}, headers=auth())
    response = api.post(
        f"/chats/{chat_id}/fork", json={"up_to_message_id": sent[1]["id"]}, headers=auth()
    )
    assert response.status_code == 201, response.text
    fork_id = response.json()["id"]
    assert fork_id != chat_id and response.json()["title"] == "original"
    assert jsonb(api, auth, fork_id) == sent[:2]

    converged(chat_id, fork_id)
    live, _ = table_rows(engine, fork_id)
    assert sorted(live, key=lambda m: live[m].seq) == [sent[0]["id"], sent[1]["id"]]

    unknown = api.post(f"/chats/{chat_id}/fork", json={"up_to_message_id": "nope"}, headers=auth())
    assert unknown.status_code == 422
    assert unknown.json()["detail"][0]["loc"] == ["body", "up_to_message_id"]


def test_snapshot_replace_soft_deletes_removed_and_restores_returning(
    api: TestClient,
    auth: AuthHeaders,
    engine: Engine,
    converged: WaitConverged,
) -> None:
    chat_id = new_chat(api, auth)
    a, b, c = message("user"), message("assistant"), message("user")
    api.put(f"/chats/{chat_id}/messages", json={"messages": [a, b, c]}, headers=auth())
    converged(chat_id)

    edited = {**a, "content": "edited"}
    response = api.put(f"/chats/{chat_id}/messages", json={"messages": [edited, c]}, headers=auth())
    assert response.status_code == 200, response.text
    converged(chat_id)
    live, deleted = table_rows(engine, chat_id)
    assert deleted == {b["id"]}
    assert (live[a["id"]].content["content"], live[c["id"]].seq) == ("edited", 1)

    api.put(f"/chats/{chat_id}/messages", json={"messages": [edited, b, c]}, headers=auth())
    converged(chat_id)
    live, deleted = table_rows(engine, chat_id)
    assert deleted == set() and live[b["id"]].seq == 1


def test_snapshot_with_duplicate_ids_is_rejected(api: TestClient, auth: AuthHeaders) -> None:
    chat_id = new_chat(api, auth)
    a = message("user")
    response = api.put(f"/chats/{chat_id}/messages", json={"messages": [a, a]}, headers=auth())
    assert response.status_code == 422
    assert "messages" in response.json()["detail"][0]["loc"]
    assert "repeats" in response.json()["detail"][0]["msg"]


def test_admin_import_creates_a_chat_for_a_user(
    api: TestClient, auth: AuthHeaders, engine: Engine, converged: WaitConverged
) -> None:
    sent = [message("system"), message("user"), message("assistant")]
    response = api.post(
        "/admin/chats/import",
        json={"user_id": "bob", "title": "imported", "messages": sent},
        headers=auth("root", admin=True),
    )
    assert response.status_code == 201, response.text
    chat_id = response.json()["id"]
    assert jsonb(api, auth, chat_id, user="bob") == sent
    converged(chat_id)
    live, _ = table_rows(engine, chat_id)
    assert [live[m["id"]].seq for m in sent] == [0, 1, 2]


def test_delete_removes_chat_and_rows(
    api: TestClient, auth: AuthHeaders, engine: Engine, converged: WaitConverged
) -> None:
    chat_id = new_chat(api, auth)
    api.post(f"/chats/{chat_id}/messages", json={"message": message("user")}, headers=auth())
    converged(chat_id)
    assert api.delete(f"/chats/{chat_id}", headers=auth()).status_code == 204
    assert table_rows(engine, chat_id) == ({}, set())
    assert api.get(f"/chats/{chat_id}", headers=auth()).status_code == 404
    assert api.delete(f"/chats/{chat_id}", headers=auth()).status_code == 404


def test_messages_page_walks_the_transcript_backwards(api: TestClient, auth: AuthHeaders) -> None:
    chat_id = new_chat(api, auth)
    sent = [message("user", id=f"p{i}") for i in range(7)]
    api.put(f"/chats/{chat_id}/messages", json={"messages": sent}, headers=auth())
    page = api.get(f"/chats/{chat_id}/messages?limit=3", headers=auth()).json()
    assert [m["id"] for m in page["messages"]] == ["p4", "p5", "p6"]
    assert page["seqs"] == [4, 5, 6] and page["next_before_seq"] == 4
    ids: list[str] = []
    before = None
    while True:
        query = f"limit=3&before_seq={before}" if before is not None else "limit=3"
        page = api.get(f"/chats/{chat_id}/messages?{query}", headers=auth()).json()
        ids = [m["id"] for m in page["messages"]] + ids
        before = page["next_before_seq"]
        if before is None:
            break
    assert ids == [m["id"] for m in sent]


def test_retry_without_a_timestamp_is_still_idempotent(api: TestClient, auth: AuthHeaders) -> None:
    chat_id = new_chat(api, auth)
    sent = {"id": "no-ts", "role": "user", "content": "hello"}
    first = api.post(f"/chats/{chat_id}/messages", json={"message": sent}, headers=auth())
    retry = api.post(f"/chats/{chat_id}/messages", json={"message": sent}, headers=auth())
    assert (first.status_code, retry.status_code) == (201, 200)
    stored = jsonb(api, auth, chat_id)
    assert len(stored) == 1 and stored[0]["timestamp"]  # the server filled one in


def test_a_page_is_serialized_off_the_event_loop(
    api: TestClient, auth: AuthHeaders, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A page of large messages takes a while to turn into JSON: not on the event loop, where
    it would hold up every other request meanwhile."""
    import asyncio

    from app import schemas

    on_loop: list[bool] = []
    for model in (schemas.MessagePage, schemas.ChatWithMessages):
        original = model.model_dump_json

        def spy(self: Any, *args: Any, _original: Any = original, **kwargs: Any) -> Any:
            try:
                asyncio.get_running_loop()
                on_loop.append(True)
            except RuntimeError:
                on_loop.append(False)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(model, "model_dump_json", spy)
    chat = new_chat(api, auth)
    api.post(f"/chats/{chat}/messages", json={"message": message()}, headers=auth())
    assert api.get(f"/chats/{chat}/messages?limit=5", headers=auth()).status_code == 200
    whole = api.get(f"/chats/{chat}", headers=auth())
    assert whole.status_code == 200 and len(whole.json()["messages"]) == 1
    assert on_loop == [False, False]
