"""Fault hooks for a test worker, loaded with `celery worker --include tests.worker_hooks`.

They act right after the convergence statement of a sync ran, before its commit, for chats the
test marked with a file in `$DUALWRITE_TEST_HOOKS`:

- `slow-<chat id>`: write `<pid>` to `running-<chat id>`, then sleep while the marker exists, or
  for the number of seconds the marker holds;
- `kill-<chat id>`: SIGKILL the process running the sync (every time);
- `warn-<chat id>`: issue a Python warning (`UserWarning`) naming the chat.
"""

from __future__ import annotations

import os
import signal
import time
import warnings
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, event

HOOKS = Path(os.environ["DUALWRITE_TEST_HOOKS"])


@event.listens_for(Engine, "after_cursor_execute")
def _after_execute(
    conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool
) -> None:
    if "upserted AS" not in statement or not isinstance(params, dict):
        return
    for chat_id in params.get("chat_ids") or []:
        if (HOOKS / f"warn-{chat_id}").exists():
            warnings.warn(f"a warning the test asked for, syncing {chat_id}", stacklevel=1)
        if (HOOKS / f"kill-{chat_id}").exists():
            os.kill(os.getpid(), signal.SIGKILL)
        slow = HOOKS / f"slow-{chat_id}"
        if slow.exists():
            (HOOKS / f"running-{chat_id}").write_text(str(os.getpid()))
            held = slow.read_text().strip()
            deadline = time.monotonic() + (float(held) if held else 60)
            while slow.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
