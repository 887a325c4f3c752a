"""The asyncio client (`gateway.sdk.client.HeraldClient`) against real gateways.

The one that matters most: a `herald serve` process on the Redis engine is
killed and restarted while a publisher keeps publishing, and the client
hands over every offset exactly once, in order. The others pin the pieces:
callbacks and the iterator, obeying `reconnect`, `recovered: false` with the
state, token refresh, and giving up on a refused token without `get_token`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable

import pytest

from gateway.sdk.client import HeraldClient, Update, backoff_delay
from gateway.sdk.publisher import RedisPublisher
from tests.conftest import token
from tests.support import publish, register_job


async def wait_until(cond: Callable[[], bool], timeout: float = 15.0) -> None:
    """Wait for a condition (not a timed assertion: the timeout only bounds a hang)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.02)


def fast(url: str, tok: str | None = None, **kwargs) -> HeraldClient:
    return HeraldClient(url, tok, backoff_initial=0.05, backoff_max=0.3, **kwargs)


def test_backoff_is_capped_exponential_with_full_jitter():
    assert [backoff_delay(n, 0.5, 30, lambda: 1.0) for n in range(8)] == [
        0.5, 1, 2, 4, 8, 16, 30, 30]
    assert backoff_delay(5, 0.5, 30, lambda: 0.0) == 0.0  # full jitter reaches down to 0
    assert backoff_delay(10_000, 0.5, 30, lambda: 0.5) == 15.0  # no overflow


async def test_callbacks_and_iterator_get_state_then_messages(gateway):
    await register_job(gateway, "j1", "alice")
    await publish(gateway, "job:j1", "progress", {"progress": 10})
    states: list[Update] = []
    messages: list[Update] = []
    async with fast(gateway.url, token("alice")) as client:
        client.subscribe("job:j1", on_message=messages.append, on_state=states.append)
        stream = client.updates()
        first = await asyncio.wait_for(anext(stream), 10)
        assert first.kind == "state" and first.data == {"progress": {"progress": 10}}
        assert (first.offset, first.reset) == (1, False)
        for n in (20, 30):
            await publish(gateway, "job:j1", "progress", {"progress": n})
        got = [await asyncio.wait_for(anext(stream), 10) for _ in range(2)]
        assert [(u.kind, u.offset, u.data) for u in got] == [
            ("message", 2, {"progress": 20}), ("message", 3, {"progress": 30})]
        assert [u.offset for u in messages] == [2, 3]
        assert client.position("job:j1") == (first.epoch, 3)
        await stream.aclose()


async def test_reconnect_message_is_obeyed_and_nothing_is_lost(gateway):
    await register_job(gateway, "j1", "alice")
    offsets: list[int] = []
    seen_states: list[str] = []
    client = fast(gateway.url, token("alice"), on_state_change=seen_states.append)
    client.subscribe("job:j1", on_message=lambda u: offsets.append(u.offset))
    async with client:
        await asyncio.wait_for(client.wait_connected(), 10)
        await publish(gateway, "job:j1", "progress", {"n": 1})
        await wait_until(lambda: offsets == [1])
        assert await gateway.node.shed(1, "rebalance") == 1  # reconnect + close 1012
        for n in range(2, 6):  # published while it is away (after_ms >= 250)
            await publish(gateway, "job:j1", "progress", {"n": n})
        await wait_until(lambda: offsets == [1, 2, 3, 4, 5])
        await publish(gateway, "job:j1", "progress", {"n": 6})
        await wait_until(lambda: offsets == [1, 2, 3, 4, 5, 6])
    assert "reconnecting" in seen_states
    assert client.stats["reconnects"] == 1 and client.stats["resets"] == 0


async def test_lost_history_hands_over_the_state(make_gateway):
    small = json.dumps({"job": {"access": "owner", "history_size": 2, "state": True}})
    gw = await make_gateway(namespaces=small)
    await register_job(gw, "j1", "alice")
    states: list[Update] = []
    offsets: list[int] = []
    async with fast(gw.url, token("alice")) as client:
        client.subscribe("job:j1", on_message=lambda u: offsets.append(u.offset),
                         on_state=states.append)
        await wait_until(lambda: len(states) == 1)
        await gw.node.shed(1, "rebalance")
        for n in range(1, 6):  # more than the history keeps
            await publish(gw, "job:j1", "progress", {"progress": n * 10})
        await wait_until(lambda: len(states) == 2)
    assert states[1].reset is True and states[1].offset == 5
    assert states[1].data == {"progress": {"progress": 50}}
    assert offsets == []  # nothing pretended to be a contiguous stream
    assert client.stats["resets"] == 1


