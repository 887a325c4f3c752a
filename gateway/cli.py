"""`herald`: run a gateway, or mint a development token.

herald serve [--host H] [--port P]
herald token --sub ID [--role admin] [--channels 'job:42,dashboard:*'] [--ttl S]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys

from gateway.config import ConfigError, Settings, state_dir, with_dev_secrets
from gateway.protocol.channels import Namespaces
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


def _settings() -> Settings:
    try:
        return Settings.from_env()
    except ConfigError as exc:
        sys.exit(f"herald: {exc}")


def _with_secrets(settings: Settings) -> tuple[Settings, bool]:
    try:
        return with_dev_secrets(settings)
    except ConfigError as exc:
        sys.exit(f"herald: {exc}")


def _check(settings: Settings) -> None:
    """Fail with one line, not a traceback, on settings that only the server's parts judge."""
    try:
        Namespaces.from_config(settings.namespaces)
        Authenticator(settings)
    except ValueError as exc:  # ConfigError included
        sys.exit(f"herald: {exc}")


def cmd_serve(args: argparse.Namespace) -> None:
    from gateway.server import serve_forever
    from gateway.telemetry.logs import configure_logging

    settings = _settings()
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    settings = dataclasses.replace(settings, **overrides)
    settings, generated = _with_secrets(settings)
    _check(settings)
    configure_logging(settings.log_level)
    _setup_tracing(settings)
    if generated:
        host = "localhost" if settings.host in {"0.0.0.0", "::"} else settings.host
        path = state_dir(settings)
        print(BANNER.format(path=path, host=host, port=settings.port), file=sys.stderr, flush=True)
    try:
        asyncio.run(serve_forever(settings))
    except KeyboardInterrupt:
        pass
    finally:
        from gateway.telemetry import tracing

        tracing.shutdown()  # flush the last spans


def _setup_tracing(settings: Settings) -> None:
    """OpenTelemetry from the standard `OTEL_*` variables (nothing when none is set)."""
    from gateway.telemetry import tracing

    try:
        tracing.setup(settings.node_id)
    except ConfigError as exc:
        sys.exit(f"herald: {exc}")


def cmd_token(args: argparse.Namespace) -> None:
    settings, _ = _with_secrets(_settings())
    if not settings.jwt_secret:
        sys.exit(
            "herald: token needs HERALD_JWT_SECRET (an HS256 secret); "
            "with public keys, tokens come from your identity provider"
        )
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
    settings, _ = _with_secrets(_settings())
    print(settings.api_key)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="herald", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run a gateway (memory engine unless HERALD_REDIS_URL)")
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
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
