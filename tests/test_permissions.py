"""Who may subscribe to what (PROTOCOL.md §1): deny unless a rule allows.

The strongest check is on delivery, not just the refusal: after a refused
subscribe the client publishes a marker to its own channel and asserts the
marker is the very next thing it receives, so a leaked message would show.
"""

from __future__ import annotations

import json

import pytest

from gateway.protocol.channels import Namespaces
from tests.conftest import token
from tests.support import http, publish, register_job


async def next_is_marker(gw, client, user: str) -> None:
    """Nothing but our own marker arrives: proves no other message leaked in before it."""
    await publish(gw, f"user:{user}", "marker", {})
    msg = await client.expect("message")
    assert (msg["channel"], msg["event"]) == (f"user:{user}", "marker"), msg


async def subscribe(client, channel: str, **extra) -> dict:
    return await client.request({"type": "subscribe", "channel": channel, **extra})


# -- user: -------------------------------------------------------------------


async def test_user_cannot_subscribe_or_receive_another_users_channel(gateway, ws_client):
    """user:bob for alice -> forbidden, and bob's messages never reach alice."""
    alice = await ws_client(gateway, token("alice"))
    bob = await ws_client(gateway, token("bob"))
    err = await subscribe(alice, "user:bob")
    assert err["code"] == "forbidden" and "user:bob" in err["message"]
    await publish(gateway, "user:bob", "secret", {"for": "bob"})
    assert (await bob.expect("message"))["event"] == "secret"
    await next_is_marker(gateway, alice, "alice")


async def test_user_prefix_is_not_a_match(gateway, ws_client):
    """alice may not read user:alice2 nor user:alice:x (exact id only)."""
    alice = await ws_client(gateway, token("alice"))
    for channel in ("user:alice2", "user:alice:x", "user:ALICE"):
        assert (await subscribe(alice, channel))["code"] == "forbidden"


async def test_every_connection_of_a_user_receives_its_messages(gateway, ws_client):
    first = await ws_client(gateway, token("alice"))
    second = await ws_client(gateway, token("alice"))
    await publish(gateway, "user:alice", "hello", {})
    assert (await first.expect("message"))["event"] == "hello"
    assert (await second.expect("message"))["event"] == "hello"


# -- job: ----------------------------------------------------------------------


async def test_job_owner_subscribes_others_are_forbidden(gateway, ws_client):
    await register_job(gateway, "j1", "alice")
    alice = await ws_client(gateway, token("alice"))
    bob = await ws_client(gateway, token("bob"))
    assert (await subscribe(alice, "job:j1"))["type"] == "subscribed"
    err = await subscribe(bob, "job:j1")
    assert err["code"] == "forbidden"
    err = await bob.request({"type": "subscribe", "data": {"jobId": "j1"}})
    assert err["code"] == "forbidden"
    await publish(gateway, "job:j1", "progress", {"progress": 1})
    assert (await alice.expect("message"))["channel"] == "job:j1"
    await next_is_marker(gateway, bob, "bob")


async def test_owner_recorded_by_first_publish_with_owner(gateway, ws_client):
    await publish(gateway, "job:j2", "progress", {"progress": 1}, owner="alice")
    alice = await ws_client(gateway, token("alice"))
    sub = await subscribe(alice, "job:j2")
    assert sub["type"] == "subscribed" and sub["state"] == {"progress": {"progress": 1}}


async def test_unknown_job_owner_is_not_found(gateway, ws_client):
    """job:{id} with no recorded owner -> not_found, for users and admins alike."""
    alice = await ws_client(gateway, token("alice"))
    err = await subscribe(alice, "job:nobody-knows")
    assert err["code"] == "not_found" and "no recorded owner" in err["message"]
    admin = await ws_client(gateway, token("root", roles=["admin"]))
    assert (await subscribe(admin, "job:nobody-knows"))["code"] == "not_found"


async def test_publish_without_owner_does_not_record_one(gateway, ws_client):
    await publish(gateway, "job:j3", "progress", {"progress": 1})
    alice = await ws_client(gateway, token("alice"))
    assert (await subscribe(alice, "job:j3"))["code"] == "not_found"


async def test_job_messages_never_reach_a_non_owner_even_on_their_own_user_channel(
    gateway, ws_client
):
    """A terminal event notifies user:{owner} only: bob hears nothing of alice's job."""
    await register_job(gateway, "j4", "alice")
    alice = await ws_client(gateway, token("alice"))
    bob = await ws_client(gateway, token("bob"))
    await publish(gateway, "job:j4", "progress", {"status": "completed", "progress": 100})
    note = await alice.expect("message")
    assert note["channel"] == "user:alice" and note["data"]["jobId"] == "j4"
    await next_is_marker(gateway, bob, "bob")


# -- roles and the channels claim ---------------------------------------------------


async def test_admin_role_reaches_every_namespace(gateway, ws_client):
    await register_job(gateway, "j5", "alice")
    admin = await ws_client(gateway, token("root", roles=["admin"]))
    for channel in ("user:alice", "job:j5", "admin:metrics", "system:a", "custom:x"):
        assert (await subscribe(admin, channel))["type"] == "subscribed", channel


