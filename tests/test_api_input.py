"""Authentication, ownership and bad input: clear 4xx answers, and nothing stored changes."""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import jwt
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text

from app import schemas
from app.api import body as body_module
from app.api.body import ENVELOPE_BYTES, count_values
from app.settings import Settings
from tests.support import AuthHeaders, snapshot
from tests.test_handlers import jsonb, message, new_chat


def test_missing_token_is_401(api: TestClient) -> None:
    assert api.post("/chats", json={}).status_code == 401


def test_forged_token_is_401(api: TestClient) -> None:
    forged = jwt.encode({"sub": "alice", "exp": 4102444800}, "not-the-secret-" * 4, "HS256")
    response = api.post("/chats", json={}, headers={"Authorization": f"Bearer {forged}"})
    assert response.status_code == 401


def test_token_without_expiry_or_with_other_algorithm_is_401(
    api: TestClient, settings: Settings
) -> None:
    secret = settings.signing_secret
    no_exp = jwt.encode({"sub": "alice"}, secret, "HS256")
    other_alg = jwt.encode({"sub": "alice", "exp": 4102444800}, secret, "HS512")
    for token in (no_exp, other_alg, "garbage"):
        response = api.get(
            "/chats/00000000-0000-0000-0000-000000000000",
            headers={"Authorization": f"Bearer {token}"},
        )
        assert response.status_code == 401, token


def test_another_users_chat_is_404_for_every_route(
    api: TestClient, auth: AuthHeaders, engine: Engine
) -> None:
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


def test_import_needs_an_admin_token(api: TestClient, auth: AuthHeaders) -> None:
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
    api: TestClient,
    auth: AuthHeaders,
    engine: Engine,
    bad: object,
    field: str,
) -> None:
    chat_id = new_chat(api, auth)
    api.post(f"/chats/{chat_id}/messages", json={"message": message()}, headers=auth())
    before = snapshot(engine, chat_id)
    response = api.post(f"/chats/{chat_id}/messages", json={"message": bad}, headers=auth())
    assert response.status_code == 422, response.text
    assert field in [e["loc"][: len(field)] for e in response.json()["detail"]]
    assert snapshot(engine, chat_id) == before


def test_invalid_snapshot_names_the_element_and_changes_nothing(
    api: TestClient, auth: AuthHeaders, engine: Engine
) -> None:
    chat_id = new_chat(api, auth)
    api.put(f"/chats/{chat_id}/messages", json={"messages": [message()]}, headers=auth())
    before = snapshot(engine, chat_id)
    bad = [message(), message(), {"id": "x", "role": "user"}]
    response = api.put(f"/chats/{chat_id}/messages", json={"messages": bad}, headers=auth())
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "messages", 2, "content"]
    assert snapshot(engine, chat_id) == before


def test_malformed_json_and_bad_ids_are_422(api: TestClient, auth: AuthHeaders) -> None:
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
    for before_seq in (2**31, 2**63, -1):  # past what a seq can hold: not a database error
        page = api.get(f"/chats/{chat_id}/messages?before_seq={before_seq}", headers=auth())
        assert page.status_code == 422, before_seq
        assert page.json()["detail"][0]["loc"] == ["query", "before_seq"]


def test_body_above_the_request_limit_is_413_before_any_work(
    api: TestClient, auth: AuthHeaders, engine: Engine, settings: Settings
) -> None:
    chat_id = new_chat(api, auth)
    before = snapshot(engine, chat_id)
    huge = message(content="x" * (settings.max_request_bytes + 1))
    response = api.post(f"/chats/{chat_id}/messages", json={"message": huge}, headers=auth())
    assert response.status_code == 413
    assert snapshot(engine, chat_id) == before


