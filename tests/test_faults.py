"""Faults between a gateway and Redis, injected by a real TCP proxy (tests/faultproxy.py).

The network lies in the ways the chaos runs found: it goes silent without
closing (stall), drops connections with a reset, or slows down. Nothing a
client was told it has may be lost, silently or otherwise.
"""

from __future__ import annotations

import asyncio
import socket
import time

import redis.asyncio as aioredis

from gateway.sdk.publisher import RedisPublisher
from tests.conftest import token
from tests.support import http, publish


async def numsub(redis_url: str, channel: str) -> int:
    """How many pub/sub connections Redis itself has for a Herald channel."""
    client = aioredis.from_url(redis_url)
    try:
        [(_, count)] = await client.pubsub_numsub(f"herald:pub:{channel}")
        return int(count)
    finally:
        await client.aclose()


# -- the proxy itself ------------------------------------------------------------


def test_the_proxy_forwards_stalls_heals_and_resets(fault_proxy):
    with socket.create_connection(("127.0.0.1", fault_proxy.port), timeout=5) as s:
        s.sendall(b"PING\r\n")
        assert s.recv(16) == b"+PONG\r\n"
        fault_proxy.stall()
        s.sendall(b"PING\r\n")
        s.settimeout(0.3)
        try:
            got = s.recv(16)
        except TimeoutError:
            got = b""
        assert got == b""  # silence, and the socket is still open
        fault_proxy.heal()
        s.settimeout(5)
        assert s.recv(16) == b"+PONG\r\n"  # what the stall held back, delivered
        assert fault_proxy.reset() == 1
        try:
            data = s.recv(16)
            assert data == b"", data
            reset = False
        except ConnectionResetError:
            reset = True
        assert reset  # an RST, not a clean FIN
    assert fault_proxy.stats.bytes_up == 12 and fault_proxy.stats.bytes_down == 14
    assert fault_proxy.stats.connections == 1 and fault_proxy.stats.resets == 1


# -- issue 16 item 1: the silent loss ----------------------------------------------


async def test_a_subscribe_retried_during_a_stall_is_live_after_heal(
    fault_proxy, redis_url, make_gateway, ws_client
):
    """Stall, subscribe (times out: `unavailable`), subscribe again, heal.

    The retry must end `subscribed` with Redis really subscribed, and the
    next publication delivered: before the fix the first SUBSCRIBE's late
    confirmation answered the retry while the hub's UNSUBSCRIBE of the
    failed attempt won in Redis, so NUMSUB was 0 and nothing arrived, ever.
    """
    # Stall detection slower than the subscribe timeout: the retry waits, as it did then.
    gw = await make_gateway(redis_url=fault_proxy.url, redis_timeout=2.0,
                            redis_stall_seconds=30.0)
    client = await ws_client(gw, token("ann"))
    fault_proxy.stall()
    first = await client.request({"type": "subscribe", "id": 1, "channel": "public:lost"}, 15)
    assert first["type"] == "error" and first["code"] == "unavailable", first
    await client.send({"type": "subscribe", "id": 2, "channel": "public:lost"})
    await asyncio.sleep(0.3)
    fault_proxy.heal()
    reply = await client.recv(15)
    rid = 2
    while reply["type"] == "error":  # a retry refused while stalled: the client retries
        assert reply["code"] == "unavailable", reply
        rid += 1
        await asyncio.sleep(0.2)
        reply = await client.request({"type": "subscribe", "id": rid, "channel": "public:lost"},
                                     15)
    assert reply["type"] == "subscribed" and reply["id"] == rid, reply
    assert await numsub(redis_url, "public:lost") == 1
    await publish(gw, "public:lost", "note", {"n": 1})
    message = await client.expect("message", 5)
    assert message["channel"] == "public:lost" and message["data"] == {"n": 1}


# -- issue 16 item 2: readiness that sees a stall ------------------------------------


async def wait_for_status(gw, path: str, status: int, deadline: float = 20.0) -> float:
    """Poll `path` until it answers `status`; returns the seconds it took (bounded)."""
    start = time.monotonic()
    while True:
        got, _ = await http(gw, "GET", path)
        if got == status:
            return time.monotonic() - start
        assert time.monotonic() - start < deadline, f"{path} still {got}"
        await asyncio.sleep(0.1)


async def test_a_stall_makes_the_gateway_not_ready_and_subscribes_fail_fast(
    fault_proxy, make_gateway, ws_client
):
    gw = await make_gateway(redis_url=fault_proxy.url, redis_stall_seconds=1.0)
    client = await ws_client(gw, token("bo"))
    assert (await http(gw, "GET", "/readyz"))[0] == 200
    fault_proxy.stall()
    took = await wait_for_status(gw, "/readyz", 503)
    print(f"not ready {took:.2f}s after the stall (bound: stall_seconds 1.0 + a ping interval)")
    started = time.monotonic()
    reply = await client.request({"type": "subscribe", "id": 1, "channel": "public:s"})
    assert reply["code"] == "unavailable" and "not answering" in reply["message"], reply
    assert time.monotonic() - started < 1.0  # refused at once, not after the command timeout
    fault_proxy.heal()
    await wait_for_status(gw, "/readyz", 200)
    reply = await client.request({"type": "subscribe", "id": 2, "channel": "public:s"})
    assert reply["type"] == "subscribed", reply
    await publish(gw, "public:s", "note", {"n": 1})
    assert (await client.expect("message"))["data"] == {"n": 1}
    assert gw.node.metrics.registry.get_sample_value("herald_broker_stalls_total") == 1


