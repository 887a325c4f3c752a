"""Chaos: three gateways, a real Redis behind a lying network, clients that hop and drop.

Three `herald serve` processes share one real `redis-server` through the
fault proxy (tests/faultproxy.py), which stalls, resets and slows their
links on a schedule, and Redis itself is restarted (empty) once. Clients
hop between gateways and drop abruptly, resuming by offset; a publisher
retries every publish that did not get a 200 with the same idempotency key.

What must hold, whatever the faults:

- 0 silent losses: every client's stream of each channel is contiguous
  within an epoch, and every epoch change comes after a `recovered: false`;
- 0 duplicates, 0 reorderings: no (epoch, offset) twice, offsets and the
  publisher's sequence numbers only go up;
- the final epoch (after the Redis restart) is complete in Redis (every
  acknowledged publication, once, in order) and at every client.

The figures are printed (`-s` shows them): publications, deliveries, faults,
lost / duplicated / reordered / reported. And no fault may be a server error:
not one error-level line in any gateway's log (the first runs found uvloop's
RuntimeError on a reset connection answered as a 500). Bounded: about a minute of faults,
then at most 40 s to settle.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
import websockets
from tornado.httpclient import AsyncHTTPClient, HTTPClientError

from tests.conftest import API_KEY, token
from tests.faultproxy import FaultProxy

CHANNELS = [f"chaos:c{i}" for i in range(4)]
NAMESPACES = orjson.dumps(
    {"chaos": {"access": "authenticated", "history_size": 5000, "history_ttl": 900}}
).decode()
RUN_SECONDS = 48.0
SETTLE_SECONDS = 40.0
CLIENTS = 9


@dataclass
class Tracker:
    """One client's view of one channel, checked frame by frame."""

    epoch: str | None = None
    offset: int = 0
    last_seq: int = -1
    # (epoch, offset, seq) of every message handed over, in order.
    got: list[tuple[str, int, int]] = field(default_factory=list)


@dataclass
class Tally:
    deliveries: int = 0
    lost: int = 0  # a hole in offsets within an epoch, or an unreported epoch change
    duplicated: int = 0
    reordered: int = 0
    reported: int = 0  # `recovered: false` (epoch change or history gone), told to the client
    refused: int = 0  # subscribes answered `unavailable` (retried)
    notes: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        if len(self.notes) < 20:
            self.notes.append(text)


class ChaosClient:
    def __init__(self, name: str, channels: list[str], gateways: list[Any], tally: Tally,
                 rng: random.Random) -> None:
        self.name = name
        self.channels = channels
        self.gateways = gateways
        self.tally = tally
        self.rng = rng
        self.tracks = {c: Tracker() for c in channels}
        self.connections = 0

    def on_message(self, frame: dict[str, Any]) -> None:
        tr = self.tracks.get(frame["channel"])
        if tr is None:
            return
        epoch, offset, seq = frame["epoch"], frame["offset"], frame["data"]["seq"]
        self.tally.deliveries += 1
        if epoch != tr.epoch:
            # A new epoch must be announced by `recovered: false` first.
            self.tally.lost += 1
            self.tally.note(f"{self.name} {frame['channel']}: unreported epoch {epoch}")
            tr.epoch, tr.offset, tr.last_seq = epoch, offset - 1, -1
        if offset <= tr.offset:
            self.tally.duplicated += 1
            self.tally.note(f"{self.name} {frame['channel']}: {offset} again after {tr.offset}")
            return
        if offset > tr.offset + 1:
            self.tally.lost += offset - tr.offset - 1
            self.tally.note(f"{self.name} {frame['channel']}: gap {tr.offset} -> {offset}")
        if seq <= tr.last_seq:
            self.tally.reordered += 1
            self.tally.note(f"{self.name} {frame['channel']}: seq {seq} after {tr.last_seq}")
        tr.offset, tr.last_seq = offset, seq
        tr.got.append((epoch, offset, seq))

    def on_subscribed(self, frame: dict[str, Any]) -> None:
        tr = self.tracks.get(frame["channel"])
        if tr is None:
            return
        if frame.get("recovered") is True:
            return  # the replay after our position follows
        if frame.get("recovered") is False:
            self.tally.reported += 1
        elif tr.epoch is not None:
            return  # a plain subscribe of a channel we already follow (not ours to send)
        tr.epoch, tr.offset, tr.last_seq = frame["epoch"], frame["offset"], -1

    async def session(self, stop: asyncio.Event) -> None:
        """One connection: subscribe (resuming), read until it is time to hop or drop."""
        gw = self.rng.choice(self.gateways)
        self.connections += 1
        conn = await websockets.connect(
            gw.ws_url, additional_headers={"Authorization": f"Bearer {token(self.name)}"},
            open_timeout=5, close_timeout=1,
        )
        lifetime = time.monotonic() + self.rng.uniform(2.0, 7.0)
        pending: dict[int, str] = {}
        rid = 0
        try:
            async def ask(channel: str) -> None:
                nonlocal rid
                rid += 1
                tr = self.tracks[channel]
                request: dict[str, Any] = {"type": "subscribe", "id": rid, "channel": channel}
                if tr.epoch is not None:
                    request["since"] = {"epoch": tr.epoch, "offset": tr.offset}
                pending[rid] = channel
                await conn.send(orjson.dumps(request).decode())

            for channel in self.channels:
                await ask(channel)
            retry_at: dict[str, float] = {}
            while not stop.is_set() and time.monotonic() < lifetime:
                for channel, at in list(retry_at.items()):
                    if time.monotonic() >= at:
                        del retry_at[channel]
                        await ask(channel)
                try:
                    raw = await asyncio.wait_for(conn.recv(), 0.25)
                except TimeoutError:
                    continue
                frame = orjson.loads(raw)
                kind = frame.get("type")
                if kind == "message":
                    self.on_message(frame)
                elif kind == "subscribed":
                    pending.pop(frame.get("id"), None)
                    self.on_subscribed(frame)
                elif kind == "error" and frame.get("id") in pending:
                    self.tally.refused += 1
                    retry_at[pending.pop(frame["id"])] = time.monotonic() + 0.3
        finally:
            if self.rng.random() < 0.5:
                await conn.close()  # a hop: a clean close, and on to another gateway
            else:
                conn.transport.abort()  # a drop: gone without a word
                await asyncio.sleep(self.rng.uniform(0.2, 1.0))

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.session(stop)
            except (OSError, TimeoutError, websockets.WebSocketException):
                await asyncio.sleep(0.3)

    def caught_up(self, last: dict[str, tuple[str, int]]) -> bool:
        return all((self.tracks[c].epoch, self.tracks[c].offset) == last[c]
                   for c in self.channels if c in last)


