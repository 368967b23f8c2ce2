"""chat-dualwrite: copies chat transcripts from `copilot_chats.messages` into a table."""
