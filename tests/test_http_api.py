"""The HTTP API (PROTOCOL.md §3-5) over real HTTP: publishing, reads, probes, figures.

Every refusal has the body `{"error": <protocol code>, "message", "timestamp"}`.
"""

from __future__ import annotations

import orjson
import pytest
from tornado.httpclient import AsyncHTTPClient

from gateway.telemetry.metrics import Metrics
from tests.conftest import api_headers, token
from tests.support import http, publish, register_job

PUBLISH = "/api/v1/publish"


def problem(status: int, reply: dict, expected_status: int, code: str, says: str = "") -> None:
    assert status == expected_status, reply
    assert set(reply) == {"error", "message", "timestamp"}, reply
    assert reply["error"] == code and says in reply["message"], reply
    assert reply["timestamp"].endswith("Z")


def bearer(sub: str = "alice", **kwargs) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(sub, **kwargs)}"}


# -- publish ---------------------------------------------------------------------


async def test_publish_returns_position(gateway):
    status, reply = await http(gateway, "POST", PUBLISH,
                               {"channel": "system:a", "event": "e", "data": {"x": 1}},
                               api_headers())
    assert status == 200
    assert reply == {"channel": "system:a", "epoch": reply["epoch"], "offset": 1}


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "apikey wrong"}, {"Authorization": "Bearer test-api-key"},
     {"Authorization": "apikey"}, {"X-Api-Key": "test-api-key"}],
    ids=["missing", "wrong-key", "wrong-scheme", "empty-key", "other-header"],
)
@pytest.mark.parametrize("path", [PUBLISH, "/api/v1/broadcast", "/api/v1/jobs", "/api/v1/stats"])
async def test_api_key_required(gateway, headers, path):
    """No or bad API key -> 401 unauthorized, for every publisher endpoint and stats."""
    method = "GET" if path.endswith("stats") else "POST"
    body = {"channel": "system:a", "channels": ["system:a"], "job": "j", "owner": "u"}
    status, reply = await http(gateway, method, path, body if method == "POST" else None,
                               headers)
    problem(status, reply, 401, "unauthorized", "apikey")


async def test_api_key_not_accepted_in_query(gateway):
    status, _ = await http(gateway, "POST", PUBLISH + "?apikey=test-api-key",
                               {"channel": "system:a"})
    assert status == 401


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        (b"{not json", "invalid JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"event": "e"}', "channel must be"),
        (b'{"channel": "bad channel"}', "channel may only"),
        (b'{"channel": "system:a", "event": ""}', "event must be"),
        (b'{"channel": "system:a", "event": 5}', "event must be"),
        (b'{"channel": "system:a", "event": "' + b"e" * 65 + b'"}', "event must be"),
        (b'{"channel": "job:1", "owner": 42}', "owner must be"),
        (b'{"channel": "job:1", "owner": ""}', "owner must be"),
    ],
)
async def test_publish_bad_body_is_400(gateway, raw, says):
    status, reply = await http(gateway, "POST", PUBLISH, raw=raw, headers=api_headers())
    problem(status, reply, 400, "bad_request", says)


async def test_publish_defaults_event_to_message(gateway, ws_client):
    client = await ws_client(gateway, token("alice"))
    await http(gateway, "POST", PUBLISH, {"channel": "user:alice", "data": 1}, api_headers())
    msg = await client.expect("message")
    assert msg["event"] == "message" and msg["data"] == 1


async def test_publish_owner_mismatch_is_403(gateway):
    await register_job(gateway, "j1", "alice")
    status, reply = await http(gateway, "POST", PUBLISH,
                               {"channel": "job:j1", "event": "p", "owner": "mallory"},
                               api_headers())
    problem(status, reply, 403, "forbidden", "another owner")
    # The refused publication was not recorded.
    status, hist = await http(gateway, "GET", "/api/v1/channels/job:j1/history",
                              headers=bearer("alice"))
    assert hist["offset"] == 0 and hist["messages"] == []


