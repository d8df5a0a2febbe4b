"""Fixtures for end-to-end tests in real headless Chromium (Playwright's sync API).

Debian's chromium is used as installed; nothing here downloads a browser. Without it the tests
skip with a printed reason on a workstation and fail in CI, where .ci/run installs it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import peer_missing

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="module", autouse=True)
def e2e_chromium() -> str:
    if not os.path.exists(CHROMIUM):
        peer_missing(f"{CHROMIUM} is not installed (Debian package 'chromium')")
    return CHROMIUM


@pytest.fixture(scope="module")
def e2e_browser(e2e_chromium: str) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    # Playwright's sync API keeps an asyncio loop in this thread, and Django then refuses ORM
    # calls from it (SynchronousOnlyOperation) although nothing here is concurrent.
    previous = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=e2e_chromium, args=CHROMIUM_ARGS)
            yield browser
            browser.close()
    finally:
        if previous is None:
            os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
        else:
            os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = previous


@pytest.fixture
def e2e_js_errors() -> list[str]:
    """Uncaught errors of the page's JavaScript; tests assert it stays empty."""
    return []


@pytest.fixture
def e2e_page(e2e_browser: Any, e2e_js_errors: list[str]) -> Iterator[Any]:
    context = e2e_browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(15_000)
    page = context.new_page()
    # Console errors are not collected: the browser logs every 4xx answer there, and a
    # rejected file is an expected 400.
    page.on("pageerror", lambda error: e2e_js_errors.append(str(error)))
    yield page
    context.close()


@pytest.fixture
def e2e_storage(settings: Any, tmp_path: Path) -> Path:
    """A private image store for the live server."""
    media = tmp_path / "media"
    storages = {key: dict(value) for key, value in settings.STORAGES.items()}
    storages["default"] = {
        "BACKEND": "django.core.files.storage.FileSystemStorage",
        "OPTIONS": {"location": str(media)},
    }
    settings.STORAGES = storages
    return media
