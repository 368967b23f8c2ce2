"""The rollout page's routes, under `/ops/`: one screen (`GET /ops/`), and two actions, each a
confirmation page (GET) whose form POSTs with a CSRF token.

Server-rendered, without JavaScript; links and forms are relative, so the page works behind a
proxy that mounts it under a prefix. Phase steps and the contract stay in the CLI: the page
shows the command to run.
"""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime
from typing import Annotated, Any
from urllib.parse import parse_qs

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from sqlalchemy.orm import Session, sessionmaker

from app.broker import BoundedPublisher, BrokerInspector, bounded_publisher
from app.db import transaction
from app.ops import service
from app.ops.auth import CSRF_FIELD, Forbidden, basic_user, check_csrf, check_origin, csrf_token
from app.repositories.bulk_paused import Pass
from app.settings import Settings

log = logging.getLogger(__name__)

router = APIRouter(prefix="/ops", include_in_schema=False)

# A form's body is a few ids and a token; anything larger is not the page's.
MAX_FORM_BYTES = 64 * 1024
MAX_FORM_FIELDS = 1000

# The page must not be framed (a framed confirmation could be clicked by a hidden hand), cached,
# or load anything from elsewhere.
HEADERS = {
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
}


def _when(value: datetime | None) -> str:
    return "-" if value is None else value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _number(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


templates = Environment(
    loader=PackageLoader("app.ops", "templates"),
    autoescape=select_autoescape(default=True, default_for_string=True),
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
templates.filters.update(when=_when, number=_number, age=service.age)


def _page(template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    html = templates.get_template(template).render(**context)
    return HTMLResponse(html, status_code=status_code, headers=HEADERS)


class OpsState:
    """What the page keeps for the app's life: the broker's queue depths, and, built on first
    replay, a bounded publisher (the CLI's kind)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.broker = BrokerInspector(settings, timeout=0.5)
        self._publisher: BoundedPublisher | None = None
        self._lock = threading.Lock()

    def publisher(self) -> BoundedPublisher:
        with self._lock:
            if self._publisher is None:
                self._publisher = bounded_publisher(self.settings)
            return self._publisher


def install(api: FastAPI) -> None:
    """Mount the page on the API. Without `OPS_BASIC_AUTH` it is not mounted: every path of it
    answers 404, whatever the method."""
    api.state.ops = OpsState(api.state.settings)
    if api.state.settings.ops_basic_auth is not None:
        api.include_router(router)


def _user(request: Request) -> str:
    return basic_user(request, request.app.state.settings)


OpsUser = Annotated[str, Depends(_user)]


def _who(request: Request, user: str) -> str:
    # As the CLI's `user@host`: the basic-auth user, and where the request came from.
    client = request.client.host if request.client else "unknown"
    return f"{user}@{client} (ops page)"


def _factory(request: Request) -> sessionmaker[Session]:
    factory: sessionmaker[Session] = request.app.state.sessionmaker
    return factory


def _invalid(field: str, message: str, home: str) -> HTMLResponse:
    return _page("error.html", 422, status=422, field=field, message=message, home=home)


@router.get("/", name="ops_index")
def index(request: Request, user: OpsUser) -> HTMLResponse:
    ops: OpsState = request.app.state.ops
    with transaction(_factory(request)) as session:
        found = service.overview(session, ops.settings, ops.broker.depths)
    return _page(
        "index.html",
        o=found,
        user=user,
        refresh=ops.settings.ops_refresh_seconds,
        now=datetime.now(UTC),
        home="./",
    )


# ------------------------------------------------------------------------------------------
# Replay dead letters: `python -m app dead-letters replay IDS|--all`.


@router.get("/replay")
def confirm_replay(
    request: Request,
    user: OpsUser,
    ids: Annotated[list[int] | None, Query(alias="id")] = None,
    every: Annotated[bool, Query(alias="all")] = False,
) -> HTMLResponse:
    if not ids and not every:
        return _invalid("id", "replay needs dead letter ids or all=1", "./")
    with transaction(_factory(request)) as session:
        shown = service.letters_to_replay(session, None if every else ids)
    return _page(
        "confirm_replay.html",
        letters=shown.letters,
        total=shown.total,
        through=shown.through,
        ids=[] if every else ids,
        every=every,
        command="python -m app dead-letters replay "
        + ("--all" if every else " ".join(str(i) for i in ids or [])),
        csrf_field=CSRF_FIELD,
        csrf=csrf_token(request.app.state.settings, user, request.url.path),
        home="./",
    )


@router.post("/replay")
async def replay(request: Request, user: OpsUser) -> HTMLResponse:
    form = await _form(request, user, home="./")
    if isinstance(form, HTMLResponse):
        return form
    every = form.get("all") == ["1"]
    try:
        ids = [int(value) for value in form.get("id", [])]
    except ValueError:
        return _invalid("id", "a dead letter id is a whole number", "./")
    if not ids and not every:
        return _invalid("id", "replay needs dead letter ids or all=1", "./")
    through = None
    if every:
        values = form.get("through", [])
        if len(values) != 1 or not values[0].isdigit():
            return _invalid(
                "through", "replay of all needs the newest letter id its confirmation showed", "./"
            )
        through = int(values[0])
    ops: OpsState = request.app.state.ops
    outcome = await run_in_threadpool(
        service.replay_letters,
        _factory(request),
        ops.publisher(),
        None if every else ids,
        who=_who(request, user),
        through=through,
    )
    return _page("replayed.html", outcome=outcome, home="./")


# ------------------------------------------------------------------------------------------
# Pause and resume the scheduled bulk passes: `python -m app bulk pause|resume [PASS...]`.


def _passes(values: list[str]) -> list[Pass] | str:
    known = {p.value: p for p in Pass}
    unknown = [v for v in values if v not in known]
    if unknown:
        return f"unknown pass {unknown[0]!r}; passes: " + ", ".join(known)
    return [known[v] for v in values]


@router.get("/bulk/{action}")
def confirm_bulk(
    request: Request,
    user: OpsUser,
    action: str,
    names: Annotated[list[str] | None, Query(alias="pass")] = None,
) -> HTMLResponse:
    if action not in ("pause", "resume"):
        return _invalid("action", f"{action!r} is neither pause nor resume", "../")
    passes = _passes(names or [])
    if isinstance(passes, str):
        return _invalid("pass", passes, "../")
    chosen = passes or list(Pass)
    return _page(
        "confirm_bulk.html",
        action=action,
        passes=chosen,
        named=passes,
        command=f"python -m app bulk {action} " + " ".join(p.value for p in chosen),
        csrf_field=CSRF_FIELD,
        csrf=csrf_token(request.app.state.settings, user, request.url.path),
        home="../",
    )


@router.post("/bulk/{action}")
async def bulk(request: Request, user: OpsUser, action: str) -> HTMLResponse:
    if action not in ("pause", "resume"):
        return _invalid("action", f"{action!r} is neither pause nor resume", "../")
    form = await _form(request, user, home="../")
    if isinstance(form, HTMLResponse):
        return form
    passes = _passes(form.get("pass", []))
    if isinstance(passes, str):
        return _invalid("pass", passes, "../")
    act = service.pause if action == "pause" else service.resume
    changed = await run_in_threadpool(act, _factory(request), passes, who=_who(request, user))
    return _page(
        "bulk_done.html",
        action=action,
        passes=passes or list(Pass),
        changed=changed,
        home="../",
    )


async def _form(request: Request, user: str, *, home: str) -> dict[str, list[str]] | HTMLResponse:
    """The POSTed form, once it proves it came from the page (origin, CSRF token)."""
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        return _page(
            "error.html",
            413,
            status=413,
            field="body",
            message=f"a form of the page is at most {MAX_FORM_BYTES} bytes",
            home=home,
        )
    try:
        form = parse_qs(
            body.decode("utf-8"), keep_blank_values=True, max_num_fields=MAX_FORM_FIELDS
        )
    except (UnicodeDecodeError, ValueError):
        return _invalid("body", "not a form of the page (application/x-www-form-urlencoded)", home)
    settings: Settings = request.app.state.settings
    try:
        check_origin(request)
        tokens = form.get(CSRF_FIELD, [])
        check_csrf(settings, user, request.url.path, tokens[0] if len(tokens) == 1 else None)
    except Forbidden as refused:
        log.warning(
            "ops page: refused a POST to %s by %s: %s: %s",
            request.url.path,
            _who(request, user),
            refused.field,
            refused.message,
        )
        return _page(
            "error.html",
            403,
            status=403,
            field=refused.field,
            message=refused.message,
            home=home,
        )
    return form