async def test_owner_on_a_channel_without_owners_is_400(gateway):
    """`owner` on user:/system: channels -> bad_request, and nothing is recorded or published."""
    for channel in ("system:a", "user:alice"):
        status, reply = await http(gateway, "POST", PUBLISH,
                                   {"channel": channel, "owner": "alice"}, api_headers())
        problem(status, reply, 400, "bad_request", "owner applies to job channels")
    assert (await publish(gateway, "system:a", "e", 1))["offset"] == 1


async def test_publish_same_owner_again_is_fine(gateway):
    await publish(gateway, "job:j2", "p", 1, owner="alice")
    assert (await publish(gateway, "job:j2", "p", 2, owner="alice"))["offset"] == 2


async def test_publish_data_too_large_is_413(make_gateway):
    gw = await make_gateway(max_publish_bytes=1000)
    status, reply = await http(gw, "POST", PUBLISH,
                               {"channel": "system:a", "data": "x" * 1200}, api_headers())
    problem(status, reply, 413, "message_too_large", "limit is 1000")


async def test_publish_body_too_large_is_413(make_gateway):
    """A body over 4x max_publish_bytes is refused before it is even parsed."""
    gw = await make_gateway(max_publish_bytes=1000)
    status, reply = await http(gw, "POST", PUBLISH, raw=b" " * 5000, headers=api_headers())
    problem(status, reply, 413, "message_too_large", "body over 4000")


async def test_huge_body_is_refused_without_buffering_it(make_gateway):
    """Over 8x max_publish_bytes the server refuses while reading (400), even without a key."""
    gw = await make_gateway(max_publish_bytes=1000)
    status, _ = await http(gw, "POST", PUBLISH, raw=b" " * 50_000)
    assert status == 400
    assert (await http(gw, "GET", "/healthz"))[0] == 200  # and keeps serving


async def test_publish_wrong_method_is_405(gateway):
    status, reply = await http(gateway, "GET", PUBLISH, headers=api_headers())
    assert status == 405 and reply["error"] == "bad_request"


# -- broadcast ----------------------------------------------------------------------


async def test_broadcast_publishes_to_each_channel_once(gateway, ws_client):
    alice = await ws_client(gateway, token("alice"))
    bob = await ws_client(gateway, token("bob"))
    body = {"channels": ["user:alice", "user:bob", "user:alice"], "event": "n", "data": 1}
    status, reply = await http(gateway, "POST", "/api/v1/broadcast", body, api_headers())
    assert status == 200
    assert [p["channel"] for p in reply["publications"]] == ["user:alice", "user:bob"]
    assert all(p["offset"] == 1 for p in reply["publications"])
    assert (await alice.expect("message"))["event"] == "n"
    assert (await bob.expect("message"))["event"] == "n"


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"event": "n"}, "channels must be"),
        ({"channels": []}, "channels must be"),
        ({"channels": "user:a"}, "channels must be"),
        ({"channels": [f"user:{n}" for n in range(1001)]}, "channels must be"),
        ({"channels": ["user:a", "bad name"]}, "channel may only"),
        ({"channels": ["user:a", ["user:b"]]}, "channel must be"),
        ({"channels": ["user:a"], "event": ""}, "event must be"),
    ],
    ids=["missing", "empty", "not-a-list", "over-1000", "one-bad-name", "unhashable-name",
         "bad-event"],
)
async def test_broadcast_bad_body_is_400_and_publishes_nothing(gateway, body, says):
    status, reply = await http(gateway, "POST", "/api/v1/broadcast", body, api_headers())
    problem(status, reply, 400, "bad_request", says)
    status, hist = await http(gateway, "GET", "/api/v1/channels/user:a/history",
                              headers=bearer("a"))
    assert hist["offset"] == 0


async def test_broadcast_too_large_is_413(make_gateway):
    gw = await make_gateway(max_publish_bytes=100)
    status, reply = await http(gw, "POST", "/api/v1/broadcast",
                               {"channels": ["user:a"], "data": "x" * 200}, api_headers())
    problem(status, reply, 413, "message_too_large")


# -- jobs ---------------------------------------------------------------------------------


