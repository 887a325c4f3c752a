"""Recovery with `since` (PROTOCOL.md §2): replay in order, no gap, no duplicate, then live;
and `recovered: false` with the current state when the history does not reach back.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.conftest import token
from tests.support import publish, register_job

# The WebSocket transport is the event loop's: test it on herald serve's loop too.
pytestmark = pytest.mark.both_loops


async def progress(gw, job: str, n: int) -> dict:
    return await publish(gw, f"job:{job}", "progress", {"status": "processing", "progress": n})


async def offsets_until(client, last: int) -> list[int]:
    """Offsets of the messages received up to and including offset `last`."""
    seen: list[int] = []
    while not seen or seen[-1] < last:
        seen.append((await client.expect("message"))["offset"])
    return seen


async def test_reachable_since_replays_in_order_then_goes_live(gateway, ws_client):
    await register_job(gateway, "r1", "alice")
    positions = [await progress(gateway, "r1", n) for n in range(1, 6)]
    epoch = positions[0]["epoch"]
    client = await ws_client(gateway, token("alice"))
    sub = await client.request(
        {"type": "subscribe", "channel": "job:r1", "since": {"epoch": epoch, "offset": 2}, "id": 3}
    )
    assert sub["type"] == "subscribed" and sub["id"] == 3
    assert sub["recovered"] is True
    assert (sub["epoch"], sub["offset"]) == (epoch, 5)
    assert "state" not in sub  # recovered: the replay is the state
    replayed = [await client.expect("message") for _ in range(3)]
    assert [m["offset"] for m in replayed] == [3, 4, 5]
    assert [m["data"]["progress"] for m in replayed] == [3, 4, 5]
    await progress(gateway, "r1", 6)
    assert (await client.expect("message"))["offset"] == 6


async def test_since_at_current_offset_replays_nothing(gateway, ws_client):
    await register_job(gateway, "r2", "alice")
    last = [await progress(gateway, "r2", n) for n in range(3)][-1]
    client = await ws_client(gateway, token("alice"))
    sub = await client.request({"type": "subscribe", "channel": "job:r2", "since": last})
    assert sub["recovered"] is True and sub["offset"] == last["offset"]
    await progress(gateway, "r2", 99)
    msg = await client.expect("message")
    assert msg["offset"] == last["offset"] + 1 and msg["data"]["progress"] == 99


async def test_since_from_an_empty_channel_replays_everything(gateway, ws_client):
    """A position seen before the first publication (offset 0) still recovers."""
    client = await ws_client(gateway, token("alice"))
    first = await client.request({"type": "subscribe", "channel": "system:feed"})
    assert first["offset"] == 0
    await client.request({"type": "unsubscribe", "channel": "system:feed"})
    for n in range(3):
        await publish(gateway, "system:feed", "n", n)
    since = {"epoch": first["epoch"], "offset": 0}
    sub = await client.request({"type": "subscribe", "channel": "system:feed", "since": since})
    assert sub["recovered"] is True
    assert [(await client.expect("message"))["data"] for _ in range(3)] == [0, 1, 2]


async def test_replay_racing_live_publications_has_no_gap_and_no_duplicate(gateway, ws_client):
    """Publications keep arriving while a client recovers: each offset exactly once, in order."""
    await register_job(gateway, "r3", "alice")
    start = [await progress(gateway, "r3", n) for n in range(10)][-1]
    client = await ws_client(gateway, token("alice"))

    async def publisher() -> int:
        last = 0
        for n in range(40):
            last = (await progress(gateway, "r3", 100 + n))["offset"]
        return last

    task = asyncio.ensure_future(publisher())
    since = {"epoch": start["epoch"], "offset": 4}
    sub = await client.request({"type": "subscribe", "channel": "job:r3", "since": since})
    assert sub["recovered"] is True
    last = await task
    assert await offsets_until(client, last) == list(range(5, last + 1))


async def test_resubscribe_on_same_connection_never_repeats(gateway, ws_client):
    """A `since` older than what this connection already got replays only the rest."""
    await register_job(gateway, "r4", "alice")
    client = await ws_client(gateway, token("alice"))
    sub = await client.request({"type": "subscribe", "channel": "job:r4"})
    for n in range(3):
        await progress(gateway, "r4", n)
    assert await offsets_until(client, 3) == [1, 2, 3]
    again = await client.request(
        {"type": "subscribe", "channel": "job:r4", "since": {"epoch": sub["epoch"], "offset": 0}}
    )
    assert again["recovered"] is True and again["offset"] == 3
    await progress(gateway, "r4", 4)
    assert (await client.expect("message"))["offset"] == 4


# -- history that does not reach back --------------------------------------------


async def test_trimmed_history_gives_recovered_false_with_state(make_gateway, ws_client):
    gw = await make_gateway(namespaces=json.dumps({"job": {"history_size": 3}}))
    await register_job(gw, "u1", "alice")
    positions = [await progress(gw, "u1", n) for n in range(1, 11)]
    client = await ws_client(gw, token("alice"))
    since = {"epoch": positions[0]["epoch"], "offset": 2}
    sub = await client.request({"type": "subscribe", "channel": "job:u1", "since": since})
    assert sub["recovered"] is False
    assert sub["offset"] == 10
    assert sub["state"] == {"progress": {"status": "processing", "progress": 10}}
    await progress(gw, "u1", 11)
    assert (await client.expect("message"))["offset"] == 11  # no partial replay first


async def test_history_reaching_exactly_back_recovers(make_gateway, ws_client):
    gw = await make_gateway(namespaces=json.dumps({"job": {"history_size": 3}}))
    await register_job(gw, "u2", "alice")
    positions = [await progress(gw, "u2", n) for n in range(1, 11)]
    client = await ws_client(gw, token("alice"))
    since = {"epoch": positions[0]["epoch"], "offset": 7}  # 8, 9, 10 are kept
    sub = await client.request({"type": "subscribe", "channel": "job:u2", "since": since})
    assert sub["recovered"] is True
    assert await offsets_until(client, 10) == [8, 9, 10]


async def test_a_new_epoch_with_its_whole_history_is_replayed_from_offset_1(
    gateway, ws_client
):
    """Another epoch (Redis restarted), whose history still holds offset 1: the
    epoch change is reported, and every publication of the new epoch follows,
    instead of a snapshot that would hide them (issue 16: ~300 lost per run)."""
    await register_job(gateway, "u3", "alice")
    for n in (7, 8):
        pos = await progress(gateway, "u3", n)
    client = await ws_client(gateway, token("alice"))
    since = {"epoch": "an-old-epoch", "offset": 5}
    sub = await client.request({"type": "subscribe", "channel": "job:u3", "since": since})
    assert sub["recovered"] is False
    assert (sub["epoch"], sub["offset"], sub["state"]) == (pos["epoch"], 0, {})
    replayed = [await client.expect("message") for _ in range(2)]
    assert [(m["offset"], m["data"]["progress"]) for m in replayed] == [(1, 7), (2, 8)]
    await progress(gateway, "u3", 9)
    assert (await client.expect("message"))["offset"] == 3  # then live, nothing twice


async def test_a_new_epoch_whose_history_was_trimmed_gives_the_state(make_gateway, ws_client):
    gw = await make_gateway(namespaces=json.dumps({"job": {"history_size": 2}}))
    await register_job(gw, "u6", "alice")
    for n in range(1, 4):
        pos = await progress(gw, "u6", n)
    client = await ws_client(gw, token("alice"))
    since = {"epoch": "an-old-epoch", "offset": 0}
    sub = await client.request({"type": "subscribe", "channel": "job:u6", "since": since})
    assert sub["recovered"] is False
    assert (sub["epoch"], sub["offset"]) == (pos["epoch"], 3)
    assert sub["state"]["progress"]["progress"] == 3
    await progress(gw, "u6", 4)
    assert (await client.expect("message"))["offset"] == 4  # no replay: live from the state


async def test_since_ahead_of_the_channel_is_not_recovered(gateway, ws_client):
    """An offset the channel never reached (e.g. from before a restart) -> recovered false."""
    await register_job(gateway, "u4", "alice")
    pos = await progress(gateway, "u4", 1)
    client = await ws_client(gateway, token("alice"))
    since = {"epoch": pos["epoch"], "offset": 50}
    sub = await client.request({"type": "subscribe", "channel": "job:u4", "since": since})
    assert sub["recovered"] is False and sub["offset"] == 1


async def test_unrecovered_non_state_channel_has_no_state(gateway, ws_client):
    client = await ws_client(gateway, token("alice"))
    await publish(gateway, "system:n", "x", 1)
    sub = await client.request(
        {"type": "subscribe", "channel": "system:n", "since": {"epoch": "old", "offset": 0}}
    )
    assert sub["recovered"] is False and "state" not in sub


async def test_expired_history_starts_a_new_epoch(make_gateway, ws_client):
    """History is bounded by age: an idle channel past its TTL comes back with a new epoch."""
    gw = await make_gateway(namespaces=json.dumps({"job": {"history_ttl": 0.2}}))
    await register_job(gw, "u5", "alice")
    old = await progress(gw, "u5", 1)
    await asyncio.sleep(0.4)
    client = await ws_client(gw, token("alice"))
    sub = await client.request(
        {"type": "subscribe", "channel": "job:u5", "since": {"epoch": old["epoch"], "offset": 0}}
    )
    assert sub["recovered"] is False
    assert sub["epoch"] != old["epoch"] and sub["offset"] == 0


async def test_since_after_unsubscribe_replays_what_was_asked(gateway, ws_client):
    """Unsubscribe, then subscribe with an old `since`: every publication after it comes
    again (the client may have dropped them), in order, once."""
    client = await ws_client(gateway, token("alice"))
    sub = await client.request({"type": "subscribe", "channel": "system:again"})
    for n in range(3):
        await publish(gateway, "system:again", "n", n)
    assert await offsets_until(client, 3) == [1, 2, 3]
    await client.request({"type": "unsubscribe", "channel": "system:again"})
    since = {"epoch": sub["epoch"], "offset": 1}
    again = await client.request({"type": "subscribe", "channel": "system:again", "since": since})
    assert again["recovered"] is True
    assert await offsets_until(client, 3) == [2, 3]
    await publish(gateway, "system:again", "n", 3)
    assert (await client.expect("message"))["offset"] == 4
