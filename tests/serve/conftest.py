"""The browser fixtures of the serve tests (Chromium through Selenium), skipping or failing as browser.py says."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from kdsearch.report.figures import find_chromium
from tests.serve.browser import FLAGS, missing


@pytest.fixture
def browser(tmp_path):
    reason = missing()
    if reason is not None and os.environ.get("KDSEARCH_REQUIRE_BROWSER"):
        pytest.fail(f"KDSEARCH_REQUIRE_BROWSER is set but {reason}")
    if reason is not None:
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = find_chromium()
    for flag in [*FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    yield driver
    driver.quit()


@pytest.fixture
def artifacts(tmp_path) -> Path:
    directory = Path(os.environ.get("KDSEARCH_TEST_ARTIFACTS", tmp_path / "artifacts"))
    directory.mkdir(parents=True, exist_ok=True)
    return directory
