"""HTTP routes: one per operation of DESIGN section 6, each a thin call into `app.services`."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Query, Response, status
from fastapi.responses import JSONResponse

from app import schemas
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


@router.post("/chats", status_code=status.HTTP_201_CREATED, response_model=schemas.ChatOut)
def create_chat(uow: Uow, body: schemas.CreateChat) -> schemas.ChatOut:
    return _chat_out(uow.run(service.create_chat, body))


@router.get("/chats/{chat_id}", response_model=schemas.ChatWithMessages)
def get_chat(uow: Uow, chat_id: uuid.UUID) -> schemas.ChatWithMessages:
    chat, messages = uow.run(service.get_chat, chat_id)
    return schemas.ChatWithMessages(**_chat_out(chat).model_dump(), messages=messages)


@router.delete("/chats/{chat_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_chat(uow: Uow, chat_id: uuid.UUID) -> Response:
    uow.run(service.delete_chat, chat_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/chats/{chat_id}/messages", response_model=schemas.AppendResult)
def append_message(uow: Uow, chat_id: uuid.UUID, body: schemas.AppendMessage) -> JSONResponse:
    return _appended(uow.run(service.append_user_message, chat_id, body))


@router.post(
    "/chats/{chat_id}/turns/{user_message_id}/complete", response_model=schemas.AppendResult
)
def complete_turn(
    uow: Uow, chat_id: uuid.UUID, user_message_id: str, body: schemas.CompleteTurn
) -> JSONResponse:
    return _appended(uow.run(service.complete_turn, chat_id, user_message_id, body))


@router.post("/chats/{chat_id}/inbox", response_model=schemas.AppendResult)
def inbox_pair(uow: Uow, chat_id: uuid.UUID, body: schemas.InboxPair) -> JSONResponse:
    return _appended(uow.run(service.append_inbox_pair, chat_id, body))


@router.post(
    "/chats/{chat_id}/fork", status_code=status.HTTP_201_CREATED, response_model=schemas.ChatOut
)
def fork_chat(uow: Uow, chat_id: uuid.UUID, body: schemas.Fork) -> schemas.ChatOut:
    return _chat_out(uow.run(service.fork_chat, chat_id, body))


@router.put("/chats/{chat_id}/messages")
def replace_messages(uow: Uow, chat_id: uuid.UUID, body: schemas.ReplaceMessages) -> dict[str, Any]:
    version = uow.run(service.replace_messages, chat_id, body)
    return {"chat_id": str(chat_id), "messages_version": version}


@router.get("/chats/{chat_id}/messages", response_model=schemas.MessagePage)
def read_messages(
    uow: Uow,
    chat_id: uuid.UUID,
    limit: Annotated[int, Query()] = 50,
    before_seq: Annotated[int | None, Query(ge=0, le=2**31 - 1)] = None,
) -> schemas.MessagePage:
    return uow.run(service.read_page, chat_id, limit=limit, before_seq=before_seq)


@router.post(
    "/admin/chats/import", status_code=status.HTTP_201_CREATED, response_model=schemas.ChatOut
)
def import_chat(uow: Uow, admin: AdminUser, body: schemas.ImportChat) -> schemas.ChatOut:
    return _chat_out(uow.run(service.import_chat, body))
