"""The Prometheus alert rules (`monitoring/alerts.yml`): valid for `promtool`, passing their unit
tests, each alert tested firing and quiet and linked to its runbook section, and every metric
they read exported under that name by the API's `/metrics` or by Flower's, so that renaming a
metric breaks this test instead of silencing an alert."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from harness.processes import RedisServer
from tests.conftest import start_worker
from tests.support import ROOT, wait_until
from tests.test_flower import running_flower

RULES = ROOT / "monitoring" / "alerts.yml"
RULE_TESTS = ROOT / "monitoring" / "alerts_test.yml"
RUNBOOK = ROOT / "docs" / "operations.md"
METRIC = re.compile(r"\b(?:dualwrite|flower)_[a-z0-9_]+\b")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    path = shutil.which("promtool")
    # A missing promtool fails the suite: skipping would let broken rules pass CI unnoticed.
    assert path, (
        "promtool is not installed: scripts/setup.sh installs it as root "
        "(apt-get install --no-install-recommends prometheus)"
    )
    return subprocess.run([path, *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


def alerts() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def exposed(text: str) -> set[str]:
    """Every name a query can use for the families of a Prometheus scrape: the family's own
    name and its samples' (`_total`, `_bucket`, `_count`, `_sum`), even for a family that has
    no sample at the moment."""
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "histogram":
            names.update(f"{family.name}_{suffix}" for suffix in ("bucket", "count", "sum"))
    return names


def flower_metrics(base: str) -> str:
    # Prometheus scrapes this path without credentials, whatever FLOWER_BASIC_AUTH says.
    response = httpx.get(f"{base}/metrics", timeout=30)
    assert response.status_code == 200, response.text
    return response.text


def test_promtool_checks_the_rules() -> None:
    checked = promtool("check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in checked.stdout


def test_promtool_unit_tests_of_the_rules_pass() -> None:
    tested = promtool("test", "rules", str(RULE_TESTS))
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_every_alert_has_a_severity_a_summary_and_its_runbook_section() -> None:
    headings = {
        # GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens.
        re.sub(r"[^a-z0-9 _-]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        for line in RUNBOOK.read_text().splitlines()
        if line.startswith("#")
    }
    names = [rule["alert"] for rule in alerts()]
    assert len(names) == len(set(names))
    for rule in alerts():
        assert rule["labels"]["severity"] in {"page", "ticket"}, rule["alert"]
        notes = rule["annotations"]
        assert notes["summary"] and notes["description"], rule["alert"]
        path, _, anchor = notes["runbook_url"].partition("#")
        assert path == "docs/operations.md" and anchor == rule["alert"].lower(), rule["alert"]
        assert anchor in headings, f"docs/operations.md has no section {rule['alert']}"


def test_every_alert_is_tested_firing_and_quiet() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in alerts()}
    assert names - firing == set(), "never tested firing"
    assert names - quiet == set(), "never tested quiet"


def test_every_metric_the_rules_read_is_exported_under_that_name(
    api: TestClient, broker: RedisServer
) -> None:
    used = {name for rule in alerts() for name in METRIC.findall(rule["expr"])}
    assert any(name.startswith("flower_") for name in used)
    response = api.get("/metrics")
    assert response.status_code == 200
    names = exposed(response.text)
    with running_flower({**os.environ, "REDIS_URL": broker.url}) as flower:
        names |= exposed(flower_metrics(flower))
    assert used - names == set(), "read by the rules, exported by nobody"


def test_flower_shows_a_worker_online_and_drops_it_once_killed(
    broker: RedisServer, hooks: Path
) -> None:
    """`DualwriteNoWorkerSeen` counts Flower's `flower_worker_online`. A worker killed without a
    goodbye (SIGKILL, OOM, a lost host) keeps its last value, 1, unless Flower purges workers
    gone silent, as `FLOWER_PURGE_OFFLINE_WORKERS` (set by scripts/run.sh and compose) has it."""
    worker = start_worker(broker, hooks, "online")
    try:
        env = {**os.environ, "REDIS_URL": broker.url, "FLOWER_PURGE_OFFLINE_WORKERS": "5"}
        with running_flower(env) as flower:

            def online() -> dict[str, float]:
                return {
                    sample.labels["worker"]: sample.value
                    for family in text_string_to_metric_families(flower_metrics(flower))
                    for sample in family.samples
                    if sample.name == "flower_worker_online"
                    and sample.labels["worker"].startswith(f"{worker.name}@")
                }

            wait_until(lambda: list(online().values()) == [1.0], timeout=60, interval=0.5)
            worker.kill()
            wait_until(lambda: online() == {}, timeout=60, interval=0.5)
    finally:
        worker.stop()
