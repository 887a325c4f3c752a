"""The Python publisher against a real gateway, received by real WebSocket clients."""

from __future__ import annotations

import pytest

from gateway.sdk.publisher import HttpPublisher, Publisher, PublishError
from tests.conftest import API_KEY, free_port, token


@pytest.fixture
async def publisher(gateway):
    async with HttpPublisher(gateway.url, API_KEY) as pub:
        yield pub


async def test_publish_returns_position_and_reaches_subscriber(gateway, ws_client, publisher):
    client = await ws_client(gateway, token("alice"))
    first = await publisher.publish("user:alice", "hello", {"n": 1})
    second = await publisher.publish("user:alice", "hello", {"n": 2})
    assert first["channel"] == "user:alice"
    assert second["offset"] == first["offset"] + 1
    assert second["epoch"] == first["epoch"]
    got = [await client.expect("message"), await client.expect("message")]
    assert [m["data"]["n"] for m in got] == [1, 2]
    assert got[1]["offset"] == second["offset"]


async def test_broadcast_reaches_every_channel(gateway, ws_client, publisher):
    alice = await ws_client(gateway, token("alice"))
    bob = await ws_client(gateway, token("bob"))
    positions = await publisher.broadcast(["user:alice", "user:bob"], "notice", {"x": 1})
    assert [p["channel"] for p in positions] == ["user:alice", "user:bob"]
    assert (await alice.expect("message"))["event"] == "notice"
    assert (await bob.expect("message"))["data"] == {"x": 1}


async def test_job_progress_shape_and_owner_may_subscribe(gateway, ws_client, publisher):
    await publisher.register_job("j1", "alice")
    client = await ws_client(gateway, token("alice"))
    sub = await client.request({"type": "subscribe", "data": {"jobId": "j1"}, "id": 1})
    assert sub["type"] == "subscribed" and sub["channel"] == "job:j1"
    pos = await publisher.job_progress("j1", "alice", "processing", 45, stage="inference")
    msg = await client.expect("message")
    assert msg["channel"] == "job:j1" and msg["event"] == "progress"
    assert msg["offset"] == pos["offset"]
    assert msg["data"] == {
        "jobId": "j1",
        "status": "processing",
        "progress": 45,
        "stage": "inference",
        "message": None,
    }


async def test_job_progress_carries_queue_position_and_eta(gateway, ws_client, publisher):
    """The job-channel convention (docs/client.md): `queue_position` while queued, `eta`
    (seconds left) while running; absent when not given, refused when malformed."""
    await publisher.register_job("jq", "alice")
    client = await ws_client(gateway, token("alice"))
    await client.request({"type": "subscribe", "channel": "job:jq"})
    await publisher.job_progress("jq", "alice", "queued", 0, queue_position=3, eta=95.5)
    await publisher.job_progress("jq", "alice", "processing", 40, eta=30)
    queued, running = await client.expect("message"), await client.expect("message")
    assert (queued["data"]["queue_position"], queued["data"]["eta"]) == (3, 95.5)
    assert running["data"]["eta"] == 30 and "queue_position" not in running["data"]
    for bad in ({"queue_position": 0}, {"queue_position": 1.5}, {"queue_position": True},
                {"eta": -1}, {"eta": "soon"}):
        with pytest.raises(PublishError) as err:
            await publisher.job_progress("jq", "alice", "queued", 0, **bad)
        assert err.value.code == "bad_request"


async def test_terminal_status_also_notifies_owner_user_channel(gateway, ws_client, publisher):
    """`completed` goes to job:{id} and, as a `notification`, to user:{owner}."""
    client = await ws_client(gateway, token("alice"))
    await publisher.job_progress("j2", "alice", "completed", 100, message="done")
    note = await client.expect("message")
    assert note["channel"] == "user:alice"
    assert note["event"] == "notification"
    assert note["data"]["jobId"] == "j2"
    assert note["data"]["status"] == "completed"
    assert note["data"]["message"] == "done"


