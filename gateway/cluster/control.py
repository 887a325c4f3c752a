"""Commands sent to one gateway on its control channel, encoded and decoded here only.

The operator sends `shed` (move `count` clients elsewhere) after a scale-up
and `drain` before removing a pod on its own; the gateway's node acts on
them. A command that does not decode is refused here, so no receiver ever
sees a half-formed one.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson


@dataclass(frozen=True, slots=True)
class Shed:
    count: int


@dataclass(frozen=True, slots=True)
class Drain:
    pass


Command = Shed | Drain


def encode(command: Command) -> bytes:
    if isinstance(command, Shed):
        return orjson.dumps({"cmd": "shed", "count": command.count})
    return orjson.dumps({"cmd": "drain"})


def decode(raw: bytes | str) -> Command:
    """The command in `raw`, or ValueError saying why it is not one."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ValueError("a command is a JSON object")
    cmd = body.get("cmd")
    if cmd == "shed":
        count = body.get("count")
        if not isinstance(count, int) or isinstance(count, bool) or count <= 0:
            raise ValueError("shed needs a positive integer count")
        return Shed(count)
    if cmd == "drain":
        return Drain()
    raise ValueError(f"unknown command {cmd!r}")
