"""The rollout page in a real headless browser (Debian's Chromium, driven by Selenium through
its chromedriver) against a real API process: it renders the phase, the gates, the backlog and
a dead letter, which the browser then replays through the confirmation form."""

from __future__ import annotations

import base64
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from harness.processes import ApiProcess, RedisServer
from tests.conftest import LOG_DIR, RUN_ID
from tests.support import SessionFactory, wait_until
from tests.test_cli import _behind_chat_with_dead_letter, _letter
from tests.test_ops import no_open_letters as no_open_letters

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1400,1800",
]
USER, PASSWORD = "ops", "browser-" + os.urandom(6).hex()


@pytest.fixture()
def browser(tmp_path: Path) -> Iterator[object]:
    """Chromium with a fresh profile. Missing, the test fails (scripts/setup.sh installs it)."""
    for binary in (CHROMIUM, CHROMEDRIVER):
        if not (Path(binary).exists() or shutil.which(Path(binary).name)):
            pytest.fail(
                f"{binary} is missing: as root, apt-get install --no-install-recommends "
                "chromium chromium-driver (scripts/setup.sh does)"
            )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(flag)
    service = Service(CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        # Credentials in the URL are not sent with every request: send the header on each one.
        credentials = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        driver.execute_cdp_cmd("Network.enable", {})
        driver.execute_cdp_cmd(
            "Network.setExtraHTTPHeaders", {"headers": {"Authorization": f"Basic {credentials}"}}
        )
        yield driver
    finally:
        driver.quit()


@pytest.fixture()
def ops_api(tmp_path: Path) -> Iterator[tuple[ApiProcess, RedisServer]]:
    """A real API process with the page on, publishing to a broker of its own (no worker
    consumes it: the replayed letter stays `replayed`, its job waits in the queue)."""
    broker = RedisServer().start()
    api = ApiProcess(
        {**os.environ, "OPS_BASIC_AUTH": f"{USER}:{PASSWORD}", "REDIS_URL": broker.url},
        LOG_DIR / f"ops-api-{RUN_ID}.log",
    )
    try:
        api.start()
        yield api, broker
    finally:
        api.stop()
        broker.stop()


def arrived(browser: Any, element_id: str) -> Any:
    """The element of the page a click leads to: a click returns before that page has loaded."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, 20).until(
        expected_conditions.presence_of_element_located((By.ID, element_id))
    )


def test_the_page_in_a_browser_shows_the_rollout_and_replays_a_dead_letter(
    browser: Any,
    ops_api: tuple[ApiProcess, RedisServer],
    engine: Engine,
    sessionmaker: SessionFactory,
    clean: None,
    no_open_letters: None,
    tmp_path: Path,
) -> None:
    from selenium.webdriver.common.by import By

    api, broker = ops_api
    chat_id, letter = _behind_chat_with_dead_letter(sessionmaker)

    browser.get(api.base + "/ops/")
    text = browser.find_element(By.TAG_NAME, "body").text
    assert re.match(r"phase: dual_write for \d+[smhd]$", browser.find_element(By.ID, "phase").text)
    gates = [g.text for g in browser.find_elements(By.CSS_SELECTOR, "li.gate")]
    assert any(re.match(r"\[(ok|no)\] phase held: dual_write held \d+s of the", g) for g in gates)
    assert "[ok] one step: dual_write -> jsonb_only" in gates, gates
    assert "python -m app phase set verify_reads" in text
    assert browser.find_element(By.ID, "chats-behind").text == "chats behind: 1"
    row = browser.find_element(By.ID, f"letter-{letter}")
    assert str(chat_id) in row.text and "failed" in row.text
    assert row.find_element(By.CLASS_NAME, "state").text == "open"
    refresh = browser.find_element(By.CSS_SELECTOR, 'meta[http-equiv="refresh"]')
    assert refresh.get_attribute("content") == "10"

    screenshot = tmp_path / "ops-page.png"
    assert browser.save_screenshot(str(screenshot))
    kept = LOG_DIR / f"ops-page-{RUN_ID}.png"
    shutil.copy(screenshot, kept)
    image = screenshot.read_bytes()
    assert image.startswith(b"\x89PNG\r\n\x1a\n") and len(image) > 20_000, len(image)

    # Replay: the button leads to a confirmation (which does not refresh itself), then a POST.
    browser.find_element(By.ID, f"replay-{letter}").click()
    arrived(browser, "confirm")
    assert browser.current_url.startswith(api.base + "/ops/replay?id=")
    assert not browser.find_elements(By.CSS_SELECTOR, 'meta[http-equiv="refresh"]')
    assert _letter(engine, letter)["replayed_at"] is None
    browser.find_element(By.ID, "confirm").click()
    outcome = arrived(browser, "replayed").text
    assert re.search(rf"{letter}\s+chat {chat_id}: enqueued", outcome), outcome
    assert browser.find_element(By.ID, "outcome").text == "1 replayed"
    assert _letter(engine, letter)["replayed_at"] is not None
    wait_until(lambda: broker.client().llen("dualwrite.sync") >= 1, timeout=10)

    browser.find_element(By.ID, "back").click()
    row = arrived(browser, f"letter-{letter}")
    assert row.find_element(By.CLASS_NAME, "state").text == "replayed"
    browser.save_screenshot(str(tmp_path / "ops-page-replayed.png"))
    shutil.copy(tmp_path / "ops-page-replayed.png", LOG_DIR / f"ops-page-replayed-{RUN_ID}.png")
