"""Batch publishing (PROTOCOL.md §3, "batch"): over HTTP and from both Python publishers.

A batch keeps order per channel, an item that fails fails alone with its own
error, and concurrent single publishes are sent in batches on their own.
Every test runs against a real gateway and a real redis-server.
"""

from __future__ import annotations

import asyncio
import socket

import orjson
import pytest

from gateway.broker.base import PublishItem
from gateway.sdk.publisher import HttpPublisher, PublishError, RedisPublisher
from tests.conftest import API_KEY, api_headers, free_port, token
from tests.support import http, register_job

PUBLISH = "/api/v1/publish"


@pytest.fixture
async def redis_gateway(make_gateway, redis_url):
    return await make_gateway(redis_url=redis_url)


async def history(gw, channel: str, owner: str = "alice") -> list[dict]:
    headers = {"Authorization": f"Bearer {token(owner)}"}
    status, reply = await http(gw, "GET", f"/api/v1/channels/{channel}/history?limit=1000",
                               headers=headers)
    assert status == 200, reply
    return reply["messages"]


async def test_http_batch_answers_in_order_and_a_bad_item_fails_alone(redis_gateway, ws_client):
    gw = redis_gateway
    await register_job(gw, "b1", "alice")
    client = await ws_client(gw, token("alice"))
    body = {"publications": [
        {"channel": "user:alice", "event": "n", "data": {"i": 0}},
        {"channel": "no spaces", "event": "n", "data": {}},              # bad channel
        {"channel": "job:b1", "event": "n", "data": {"i": 1}, "owner": "mallory"},  # forbidden
        {"channel": "user:alice", "event": "n", "data": {"i": 1}, "owner": "alice"},  # owner rule
        {"channel": "user:alice", "event": "n", "data": {"i": 2}},
        {"channel": "job:b1", "event": "n", "data": {"i": 0}, "owner": "alice"},
        "not an object",
    ]}
    status, reply = await http(gw, "POST", PUBLISH, body, api_headers())
    assert status == 200, reply
    results = reply["results"]
    assert len(results) == 7
    assert [r.get("error") for r in results] == [
        None, "bad_request", "forbidden", "bad_request", None, None, "bad_request"]
    assert all(r["message"] for r in results if "error" in r)
    assert results[0]["channel"] == "user:alice"
    assert results[4]["offset"] == results[0]["offset"] + 1
    assert (results[5]["channel"], results[5]["offset"]) == ("job:b1", 1)
    # The subscriber sees exactly the published items of its channel, in order.
    got = [await client.expect("message"), await client.expect("message")]
    assert [m["data"]["i"] for m in got] == [0, 2]
    assert [m["offset"] for m in got] == [results[0]["offset"], results[4]["offset"]]


@pytest.mark.parametrize("items", [[], "x", [{}] * 1001], ids=["empty", "not-a-list", "1001"])
async def test_http_batch_that_is_not_a_list_of_1_to_1000_is_400_and_publishes_nothing(
    redis_gateway, items
):
    status, reply = await http(redis_gateway, "POST", PUBLISH, {"publications": items},
                               api_headers())
    assert status == 400 and reply["error"] == "bad_request", reply
    assert "1-1000" in reply["message"]


async def test_http_batch_keeps_order_per_channel(redis_gateway):
    items = [{"channel": f"user:c{i % 3}", "event": "n", "data": {"seq": i}} for i in range(300)]
    status, reply = await http(redis_gateway, "POST", PUBLISH, {"publications": items},
                               api_headers())
    assert status == 200, reply
    for c in range(3):
        mine = [r for r, it in zip(reply["results"], items, strict=True)
                if it["channel"] == f"user:c{c}"]
        assert [r["offset"] for r in mine] == list(range(1, 101))
        stored = await history(redis_gateway, f"user:c{c}", owner=f"c{c}")
        assert [m["data"]["seq"] for m in stored] == list(range(c, 300, 3))


async def test_redis_publisher_batches_concurrent_publishes_in_call_order(redis_url):
    async with RedisPublisher(redis_url) as pub:
        calls = [pub.publish(f"user:r{i % 4}", "n", {"seq": i}) for i in range(400)]
        results = await asyncio.gather(*calls)
        batches, items = pub._broker._pipe.stats
        # More than one call per round trip: the 400 calls went out in a few batches.
        assert items == 400 and batches < 20, (batches, items)
        for c in range(4):
            mine = [r["offset"] for r in results if r["channel"] == f"user:r{c}"]
            assert mine == list(range(1, 101))
        hist = await pub._broker.history(pub._namespaces.of("user:r1"), "user:r1", None, 1000)
        assert [p.data["seq"] for p in hist.publications] == list(range(1, 400, 4))


async def test_redis_publish_many_fails_items_alone(redis_url):
    async with RedisPublisher(redis_url, max_publish_bytes=100) as pub:
        await pub.register_job("m1", "alice")
        results = await pub.publish_many([
            {"channel": "job:m1", "event": "progress", "data": {"i": 1}, "owner": "alice"},
            {"channel": "job:m1", "event": "progress", "data": {"i": 2}, "owner": "bob"},
            {"channel": "job:m1", "event": "progress", "data": {"blob": "x" * 200}},
            {"channel": "job:m1", "event": "progress", "data": {"obj": object()}},
            {"channel": "bad channel", "data": {}},
            {"channel": "job:m1", "event": "progress", "data": {"i": 3}},
        ])
    codes = [r.code if isinstance(r, PublishError) else None for r in results]
    assert codes == [None, "forbidden", "message_too_large", "bad_request", "bad_request", None]
    assert [r["offset"] for r in results if isinstance(r, dict)] == [1, 2]


