"""Table definitions used by the repositories. The migrations own the schema; these mirror it."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    ForeignKey,
    Integer,
    MetaData,
    Table,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID

metadata = MetaData()

chats = Table(
    "copilot_chats",
    metadata,
    Column("id", UUID(as_uuid=True), primary_key=True),
    Column("user_id", Text, nullable=False),
    Column("workflow_id", Text),
    Column("title", Text),
    Column("model", Text, nullable=False),
    Column("messages", JSONB, nullable=False, server_default=text("'[]'::jsonb")),
    Column("messages_version", BigInteger, nullable=False, server_default=text("0")),
    Column("active_stream_id", Text),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

chat_messages = Table(
    "copilot_chat_messages",
    metadata,
    Column("id", UUID(as_uuid=True), primary_key=True, server_default=func.gen_random_uuid()),
    Column(
        "chat_id",
        UUID(as_uuid=True),
        ForeignKey("copilot_chats.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("message_id", Text, nullable=False),
    Column("role", Text, nullable=False),
    Column("seq", Integer, nullable=False),
    Column("content", JSONB, nullable=False),
    Column("stream_id", Text),
    Column("model", Text),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("deleted_at", DateTime(timezone=True)),
    Column("source_version", BigInteger, nullable=False),
)

# One row per chat: the newest `messages_version` a handler committed (`wanted_version`) and the
# newest the worker has copied (`applied_version`). Kept apart from `copilot_chats` so a sync never
# rewrites the chat row; a partial index over `applied_version < wanted_version` lets the sweep
# find chats that are behind without reading the chats table.
chat_sync_state = Table(
    "copilot_chat_sync_state",
    metadata,
    Column(
        "chat_id",
        UUID(as_uuid=True),
        ForeignKey("copilot_chats.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("wanted_version", BigInteger, nullable=False),
    Column("applied_version", BigInteger, nullable=False),
    Column("dirty_since", DateTime(timezone=True)),
    Column("synced_at", DateTime(timezone=True)),
)
