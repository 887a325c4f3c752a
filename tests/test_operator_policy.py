"""The scaling policy as tables: (spec, start, timeline of loads) -> replicas after each tick,
and the same load step at different reconcile intervals scaling at the same rate."""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from herald_operator.policy import (
    MAX_CHANGES,
    MAX_HISTORY,
    Load,
    Memory,
    allowance,
    decide,
    recommend,
    record,
)
from herald_operator.spec import ScalingSpec

BASE = ScalingSpec(min_replicas=2, max_replicas=10, target_connections=1000,
                   target_messages=0, tolerance=0.0, up_min_step=1, up_max_step=4,
                   up_period=15.0, up_window=0.0, down_window=300.0, down_step=1,
                   down_period=15.0)


def load(connections: int, msgs: float = 0.0, reporting: int = 3, expected: int = 3) -> Load:
    return Load(connections, msgs, reporting, expected)


STALE = None


def simulate(spec: ScalingSpec, start: int, timeline: list[tuple[float, Load | None]],
             ) -> list[int]:
    replicas, memory, seen = start, Memory(), []
    for now, observed in timeline:
        decision = decide(spec, replicas, observed, memory, now)
        replicas, memory = decision.replicas, decision.memory
        seen.append(replicas)
    return seen


def every(seconds: float, loads: list[Load | None], start: float = 1000.0):
    return [(start + i * seconds, item) for i, item in enumerate(loads)]


CASES = [
    # name, spec changes, start replicas, timeline, replicas after each tick
    ("idle fleet stays at min", {}, 2, every(10, [load(0)] * 3), [2, 2, 2]),
    ("scale up at once within maxStep", {}, 2, every(10, [load(5500)]), [6]),
    ("maxStep is per period: a 20 s tick gets one step per tick", {}, 2,
     every(20, [load(9000)] * 3), [6, 9, 9]),
    ("maxStep is per period: a 5 s tick waits for the period", {}, 2,
     every(5, [load(9000)] * 4), [6, 6, 6, 9]),
    ("minStep adds at least that many", {"up_min_step": 3}, 2,
     every(10, [load(2500)]), [5]),
    ("recommendation clamped to max", {}, 8, every(10, [load(50_000)] * 2), [10, 10]),
    ("below min is raised even with a stale registry", {}, 0, every(10, [STALE]), [2]),
    ("above max (spec lowered) is clamped at once", {"max_replicas": 4}, 9,
     every(10, [load(9000)]), [4]),
    ("scale down waits for the window, then one step per period", {"down_window": 60}, 6,
     every(10, [load(6000)] + [load(1500)] * 12),
     [6, 6, 6, 6, 6, 6, 6, 5, 5, 4, 4, 3, 3]),
    ("scale-down step is per period", {"down_window": 0, "down_step": 2, "down_period": 20},
     9, every(10, [load(100)] * 6), [7, 7, 5, 5, 3, 3]),
    ("zero window scales down at the next tick", {"down_window": 0}, 4,
     every(10, [load(2500)]), [3]),
    ("flapping load never scales down inside the window", {"down_window": 300}, 2,
     every(60, [load(5000), load(500)] * 10), [5] * 20),
    ("stale registry never scales down", {"down_window": 30}, 6,
     every(20, [load(6000)] + [STALE] * 10), [6] * 11),
    ("after staleness the lower load must hold a full window of fresh data",
     {"down_window": 60}, 6,
     every(20, [load(6000)] + [STALE] * 5 + [load(1000)] * 5), [6] * 9 + [5, 4]),
    ("partial data (1 of 3 reporting) never scales down", {"down_window": 0}, 6,
     every(10, [load(100, reporting=1)] * 3), [6, 6, 6]),
    ("partial data still scales up", {}, 2,
     every(10, [load(4000, reporting=1)]), [4]),
    ("messages per second can dominate", {"target_messages": 500}, 2,
     every(10, [load(100, msgs=3600)]), [6]),
    ("messages ignored when the target is 0", {"target_messages": 0}, 3,
     every(10, [load(2500, msgs=1e6)]), [3]),
    ("inside the tolerance band nothing scales up", {"tolerance": 0.1}, 5,
     every(10, [load(5400), load(5450), load(5600)]), [5, 5, 6]),
    ("inside the tolerance band nothing scales down", {"tolerance": 0.1, "down_window": 0},
     5, every(10, [load(4550), load(3900)]), [5, 4]),
    ("a scale-up window ignores a one-tick spike", {"up_window": 30}, 2,
     every(10, [load(2000), load(8000), load(2000), load(2000)]), [2, 2, 2, 2]),
    ("a scale-up window follows sustained load once it held", {"up_window": 30}, 2,
     every(10, [load(6000)] * 5), [2, 2, 2, 6, 6]),
]


@pytest.mark.parametrize(("name", "changes", "start", "timeline", "expected"), CASES,
                         ids=[case[0] for case in CASES])
def test_policy_table(name, changes, start, timeline, expected):
    spec = dataclasses.replace(BASE, **changes)
    assert simulate(spec, start, timeline) == expected


