"""The demo: its page and token exist only in development, and its worker publishes
realistic jobs through the node's own rules (owner, state, terminal notifications)."""

from __future__ import annotations

import asyncio
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


async def test_worker_queues_jobs_with_positions_eta_and_publishes_metrics(gateway, ws_client):
    """The documented conventions, as the page reads them: `queue_position` and `eta` on job
    channels, a flat object of figures as `metrics` on admin:metrics."""
    client = await ws_client(gateway, token(DEMO_USER, channels=["admin:metrics"]))
    assert (await client.request({"type": "subscribe", "channel": "admin:metrics"}))[
        "type"] == "subscribed"
    worker = DemoWorker(gateway.node, concurrency=1, speed=20, fail_rate=0.0,
                        rng=random.Random(3))
    worker.ensure_running()
    queued: dict[str, dict] = {}
    etas: dict[str, list[float]] = {}
    metrics = None
    try:
        for _ in range(400):
            msg = await client.recv(timeout=10)
            if msg["type"] == "subscribed":  # a job's state so far: its latest `progress`
                msg = {"channel": msg["channel"], "event": "progress",
                       "data": msg.get("state", {}).get("progress") or {"status": "-"}}
            elif msg["type"] != "message":
                continue
            data = msg["data"]
            if msg["event"] == "job":
                await client.send({"type": "subscribe", "channel": f"job:{data['jobId']}"})
            elif msg["channel"] == "admin:metrics":
                metrics = data
            elif msg["channel"].startswith("job:") and data["status"] == "queued":
                queued[data["jobId"]] = data
            elif msg["channel"].startswith("job:") and data["status"] == "processing":
                etas.setdefault(data["jobId"], []).append(data["eta"])
            long_queue = any(q.get("queue_position", 0) >= 2 for q in queued.values())
            if metrics and long_queue and any(len(e) > 5 for e in etas.values()):
                break
    finally:
        await worker.stop()
    assert any(q["queue_position"] >= 2 for q in queued.values())
    assert all(q["eta"] > 0 for q in queued.values() if "queue_position" in q)
    assert any(e[-1] < e[0] for e in etas.values())  # the estimate shrinks as a job advances
    assert set(metrics) >= {"jobs_running", "jobs_queued", "jobs_completed", "connections"}
    assert all(isinstance(v, int | float) for v in metrics.values())


async def test_jobs_running_when_the_gateway_stopped_are_cancelled_with_the_reason(tmp_path):
    """On the durable engine the cards survive a restart; the jobs that were running when
    the process died are finished as `cancelled`, never left frozen at `processing`."""
    from gateway.server import start_gateway
    from tests.conftest import base_settings

    settings = base_settings(engine="durable", state_dir=str(tmp_path))
    gw = await start_gateway(settings)
    worker = DemoWorker(gw.node, concurrency=2, speed=20, fail_rate=0.0, rng=random.Random(5))
    try:
        worker.ensure_running()
        for _ in range(200):
            running = [j for j in worker.recent
                       if (await gw.node.read_state(None, f"job:{j}")).state.get("progress",
                                                                               {}).get("status")
                       == "processing"]
            if running:
                break
            await asyncio.sleep(0.05)
        assert running
    finally:
        await worker.stop()
        await gw.stop()
    gw = await start_gateway(settings)
    try:
        worker = DemoWorker(gw.node, concurrency=1, speed=1, rng=random.Random(6))
        await worker._finish_interrupted()
        for job in running:
            state = (await gw.node.read_state(None, f"job:{job}")).state
            assert state["cancelled"]["status"] == "cancelled"
            assert "gateway restarted" in state["cancelled"]["message"]
            assert await gw.node.broker.owner(f"job:{job}") == DEMO_USER  # still the demo's
        assert set(running) <= set(worker.recent)  # the token's job list survives too
    finally:
        await gw.stop()
