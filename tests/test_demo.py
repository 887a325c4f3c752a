"""The demo: its page and token exist only in development, and its worker publishes
realistic jobs through the node's own rules (owner, state, terminal notifications)."""

from __future__ import annotations

import random

from gateway.demo import DEMO_USER, DemoWorker, stop_worker
from tests.conftest import token
from tests.support import http


async def test_demo_page_token_and_client_in_development(gateway, ws_client):
    status, page = await http(gateway, "GET", "/")
    assert status == 200 and 'src="/static/demo.js"' in page
    status, script = await http(gateway, "GET", "/client.js")
    assert status == 200 and "export class HeraldClient" in script
    status, body = await http(gateway, "GET", "/demo/token")
    assert status == 200
    assert body["user"] == DEMO_USER and body["simulated"] is True
    try:
        await ws_client(gateway, body["token"])  # a token the gateway accepts (else it fails)
    finally:
        await stop_worker(gateway.node)  # started by the token request


async def test_client_js_is_a_cross_origin_module(gateway):
    from tornado.httpclient import AsyncHTTPClient

    resp = await AsyncHTTPClient().fetch(gateway.url + "/client.js")
    assert resp.headers["Content-Type"].startswith("text/javascript")
    assert resp.headers["Access-Control-Allow-Origin"] == "*"


async def test_no_demo_and_no_token_in_production_or_when_switched_off(make_gateway):
    for overrides in ({"env": "production"}, {"demo": False}):
        gw = await make_gateway(**overrides)
        for path in ("/", "/demo/token"):
            status, body = await http(gw, "GET", path)
            assert (status, body["error"]) == (404, "not_found"), (overrides, path)
        status, _ = await http(gw, "GET", "/client.js")  # the client itself is always served
        assert status == 200


async def test_no_simulated_worker_on_the_redis_engine(make_gateway, redis_url):
    gw = await make_gateway(redis_url=redis_url)
    status, body = await http(gw, "GET", "/demo/token")
    assert status == 200 and body["simulated"] is False and body["jobs"] == []
    await stop_worker(gw.node)  # there is none: nothing to stop


async def test_worker_runs_jobs_to_the_end_with_notifications(gateway, ws_client):
    client = await ws_client(gateway, token(DEMO_USER))
    worker = DemoWorker(gateway.node, concurrency=1, speed=40, fail_rate=0.0,
                        rng=random.Random(7))
    worker.ensure_running()
    try:
        announced = await client.expect("message", timeout=10)
        assert announced["event"] == "job" and announced["data"]["kind"] == "job"
        job = announced["data"]["jobId"]
        sub = await client.request({"type": "subscribe", "channel": f"job:{job}"})
        assert sub["type"] == "subscribed"  # the demo user owns it
        progress: list[int] = []
        while True:
            msg = await client.expect("message", timeout=10)
            if msg["channel"] == f"user:{DEMO_USER}":
                if msg["event"] == "notification":
                    break
                continue
            progress.append(msg["data"]["progress"])
            stage = msg["data"]["stage"]
        assert msg["data"] == {**msg["data"], "kind": "job", "jobId": job, "status": "completed"}
        assert stage == "done" and progress[-1] == 100
        assert progress == sorted(progress)  # a bar only moves forward
        assert len(progress) >= 5
    finally:
        await worker.stop()


async def test_failing_jobs_say_why(gateway, ws_client):
    client = await ws_client(gateway, token(DEMO_USER))
    worker = DemoWorker(gateway.node, concurrency=1, speed=40, fail_rate=1.0,
                        rng=random.Random(3))
    worker.ensure_running()
    try:
        while True:
            msg = await client.expect("message", timeout=10)
            if msg["event"] == "notification":
                break
        assert msg["data"]["status"] == "failed"
        assert msg["data"]["message"]  # the reason, for the page's notification
    finally:
        await worker.stop()
