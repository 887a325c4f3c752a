"""The audit log, read from a real `herald serve` process's JSON log lines.

A good token, a bad signature, an expired token, a refresh, a forbidden
subscribe, a wrong API key and an admin action each leave one structured
event (event, subject, client, address, reason), at the production log
level (WARNING) too, and no token or key ever appears in the log.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import orjson
import websockets

from tests.conftest import API_KEY, SECRET, WsClient, token
from tests.support import http


def events(log: Path) -> list[dict[str, Any]]:
    out = []
    for line in log.read_bytes().splitlines():
        try:
            entry = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(entry, dict) and entry.get("logger") == "herald.audit":
            out.append(entry)
    return out


async def wait_for_events(log: Path, count: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 10
    while True:
        found = events(log)
        if len(found) >= count or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.05)


async def connect(gw, tok: str) -> WsClient:
    headers = {"Authorization": f"Bearer {tok}"}
    conn = await websockets.connect(gw.ws_url, additional_headers=headers)
    return WsClient(conn)


async def test_authentication_refusals_and_admin_actions_are_audited(spawn_gateway, tmp_path):
    log = tmp_path / "gateway.log"
    gw = spawn_gateway("gw-audit", log_path=log, HERALD_LOG_LEVEL="WARNING")
    good = token("ana")
    client = await connect(gw, good)
    connected = await client.expect("connected")
    await client.expect("subscribed")
    forged = token("ana")[:-4] + "AAAA"  # a bad signature
    expired = token("ana", ttl=-60)
    for bad in (forged, expired):
        refused = await connect(gw, bad)
        assert (await refused.expect("error"))["code"] in {"unauthorized", "token_expired"}
        await refused.close()
    fresh = token("ana", ttl=7200)
    assert (await client.request({"type": "auth", "token": fresh, "id": 1}))["type"] == \
        "authenticated"
    reply = await client.request({"type": "subscribe", "channel": "admin:secrets", "id": 2})
    assert reply["code"] == "forbidden"
    status, _ = await http(gw, "POST", "/api/v1/publish",
                           {"channel": "public:x", "event": "e", "data": 1},
                           {"Authorization": "apikey not-the-key"})
    assert status == 401
    status, _ = await http(gw, "POST", "/api/v1/users/ana/disconnect", {"reason": "audit test"},
                           {"Authorization": f"apikey {API_KEY}"})
    assert status == 200
    await client.closed()

    found = await wait_for_events(log, 7)
    by_event: dict[str, list[dict[str, Any]]] = {}
    for entry in found:
        by_event.setdefault(entry["event"], []).append(entry)
    (success,) = by_event["auth.success"]
    assert (success["subject"], success["client"], success["address"], success["transport"]) \
        == ("ana", connected["client"], "127.0.0.1", "ws")
    reasons = sorted(e["reason"] for e in by_event["auth.failure"])
    assert reasons == ["token_expired: token has expired",
                       "unauthorized: token signature is invalid"]
    assert all("subject" not in e for e in by_event["auth.failure"])  # unverified: not named
    (refresh,) = by_event["auth.refresh"]
    assert refresh["subject"] == "ana" and refresh["client"] == connected["client"]
    (forbidden,) = by_event["subscribe.forbidden"]
    assert (forbidden["channel"], forbidden["subject"], forbidden["client"]) == \
        ("admin:secrets", "ana", connected["client"])
    (key,) = by_event["apikey.failure"]
    assert (key["reason"], key["path"], key["address"]) == \
        ("wrong API key", "/api/v1/publish", "127.0.0.1")
    (action,) = by_event["admin.disconnect"]
    assert action["user"] == "ana" and action["reason"] == "audit test"
    assert all(e["level"] == "info" and e["message"] == e["event"] for e in found)
    text = log.read_text()
    for secret in (good, forged, expired, fresh, API_KEY, "not-the-key", SECRET):
        assert secret not in text
