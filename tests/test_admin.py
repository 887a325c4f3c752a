"""The server API (API key) on one gateway and across a cluster of real gateways."""

from __future__ import annotations

import asyncio
import logging

import pytest

from gateway.cluster import control
from gateway.core.admin import merge_pages, page
from tests.conftest import api_headers, token
from tests.support import http, publish
from tests.test_cluster import connect, http_json


def test_a_page_and_the_merge_of_pages_are_exact():
    counts = {f"job:{i:02d}": i for i in range(10)} | {"public:x": 3}
    assert page(counts, "job:*", "job:03", 3) == [["job:04", 4], ["job:05", 5], ["job:06", 6]]
    assert page(counts, "public:x", "", 3) == [["public:x", 3]]
    a = page({"a": 1, "b": 1, "d": 1}, "*", "", 3)  # pages of limit + 1 = 3
    b = page({"b": 2, "c": 2, "e": 2}, "*", "", 3)
    assert merge_pages({"gw-0": a, "gw-1": b}, 2) == ([["a", 1], ["b", 3]], True)
    assert merge_pages({"gw-0": [["a", 1]], "gw-1": [["a", 2]]}, 2) == ([["a", 3]], False)


def test_server_api_commands_round_trip_and_refuse_bad_ones():
    for action in (control.Disconnect("u", "c-1", "ban", False), control.Unsubscribe("u", "r:1"),
                   control.Subscribe("u", "r:1", None), control.ListChannels("job:*", "x", 10),
                   control.ListUsers()):
        req = control.Request("id1", "gw-0", action)
        assert control.decode(control.encode(req)) == req
    for bad in (b'{"cmd":"request","id":"1","reply_to":"g","action":{"do":"explode"}}',
                b'{"cmd":"request","id":"1","reply_to":"g","action":{"do":"subscribe","user":"u"}}',
                b'{"cmd":"request","id":"","reply_to":"g","action":{"do":"users"}}',
                b'{"cmd":"request","id":"1","reply_to":"g","action":{"do":"users","limit":"9"}}'):
        with pytest.raises(ValueError):
            control.decode(bad)


async def admin(gw, path, body=None, method="POST"):
    return await http(gw, method, path, body, api_headers())


async def test_disconnect_unsubscribe_subscribe_and_listings_on_one_gateway(
    make_gateway, ws_client, caplog
):
    gw = await make_gateway()
    a1 = await ws_client(gw, token("alice"), handshake=False)
    first_id = (await a1.expect("connected"))["client"]
    await a1.expect("subscribed")
    a2 = await ws_client(gw, token("alice"))
    bob = await ws_client(gw, token("bob"))
    for c in (a1, a2, bob):
        await c.request({"type": "subscribe", "channel": "public:lobby", "id": 1})
    status, body = await admin(gw, "/api/v1/users/alice/subscribe", {"channel": "public:news"})
    assert (status, body["connections"], body["missing"]) == (200, 2, [])
    for c in (a1, a2):
        assert (await c.expect("subscribed"))["channel"] == "public:news"
    pos = await publish(gw, "public:news", "n", {"x": 1})
    for c in (a1, a2):
        assert (await c.expect("message"))["offset"] == pos["offset"]
    status, body = await admin(gw, "/api/v1/channels?pattern=public:*", method="GET")
    assert body["channels"] == [{"channel": "public:lobby", "subscribers": 3},
                                {"channel": "public:news", "subscribers": 2}]
    status, body = await admin(gw, "/api/v1/channels?limit=1&pattern=public:*", method="GET")
    assert (body["channels"], body["next"]) == (
        [{"channel": "public:lobby", "subscribers": 3}], "public:lobby")
    status, body = await admin(gw, "/api/v1/channels?limit=1&pattern=public:*&cursor=public:lobby",
                               method="GET")
    assert (body["channels"], body["next"]) == (
        [{"channel": "public:news", "subscribers": 2}], None)
    status, body = await admin(gw, "/api/v1/users", method="GET")
    assert body["users"] == [{"user": "alice", "connections": 2}, {"user": "bob", "connections": 1}]
    status, body = await admin(gw, "/api/v1/users/alice/unsubscribe", {"channel": "public:lobby"})
    assert body["connections"] == 2
    for c in (a1, a2):
        assert await c.expect("unsubscribed") == {
            "type": "unsubscribed", "channel": "public:lobby", "reason": "server"}
    # one client only, told to reconnect; then the rest, for good
    with caplog.at_level(logging.INFO, logger="herald.audit"):
        status, body = await admin(gw, "/api/v1/users/alice/disconnect",
                                   {"client": first_id, "reason": "moved", "reconnect": True})
    assert body["connections"] == 1
    audits = [r.audit for r in caplog.records if hasattr(r, "audit")]
    assert audits[-1]["event"] == "admin.disconnect" and audits[-1]["reconnect"] is True
    frame = await a1.recv()
    assert frame == {"type": "reconnect", "reason": "moved", "after_ms": frame["after_ms"]}
    assert await a1.closed() == 1012
    status, body = await admin(gw, "/api/v1/users/alice/disconnect", {"reason": "banned"})
    assert body["connections"] == 1
    assert await a2.closed() == 4003
    assert (await bob.request({"type": "ping", "id": 9}))["type"] == "pong"  # bystander
    _, text = await http(gw, "GET", "/metrics")
    assert 'herald_admin_disconnects_total{reconnect="false"} 1.0' in text


