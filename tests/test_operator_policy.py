"""The scaling policy as tables: (spec, start, timeline of loads) -> replicas after each tick."""

from __future__ import annotations

import dataclasses

import pytest

from herald_operator.policy import MAX_HISTORY, Load, decide, recommend, record
from herald_operator.spec import ScalingSpec

BASE = ScalingSpec(min_replicas=2, max_replicas=10, target_connections=1000,
                   target_messages=0, up_min_step=1, up_max_step=4,
                   down_window=300.0, down_step=1)


def load(connections: int, msgs: float = 0.0, reporting: int = 3, expected: int = 3) -> Load:
    return Load(connections, msgs, reporting, expected)


STALE = None


def simulate(spec: ScalingSpec, start: int, timeline: list[tuple[float, Load | None]],
             ) -> list[int]:
    replicas, history, seen = start, (), []
    for now, observed in timeline:
        decision = decide(spec, replicas, observed, history, now)
        replicas, history = decision.replicas, decision.history
        seen.append(replicas)
    return seen


def every(seconds: float, loads: list[Load | None], start: float = 1000.0):
    return [(start + i * seconds, item) for i, item in enumerate(loads)]


CASES = [
    # name, spec changes, start replicas, timeline, replicas after each tick
    ("idle fleet stays at min", {}, 2, every(10, [load(0)] * 3), [2, 2, 2]),
    ("scale up at once within maxStep", {}, 2, every(10, [load(5500)]), [6]),
    ("large jump is bounded by maxStep per tick", {}, 2,
     every(10, [load(9000)] * 3), [6, 9, 9]),
    ("minStep adds at least that many", {"up_min_step": 3}, 2,
     every(10, [load(2500)]), [5]),
    ("recommendation clamped to max", {}, 8, every(10, [load(50_000)] * 2), [10, 10]),
    ("below min is raised even with a stale registry", {}, 0, every(10, [STALE]), [2]),
    ("above max (spec lowered) is clamped at once", {"max_replicas": 4}, 9,
     every(10, [load(9000)]), [4]),
    ("scale down waits for the window, then steps", {"down_window": 60}, 6,
     every(20, [load(6000)] + [load(1500)] * 6), [6, 6, 6, 6, 5, 4, 3]),
    ("scale-down step bound", {"down_window": 0, "down_step": 2}, 9,
     every(10, [load(100)] * 4), [7, 5, 3, 2]),
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
    ("fresh operator (empty history) waits a full window before scaling down",
     {"down_window": 100}, 5, every(50, [load(1000)] * 4), [5, 5, 4, 3]),
]


@pytest.mark.parametrize(("name", "changes", "start", "timeline", "expected"), CASES,
                         ids=[case[0] for case in CASES])
def test_policy_table(name, changes, start, timeline, expected):
    spec = dataclasses.replace(BASE, **changes)
    assert simulate(spec, start, timeline) == expected


def test_never_outside_min_max_whatever_the_load():
    spec = dataclasses.replace(BASE, down_window=0)
    for start in range(0, 15):
        for conns in (0, 1, 999, 1000, 1001, 7777, 10**7):
            for observed in (load(conns), STALE, load(conns, reporting=1)):
                got = decide(spec, start, observed, (), 0.0).replicas
                assert spec.min_replicas <= got <= spec.max_replicas, (start, conns, observed)


def test_every_decision_has_a_reason_and_direction():
    decision = decide(BASE, 2, load(5500), (), 0.0)
    assert decision.direction == "up" and "5500 connections" in decision.reason
    decision = decide(BASE, 6, STALE, (), 0.0)
    assert decision.direction == "hold" and "stale" in decision.reason


def test_recommendation_formula():
    spec = dataclasses.replace(BASE, target_messages=100, max_replicas=100)
    assert recommend(spec, load(1001, msgs=0)) == 2
    assert recommend(spec, load(1000, msgs=0)) == 2  # min
    assert recommend(spec, load(3000, msgs=450)) == 5  # messages win
    assert recommend(spec, load(7000, msgs=450)) == 7  # connections win


def test_history_is_run_length_and_bounded():
    history: tuple = ()
    for i in range(10):
        history = record(history, float(i), 3, window=1000)
    assert history == ((0.0, 3),)
    for i in range(MAX_HISTORY * 3):
        history = record(history, float(i), i % 2, window=10**6)
    assert len(history) == MAX_HISTORY


def test_history_keeps_one_entry_before_the_window():
    history = ((0.0, 8), (50.0, 4), (90.0, 3))
    assert record(history, 200.0, 3, window=100) == ((90.0, 3),)
    assert record(history, 120.0, 3, window=100) == ((0.0, 8), (50.0, 4), (90.0, 3))
