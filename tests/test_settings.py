"""Settings refuse what would make the service unsafe, at start-up, saying which and why."""

from __future__ import annotations

import os
import secrets

import pytest
from pydantic import ValidationError

from app.settings import Settings
from harness.processes import ApiProcess
from tests.conftest import LOG_DIR, RUN_ID


@pytest.mark.parametrize(
    "secret",
    ["0123456789abcdef", "x" * 31, "é" * 15],  # 16 and 31 characters; 30 bytes
)
def test_a_signing_secret_shorter_than_32_bytes_is_refused(secret: str) -> None:
    with pytest.raises(ValidationError, match="AUTH_SECRET must be at least 32 bytes for HS256"):
        Settings(auth_secret=secret)


@pytest.mark.parametrize("secret", ["x" * 32, "é" * 16, secrets.token_hex(32)])
def test_a_signing_secret_of_32_bytes_or_more_is_accepted(secret: str) -> None:
    assert Settings(auth_secret=secret).signing_secret == secret


def test_the_api_with_a_short_secret_exits_at_start_up_naming_it() -> None:
    short = {**os.environ, "AUTH_SECRET": "0123456789abcdef"}
    api = ApiProcess(short, LOG_DIR / f"api-short-secret-{RUN_ID}.log")
    try:
        with pytest.raises(AssertionError, match="exited with") as failed:
            api.start(timeout=60)
    finally:
        api.stop()
    assert "AUTH_SECRET must be at least 32 bytes for HS256 (it has 16)" in str(failed.value)
