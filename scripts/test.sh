#!/usr/bin/env bash
# Sets up, checks PostgreSQL, Redis and RabbitMQ, then lints, type-checks and runs the whole test suite.
# Extra arguments go to pytest (e.g. scripts/test.sh -k backfill).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/services.sh
.venv/bin/ruff check app tasks migrations tests bench harness celeryconfig.py
.venv/bin/mypy
set +e
.venv/bin/python -m pytest "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
    echo "pytest collected no test: failing"
    exit 1
fi
exit "$status"
