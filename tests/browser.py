"""Headless Debian chromium for browser tests, fully offline.

selenium-manager is never consulted: the driver and browser paths are explicit, so nothing is
downloaded and tests skip (chromium_available) rather than fail where chromium is missing.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SKIP_REASON = f"headless browser tests need {CHROMIUM} and {CHROMEDRIVER} (apt-get install chromium chromium-driver)"


def chromium_available() -> bool:
    """True if Debian's chromium and its chromedriver are installed and executable."""
    return all(os.access(p, os.X_OK) for p in (CHROMIUM, CHROMEDRIVER))


@contextlib.contextmanager
def open_chromium(tmp_path: Path, width: int = 1280, height: int = 1100) -> Iterator["webdriver.Chrome"]:  # noqa: F821
    """Yield a headless chromium WebDriver with a throwaway profile under tmp_path; always quits it."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = Path(tmp_path) / "chromium-profile"
    profile.mkdir(parents=True, exist_ok=True)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--no-first-run", f"--user-data-dir={profile}",
                 f"--window-size={width},{height}"):
        options.add_argument(flag)
    # An explicit executable_path means selenium-manager is not run; SE_OFFLINE covers any other lookup.
    os.environ.setdefault("SE_OFFLINE", "true")
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