async def test_the_server_api_refuses_without_the_key_and_bad_input(make_gateway):
    gw = await make_gateway()
    status, body = await http(gw, "POST", "/api/v1/users/u/disconnect", {},
                              {"Authorization": f"Bearer {token('u', roles=['admin'])}"})
    assert (status, body["error"]) == (401, "unauthorized")
    for path, payload in [("/api/v1/users/u/disconnect", {"reconnect": "yes"}),
                          ("/api/v1/users/u/disconnect", {"reason": "x" * 200}),
                          ("/api/v1/users/u/subscribe", {"channel": "nope"}),
                          ("/api/v1/users/u/unsubscribe", {})]:
        status, body = await admin(gw, path, payload)
        assert (status, body["error"]) == (400, "bad_request"), (path, body)
    status, body = await admin(gw, "/api/v1/channels?limit=0", method="GET")
    assert status == 400


async def test_state_and_history_read_with_the_api_key(make_gateway):
    gw = await make_gateway()
    await publish(gw, "job:9", "progress", {"p": 1}, owner="someone")
    status, body = await admin(gw, "/api/v1/channels/job:9/state", method="GET")
    assert status == 200 and body["state"] == {"progress": {"p": 1}}
    status, body = await admin(gw, "/api/v1/channels/job:9/history", method="GET")
    assert status == 200 and [m["data"] for m in body["messages"]] == [{"p": 1}]
    status, body = await http(gw, "GET", "/api/v1/channels/job:9/state", None,
                              {"Authorization": "apikey wrong"})
    assert status == 401


async def test_the_server_api_reaches_every_gateway(redis_url, spawn_gateway):
    gws = [spawn_gateway(f"gw-{i}", HERALD_REDIS_URL=redis_url) for i in range(3)]
    on_0, on_1 = await connect(gws[0], "mallory"), await connect(gws[1], "mallory")
    other = await connect(gws[2], "bob")
    await asyncio.sleep(0.5)  # every gateway has written its registry record
    status, body = await http_json(
        gws[2].url + "/api/v1/users/mallory/subscribe", method="POST",
        body='{"channel": "public:watch"}', headers=api_headers())
    assert status == 200 and body["connections"] == 2, body
    assert body["nodes"] == {"gw-0": 1, "gw-1": 1, "gw-2": 0} and body["missing"] == []
    for c in (on_0, on_1):
        assert (await c.expect("subscribed"))["channel"] == "public:watch"
    status, body = await http_json(gws[2].url + "/api/v1/channels?pattern=*:mallory",
                                   headers=api_headers())
    assert body["channels"] == [{"channel": "user:mallory", "subscribers": 2}]
    status, body = await http_json(gws[0].url + "/api/v1/users", headers=api_headers())
    assert body["users"] == [{"user": "bob", "connections": 1},
                             {"user": "mallory", "connections": 2}]
    status, body = await http_json(
        gws[2].url + "/api/v1/users/mallory/unsubscribe", method="POST",
        body='{"channel": "public:watch"}', headers=api_headers())
    assert body["connections"] == 2
    for c in (on_0, on_1):
        assert (await c.expect("unsubscribed"))["channel"] == "public:watch"
    status, body = await http_json(
        gws[2].url + "/api/v1/users/mallory/disconnect", method="POST",
        body='{"reason": "banned"}', headers=api_headers())
    assert body["connections"] == 2
    assert [await on_0.closed(), await on_1.closed()] == [4003, 4003]
    assert (await other.request({"type": "ping", "id": 1}))["type"] == "pong"
