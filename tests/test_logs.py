"""Log lines of real processes: the API, a worker, beat and the CLI, in `LOG_FORMAT` json and text.

In json every line a process writes (stdout and stderr, uvicorn's, Celery's, Python warnings and
tracebacks included) is one JSON object; a task's lines carry its id and its chat's.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import httpx
import pytest

from app import logs
from app.settings import Settings
from harness.processes import ApiProcess, BeatProcess, RedisServer, wait_until
from tests.conftest import LOG_DIR, RUN_ID, start_worker
from tests.support import ROOT, wait_converged
from tests.test_handlers import message, new_chat

TEXT_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+ \[\d+\]: "
)


def json_lines(log: str) -> list[dict[str, Any]]:
    """Every line of `log` as a JSON object with the four fields every line has; the first line
    that is not one fails the test, showing the whole log."""
    entries = []
    for line in log.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            entry = None
        if not isinstance(entry, dict) or not {"timestamp", "level", "logger", "message"} <= set(
            entry
        ):
            raise AssertionError(f"not a JSON log line: {line!r}\n--- the whole log:\n{log}")
        entries.append(entry)
    return entries


def test_api_and_worker_write_only_json_and_a_tasks_lines_name_it(
    broker: RedisServer, hooks: Path, engine: Any, auth: Any
) -> None:
    env = {**os.environ, "REDIS_URL": broker.url, "LOG_FORMAT": "json"}
    worker = start_worker(broker, hooks, "logs-json", LOG_FORMAT="json")
    api = ApiProcess(
        env, LOG_DIR / f"api-json-{RUN_ID}.log", app="tests.api_hooks:app", quiet=False
    )
    try:
        api.start()
        with httpx.Client(base_url=api.base, headers=auth(), timeout=10) as client:
            chat = client.post("/chats", json={}).json()["id"]
            (hooks / f"warn-{chat}").touch()
            sent = client.post(f"/chats/{chat}/messages", json={"message": message()})
            assert sent.status_code == 201
            wait_converged(engine, [chat])
            assert client.get("/test/warn").status_code == 200
            assert client.get("/test/fail").status_code == 500
        # A pool process lost, as to the OOM killer: the pool's own logger says so.
        os.kill(worker.child_pids()[0], signal.SIGKILL)
        wait_until(lambda: "exited with 'signal 9 (SIGKILL)'" in worker.log(), timeout=30)
    finally:
        api.stop()
        worker.stop()

    api_lines = json_lines(api.log())
    worker_lines = json_lines(worker.log())

    # uvicorn's own lines, its access log among them, and the app's INFO lines.
    assert any(e["logger"] == "uvicorn.error" and e["level"] == "INFO" for e in api_lines)
    access = [e for e in api_lines if e["logger"] == "uvicorn.access"]
    assert {"method": "POST", "path": f"/chats/{chat}/messages", "status": 201}.items() <= (
        next(e for e in access if e["path"] == f"/chats/{chat}/messages").items()
    )
    assert any(e["logger"] == "app.main" and e["level"] == "INFO" for e in api_lines)
    # A Python warning, and an unhandled error with its traceback inside its one line.
    assert any(
        e["logger"] == "py.warnings" and "a warning the test asked for" in e["message"]
        for e in api_lines
    )
    failed = [e for e in api_lines if "a failure the test asked for" in e.get("exception", "")]
    assert failed and failed[0]["level"] == "ERROR"
    assert failed[0]["exception"].startswith("Traceback")

    # Celery's lines (no banner), and every line of the chat's task carries its ids.
    assert any(e["message"].endswith(" ready.") for e in worker_lines)
    assert any(e.get("concurrency") == 2 and "starting" in e["message"] for e in worker_lines)
    task_lines = [e for e in worker_lines if e.get("chat_id") == chat]
    assert task_lines, worker.log()
    assert all(e["task_id"] for e in task_lines)
    assert len({e["task_id"] for e in task_lines}) == 1
    assert any(
        e["logger"] == "py.warnings" and f"syncing {chat}" in e["message"] for e in task_lines
    )
    assert any("succeeded" in e["message"] for e in task_lines)
    assert any("Warm shutdown" in e["message"] for e in worker_lines)
    assert any(e["level"] == "ERROR" and "SIGKILL" in e["message"] for e in worker_lines)
    # Lines outside a task carry no task's ids.
    ready = next(e for e in worker_lines if e["message"].endswith(" ready."))
    assert "task_id" not in ready and "chat_id" not in ready


def test_beat_writes_only_json(broker: RedisServer, tmp_path: Path) -> None:
    env = {**os.environ, "REDIS_URL": broker.url, "LOG_FORMAT": "json"}
    beat = BeatProcess(env, tmp_path / "beat.log")
    try:
        beat.start()
    finally:
        beat.stop()
    lines = json_lines(beat.log())
    assert any(e["message"].startswith("beat: Starting") for e in lines)


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app", *args],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_cli_prints_its_results_and_logs_json_on_stderr() -> None:
    status = run_cli("status", LOG_FORMAT="json")
    assert status.returncode == 0, status.stderr
    assert "phase: dual_write" in status.stdout
    json_lines(status.stderr)

    refused = run_cli("phase", "set", "no-such-phase", LOG_FORMAT="json")
    assert refused.returncode == 2
    [line] = json_lines(refused.stderr)
    assert line["level"] == "ERROR"
    assert line["message"].startswith("error: unknown phase 'no-such-phase'")

    text = run_cli("phase", "set", "no-such-phase")
    assert text.stderr.startswith("error: unknown phase 'no-such-phase'")


def test_text_lines_stay_readable(worker: Any, api: Any, auth: Any, engine: Any) -> None:
    """The session's worker and an API process log in the default format, text."""
    chat = new_chat(api, auth)
    sent = api.post(f"/chats/{chat}/messages", json={"message": message()}, headers=auth())
    assert sent.status_code == 201
    wait_converged(engine, [chat])
    task_lines = [line for line in worker.log().splitlines() if f"chat_id={chat}" in line]
    assert task_lines
    for line in task_lines:
        assert TEXT_LINE.match(line), line
        assert re.search(r"\[task_id=[\w-]+ task_name=\S+ chat_id=", line), line

    process = ApiProcess(dict(os.environ), LOG_DIR / f"api-text-{RUN_ID}.log", quiet=False)
    try:
        process.start()
        httpx.get(process.base + "/healthz", timeout=5)
    finally:
        process.stop()
    lines = process.log().splitlines()
    assert any('"GET /healthz HTTP/1.1" 200' in line for line in lines)
    for line in lines:
        assert TEXT_LINE.match(line), line


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_an_exception_stays_on_one_line_with_its_task(log_format: str) -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        logs.configure(Settings(log_format=log_format, log_level="debug"), stream=stream)
        with logs.bound(task_id="t-1", chat_id="c-1"):
            try:
                raise ValueError("broken\nacross lines")
            except ValueError:
                logging.getLogger("tests.logs").exception("it failed")
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("careful", UserWarning, stacklevel=1)
        logging.getLogger("tests.logs").info("outside", extra={"rows": 3})
    finally:
        logging.captureWarnings(False)
        root.handlers[:], root.level = saved
    written = stream.getvalue()
    if log_format == "json":
        failed, warned, outside = json_lines(written)
        assert failed["task_id"] == "t-1" and failed["chat_id"] == "c-1"
        assert failed["exception"].endswith("ValueError: broken\nacross lines")
        assert warned["logger"] == "py.warnings" and "careful" in warned["message"]
        assert "task_id" not in warned
        assert outside["rows"] == 3
    else:
        first = written.splitlines()[0]
        assert TEXT_LINE.match(first) and first.endswith("it failed [task_id=t-1 chat_id=c-1]")
        assert "Traceback" in written


def test_a_log_call_whose_arguments_do_not_fit_still_makes_one_json_line() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        logs.configure(Settings(log_format="json", log_level="info"), stream=stream)
        logging.getLogger("tests.logs").info("bad args %d", "x")
    finally:
        logging.captureWarnings(False)
        root.handlers[:], root.level = saved
    (line,) = stream.getvalue().splitlines()
    entry = json.loads(line)
    assert entry["message"].startswith("bad args %d (arguments ('x',) did not format")
