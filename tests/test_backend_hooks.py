"""Every backend hook behind a real backend (tests/backend_app.py), on a real gateway.

For each hook, each way the backend can answer — accept, reject, time out,
fail with a 5xx, send a malformed reply — gives the client the result
docs/hooks.md documents, and a bystander (another user on the same gateway,
at the same time) is not affected: its own call succeeds and its
subscription keeps delivering.
"""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest

from tests.backend_app import Accept, Delay, Malformed, Reject, Status
from tests.conftest import api_headers, token
from tests.support import http, publish

NAMESPACES = orjson.dumps({
    "job": {"subscribe_hook": True},
    "room": {"access": "authenticated", "client_publish": True},
}).decode()

FAILURES = {
    "timeout": Delay(2.0),  # HERALD_HOOK_TIMEOUT is 0.5 s here
    "5xx": Status(503),
    "malformed": Malformed(b"<html>oops</html>"),
}
OUTCOMES = {"accept": None, "reject": Reject("forbidden", "the backend says no"), **FAILURES}


def for_victim(rule):
    """Apply `rule` to the user `victim` only; everyone else gets the default answer."""
    return lambda req: rule if req["user"] == "victim" else None


async def start(make_gateway, backend, **overrides):
    return await make_gateway(**backend.settings(namespaces=NAMESPACES, **overrides))


async def bystander_ok(gw, client, channel="public:b"):
    """The bystander's subscription still delivers, right now."""
    pos = await publish(gw, channel, "tick", {"t": time.time()})
    msg = await client.expect("message")
    assert msg["offset"] == pos["offset"]


async def subscribed_bystander(gw, ws_client, user="bystander"):
    client = await ws_client(gw, token(user))
    assert (await client.request({"type": "subscribe", "channel": "public:b", "id": 1}))[
        "type"] == "subscribed"
    return client


@pytest.mark.parametrize("outcome", list(OUTCOMES))
async def test_connect_hook(outcome, make_gateway, ws_client, backend):
    gw = await start(make_gateway, backend)
    bystander = await subscribed_bystander(gw, ws_client)
    backend.jobs["1"] = "nobody"
    backend.on("connect", for_victim(OUTCOMES[outcome] or Accept(
        {"channels": ["public:lobby"], "grants": ["job:1"], "info": {"name": "Vic"}})))
    victim = await ws_client(gw, handshake=False)
    await victim.send({"type": "auth", "token": token("victim"), "id": "a"})
    connecting = asyncio.create_task(victim.recv(timeout=5))
    await bystander_ok(gw, bystander)  # while the victim's connect hook is pending
    first = await connecting
    if outcome == "accept":
        assert first["type"] == "connected" and first["id"] == "a"
        channels = {(await victim.expect("subscribed"))["channel"] for _ in range(2)}
        assert channels == {"user:victim", "public:lobby"}  # the hook's channel added
        # the hook's grant opens job:1, which the backend's own table gives to nobody
        reply = await victim.request({"type": "subscribe", "channel": "job:1", "id": 2})
        assert reply["type"] == "subscribed", reply
        call = backend.calls["connect"][-1]
        assert (call.body["user"], call.body["transport"]) == ("victim", "ws")
        assert call.body["client"] == first["client"]
    elif outcome == "reject":
        assert (first["type"], first["code"], first["id"]) == ("error", "forbidden", "a")
        assert first["message"] == "the backend says no"
        assert await victim.closed() == 4001
    else:
        assert (first["type"], first["code"]) == ("error", "unavailable"), first
        assert await victim.closed() == 1013
    other = await ws_client(gw, token("bystander-2"))  # the next client connects fine
    assert (await other.request({"type": "ping", "id": 9}))["type"] == "pong"
    await bystander_ok(gw, bystander)


@pytest.mark.parametrize("outcome", list(OUTCOMES))
async def test_subscribe_hook_decides_ownership_with_no_registration(
    outcome, make_gateway, ws_client, backend
):
    gw = await start(make_gateway, backend)
    backend.jobs.update({"7": "victim", "8": "bystander"})  # the app's own table; Herald has none
    bystander = await subscribed_bystander(gw, ws_client)
    victim = await ws_client(gw, token("victim"))
    if OUTCOMES[outcome] is not None:
        backend.on("subscribe", for_victim(OUTCOMES[outcome]))
    asking = asyncio.create_task(
        victim.request({"type": "subscribe", "channel": "job:7", "id": 3}, timeout=5))
    await bystander_ok(gw, bystander)
    reply = await asking
    if outcome == "accept":
        assert reply["type"] == "subscribed" and reply["id"] == 3, reply
        pos = await publish(gw, "job:7", "progress", {"progress": 50})
        assert (await victim.expect("message"))["offset"] == pos["offset"]
        # and somebody else's job is refused by the same table
        other = await victim.request({"type": "subscribe", "channel": "job:8", "id": 4})
        assert (other["type"], other["code"]) == ("error", "forbidden")
    elif outcome == "reject":
        assert (reply["type"], reply["code"], reply["id"]) == ("error", "forbidden", 3)
    else:
        assert (reply["type"], reply["code"], reply["id"]) == ("error", "unavailable", 3)
    # the victim's connection is still usable, the bystander's hook call still works
    assert (await victim.request({"type": "ping", "id": 5}))["type"] == "pong"
    mine = await bystander.request({"type": "subscribe", "channel": "job:8", "id": 6})
    assert mine["type"] == "subscribed", mine
    assert backend.calls["subscribe"][0].body["channel"] == "job:7"