def test_message_above_the_message_limit_is_413(
    api: TestClient, auth: AuthHeaders, engine: Engine, settings: Settings
) -> None:
    chat_id = new_chat(api, auth)
    before = snapshot(engine, chat_id)
    big = message(content="x" * (settings.max_message_bytes + 10))
    response = api.post(f"/chats/{chat_id}/messages", json={"message": big}, headers=auth())
    assert response.status_code == 413
    assert response.json()["detail"][0]["loc"] == ["body", "message"]
    assert snapshot(engine, chat_id) == before


def test_chunked_body_above_the_limit_is_413(
    api: TestClient, auth: AuthHeaders, settings: Settings
) -> None:
    chat_id = new_chat(api, auth)
    size = settings.max_request_bytes + 1

    def chunks() -> Iterator[bytes]:
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


# ---------------------------------------------------------------------------------------------
# Input PostgreSQL cannot store: NUL and lone surrogates in text or keys, numbers that parsed to
# NaN or infinity, nesting beyond `max_message_depth`. Each is a 422 naming its path, never a 500.

HUGE = "@1e400@"  # replaced by the literal 1e400, which no Python float prints as


def raw_json(value: object) -> bytes:
    """The body as a client may write it: `\\u0000` and `\\ud800` escapes, `NaN`, `Infinity`."""
    return json.dumps(value, ensure_ascii=True).replace(f'"{HUGE}"', "1e400").encode()


def send_raw(
    api: TestClient, method: str, url: str, body: object, headers: dict[str, str]
) -> httpx.Response:
    response: httpx.Response = api.request(
        method,
        url,
        content=raw_json(body),
        headers={**headers, "Content-Type": "application/json"},
    )
    return response


def stored(engine: Engine, chat_id: str) -> tuple[dict[str, Any], Any, int]:
    """The chat row, its wanted version, and how many chats an import for this chat made."""
    with engine.connect() as connection:
        wanted = connection.execute(
            text("SELECT wanted_version FROM copilot_chat_sync_state WHERE chat_id = :id"),
            {"id": chat_id},
        ).scalar_one_or_none()
        imported = connection.execute(
            text("SELECT count(*) FROM copilot_chats WHERE user_id = :user"),
            {"user": f"imported-{chat_id}"},
        ).scalar_one()
    return snapshot(engine, chat_id), wanted, imported


MESSAGE_ROUTES = ["append", "complete", "inbox", "replace", "import"]


def prepare(
    api: TestClient, auth: AuthHeaders, route: str, fields: dict[str, object]
) -> tuple[str, list[str | int], Callable[[], httpx.Response]]:
    """A chat with an open turn, and a `route` request carrying a message with `fields`.

    Returns the chat id, where that message sits in the body, and the request to send.
    """
    chat_id = new_chat(api, auth)
    first = message()
    opened = api.post(f"/chats/{chat_id}/messages", json={"message": first}, headers=auth())
    assert opened.status_code == 201, opened.text
    bad_user, bad_assistant = message(**fields), message("assistant", **fields)
    if route == "append":
        call: tuple[str, str, object, dict[str, str]] = (
            "POST",
            f"/chats/{chat_id}/messages",
            {"message": bad_user},
            auth(),
        )
        where: list[str | int] = ["body", "message"]
    elif route == "complete":
        url = f"/chats/{chat_id}/turns/{first['id']}/complete"
        call = ("POST", url, {"message": bad_assistant}, auth())
        where = ["body", "message"]
    elif route == "inbox":
        call = (
            "POST",
            f"/chats/{chat_id}/inbox",
            {"user": message(), "assistant": bad_assistant},
            auth(),
        )
        where = ["body", "assistant"]
    elif route == "replace":
        call = ("PUT", f"/chats/{chat_id}/messages", {"messages": [first, bad_user]}, auth())
        where = ["body", "messages", 1]
    else:
        body = {"user_id": f"imported-{chat_id}", "messages": [message(), bad_user]}
        call = ("POST", "/admin/chats/import", body, auth("root", admin=True))
        where = ["body", "messages", 1]
    return chat_id, where, lambda: send_raw(api, *call)


