"""A real application backend for the hook tests: a small Tornado app on loopback.

It answers Herald's hook calls (docs/hooks.md) the way a test sets per hook:

    backend.on("subscribe", Reject("forbidden", "not your job"))
    backend.on("rpc", Delay(10))            # longer than HERALD_HOOK_TIMEOUT
    backend.on("publish", Status(503))
    backend.on("connect", Malformed(b"<html>"))
    backend.on("rpc", lambda req: Accept({"sum": sum(req["params"])}))
    backend.on("subscribe", lambda req: Status(500) if req["user"] == "x" else None)

With no rule a hook behaves like a plain application: connect and publish
accept, refresh extends by a minute, rpc `echo` returns its params, and
subscribe decides `job:` channels from the backend's own table of jobs
(`backend.jobs[job_id] = owner`), the way an app whose jobs are rows in its
database would. Every request is kept (`backend.calls[hook]`) with its
headers, so tests can check what Herald sent.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from tornado.httpserver import HTTPServer
from tornado.web import Application, RequestHandler


@dataclass(frozen=True)
class Accept:
    result: Any = None


@dataclass(frozen=True)
class Reject:
    code: str
    message: str = ""


@dataclass(frozen=True)
class Delay:
    """Answer `then` after `seconds` (a backend slower than Herald's timeout)."""

    seconds: float
    then: Any = field(default_factory=Accept)


@dataclass(frozen=True)
class Status:
    code: int


@dataclass(frozen=True)
class Malformed:
    body: bytes


Rule = Accept | Reject | Delay | Status | Malformed | Callable[[dict[str, Any]], Any]


@dataclass
class Call:
    body: dict[str, Any]
    headers: dict[str, str]


class Backend:
    def __init__(self) -> None:
        self.rules: dict[str, Rule] = {}
        self.calls: dict[str, list[Call]] = {}
        self.jobs: dict[str, str] = {}
        self.port = 0
        self._server: HTTPServer | None = None
        # Calls answered so far (a delayed one counts when it answers).
        self.answered = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/herald"

    def on(self, hook: str, rule: Rule) -> None:
        self.rules[hook] = rule

    def reset(self) -> None:
        self.rules.clear()
        self.calls.clear()

    def settings(self, **overrides: Any) -> dict[str, Any]:
        """Gateway settings with every hook pointed here (`HERALD_HOOK_*` as fields)."""
        values: dict[str, Any] = {
            "hook_url": self.url,
            "hook_connect_path": "connect",
            "hook_refresh_path": "refresh",
            "hook_subscribe_path": "subscribe",
            "hook_publish_path": "publish",
            "hook_rpc_path": "rpc",
            "hook_timeout": 0.5,
        }
        values.update(overrides)
        return values

    def env(self, **overrides: Any) -> dict[str, str]:
        """The same, as `HERALD_*` variables for a gateway process."""
        return {f"HERALD_{k.upper()}": str(v) for k, v in self.settings(**overrides).items()}

    def default(self, hook: str, req: dict[str, Any]) -> Any:
        if hook == "subscribe":
            ns, _, job = req["channel"].partition(":")
            if ns == "job" and self.jobs.get(job) == req["user"]:
                return Accept({})
            return Reject("forbidden", f"{req['user']} does not own {req['channel']}")
        if hook == "refresh":
            return Accept({"expires": int(time.time()) + 60})
        if hook == "rpc":
            if req["method"] == "echo":
                return Accept(req.get("params"))
            return Reject("not_found", f"no method {req['method']}")
        return Accept({})

    async def answer(self, hook: str, req: dict[str, Any]) -> tuple[int, bytes]:
        rule = self.rules.get(hook)
        if callable(rule):
            rule = rule(req)  # None: the default answer
        if rule is None:
            rule = self.default(hook, req)
        while isinstance(rule, Delay):
            await asyncio.sleep(rule.seconds)
            rule = rule.then
        if isinstance(rule, Accept):
            return 200, orjson.dumps({"result": rule.result})
        if isinstance(rule, Reject):
            return 200, orjson.dumps({"error": {"code": rule.code, "message": rule.message}})
        if isinstance(rule, Status):
            return rule.code, b'{"detail": "backend failure"}'
        if isinstance(rule, Malformed):
            return 200, rule.body
        raise TypeError(f"unknown rule {rule!r}")

    async def start(self) -> Backend:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        app = Application([(r"/herald/(\w+)", _HookHandler, {"backend": self})])
        self._server = HTTPServer(app)
        self._server.add_sockets([sock])
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            await self._server.close_all_connections()
            self._server = None


class _HookHandler(RequestHandler):
    def initialize(self, backend: Backend) -> None:
        self.backend = backend

    async def post(self, hook: str) -> None:
        body = orjson.loads(self.request.body)
        self.backend.calls.setdefault(hook, []).append(
            Call(body, {k.lower(): v for k, v in self.request.headers.items()})
        )
        status, payload = await self.backend.answer(hook, body)
        self.backend.answered += 1
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(payload)

    def on_connection_close(self) -> None:
        pass  # a caller that timed out went away; the delayed answer goes nowhere