@pytest.mark.parametrize("outcome", list(OUTCOMES))
async def test_publish_hook(outcome, make_gateway, ws_client, backend):
    gw = await start(make_gateway, backend)
    bystander = await subscribed_bystander(gw, ws_client)
    assert (await bystander.request({"type": "subscribe", "channel": "room:1", "id": 2}))[
        "type"] == "subscribed"
    victim = await ws_client(gw, token("victim"))
    assert (await victim.request({"type": "subscribe", "channel": "room:1", "id": 1}))[
        "type"] == "subscribed"
    edited = Accept({"data": {"text": "[edited]"}})
    backend.on("publish", for_victim(OUTCOMES[outcome] or edited))
    frame = {"type": "publish", "id": 8, "channel": "room:1", "event": "chat",
             "data": {"text": "hello"}}
    reply = await victim.request(frame, timeout=5)
    if outcome == "accept":
        # its own copy of the message may come before the reply: the fan-out is immediate
        frames = {reply["type"]: reply, "x": await victim.recv()}
        reply = frames.get("published") or frames["x"]
        assert reply["type"] == "published" and reply["id"] == 8, frames
        msg = await bystander.expect("message")
        assert (msg["event"], msg["data"], msg["offset"]) == (
            "chat", {"text": "[edited]"}, reply["offset"])  # rewritten by the backend
    else:
        code = "forbidden" if outcome == "reject" else "unavailable"
        assert (reply["type"], reply["code"], reply["id"]) == ("error", code, 8), reply
    # nothing reached room:1 from a refused publish; the bystander's own publish goes through
    await bystander.send({**frame, "id": 9, "data": {"text": "mine"}})
    got = {m["type"]: m for m in [await bystander.recv(), await bystander.recv()]}
    mine, msg = got["published"], got["message"]
    assert msg["data"] == {"text": "mine"} and msg["offset"] == mine["offset"]
    assert mine["offset"] == (2 if outcome == "accept" else 1)
    await bystander_ok(gw, bystander)


@pytest.mark.parametrize("outcome", list(OUTCOMES))
async def test_rpc_hook(outcome, make_gateway, ws_client, backend):
    gw = await start(make_gateway, backend)
    bystander = await subscribed_bystander(gw, ws_client)
    victim = await ws_client(gw, token("victim"))
    backend.on("rpc", for_victim(OUTCOMES[outcome] or Accept({"cancelled": "job-3"})))
    asking = asyncio.create_task(victim.request(
        {"type": "rpc", "id": 7, "method": "jobs.cancel", "params": {"job": "3"}}, timeout=5))
    await asyncio.sleep(0.05)
    # the bystander's RPC is answered while the victim's is still with the backend
    echo = await bystander.request({"type": "rpc", "id": "e", "method": "echo",
                                    "params": [1, "two"]})
    assert echo == {"type": "rpc", "id": "e", "result": [1, "two"]}
    reply = await asking
    if outcome == "accept":
        assert reply == {"type": "rpc", "id": 7, "result": {"cancelled": "job-3"}}
        body = backend.calls["rpc"][0].body
        assert (body["method"], body["params"], body["user"]) == (
            "jobs.cancel", {"job": "3"}, "victim")
    else:
        code = "forbidden" if outcome == "reject" else "unavailable"
        assert (reply["type"], reply["code"], reply["id"]) == ("error", code, 7), reply
    await bystander_ok(gw, bystander)


@pytest.mark.parametrize("outcome", list(OUTCOMES))
async def test_refresh_hook_at_token_expiry(outcome, make_gateway, ws_client, backend):
    gw = await start(make_gateway, backend)
    bystander = await subscribed_bystander(gw, ws_client)
    victim = await ws_client(gw, token("victim", ttl=1))
    backend.on("refresh", for_victim(OUTCOMES[outcome]))
    frame = await victim.recv(timeout=5)
    if outcome == "accept":
        assert frame["type"] == "authenticated" and frame["expires"] > time.time() + 30, frame
        assert (await victim.request({"type": "ping", "id": 1}))["type"] == "pong"
        assert backend.calls["refresh"][0].body["user"] == "victim"
    else:
        assert (frame["type"], frame["code"]) == ("error", "token_expired"), frame
        assert await victim.closed() == 4001
    await bystander_ok(gw, bystander)