# -- the audit ---------------------------------------------------------------------


async def test_the_audit_repairs_a_subscription_redis_lost_and_closes_the_gap(
    redis_url, make_gateway, ws_client
):
    gw = await make_gateway(redis_url=redis_url, redis_audit_seconds=0.3)
    client = await ws_client(gw, token("cy"))
    reply = await client.request({"type": "subscribe", "id": 1, "channel": "public:drift"})
    assert reply["type"] == "subscribed"
    # Redis drops the subscription behind the gateway's back (standing for any
    # bookkeeping bug, like the one of issue 16): fan-in of the channel stops.
    broker = gw.node.broker
    broker._write(broker._conn, "UNSUBSCRIBE", "herald:pub:public:drift")
    for _ in range(100):
        if await numsub(redis_url, "public:drift") == 0:
            break
        await asyncio.sleep(0.02)
    await publish(gw, "public:drift", "note", {"n": 1})  # published while nobody listens
    message = await client.expect("message", 10)  # the audit resubscribed and closed the gap
    assert message["data"] == {"n": 1}
    await publish(gw, "public:drift", "note", {"n": 2})
    assert (await client.expect("message"))["data"] == {"n": 2}
    assert await numsub(redis_url, "public:drift") == 1
    drift = gw.node.metrics.registry.get_sample_value("herald_broker_subscription_drift_total")
    assert drift == 1


# -- issue 16 item 4: the new epoch after a Redis restart ---------------------------------


async def test_after_a_redis_restart_the_new_epoch_is_delivered_not_only_a_snapshot(
    redis_process, redis_url, fault_proxy, make_gateway, ws_client
):
    """Redis restarts empty; publications are acknowledged in the new epoch before
    the gateway is back. Its subscribers are told (`recovered: false`) and then
    get every one of them, from offset 1, instead of a snapshot that hides them."""
    gw = await make_gateway(redis_url=fault_proxy.url, redis_timeout=1.0)
    client = await ws_client(gw, token("dee"))
    sub = await client.request({"type": "subscribe", "id": 1, "channel": "public:r"})
    await publish(gw, "public:r", "note", {"n": 0})
    assert (await client.expect("message"))["epoch"] == sub["epoch"]
    fault_proxy.stall()  # the gateway is held off while Redis restarts and takes publishes
    redis_process.stop()
    redis_process.start()
    async with RedisPublisher(redis_url) as pub:
        acked = [await pub.publish("public:r", "note", {"n": n}) for n in (1, 2, 3)]
    assert [a["offset"] for a in acked] == [1, 2, 3]
    fault_proxy.heal()
    reset = await client.expect("subscribed", 30)
    while reset["channel"] != "public:r":  # its own user: channel is reset too
        reset = await client.expect("subscribed", 30)
    assert reset["recovered"] is False and reset["epoch"] == acked[0]["epoch"] != sub["epoch"]
    assert reset["offset"] == 0
    got = [await client.expect("message", 10) for _ in range(3)]
    assert [(m["epoch"], m["offset"], m["data"]) for m in got] == [
        (acked[0]["epoch"], n, {"n": n}) for n in (1, 2, 3)
    ]
    assert gw.node.metrics.registry.get_sample_value(
        "herald_recoveries_total", {"recovered": "false"}) >= 1


# -- bytes on a Herald channel that are not a publication --------------------------------


async def test_a_record_that_is_not_a_publication_costs_only_itself(
    redis_url, make_gateway, ws_client
):
    """Before, one bad record made the reader drop its Redis connection (and
    resynchronise every channel); now the client gets the next publication
    and the metric counts the bad one."""
    gw = await make_gateway(redis_url=redis_url)
    client = await ws_client(gw, token("cy"))
    reply = await client.request({"type": "subscribe", "id": 1, "channel": "public:bad"})
    assert reply["type"] == "subscribed"
    await publish(gw, "public:bad", "note", {"n": 1})
    assert (await client.expect("message"))["offset"] == 1
    raw = aioredis.from_url(redis_url)
    try:
        await raw.publish("herald:pub:public:bad", b"not json")
    finally:
        await raw.aclose()
    await publish(gw, "public:bad", "note", {"n": 2})
    message = await client.expect("message")
    assert (message["offset"], message["data"]) == (2, {"n": 2})
    registry = gw.node.metrics.registry
    assert registry.get_sample_value("herald_broker_bad_records_total") == 1
    assert registry.get_sample_value("herald_broker_reconnects_total") == 0
