"""Headless Chromium for the browser tests: Debian's `/usr/bin/chromium` driven
by Playwright (never `playwright install`), one fresh profile per page."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Page, async_playwright

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
    "--disable-background-networking", "--disable-quic", "--no-first-run",
    "--disable-component-update", "--disable-sync",
]


def chromium() -> str:
    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is not installed (./dev.sh test installs it)")
    return CHROMIUM


@contextlib.asynccontextmanager
async def open_page() -> AsyncIterator[Page]:
    """A page in a throwaway profile; fails the test on any uncaught page error."""
    executable = chromium()
    profile = tempfile.mkdtemp(prefix="herald-chromium-")
    try:
        async with async_playwright() as pw:
            context = await pw.chromium.launch_persistent_context(
                profile, executable_path=executable, headless=True, args=FLAGS,
                viewport={"width": 1280, "height": 900},
            )
            pg = await context.new_page()
            errors: list[str] = []
            pg.on("pageerror", lambda exc: errors.append(str(exc)))
            yield pg
            await context.close()
            assert errors == [], errors  # no uncaught exception in the page
    finally:
        shutil.rmtree(profile, ignore_errors=True)


async def until(pg: Page, expression: str, timeout: float = 30.0) -> Any:
    """Wait until a JS expression is truthy in the page; returns its value."""
    handle = await pg.wait_for_function(expression, timeout=timeout * 1000)
    return await handle.json_value()
