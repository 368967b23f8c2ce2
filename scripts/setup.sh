#!/usr/bin/env bash
# Creates .venv and installs the project with its development tools (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
# The rollout page's browser test drives Debian's Chromium through its chromedriver.
if ! { command -v chromium && command -v chromedriver; } >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            -o DPkg::Lock::Timeout=300 chromium chromium-driver >/dev/null
    else
        echo "chromium and chromedriver are missing (the browser test needs them): as root," \
            "apt-get install --no-install-recommends chromium chromium-driver"
    fi
fi
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -e '.[dev,bench]'
    touch "$stamp"
fi
# promtool checks and unit-tests the alert rules (tests/test_alerts.py), from Debian's
# Prometheus package; without root, say how to get it.
if ! command -v promtool >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus >/dev/null
    else
        echo "promtool is missing (the alert rule tests need it): apt-get install prometheus"
    fi
fi
