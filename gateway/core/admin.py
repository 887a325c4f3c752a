"""The server API's actions, carried out on every gateway of the cluster.

A backend (API key) asks one gateway; that gateway sends the action to every
live node in the registry over their control channels (gateway.cluster.control
`Request`), does it itself, and gathers each node's `Reply` for up to
`GATHER_TIMEOUT` seconds. The answer names the nodes that did not reply
(`missing`), so a partial result is never passed off as a whole one.

Listings page by name: every node returns its first `limit` matches after
`cursor`, sorted, and the merge keeps the first `limit` of the union, which
is exact — a name among the first `limit` overall is among the first
`limit` of every node that has it.

Every action is written to the audit log (gateway.telemetry.audit) by its handler.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
from collections import Counter
from typing import TYPE_CHECKING, Any

from gateway.cluster import control
from gateway.protocol import frames
from gateway.protocol.channels import claim_allows
from gateway.protocol.errors import BrokerUnavailable, CloseCode, ProtocolError

if TYPE_CHECKING:
    from gateway.core.node import Node
    from gateway.core.session import Session

log = logging.getLogger("herald.admin")

GATHER_TIMEOUT = 2.0
MAX_LIMIT = 1000
MAX_REASON = 120  # a WebSocket close reason holds at most 123 bytes


def page(counts: dict[str, int], pattern: str, cursor: str, limit: int) -> list[list[Any]]:
    """The first `limit` names after `cursor` matching `pattern`, with their counts."""
    names = sorted(n for n in counts if n > cursor and claim_allows([pattern], n))
    return [[n, counts[n]] for n in names[:limit]]


class Admin:
    def __init__(self, node: Node) -> None:
        self.node = node
        self._waiting: dict[str, tuple[asyncio.Future[None], dict[str, Any]]] = {}

    # -- asking the cluster ----------------------------------------------------

    async def run(self, action: control.Action) -> dict[str, Any]:
        """Do `action` here and on every other live node; each node's result by id."""
        node = self.node
        try:
            peers = [r.node for r in await node.directory.read() if r.node != node.id]
        except BrokerUnavailable as exc:
            raise ProtocolError("unavailable", f"registry unavailable: {exc}") from None
        results: dict[str, Any] = {node.id: await self.apply(action)}
        if not peers:
            return {"results": results, "missing": []}
        rid = secrets.token_hex(8)
        done = asyncio.get_running_loop().create_future()
        self._waiting[rid] = (done, {"peers": set(peers), "results": results})
        try:
            request = control.Request(rid, node.id, action)
            for peer in peers:
                try:
                    await node.directory.send(peer, request)
                except BrokerUnavailable:
                    pass  # reported below as missing
            try:
                await asyncio.wait_for(asyncio.shield(done), GATHER_TIMEOUT)
            except TimeoutError:
                pass
        finally:
            self._waiting.pop(rid, None)
        return {"results": results, "missing": sorted(set(peers) - set(results))}

    def on_reply(self, reply: control.Reply) -> None:
        waiting = self._waiting.get(reply.id)
        if waiting is None:
            return  # late, after the gather gave up
        done, state = waiting
        if reply.node in state["peers"]:
            state["results"][reply.node] = reply.result
            if state["peers"] <= set(state["results"]) and not done.done():
                done.set_result(None)

    def on_request(self, request: control.Request) -> None:
        self.node.spawn(self._answer(request))

    async def _answer(self, request: control.Request) -> None:
        try:
            result = await self.apply(request.action)
        except ProtocolError as exc:
            result = {"error": exc.code, "message": exc.message}
        try:
            await self.node.directory.send(
                request.reply_to, control.Reply(request.id, self.node.id, result)
            )
        except BrokerUnavailable as exc:
            log.warning("admin reply to %s lost: %s", request.reply_to, exc)

    async def listing(
        self, kind: type[control.ListChannels | control.ListUsers], pattern: str, cursor: str,
        limit: int,
    ) -> dict[str, Any]:
        """One page of the cluster's channels or users, by name, with counts."""
        gathered = await self.run(kind(pattern, cursor, limit + 1))
        items, more = merge_pages(gathered["results"], limit)
        return {
            "items": items,
            "next": items[-1][0] if more and items else None,
            "missing": gathered["missing"],
        }

    # -- doing it on this node -------------------------------------------------

    def _sessions(self, user: str, client: str | None) -> list[Session]:
        return [
            s for s in self.node.sessions
            if s.claims.sub == user and (client is None or s.id == client)
        ]

    async def apply(self, action: control.Action) -> Any:
        node = self.node
        if isinstance(action, control.Disconnect):
            victims = self._sessions(action.user, action.client)
            reason = action.reason[:MAX_REASON]
            for session in victims:
                if action.reconnect:
                    after_ms = int(random.uniform(500, 1500))
                    session.send_json(frames.reconnect(reason, after_ms))
                    session.close(CloseCode.RESTARTING, reason)
                else:
                    session.close(CloseCode.DISCONNECTED, reason)
                node.metrics.disconnected.labels(str(action.reconnect).lower()).inc()
            return {"connections": len(victims)}
        if isinstance(action, control.Unsubscribe):
            done = 0
            for session in self._sessions(action.user, action.client):
                if action.channel in session.subscriptions:
                    await node.unsubscribe(session, action.channel)
                    session.send_json(
                        {"type": "unsubscribed", "channel": action.channel, "reason": "server"}
                    )
                    done += 1
            return {"connections": done}
        if isinstance(action, control.Subscribe):
            done = 0
            for session in self._sessions(action.user, action.client):
                try:
                    await node.subscribe(session, action.channel, None, None, check=False)
                except ProtocolError as exc:  # told to the client; not counted
                    session.send_json(frames.error(exc.code, exc.message, channel=action.channel))
                    continue
                done += 1
            return {"connections": done}
        if isinstance(action, control.ListChannels):
            return page(node.hub.counts(), action.pattern, action.cursor, action.limit)
        users = Counter(s.claims.sub for s in node.sessions)
        return page(dict(users), action.pattern, action.cursor, action.limit)


def merge_pages(results: dict[str, Any], limit: int) -> tuple[list[list[Any]], bool]:
    """Nodes' pages (each up to `limit + 1` long) merged: the first `limit` names with
    summed counts, and whether more follow."""
    total: Counter[str] = Counter()
    for items in results.values():
        if isinstance(items, list):
            for name, count in items:
                total[name] += count
    names = sorted(total)
    return [[n, total[n]] for n in names[:limit]], len(names) > limit
