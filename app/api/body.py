"""Request bodies, read within a byte cap per route and parsed off the event loop.

FastAPI would decode and validate a body on the event loop before the handler runs: a 16 MiB
body of millions of tiny objects stalls every other request of the process (health checks
included) for seconds. Here a route's body is a dependency that reads at most the route's cap
(413 beyond it, before anything is parsed), counts its JSON values with a few byte scans (413
past `max_request_nodes`, before anything is parsed), then decodes and validates it in a
worker thread. The work the event loop and the GIL do per request is bounded by those caps.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

import anyio.to_thread
from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from app.api.deps import UserGate
from app.errors import TooLarge, Unavailable
from app.settings import Settings

M = TypeVar("M", bound=BaseModel)

# Room for a body's own keys and punctuation around the messages it carries.
ENVELOPE_BYTES = 64 * 1024


def small(settings: Settings) -> int:
    """Bodies without a message (create, fork): a few short fields."""
    return min(ENVELOPE_BYTES, settings.max_request_bytes)


def messages(count: int) -> Callable[[Settings], int]:
    """Bodies of `count` messages, each at most `max_message_bytes` (append, complete, inbox)."""

    def cap(settings: Settings) -> int:
        return min(count * settings.max_message_bytes + ENVELOPE_BYTES, settings.max_request_bytes)

    return cap


def transcript(settings: Settings) -> int:
    """Bodies of a whole transcript (replace, import): the request cap itself."""
    return settings.max_request_bytes


def count_values(raw: bytes, limit: int) -> int:
    """How many JSON values `raw` holds (objects, arrays, strings, numbers, literals): at most
    `limit` only if the body holds at most that many (an empty object or array counts twice).

    A value is the document itself or follows a comma, or opens a container: 1 + commas +
    brackets, outside strings. Every step is a byte scan in C, never a loop in Python per value.
    The common body (few commas and brackets, whatever its size) passes on three scans, which
    count those inside strings too. Otherwise escapes are dropped, so that every quote left
    delimits a string, and only the text between strings is counted; a body with more strings
    than two per value allowed (a key and a value) is over the limit without looking further.
    """
    total = 1 + raw.count(b",") + raw.count(b"[") + raw.count(b"{")
    if total <= limit or b'"' not in raw:  # no string: the count is exact
        return total
    plain = raw.replace(b"\\\\", b"").replace(b'\\"', b"") if b"\\" in raw else raw
    strings = plain.count(b'"') // 2
    if strings > 2 * limit + 2:
        return strings
    outside = b"".join(plain.split(b'"')[0::2])
    return 1 + outside.count(b",") + outside.count(b"[") + outside.count(b"{")


def too_large(message: str) -> TooLarge:
    return TooLarge(message, field=("body",))


async def read_capped(request: Request, cap: int) -> bytes:
    """The body, or 413 as soon as it is known to exceed `cap` bytes (declared or received)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > cap:
        raise too_large(f"request body is larger than {cap} bytes, the limit of this route")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            raise too_large(f"request body is larger than {cap} bytes, the limit of this route")
        chunks.append(chunk)
    return b"".join(chunks)