async def test_non_terminal_status_does_not_notify_owner(gateway, ws_client, publisher):
    client = await ws_client(gateway, token("alice"))
    await publisher.job_progress("j3", "alice", "processing", 10)
    await publisher.publish("user:alice", "marker", {})
    # The marker is the first thing alice's own channel receives: no notification before it.
    assert (await client.expect("message"))["event"] == "marker"


async def test_owner_mismatch_raises_forbidden(publisher):
    """Publishing job:{id} with another owner -> PublishError forbidden (HTTP 403)."""
    await publisher.register_job("j4", "alice")
    with pytest.raises(PublishError) as err:
        await publisher.job_progress("j4", "mallory", "processing", 1)
    assert err.value.code == "forbidden"
    assert err.value.status == 403


async def test_wrong_api_key_raises_unauthorized(gateway):
    async with HttpPublisher(gateway.url, "not-the-key") as pub:
        with pytest.raises(PublishError) as err:
            await pub.publish("user:alice", "hello", {})
    assert (err.value.code, err.value.status) == ("unauthorized", 401)


async def test_bad_channel_raises_bad_request(publisher):
    with pytest.raises(PublishError) as err:
        await publisher.publish("no spaces allowed", "hello", {})
    assert (err.value.code, err.value.status) == ("bad_request", 400)


async def test_too_large_raises_message_too_large(make_gateway):
    gw = await make_gateway(max_publish_bytes=100)
    async with HttpPublisher(gw.url, API_KEY) as pub:
        with pytest.raises(PublishError) as err:
            await pub.publish("user:alice", "big", {"blob": "x" * 200})
    assert (err.value.code, err.value.status) == ("message_too_large", 413)


async def test_unreachable_server_raises_unavailable():
    async with HttpPublisher(f"http://127.0.0.1:{free_port()}", API_KEY, timeout=5) as pub:
        with pytest.raises(PublishError) as err:
            await pub.publish("user:alice", "hello", {})
    assert err.value.code == "unavailable"
    assert err.value.status is None


async def test_bad_arguments_rejected_before_sending(publisher):
    """Non-numeric progress / empty status / unserialisable data -> bad_request locally."""
    with pytest.raises(PublishError, match="progress"):
        await publisher.job_progress("j5", "alice", "processing", "45%")  # type: ignore[arg-type]
    with pytest.raises(PublishError, match="status"):
        await publisher.job_progress("j5", "alice", "", 1)
    with pytest.raises(PublishError) as err:
        await publisher.publish("user:alice", "x", {"obj": object()})
    assert err.value.code == "bad_request"


class _Recorder(Publisher):
    """A transport that records calls: shows job_progress/broadcast live in the base."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, object, str | None]] = []
        self.keys: list[str | None] = []
        self.closed = False

    async def publish(self, channel, event, data, *, owner=None, idempotency_key=None):  # type: ignore[no-untyped-def]
        self.calls.append((channel, event, data, owner))
        self.keys.append(idempotency_key)
        return {"channel": channel, "epoch": "e", "offset": len(self.calls)}

    async def register_job(self, job_id, owner):  # type: ignore[no-untyped-def]
        return None

    async def close(self) -> None:
        self.closed = True


async def test_base_builds_job_progress_and_broadcast_on_publish():
    async with _Recorder() as rec:
        await rec.job_progress("7", "u", "failed", 50, stage="s", message="m",
                               idempotency_key="feed:9")
        positions = await rec.broadcast(["a:1", "a:2", "a:1"], "ev", 1)
    assert rec.closed
    assert rec.keys == ["feed:9", None, None]
    assert rec.calls[0] == (
        "job:7",
        "progress",
        {"jobId": "7", "status": "failed", "progress": 50, "stage": "s", "message": "m"},
        "u",
    )
    assert [p["channel"] for p in positions] == ["a:1", "a:2"]  # duplicates sent once
