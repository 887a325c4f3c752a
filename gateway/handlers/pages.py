"""Browser-facing files: the client module, the demo page and its development token.

The demo page and `/demo/token` exist only in development (`HERALD_DEMO`
on, `HERALD_ENV` not production, an HS256 secret to sign with); otherwise
both answer 404 as if they did not exist, so a production gateway never
hands out a token to whoever asks.
"""

from __future__ import annotations

from typing import Any

from tornado.web import HTTPError, StaticFileHandler

from gateway import demo
from gateway.handlers.base import JsonHandler
from gateway.protocol import frames
from gateway.protocol.errors import ProtocolError
from gateway.security.auth import mint_token

DEMO_TOKEN_TTL = 900  # short on purpose: the page shows token refresh at work


class StaticHandler(StaticFileHandler):
    """Tornado's static files, refusing a path with a NUL byte (404) before the
    filesystem sees it: `os.stat` would raise, a 500 with a traceback per request."""

    def parse_url_path(self, url_path: str) -> str:
        if "\x00" in url_path:
            raise HTTPError(404)
        return super().parse_url_path(url_path)


class ClientScriptHandler(StaticHandler):
    """`/client.js`: public code, loadable as a module script from any origin."""

    def set_extra_headers(self, path: str) -> None:
        self.set_header("Access-Control-Allow-Origin", "*")
        self.set_header("Content-Type", "text/javascript; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")


class DemoPageHandler(StaticHandler):
    """`/`: the demo dashboard (development only)."""

    def initialize(self, node: Any, path: str) -> None:  # type: ignore[override]
        super().initialize(path=path, default_filename="demo.html")
        self.node = node

    async def get(self, path: str = "", include_body: bool = True) -> None:
        if not demo.demo_enabled(self.node):
            self.set_status(404)
            self.set_header("Content-Type", "application/json")
            self.finish(frames.problem("not_found", "the demo is off (HERALD_DEMO)"))
            return
        await super().get("demo.html", include_body)

    def set_extra_headers(self, path: str) -> None:
        self.set_header("Cache-Control", "no-cache")
        self.set_header("X-Content-Type-Options", "nosniff")


class AdminConsoleHandler(StaticHandler):
    """`/admin`: the admin console (`HERALD_ADMIN_CONSOLE`), a static page.

    It holds no secret and grants nothing: everything it shows or does goes
    through the server API with the API key the operator types into it, sent
    from JavaScript as an `Authorization` header and kept in the page's memory
    only (never a cookie, never storage). A cross-site form or image cannot
    add that header, so it cannot act through an operator's open console
    (CSRF); the headers below keep the page out of frames and its scripts to
    this origin.
    """

    def initialize(self, node: Any, path: str) -> None:  # type: ignore[override]
        super().initialize(path=path)
        self.node = node

    async def get(self, path: str = "", include_body: bool = True) -> None:
        if not self.node.settings.admin_console:
            self.set_status(404)
            self.set_header("Content-Type", "application/json")
            self.finish(frames.problem("not_found", "the admin console is off"))
            return
        await super().get("admin.html", include_body)

    def set_extra_headers(self, path: str) -> None:
        self.set_header("Cache-Control", "no-store")
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("X-Frame-Options", "DENY")
        self.set_header("Referrer-Policy", "no-referrer")
        self.set_header(
            "Content-Security-Policy",
            "default-src 'self'; connect-src 'self'; img-src 'self' data:; "
            "frame-ancestors 'none'; form-action 'none'; base-uri 'none'",
        )


class DemoTokenHandler(JsonHandler):
    """`GET /demo/token`: a short-lived token for the demo user, and the jobs to watch."""

    def get(self) -> None:
        node = self.node
        if not demo.demo_enabled(node):
            raise ProtocolError("not_found", "the demo is off (HERALD_DEMO)")
        worker = demo.worker_for(node)
        settings = node.settings
        tok = mint_token(
            settings.jwt_secret,
            demo.DEMO_USER,
            ttl=DEMO_TOKEN_TTL,
            # The admin metrics panel's channel, and nothing else of `admin:`.
            channels=[demo.METRICS_CHANNEL],
            algorithm=next((a for a in settings.algorithms if a.startswith("HS")), "HS256"),
            roles_claim=settings.jwt_roles_claim,
            channels_claim=settings.jwt_channels_claim,
        )
        self.write_json(
            {
                "token": tok,
                "user": demo.DEMO_USER,
                "expires_in": DEMO_TOKEN_TTL,
                "jobs": list(worker.recent) if worker else [],
                "simulated": worker is not None,
                "metrics": demo.METRICS_CHANNEL,
            }
        )
