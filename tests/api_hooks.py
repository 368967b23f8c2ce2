"""The served API (`app.main:app`, its logging set up as in production) with two routes more, for
tests of its log lines: `uvicorn tests.api_hooks:app`."""

from __future__ import annotations

import warnings

from app import main

app = main.app


@app.get("/test/warn")
def warn() -> dict[str, str]:
    warnings.warn("a warning the test asked for", UserWarning, stacklevel=1)
    return {"warned": "yes"}


@app.get("/test/fail")
def fail() -> None:
    raise RuntimeError("a failure the test asked for")