async def test_register_job(gateway):
    status, reply = await http(gateway, "POST", "/api/v1/jobs",
                               {"job": 550, "owner": "alice"}, api_headers())
    assert status == 200
    assert reply == {"job": "550", "channel": "job:550", "owner": "alice"}
    # Registering the same owner again is idempotent; another owner is refused.
    status, _ = await http(gateway, "POST", "/api/v1/jobs",
                           {"job": "550", "owner": "alice"}, api_headers())
    assert status == 200
    status, reply = await http(gateway, "POST", "/api/v1/jobs",
                               {"job": "550", "owner": "bob"}, api_headers())
    problem(status, reply, 403, "forbidden")


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"owner": "alice"}, "job must be"),
        ({"job": "", "owner": "alice"}, "job must be"),
        ({"job": True, "owner": "alice"}, "job must be"),
        ({"job": "a b", "owner": "alice"}, "channel may only"),
        ({"job": "j"}, "owner is required"),
        ({"job": "j", "owner": ["alice"]}, "owner must be"),
    ],
)
async def test_register_job_bad_body_is_400(gateway, body, says):
    status, reply = await http(gateway, "POST", "/api/v1/jobs", body, api_headers())
    problem(status, reply, 400, "bad_request", says)


# -- state and history (JWT + subscribe rules) -----------------------------------------


async def test_state_for_the_owner(gateway):
    await register_job(gateway, "s1", "alice")
    await publish(gateway, "job:s1", "progress", {"progress": 10})
    await publish(gateway, "job:s1", "log", {"line": "a"})
    await publish(gateway, "job:s1", "progress", {"progress": 20})
    status, reply = await http(gateway, "GET", "/api/v1/channels/job:s1/state",
                               headers=bearer("alice"))
    assert status == 200
    assert reply["channel"] == "job:s1" and reply["offset"] == 3
    assert reply["state"] == {"progress": {"progress": 20}, "log": {"line": "a"}}


@pytest.mark.parametrize("kind", ["state", "history"])
async def test_reads_follow_subscribe_rules(gateway, kind):
    """Another user's job -> 403; unknown job -> 404; no/expired token -> 401; admin -> 200."""
    await register_job(gateway, "s2", "alice")
    path = f"/api/v1/channels/job:s2/{kind}"
    problem(*await http(gateway, "GET", path, headers=bearer("bob")), 403, "forbidden")
    problem(*await http(gateway, "GET", f"/api/v1/channels/job:zz/{kind}",
                        headers=bearer("alice")), 404, "not_found")
    problem(*await http(gateway, "GET", path), 401, "unauthorized", "token missing")
    problem(*await http(gateway, "GET", path, headers=bearer("alice", ttl=-60)),
            401, "token_expired")
    problem(*await http(gateway, "GET", path, headers={"Authorization": "Bearer junk"}),
            401, "unauthorized")
    problem(*await http(gateway, "GET", "/api/v1/channels/user:bob/" + kind,
                        headers=bearer("alice")), 403, "forbidden")
    status, _ = await http(gateway, "GET", path, headers=bearer("root", roles=["admin"]))
    assert status == 200


async def test_reads_accept_query_token_and_cookie(make_gateway):
    gw = await make_gateway()
    path = "/api/v1/channels/user:alice/state"
    assert (await http(gw, "GET", f"{path}?token={token('alice')}"))[0] == 200
    cookie = {"Cookie": f"herald_token={token('alice')}"}
    assert (await http(gw, "GET", path, headers=cookie))[0] == 200
    closed = await make_gateway(allow_query_token=False)
    status, reply = await http(closed, "GET", f"{path}?token={token('alice')}")
    problem(status, reply, 401, "unauthorized")


async def test_read_of_bad_channel_name_is_400(gateway):
    status, reply = await http(gateway, "GET", "/api/v1/channels/nocolon/state",
                               headers=bearer())
    problem(status, reply, 400, "bad_request")