class Publisher:
    """Publishes seq 0, 1, 2... round-robin over the channels, each until acknowledged."""

    def __init__(self, gateways: list[Any], rng: random.Random) -> None:
        self.gateways = gateways
        self.rng = rng
        self.http = AsyncHTTPClient(force_instance=True)
        # channel -> [(epoch, offset, seq, duplicate)] of every acknowledgement
        self.acked: dict[str, list[tuple[str, int, int, bool]]] = {c: [] for c in CHANNELS}
        self.attempts = 0
        self.retries = 0

    async def publish(self, channel: str, seq: int) -> None:
        body = orjson.dumps({"channel": channel, "event": "tick", "data": {"seq": seq}})
        deadline = time.monotonic() + 40
        while True:
            gw = self.rng.choice(self.gateways)
            self.attempts += 1
            try:
                resp = await self.http.fetch(
                    f"{gw.url}/api/v1/publish", method="POST", body=body, request_timeout=3,
                    headers={"Authorization": f"apikey {API_KEY}",
                             "Content-Type": "application/json",
                             "Idempotency-Key": f"chaos-{channel}-{seq}"},
                )
                reply = orjson.loads(resp.body)
                self.acked[channel].append(
                    (reply["epoch"], reply["offset"], seq, bool(reply.get("duplicate")))
                )
                return
            except HTTPClientError as exc:
                if exc.code not in (503, 599):
                    body = exc.response.body if exc.response is not None else b""
                    raise AssertionError(f"publish refused: {exc.code} {body!r}") from None
            except OSError:
                pass
            assert time.monotonic() < deadline, f"{channel} seq {seq} never acknowledged"
            self.retries += 1
            await asyncio.sleep(self.rng.uniform(0.05, 0.25))  # outcome unknown: same key again

    async def run(self, stop: asyncio.Event) -> int:
        seq = 0
        while not stop.is_set():
            await self.publish(CHANNELS[seq % len(CHANNELS)], seq)
            seq += 1
            await asyncio.sleep(0.03)
        return seq


async def faults(proxy: FaultProxy, redis_process: Any, stop: asyncio.Event) -> list[str]:
    """The schedule: stalls, resets, slow links, and one Redis restart (empty)."""
    done: list[str] = []
    steps: list[tuple[float, str]] = [
        (4, "stall 3"), (10, "reset"), (14, "slow 3"), (20, "restart"), (28, "stall 2"),
        (33, "reset"), (37, "slow 2"), (41, "stall 4"),
    ]
    start = time.monotonic()
    for at, step in steps:
        await asyncio.sleep(max(0.0, start + at - time.monotonic()))
        kind, _, arg = step.partition(" ")
        if kind == "stall":
            await asyncio.to_thread(proxy.stall)
            await asyncio.sleep(float(arg))
            await asyncio.to_thread(proxy.heal)
        elif kind == "slow":
            await asyncio.to_thread(proxy.slow, 0.25)
            await asyncio.sleep(float(arg))
            await asyncio.to_thread(proxy.heal)
        elif kind == "reset":
            await asyncio.to_thread(proxy.reset)
        else:
            await asyncio.to_thread(redis_process.stop)
            await asyncio.sleep(1.0)
            await asyncio.to_thread(redis_process.start)
        done.append(step)
    await asyncio.sleep(max(0.0, start + RUN_SECONDS - time.monotonic()))
    stop.set()
    return done