def _at(interval: float, spec: ScalingSpec, start: int, loads: list[tuple[float, int]],
        until: float) -> list[tuple[float, int]]:
    """(time, replicas) every `interval` s, load from the piecewise-constant `loads`."""
    replicas, memory, out, now = start, Memory(), [], 0.0
    while now <= until:
        connections = [c for t, c in loads if t <= now][-1]
        decision = decide(spec, replicas, load(connections), memory, 10_000.0 + now)
        replicas, memory = decision.replicas, decision.memory
        out.append((now, replicas))
        now += interval
    return out


def _steps(trace: list[tuple[float, int]]) -> list[tuple[float, int]]:
    """(time, change) of every tick that changed the replica count."""
    return [(t, r - prev) for (_, prev), (t, r) in itertools.pairwise(trace)
            if r != prev]


@pytest.mark.parametrize("interval", [1.0, 2.0, 5.0, 10.0])
def test_the_reconcile_interval_does_not_change_the_rate(interval: float):
    """A load step from 2 to 10 replicas' worth, then back. Whatever the interval, the
    fleet grows by maxStep per period and, once the window has passed, shrinks by step
    per period: each step comes a period after the previous one, late by at most one
    interval (the sampling), never early. (Per pass, a 1 s interval scaled 10x faster
    than a 10 s one.)"""
    spec = dataclasses.replace(BASE, up_max_step=2, up_period=15.0, down_window=60.0,
                               down_step=1, down_period=15.0)
    trace = _at(interval, spec, 2, [(0.0, 2000), (1.0, 10_000), (150.0, 2000)], 400.0)
    steps = _steps(trace)
    ups = [(t, d) for t, d in steps if d > 0]
    downs = [(t, d) for t, d in steps if d < 0]
    assert [d for _, d in ups] == [2, 2, 2, 2] and sum(d for _, d in downs) == -8, steps
    assert 1.0 <= ups[0][0] <= 1.0 + interval, steps
    for (t0, _), (t1, _) in itertools.pairwise(steps):
        if (t1 < 150) == (t0 < 150):  # consecutive steps of one direction
            assert 15.0 <= t1 - t0 <= 15.0 + interval, (t0, t1, steps)
    # Down: the window starts at the first pass that sees the drop.
    seen_drop = 150.0 + (-150.0 % interval)
    assert seen_drop + 60.0 <= downs[0][0] <= seen_drop + 60.0 + interval, steps
    assert all(d == -1 for _, d in downs)


def test_never_outside_min_max_whatever_the_load():
    spec = dataclasses.replace(BASE, down_window=0)
    for start in range(0, 15):
        for conns in (0, 1, 999, 1000, 1001, 7777, 10**7):
            for observed in (load(conns), STALE, load(conns, reporting=1)):
                got = decide(spec, start, observed, Memory(), 0.0).replicas
                assert spec.min_replicas <= got <= spec.max_replicas, (start, conns, observed)


def test_every_decision_has_a_reason_and_direction():
    decision = decide(BASE, 2, load(5500), Memory(), 0.0)
    assert decision.direction == "up" and "5500 connections" in decision.reason
    assert decision.memory.changes == ((0.0, 4),)
    held = decide(BASE, 6, load(9000), decision.memory, 5.0)
    assert held.direction == "hold" and "added in the last 15s" in held.reason
    decision = decide(BASE, 6, STALE, Memory(), 0.0)
    assert decision.direction == "hold" and "stale" in decision.reason


def test_recommendation_formula_and_tolerance():
    spec = dataclasses.replace(BASE, target_messages=100, max_replicas=100)
    assert recommend(spec, load(1001, msgs=0)) == 2
    assert recommend(spec, load(1000, msgs=0)) == 2  # min
    assert recommend(spec, load(3000, msgs=450)) == 5  # messages win
    assert recommend(spec, load(7000, msgs=450)) == 7  # connections win
    banded = dataclasses.replace(spec, tolerance=0.2)
    assert recommend(banded, load(5900), current=5) == 5  # 18 % over: within the band
    assert recommend(banded, load(6100), current=5) == 7
    assert recommend(banded, load(4100), current=5) == 5


def test_allowance_counts_only_its_direction_within_the_period():
    changes = ((100.0, 2), (110.0, -1), (114.0, 1))
    assert allowance(changes, 114.5, 15.0, 4, +1) == 1
    assert allowance(changes, 114.5, 15.0, 1, -1) == 0
    assert allowance(changes, 128.0, 15.0, 4, +1) == 3  # the t=100 change left the period


def test_history_and_changes_are_run_length_and_bounded():
    history: tuple = ()
    for i in range(10):
        history = record(history, float(i), 3, window=1000)
    assert history == ((0.0, 3),)
    for i in range(MAX_HISTORY * 3):
        history = record(history, float(i), i % 2, window=10**6)
    assert len(history) == MAX_HISTORY
    spec = dataclasses.replace(BASE, up_max_step=10**6, up_period=10**6, max_replicas=10**6,
                               target_connections=1)
    memory, replicas = Memory(), 2
    for i in range(MAX_CHANGES * 2):
        decision = decide(spec, replicas, load(replicas + 1), memory, float(i))
        memory, replicas = decision.memory, decision.replicas
    assert len(memory.changes) == MAX_CHANGES


def test_history_keeps_one_entry_before_the_window():
    history = ((0.0, 8), (50.0, 4), (90.0, 3))
    assert record(history, 200.0, 3, window=100) == ((90.0, 3),)
    assert record(history, 120.0, 3, window=100) == ((0.0, 8), (50.0, 4), (90.0, 3))
