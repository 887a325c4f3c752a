"""The first five minutes: connect, receive a published message, over real sockets."""

from __future__ import annotations

import orjson
from tornado.httpclient import AsyncHTTPClient

from tests.conftest import api_headers, token


async def test_published_message_reaches_its_user(gateway, ws_client):
    client = await ws_client(gateway, token("alice"))
    body = {"channel": "user:alice", "event": "hello", "data": {"n": 1}}
    resp = await AsyncHTTPClient().fetch(
        f"{gateway.url}/api/v1/publish", method="POST", headers=api_headers(),
        body=orjson.dumps(body),
    )
    position = orjson.loads(resp.body)
    msg = await client.expect("message")
    assert msg["channel"] == "user:alice"
    assert msg["data"] == {"n": 1}
    assert msg["offset"] == position["offset"] == 1
    assert msg["epoch"] == position["epoch"]
