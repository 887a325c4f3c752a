"""Pure rebalancing decisions: which pod goes first, and who sheds how many.

- Pod deletion cost (`controller.kubernetes.io/pod-deletion-cost`): a
  ReplicaSet removes the pods with the lowest cost first, so a pod's cost is
  its live connection count and a scale-down disconnects as few clients as
  possible. A pod with no registry entry costs 0 (it is starting, or gone).
- Shedding: after a scale-up the new pods are empty. Gateways holding more than
  `(1 + threshold) x mean` connections (and more than half their target) are
  asked to send `reconnect` to their excess over the mean, fullest first,
  within a budget per cycle so the reconnects arrive as a trickle, not a herd.
  Reconnecting clients land on pods the Service picks; a few land back on a
  full one, so the next cycles repeat with what is left.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
_INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class NodeLoad:
    node: str
    connections: int
    ready: bool = True
    draining: bool = False


def deletion_costs(pods: Iterable[str], connections: Mapping[str, int]) -> dict[str, int]:
    """Pod name -> deletion cost (its live connections; 0 when it does not report)."""
    return {pod: max(0, min(_INT32_MAX, int(connections.get(pod, 0)))) for pod in pods}


def shed_plan(nodes: Iterable[NodeLoad], threshold: float, budget: int,
              floor: int = 0) -> dict[str, int]:
    """Node -> connections to shed now (empty when the fleet is balanced enough).

    Nothing moves while any gateway drains (its clients are moving already), nor
    from a gateway at or below `floor` connections: imbalance among lightly
    loaded gateways costs nothing, and moving clients is never free.
    """
    nodes = list(nodes)
    active = [n for n in nodes if n.ready and not n.draining]
    if len(active) < 2 or budget <= 0 or any(n.draining for n in nodes):
        return {}
    mean = sum(n.connections for n in active) / len(active)
    limit = max(mean * (1.0 + threshold), floor)
    keep = max(math.ceil(mean), floor)
    plan: dict[str, int] = {}
    for node in sorted(active, key=lambda n: (-n.connections, n.node)):
        if node.connections <= limit or budget <= 0:
            break
        count = min(node.connections - keep, budget)
        if count > 0:
            plan[node.node] = count
            budget -= count
    return plan
