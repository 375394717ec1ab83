"""Browser tests: the web console in real headless Chromium (Debian's package, installed by
`make install-browser`), driven by Playwright's Python package. Where Chromium is missing they
skip, naming the make target, except in CI (AGENTRUN_REQUIRE_TOOLCHAINS=1), where they fail."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, Page, sync_playwright


def chromium_path() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        why = "chromium not installed: `make install-browser` installs Debian's package"
        if os.environ.get("AGENTRUN_REQUIRE_TOOLCHAINS") == "1":
            pytest.fail(f"{why} (AGENTRUN_REQUIRE_TOOLCHAINS=1)")
        pytest.skip(why)
    return found


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    # Module-scoped: Playwright's sync API runs an event loop on this thread while it is open,
    # and the asyncio tests of later modules need the thread to themselves.
    path = chromium_path()
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=path, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    opened = context.new_page()
    opened.set_default_timeout(10_000)
    yield opened
    context.close()