async def test_publish_many_terminal_job_event_notifies_the_owner(redis_gateway, ws_client,
                                                                   redis_url):
    client = await ws_client(redis_gateway, token("alice"))
    async with RedisPublisher(redis_url) as pub:
        results = await pub.publish_many([
            {"channel": "job:t1", "event": "progress", "data": {"status": "processing"},
             "owner": "alice"},
            {"channel": "job:t1", "event": "progress", "data": {"status": "completed"},
             "owner": "alice"},
        ])
    assert [r["offset"] for r in results] == [1, 2]
    note = await client.expect("message")
    assert (note["channel"], note["event"]) == ("user:alice", "notification")
    assert note["data"]["status"] == "completed" and note["data"]["offset"] == 2


async def test_redis_publisher_survives_a_flushed_script_cache(redis_url):
    async with RedisPublisher(redis_url) as pub:
        first = await pub.publish("user:s", "n", {})
        with socket.create_connection(("127.0.0.1", int(redis_url.rsplit(":", 1)[1].split("/")[0]))
                                      ) as s:
            s.sendall(b"SCRIPT FLUSH\r\n")
            assert s.recv(16).startswith(b"+OK")
        second = await pub.publish("user:s", "n", {})
    assert second["offset"] == first["offset"] + 1


async def test_redis_publish_many_without_redis_is_unavailable_for_every_item():
    async with RedisPublisher(f"redis://127.0.0.1:{free_port()}/0") as pub:
        results = await pub.publish_many([{"channel": "user:a", "data": {}}] * 3)
    assert [r.code for r in results] == ["unavailable"] * 3


async def test_http_publisher_batches_concurrent_publishes_and_keeps_order(redis_gateway):
    async with HttpPublisher(redis_gateway.url, API_KEY) as pub:
        results = await asyncio.gather(
            *(pub.publish(f"user:h{i % 2}", "n", {"seq": i}) for i in range(200))
        )
        assert pub._batcher.items == 200 and pub._batcher.batches < 10
    for c in range(2):
        assert [r["offset"] for r in results if r["channel"] == f"user:h{c}"] == list(
            range(1, 101))
        stored = await history(redis_gateway, f"user:h{c}", owner=f"h{c}")
        assert [m["data"]["seq"] for m in stored] == list(range(c, 200, 2))


async def test_http_publish_many_reports_each_items_error(redis_gateway):
    await register_job(redis_gateway, "h1", "alice")
    async with HttpPublisher(redis_gateway.url, API_KEY) as pub:
        results = await pub.publish_many([
            {"channel": "job:h1", "event": "p", "data": 1, "owner": "alice"},
            {"channel": "job:h1", "event": "p", "data": 2, "owner": "bob"},
            {"channel": "job:h1", "event": "p", "data": {"obj": object()}},
            {"channel": "job:h1", "event": "p", "data": 3},
        ])
        # An error of the whole request (here: the API key) is every item's error.
    async with HttpPublisher(redis_gateway.url, "wrong-key") as bad:
        refused = await bad.publish_many([{"channel": "user:a", "data": 1}] * 2)
    codes = [r.code if isinstance(r, PublishError) else None for r in results]
    assert codes == [None, "forbidden", "bad_request", None]
    assert [r["offset"] for r in results if isinstance(r, dict)] == [1, 2]
    assert [(r.code, r.status) for r in refused] == [("unauthorized", 401)] * 2


async def test_http_batch_on_the_memory_engine(gateway):
    """The batch form is the engine contract's publish_many: the memory engine answers it too."""
    body = {"publications": [{"channel": "user:x", "data": i} for i in range(3)]}
    status, reply = await http(gateway, "POST", PUBLISH, body, api_headers())
    assert status == 200
    assert [r["offset"] for r in reply["results"]] == [1, 2, 3]
    assert orjson.dumps(reply["results"][0]).startswith(b'{"channel":"user:x"')


async def test_redis_reads_of_a_storm_share_round_trips(redis_url):
    """History, state and owner reads made together (a connect storm's recoveries) go out
    in a few batches on the engine's own connection, not one pooled connection each."""
    from gateway.broker.redis import RedisBroker
    from gateway.protocol.channels import Namespaces

    broker = RedisBroker(redis_url)
    await broker.start()
    try:
        ns = Namespaces.from_config("").of("user:x")
        await broker.publish_many([PublishItem(ns, f"user:s{i}", "n", {"i": i})
                                   for i in range(300)])
        await broker.register_owner("job:own", "alice")
        before = broker._pipe.stats
        reads = await asyncio.gather(
            *(broker.history(ns, f"user:s{i}", 0, 10) for i in range(300)),
            *(broker.snapshot(ns, f"user:s{i}") for i in range(300)),
            *(broker.owner("job:own") for _ in range(300)),
        )
        batches, calls = (b - a for a, b in zip(before, broker._pipe.stats, strict=True))
    finally:
        await broker.close()
    assert calls == 900 and batches < 20, (batches, calls)
    assert [h.publications[0].data["i"] for h in reads[:300]] == list(range(300))
    assert all(s.offset == 1 for s in reads[300:600])
    assert set(reads[600:]) == {"alice"}