async def test_token_is_refreshed_before_it_expires(gateway):
    calls: list[int] = []

    async def fresh() -> str:
        calls.append(1)
        return token("alice", ttl=3600)

    async with fast(gateway.url, token("alice", ttl=8), get_token=fresh,
                    refresh_before=7.5) as client:
        await asyncio.wait_for(client.wait_connected(), 10)
        await wait_until(lambda: len(calls) == 1)
        session = next(iter(gateway.node.sessions))
        await wait_until(lambda: session.claims.exp > 3000 + time.time())
    assert client.stats["reconnects"] == 0  # refreshed in place, no reconnect


async def test_refused_token_without_get_token_goes_offline(gateway):
    client = fast(gateway.url, token("alice", ttl=-60))
    await client.start()
    await wait_until(lambda: client.state == "offline")
    assert "4001" in str(client.failure)
    await client.close()


@pytest.mark.timeout(90)
async def test_nothing_lost_across_a_gateway_restart(spawn_gateway, redis_url):
    """Kill -9 the gateway mid-stream, keep publishing, restart it: every offset, once."""
    gw = spawn_gateway("gw-restart", HERALD_REDIS_URL=redis_url)
    async with RedisPublisher(redis_url) as pub:
        await pub.register_job("r1", owner="alice")
        job: list[int] = []
        notes: list[int] = []
        client = fast(gw.url, token("alice"))
        client.subscribe("job:r1", on_message=lambda u: job.append(u.offset))
        client.subscribe("user:alice", on_message=lambda u: notes.append(u.offset))
        published: dict[str, list[int]] = {"job": [], "user": []}

        async def send(n: int) -> None:
            reply = await pub.publish("job:r1", "progress", {"n": n})
            published["job"].append(reply["offset"])
            reply = await pub.publish("user:alice", "notification", {"n": n})
            published["user"].append(reply["offset"])

        async with client:
            await asyncio.wait_for(client.wait_connected(), 10)
            await wait_until(lambda: client.position("job:r1") is not None)
            for n in range(1, 6):
                await send(n)
            await wait_until(lambda: len(job) == 5 and len(notes) == 5)
            await asyncio.to_thread(gw.stop)  # SIGKILL: no goodbye, no reconnect message
            for n in range(6, 16):  # while no gateway is running
                await send(n)
            await asyncio.to_thread(gw.start)
            for n in range(16, 21):
                await send(n)
            await wait_until(lambda: len(job) >= 20 and len(notes) >= 20, timeout=30)
        assert job == published["job"] == list(range(1, 21))
        assert notes == published["user"] == list(range(1, 21))
        assert client.stats["reconnects"] >= 1
        assert client.stats["resets"] == 0
        # user:alice comes back subscribed without `since` (automatic): the
        # client filled that gap from the HTTP history.
        assert client.stats["gaps_filled"] >= 1


async def test_rpc_and_publish_through_the_backend(make_gateway, backend):
    from gateway.sdk.client import HeraldError
    from tests.backend_app import Reject

    namespaces = json.dumps({"room": {"access": "authenticated", "client_publish": True}})
    gw = await make_gateway(**backend.settings(namespaces=namespaces))
    got: list[Update] = []
    async with fast(gw.url, token("alice")) as client:
        client.subscribe("room:1", on_message=got.append)
        await asyncio.wait_for(client.wait_connected(), 10)
        assert await asyncio.wait_for(client.rpc("echo", {"n": [1, 2]}), 10) == {"n": [1, 2]}
        calls = await asyncio.gather(*(client.rpc("echo", i) for i in range(5)))
        assert calls == list(range(5))  # concurrent calls, each answered by its own id
        backend.on("rpc", Reject("not_found", "no such job"))
        with pytest.raises(HeraldError) as err:
            await asyncio.wait_for(client.rpc("jobs.cancel", {"job": "x"}), 10)
        assert (err.value.code, err.value.message) == ("not_found", "no such job")
        await wait_until(lambda: client.position("room:1") is not None)  # subscribed
        pos = await asyncio.wait_for(client.publish("room:1", "chat", {"text": "hi"}), 10)
        assert (pos["type"], pos["channel"], pos["offset"]) == ("published", "room:1", 1)
        await wait_until(lambda: bool(got))
        assert (got[0].offset, got[0].data) == (1, {"text": "hi"})
        with pytest.raises(HeraldError) as err:
            await asyncio.wait_for(client.publish("public:x", "chat", {}), 10)
        assert err.value.code == "forbidden"


async def test_a_server_api_disconnect_for_good_keeps_the_client_offline(gateway):
    from gateway.sdk.client import Disconnected
    from tests.conftest import api_headers
    from tests.support import http

    async with fast(gateway.url, token("alice")) as client:
        await asyncio.wait_for(client.wait_connected(), 10)
        status, body = await http(gateway, "POST", "/api/v1/users/alice/disconnect",
                                  {"reason": "banned"}, api_headers())
        assert (status, body["connections"]) == (200, 1)
        await wait_until(lambda: client.state == "offline")
        assert isinstance(client.failure, Disconnected)
        assert client.stats["reconnects"] == 0
