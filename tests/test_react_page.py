"""A React page built from the npm package, in headless Chromium.

`clients/js/example/` (the hooks: `HeraldProvider`, `useHerald`,
`useChannel`, `useJobProgress`) is bundled with the package's esbuild into a
static page served from loopback — no CDN — and shows a job's live progress
while its Redis-engine gateway is SIGKILLed and restarted: the bar keeps
advancing, the badge says `reconnecting` meanwhile, and every publication
reaches the page once, in order.
"""

from __future__ import annotations

import asyncio
import functools
import http.server
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from gateway.sdk.publisher import RedisPublisher
from tests.browser import open_page, until
from tests.conftest import free_port, token

PACKAGE = Path(__file__).resolve().parents[1] / "clients" / "js"
ESBUILD = PACKAGE / "node_modules" / ".bin" / "esbuild"
HTML = b"""<!doctype html><html><head><meta charset="utf-8"><title>Herald React example</title>
</head><body><div id="root"></div><script type="module" src="/app.js"></script></body></html>"""

pytestmark = pytest.mark.timeout(120)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def site(tmp_path: Path) -> Iterator[str]:
    """The example app bundled (React included) and served on a loopback port."""
    if not ESBUILD.exists():
        pytest.fail("clients/js/node_modules is missing (./dev.sh test runs npm ci there)")
    subprocess.run(
        [str(ESBUILD), "example/main.tsx", "--bundle", "--format=esm", "--minify",
         f"--outfile={tmp_path / 'app.js'}", '--define:process.env.NODE_ENV="production"',
         "--log-level=warning"],
        cwd=PACKAGE, check=True, timeout=60,
    )
    (tmp_path / "index.html").write_bytes(HTML)
    handler = functools.partial(_Quiet, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


async def test_use_job_progress_shows_live_progress_across_a_gateway_restart(
    spawn_gateway, redis_url, site
):
    gw = spawn_gateway("gw-react", HERALD_REDIS_URL=redis_url, HERALD_ALLOWED_ORIGINS=site)
    sent: list[int] = []  # the publisher's offsets
    card = '.job[data-job-id="r1"]'

    async with RedisPublisher(redis_url) as pub, open_page() as page:
        await pub.register_job("r1", owner="react-user")
        await pub.register_job("theirs", owner="someone-else")

        async def progress(n: int, status: str = "processing") -> None:
            reply = await pub.job_progress("r1", "react-user", status, n, stage=f"stage {n // 10}",
                                           message=f"step {n}")
            sent.append(reply["offset"])

        config = {"url": gw.url, "token": token("react-user"), "jobs": ["r1", "theirs"], "log": []}
        await page.add_init_script(f"window.heraldExample = {orjson.dumps(config).decode()};")
        await page.goto(site + "/")
        await until(page, "document.querySelector('#connection')?.dataset.state === 'connected'")
        assert await page.get_attribute("#connection", "data-transport") == "ws"
        await until(page, f"document.querySelector('{card}')")
        # Not the owner: the hook's `error`, not a bar stuck at 0.
        await until(page, "document.querySelector('.job[data-error=\"forbidden\"]')")
        for n in range(1, 6):
            await progress(n)
        await until(page, f"document.querySelector('{card}').dataset.progress === '5'")
        assert await page.text_content(f"{card} .message") == "step 5"

        await asyncio.to_thread(gw.stop)  # SIGKILL
        await until(page, "document.querySelector('#connection').dataset.state === 'reconnecting'")
        assert await page.text_content("#connection") == "Reconnecting…"
        await until(page, f"document.querySelector('{card} .stale')")  # the hook's `state`
        for n in range(6, 16):  # while the page has no gateway
            await progress(n)
        await asyncio.to_thread(gw.start)
        for n in range(16, 21):
            await progress(n)
        await until(page, f"document.querySelector('{card}').dataset.progress === '20'")
        assert await page.get_attribute(f"{card} progress", "value") == "20"
        assert await page.text_content(f"{card} strong") == "processing"
        await progress(100, "completed")
        await until(page, f"document.querySelector('{card}').dataset.status === 'completed'")

        log = await page.evaluate(
            "window.heraldExample.log.filter(e => e.job === 'r1').map(e => e.offset)")
        assert log == sent == list(range(1, 22))  # each once, in order, none lost
        assert await page.get_attribute("#connection", "data-state") == "connected"
        assert await page.query_selector(f"{card} .stale") is None
