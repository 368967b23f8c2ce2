"""`scripts/run.sh` keeps its secrets to its user: the signing secret and the Flower password
are files only their owner can read, and the password is never on a command line (`ps`)."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

from tests.support import ROOT

RUN_SH = ROOT / "scripts" / "run.sh"


def create_secrets(run_dir: Path, **env: str) -> dict[str, str]:
    """Run the part of run.sh that makes the secrets (`scripts/secrets.sh`, sourced as run.sh
    sources it) in `run_dir`; what it leaves in the environment, and the new files' umask."""
    script = '. scripts/secrets.sh; echo "$AUTH_SECRET"; echo "$FLOWER_PASSWORD"; umask'
    base = {k: v for k, v in os.environ.items() if k not in {"AUTH_SECRET", "FLOWER_PASSWORD"}}
    out = subprocess.run(
        ["bash", "-c", script],
        cwd=ROOT,
        env={**base, "RUN_DIR": str(run_dir), "PYTHON": sys.executable, **env},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return {"AUTH_SECRET": out[0], "FLOWER_PASSWORD": out[1], "umask": out[2]}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_secrets_are_written_for_their_owner_only(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    made = create_secrets(run_dir)
    assert mode(run_dir) == 0o700
    for name, variable in [("auth_secret", "AUTH_SECRET"), ("flower_password", "FLOWER_PASSWORD")]:
        path = run_dir / name
        assert mode(path) == 0o600, (name, oct(mode(path)))
        assert path.read_text().strip() == made[variable]
    assert len(made["AUTH_SECRET"].encode()) >= 32  # what the settings require
    assert made["umask"] == "0077"  # the logs run.sh writes next are the owner's too
    assert create_secrets(run_dir) == made  # the same secrets on the next run


def test_secrets_an_older_run_left_readable_are_made_private(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o755)
    old = run_dir / "auth_secret"
    old.write_text("x" * 64 + "\n")
    old.chmod(0o644)
    assert create_secrets(run_dir)["AUTH_SECRET"] == "x" * 64
    assert mode(old) == 0o600 and mode(run_dir) == 0o700


def test_secrets_from_the_environment_are_not_written(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    made = create_secrets(run_dir, AUTH_SECRET="s" * 40, FLOWER_PASSWORD="pw-from-env")
    assert (made["AUTH_SECRET"], made["FLOWER_PASSWORD"]) == ("s" * 40, "pw-from-env")
    assert list(run_dir.iterdir()) == []


def commands(script: str) -> list[str]:
    """The script's commands, continuation lines joined."""
    return [" ".join(line.split()) for line in script.replace("\\\n", " ").splitlines()]


def test_run_sh_makes_its_secrets_before_it_writes_anything() -> None:
    lines = commands(RUN_SH.read_text())
    sourced = lines.index(". scripts/secrets.sh")
    writes = [i for i, line in enumerate(lines) if ".run/" in line and not line.startswith("#")]
    assert writes and min(writes) > sourced


def test_flower_gets_its_password_from_the_environment_not_its_command_line() -> None:
    (flower,) = [c for c in commands(RUN_SH.read_text()) if re.search(r"celery .*flower", c)]
    assignment, argv = flower.split(" .venv/bin/celery ", 1)
    assert assignment == 'FLOWER_BASIC_AUTH="$FLOWER_USER:$FLOWER_PASSWORD"'
    assert "PASSWORD" not in argv and "basic-auth" not in argv and "basic_auth" not in argv
