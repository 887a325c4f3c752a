"""The scaling policy: a pure function from (spec, replicas, load, memory, now) to a decision.

Everything is in time units, as in the HPA v2 `behavior` field, so the
reconcile interval changes how often the operator looks, never how fast the
fleet scales:

    needed = max(connections / targetConnectionsPerReplica,
                 msgs_out_per_s / targetMessagesPerReplica)        (replicas, a real number)
    recommendation = current            when |needed / current - 1| <= tolerance
                     ceil(needed)       otherwise, clamped to [minReplicas, maxReplicas]

- Up: the lowest recommendation of the last `scaleUp.stabilizationWindowSeconds`
  (0: the current one), by at least `scaleUp.minStep`, and never more than
  `scaleUp.maxStep` replicas added within any `scaleUp.periodSeconds`.
- Down: the highest recommendation of the last `scaleDown.stabilizationWindowSeconds`,
  only once the history covers the whole window, and never more than
  `scaleDown.step` replicas removed within any `scaleDown.periodSeconds`.
  Flapping load therefore never scales down: its peaks stay in the window.
- The tolerance band keeps a fleet running a little above or below its target
  from scaling on noise (HPA's default is the same 10 %).
- Stale or missing registry data (no fresh node at all) never scales anything
  but the min/max clamp; partial data (some pods not reporting) can scale up
  (the total it shows is a lower bound) but never down, and is not recorded.

No I/O, no clock: the caller passes `now` and keeps the `Memory` (the
operator keeps it in the resource's status, so a restarted or failed-over
operator remembers its windows and its rate limits).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from herald_operator.spec import ScalingSpec

# (unix time, recommended replicas), oldest first; a new entry only when the value changes.
History = tuple[tuple[float, int], ...]
# (unix time, replicas added (+) or removed (-)): the scale changes the rate limits count.
Changes = tuple[tuple[float, int], ...]
# Bounds on what is kept in status; dropping the oldest only delays a scale-down.
MAX_HISTORY = 120
MAX_CHANGES = 60


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
class Memory:
    """What the policy remembers between passes (kept in the resource's status)."""

    history: History = ()
    changes: Changes = ()


@dataclass(frozen=True)
class Decision:
    replicas: int
    direction: Literal["up", "down", "hold"]
    reason: str
    recommendation: int | None
    memory: Memory


def clamp(value: int, spec: ScalingSpec) -> int:
    return max(spec.min_replicas, min(spec.max_replicas, value))


def needed(spec: ScalingSpec, load: Load) -> float:
    """Replicas the load needs, as a real number (the larger of the two targets)."""
    by_connections = max(load.connections, 0) / spec.target_connections
    by_messages = 0.0
    if spec.target_messages > 0:
        by_messages = max(load.msgs_out_per_s, 0.0) / spec.target_messages
    return max(by_connections, by_messages)


def recommend(spec: ScalingSpec, load: Load, current: int | None = None) -> int:
    """Replicas the load needs, within [min, max]; `current` while within the tolerance."""
    want = needed(spec, load)
    if current and abs(want / current - 1.0) <= spec.tolerance:
        return clamp(current, spec)
    return clamp(math.ceil(want - 1e-9), spec)


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


def in_window(history: History, now: float, window: float) -> tuple[list[int], bool]:
    """(recommendations that held during the last `window` seconds, whether the
    history covers the whole window)."""
    cutoff = now - window
    values = [value for i, (t, value) in enumerate(history)
              if t >= cutoff or i + 1 == len(history) or history[i + 1][0] > cutoff]
    return values, bool(history) and history[0][0] <= cutoff


def stabilized(history: History, now: float, window: float) -> tuple[int, bool]:
    """(highest recommendation in the window, whether the history covers the window)."""
    values, covered = in_window(history, now, window)
    return (max(values) if values else 0), covered


def allowance(changes: Changes, now: float, period: float, limit: int, sign: int) -> int:
    """Replicas that may still be added (sign +1) or removed (-1) now: `limit` per any
    `period` seconds, minus what the last `period` seconds already changed that way."""
    used = sum(abs(delta) for t, delta in changes if t > now - period and delta * sign > 0)
    return max(0, limit - used)


def _note(changes: Changes, now: float, delta: int, keep: float) -> Changes:
    kept = [(t, d) for t, d in changes if t > now - keep]
    if delta:
        kept.append((now, delta))
    return tuple(kept[-MAX_CHANGES:])


def decide(spec: ScalingSpec, current: int, load: Load | None, memory: Memory,
           now: float) -> Decision:
    """The replica count to set now, and why."""
    keep = max(spec.up_period, spec.down_period)
    memory = Memory(memory.history, _note(memory.changes, now, 0, keep))
    bounded = clamp(current, spec)
    if load is None or load.reporting == 0:
        if bounded != current:
            return _clamped(current, bounded, spec, memory)
        return Decision(current, "hold", "registry stale or empty: holding", None, memory)

    rec = recommend(spec, load, current)
    if not load.complete:
        if rec > bounded:
            return _up(spec, current, rec, memory, now,
                       f"{load.reporting}/{load.expected} pods reporting, already "
                       f"{load.connections} connections")
        if bounded != current:
            return _clamped(current, bounded, spec, memory)
        return Decision(current, "hold",
                        f"{load.reporting}/{load.expected} pods reporting: "
                        "no scale-down on partial data", rec, memory)

    window = max(spec.down_window, spec.up_window)
    memory = Memory(record(memory.history, now, rec, window), memory.changes)
    load_text = f"{load.connections} connections, {load.msgs_out_per_s:.0f} msgs/s"
    if rec > bounded:
        lowest = rec
        if spec.up_window > 0:
            values, covered = in_window(memory.history, now, spec.up_window)
            # Before the history starts, the fleet ran at `current`: a window not yet
            # covered holds that too (a just-started operator does not jump on one sample).
            lowest = min(values + ([] if covered else [bounded]))
        if lowest > bounded:
            return _up(spec, current, lowest, memory, now, load_text)
        return Decision(current, "hold",
                        f"{load_text}: {rec} needed, waiting out the {spec.up_window:.0f}s "
                        f"scale-up window (lowest {lowest})", rec, memory)
    if bounded != current:
        return _clamped(current, bounded, spec, memory)
    if rec == current:
        return Decision(current, "hold", f"{load_text}: {current} replicas fit", rec, memory)
    peak, covered = stabilized(memory.history, now, spec.down_window)
    if peak >= current or not covered:
        return Decision(current, "hold",
                        f"{load_text}: {rec} would do, waiting out the "
                        f"{spec.down_window:.0f}s window (peak {peak})", rec, memory)
    room = allowance(memory.changes, now, spec.down_period, spec.down_step, -1)
    if room == 0:
        return Decision(current, "hold",
                        f"{load_text}: {peak} would do, {spec.down_step} removed in the last "
                        f"{spec.down_period:.0f}s already", rec, memory)
    target = max(peak, current - room)
    return Decision(target, "down",
                    f"{load_text}: at most {peak} needed for {spec.down_window:.0f}s, "
                    f"scaling down {current}->{target}", rec,
                    Memory(memory.history, _note(memory.changes, now, target - current, keep)))


def _up(spec: ScalingSpec, current: int, rec: int, memory: Memory, now: float,
        why: str) -> Decision:
    room = allowance(memory.changes, now, spec.up_period, spec.up_max_step, +1)
    if room == 0:
        return Decision(current, "hold",
                        f"{why}: {rec} needed, {spec.up_max_step} added in the last "
                        f"{spec.up_period:.0f}s already", rec, memory)
    step = min(max(rec - current, spec.up_min_step), room)
    target = clamp(current + step, spec)
    keep = max(spec.up_period, spec.down_period)
    return Decision(target, "up", f"{why}: {rec} needed, scaling up {current}->{target}", rec,
                    Memory(memory.history, _note(memory.changes, now, target - current, keep)))


def _clamped(current: int, bounded: int, spec: ScalingSpec, memory: Memory) -> Decision:
    direction: Literal["up", "down"] = "up" if bounded > current else "down"
    return Decision(bounded, direction,
                    f"{current} replicas is outside [{spec.min_replicas}, "
                    f"{spec.max_replicas}]: set to {bounded}", None, memory)
