"""The reference data set, seeded: 5,800 chats holding 580,300 messages in their JSONB arrays,
skewed like production (median 57, max 4,900 messages per chat, ~0.9 KB per message), loaded into
`copilot_chats` with COPY. The other bench scripts import it; run alone it prints the shape.

    .venv/bin/python -m bench.dataset [--scale 1.0] [--seed 5] [--load]
"""

from __future__ import annotations

import functools
import json
import math
import random
import statistics
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from bench import infra

CHATS = 5_800
MESSAGES = 580_300
MEDIAN = 57
MAX = 4_900
SEED = 5
# Lognormal spread that gives mean ~100 messages per chat around a median of 57.
SIGMA = math.sqrt(2 * math.log(MESSAGES / CHATS / MEDIAN))

MODELS = ("gpt-4o", "claude-sonnet-4", "gpt-4.1-mini", "o3")
TOOLS = ("search_docs", "run_workflow", "read_file", "get_block", "edit_workflow")


@dataclass(frozen=True, slots=True)
class Shape:
    chats: int
    messages: int
    median: int
    max: int
    seed: int = SEED


def shape(scale: float = 1.0, seed: int = SEED) -> Shape:
    """The reference shape, or one of the same skew (the largest chat stays the outlier)."""
    if scale >= 1.0:
        return Shape(round(CHATS * scale), round(MESSAGES * scale), MEDIAN, MAX, seed)
    chats = max(3, round(CHATS * scale))
    messages = max(chats * 2, round(MESSAGES * scale))
    return Shape(chats, messages, MEDIAN, max(4 * MEDIAN, round(MAX * scale**0.5)), seed)


def sizes(s: Shape) -> list[int]:
    """Messages per chat: lognormal around the median, one chat at the maximum, summing exactly
    to `s.messages` (the difference is spread over the chats above the median, which keeps it)."""
    rng = random.Random(s.seed)
    out = [
        min(s.max - 1, max(1, round(rng.lognormvariate(math.log(s.median), SIGMA))))
        for _ in range(s.chats)
    ]
    biggest = max(range(s.chats), key=out.__getitem__)
    out[biggest] = s.max
    upper = [i for i, n in enumerate(out) if n > s.median and i != biggest]
    floor = s.median + 1
    if not upper:  # tiny shapes: any chat but the largest
        upper, floor = [i for i in range(s.chats) if i != biggest], 1
    diff = s.messages - sum(out)
    while diff:
        room = [i for i in upper if (out[i] < s.max - 1 if diff > 0 else out[i] > floor)]
        if not room:
            raise ValueError(f"no chat sizes fit {s}")
        for i in rng.sample(room, min(len(room), abs(diff))):
            out[i] += 1 if diff > 0 else -1
        diff = s.messages - sum(out)
    return out


class Text:
    """Cheap realistic text: slices of one seeded corpus of pseudo-words and code-ish lines."""

    def __init__(self, seed: int) -> None:
        rng = random.Random(seed)
        letters = "etaoinshrdlucmfwypvbgkjqxz"
        weights = [12, 9, 8, 8, 7, 7, 6, 6, 6, 4, 4, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1]
        words = ["".join(rng.choices(letters, weights, k=rng.randint(2, 10))) for _ in range(4_000)]
        parts: list[str] = []
        size = 0
        while size < 1_500_000:
            if rng.random() < 0.06:
                name, call = rng.choice(words), rng.choice(words)
                line = f"\n```\nconst {name} = await {call}({rng.randint(0, 99)});\n```\n"
            else:
                line = " ".join(rng.choices(words, k=rng.randint(6, 24))) + ". "
            parts.append(line)
            size += len(line)
        self.corpus = "".join(parts)

    def take(self, rng: random.Random, length: int) -> str:
        start = rng.randrange(0, len(self.corpus) - length - 1)
        return self.corpus[start : start + length]


@functools.cache
def text_source(seed: int = SEED) -> Text:
    return Text(seed)


def element(
    rng: random.Random, role: str, ts: datetime, text: Text | None = None
) -> dict[str, Any]:
    """One transcript element, ~0.9 KB on average: user messages short, assistant replies longer,
    some with content blocks and tool calls, as the product writes them."""
    text = text or text_source()
    typical, sigma, longest = (300, 0.8, 4_000) if role == "user" else (700, 0.9, 12_000)
    content = text.take(
        rng, min(longest, max(8, int(rng.lognormvariate(math.log(typical), sigma))))
    )
    item: dict[str, Any] = {
        "id": f"msg_{rng.getrandbits(64):016x}",
        "role": role,
        "content": content,
        "timestamp": ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
    }
    if role == "assistant":
        item["model"] = rng.choice(MODELS)
        roll = rng.random()
        if roll < 0.15:
            item["contentBlocks"] = [
                {"type": "thinking", "content": text.take(rng, rng.randint(40, 300))},
                {"type": "text", "content": content[: rng.randint(10, 200)]},
            ]
        elif roll < 0.27:
            item["toolCalls"] = [
                {
                    "id": f"call_{rng.getrandbits(48):012x}",
                    "name": rng.choice(TOOLS),
                    "arguments": {"query": text.take(rng, rng.randint(10, 80))},
                    "state": "success",
                }
                for _ in range(rng.randint(1, 3))
            ]
    elif rng.random() < 0.05:
        file_id = f"file_{rng.getrandbits(32):08x}"
        item["fileAttachments"] = [
            {"id": file_id, "name": "notes.md", "size": rng.randint(1, 10**6)}
        ]
    return item