async def test_admin_namespace_needs_admin_role(gateway, ws_client):
    alice = await ws_client(gateway, token("alice", roles=["editor"]))
    assert (await subscribe(alice, "admin:metrics"))["code"] == "forbidden"


async def test_roles_claim_path_is_configurable(make_gateway, ws_client):
    """jwt_roles_claim='app_metadata.roles' reads nested roles (Supabase style)."""
    gw = await make_gateway(jwt_roles_claim="app_metadata.roles")
    nested = token("root", extra={"app_metadata": {"roles": ["admin"]}})
    admin = await ws_client(gw, nested)
    assert (await subscribe(admin, "admin:metrics"))["type"] == "subscribed"
    flat = await ws_client(gw, token("eve", roles=["admin"]))  # top-level roles ignored
    assert (await subscribe(flat, "admin:metrics"))["code"] == "forbidden"


async def test_system_and_public_are_open_to_any_authenticated_user(gateway, ws_client):
    alice = await ws_client(gateway, token("alice"))
    assert (await subscribe(alice, "system:notices"))["type"] == "subscribed"
    assert (await subscribe(alice, "public:dashboard"))["type"] == "subscribed"


async def test_channels_claim_globs_grant_exactly_what_they_match(gateway, ws_client):
    await register_job(gateway, "42", "alice")
    await register_job(gateway, "420", "alice")
    bob = await ws_client(gateway, token("bob", channels=["job:42", "dashboard:*"]))
    assert (await subscribe(bob, "job:42"))["type"] == "subscribed"
    assert (await subscribe(bob, "job:420"))["code"] == "forbidden"  # exact name, no prefix
    assert (await subscribe(bob, "dashboard:sales"))["type"] == "subscribed"
    assert (await subscribe(bob, "dashboard:eu:sales"))["type"] == "subscribed"
    assert (await subscribe(bob, "dashboards:x"))["code"] == "forbidden"
    assert (await subscribe(bob, "admin:metrics"))["code"] == "forbidden"


async def test_channels_claim_dot_is_literal(gateway, ws_client):
    """Only `*` is a wildcard: a `.` in a grant matches only a dot."""
    bob = await ws_client(gateway, token("bob", channels=["feed:a.b"]))
    assert (await subscribe(bob, "feed:a.b"))["type"] == "subscribed"
    assert (await subscribe(bob, "feed:aXb"))["code"] == "forbidden"


async def test_channels_claim_name_is_configurable(make_gateway, ws_client):
    gw = await make_gateway(jwt_channels_claim="herald.grants")
    bob = await ws_client(gw, token("bob", extra={"herald": {"grants": ["feed:*"]}}))
    assert (await subscribe(bob, "feed:x"))["type"] == "subscribed"


async def test_unconfigured_namespace_is_forbidden_without_claim(gateway, ws_client):
    alice = await ws_client(gateway, token("alice"))
    err = await subscribe(alice, "dashboard:sales")
    assert err["code"] == "forbidden"


# -- HERALD_NAMESPACES -------------------------------------------------------------


async def test_namespaces_setting_adds_a_namespace(make_gateway, ws_client):
    spec = {"dashboard": {"access": "authenticated", "history_size": 3, "state": True}}
    gw = await make_gateway(namespaces=json.dumps(spec))
    alice = await ws_client(gw, token("alice"))
    for n in range(5):
        await publish(gw, "dashboard:sales", "tick", {"n": n})
    sub = await subscribe(alice, "dashboard:sales", since={"epoch": "x", "offset": 0})
    assert sub["type"] == "subscribed" and sub["recovered"] is False
    assert sub["state"] == {"tick": {"n": 4}}  # state: true was configured
    status, hist = await http(gw, "GET", "/api/v1/channels/dashboard:sales/history",
                              headers={"Authorization": f"Bearer {token('alice')}"})
    assert status == 200
    assert [m["data"]["n"] for m in hist["messages"]] == [2, 3, 4]  # history_size 3


async def test_namespaces_setting_can_tighten_a_builtin(make_gateway, ws_client):
    gw = await make_gateway(namespaces=json.dumps({"public": {"access": "admin"}}))
    alice = await ws_client(gw, token("alice"))
    assert (await subscribe(alice, "public:x"))["code"] == "forbidden"


@pytest.mark.parametrize(
    "raw",
    [
        "not json",
        '{"x": {"access": "everyone"}}',
        '{"x": {"colour": "red"}}',
        '["x"]',
        '{"x": {"history_size": "5"}}',
        '{"x": {"history_size": -1}}',
        '{"x": {"history_ttl": 0}}',
        '{"x": {"state": "yes"}}',
        '{"a b": {}}',
        '{"x": {"name": "y"}}',
    ],
    ids=["invalid-json", "unknown-access", "unknown-option", "not-an-object",
         "size-as-string", "negative-size", "zero-ttl", "state-not-bool", "bad-name",
         "name-option"],
)
def test_bad_namespaces_setting_fails_at_start(raw):
    """A malformed HERALD_NAMESPACES -> ValueError naming the variable, before serving."""
    with pytest.raises(ValueError, match="HERALD_NAMESPACES"):
        Namespaces.from_config(raw)
