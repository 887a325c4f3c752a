"""The admin console at /admin, in headless Chromium against a real `herald serve`.

It lists nodes, hot channels and users, shows a channel's state and history,
publishes a test message and disconnects a user, all through the server API
with the key typed into the page (screenshot: artifacts/admin.png). The key is
sent as a header from JavaScript only, so a cross-site request cannot act.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest
import websockets
from tornado.httpclient import AsyncHTTPClient

from tests.browser import open_page
from tests.conftest import API_KEY, token
from tests.support import http

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"

pytestmark = pytest.mark.timeout(120)


async def until(page, expression: str, timeout: float = 30.0):
    """`tests.browser.until` by polling `evaluate`: the console's CSP forbids the string
    evaluation Playwright's wait_for_function does inside the page (a CSP that works)."""
    for _ in range(int(timeout / 0.1)):
        value = await page.evaluate(expression)
        if value:
            return value
        await asyncio.sleep(0.1)
    pytest.fail(f"never true: {expression}")


async def test_the_console_page_is_locked_down_and_can_be_switched_off(gateway, make_gateway):
    resp = await AsyncHTTPClient().fetch(gateway.url + "/admin")
    assert resp.code == 200 and b'src="/static/admin.js"' in resp.body
    csp = resp.headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in csp and "connect-src 'self'" in csp
    assert resp.headers["X-Frame-Options"] == "DENY"
    assert resp.headers["Cache-Control"] == "no-store"
    assert "Set-Cookie" not in resp.headers  # the page holds no credential
    off = await make_gateway(admin_console=False)
    status, body = await http(off, "GET", "/admin")
    assert (status, body["error"]) == (404, "not_found")


async def test_console_lists_inspects_publishes_and_disconnects(spawn_gateway):
    gw = spawn_gateway("gw-admin")
    async with websockets.connect(gw.ws_url) as alice, open_page() as page:
        await alice.send(orjson.dumps({"type": "auth", "token": token("alice")}).decode())
        assert orjson.loads(await alice.recv())["type"] == "connected"
        await alice.recv()  # user:alice
        await alice.send(orjson.dumps({"type": "subscribe", "channel": "system:news"}).decode())
        assert orjson.loads(await alice.recv())["type"] == "subscribed"

        await page.goto(gw.url + "/admin")
        await page.fill("#key", "not-the-key")
        await page.click("#login button[type=submit]")
        await until(page, "document.querySelector('#login-error').textContent.length > 0")
        assert await page.text_content("#login-error") == "The gateway refused this API key."
        assert await page.is_hidden("#console")

        await page.fill("#key", API_KEY)
        await page.click("#login button[type=submit]")
        await until(page, "document.body.dataset.signedIn === 'true'")
        assert await page.input_value("#key") == ""  # not left in the form
        # Nodes, hot channels, users: what the server API says.
        await until(page, """[...document.querySelectorAll('#nodes tr')]
            .some(r => r.cells[0].textContent === 'gw-admin' && r.cells[2].textContent === '1')""")
        await until(page, """[...document.querySelectorAll('#channels tr')]
            .some(r => r.cells[0].textContent === 'system:news'
                       && r.cells[1].textContent === '1')""")
        await until(page, """[...document.querySelectorAll('#users tr')]
            .some(r => r.cells[0].textContent === 'alice')""")

        # Publish a test message: alice receives it.
        await page.fill("#publish-channel", "system:news")
        await page.fill("#publish-data", '{"headline": "from the console"}')
        await page.click("#publish button[type=submit]")
        msg = orjson.loads(await asyncio.wait_for(alice.recv(), 10))
        assert (msg["channel"], msg["event"], msg["data"]) == (
            "system:news", "test", {"headline": "from the console"})
        await until(page, "document.querySelector('#publish-result').textContent"
                          ".startsWith('Published to system:news at offset 1')")

        # Inspect it from the hot-channels list: state and history.
        await page.click("#channels tr:has(td:text-is('system:news')) button")
        await until(page, "document.querySelector('#history').textContent"
                          ".includes('from the console')")
        assert (await page.text_content("#position")).endswith("offset 1")
        await until(page, "document.querySelector('#presence').textContent.length > 0")
        assert (await page.text_content("#position")).startswith("system:news · epoch ")
        ARTIFACTS.mkdir(exist_ok=True)
        await page.screenshot(path=str(ARTIFACTS / "admin.png"), full_page=True)

        bad = "no spaces"
        await page.fill("#inspect-channel", bad)
        await page.click("#inspect button[type=submit]")
        await until(page, "document.querySelector('#inspect-error').textContent.length > 0")
        assert (await page.text_content("#inspect-error")).startswith(
            "That is not a channel name")  # words, not a code
        # and system:news's figures are no longer shown as if they were this name's
        assert await page.text_content("#history") == ""
        assert await page.text_content("#position") == ""

        # A cross-site form can send no Authorization header: it cannot disconnect anyone.
        forged = await AsyncHTTPClient().fetch(
            gw.url + "/api/v1/users/alice/disconnect", method="POST", raise_error=False,
            body="reason=csrf", headers={"Content-Type": "application/x-www-form-urlencoded",
                                         "Origin": "https://evil.example"})
        assert forged.code == 401
        assert await page.evaluate("document.cookie") == ""
        assert await page.evaluate("localStorage.length + sessionStorage.length") == 0

        # Disconnect alice from her row: her connection closes with 4003, and she is gone.
        await page.fill("#disconnect-reason", "maintenance")
        await page.click("#users tr:has(td:text-is('alice')) button")
        with pytest.raises(websockets.ConnectionClosed) as closed:
            while True:
                await asyncio.wait_for(alice.recv(), 10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4003
        assert closed.value.rcvd.reason == "maintenance"
        await until(page, "document.querySelector('#disconnect-result').textContent"
                          " === 'Disconnected 1 connection(s) of alice.'")
        await until(page, """![...document.querySelectorAll('#users tr')]
            .some(r => r.cells[0].textContent === 'alice')""")
