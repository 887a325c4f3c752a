"""`herald`: run a gateway, mint a development token, check a configuration or a token.

herald serve [--host H] [--port P]
herald token --sub ID [--role admin] [--channels 'job:42,dashboard:*'] [--ttl S]
herald api-key
herald check-config
herald check-token TOKEN        (or - to read it from stdin)
herald feed postgres [--table jobs] [--owner-column user_id]   (HERALD_FEED_DSN, HERALD_FEED_URL)
herald --version

Every failure a user can cause (a bad setting, a port in use, a missing env
file, no secrets to sign with) ends with one `herald: ...` line on stderr
and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
import time

from gateway import __version__
from gateway.config import (
    DEV_SECRETS_FILE,
    PREFIX,
    ConfigError,
    Settings,
    masked,
    missing_secrets,
    sources,
    state_dir,
    with_dev_secrets,
)
from gateway.protocol.channels import Namespaces
from gateway.protocol.errors import ProtocolError
from gateway.security.auth import Authenticator, mint_token

BANNER = """
================================================================================
 Herald is running in DEVELOPMENT mode with generated secrets
 (kept in {path}; set HERALD_JWT_SECRET and HERALD_API_KEY to choose your own,
 HERALD_ENV=production refuses to start without them).

 Demo:          http://{host}:{port}/
 Mint a token:  herald token --sub user-123
 Publish:       curl -H "Authorization: apikey $(herald api-key)" \\
                  -d '{{"channel":"user:user-123","event":"hello","data":{{"n":1}}}}' \\
                  http://{host}:{port}/api/v1/publish
================================================================================
"""


def _fail(message: object) -> None:
    sys.exit(f"herald: {message}")


def _settings() -> Settings:
    try:
        return Settings.from_env()
    except ConfigError as exc:
        _fail(exc)
        raise  # unreachable: for type checkers


def _with_secrets(settings: Settings, *, create: bool) -> tuple[Settings, bool]:
    try:
        return with_dev_secrets(settings, create=create)
    except ConfigError as exc:
        _fail(exc)
        raise


def _check(settings: Settings) -> None:
    """Fail with one line, not a traceback, on settings that only the server's parts judge."""
    try:
        Namespaces.from_config(settings.namespaces)
        Authenticator(settings)
    except ValueError as exc:  # ConfigError included
        _fail(exc)


def cmd_serve(args: argparse.Namespace) -> None:
    from gateway.server import run, serve_forever
    from gateway.telemetry.logs import configure_logging

    settings = _settings()
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    settings = dataclasses.replace(settings, **overrides)
    settings, generated = _with_secrets(settings, create=True)
    _check(settings)
    configure_logging(settings.log_level)
    _setup_tracing(settings)

    def announce(port: int) -> None:
        if generated:  # only once the port is bound: a banner for a server that failed misleads
            host = "localhost" if settings.host in {"0.0.0.0", "::"} else settings.host
            path = state_dir(settings)
            print(BANNER.format(path=path, host=host, port=port), file=sys.stderr, flush=True)

    try:
        run(settings, lambda: serve_forever(settings, announce))
    except KeyboardInterrupt:
        pass
    except ConfigError as exc:  # the port, the state directory: judged when used
        _fail(exc)
    finally:
        from gateway.telemetry import tracing

        tracing.shutdown()  # flush the last spans


def _setup_tracing(settings: Settings) -> None:
    """OpenTelemetry from the standard `OTEL_*` variables (nothing when none is set)."""
    from gateway.telemetry import tracing

    try:
        tracing.setup(settings.node_id)
    except ConfigError as exc:
        _fail(exc)


def _settings_with(secret: str) -> Settings:
    """Settings holding `secret` (`jwt_secret` or `api_key`) as a running server has it.

    Configured, or read from the development secrets `herald serve` wrote;
    never freshly generated ones, which no server shares.
    """
    settings = _settings()
    if getattr(settings, secret):
        return settings
    return _with_secrets(settings, create=False)[0]


def cmd_token(args: argparse.Namespace) -> None:
    settings = _settings()
    if not settings.jwt_secret and (settings.jwt_public_key or settings.jwt_jwks_url):
        _fail(
            "token needs HERALD_JWT_SECRET (an HS256 secret); "
            "with public keys, tokens come from your identity provider"
        )
    settings = _settings_with("jwt_secret")
    channels = [c.strip() for c in (args.channels or "").split(",") if c.strip()]
    print(
        mint_token(
            settings.jwt_secret,
            args.sub,
            roles=args.role or None,
            channels=channels or None,
            ttl=args.ttl,
            algorithm=settings.algorithms[0]
            if settings.algorithms[0].startswith("HS")
            else "HS256",
            roles_claim=settings.jwt_roles_claim,
            channels_claim=settings.jwt_channels_claim,
        )
    )


def cmd_api_key(args: argparse.Namespace) -> None:
    print(_settings_with("api_key").api_key)


def cmd_check_config(args: argparse.Namespace) -> None:
    """Validate like `herald serve` would, then print every effective setting and its source.

    Nothing is written: development secrets that do not exist yet are
    reported as "generated by herald serve", not generated here.
    """
    settings = _settings()
    _check(settings)
    given = sources()
    dev = missing_secrets(settings)
    secrets_path = state_dir(settings) / DEV_SECRETS_FILE
    try:
        effective, _ = with_dev_secrets(settings, create=False)
        dev_origin = f"development secret in {secrets_path}"
    except ConfigError as exc:
        if settings.production:
            _fail(exc)
        effective, dev_origin = settings, f"herald serve generates it into {secrets_path}"
    print(f"herald {__version__}: configuration is valid; engine: {effective.broker_engine}")
    rows = []
    for f in dataclasses.fields(Settings):
        name = PREFIX + f.name.upper()
        origin = given[name][1] if name in given else dev_origin if f.name in dev else "default"
        rows.append((f"{name}={masked(f.name, getattr(effective, f.name))}", origin))
    width = max(len(text) for text, _ in rows)
    for text, origin in rows:
        print(f"{text:<{width}}  ({origin})")


