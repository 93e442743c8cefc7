"""Fixtures for the chat page in a real browser: Playwright driving the system Chromium.

The servers are real Daphne processes (the `servers` fixture) sharing the test database and
a throwaway Redis; pages log in through the real login page. Chromium comes from Debian
(`apt-get install chromium`): Playwright's own browser downloads are not used.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, expect, sync_playwright

from tests.browser.pages import Chat
from tests.support import ServerProcess

CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    # Chromium's background calls to Google hosts fail on a closed network; turn them off.
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# Short intervals so presence and batches show up quickly in a test.
FAST = {"CHAT_PRESENCE_INTERVAL": "0.2", "CHAT_BATCH_WINDOW_MS": "20"}

expect.set_options(timeout=10_000)


@pytest.fixture(scope="module", autouse=True)
def _sync_orm_next_to_playwright() -> Iterator[None]:
    """Playwright's sync API keeps an event loop running in this thread, so Django takes the
    test's own ORM calls (making users and rooms, flushing the database) for async code.
    They are plain synchronous calls: allow them, for these modules only. Module scope so it
    outlives the database fixtures' teardown; server processes never inherit it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
        yield


@pytest.fixture(autouse=True)
def _hub_stopped() -> None:
    """Replaces the suite's async hub fixture: no hub runs in this process here, and
    Playwright's loop, running in this thread, leaves no room for a second one."""


@pytest.fixture(scope="module")
def browser(django_db_setup: None) -> Iterator[Browser]:
    """One Chromium per test module. Playwright's sync API keeps its event loop running in
    this thread while it is up, so it must be gone before the suite's asyncio tests run
    (hence not session scope), and the test database must exist before it starts."""
    if not CHROMIUM.exists():
        message = f"{CHROMIUM} is missing: apt-get install -y chromium"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        yield browser
        browser.close()


@pytest.fixture
def chat(browser: Browser, servers: Callable[..., ServerProcess]) -> Iterator[Chat]:
    site = Chat(browser, servers("daphne", **FAST))
    yield site
    site.close()
    assert site.errors == [], f"uncaught errors in the page: {site.errors}"
