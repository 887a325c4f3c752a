"""Where the node registry and the control channel live in Redis.

    {prefix}node:<id>      string  the node's record (JSON), expires after `record.TTL`
    {prefix}nodes          zset    node id -> time of its last write
    {prefix}control:<id>   pub/sub the node's control commands

The per-channel keys are the engine's own (`gateway.broker.redis_scripts`);
only these three are shared with the operator.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RegistryKeys:
    prefix: str = "herald:"

    def node(self, node_id: str) -> str:
        return f"{self.prefix}node:{node_id}"

    @property
    def nodes(self) -> str:
        return f"{self.prefix}nodes"

    def control(self, node_id: str) -> str:
        return f"{self.prefix}control:{node_id}"
