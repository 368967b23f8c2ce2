"""Request and response bodies. A message element keeps every field the client sent."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr, field_validator, model_validator

MessageId = Annotated[StrictStr, Field(min_length=1, max_length=256)]
Role = Literal["user", "assistant", "system"]


class Message(BaseModel):
    """A transcript element: `id`, `role`, `content`, `timestamp`; other fields kept verbatim."""

    model_config = ConfigDict(extra="allow", strict=True)

    id: MessageId
    role: Role
    content: StrictStr
    timestamp: StrictStr | None = None

    @field_validator("timestamp")
    @classmethod
    def _iso_8601(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            datetime.fromisoformat(value)
        except ValueError:
            raise ValueError("timestamp must be an ISO 8601 date and time") from None
        return value

    def element(self, **extra: Any) -> dict[str, Any]:
        """The JSONB element: what the client sent, a server timestamp when it sent none."""
        data = self.model_dump(mode="json", exclude_none=False)
        if data.get("timestamp") is None:
            data["timestamp"] = _now_iso()
        data.update(extra)
        return data


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class UserMessage(Message):
    role: Literal["user"]


class AssistantMessage(Message):
    role: Literal["assistant"]


class CreateChat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    title: StrictStr | None = Field(default=None, max_length=1000)
    model: StrictStr | None = Field(default=None, min_length=1, max_length=200)
    workflow_id: StrictStr | None = Field(default=None, max_length=200)


class AppendMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    message: UserMessage


class CompleteTurn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    message: AssistantMessage


class InboxPair(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user: UserMessage
    assistant: AssistantMessage

    @model_validator(mode="after")
    def _distinct_ids(self) -> InboxPair:
        if self.user.id == self.assistant.id:
            raise ValueError("assistant.id must differ from user.id")
        return self


class Fork(BaseModel):
    model_config = ConfigDict(extra="forbid")

    up_to_message_id: MessageId


def _unique_ids(messages: list[Message]) -> list[Message]:
    seen: dict[str, int] = {}
    for index, message in enumerate(messages):
        if message.id in seen:
            raise ValueError(
                f"messages[{index}].id {message.id!r} repeats messages[{seen[message.id]}].id"
            )
        seen[message.id] = index
    return messages


class ReplaceMessages(BaseModel):
    model_config = ConfigDict(extra="forbid")

    messages: list[Message]

    _unique = field_validator("messages")(_unique_ids)


class ImportChat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: StrictStr = Field(min_length=1, max_length=200)
    title: StrictStr | None = Field(default=None, max_length=1000)
    model: StrictStr | None = Field(default=None, min_length=1, max_length=200)
    workflow_id: StrictStr | None = Field(default=None, max_length=200)
    messages: list[Message]

    _unique = field_validator("messages")(_unique_ids)


class ChatOut(BaseModel):
    id: uuid.UUID
    user_id: str
    workflow_id: str | None
    title: str | None
    model: str
    messages_version: int
    active_stream_id: str | None
    created_at: datetime
    updated_at: datetime


class ChatWithMessages(ChatOut):
    messages: Any


class MessagePage(BaseModel):
    messages: list[dict[str, Any]]
    seqs: list[int]
    next_before_seq: int | None
    source: Literal["jsonb", "table"]


class AppendResult(BaseModel):
    chat_id: uuid.UUID
    message_ids: list[str]
    messages_version: int
    created: bool