async def history(gw: Any, channel: str) -> dict[str, Any]:
    resp = await AsyncHTTPClient().fetch(
        f"{gw.url}/api/v1/channels/{channel}/history?since=0&limit=1000",
        headers={"Authorization": f"apikey {API_KEY}"},
    )
    return orjson.loads(resp.body)


@pytest.mark.timeout(300)
async def test_chaos_loses_nothing_silently(
    redis_process, redis_url, fault_proxy, spawn_gateway, tmp_path
):
    rng = random.Random(16)
    env = {
        "HERALD_REDIS_URL": fault_proxy.url, "HERALD_NAMESPACES": NAMESPACES,
        "HERALD_REDIS_TIMEOUT": "1", "HERALD_REDIS_STALL_SECONDS": "1",
        "HERALD_REDIS_AUDIT_SECONDS": "2",
    }
    logs = [tmp_path / f"gw-{i}.log" for i in range(3)]
    gateways = [spawn_gateway(f"gw-chaos-{i}", log_path=logs[i], **env) for i in range(3)]
    tally = Tally()
    clients = [
        ChaosClient(f"chaos-{i}", rng.sample(CHANNELS, 2), gateways, tally, rng)
        for i in range(CLIENTS)
    ]
    stop = asyncio.Event()
    publisher = Publisher(gateways, rng)
    # Every client holds its channels from offset 0 before anything is published.
    for c in CHANNELS:
        await publisher.publish(c, -1)
    client_tasks = [asyncio.ensure_future(c.run(stop)) for c in clients]
    started = time.monotonic()
    while not all(all(t.epoch is not None for t in c.tracks.values()) for c in clients):
        assert time.monotonic() - started < 20, "clients did not subscribe"
        await asyncio.sleep(0.1)
    pub_task = asyncio.ensure_future(publisher.run(stop))
    done = await faults(fault_proxy, redis_process, stop)
    try:
        published = await pub_task
    except AssertionError:
        for log in logs:
            errors = [line for line in log.read_text().splitlines() if '"error"' in line]
            print("\n".join(errors[-5:]))
        raise
    await asyncio.gather(*client_tasks)

    # Settle: every client resumes once more and must reach each channel's end.
    fault_proxy.heal()
    last = {c: (a[-1][0], a[-1][1]) for c, a in publisher.acked.items() if a}
    settle = asyncio.Event()
    settle_tasks = [asyncio.ensure_future(c.run(settle)) for c in clients]
    deadline = time.monotonic() + SETTLE_SECONDS
    while not all(c.caught_up(last) for c in clients) and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.2)
    settle.set()
    await asyncio.gather(*settle_tasks)

    # The final epoch, as Redis holds it: every acknowledged publication once, in order.
    missing_at_end = 0
    engine_duplicates = 0
    for channel, acks in publisher.acked.items():
        final_epoch = acks[-1][0]
        hist = await history(gateways[0], channel)
        assert hist["epoch"] == final_epoch and hist["complete"]
        stored = [(m["offset"], m["data"]["seq"]) for m in hist["messages"]]
        assert [o for o, _ in stored] == list(range(1, len(stored) + 1))
        seqs = [s for _, s in stored]
        engine_duplicates += len(seqs) - len(set(seqs))
        assert seqs == sorted(seqs)
        acked_final = {seq for epoch, _, seq, _ in acks if epoch == final_epoch}
        assert acked_final <= set(seqs)
        for client in clients:
            if channel in client.tracks:
                got = [(o, s) for e, o, s in client.tracks[channel].got if e == final_epoch]
                missing_at_end += len(set(stored) - set(got))

    # No fault is a server error: not one error-level line (a traceback) in any gateway's log.
    # (The access log writes every 5xx at error level: a 503 is the expected answer.)
    errors = [line for log in logs for line in log.read_text().splitlines()
              if '"level":"error"' in line and '"message":"503 ' not in line]
    faults_injected = dict(fault_proxy.stats.faults, restart=done.count("restart"))
    duplicates_acked = sum(d for acks in publisher.acked.values() for *_, d in acks)
    print(
        f"\nchaos: publications={published} acknowledged="
        f"{sum(len(a) for a in publisher.acked.values())} attempts={publisher.attempts} "
        f"retries={publisher.retries} duplicate_answers={duplicates_acked} "
        f"deliveries={tally.deliveries} connections={sum(c.connections for c in clients)} "
        f"faults={faults_injected} resets={fault_proxy.stats.resets} "
        f"lost={tally.lost} duplicated={tally.duplicated + engine_duplicates} "
        f"reordered={tally.reordered} reported={tally.reported} refused={tally.refused} "
        f"missing_at_end={missing_at_end} errors_logged={len(errors)}"
    )
    assert errors == [], errors[:3]
    assert tally.notes == []
    assert (tally.lost, tally.duplicated, tally.reordered) == (0, 0, 0)
    assert engine_duplicates == 0 and missing_at_end == 0
    assert tally.reported >= 1  # the Redis restart was told to the clients
    assert published > 100 and tally.deliveries > published
    with contextlib.suppress(Exception):
        publisher.http.close()
