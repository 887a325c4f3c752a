"""`helm test`: a WebSocket through the gateway Service receives a publication.

Runs in the Herald image (Tornado and PyJWT are already there) with:
  HERALD_TEST_URL     http://<gateway service>:<port>
  HERALD_JWT_SECRET   the HS256 secret, to sign a short-lived token
  HERALD_API_KEY      the publisher API key
  HERALD_TEST_TIMEOUT seconds for the whole check (default 60)

Steps: wait for the Service to answer /readyz, connect to /ws with a bearer
token, subscribe to a fresh `public:` channel, publish to it over the HTTP
API, and expect that exact message on the socket. Each failure prints what
went wrong and exits non-zero, which is what `helm test` reports.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import sys
import time

import jwt
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from tornado.websocket import websocket_connect


class CheckFailed(Exception):
    """One step of the check failed; the message says which and why."""


def _env(name: str) -> str:
    value = os.environ.get(name, "")
    if not value:
        raise CheckFailed(f"{name} is not set")
    return value


async def _wait_ready(http: AsyncHTTPClient, base: str, deadline: float) -> None:
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            await http.fetch(f"{base}/readyz", request_timeout=5)
            return
        except HTTPClientError as exc:
            last = f"HTTP {exc.code}"
        except OSError as exc:
            last = str(exc)
        await asyncio.sleep(1)
    raise CheckFailed(f"{base}/readyz never answered 200 (last: {last})")


async def _next(ws, deadline: float) -> dict:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise CheckFailed("timed out waiting for the gateway")
    raw = await asyncio.wait_for(ws.read_message(), remaining)
    if raw is None:
        raise CheckFailed(f"the gateway closed the WebSocket (code {ws.close_code})")
    return json.loads(raw)


async def _expect(ws, deadline: float, want: dict) -> dict:
    """Read until a message matching every key of `want`; an error reply fails."""
    while True:
        msg = await _next(ws, deadline)
        if msg.get("type") == "error":
            raise CheckFailed(f"the gateway answered an error: {msg}")
        if all(msg.get(k) == v for k, v in want.items()):
            return msg


async def check() -> str:
    base = _env("HERALD_TEST_URL").rstrip("/")
    secret = _env("HERALD_JWT_SECRET")
    api_key = _env("HERALD_API_KEY")
    deadline = time.monotonic() + float(os.environ.get("HERALD_TEST_TIMEOUT", "60"))
    http = AsyncHTTPClient()
    await _wait_ready(http, base, deadline)

    nonce = secrets.token_hex(8)
    sub = f"helm-test-{nonce}"
    now = int(time.time())
    token = jwt.encode({"sub": sub, "iat": now, "exp": now + 300}, secret, algorithm="HS256")
    ws_url = "ws" + base[len("http") :] + "/ws"
    request = HTTPRequest(ws_url, headers={"Authorization": f"Bearer {token}"})
    ws = await asyncio.wait_for(websocket_connect(request), max(1.0, deadline - time.monotonic()))
    try:
        hello = await _expect(ws, deadline, {"type": "connected"})
        channel = f"public:helm-test-{nonce}"
        ws.write_message(json.dumps({"type": "subscribe", "channel": channel, "id": 1}))
        await _expect(ws, deadline, {"type": "subscribed", "id": 1})
        body = {"channel": channel, "event": "helm-test", "data": {"nonce": nonce}}
        try:
            await http.fetch(
                f"{base}/api/v1/publish",
                method="POST",
                headers={"Authorization": f"apikey {api_key}", "Content-Type": "application/json"},
                body=json.dumps(body),
                request_timeout=10,
            )
        except HTTPClientError as exc:
            detail = exc.response.body.decode(errors="replace") if exc.response else ""
            raise CheckFailed(f"publish refused: HTTP {exc.code} {detail}") from None
        msg = await _expect(ws, deadline, {"type": "message", "channel": channel})
        if msg.get("data") != {"nonce": nonce}:
            raise CheckFailed(f"received the wrong message: {msg}")
        return f"ok: node {hello.get('node')} delivered {channel} offset {msg.get('offset')}"
    finally:
        ws.close()


def main() -> int:
    try:
        print(asyncio.run(check()), flush=True)
    except CheckFailed as exc:
        print(f"helm test failed: {exc}", file=sys.stderr, flush=True)
        return 1
    except (TimeoutError, OSError) as exc:
        print(f"helm test failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
