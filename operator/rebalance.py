"""Pure rebalancing decisions: which pod goes first, and who sheds how many.

- Pod deletion cost (`controller.kubernetes.io/pod-deletion-cost`): a
  ReplicaSet removes the pods with the lowest cost first, so a pod's cost is
  its live connection count and a scale-down disconnects as few clients as
  possible. A pod with no registry entry costs 0 (it is starting, or gone).
- Shedding: after a scale-up the new pods are empty. Gateways holding more than
  `(1 + threshold) x mean` connections are asked to send `reconnect` to their
  excess over the mean, fullest first, within a budget per cycle so the
  reconnects arrive as a trickle, not a herd. Reconnecting clients land on
  pods the Service picks; a few land back on a full one, so the next cycles
  repeat with what is left.
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


def shed_plan(nodes: Iterable[NodeLoad], threshold: float, budget: int) -> dict[str, int]:
    """Node -> connections to shed now (empty when the fleet is balanced enough)."""
    active = [n for n in nodes if n.ready and not n.draining]
    if len(active) < 2 or budget <= 0:
        return {}
    mean = sum(n.connections for n in active) / len(active)
    limit = mean * (1.0 + threshold)
    plan: dict[str, int] = {}
    for node in sorted(active, key=lambda n: (-n.connections, n.node)):
        if node.connections <= limit or budget <= 0:
            break
        count = min(node.connections - math.ceil(mean), budget)
        if count > 0:
            plan[node.node] = count
            budget -= count
    return plan