async def test_rpc_over_http_and_no_hook_is_not_found(make_gateway, backend):
    gw = await start(make_gateway, backend)
    auth = {"Authorization": f"Bearer {token('u1')}"}
    status, body = await http(gw, "POST", "/api/v1/rpc", {"method": "echo", "params": {"a": 1}},
                              auth)
    assert (status, body) == (200, {"result": {"a": 1}})
    assert backend.calls["rpc"][0].body["transport"] == "http"
    backend.on("rpc", Status(500))
    status, body = await http(gw, "POST", "/api/v1/rpc", {"method": "echo"}, auth)
    assert (status, body["error"]) == (503, "unavailable")
    status, body = await http(gw, "POST", "/api/v1/rpc", {"method": ""}, auth)
    assert (status, body["error"]) == (400, "bad_request")
    plain = await make_gateway()  # no hooks configured
    status, body = await http(plain, "POST", "/api/v1/rpc", {"method": "echo"}, auth)
    assert (status, body["error"]) == (404, "not_found")


async def test_client_publish_over_http_and_where_it_is_not_allowed(make_gateway, ws_client,
                                                                   backend):
    gw = await start(make_gateway, backend)
    listener = await ws_client(gw, token("l"))
    await listener.request({"type": "subscribe", "channel": "room:2", "id": 1})
    auth = {"Authorization": f"Bearer {token('u1')}"}
    status, body = await http(gw, "POST", "/api/v1/channels/room:2/publish",
                              {"event": "chat", "data": {"x": 1}}, auth)
    assert status == 200 and body["offset"] == 1
    assert (await listener.expect("message"))["data"] == {"x": 1}
    status, body = await http(gw, "POST", "/api/v1/channels/public:news/publish",
                              {"event": "chat", "data": {}}, auth)
    assert (status, body["error"]) == (403, "forbidden")  # namespace without client_publish
    status, body = await http(gw, "POST", "/api/v1/channels/room:2/publish",
                              {"event": "chat"}, api_headers())
    assert (status, body["error"]) == (401, "unauthorized")  # a client's call: JWT only


async def test_a_breaker_opened_by_a_failing_backend_fails_fast(make_gateway, ws_client, backend):
    gw = await start(make_gateway, backend, hook_breaker_failures=2, hook_breaker_cooldown=30.0)
    client = await ws_client(gw, token("u1"))
    backend.on("rpc", Delay(2.0))
    for i in range(2):
        reply = await client.request({"type": "rpc", "id": i, "method": "m"}, timeout=5)
        assert reply["code"] == "unavailable" and "timed out" in reply["message"]
    reply = await client.request({"type": "rpc", "id": 3, "method": "m"})
    assert reply["code"] == "unavailable" and "circuit open" in reply["message"]
    assert len(backend.calls["rpc"]) == 2  # answered without asking the backend
    _, text = await http(gw, "GET", "/metrics")
    assert 'herald_hook_requests_total{hook="rpc",outcome="circuit_open"} 1.0' in text
    assert 'herald_hook_requests_total{hook="rpc",outcome="timeout"} 2.0' in text


async def test_a_subscribe_hook_namespace_without_the_hook_refuses_to_start():
    from gateway.config import ConfigError
    from gateway.core.node import Node
    from tests.conftest import base_settings

    with pytest.raises(ConfigError, match="subscribe_hook"):
        Node(base_settings(namespaces=NAMESPACES))


async def test_connect_hook_over_sse(make_gateway, backend):
    from tests.sse_client import SseStream

    gw = await start(make_gateway, backend)
    backend.on("connect", lambda req: {
        "victim": Reject("forbidden", "banned"), "slow": Delay(2.0),
    }.get(req["user"], Accept({"channels": ["public:lobby"]})))
    for user, status, code in [("victim", 403, "forbidden"), ("slow", 503, "unavailable")]:
        stream = await SseStream.open(gw.port, "/sse", {"Authorization": f"Bearer {token(user)}"})
        assert (stream.status, stream.json()["error"]) == (status, code)
        await stream.close()
    stream = await SseStream.open(gw.port, "/sse", {"Authorization": f"Bearer {token('ok')}"})
    assert stream.status == 200
    connected = await stream.expect("connected")
    channels = {(await stream.expect("subscribed")).data["channel"] for _ in range(2)}
    assert channels == {"user:ok", "public:lobby"}  # the hook's channel added
    assert backend.calls["connect"][-1].body["transport"] == "sse"
    assert backend.calls["connect"][-1].body["client"] == connected.data["client"]
    await stream.close()


async def test_presence_info_is_bounded_from_the_token_and_the_hook(make_gateway, ws_client,
                                                                    backend):
    gw = await start(make_gateway, backend)
    big = {"bio": "x" * 2000}
    client = await ws_client(gw, handshake=False)
    await client.send({"type": "auth", "token": token("u1", extra={"info": big}), "id": 1})
    reply = await client.recv()
    assert (reply["code"], reply["message"]) == ("unauthorized",
                                                 "token info claim over 1024 bytes")
    backend.on("connect", Accept({"info": big}))
    other = await ws_client(gw, handshake=False)
    await other.send({"type": "auth", "token": token("u2"), "id": 1})
    reply = await other.recv()
    assert reply["code"] == "unavailable" and "info over 1024 bytes" in reply["message"]
    assert await other.closed() == 1013
