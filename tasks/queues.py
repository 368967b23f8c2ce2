"""The queue names, defined with the task names in `app.task_names` (kept importable here)."""

from __future__ import annotations

from app.task_names import Queue

__all__ = ["Queue"]
