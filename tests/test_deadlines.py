"""core.deadlines: many connections' token expiries on one loop timer, in order."""

from __future__ import annotations

import asyncio
import time

from gateway.core.deadlines import Deadlines


async def test_deadlines_fire_in_time_order_and_a_cancelled_one_never_fires():
    deadlines = Deadlines()
    fired: list[str] = []
    now = time.time()
    deadlines.at(now + 0.15, lambda: fired.append("late"))
    early = deadlines.at(now + 0.05, lambda: fired.append("cancelled"))
    deadlines.at(now + 0.10, lambda: fired.append("middle"))
    deadlines.at(now - 1, lambda: fired.append("past"))  # already passed: at once
    deadlines.cancel(early)
    deadlines.cancel(early)  # twice is once
    assert len(deadlines) == 3
    for _ in range(100):
        if len(fired) == 3:
            break
        await asyncio.sleep(0.02)
    assert fired == ["past", "middle", "late"]
    assert len(deadlines) == 0


async def test_an_earlier_deadline_rearms_the_timer_and_a_failing_callback_stops_no_other():
    deadlines = Deadlines()
    fired: list[str] = []
    now = time.time()
    deadlines.at(now + 30, lambda: fired.append("far"))
    deadlines.at(now + 0.05, lambda: 1 / 0)
    deadlines.at(now + 0.06, lambda: fired.append("near"))
    for _ in range(100):
        if fired:
            break
        await asyncio.sleep(0.02)
    assert fired == ["near"]  # not held back by the 30 s one, nor by the failure
    deadlines.clear()
    assert len(deadlines) == 0


async def test_cancelled_entries_do_not_pile_up():
    deadlines = Deadlines()
    now = time.time()
    entries = [deadlines.at(now + 3600 + i, lambda: None) for i in range(1000)]
    for entry in entries:
        deadlines.cancel(entry)
    assert len(deadlines) == 0
    assert len(deadlines._heap) <= 130  # compacted once blanks were most of it
    deadlines.clear()
