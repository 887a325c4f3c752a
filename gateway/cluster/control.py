"""Commands sent to one gateway on its control channel, encoded and decoded here only.

The operator sends `shed` (move `count` clients elsewhere) after a scale-up
and `drain` before removing a pod on its own; the gateway's node acts on
them. The server API (core/admin.py) sends a `request` to every gateway —
one of the `Action`s below — and each answers with a `reply` on the
asker's own control channel. A command that does not decode is refused
here, so no receiver ever sees a half-formed one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import orjson


@dataclass(frozen=True, slots=True)
class Shed:
    count: int


@dataclass(frozen=True, slots=True)
class Drain:
    pass


# -- the server API's actions: what each gateway does to its own connections --


@dataclass(frozen=True, slots=True)
class Disconnect:
    """Close the user's connections (one, with `client`), saying `reason`."""

    name: ClassVar[str] = "disconnect"
    user: str
    client: str | None = None
    reason: str = "disconnected by the server"
    reconnect: bool = False


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    name: ClassVar[str] = "unsubscribe"
    user: str
    channel: str
    client: str | None = None


@dataclass(frozen=True, slots=True)
class Subscribe:
    name: ClassVar[str] = "subscribe"
    user: str
    channel: str
    client: str | None = None


@dataclass(frozen=True, slots=True)
class ListChannels:
    """This gateway's channels matching `pattern` after `cursor`, sorted, at most `limit`."""

    name: ClassVar[str] = "channels"
    pattern: str = "*"
    cursor: str = ""
    limit: int = 100


@dataclass(frozen=True, slots=True)
class ListUsers:
    """Like ListChannels, for the users with connections here."""

    name: ClassVar[str] = "users"
    pattern: str = "*"
    cursor: str = ""
    limit: int = 100


Action = Disconnect | Unsubscribe | Subscribe | ListChannels | ListUsers
ACTIONS: dict[str, type[Action]] = {
    a.name: a for a in (Disconnect, Unsubscribe, Subscribe, ListChannels, ListUsers)
}
_TYPES = {"str": str, "str | None": (str, type(None)), "bool": bool, "int": int}


@dataclass(frozen=True, slots=True)
class Request:
    """An action for one gateway; it answers `Reply(id, ...)` to node `reply_to`."""

    id: str
    reply_to: str
    action: Action


@dataclass(frozen=True, slots=True)
class Reply:
    id: str
    node: str
    result: Any


Command = Shed | Drain | Request | Reply


def encode(command: Command) -> bytes:
    if isinstance(command, Shed):
        return orjson.dumps({"cmd": "shed", "count": command.count})
    if isinstance(command, Request):
        action = {"do": command.action.name, **dataclasses.asdict(command.action)}
        return orjson.dumps(
            {"cmd": "request", "id": command.id, "reply_to": command.reply_to, "action": action}
        )
    if isinstance(command, Reply):
        return orjson.dumps(
            {"cmd": "reply", "id": command.id, "node": command.node, "result": command.result}
        )
    return orjson.dumps({"cmd": "drain"})


def _action(body: Any) -> Action:
    if not isinstance(body, dict) or body.get("do") not in ACTIONS:
        raise ValueError("a request needs an action with a known 'do'")
    kind = ACTIONS[body["do"]]
    values = {}
    for f in dataclasses.fields(kind):
        if f.name not in body:
            if f.default is dataclasses.MISSING:
                raise ValueError(f"{kind.name} needs {f.name}")
            continue
        value = body[f.name]
        expected = _TYPES[str(f.type)]
        if not isinstance(value, expected) or (f.type == "int" and isinstance(value, bool)):
            raise ValueError(f"{kind.name}.{f.name} has the wrong type")
        values[f.name] = value
    return kind(**values)


def _text(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{body.get('cmd')} needs a non-empty string {key}")
    return value


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
    if cmd == "request":
        return Request(_text(body, "id"), _text(body, "reply_to"), _action(body.get("action")))
    if cmd == "reply":
        return Reply(_text(body, "id"), _text(body, "node"), body.get("result"))
    raise ValueError(f"unknown command {cmd!r}")
