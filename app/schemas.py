"""Request and response bodies. A message element keeps every field the client sent.

Every string, key and number of a body is checked against what PostgreSQL can store (`text` and
`jsonb`), so that input it would refuse is a 422 naming the field, never a failed statement.
"""

from __future__ import annotations

import math
import re
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from app.settings import get_settings

# PostgreSQL `text` cannot hold NUL, and neither `text` nor `jsonb` can hold a code point that
# is not valid Unicode: a lone UTF-16 surrogate, which a JSON `\ud800` escape decodes to.
_SURROGATE = re.compile("[\ud800-\udfff]")


def text_problem(text: str) -> str | None:
    """Why PostgreSQL cannot store this string, or None when it can."""
    if "\x00" in text:
        return "contains a NUL character (\\u0000), which PostgreSQL cannot store"
    # `isascii` is a flag lookup: only text beyond ASCII is searched for surrogates.
    found = None if text.isascii() else _SURROGATE.search(text)
    if found is None:
        return None
    return (
        f"contains a lone surrogate (\\u{ord(found.group()):04x}), which is not valid Unicode "
        "and PostgreSQL cannot store"
    )


# A value met on the walk: (its parent's node, its key or index there, the value, its depth).
# The path is rebuilt from the parents only when there is an error to report.
_Node = tuple[Any, str | int, Any, int]


def unstorable(value: dict[str, Any] | list[Any], max_depth: int) -> InitErrorDetails | None:
    """The first part of a parsed JSON object or array that `jsonb` cannot store, or None.

    Finds a string or key with NUL or a lone surrogate, a number that parsed to NaN or infinity
    (JSON's `NaN` and `Infinity`, or beyond a double's range such as `1e400`), and objects or
    arrays nested deeper than `max_depth` levels (`value` itself being level 1). The error's
    `loc` is the path from `value` to that part. Iterative, so depth costs no recursion; only
    objects and arrays are put on the stack, scalars are checked where they are met.
    """
    stack: list[_Node] = [(None, "", value, 1)]
    while stack:
        node = stack.pop()
        _, _, container, depth = node
        if depth > max_depth:
            return _too_deep(node, max_depth)
        nested: list[_Node] = []
        pairs = container.items() if isinstance(container, dict) else enumerate(container)
        for key, child in pairs:
            if isinstance(key, str) and (why := text_problem(key)) is not None:
                return _error((node, key, child, depth + 1), "unstorable_key", f"key {why}", key)
            if isinstance(child, str):
                if (why := text_problem(child)) is not None:
                    return _error(
                        (node, key, child, depth + 1), "unstorable_text", f"text {why}", child
                    )
            elif isinstance(child, float):
                if not math.isfinite(child):
                    return _error(
                        (node, key, child, depth + 1),
                        "non_finite_number",
                        "number is NaN or infinite (or so large, such as 1e400, that it parsed "
                        "as infinite), which jsonb cannot store",
                        child,
                    )
            elif isinstance(child, dict | list):
                nested.append((node, key, child, depth + 1))
        stack.extend(reversed(nested))
    return None


def _too_deep(node: _Node, max_depth: int) -> InitErrorDetails:
    return _error(
        node,
        "too_deep",
        "objects and arrays nest more than {max_depth} levels deep in this message",
        None,
        max_depth=max_depth,
    )


def _error(node: _Node, kind: str, message: str, value: Any, **context: Any) -> InitErrorDetails:
    path: list[str | int] = []
    while node[0] is not None:
        key = node[1]
        # A key that is not valid Unicode is named by its escapes, as the client wrote it.
        path.append(
            key.encode("utf-8", "backslashreplace").decode() if isinstance(key, str) else key
        )
        node = node[0]
    return InitErrorDetails(
        type=PydanticCustomError(kind, message, context or None),
        loc=tuple(reversed(path)),
        input=value,
    )


def _storable_text(value: Any) -> Any:
    # Before the type check, so that a string with NUL gets this message, not a generic one;
    # anything but a string is left to the field's own type.
    if isinstance(value, str):
        why = text_problem(value)
        if why is not None:
            raise PydanticCustomError("unstorable_text", f"text {why}")
    return value


Text = Annotated[StrictStr, BeforeValidator(_storable_text)]
MessageId = Annotated[Text, Field(min_length=1, max_length=256)]
Role = Literal["user", "assistant", "system"]


class Message(BaseModel):
    """A transcript element: `id`, `role`, `content`, `timestamp`; other fields kept verbatim.

    The whole element, every extra field included, must be storable in `jsonb` (`unstorable`)
    and nest at most `max_message_depth` levels deep.
    """

    model_config = ConfigDict(extra="allow", strict=True)

    id: MessageId
    role: Role
    content: StrictStr
    timestamp: StrictStr | None = None

    @model_validator(mode="before")
    @classmethod
    def _storable(cls, data: Any) -> Any:
        if isinstance(data, dict):
            error = unstorable(data, get_settings().max_message_depth)
            if error is not None:
                # A ValidationError raised here keeps its `loc`, nested under the message's own.
                raise ValidationError.from_exception_data(cls.__name__, [error])
        return data

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

    title: Text | None = Field(default=None, max_length=1000)
    model: Text | None = Field(default=None, min_length=1, max_length=200)
    workflow_id: Text | None = Field(default=None, max_length=200)


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

    user_id: Text = Field(min_length=1, max_length=200)
    title: Text | None = Field(default=None, max_length=1000)
    model: Text | None = Field(default=None, min_length=1, max_length=200)
    workflow_id: Text | None = Field(default=None, max_length=200)
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
    """The chat and the last page of its transcript (`GET /chats/{id}?limit=`): older messages
    are paged with `GET /chats/{id}/messages?before_seq=next_before_seq`."""

    messages: list[dict[str, Any]]
    seqs: list[int]
    next_before_seq: int | None


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
