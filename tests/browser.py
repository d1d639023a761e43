"""Headless Debian ``chromium`` driven through ``chromium-driver`` by selenium (nothing downloaded).

Used by ``tests/test_explorer.py`` and ``benchmarks/explorer_screenshot.py``. ``.ci/run`` installs the two
Debian packages when they are missing; the flags are the ones known to work in this sandbox (no GPU, no
network, no first-run or background fetches), with a fresh profile per browser.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage")


def available() -> str | None:
    """Why no browser can start here (None when chromium, chromedriver and selenium are all present)."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (the test extra has it)"
    for exe in ("chromium", "chromedriver"):
        if shutil.which(exe) is None:
            return f"{exe} is not installed (apt-get install chromium chromium-driver; .ci/run does it)"
    return None


@contextlib.contextmanager
def chromium(width: int = 1366, height: int = 900) -> Iterator[Any]:
    """A headless chromium WebDriver with a fresh profile; the browser's console log is kept."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="mmr-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or "chromium"
    for f in FLAGS:
        opts.add_argument(f)
    opts.add_argument(f"--user-data-dir={profile}")
    opts.add_argument(f"--window-size={width},{height}")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: selenium-manager (which would try to download one) never runs.
    driver = webdriver.Chrome(options=opts, service=Service(shutil.which("chromedriver") or "chromedriver"))
    try:
        driver.set_page_load_timeout(60)
        driver.set_script_timeout(60)
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