def parse(raw: bytes, model: type[M], max_nodes: int) -> M:
    """Count, decode and validate a body (in a worker thread). Errors name the field, as
    FastAPI's own would, under `body`."""
    if not raw:
        raise RequestValidationError(
            [{"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}]
        )
    try:
        # Strictly UTF-8 (RFC 8259): the value count reads bytes as UTF-8, and `json.loads` of
        # bytes would take UTF-16 or UTF-32 too, whose bytes it would miscount.
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestValidationError(
            [
                {
                    "type": "json_invalid",
                    "loc": ("body", exc.start),
                    "msg": "request body is not UTF-8",
                    "input": {},
                }
            ]
        ) from None
    values = count_values(raw, max_nodes)
    if values > max_nodes:
        raise too_large(
            f"request body holds more than {max_nodes} JSON values (objects, arrays, strings, "
            "numbers, literals), the limit MAX_REQUEST_NODES"
        )
    try:
        data = json.loads(text)
    except RecursionError:
        raise RequestValidationError(
            [
                {
                    "type": "too_deep",
                    "loc": ("body",),
                    "msg": "objects and arrays nest too deeply to decode",
                    "input": None,
                }
            ]
        ) from None
    except ValueError as exc:  # JSONDecodeError
        position = getattr(exc, "pos", 0)
        raise RequestValidationError(
            [
                {
                    "type": "json_invalid",
                    "loc": ("body", position),
                    "msg": "JSON decode error",
                    "input": {},
                    "ctx": {"error": getattr(exc, "msg", str(exc))},
                }
            ]
        ) from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors: list[Any] = [{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]
        raise RequestValidationError(errors) from None


def _parsing(request: Request) -> tuple[anyio.Lock, anyio.CapacityLimiter]:
    """The process's one turn for parsing bodies, and the thread it parses in. Decoding holds
    the GIL: each thread that parses beside the event loop's makes every step of every other
    request wait longer for it (a /healthz needs a dozen such steps), so large bodies are parsed
    one at a time, and the rest wait for their turn in the event loop, holding neither a thread
    nor the GIL, for at most BODY_PARSE_WAIT_SECONDS."""
    state = request.app.state
    if not hasattr(state, "body_parsing"):
        state.body_parsing = (anyio.Lock(), anyio.CapacityLimiter(1))
    parsing: tuple[anyio.Lock, anyio.CapacityLimiter] = state.body_parsing
    return parsing


async def parse_in_turn(request: Request, raw: bytes, model: type[M], settings: Settings) -> M:
    """`parse` in a worker thread once it is this body's turn, or 503 with `Retry-After` when
    the turn does not come within `body_parse_wait_seconds`.

    A body of at most `ENVELOPE_BYTES` (a create, a fork, a short message) takes no turn: its
    parse holds the GIL for about a millisecond, while waiting behind another user's
    transcripts would cost it a second."""
    if len(raw) <= ENVELOPE_BYTES:
        return await anyio.to_thread.run_sync(parse, raw, model, settings.max_request_nodes)
    turn, thread = _parsing(request)
    try:
        with anyio.fail_after(settings.body_parse_wait_seconds):
            await turn.acquire()
    except TimeoutError:
        raise Unavailable(
            "the request bodies ahead of this one took over BODY_PARSE_WAIT_SECONDS="
            f"{settings.body_parse_wait_seconds:g}s to parse",
            field=("body",),
        ) from None
    try:
        return await anyio.to_thread.run_sync(
            parse, raw, model, settings.max_request_nodes, limiter=thread
        )
    finally:
        turn.release()


def json_body(model: type[M], cap: Callable[[Settings], int]) -> Any:
    """A dependency for a route's body: `body: Annotated[Model, json_body(Model, cap)]`.

    It passes the user's gate (`app.api.deps.user_gate`, which needs the current user: an
    unauthenticated request is answered 401 before its body is read), so one user has at most
    USER_CONCURRENCY bodies read or waiting to parse. Declare it before the unit of work, so
    no transaction waits on a slow upload; the unit of work shares the gate's place.
    """

    async def dependency(request: Request, _: UserGate) -> M:
        settings: Settings = request.app.state.settings
        raw = await read_capped(request, cap(settings))
        return await parse_in_turn(request, raw, model, settings)

    return Depends(dependency)


def documented(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` for a route whose body is `json_body(model, ...)`: FastAPI documents
    only the bodies it parses itself. The schema is inlined (these models are not recursive)."""
    schema = model.model_json_schema()
    definitions = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return inline(definitions[ref.removeprefix("#/$defs/")])
            return {key: inline(value) for key, value in node.items()}
        if isinstance(node, list):
            return [inline(item) for item in node]
        return node

    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": inline(schema)}},
        }
    }
