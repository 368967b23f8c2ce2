"""SQL for shadow reads: where the table put given messages of a chat."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from sqlalchemy import bindparam, text
from sqlalchemy.dialects.postgresql import ARRAY, TEXT
from sqlalchemy.orm import Session


def live_seqs(session: Session, chat_id: uuid.UUID, message_ids: Sequence[str]) -> dict[str, int]:
    """The position of each of these messages' live row, by message id (absent: no live row).
    One probe of the `(chat_id, message_id)` unique index per id."""
    if not message_ids:
        return {}
    rows = session.execute(
        text(
            "SELECT message_id, seq FROM copilot_chat_messages "
            "WHERE chat_id = :chat_id AND message_id = ANY(:ids) AND deleted_at IS NULL"
        ).bindparams(bindparam("ids", type_=ARRAY(TEXT))),
        {"chat_id": chat_id, "ids": list(message_ids)},
    ).all()
    return {row.message_id: row.seq for row in rows}
