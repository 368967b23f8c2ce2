"""Authentication, ownership and bad input: clear 4xx answers, and nothing stored changes."""

from __future__ import annotations

import jwt
import pytest

from tests.support import snapshot
from tests.test_handlers import message, new_chat


def test_missing_token_is_401(api) -> None:  # type: ignore[no-untyped-def]
    assert api.post("/chats", json={}).status_code == 401


def test_forged_token_is_401(api) -> None:  # type: ignore[no-untyped-def]
    forged = jwt.encode({"sub": "alice", "exp": 4102444800}, "not-the-secret-" * 4, "HS256")
    response = api.post("/chats", json={}, headers={"Authorization": f"Bearer {forged}"})
    assert response.status_code == 401


def test_token_without_expiry_or_with_other_algorithm_is_401(api, settings) -> None:  # type: ignore[no-untyped-def]
    secret = settings.signing_secret
    no_exp = jwt.encode({"sub": "alice"}, secret, "HS256")
    other_alg = jwt.encode({"sub": "alice", "exp": 4102444800}, secret, "HS512")
    for token in (no_exp, other_alg, "garbage"):
        response = api.get(
            "/chats/00000000-0000-0000-0000-000000000000",
            headers={"Authorization": f"Bearer {token}"},
        )
        assert response.status_code == 401, token


def test_another_users_chat_is_404_for_every_route(api, auth, engine) -> None:  # type: ignore[no-untyped-def]
    chat_id = new_chat(api, auth, "alice")
    first = message("user")
    api.post(f"/chats/{chat_id}/messages", json={"message": first}, headers=auth("alice"))
    before = snapshot(engine, chat_id)
    mallory = auth("mallory")
    attempts = [
        api.get(f"/chats/{chat_id}", headers=mallory),
        api.get(f"/chats/{chat_id}/messages", headers=mallory),
        api.post(f"/chats/{chat_id}/messages", json={"message": message()}, headers=mallory),
        api.post(
            f"/chats/{chat_id}/turns/{first['id']}/complete",
            json={"message": message("assistant")},
            headers=mallory,
        ),
        api.post(
            f"/chats/{chat_id}/inbox",
            json={"user": message(), "assistant": message("assistant")},
            headers=mallory,
        ),
        api.post(f"/chats/{chat_id}/fork", json={"up_to_message_id": first["id"]}, headers=mallory),
        api.put(f"/chats/{chat_id}/messages", json={"messages": []}, headers=mallory),
        api.delete(f"/chats/{chat_id}", headers=mallory),
    ]
    assert [a.status_code for a in attempts] == [404] * len(attempts)
    assert snapshot(engine, chat_id) == before


def test_import_needs_an_admin_token(api, auth) -> None:  # type: ignore[no-untyped-def]
    body = {"user_id": "bob", "messages": [message()]}
    assert api.post("/admin/chats/import", json=body, headers=auth("bob")).status_code == 403
    assert api.post("/admin/chats/import", json=body).status_code == 401


BAD_MESSAGES = [
    ({"role": "user", "content": "no id"}, ["body", "message", "id"]),
    ({"id": "", "role": "user", "content": "x"}, ["body", "message", "id"]),
    ({"id": 5, "role": "user", "content": "x"}, ["body", "message", "id"]),
    ({"id": "a", "role": "robot", "content": "x"}, ["body", "message", "role"]),
    ({"id": "a", "role": "assistant", "content": "x"}, ["body", "message", "role"]),
    ({"id": "a", "role": "user", "content": 12}, ["body", "message", "content"]),
    (
        {"id": "a", "role": "user", "content": "x", "timestamp": "soon"},
        ["body", "message", "timestamp"],
    ),
    (
        {"id": "a", "role": "user", "content": "x", "timestamp": 1700000000},
        ["body", "message", "timestamp"],
    ),
    ("just a string", ["body", "message"]),
]


@pytest.mark.parametrize(("bad", "field"), BAD_MESSAGES)
def test_invalid_message_is_422_naming_the_field_and_changes_nothing(
    api, auth, engine, bad, field
) -> None:  # type: ignore[no-untyped-def]
    chat_id = new_chat(api, auth)
    api.post(f"/chats/{chat_id}/messages", json={"message": message()}, headers=auth())
    before = snapshot(engine, chat_id)
    response = api.post(f"/chats/{chat_id}/messages", json={"message": bad}, headers=auth())
    assert response.status_code == 422, response.text
    assert field in [e["loc"][: len(field)] for e in response.json()["detail"]]
    assert snapshot(engine, chat_id) == before


def test_invalid_snapshot_names_the_element_and_changes_nothing(api, auth, engine) -> None:  # type: ignore[no-untyped-def]
    chat_id = new_chat(api, auth)
    api.put(f"/chats/{chat_id}/messages", json={"messages": [message()]}, headers=auth())
    before = snapshot(engine, chat_id)
    bad = [message(), message(), {"id": "x", "role": "user"}]
    response = api.put(f"/chats/{chat_id}/messages", json={"messages": bad}, headers=auth())
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "messages", 2, "content"]
    assert snapshot(engine, chat_id) == before


def test_malformed_json_and_bad_ids_are_422(api, auth) -> None:  # type: ignore[no-untyped-def]
    chat_id = new_chat(api, auth)
    raw = api.post(
        f"/chats/{chat_id}/messages",
        content=b'{"message": {',
        headers={**auth(), "Content-Type": "application/json"},
    )
    assert raw.status_code == 422
    bad_uuid = api.get("/chats/not-a-uuid", headers=auth())
    assert bad_uuid.status_code == 422
    assert bad_uuid.json()["detail"][0]["loc"] == ["path", "chat_id"]
    bad_limit = api.get(f"/chats/{chat_id}/messages?limit=0", headers=auth())
    assert bad_limit.status_code == 422
    assert bad_limit.json()["detail"][0]["loc"] == ["query", "limit"]


def test_body_above_the_request_limit_is_413_before_any_work(api, auth, engine, settings) -> None:  # type: ignore[no-untyped-def]
    chat_id = new_chat(api, auth)
    before = snapshot(engine, chat_id)
    huge = message(content="x" * (settings.max_request_bytes + 1))
    response = api.post(f"/chats/{chat_id}/messages", json={"message": huge}, headers=auth())
    assert response.status_code == 413
    assert snapshot(engine, chat_id) == before


def test_message_above_the_message_limit_is_413(api, auth, engine, settings) -> None:  # type: ignore[no-untyped-def]
    chat_id = new_chat(api, auth)
    before = snapshot(engine, chat_id)
    big = message(content="x" * (settings.max_message_bytes + 10))
    response = api.post(f"/chats/{chat_id}/messages", json={"message": big}, headers=auth())
    assert response.status_code == 413
    assert response.json()["detail"][0]["loc"] == ["body", "message"]
    assert snapshot(engine, chat_id) == before


def test_chunked_body_above_the_limit_is_413(api, auth, settings) -> None:  # type: ignore[no-untyped-def]
    chat_id = new_chat(api, auth)
    size = settings.max_request_bytes + 1

    def chunks():  # type: ignore[no-untyped-def]
        yield b'{"message": {"id": "c", "role": "user", "content": "'
        for _ in range(size // 65536 + 1):
            yield b"x" * 65536
        yield b'"}}'

    response = api.post(
        f"/chats/{chat_id}/messages",
        content=chunks(),
        headers={**auth(), "Content-Type": "application/json"},
    )
    assert response.status_code == 413
