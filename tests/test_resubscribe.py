"""Re-subscribing with `since` on the same connection: the gap, nothing twice."""

from __future__ import annotations

import orjson
from tornado.httpclient import AsyncHTTPClient

from tests.conftest import api_headers, token


async def publish(gw, channel: str, n: int) -> dict:
    body = {"channel": channel, "event": "note", "data": {"n": n}}
    resp = await AsyncHTTPClient().fetch(
        f"{gw.url}/api/v1/publish", method="POST", headers=api_headers(), body=orjson.dumps(body)
    )
    return orjson.loads(resp.body)


async def test_since_older_than_the_live_start_replays_the_gap_but_not_what_was_sent(
    gateway, ws_client
):
    for n in range(1, 11):
        pos = await publish(gateway, "user:alice", n)
    # Connecting subscribes user:alice automatically at offset 10, no replay.
    client = await ws_client(gateway, token("alice"))
    await publish(gateway, "user:alice", 11)
    assert (await client.expect("message"))["offset"] == 11
    # The client held offsets up to 5 from an earlier connection: it asks from there.
    reply = await client.request(
        {"type": "subscribe", "channel": "user:alice",
         "since": {"epoch": pos["epoch"], "offset": 5}, "id": 1}
    )
    assert reply["recovered"] is True and reply["offset"] == 11
    replayed = [(await client.expect("message"))["offset"] for _ in range(5)]
    assert replayed == [6, 7, 8, 9, 10]  # the gap; 11 is not sent twice
    await publish(gateway, "user:alice", 12)
    assert (await client.expect("message"))["offset"] == 12


async def test_resubscribe_with_a_since_it_already_passed_sends_nothing_twice(
    gateway, ws_client
):
    client = await ws_client(gateway, token("bob"))
    for n in range(1, 4):
        pos = await publish(gateway, "user:bob", n)
    assert [(await client.expect("message"))["offset"] for _ in range(3)] == [1, 2, 3]
    reply = await client.request(
        {"type": "subscribe", "channel": "user:bob",
         "since": {"epoch": pos["epoch"], "offset": 1}}
    )
    assert reply["recovered"] is True
    await publish(gateway, "user:bob", 4)
    assert (await client.recv())["offset"] == 4  # not 2 and 3 again
