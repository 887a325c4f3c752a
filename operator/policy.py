"""The scaling policy: a pure function from (spec, replicas, load, history, now) to a decision.

    recommendation = clamp(max(ceil(connections / targetConnectionsPerReplica),
                               ceil(msgs_out_per_s / targetMessagesPerReplica)),
                           minReplicas, maxReplicas)

- Up: at once, by at least `scaleUp.minStep` and at most `scaleUp.maxStep` replicas.
- Down: only when the highest recommendation seen over the last
  `scaleDown.stabilizationWindowSeconds` is below the current count, and only
  once the history covers the whole window; at most `scaleDown.step` at a time.
  Flapping load therefore never scales down: its peaks stay in the window.
- Stale or missing registry data (no fresh node at all) never scales anything
  but the min/max clamp; partial data (some pods not reporting) can scale up
  (the total it shows is a lower bound) but never down, and is not recorded.

No I/O, no clock: the caller passes `now` and keeps `history` (the operator
keeps it in the resource's status, so a restarted or failed-over operator
remembers the window).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from herald_operator.spec import ScalingSpec

# (unix time, recommended replicas), oldest first; a new entry only when the value changes.
History = tuple[tuple[float, int], ...]
# Bound on the history kept in status; dropping the oldest only delays a scale-down.
MAX_HISTORY = 120


@dataclass(frozen=True)
class Load:
    """What the registry says about the fleet right now."""

    connections: int
    msgs_out_per_s: float
    reporting: int  # pods with a fresh registry entry
    expected: int  # pods that should have one

    @property
    def complete(self) -> bool:
        return self.reporting > 0 and self.reporting >= self.expected


@dataclass(frozen=True)
class Decision:
    replicas: int
    direction: Literal["up", "down", "hold"]
    reason: str
    recommendation: int | None
    history: History


def clamp(value: int, spec: ScalingSpec) -> int:
    return max(spec.min_replicas, min(spec.max_replicas, value))


def recommend(spec: ScalingSpec, load: Load) -> int:
    """Replicas the load needs, within [min, max]."""
    by_connections = math.ceil(max(load.connections, 0) / spec.target_connections)
    by_messages = 0
    if spec.target_messages > 0:
        by_messages = math.ceil(max(load.msgs_out_per_s, 0.0) / spec.target_messages)
    return clamp(max(by_connections, by_messages), spec)


def record(history: History, now: float, value: int, window: float) -> History:
    """Append `value` if it changed; forget what fell out of the window but one entry."""
    entries = list(history)
    if not entries or entries[-1][1] != value:
        entries.append((now, value))
    cutoff = now - window
    # The newest entry at or before the cutoff still holds at the window's start: keep it.
    while len(entries) > 1 and entries[1][0] <= cutoff:
        entries.pop(0)
    return tuple(entries[-MAX_HISTORY:])


def stabilized(history: History, now: float, window: float) -> tuple[int, bool]:
    """(highest recommendation in the window, whether the history covers the window)."""
    cutoff = now - window
    relevant = [value for _, value in history]
    covered = bool(history) and history[0][0] <= cutoff
    return (max(relevant) if relevant else 0), covered


def decide(spec: ScalingSpec, current: int, load: Load | None, history: History,
           now: float) -> Decision:
    """The replica count to set now, and why."""
    bounded = clamp(current, spec)
    if load is None or load.reporting == 0:
        if bounded != current:
            return _clamped(current, bounded, spec, history)
        return Decision(current, "hold", "registry stale or empty: holding", None, history)

    rec = recommend(spec, load)
    if not load.complete:
        if rec > bounded:
            return _up(spec, current, rec, history,
                       f"{load.reporting}/{load.expected} pods reporting, already "
                       f"{load.connections} connections")
        if bounded != current:
            return _clamped(current, bounded, spec, history)
        return Decision(current, "hold",
                        f"{load.reporting}/{load.expected} pods reporting: "
                        "no scale-down on partial data", rec, history)

    history = record(history, now, rec, spec.down_window)
    load_text = f"{load.connections} connections, {load.msgs_out_per_s:.0f} msgs/s"
    if rec > bounded:
        return _up(spec, current, rec, history, load_text)
    if bounded != current:
        return _clamped(current, bounded, spec, history)
    if rec == current:
        return Decision(current, "hold", f"{load_text}: {current} replicas fit", rec, history)
    peak, covered = stabilized(history, now, spec.down_window)
    if peak >= current or not covered:
        return Decision(current, "hold",
                        f"{load_text}: {rec} would do, waiting out the "
                        f"{spec.down_window:.0f}s window (peak {peak})", rec, history)
    target = max(peak, current - spec.down_step)
    return Decision(target, "down",
                    f"{load_text}: at most {peak} needed for {spec.down_window:.0f}s, "
                    f"scaling down {current}->{target}", rec, history)


def _up(spec: ScalingSpec, current: int, rec: int, history: History, why: str) -> Decision:
    step = min(max(rec - current, spec.up_min_step), spec.up_max_step)
    target = clamp(current + step, spec)
    return Decision(target, "up", f"{why}: {rec} needed, scaling up {current}->{target}",
                    rec, history)


def _clamped(current: int, bounded: int, spec: ScalingSpec, history: History) -> Decision:
    direction: Literal["up", "down"] = "up" if bounded > current else "down"
    return Decision(bounded, direction,
                    f"{current} replicas is outside [{spec.min_replicas}, "
                    f"{spec.max_replicas}]: set to {bounded}", None, history)
