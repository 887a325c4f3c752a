"""The Tornado application: every route of the gateway in one table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tornado.httputil import HTTPServerRequest
from tornado.web import Application

from gateway.core.node import Node
from gateway.handlers import admin, api, ops, pages
from gateway.handlers.sse import SseHandler
from gateway.handlers.websocket import WebSocketUpgrade
from gateway.security.proxies import TrustedProxies

STATIC = Path(__file__).parent / "static"
CHANNEL = r"(?P<channel>[A-Za-z0-9_\-:.@=]{1,255})"


class HeraldApplication(Application):
    """Tornado's Application, with the client address decided by `HERALD_TRUSTED_PROXIES`.

    `find_handler` is the first thing run for every request, once its
    headers are in, so every handler, limit and access-log line sees the
    same, believable address.
    """

    def __init__(self, routes: list[Any], proxies: TrustedProxies, **settings: Any) -> None:
        super().__init__(routes, **settings)
        self.proxies = proxies

    def find_handler(self, request: HTTPServerRequest, **kwargs: Any) -> Any:
        self.proxies.apply(request)
        return super().find_handler(request, **kwargs)


def make_app(node: Node, **overrides: Any) -> Application:
    settings = node.settings
    deps = {"node": node}
    routes: list[Any] = [
        (r"/ws", WebSocketUpgrade, deps),
        (r"/sse", SseHandler, deps),
        (r"/api/v1/publish", api.PublishHandler, deps),
        (r"/api/v1/broadcast", api.BroadcastHandler, deps),
        (r"/api/v1/jobs", api.JobsHandler, deps),
        (rf"/api/v1/channels/{CHANNEL}/state", api.StateHandler, deps),
        (rf"/api/v1/channels/{CHANNEL}/history", api.HistoryHandler, deps),
        (rf"/api/v1/channels/{CHANNEL}/presence", api.PresenceHandler, deps),
        (rf"/api/v1/channels/{CHANNEL}/publish", api.ClientPublishHandler, deps),
        (r"/api/v1/rpc", api.RpcHandler, deps),
        (r"/api/v1/channels", admin.ChannelsHandler, deps),
        (r"/api/v1/users", admin.UsersHandler, deps),
        (r"/api/v1/users/(?P<user>[^/]{1,255})/(?P<verb>disconnect|unsubscribe|subscribe)",
         admin.UserActionHandler, deps),
        (r"/api/v1/stats", api.StatsHandler, deps),
        (r"/api/v1/cluster", api.ClusterHandler, deps),
        (r"/healthz", ops.HealthHandler, deps),
        (r"/readyz", ops.ReadyHandler, deps),
        (r"/metrics", ops.MetricsHandler, deps),
    ]
    if STATIC.is_dir():
        routes.append((r"/static/(.*)", pages.StaticHandler, {"path": str(STATIC)}))
        static = {"path": str(STATIC)}
        routes += [
            (r"/(client\.js)", pages.ClientScriptHandler, static),
            (r"/()", pages.DemoPageHandler, {**deps, **static}),
            (r"/demo/token", pages.DemoTokenHandler, deps),
            (r"/admin", pages.AdminConsoleHandler, {**deps, **static}),
        ]
    return HeraldApplication(
        routes,
        TrustedProxies(settings.trusted_networks),
        **overrides,
    )
