"""The Redis engine's subscribe / unsubscribe / timeout state machine, by hypothesis.

A `RuleBasedStateMachine` drives a real `RedisBroker` against a real
`redis-server` through the fault proxy: subscribes that succeed, time out in
a stall or are healed half-way, unsubscribes in the middle of a subscribe,
connection resets. The model is the hub's contract: a channel is wanted
after a subscribe that returned, until its unsubscribe; a subscribe that
failed is released at once (as the hub does). After every `check`, Redis
itself (`PUBSUB NUMSUB`, read on a direct connection) must hold exactly the
wanted channels, and a publication reaches the engine for each of them and
for no other. Bounded: a few short examples, sub-second timeouts.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any, ClassVar

import redis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, precondition, rule, run_state_machine_as_test

from gateway.broker.redis import RedisBroker
from gateway.protocol.channels import Access, Namespace
from gateway.protocol.errors import BrokerUnavailable
from gateway.protocol.publication import Publication
from tests.faultproxy import FaultProxy

NS = Namespace("public", Access.AUTHENTICATED, history_size=10, history_ttl=60)
CHANNELS = ("public:a", "public:b", "public:c")
TIMEOUT = 0.4
_runs = itertools.count()


class SubscriptionMachine(RuleBasedStateMachine):
    proxy: ClassVar[FaultProxy]
    redis_port: ClassVar[int]

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.prefix = f"hyp{next(_runs)}:"
        self.direct = redis.Redis(port=self.redis_port, decode_responses=True)
        self.proxy.heal()
        self.broker = RedisBroker(self.proxy.url, prefix=self.prefix, timeout=TIMEOUT,
                                  stall_seconds=5.0, audit_seconds=0)
        self.got: list[Publication] = []
        self.broker.bind(self.got.append, self._resubscribed)
        self.run(self.broker.start())
        self.wanted: set[str] = set()
        self.stalled = False
        self.marker = 0

    async def _resubscribed(self, channels: list[str]) -> None:
        return None

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        self.check()  # however the example ended, Redis must be in step
        self.proxy.heal()
        self.run(self.broker.close())
        self.loop.close()
        self.direct.close()

    # -- the hub's moves -------------------------------------------------------

    def _subscribed(self, channel: str, outcome: BaseException | None) -> None:
        """The hub's rule: a failed first subscribe is released at once."""
        if outcome is None:
            self.wanted.add(channel)
        else:
            assert isinstance(outcome, BrokerUnavailable), repr(outcome)
            self.run(self.broker.unsubscribe([channel]))

    async def _try(self, awaitable: Any) -> BaseException | None:
        try:
            await awaitable
        except BrokerUnavailable as exc:
            return exc
        return None

    @rule(channel=st.sampled_from(CHANNELS))
    def toggle(self, channel: str) -> None:
        """Subscribe a channel not held (the hub holds one broker subscription per
        channel), or unsubscribe one that is."""
        if channel in self.wanted:
            self.run(self.broker.unsubscribe([channel]))
            self.wanted.discard(channel)
        else:
            self._subscribed(channel, self.run(self._try(self.broker.subscribe([channel]))))

    @rule(channel=st.sampled_from(CHANNELS), delay=st.floats(0, TIMEOUT / 2))
    def unsubscribe_while_subscribing(self, channel: str, delay: float) -> None:
        """The last client leaves while its subscribe waits for Redis."""
        if channel in self.wanted:
            self.toggle(channel)
            return

        async def race() -> None:
            task = asyncio.ensure_future(self._try(self.broker.subscribe([channel])))
            await asyncio.sleep(delay)
            await self.broker.unsubscribe([channel])
            await task

        self.run(race())

    @precondition(lambda self: self.stalled)
    @rule(channel=st.sampled_from(CHANNELS), delay=st.floats(0, TIMEOUT))
    def heal_while_subscribing(self, channel: str, delay: float) -> None:
        """The stall ends while a (retried) subscribe waits: the issue-16 sequence."""
        if channel in self.wanted:
            self.toggle(channel)

        async def race() -> BaseException | None:
            task = asyncio.ensure_future(self._try(self.broker.subscribe([channel])))
            await asyncio.sleep(delay)
            await asyncio.to_thread(self.proxy.heal)
            return await task

        outcome = self.run(race())
        self.stalled = False
        self._subscribed(channel, outcome)

    @precondition(lambda self: self.stalled)
    @rule(channel=st.sampled_from(CHANNELS), delay=st.floats(0, TIMEOUT))
    def retry_across_heal(self, channel: str, delay: float) -> None:
        """Issue 16 in one move: a subscribe times out in the stall and is released,
        its retry is healed half-way."""
        if channel in self.wanted:
            self.toggle(channel)
        self._subscribed(channel, self.run(self._try(self.broker.subscribe([channel]))))
        if channel not in self.wanted:
            self.heal_while_subscribing(channel, delay)

    @rule()
    def stall(self) -> None:
        self.proxy.stall()
        self.stalled = True

    @rule()
    def heal(self) -> None:
        self.proxy.heal()
        self.stalled = False

    @rule()
    def reset(self) -> None:
        self.proxy.reset()

    # -- what must hold ----------------------------------------------------------

    def _numsub(self) -> dict[str, int]:
        names = [f"{self.prefix}pub:{c}" for c in CHANNELS]
        return {name.removeprefix(f"{self.prefix}pub:"): int(count)
                for name, count in self.direct.pubsub_numsub(*names)}

    @rule()
    def check(self) -> None:
        """Healed and settled, Redis holds exactly the wanted channels, and fans them in."""
        self.heal()
        expected = {c: int(c in self.wanted) for c in CHANNELS}

        async def settle() -> dict[str, int]:
            deadline = time.monotonic() + 8
            while True:
                held = self._numsub()
                if (held == expected and self.broker.ready) or time.monotonic() > deadline:
                    return held
                await asyncio.sleep(0.05)

        assert self.run(settle()) == expected
        assert self.broker._subs.wanted == self.wanted  # the engine's own table agrees
        self.marker += 1
        before = len(self.got)

        async def publish_and_wait() -> list[str]:
            for channel in CHANNELS:
                for _ in range(20):  # a reset link: outcome unknown, retried with its key
                    try:
                        await self.broker.publish(NS, channel, "m", {"m": self.marker},
                                                  idempotency_key=f"m{self.marker}")
                        break
                    except BrokerUnavailable:
                        await asyncio.sleep(0.1)
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                arrived = [p.channel for p in self.got[before:] if p.data == {"m": self.marker}]
                if sorted(arrived) == sorted(self.wanted):
                    await asyncio.sleep(0.05)  # and nothing else comes after
                    break
                await asyncio.sleep(0.02)
            return [p.channel for p in self.got[before:] if p.data == {"m": self.marker}]

        assert sorted(self.run(publish_and_wait())) == sorted(self.wanted)


def test_subscribe_unsubscribe_and_timeouts_keep_redis_in_step(redis_url, redis_process):
    with FaultProxy(redis_process.port) as proxy:
        SubscriptionMachine.proxy = proxy
        SubscriptionMachine.redis_port = redis_process.port
        run_state_machine_as_test(
            SubscriptionMachine,
            settings=settings(
                max_examples=8, stateful_step_count=25, deadline=None, derandomize=True,
                suppress_health_check=list(HealthCheck), database=None,
            ),
        )
