"""The node registry and control channel (`gateway.cluster.Directory`), on both implementations.

The Redis one against a real redis-server and a real Redis Cluster; the
memory one in-process. The
operator reads the Redis one through `herald_operator.registry` (tested in
test_operator_registry.py); these are the promises of the interface itself.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from gateway.cluster.control import Drain, Shed, decode, encode
from gateway.cluster.directory import Directory, MemoryDirectory
from gateway.cluster.record import TTL, NodeRecord
from gateway.cluster.redis import RedisDirectory


@pytest.fixture(params=["memory", "redis", "cluster"])
async def directory(request: pytest.FixtureRequest) -> AsyncIterator[Directory]:
    if request.param == "memory":
        d: Directory = MemoryDirectory()
    else:
        url = request.getfixturevalue("redis_url" if request.param == "redis"
                                      else "redis_cluster_url")
        d = RedisDirectory(url, prefix=f"dir{time.time_ns()}:")
    await d.start()
    yield d
    await d.close()


async def test_lists_live_nodes_and_forgets_removed_ones(directory):
    now = time.time()
    await directory.write(NodeRecord("gw-a", connections=3, updated=now))
    await directory.write(NodeRecord("gw-b", connections=5, updated=now))
    nodes = sorted(await directory.read(), key=lambda n: n.node)
    assert [(n.node, n.connections) for n in nodes] == [("gw-a", 3), ("gw-b", 5)]
    await directory.remove("gw-a")
    assert [n.node for n in await directory.read()] == ["gw-b"]


async def test_a_record_older_than_the_ttl_no_longer_counts(directory):
    now = time.time()
    await directory.write(NodeRecord("gw-old", connections=9, updated=now - TTL - 1))
    await directory.write(NodeRecord("gw-new", connections=1, updated=now))
    assert [n.node for n in await directory.read(now)] == ["gw-new"]


async def test_control_commands_reach_the_named_node_only(directory):
    got: dict[str, list[object]] = {"a": [], "b": []}
    directory.listen("a", got["a"].append)
    directory.listen("b", got["b"].append)
    # The Redis directory subscribes asynchronously (on a cluster it reads the
    # slot map first): probe until a listener registered last hears, which
    # means the one subscription holding all three is in place.
    probe: list[object] = []
    directory.listen("probe", probe.append)
    for _ in range(100):
        await directory.send("probe", Drain())
        await asyncio.sleep(0.05)
        if probe:
            break
    await directory.send("a", Shed(2))
    await directory.send("b", Drain())
    for _ in range(100):
        if got["a"] and got["b"]:
            break
        await asyncio.sleep(0.02)
    assert got == {"a": [Shed(2)], "b": [Drain()]}


def test_commands_round_trip_and_malformed_ones_are_refused():
    assert decode(encode(Shed(7))) == Shed(7)
    assert decode(encode(Drain())) == Drain()
    for raw, why in [
        (b"{nope", "not JSON"),
        (b"[1]", "JSON object"),
        (b'{"cmd":"shed","count":0}', "positive integer"),
        (b'{"cmd":"shed","count":true}', "positive integer"),
        (b'{"cmd":"explode"}', "unknown command"),
    ]:
        with pytest.raises(ValueError, match=why):
            decode(raw)


def test_a_record_with_bad_figures_reads_as_zero_not_as_load():
    record = NodeRecord.parse({"node": "gw", "connections": -5, "msgs_out_per_s": "nan",
                               "updated": "soon"})
    assert (record.connections, record.msgs_out_per_s, record.updated) == (0, 0.0, 0.0)
    with pytest.raises(ValueError):
        NodeRecord.parse({"connections": 3})
