"""HTTP routes: one per operation of DESIGN section 6, each a thin call into `app.services`."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Query, Response, status
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from app import schemas
from app.api import body as bodies
from app.api.body import documented, json_body
from app.api.deps import AdminUser, Uow
from app.repositories.chats import Chat
from app.services import chats as service

router = APIRouter()


def _chat_out(chat: Chat) -> schemas.ChatOut:
    return schemas.ChatOut.model_validate(chat, from_attributes=True)


def _appended(result: service.Appended) -> JSONResponse:
    body = schemas.AppendResult(
        chat_id=result.chat_id,
        message_ids=result.message_ids,
        messages_version=result.version,
        created=result.created,
    )
    return JSONResponse(
        body.model_dump(mode="json"),
        status_code=status.HTTP_201_CREATED if result.created else status.HTTP_200_OK,
    )


# A body is a dependency declared before the unit of work (see `app.api.body`): it is read and
# parsed off the event loop, within the route's byte cap, after the token is checked and before
# the request's transaction begins.
CreateBody = Annotated[schemas.CreateChat, json_body(schemas.CreateChat, bodies.small)]
AppendBody = Annotated[schemas.AppendMessage, json_body(schemas.AppendMessage, bodies.messages(1))]
CompleteBody = Annotated[schemas.CompleteTurn, json_body(schemas.CompleteTurn, bodies.messages(1))]
InboxBody = Annotated[schemas.InboxPair, json_body(schemas.InboxPair, bodies.messages(2))]
ForkBody = Annotated[schemas.Fork, json_body(schemas.Fork, bodies.small)]
ReplaceBody = Annotated[
    schemas.ReplaceMessages, json_body(schemas.ReplaceMessages, bodies.transcript)
]
ImportBody = Annotated[schemas.ImportChat, json_body(schemas.ImportChat, bodies.transcript)]


@router.post(
    "/chats",
    status_code=status.HTTP_201_CREATED,
    response_model=schemas.ChatOut,
    openapi_extra=documented(schemas.CreateChat),
)
def create_chat(body: CreateBody, uow: Uow) -> schemas.ChatOut:
    return _chat_out(uow.run(service.create_chat, body))


def _json(model: BaseModel) -> Response:
    """A response serialized here, in the request's worker thread: FastAPI would serialize a
    returned model on the event loop, where a page of large messages stalls every request."""
    return Response(model.model_dump_json(), media_type="application/json")


@router.get("/chats/{chat_id}", response_model=schemas.ChatWithMessages)
def get_chat(
    uow: Uow, chat_id: uuid.UUID, limit: Annotated[int | None, Query()] = None
) -> Response:
    """The chat and the last page of its transcript (`limit`, default and at most
    MAX_PAGE_SIZE); `next_before_seq` pages back through `GET /chats/{id}/messages`."""
    size = uow.settings.max_page_size if limit is None else limit
    chat, page = uow.run(service.get_chat_page, chat_id, limit=size)
    return _json(
        schemas.ChatWithMessages(
            **_chat_out(chat).model_dump(),
            messages=page.messages,
            seqs=page.seqs,
            next_before_seq=page.next_before_seq,
        )
    )


@router.delete("/chats/{chat_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_chat(uow: Uow, chat_id: uuid.UUID) -> Response:
    uow.run(service.delete_chat, chat_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/chats/{chat_id}/messages",
    response_model=schemas.AppendResult,
    openapi_extra=documented(schemas.AppendMessage),
)
def append_message(body: AppendBody, uow: Uow, chat_id: uuid.UUID) -> JSONResponse:
    return _appended(uow.run(service.append_user_message, chat_id, body))


@router.post(
    "/chats/{chat_id}/turns/{user_message_id}/complete",
    response_model=schemas.AppendResult,
    openapi_extra=documented(schemas.CompleteTurn),
)
def complete_turn(
    body: CompleteBody, uow: Uow, chat_id: uuid.UUID, user_message_id: str
) -> JSONResponse:
    return _appended(uow.run(service.complete_turn, chat_id, user_message_id, body))


@router.post(
    "/chats/{chat_id}/inbox",
    response_model=schemas.AppendResult,
    openapi_extra=documented(schemas.InboxPair),
)
def inbox_pair(body: InboxBody, uow: Uow, chat_id: uuid.UUID) -> JSONResponse:
    return _appended(uow.run(service.append_inbox_pair, chat_id, body))


@router.post(
    "/chats/{chat_id}/fork",
    status_code=status.HTTP_201_CREATED,
    response_model=schemas.ChatOut,
    openapi_extra=documented(schemas.Fork),
)
def fork_chat(body: ForkBody, uow: Uow, chat_id: uuid.UUID) -> schemas.ChatOut:
    return _chat_out(uow.run(service.fork_chat, chat_id, body))


@router.put("/chats/{chat_id}/messages", openapi_extra=documented(schemas.ReplaceMessages))
def replace_messages(body: ReplaceBody, uow: Uow, chat_id: uuid.UUID) -> dict[str, Any]:
    version = uow.run(service.replace_messages, chat_id, body)
    return {"chat_id": str(chat_id), "messages_version": version}


@router.get("/chats/{chat_id}/messages", response_model=schemas.MessagePage)
def read_messages(
    uow: Uow,
    chat_id: uuid.UUID,
    limit: Annotated[int, Query()] = 50,
    before_seq: Annotated[int | None, Query(ge=0, le=2**31 - 1)] = None,
) -> Response:
    return _json(uow.run(service.read_page, chat_id, limit=limit, before_seq=before_seq))


@router.post(
    "/admin/chats/import",
    status_code=status.HTTP_201_CREATED,
    response_model=schemas.ChatOut,
    openapi_extra=documented(schemas.ImportChat),
)
def import_chat(admin: AdminUser, body: ImportBody, uow: Uow) -> schemas.ChatOut:
    return _chat_out(uow.run(service.import_chat, body))
