"""The backend hook client (gateway/hooks.py) against a real backend on loopback.

The breaker's and the reply parser's decisions are pure and tested directly;
every outcome of a call (accept, reject, timeout, 5xx, malformed,
unreachable, overloaded, circuit open) goes over real HTTP to
tests/backend_app.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac

import orjson
import pytest

from gateway.core.hooks import Breaker, HookFailed, Hooks, hook_urls, parse_reply
from gateway.protocol.errors import ProtocolError
from gateway.telemetry.metrics import Metrics
from tests.backend_app import Accept, Delay, Malformed, Reject, Status
from tests.conftest import base_settings, free_port


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_consecutive_failures_and_half_opens_for_one_trial():
    clock = Clock()
    b = Breaker(3, 10.0, clock)
    for _ in range(2):
        assert b.allow()
        b.failure()
    b.success()  # a success in between resets the count
    for _ in range(3):
        assert b.allow()
        b.failure()
    assert b.state == "open" and not b.allow()
    clock.now += 9.9
    assert not b.allow()
    clock.now += 0.2
    assert b.state == "half_open"
    assert b.allow()  # the one trial
    assert not b.allow()  # nobody else while it runs
    b.failure()  # the trial failed: open again, for a full cool-down
    assert b.state == "open"
    clock.now += 10.1
    assert b.allow()
    b.success()
    assert b.state == "closed" and b.allow() and b.allow()


def test_an_abandoned_call_counts_no_failure_and_frees_the_trial():
    clock = Clock()
    b = Breaker(2, 10.0, clock)
    assert b.allow()
    b.abandoned()  # a caller cancelled in the closed state: nothing about the backend
    assert b.failures == 0 and b.state == "closed"
    b.failure()
    b.failure()
    clock.now += 10.1
    assert b.allow() and not b.allow()  # the trial is out
    b.abandoned()
    assert b.state == "half_open" and b.allow()  # the next call may be the trial


@pytest.mark.parametrize(
    ("status", "body", "outcome"),
    [
        (500, b"{}", "error"),
        (503, b"", "error"),
        (404, b"{}", "malformed"),
        (200, b"<html>", "malformed"),
        (200, b"[1]", "malformed"),
        (200, b"{}", "malformed"),
        (200, b'{"result": 1, "error": {"code": "forbidden"}}', "malformed"),
        (200, b'{"error": {"code": "teapot", "message": "x"}}', "malformed"),
        (200, b'{"error": "forbidden"}', "malformed"),
    ],
)
def test_parse_reply_refuses_every_malformed_shape(status, body, outcome):
    with pytest.raises(HookFailed) as err:
        parse_reply("rpc", status, body)
    assert err.value.code == "unavailable" and err.value.outcome == outcome


def test_parse_reply_returns_the_result_or_raises_the_backends_rejection():
    assert parse_reply("rpc", 200, b'{"result": {"a": [1]}}') == {"a": [1]}
    assert parse_reply("rpc", 200, b'{"result": null}') is None
    with pytest.raises(ProtocolError) as err:
        parse_reply("subscribe", 200, orjson.dumps({"error": {"code": "forbidden",
                                                              "message": "x" * 2000}}))
    assert not isinstance(err.value, HookFailed)
    assert err.value.code == "forbidden" and len(err.value.message) == 512


def test_a_hook_is_on_only_when_the_url_and_its_path_are_set():
    assert hook_urls(base_settings(hook_rpc_path="rpc")) == {}
    urls = hook_urls(base_settings(hook_url="http://app/h/", hook_rpc_path="/rpc"))
    assert urls == {"rpc": "http://app/h/rpc"}


def outcomes(metrics: Metrics, hook: str) -> dict[str, int]:
    found = {}
    for outcome in ("ok", "rejected", "timeout", "error", "malformed", "overloaded",
                    "circuit_open"):
        value = metrics.registry.get_sample_value(
            "herald_hook_requests_total", {"hook": hook, "outcome": outcome})
        if value:
            found[outcome] = int(value)
    return found


async def test_every_outcome_of_a_real_call(backend):
    metrics = Metrics()
    hooks = Hooks(base_settings(**backend.settings(hook_secret="s3cret")), metrics)
    req = {"user": "u1", "client": "c-1", "transport": "ws", "method": "echo", "params": [1, 2]}
    assert await hooks.call("rpc", req) == [1, 2]
    call = backend.calls["rpc"][0]
    assert call.body == {"hook": "rpc", **req}
    body = orjson.dumps({"hook": "rpc", **req})
    assert call.headers["x-herald-signature"] == "sha256=" + hmac.new(
        b"s3cret", body, hashlib.sha256).hexdigest()
    for rule, code, outcome in [
        (Reject("forbidden", "no"), "forbidden", "rejected"),
        (Delay(2.0), "unavailable", "timeout"),
        (Status(502), "unavailable", "error"),
        (Malformed(b"not json"), "unavailable", "malformed"),
    ]:
        backend.on("rpc", rule)
        with pytest.raises(ProtocolError) as err:
            await hooks.call("rpc", req)
        assert err.value.code == code, (rule, err.value.message)
        assert getattr(err.value, "outcome", "rejected") == outcome
    assert outcomes(metrics, "rpc") == {
        "ok": 1, "rejected": 1, "timeout": 1, "error": 1, "malformed": 1}
    hooks.close()


async def test_an_unreachable_backend_is_unavailable():
    metrics = Metrics()
    settings = base_settings(hook_url=f"http://127.0.0.1:{free_port()}", hook_rpc_path="rpc")
    hooks = Hooks(settings, metrics)
    with pytest.raises(HookFailed) as err:
        await hooks.call("rpc", {"method": "x"})
    assert err.value.outcome == "error" and "unreachable" in err.value.message
    hooks.close()


async def test_calls_past_the_concurrency_bound_are_refused_at_once(backend):
    metrics = Metrics()
    hooks = Hooks(base_settings(**backend.settings(hook_concurrency=2, hook_timeout=5.0)),
                  metrics)
    backend.on("rpc", Delay(0.3, Accept("late")))
    calls = [asyncio.create_task(hooks.call("rpc", {"method": "m"})) for _ in range(3)]
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert results[:2] == ["late", "late"]
    assert isinstance(results[2], HookFailed) and results[2].outcome == "overloaded"
    assert len(backend.calls["rpc"]) == 2  # the third never went out
    hooks.close()


async def test_the_circuit_opens_after_failures_and_closes_after_a_good_trial(backend):
    metrics = Metrics()
    settings = base_settings(**backend.settings(hook_breaker_failures=2,
                                                hook_breaker_cooldown=0.3))
    hooks = Hooks(settings, metrics)
    backend.on("rpc", Status(500))
    for _ in range(2):
        with pytest.raises(HookFailed):
            await hooks.call("rpc", {"method": "m"})
    with pytest.raises(HookFailed) as err:
        await hooks.call("rpc", {"method": "m"})
    assert err.value.outcome == "circuit_open" and hooks.breaker_state("rpc") == "open"
    assert len(backend.calls["rpc"]) == 2  # refused without calling the backend
    other = dataclasses.replace(settings)  # connect has its own breaker, still closed
    assert Hooks(other, metrics).breaker_state("connect") == "closed"
    assert hooks.breaker_state("connect") == "closed"
    await asyncio.sleep(0.35)
    backend.on("rpc", Accept("back"))
    assert await hooks.call("rpc", {"method": "m"}) == "back"
    assert hooks.breaker_state("rpc") == "closed"
    hooks.close()


async def test_a_reply_over_the_bound_is_malformed(backend):
    from gateway.core.hooks import MAX_REPLY_BYTES

    hooks = Hooks(base_settings(**backend.settings()), Metrics())
    backend.on("rpc", Accept("x" * (MAX_REPLY_BYTES + 10)))
    with pytest.raises(HookFailed) as err:
        await hooks.call("rpc", {"method": "m"})
    assert err.value.outcome == "malformed" and "over" in err.value.message
    hooks.close()


async def test_a_cancelled_call_does_not_leave_the_breaker_half_open_for_good(backend):
    hooks = Hooks(base_settings(**backend.settings(hook_breaker_failures=1,
                                                   hook_breaker_cooldown=0.1)), Metrics())
    backend.on("rpc", Status(500))
    with pytest.raises(HookFailed):
        await hooks.call("rpc", {"method": "m"})
    await asyncio.sleep(0.15)  # half-open: the next call is the trial
    backend.on("rpc", Delay(5.0))
    trial = asyncio.create_task(hooks.call("rpc", {"method": "m"}))
    await asyncio.sleep(0.1)
    trial.cancel()  # the caller went away mid-trial
    with pytest.raises(asyncio.CancelledError):
        await trial
    await asyncio.sleep(0.15)
    backend.on("rpc", Accept("ok"))
    assert await hooks.call("rpc", {"method": "m"}) == "ok"  # a new trial was allowed
    hooks.close()
