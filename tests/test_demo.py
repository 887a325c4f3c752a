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


async def one_job(gateway, ws_client, fail_rate: float) -> tuple[list[dict], dict]:
    """Run the worker for one job; returns the job's progress data and its notification."""
    client = await ws_client(gateway, token(DEMO_USER))
    worker = DemoWorker(gateway.node, concurrency=1, speed=40, fail_rate=fail_rate,
                        rng=random.Random(7))
    worker.ensure_running()
    try:
        announced = await client.expect("message", timeout=10)
        assert announced["event"] == "job" and announced["data"]["kind"] == "job"
        job = announced["data"]["jobId"]
        sub = await client.request({"type": "subscribe", "channel": f"job:{job}"})
        assert sub["type"] == "subscribed"  # the demo user owns it
        updates: list[dict] = []
        while True:
            msg = await client.expect("message", timeout=10)
            if msg["channel"] == f"job:{job}":
                updates.append(msg["data"])
            elif msg["event"] == "notification" and msg["data"]["jobId"] == job:
                return updates, msg["data"]
    finally:
        await worker.stop()


async def test_worker_runs_jobs_to_the_end_with_notifications(gateway, ws_client):
    updates, note = await one_job(gateway, ws_client, fail_rate=0.0)
    progress = [u["progress"] for u in updates]
    assert note["status"] == "completed" and note["kind"] == "job"
    assert updates[-1]["stage"] == "done" and progress[-1] == 100
    assert progress == sorted(progress)  # a bar only moves forward
    assert len({u["stage"] for u in updates}) >= 4  # queued, real stages, done


async def test_failing_jobs_say_why(gateway, ws_client):
    updates, note = await one_job(gateway, ws_client, fail_rate=1.0)
    assert note["status"] == updates[-1]["status"] == "failed"
    assert note["message"] and note["message"] == updates[-1]["message"]  # the reason
    assert updates[-1]["progress"] < 100