NUL = "contains a NUL character (\\u0000), which PostgreSQL cannot store"
SURROGATE = "contains a lone surrogate (\\u{}), which is not valid Unicode"
NOT_FINITE = "number is NaN or infinite"

UNSTORABLE = [
    ("nul-content", {"content": "tool output\x00tail"}, ["content"], "unstorable_text", NUL),
    ("nul-id", {"id": "m-\x00"}, ["id"], "unstorable_text", NUL),
    (
        "nul-nested",
        {"meta": {"tool_output": ["ok", "bin\x00ary"]}},
        ["meta", "tool_output", 1],
        "unstorable_text",
        NUL,
    ),
    ("nul-key", {"meta": {"bad\x00key": 1}}, ["meta", "bad\x00key"], "unstorable_key", NUL),
    (
        "surrogate-content",
        {"content": "half an emoji \ud83d"},
        ["content"],
        "unstorable_text",
        SURROGATE.format("d83d"),
    ),
    (
        "surrogate-nested",
        {"meta": [{"t": "\udc00"}]},
        ["meta", 0, "t"],
        "unstorable_text",
        SURROGATE.format("dc00"),
    ),
    # A key that is not valid Unicode is named by its escape.
    ("surrogate-key", {"\ud800": 1}, ["\\ud800"], "unstorable_key", SURROGATE.format("d800")),
    ("nan", {"score": float("nan")}, ["score"], "non_finite_number", NOT_FINITE),
    (
        "infinity",
        {"meta": {"score": float("-inf")}},
        ["meta", "score"],
        "non_finite_number",
        NOT_FINITE,
    ),
    ("1e400", {"meta": [1, HUGE]}, ["meta", 1], "non_finite_number", NOT_FINITE),
]


@pytest.mark.parametrize("route", MESSAGE_ROUTES)
@pytest.mark.parametrize(
    ("fields", "path", "kind", "says"),
    [case[1:] for case in UNSTORABLE],
    ids=[case[0] for case in UNSTORABLE],
)
def test_unstorable_message_is_422_naming_its_path_and_changes_nothing(
    api: TestClient,
    auth: AuthHeaders,
    engine: Engine,
    route: str,
    fields: dict[str, object],
    path: list[str | int],
    kind: str,
    says: str,
) -> None:
    chat_id, where, send = prepare(api, auth, route, fields)
    before = stored(engine, chat_id)
    response = send()
    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    assert error["loc"] == where + path
    assert error["type"] == kind
    assert says in error["msg"]
    assert stored(engine, chat_id) == before


