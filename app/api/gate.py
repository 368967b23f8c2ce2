"""Per-chat write gates of one API process: a burst of writes to one chat cannot take the pool.

Writes to one chat queue on its row lock in PostgreSQL, each holding a pooled connection (and a
request thread) while it waits. The gate admits `concurrency` writes of a chat at a time (by
default one writing and one waiting on the lock); the next `queue` wait here, in the event loop,
holding neither a connection nor a thread, for at most `wait_seconds`; anything beyond gets
`Unavailable` (503 with `Retry-After`) at once. Every method runs on the event loop, so the
counts need no lock.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Hashable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from app.errors import Unavailable


@dataclass
class _Chat:
    admitted: int = 0
    waiting: deque[asyncio.Future[None]] = field(default_factory=deque)


class ChatGates:
    def __init__(self, concurrency: int, queue: int, wait_seconds: float) -> None:
        self.concurrency, self.queue, self.wait_seconds = concurrency, queue, wait_seconds
        self._chats: dict[Hashable, _Chat] = {}

    @asynccontextmanager
    async def hold(self, key: Hashable) -> AsyncIterator[None]:
        await self._enter(key)
        try:
            yield
        finally:
            self._leave(key)

    def admitted(self, key: Hashable) -> int:
        chat = self._chats.get(key)
        return chat.admitted if chat else 0

    def waiting(self, key: Hashable) -> int:
        chat = self._chats.get(key)
        return len(chat.waiting) if chat else 0

    async def _enter(self, key: Hashable) -> None:
        chat = self._chats.setdefault(key, _Chat())
        if chat.admitted < self.concurrency and not chat.waiting:
            chat.admitted += 1
            return
        if len(chat.waiting) >= self.queue:
            raise Unavailable(
                f"this chat already has {chat.admitted + len(chat.waiting)} writes in progress "
                "or waiting",
                field=("path", "chat_id"),
            )
        turn = asyncio.get_running_loop().create_future()
        chat.waiting.append(turn)
        try:
            await asyncio.wait_for(turn, self.wait_seconds)
        except BaseException as exc:
            if turn.done() and not turn.cancelled():
                self._leave(key)  # handed a place just as we gave up: pass it on
            else:
                if turn in chat.waiting:  # a leaver may have skipped it already
                    chat.waiting.remove(turn)
                self._forget_if_idle(key, chat)
            if isinstance(exc, TimeoutError):
                raise Unavailable(
                    f"the writes ahead of this one on this chat took over {self.wait_seconds}s",
                    field=("path", "chat_id"),
                ) from None
            raise

    def _leave(self, key: Hashable) -> None:
        chat = self._chats[key]
        while chat.waiting:
            turn = chat.waiting.popleft()
            if not turn.done():  # the place passes straight to the next waiter
                turn.set_result(None)
                return
        chat.admitted -= 1
        self._forget_if_idle(key, chat)

    def _forget_if_idle(self, key: Hashable, chat: _Chat) -> None:
        if chat.admitted == 0 and not chat.waiting and self._chats.get(key) is chat:
            del self._chats[key]
