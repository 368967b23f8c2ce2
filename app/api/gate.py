"""Gates of one API process, per key: a burst under one key cannot take the pool.

Two gates use it (`app.api.deps`): one per user, around every request of theirs that reads a
body or uses the database, and one per chat, around its writes. Writes to one chat queue on its
row lock in PostgreSQL, and any request holds a pooled connection and a request thread while it
runs. A gate admits `concurrency` requests of a key at a time; the next `queue` wait here, in
the event loop, holding neither a connection nor a thread, for at most `wait_seconds`; anything
beyond gets `Unavailable` (503 with `Retry-After`, the message naming the settings) at once.
Every method runs on the event loop, so the counts need no lock.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Hashable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from app.errors import Unavailable


@dataclass(frozen=True)
class Wording:
    """How a refusal reads: whose requests (`subject`), what they are, the settings' prefix."""

    subject: str = "this chat"
    what: str = "writes"
    settings: str = "CHAT_WRITE"
    field: tuple[str | int, ...] = ("path", "chat_id")


CHAT_WRITES = Wording()
USER_REQUESTS = Wording("this user", "requests", "USER", ())


@dataclass
class _Chat:
    admitted: int = 0
    waiting: deque[asyncio.Future[None]] = field(default_factory=deque)


class Gates:
    def __init__(
        self, concurrency: int, queue: int, wait_seconds: float, wording: Wording = CHAT_WRITES
    ) -> None:
        self.concurrency, self.queue, self.wait_seconds = concurrency, queue, wait_seconds
        self.wording = wording
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
            words = self.wording
            raise Unavailable(
                f"{words.subject} already has {chat.admitted + len(chat.waiting)} {words.what} "
                f"in progress or waiting, the most {words.settings}_CONCURRENCY="
                f"{self.concurrency} and {words.settings}_QUEUE={self.queue} allow",
                field=words.field,
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
                words = self.wording
                raise Unavailable(
                    f"the {words.what} of {words.subject} ahead of this one took over "
                    f"{words.settings}_WAIT_SECONDS={self.wait_seconds:g}s",
                    field=words.field,
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
