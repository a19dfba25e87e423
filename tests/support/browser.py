"""Headless Chromium for the dashboard's end-to-end tests (Selenium + Debian's chromium
and chromium-driver), and signing the page in with a stack's API key."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.support.harness import Stack
from tests.support.services import missing_service

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
PAGE_TIMEOUT_S = 30


@contextmanager
def chromium(profile_dir: Path) -> Iterator[Any]:
    """A headless Chromium driven by chromedriver; skips (fails under CI) without them.
    The driver's log and the browser profile go to `profile_dir`."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        missing_service(
            "Chromium and chromedriver (Debian: apt-get install chromium chromium-driver)"
        )
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing_service("the selenium package (pip install -e '.[dev]')")
        raise
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,2400",
        f"--user-data-dir={profile_dir / 'chromium-profile'}",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # request headers
    service = Service(executable_path=str(CHROMEDRIVER), log_output=str(profile_dir / "driver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(PAGE_TIMEOUT_S)
    try:
        yield driver
    finally:
        driver.quit()


def sign_in(browser: Any, stack: Stack) -> None:
    """Put the stack's API key where the dashboard keeps it (the tab's sessionStorage),
    as its API key field does."""
    browser.get(f"{stack.base_url}/ui/")
    browser.execute_script(
        "sessionStorage.setItem('modelyard.apiKey', arguments[0])", stack.api_key
    )
