"""An asyncio client for services and tests that consume Herald updates.

    async with HeraldClient("http://herald:8080", token=tok, get_token=fresh) as client:
        client.subscribe("job:42", on_message=print, on_state=print)
        async for update in client.updates():
            ...

It behaves like the browser client (`/client.js`): it reconnects with capped
exponential backoff and full jitter, resubscribes every channel with
`since`, and hands each channel's publications over once each and in
offset order across reconnects and gateway restarts. When the history no
longer reaches back (`recovered: false`, a new epoch), the channel's
`on_state` gets the current snapshot instead. A gap seen on a live
connection (possible after the automatic `user:{sub}` subscription) is
filled from the HTTP history before anything newer is handed over.

It speaks WebSocket only: services are not behind the browser proxies that
make the SSE and polling fallbacks necessary.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
import websockets
from tornado.httpclient import AsyncHTTPClient, HTTPClientError

__all__ = ["HeraldClient", "Update", "backoff_delay"]

log = logging.getLogger("herald.client")

Callback = Callable[..., Any]


def backoff_delay(
    attempt: int, base: float, cap: float, rand: Callable[[], float] = random.random
) -> float:
    """Capped exponential backoff with full jitter: uniform in [0, min(cap, base * 2^n)]."""
    return rand() * min(cap, base * 2 ** min(attempt, 30))


@dataclass(frozen=True, slots=True)
class Update:
    """One thing that happened on a channel: a `message`, or a `state` (snapshot, reset)."""

    kind: Literal["message", "state"]
    channel: str
    epoch: str
    offset: int
    event: str | None = None
    data: Any = None
    reset: bool = False


@dataclass
class _Channel:
    name: str
    epoch: str | None = None
    offset: int | None = None
    on_message: list[Callback] = field(default_factory=list)
    on_state: list[Callback] = field(default_factory=list)
    on_error: list[Callback] = field(default_factory=list)
    wanted: bool = True  # False: followed (the automatic user:{sub}) but not asked for

    @property
    def known(self) -> bool:
        return self.epoch is not None and self.offset is not None


class AuthFailed(Exception):
    """The gateway refused the token and no `get_token` can replace it."""


class Disconnected(Exception):
    """The server API closed the connection for good (4003): the client stays offline."""


class HeraldError(Exception):
    """An `error` frame answering an `rpc` or `publish` (`code` as in the protocol).

    `unavailable` with "connection lost" means the outcome is unknown: the
    connection dropped before the answer came.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class HeraldClient:
    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        get_token: Callable[[], Awaitable[str]] | None = None,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        refresh_before: float = 60.0,
        open_timeout: float = 10.0,
        history_limit: int = 1000,
        max_pending: int = 10000,
        on_state_change: Callable[[str], Any] | None = None,
    ) -> None:
        if token is None and get_token is None:
            raise ValueError("give a token or a get_token callable")
        self.url = url.rstrip("/")
        self.ws_url = "ws" + self.url[len("http"):] + "/ws" if self.url.startswith("http") else url
        self.token = token
        self.get_token = get_token
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.refresh_before = refresh_before
        self.open_timeout = open_timeout
        self.history_limit = history_limit
        self.on_state_change = on_state_change
        self.state: str = "offline"
        self.failure: Exception | None = None  # why the client gave up, if it did
        self.user: str | None = None
        self.stats = {"reconnects": 0, "duplicates": 0, "gaps_filled": 0, "resets": 0}
        self._channels: dict[str, _Channel] = {}
        self._ws: Any = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._planned_delay: float | None = None
        self._connected = asyncio.Event()
        # Bounded: a slow iterator stalls reading, the gateway then cuts the
        # connection (4008) and the client recovers by offset. Nothing is lost.
        self._queue: asyncio.Queue[Update] = asyncio.Queue(max_pending)
        self._iterating = False
        self._next_id = 1
        self._pending: dict[int, str] = {}
        # rpc / publish requests waiting for their answer, by id.
        self._calls: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._http = AsyncHTTPClient()
        self._tasks: set[asyncio.Task[None]] = set()

    # -- public API -------------------------------------------------------

    def subscribe(
        self,
        channel: str,
        on_message: Callback | None = None,
        on_state: Callback | None = None,
        on_error: Callback | None = None,
    ) -> None:
        """Watch `channel`; callbacks (plain or async) get `Update`s / the error frame."""
        ch = self._channels.get(channel)
        fresh = ch is None
        if ch is None:
            ch = self._channels[channel] = _Channel(channel)
        ch.wanted = True
        for lst, cb in ((ch.on_message, on_message), (ch.on_state, on_state),
                        (ch.on_error, on_error)):
            if cb is not None:
                lst.append(cb)
        if fresh and self._ws is not None and self.state == "connected":
            task = asyncio.ensure_future(self._send_subscribe(ch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def unsubscribe(self, channel: str) -> None:
        if self._channels.pop(channel, None) is not None and self._ws is not None:
            with contextlib.suppress(websockets.ConnectionClosed):
                await self._send({"type": "unsubscribe", "channel": channel})

    async def rpc(self, method: str, params: Any = None) -> Any:
        """Ask the application's backend (its RPC hook); returns its result.

        Raises `HeraldError` with the gateway's code (`not_found`: no RPC hook,
        `unavailable`: the backend could not answer, or the backend's own
        code). Waits for a connection first: wrap in `asyncio.timeout` to bound it.
        """
        reply = await self._request({"type": "rpc", "method": method, "params": params})
        return reply.get("result")

    async def publish(self, channel: str, event: str, data: Any) -> dict[str, Any]:
        """Publish as this client, where the namespace allows it; the `published` frame
        (`channel`, `epoch`, `offset`). Raises `HeraldError` like `rpc`."""
        return await self._request(
            {"type": "publish", "channel": channel, "event": event, "data": data}
        )

    async def _request(self, frame: dict[str, Any]) -> dict[str, Any]:
        await self._connected.wait()
        rid = self._next_id
        self._next_id += 1
        future = self._calls[rid] = asyncio.get_running_loop().create_future()
        try:
            await self._send({**frame, "id": rid})
            return await future
        finally:
            self._calls.pop(rid, None)

    def _fail_calls(self) -> None:
        for future in self._calls.values():
            if not future.done():
                future.set_exception(HeraldError("unavailable", "connection lost"))

    def position(self, channel: str) -> tuple[str, int] | None:
        """The (epoch, offset) of the last update handed over for `channel`."""
        ch = self._channels.get(channel)
        return (ch.epoch, ch.offset) if ch and ch.known else None  # type: ignore[return-value]

    async def start(self) -> HeraldClient:
        if self._task is None:
            self._closing = False
            self._set_state("connecting")
            self._task = asyncio.ensure_future(self._run())
        return self

    async def wait_connected(self) -> None:
        """Until the client is connected (wrap in `asyncio.wait_for` to bound it)."""
        await self._connected.wait()

    async def close(self) -> None:
        self._closing = True
        task, self._task = self._task, None
        if self._ws is not None:
            await self._ws.close()
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._set_state("offline")

    async def __aenter__(self) -> HeraldClient:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def updates(self) -> AsyncIterator[Update]:
        """Every update of every subscribed channel, in order per channel."""
        self._iterating = True
        try:
            while True:
                yield await self._queue.get()
        finally:
            self._iterating = False

    # -- connection loop --------------------------------------------------

    def _set_state(self, state: str) -> None:
        if state != self.state:
            self.state = state
            if state != "connected":
                self._connected.clear()
            if self.on_state_change is not None:
                self.on_state_change(state)

    async def _token(self) -> str:
        if self.token is None:
            assert self.get_token is not None
            self.token = await self.get_token()
        return self.token

    async def _run(self) -> None:
        attempt = 0
        while not self._closing:
            code: int | None = None
            try:
                token = await self._token()
                async with websockets.connect(
                    self.ws_url,
                    additional_headers={"Authorization": f"Bearer {token}"},
                    open_timeout=self.open_timeout,
                    max_size=None,
                ) as ws:
                    self._ws = ws
                    try:
                        await self._serve(ws)
                        attempt = 0
                    finally:
                        self._ws = None
                    code = ws.close_code
            except websockets.ConnectionClosed as exc:
                code = exc.rcvd.code if exc.rcvd else None
            except (OSError, TimeoutError, websockets.InvalidHandshake) as exc:
                log.debug("connect failed: %s", exc)
            if self._closing:
                break
            if code == 4003:
                self.failure = Disconnected("disconnected by the server; not reconnecting (4003)")
                self._set_state("offline")
                return
            if code == 4001:
                if self.get_token is None:
                    self.failure = AuthFailed("the gateway refused the token (4001)")
                    self._set_state("offline")
                    return
                self.token = None
            self._set_state("reconnecting")
            self.stats["reconnects"] += 1
            delay = self._planned_delay
            self._planned_delay = None
            if delay is None:
                delay = backoff_delay(attempt, self.backoff_initial, self.backoff_max)
                attempt += 1
            await asyncio.sleep(delay)

    async def _serve(self, ws: Any) -> None:
        """One connection: `connected`, resubscribe with `since`, then every frame in order."""
        refresher: asyncio.Task[None] | None = None
        try:
            async for raw in ws:
                frame = orjson.loads(raw)
                if frame.get("type") == "connected":
                    self.user = frame.get("user")
                    self._set_state("connected")
                    self._connected.set()
                    for ch in list(self._channels.values()):
                        if ch.name != f"user:{self.user}":  # that one is automatic
                            await self._send_subscribe(ch)
                    refresher = self._schedule_refresh(refresher, frame.get("expires"))
                elif frame.get("type") == "authenticated":
                    refresher = self._schedule_refresh(refresher, frame.get("expires"))
                else:
                    await self._on_frame(frame)
        finally:
            if refresher is not None:
                refresher.cancel()
            self._fail_calls()

    def _schedule_refresh(
        self, old: asyncio.Task[None] | None, expires: float | None
    ) -> asyncio.Task[None] | None:
        if old is not None:
            old.cancel()
        if not expires or self.get_token is None:
            return None
        return asyncio.ensure_future(self._refresh(expires - self.refresh_before - time.time()))

    async def _refresh(self, delay: float) -> None:
        await asyncio.sleep(max(0.0, delay))
        assert self.get_token is not None
        self.token = await self.get_token()
        await self._send({"type": "auth", "token": self.token})

    async def _send(self, frame: dict[str, Any]) -> None:
        if self._ws is not None:
            await self._ws.send(orjson.dumps(frame).decode())

    async def _send_subscribe(self, ch: _Channel) -> None:
        rid = self._next_id
        self._next_id += 1
        self._pending[rid] = ch.name
        frame: dict[str, Any] = {"type": "subscribe", "channel": ch.name, "id": rid}
        if ch.known:
            frame["since"] = {"epoch": ch.epoch, "offset": ch.offset}
        await self._send(frame)

    # -- frames -----------------------------------------------------------

    async def _on_frame(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        call = self._calls.get(frame.get("id")) if "id" in frame else None  # type: ignore[arg-type]
        if call is not None and kind in ("rpc", "published", "error"):
            if call.done():
                return
            if kind == "error":
                call.set_exception(HeraldError(frame.get("code", ""), frame.get("message", "")))
            else:
                call.set_result(frame)
            return
        if kind == "message":
            await self._on_message(frame)
        elif kind == "subscribed":
            await self._on_subscribed(frame)
        elif kind == "reconnect":
            self._planned_delay = max(0, frame.get("after_ms") or 0) / 1000
        elif kind == "error":
            name = frame.get("channel") or self._pending.pop(frame.get("id"), None)  # type: ignore[arg-type]
            ch = self._channels.get(name) if name else None
            if ch is not None:
                for cb in ch.on_error:
                    await _call(cb, frame)
            log.warning("herald error %s: %s", frame.get("code"), frame.get("message"))

    async def _on_subscribed(self, frame: dict[str, Any]) -> None:
        self._pending.pop(frame.get("id"), None)  # type: ignore[arg-type]
        name = frame["channel"]
        ch = self._channels.get(name)
        if ch is None:
            ch = self._channels[name] = _Channel(name, wanted=False)
        if frame.get("recovered") is True:
            return  # the replay follows
        if frame.get("recovered") is None and ch.known and frame["epoch"] == ch.epoch:
            # A plain subscribe (the automatic user:{sub} one) on a channel we follow.
            if frame["offset"] > (ch.offset or 0):
                await self._fill(ch)
            return
        await self._reset(ch, frame["epoch"], frame["offset"], frame.get("state"))

    async def _reset(self, ch: _Channel, epoch: str, offset: int, state: Any) -> None:
        reset = ch.known
        if reset:
            self.stats["resets"] += 1
        ch.epoch, ch.offset = epoch, offset
        update = Update("state", ch.name, epoch, offset, data=state, reset=reset)
        for cb in ch.on_state:
            await _call(cb, update)
        await self._emit(ch, update)

    async def _on_message(self, frame: dict[str, Any], *, filling: bool = False) -> None:
        ch = self._channels.get(frame["channel"])
        if ch is None:
            return
        if ch.epoch != frame["epoch"]:
            ch.epoch, ch.offset = frame["epoch"], 0  # a new epoch: what came before is void
        offset = frame["offset"]
        if ch.offset is not None and offset <= ch.offset:
            self.stats["duplicates"] += 1
            return
        if ch.offset is not None and offset > ch.offset + 1 and not filling:
            await self._fill(ch)
            if ch.offset is not None and offset <= ch.offset:
                return  # the fill brought it
            if ch.offset is not None and offset > ch.offset + 1:
                # Still a hole: this message is past what history holds. Keep
                # the stream honest: reconnect and recover by offset.
                if self._ws is not None:
                    await self._ws.close(4000, "gap")
                return
        ch.offset = offset
        update = Update("message", ch.name, frame["epoch"], offset, frame.get("event"),
                        frame.get("data"))
        for cb in ch.on_message:
            await _call(cb, update)
        await self._emit(ch, update)

    async def _fill(self, ch: _Channel) -> None:
        """Catch up over HTTP: the history after our offset, or the state if it is gone."""
        self.stats["gaps_filled"] += 1
        base = f"{self.url}/api/v1/channels/{ch.name}"
        headers = {"Authorization": f"Bearer {self.token}"}
        try:
            resp = await self._http.fetch(
                f"{base}/history?since={ch.offset}&limit={self.history_limit}", headers=headers
            )
            body = orjson.loads(resp.body)
            if body["epoch"] == ch.epoch and body["complete"]:
                for msg in body["messages"]:
                    await self._on_message(msg, filling=True)
                return
            resp = await self._http.fetch(f"{base}/state", headers=headers)
            body = orjson.loads(resp.body)
            await self._reset(ch, body["epoch"], body["offset"], body.get("state"))
        except (HTTPClientError, OSError) as exc:
            log.warning("catching up %s failed: %s", ch.name, exc)

    async def _emit(self, ch: _Channel, update: Update) -> None:
        if self._iterating and ch.wanted:
            await self._queue.put(update)


async def _call(cb: Callback, arg: Any) -> None:
    result = cb(arg)
    if inspect.isawaitable(result):
        await result