def nested(levels: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(levels - 1):
        value = [value]
    return value


@pytest.mark.parametrize("route", MESSAGE_ROUTES)
def test_message_nested_beyond_the_depth_limit_is_422_and_changes_nothing(
    api: TestClient,
    auth: AuthHeaders,
    engine: Engine,
    settings: Settings,
    route: str,
) -> None:
    limit = settings.max_message_depth
    # The message is level 1 and `meta` level 2: its innermost array is one level too deep.
    chat_id, where, send = prepare(api, auth, route, {"meta": nested(limit)})
    before = stored(engine, chat_id)
    response = send()
    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    assert error["loc"] == [*where, "meta", *[0] * (limit - 1)]
    assert error["type"] == "too_deep"
    assert error["ctx"] == {"max_depth": limit}
    assert f"more than {limit} levels deep" in error["msg"]
    assert stored(engine, chat_id) == before


def test_message_nested_up_to_the_depth_limit_is_stored(
    api: TestClient, auth: AuthHeaders, settings: Settings
) -> None:
    chat_id = new_chat(api, auth)
    deepest = message(meta=nested(settings.max_message_depth - 1))
    response = api.post(f"/chats/{chat_id}/messages", json={"message": deepest}, headers=auth())
    assert response.status_code == 201, response.text
    assert jsonb(api, auth, chat_id)[0]["meta"] == deepest["meta"]


def test_the_depth_limit_is_a_setting(
    api: TestClient,
    auth: AuthHeaders,
    engine: Engine,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(
        schemas, "get_settings", lambda: settings.model_copy(update={"max_message_depth": 3})
    )
    chat_id = new_chat(api, auth)
    fits = message(meta={"a": ["level 3"]})
    response = api.post(f"/chats/{chat_id}/messages", json={"message": fits}, headers=auth())
    assert response.status_code == 201, response.text
    before = stored(engine, chat_id)
    deeper = message(meta={"a": [["level 4"]]})
    response = api.post(f"/chats/{chat_id}/messages", json={"message": deeper}, headers=auth())
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["body", "message", "meta", "a", 0]
    assert stored(engine, chat_id) == before


def test_numbers_jsonb_can_hold_are_stored_exactly(api: TestClient, auth: AuthHeaders) -> None:
    chat_id = new_chat(api, auth)
    numbers: dict[str, Any] = {
        "beyond_bigint": 2**70,
        "largest_double": 1.7976931348623157e308,
        "tiny": 5e-324,
    }
    response = api.post(
        f"/chats/{chat_id}/messages", json={"message": message(**numbers)}, headers=auth()
    )
    assert response.status_code == 201, response.text
    element = jsonb(api, auth, chat_id)[0]
    # jsonb keeps numbers as decimals: the largest double comes back as its decimal digits.
    assert element["beyond_bigint"] == 2**70
    assert float(element["largest_double"]) == numbers["largest_double"]
    assert float(element["tiny"]) == numbers["tiny"]


def chats_of(engine: Engine, user: str) -> int:
    with engine.connect() as connection:
        count: int = connection.execute(
            text("SELECT count(*) FROM copilot_chats WHERE user_id = :user"), {"user": user}
        ).scalar_one()
    return count


@pytest.mark.parametrize("field", ["title", "model", "workflow_id"])
@pytest.mark.parametrize(
    ("value", "says"),
    [("a\x00b", NUL), ("a\ud800b", SURROGATE.format("d800"))],
    ids=["nul", "surrogate"],
)
def test_unstorable_chat_field_is_422_and_creates_nothing(
    api: TestClient,
    auth: AuthHeaders,
    engine: Engine,
    field: str,
    value: object,
    says: str,
) -> None:
    user = f"creator-{uuid.uuid4().hex[:8]}"
    response = send_raw(api, "POST", "/chats", {field: value}, auth(user))
    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", field]
    assert says in error["msg"]
    assert chats_of(engine, user) == 0


@pytest.mark.parametrize(
    ("field", "value"),
    [("user_id", "a\x00b"), ("title", "\udfff"), ("model", "m\x00"), ("workflow_id", "\x00")],
)
def test_unstorable_import_field_is_422_and_creates_nothing(
    api: TestClient,
    auth: AuthHeaders,
    engine: Engine,
    field: str,
    value: object,
) -> None:
    user = f"importee-{uuid.uuid4().hex[:8]}"
    body = {"user_id": user, "messages": [message()], field: value}
    response = send_raw(api, "POST", "/admin/chats/import", body, auth("root", admin=True))
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["body", field]
    assert chats_of(engine, user) == 0
    body[field] = user
    imported = send_raw(api, "POST", "/admin/chats/import", body, auth("root", admin=True))
    assert imported.status_code == 201, imported.text  # the same body with that field storable


@pytest.mark.parametrize("up_to", ["m\x00", "m\ud800"], ids=["nul", "surrogate"])
def test_unstorable_fork_point_is_422_and_forks_nothing(
    api: TestClient,
    auth: AuthHeaders,
    engine: Engine,
    up_to: str,
) -> None:
    user = f"forker-{uuid.uuid4().hex[:8]}"
    chat_id = new_chat(api, auth, user)
    api.post(f"/chats/{chat_id}/messages", json={"message": message()}, headers=auth(user))
    before = snapshot(engine, chat_id)
    response = send_raw(
        api, "POST", f"/chats/{chat_id}/fork", {"up_to_message_id": up_to}, auth(user)
    )
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["body", "up_to_message_id"]
    assert chats_of(engine, user) == 1
    assert snapshot(engine, chat_id) == before


def test_validation_error_about_nan_or_a_lone_surrogate_is_a_422_itself(
    api: TestClient, auth: AuthHeaders
) -> None:
    # Errors that are not about storability still meet such input: the answer must not echo it.
    chat_id = new_chat(api, auth)
    bodies = [
        ("/chats", "POST", {"title": float("nan")}, ["body", "title"]),
        (
            f"/chats/{chat_id}/messages",
            "PUT",
            {"messages": {"\ud800": float("inf")}},
            ["body", "messages"],
        ),
        (
            f"/chats/{chat_id}/messages",
            "POST",
            {"message": [float("nan"), "\udc00"]},
            ["body", "message"],
        ),
    ]
    for url, method, body, loc in bodies:
        response = send_raw(api, method, url, body, auth())
        assert response.status_code == 422, (url, response.text)
        assert response.json()["detail"][0]["loc"] == loc
        assert "input" not in response.json()["detail"][0]


# ---------------------------------------------------------------------------------------------
# The work a body costs is bounded before it is parsed: a byte cap per route, a cap on its JSON
# values, and decoding and validation off the event loop, after the token is checked.


def values_of(value: object) -> int:
    if isinstance(value, dict):
        return 1 + sum(values_of(v) for v in value.values())
    if isinstance(value, list):
        return 1 + sum(values_of(v) for v in value)
    return 1


TRICKY = ["a,b", "[{,}]", 'quote " inside', "back\\slash", 'both \\" and \\\\"', "é,ü[{", ""]


@pytest.mark.parametrize("seed", range(30))
def test_counting_values_accepts_exactly_the_bodies_within_the_limit(seed: int) -> None:
    """Commas, brackets and escaped quotes inside strings are not values; a body of exactly
    `limit` values passes, one more is refused."""
    rng = random.Random(seed)

    def document(depth: int) -> object:
        kind = rng.randrange(5 if depth < 4 else 3)
        if kind == 0:
            return rng.choice(TRICKY) + str(rng.random())
        if kind == 1:
            return rng.choice([0, -1.5e10, True, None, False])
        if kind == 2:
            return rng.choice(TRICKY)
        if kind == 3:
            return [document(depth + 1) for _ in range(rng.randint(1, 4))]
        return {rng.choice(TRICKY) + str(i): document(depth + 1) for i in range(rng.randint(1, 4))}

    doc = {"root": document(0)}
    values = values_of(doc)
    for ensure_ascii in (True, False):
        raw = json.dumps(doc, ensure_ascii=ensure_ascii).encode()
        assert count_values(raw, values) <= values
        assert count_values(raw, values - 1) > values - 1
        assert count_values(raw, 10**9) >= values  # the quick count is an upper bound


def test_a_body_with_more_values_than_the_limit_is_413_before_it_is_parsed(
    api: TestClient,
    auth: AuthHeaders,
    engine: Engine,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    chat_id = new_chat(api, auth)
    before = snapshot(engine, chat_id)
    not_json = type("NotJson", (), {"loads": None})  # a parse would fail loudly
    monkeypatch.setattr(body_module, "json", not_json)
    limit = settings.max_request_nodes
    tiny_objects = b"[" + b"{}," * limit + b"{}]"
    raw = b'{"message": {"id": "m", "role": "user", "content": "x", "meta": %s}}' % tiny_objects
    response = api.post(
        f"/chats/{chat_id}/messages",
        content=raw,
        headers={**auth(), "Content-Type": "application/json"},
    )
    assert response.status_code == 413, response.text
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body"]
    assert f"more than {limit} JSON values" in error["msg"] and "MAX_REQUEST_NODES" in error["msg"]
    assert snapshot(engine, chat_id) == before


def test_commas_and_brackets_inside_strings_are_not_values(
    api: TestClient, auth: AuthHeaders, settings: Settings
) -> None:
    chat_id = new_chat(api, auth)
    code = '{"a": [1, 2, "\\"]"], "b": {}}, ' * (settings.max_request_nodes // 4)
    response = api.post(
        f"/chats/{chat_id}/messages", json={"message": message(content=code)}, headers=auth()
    )
    assert response.status_code == 201, response.text[:500]


def test_a_body_nested_too_deep_to_decode_is_422(api: TestClient, auth: AuthHeaders) -> None:
    chat_id = new_chat(api, auth)
    raw = b'{"message": {"id": "m", "role": "user", "content": "x", "meta": %s}}' % (
        b"[" * 5000 + b"]" * 5000
    )
    response = api.post(
        f"/chats/{chat_id}/messages",
        content=raw,
        headers={**auth(), "Content-Type": "application/json"},
    )
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"][0] == "body"


@pytest.mark.parametrize(
    ("route", "cap"),
    [
        ("create", lambda s: ENVELOPE_BYTES),
        ("fork", lambda s: ENVELOPE_BYTES),
        ("append", lambda s: s.max_message_bytes + ENVELOPE_BYTES),
    ],
)
def test_a_route_that_carries_less_has_a_smaller_body_cap(
    api: TestClient,
    auth: AuthHeaders,
    engine: Engine,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    route: str,
    cap: Callable[[Settings], int],
) -> None:
    chat_id = new_chat(api, auth)
    before = snapshot(engine, chat_id)
    monkeypatch.setattr(body_module, "json", type("NotJson", (), {"loads": None}))
    size = cap(settings) + 1
    assert size < settings.max_request_bytes
    padding = "x" * size
    url, payload = {
        "create": ("/chats", {"title": padding}),
        "fork": (f"/chats/{chat_id}/fork", {"up_to_message_id": padding}),
        "append": (f"/chats/{chat_id}/messages", {"message": message(content=padding)}),
    }[route]
    response = api.post(url, json=payload, headers=auth())
    assert response.status_code == 413, response.text
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body"] and f"larger than {cap(settings)} bytes" in error["msg"]
    assert snapshot(engine, chat_id) == before


def test_an_unauthenticated_body_is_never_read(
    api: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(body_module, "json", type("NotJson", (), {"loads": None}))
    raw = b"[" + b"{}," * 1_000_000 + b"{}]"
    response = api.post(
        "/admin/chats/import", content=raw, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 401


def test_a_body_that_is_not_utf8_is_422_however_json_would_read_it(
    api: TestClient, auth: AuthHeaders
) -> None:
    """UTF-16 is JSON to `json.loads` of bytes, but its bytes would be miscounted as UTF-8: a
    stray quote byte hides every value after it from the cap. Only UTF-8 is taken."""
    chat = api.post("/chats", json={}, headers=auth()).json()["id"]
    body = ('{"\u0122": 0, "messages": [' + ",".join(["1"] * 1000) + "]}").encode("utf-16-le")
    response = api.put(
        f"/chats/{chat}/messages",
        content=body,
        headers={**auth(), "Content-Type": "application/json"},
    )
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"][0] == "body"
    latin = api.put(
        f"/chats/{chat}/messages",
        content='{"messages": [], "title": "caf\u00e9"}'.encode("latin-1"),
        headers={**auth(), "Content-Type": "application/json"},
    )
    assert latin.status_code == 422, latin.text
    assert latin.json()["detail"][0]["msg"] == "request body is not UTF-8"


def test_a_422_lists_the_first_errors_and_counts_them_all(
    api: TestClient, auth: AuthHeaders
) -> None:
    chat = api.post("/chats", json={}, headers=auth()).json()["id"]
    response = api.put(f"/chats/{chat}/messages", json={"messages": [1] * 5000}, headers=auth())
    assert response.status_code == 422
    assert len(response.json()["detail"]) == 20
    assert response.json()["error_count"] == 5000
    assert response.json()["detail"][0]["loc"] == ["body", "messages", 0]
