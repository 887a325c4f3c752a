"""Pure rebalancing decisions: which pod goes first, and who sheds how many, when.

- Pod deletion cost (`controller.kubernetes.io/pod-deletion-cost`): a
  ReplicaSet removes the pods with the lowest cost first, so a pod's cost is
  its live connection count and a scale-down disconnects as few clients as
  possible. A pod with no registry entry costs 0 (it is starting, or gone).
- Shedding (`plan_shed`): after a scale-up the new pods are empty. While the
  fleet's imbalance (the largest distance of a gateway's count from the mean,
  over the mean) is above the threshold, gateways above the mean are asked to
  send `reconnect` to their excess, fullest first. Reconnecting clients land
  on pods the Service picks, some back on a full one, so it takes a few
  rounds; each round converges because:
  * it acts only on counts newer than its last shed: every gateway's registry
    record must be written at least `SETTLE_SECONDS` after it (the shed's
    reconnects have landed by then). The registry lags by its write interval
    (2 s); acting on older counts sheds clients that have already moved,
    which is how a 1 s reconcile interval overshot;
  * it paces itself by time, not per pass: `maxShedPerSecond` x the seconds
    since the last shed (at most `PACE_CAP_SECONDS` of it), so the reconcile
    interval changes how often it looks, not how fast clients move;
  * it stops inside the tolerance (imbalance <= threshold) and sheds only down
    to the mean, never below it, so no gateway is pushed under the others.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
_INT32_MAX = 2**31 - 1
# gateway.core.node.shed spreads its closes over 1 s and each client reconnects after
# at most 1.5 x 1.5 s: 3.25 s after the command every shed client has landed somewhere.
SETTLE_SECONDS = 4.0
# The most seconds of shedding budget one round may use (no herd after a quiet spell).
PACE_CAP_SECONDS = 5.0


@dataclass(frozen=True)
class NodeLoad:
    node: str
    connections: int
    ready: bool = True
    draining: bool = False
    updated: float = 0.0  # when the gateway wrote this record (unix time)


@dataclass(frozen=True)
class ShedPlan:
    shed: dict[str, int] = field(default_factory=dict)  # node -> connections to move now
    reason: str = ""
    imbalance: float = 0.0


def deletion_costs(pods: Iterable[str], connections: Mapping[str, int]) -> dict[str, int]:
    """Pod name -> deletion cost (its live connections; 0 when it does not report)."""
    return {pod: max(0, min(_INT32_MAX, int(connections.get(pod, 0)))) for pod in pods}


def imbalance(counts: Iterable[int]) -> float:
    """max |count - mean| / mean: 0 when balanced (11/19/19/20 is 0.36)."""
    counts = list(counts)
    if not counts:
        return 0.0
    mean = sum(counts) / len(counts)
    return 0.0 if mean <= 0 else max(abs(c - mean) for c in counts) / mean


def plan_shed(nodes: Iterable[NodeLoad], now: float, last_shed: float | None,
              threshold: float, rate: float, floor: int = 0) -> ShedPlan:
    """Who sheds how many now (see the module doc), with the reason when nobody does.

    Nothing moves while any gateway drains (its clients are moving already), nor
    from a gateway at or below `floor` connections: imbalance among lightly
    loaded gateways costs nothing, and moving clients is never free.
    """
    nodes = list(nodes)
    active = [n for n in nodes if n.ready and not n.draining]
    if len(active) < 2:
        return ShedPlan(reason="fewer than two ready gateways")
    if any(n.draining for n in nodes):
        return ShedPlan(reason="a gateway is draining")
    off = imbalance(n.connections for n in active)
    if off <= threshold:
        return ShedPlan(reason=f"balanced ({off:.0%} <= {threshold:.0%})", imbalance=off)
    if last_shed is not None:
        oldest = min(n.updated for n in active)
        if oldest < last_shed + SETTLE_SECONDS:
            return ShedPlan(reason="waiting for counts newer than the last shed",
                            imbalance=off)
    elapsed = PACE_CAP_SECONDS if last_shed is None else now - last_shed
    budget = int(rate * min(max(elapsed, 0.0), PACE_CAP_SECONDS))
    if budget <= 0:
        return ShedPlan(reason="pacing", imbalance=off)
    mean = sum(n.connections for n in active) / len(active)
    keep = max(math.ceil(mean), floor)
    plan: dict[str, int] = {}
    for node in sorted(active, key=lambda n: (-n.connections, n.node)):
        count = min(node.connections - keep, budget)
        if count <= 0 or budget <= 0:
            break
        plan[node.node] = count
        budget -= count
    if not plan:
        return ShedPlan(reason=f"no gateway above {keep} connections", imbalance=off)
    return ShedPlan(plan, f"imbalance {off:.0%} > {threshold:.0%}", off)