async def test_history_since_and_limit(gateway):
    for n in range(1, 8):
        await publish(gateway, "user:alice", "n", n)
    path = "/api/v1/channels/user:alice/history"
    status, reply = await http(gateway, "GET", path, headers=bearer())
    assert status == 200 and reply["offset"] == 7 and reply["complete"] is True
    assert [m["data"] for m in reply["messages"]] == [1, 2, 3, 4, 5, 6, 7]
    first = reply["messages"][0]
    assert first["type"] == "message" and first["epoch"] == reply["epoch"]
    status, reply = await http(gateway, "GET", path + "?since=4", headers=bearer())
    assert [m["offset"] for m in reply["messages"]] == [5, 6, 7]
    status, reply = await http(gateway, "GET", path + "?since=2&limit=2", headers=bearer())
    assert [m["offset"] for m in reply["messages"]] == [3, 4]
    assert reply["complete"] is False  # the limit cut it: fetch again from offset 4


@pytest.mark.parametrize(
    ("query", "says"),
    [("since=x", "since must be an integer"), ("since=-1", "since must be >= 0"),
     ("limit=0", "limit must be >= 1"), ("limit=ten", "limit must be an integer")],
)
async def test_history_bad_arguments_are_400(gateway, query, says):
    status, reply = await http(gateway, "GET",
                               f"/api/v1/channels/user:alice/history?{query}", headers=bearer())
    problem(status, reply, 400, "bad_request", says)


# -- operations ----------------------------------------------------------------------------


async def test_healthz_and_readyz(gateway):
    assert await http(gateway, "GET", "/healthz") == (200, {"status": "ok", "node": "gw-test"})
    status, reply = await http(gateway, "GET", "/readyz")
    assert status == 200
    assert reply == {"status": "ready", "node": "gw-test", "broker": True, "draining": False}


async def test_readyz_is_503_while_draining(gateway):
    gateway.node.draining = True
    status, reply = await http(gateway, "GET", "/readyz")
    assert status == 503 and reply["status"] == "not ready" and reply["draining"] is True


async def test_metrics_prometheus_text(gateway, ws_client):
    client = await ws_client(gateway, token("alice"))
    await client.request({"type": "subscribe", "channel": "user:bob"})  # forbidden
    await publish(gateway, "user:alice", "hello", {})
    await client.expect("message")
    resp_status, text = await http(gateway, "GET", "/metrics")
    assert resp_status == 200 and isinstance(text, str)
    names = {m.name for m in Metrics().registry.collect()}
    assert len(names) >= 10
    for name in names:
        assert f"# TYPE {name}" in text, name
    lines = set(text.splitlines())
    assert 'herald_connections{transport="ws"} 1.0' in lines
    assert "herald_subscriptions 1.0" in lines
    assert 'herald_errors_total{code="forbidden"} 1.0' in lines
    assert "herald_publications_total 1.0" in lines
    assert "herald_messages_out_total 1.0" in lines
    assert "herald_messages_in_total 1.0" in lines
    assert "herald_publish_duration_seconds_count 1.0" in lines
    assert any(line.startswith("herald_publish_duration_seconds_bucket{le=") for line in lines)


async def test_metrics_content_type(gateway):
    resp = await AsyncHTTPClient().fetch(gateway.url + "/metrics")
    assert resp.headers["Content-Type"].startswith("text/plain")


async def test_stats_with_api_key(gateway, ws_client):
    a = await ws_client(gateway, token("alice"))
    await ws_client(gateway, token("bob"))
    await a.request({"type": "subscribe", "channel": "system:x"})
    await publish(gateway, "system:x", "e", 1)
    await a.expect("message")
    status, stats = await http(gateway, "GET", "/api/v1/stats", headers=api_headers())
    assert status == 200
    assert stats["node"] == "gw-test" and stats["engine"] == "MemoryBroker"
    assert stats["ready"] is True and stats["draining"] is False
    assert stats["connections"] == 2
    assert stats["connections_by_transport"] == {"ws": 2}
    assert stats["subscriptions"] == 3  # user:alice, user:bob, system:x
    assert stats["channels"] == 3
    assert stats["messages_in"] == 1 and stats["messages_out"] == 1
    assert stats["publications"] == 1
    assert orjson.dumps(stats)  # plain JSON