def transcript(
    rng: random.Random, count: int, start: datetime, text: Text | None = None
) -> list[dict[str, Any]]:
    """`count` elements, roles alternating; over half the replies share their user message's
    millisecond (as in real chats, where order comes from the array position)."""
    ts = start
    out = []
    for i in range(count):
        role = "user" if i % 2 == 0 else "assistant"
        if role == "user":
            ts += timedelta(seconds=rng.expovariate(1 / 90))
        elif rng.random() < 0.45:
            ts += timedelta(milliseconds=rng.randint(1, 40_000))
        out.append(element(rng, role, ts, text))
    return out


@dataclass(frozen=True, slots=True)
class Chat:
    id: uuid.UUID
    user_id: str
    title: str
    model: str
    created_at: datetime
    messages: list[dict[str, Any]]


def chats(s: Shape) -> Iterator[Chat]:
    """The chats of the data set, one at a time (the whole set is ~0.5 GB of JSON)."""
    text = text_source(s.seed)
    base = datetime(2026, 1, 1, tzinfo=UTC)
    for index, count in enumerate(sizes(s)):
        rng = random.Random(s.seed * 1_000_003 + index)
        created = base + timedelta(seconds=rng.randint(0, 300 * 86_400))
        yield Chat(
            id=uuid.UUID(int=rng.getrandbits(128), version=4),
            user_id=f"user-{rng.randint(1, max(1, s.chats // 4))}",
            title=text.take(rng, rng.randint(12, 60)).strip(),
            model=rng.choice(MODELS),
            created_at=created,
            messages=transcript(rng, count, created, text),
        )


@dataclass(frozen=True, slots=True)
class Loaded:
    chats: int
    messages: int
    seconds: float


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def load(database_url: str, s: Shape) -> Loaded:
    """COPY the data set into `copilot_chats` (revision 0001 or later; at head every chat at
    `messages_version` 1, its sync state left to the caller: nothing copied yet)."""
    started = time.perf_counter()
    chats_loaded = messages = 0
    with psycopg.connect(database_url) as connection:
        versioned = connection.execute(
            "SELECT 1 FROM information_schema.columns "
            "WHERE table_name = 'copilot_chats' AND column_name = 'messages_version'"
        ).fetchone()
        columns = "id, user_id, title, model, messages, created_at, updated_at"
        columns += ", messages_version" if versioned else ""
        with connection.cursor().copy(f"COPY copilot_chats ({columns}) FROM STDIN") as copy:
            for chat in chats(s):
                updated = chat.created_at + timedelta(hours=1)
                row = [chat.id, chat.user_id, chat.title, chat.model, dumps(chat.messages)]
                copy.write_row([*row, chat.created_at, updated, *([1] if versioned else [])])
                chats_loaded += 1
                messages += len(chat.messages)
        connection.execute("ANALYZE copilot_chats")
    return Loaded(chats_loaded, messages, time.perf_counter() - started)


def main() -> int:
    load_it = (False, "also COPY it into a fresh database")
    args = infra.options(__doc__, {"scale": 0.01}, scale=1.0, seed=SEED, load=load_it)
    s = shape(args.scale, args.seed)
    counts, size = sizes(s), sum(len(dumps(c.messages).encode()) for c in chats(s))
    spread = (min(counts), statistics.median(counts), infra.percentile(counts, 99), max(counts))
    rows: list[list[Any]] = [
        ["chats", len(counts)],
        ["messages", sum(counts)],
        ["messages per chat: min, median, p99, max", ", ".join(f"{v:g}" for v in spread)],
        ["JSON bytes total; per message", f"{size:,}; {size / sum(counts):.0f}"],
    ]
    if args.load:
        with infra.database("cdw_dataset") as url:
            loaded = load(url, s)
            on_disk = infra.scalar(url, "SELECT pg_total_relation_size('copilot_chats')")
            rows += [["seconds to COPY", round(loaded.seconds, 1)], ["bytes on disk", on_disk]]
    print(infra.table(["shape", "value"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
