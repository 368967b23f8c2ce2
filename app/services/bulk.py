"""Pausing and resuming the scheduled bulk passes (the nightly and the recent reconcile).

A paused pass skips its scheduled runs until it is resumed; a run already going finishes. A
manual `python -m app reconcile` is not a scheduled pass and is never held back.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from sqlalchemy.orm import Session

from app.repositories import bulk_paused
from app.repositories.bulk_paused import Pass

log = logging.getLogger(__name__)


def pause(session: Session, names: Sequence[Pass], *, who: str) -> list[Pass]:
    """Pause these passes (every one for an empty list); returns those that were running."""
    changed = bulk_paused.pause(session, list(names) or list(Pass), who=who)
    for name in changed:
        log.info("bulk pause: %s paused by %s", name.value, who)
    return changed


def resume(session: Session, names: Sequence[Pass], *, who: str) -> list[Pass]:
    """Resume these passes (every one for an empty list); returns those that were paused."""
    changed = bulk_paused.resume(session, list(names) or list(Pass))
    for name in changed:
        log.info("bulk resume: %s resumed by %s", name.value, who)
    return changed