def cmd_check_token(args: argparse.Namespace) -> None:
    """Verify a token exactly as the gateway does; print its claims, or why it is refused."""
    token = sys.stdin.readline().strip() if args.token == "-" else args.token
    settings = _settings()
    if not (settings.jwt_public_key or settings.jwt_jwks_url):
        settings = _settings_with("jwt_secret")
    _check(settings)
    try:
        claims = asyncio.run(Authenticator(settings).verify(token))
    except ProtocolError as exc:
        _fail(f"rejected: {exc.code}: {exc.message}")
        raise
    expires = claims.exp - time.time()
    print(f"accepted: sub={claims.sub}")
    print(f"  expires in {expires:.0f} s")
    print(f"  roles: {', '.join(sorted(claims.roles)) or '(none)'}"
          + ("  (admin: every channel)" if claims.admin else ""))
    print(f"  channels claim: {', '.join(claims.channels) or '(none)'}")


def cmd_feed_postgres(args: argparse.Namespace) -> None:
    """Follow a Postgres outbox table and publish each change (docs/feed.md)."""
    try:
        from gateway.feed import postgres
        from gateway.feed.mapping import JobsMapping
    except ImportError as exc:  # psycopg is the `feed` extra
        _fail(f"the Postgres feed needs psycopg: pip install 'herald[feed]' ({exc})")
        raise
    if args.print_sql:
        print(postgres.outbox_sql(), end="")
        return
    dsn = args.dsn or os.environ.get("HERALD_FEED_DSN")
    if not dsn:
        _fail("no database: set HERALD_FEED_DSN (or --dsn)")
    from gateway.sdk.publisher import HttpPublisher
    from gateway.telemetry.logs import configure_logging

    settings = _settings_with("api_key")
    if not settings.api_key:
        _fail("no API key: set HERALD_API_KEY to the gateway's")
    configure_logging(settings.log_level)
    mapping = JobsMapping(table=args.table, owner_column=args.owner_column,
                          max_bytes=settings.max_publish_bytes)
    options = postgres.FeedOptions(dsn=str(dsn), mapping=mapping, batch=args.batch,
                                   poll_interval=args.poll_interval)
    metrics = postgres.FeedMetrics()
    address = (args.metrics_host, args.metrics_port) if args.metrics_port else None

    async def run() -> None:
        publisher = HttpPublisher(args.url, settings.api_key)
        await postgres.run_feed(options, publisher, metrics, address)

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass
    except ConfigError as exc:
        _fail(exc)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="herald", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"herald {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve", help="run a gateway (durable embedded engine unless HERALD_REDIS_URL)"
    )
    serve.add_argument("--host", help="bind address (HERALD_HOST, default 0.0.0.0)")
    serve.add_argument("--port", type=int, help="port (HERALD_PORT, default 8080)")
    serve.set_defaults(func=cmd_serve)
    token = sub.add_parser("token", help="print a JWT signed with the configured secret")
    token.add_argument("--sub", required=True, help="the user id (token subject)")
    token.add_argument("--role", action="append", help="a role, e.g. admin (repeatable)")
    token.add_argument("--channels", help="comma-separated channel names or globs")
    token.add_argument("--ttl", type=float, default=3600.0, help="lifetime in seconds")
    token.set_defaults(func=cmd_token)
    key = sub.add_parser("api-key", help="print the publisher API key in use")
    key.set_defaults(func=cmd_api_key)
    check = sub.add_parser(
        "check-config", help="validate the settings and print them (secrets masked)"
    )
    check.set_defaults(func=cmd_check_config)
    check_token = sub.add_parser("check-token", help="would the gateway accept this token?")
    check_token.add_argument("token", help="the JWT, or - to read it from stdin (keeps it "
                             "out of shell history and the process list)")
    check_token.set_defaults(func=cmd_check_token)
    feed = sub.add_parser("feed", help="publish database changes to channels")
    feeds = feed.add_subparsers(dest="source", required=True)
    pg = feeds.add_parser("postgres", help="follow a Postgres outbox table (docs/feed.md)")
    pg.add_argument("--dsn", help="the database (HERALD_FEED_DSN; prefer the variable: a "
                    "password in arguments shows in the process list)")
    pg.add_argument("--url", default=os.environ.get("HERALD_FEED_URL", "http://127.0.0.1:8080"),
                    help="the gateway's base URL (HERALD_FEED_URL); the API key is HERALD_API_KEY")
    pg.add_argument("--table", default="jobs", help="the jobs table whose rows map to job:{id}")
    pg.add_argument("--owner-column", default="user_id", help="the column naming the job's owner")
    pg.add_argument("--batch", type=int, default=1000, help="rows per round (1-10000)",
                    choices=range(1, 10001), metavar="N")
    pg.add_argument("--poll-interval", type=float, default=1.0,
                    help="seconds between polls when no notification comes")
    pg.add_argument("--metrics-port", type=int, default=9108,
                    help="Prometheus metrics on this port (0: off)")
    pg.add_argument("--metrics-host", default="0.0.0.0", help="address for the metrics server")
    pg.add_argument("--print-sql", action="store_true",
                    help="print the outbox table and trigger SQL, and exit")
    pg.set_defaults(func=cmd_feed_postgres)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
