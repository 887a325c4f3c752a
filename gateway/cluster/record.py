"""A gateway's entry in the node registry: the figures the operator scales on.

Written by every gateway every `INTERVAL` seconds (gateway.core.registry),
read by the operator and `GET /api/v1/cluster`. An entry counts while it is
younger than `TTL`: a gateway that stopped writing is gone, within one TTL,
for every reader alike (one window, not two kept equal by hand).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

INTERVAL = 2.0
TTL = 10.0


@dataclass(frozen=True, slots=True)
class NodeRecord:
    node: str
    pod: str = ""
    ip: str = ""
    connections: int = 0
    subscriptions: int = 0
    channels: int = 0
    msgs_in_per_s: float = 0.0
    msgs_out_per_s: float = 0.0
    broker_msgs_in_per_s: float = 0.0
    draining: bool = False
    ready: bool = True
    updated: float = 0.0

    @property
    def name(self) -> str:
        """The pod this node runs in (node ids are pod names in the operator's Deployments)."""
        return self.pod or self.node

    def fresh(self, now: float) -> bool:
        return self.updated >= now - TTL

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def parse(cls, raw: Any) -> NodeRecord:
        """A record from JSON another process wrote; raises ValueError when unusable.

        Counts that are missing, negative or not finite read as 0: a bad
        figure must never look like load (or like none) to the scaler.
        """
        if not isinstance(raw, dict) or not raw.get("node"):
            raise ValueError("a node record needs a node id")

        def number(key: str) -> float:
            try:
                value = float(raw.get(key) or 0)
            except (TypeError, ValueError):
                return 0.0
            return value if math.isfinite(value) and value >= 0 else 0.0

        return cls(
            node=str(raw["node"]),
            pod=str(raw.get("pod") or ""),
            ip=str(raw.get("ip") or ""),
            connections=int(number("connections")),
            subscriptions=int(number("subscriptions")),
            channels=int(number("channels")),
            msgs_in_per_s=number("msgs_in_per_s"),
            msgs_out_per_s=number("msgs_out_per_s"),
            broker_msgs_in_per_s=number("broker_msgs_in_per_s"),
            draining=bool(raw.get("draining", False)),
            ready=bool(raw.get("ready", True)),
            updated=number("updated"),
        )
