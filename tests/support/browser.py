"""A real headless browser for page tests: Debian's Chromium driven by chromedriver.

Missing browser: the test is skipped locally and fails under CI=true (CI installs
`chromium` and `chromium-driver`, see .ci/run). Screenshots go to `artifacts/` at
the project root (ignored by git), for people and CI to look at.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.support.servers import PROJECT_ROOT
from tests.support.services import IN_CI

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver

ARTIFACTS = PROJECT_ROOT / "artifacts"
FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1400,1000",
]


def _binaries() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if browser and driver:
        return browser, driver
    message = "Chromium and chromedriver are not installed (apt-get install chromium chromium-driver)"
    if IN_CI:
        pytest.fail(f"CI needs a browser: {message}", pytrace=False)
    pytest.skip(message)


def chrome(download_dir: Path | None = None) -> WebDriver:
    """A new headless Chromium (a selenium WebDriver); the caller quits it.

    `download_dir`: where downloads land, without asking.
    """
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        if IN_CI:
            pytest.fail("CI needs selenium (requirements-dev.txt)", pytrace=False)
        pytest.skip("selenium is not installed")
    browser, driver = _binaries()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in FLAGS:
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    options.add_argument(f"--user-data-dir={profile}")
    if download_dir is not None:
        options.add_experimental_option(
            "prefs",
            {
                "download.default_directory": str(download_dir),
                "download.prompt_for_download": False,
            },
        )
    service = Service(executable_path=driver)
    instance = webdriver.Chrome(service=service, options=options)
    instance.set_page_load_timeout(30)
    # The profile goes when the browser does.
    original_quit = instance.quit

    def quit_and_clean() -> None:
        try:
            original_quit()
        finally:
            shutil.rmtree(profile, ignore_errors=True)

    instance.quit = quit_and_clean  # type: ignore[method-assign]
    return instance


@contextmanager
def browser(download_dir: Path | None = None) -> Iterator[WebDriver]:
    """`chrome()` as a context manager that always quits the browser."""
    driver = chrome(download_dir)
    try:
        yield driver
    finally:
        driver.quit()


def screenshot(driver: WebDriver, name: str) -> Path:
    """Save the page as `artifacts/<name>.png` and return its path."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    driver.save_screenshot(str(path))
    return path
