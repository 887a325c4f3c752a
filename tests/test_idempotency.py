"""Idempotent publishing: a retry after an unknown outcome is published at most once.

A 503 `unavailable` from `POST /api/v1/publish` means the outcome is unknown:
the script may have run in Redis after the gateway gave up waiting. Before
idempotency keys, a publisher retrying as it should published twice (4 and 2
duplicates in two chaos runs).
"""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from gateway.sdk.publisher import HttpPublisher, RedisPublisher
from tests.conftest import API_KEY, api_headers, token
from tests.support import http

PUBLISH = "/api/v1/publish"


def keyed(key: str) -> dict[str, str]:
    return {**api_headers(), "Idempotency-Key": key}


async def test_the_same_key_twice_publishes_once_and_answers_the_original(gateway, ws_client):
    client = await ws_client(gateway, token("ida"))
    body = {"channel": "user:ida", "event": "note", "data": {"n": 1}}
    status, first = await http(gateway, "POST", PUBLISH, body, keyed("order-42:paid"))
    assert status == 200 and "duplicate" not in first
    status, again = await http(gateway, "POST", PUBLISH, body, keyed("order-42:paid"))
    assert status == 200 and again == {**first, "duplicate": True}
    # The body field is the same key.
    in_body = {**body, "idempotency_key": "order-42:paid"}
    status, third = await http(gateway, "POST", PUBLISH, in_body, api_headers())
    assert status == 200 and third["duplicate"] is True and third["offset"] == first["offset"]
    status, other = await http(gateway, "POST", PUBLISH, {**body, "data": {"n": 2}},
                               keyed("order-43:paid"))
    assert status == 200 and other["offset"] == first["offset"] + 1
    assert (await client.expect("message"))["data"] == {"n": 1}
    assert (await client.expect("message"))["data"] == {"n": 2}  # nothing in between
    duplicates = gateway.node.metrics.registry.get_sample_value(
        "herald_publications_duplicate_total")
    assert duplicates == 2


async def test_malformed_or_conflicting_keys_are_refused(gateway):
    body = {"channel": "user:ida", "event": "note", "data": {}}
    for key in ("", "x" * 129, "has space", "ünï"):
        status, reply = await http(gateway, "POST", PUBLISH, {**body, "idempotency_key": key},
                                   api_headers())
        assert status == 400 and reply["error"] == "bad_request", key
    status, reply = await http(gateway, "POST", PUBLISH, {**body, "idempotency_key": "a"},
                               keyed("b"))
    assert status == 400 and "differ" in reply["message"]
    status, reply = await http(gateway, "POST", PUBLISH, {**body, "idempotency_key": 7},
                               api_headers())
    assert status == 400


async def meta_offset(redis_url: str, channel: str) -> int:
    client = aioredis.from_url(redis_url)
    try:
        return int(await client.hget(f"herald:{{{channel}}}:meta", "offset") or 0)
    finally:
        await client.aclose()


async def test_a_publish_that_timed_out_retried_with_its_key_is_delivered_once(
    fault_proxy, redis_url, make_gateway, ws_client
):
    gw = await make_gateway(redis_url=fault_proxy.url, redis_timeout=1.0,
                            redis_stall_seconds=30.0)
    client = await ws_client(gw, token("ida"))
    body = {"channel": "user:ida", "event": "note", "data": {"n": 1}}
    # A running gateway has its publish script loaded in Redis (else the stalled
    # EVALSHA would meet NOSCRIPT and, its connection gone, not be applied at all).
    status, _ = await http(gw, "POST", PUBLISH, {**body, "channel": "user:warm"}, api_headers())
    assert status == 200
    fault_proxy.stall()
    status, reply = await http(gw, "POST", PUBLISH, body, keyed("step-1"))
    assert status == 503 and reply["error"] == "unavailable"
    assert "127.0.0.1" not in reply["message"]  # no internal address to publishers
    fault_proxy.heal()
    # The command the stall held reaches Redis: the publish was applied after all.
    for _ in range(200):
        if await meta_offset(redis_url, "user:ida") == 1:
            break
        await asyncio.sleep(0.02)
    assert await meta_offset(redis_url, "user:ida") == 1
    status, retried = await http(gw, "POST", PUBLISH, body, keyed("step-1"))
    assert status == 200 and retried["duplicate"] is True and retried["offset"] == 1
    status, _ = await http(gw, "POST", PUBLISH, {**body, "data": {"n": 2}}, keyed("step-2"))
    assert status == 200
    first = await client.expect("message")
    second = await client.expect("message")
    assert (first["offset"], first["data"]) == (1, {"n": 1})
    assert (second["offset"], second["data"]) == (2, {"n": 2})  # no copy of 1 between


async def test_the_python_publishers_pass_the_key(gateway, redis_url):
    async with HttpPublisher(gateway.url, API_KEY) as pub:
        a = await pub.publish("user:py", "e", {}, idempotency_key="k1")
        b = await pub.publish("user:py", "e", {}, idempotency_key="k1")
        c = await pub.job_progress("j1", "py", "running", 10, idempotency_key="k1")
        d = await pub.job_progress("j1", "py", "running", 10, idempotency_key="k1")
    assert "duplicate" not in a and b == {**a, "duplicate": True}
    assert "duplicate" not in c and d["duplicate"] is True
    async with RedisPublisher(redis_url) as direct:
        e = await direct.publish("user:py", "e", {}, idempotency_key="k2")
        f = await direct.publish("user:py", "e", {}, idempotency_key="k2")
    assert "duplicate" not in e and f == {**e, "duplicate": True}
