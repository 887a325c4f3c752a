"""Configuration from `HERALD_*` environment variables (and an optional env file).

Every setting lives in `Settings`; `docs/configuration.md` is its table. One
parser per type keeps the error messages uniform: a bad value names the
variable and what it expected, so a typo in a Helm value fails at start-up,
not at the first client.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import secrets
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PREFIX = "HERALD_"


class ConfigError(ValueError):
    """A setting is missing or malformed; the message names the variable."""


def _str_list(raw: str) -> list[str]:
    return [part.strip() for part in raw.split(",") if part.strip()]


def _bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError("expected true/false")


KNOWN_ENVS = frozenset({"development", "dev", "production", "prod"})
_POSITIVE = (
    "auth_timeout",
    "max_frame_bytes",
    "max_json_depth",
    "max_subscriptions",
    "rate_per_second",
    "rate_burst",
    "rate_abuse_limit",
    "max_publish_bytes",
    "send_buffer_bytes",
    "send_buffer_messages",
)
_NON_NEGATIVE = ("heartbeat", "drain_seconds", "jwt_leeway")


@dataclass(frozen=True)
class Settings:
    """All of Herald's settings. Field name `x_y` is variable `HERALD_X_Y`."""

    host: str = "0.0.0.0"
    port: int = 8080
    env: str = "development"
    node_id: str = ""
    # Broker: unset means the embedded memory engine (one process, no Redis).
    redis_url: str = ""
    redis_prefix: str = "herald:"
    # Authentication of clients (JWT) and publishers (API key).
    jwt_secret: str = ""
    jwt_public_key: str = ""
    jwt_jwks_url: str = ""
    jwt_algorithms: list[str] = field(default_factory=list)
    jwt_audience: str = ""
    jwt_issuer: str = ""
    jwt_roles_claim: str = "roles"
    jwt_channels_claim: str = "channels"
    jwt_leeway: float = 5.0
    api_key: str = ""
    allow_query_token: bool = True
    # Browsers: Origins allowed to open a WebSocket. Empty = same host only.
    allowed_origins: list[str] = field(default_factory=list)
    # Namespaces beyond (or overriding) the built-in ones, as JSON.
    namespaces: str = ""
    # Connection limits.
    auth_timeout: float = 10.0
    heartbeat: float = 25.0
    max_frame_bytes: int = 65536
    max_json_depth: int = 32
    max_subscriptions: int = 128
    rate_per_second: float = 50.0
    rate_burst: int = 100
    rate_abuse_limit: int = 50
    # Connection admission: attempts per second per client IP, open connections per user.
    ip_connect_rate: float = 50.0
    ip_connect_burst: int = 200
    max_connections_per_user: int = 100
    # Proxies (CIDRs) whose X-Forwarded-For / X-Real-IP are believed. Empty = none.
    trusted_proxies: list[str] = field(default_factory=list)
    # Seconds a client may take to send its HTTP request headers (slowloris guard).
    handshake_timeout: float = 10.0
    max_publish_bytes: int = 262144
    # Outgoing buffer per connection: past either bound the client is closed (4008).
    send_buffer_bytes: int = 4 * 1024 * 1024
    send_buffer_messages: int = 10000
    drain_seconds: float = 20.0
    # Where development secrets are kept so `herald token` finds them.
    state_dir: str = ""
    demo: bool = True
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        """Refuse values that would fail later, or silently weaken security, at start-up."""
        if self.env.lower() not in KNOWN_ENVS:
            # A typo such as `prodution` must not quietly run with generated secrets.
            raise ConfigError(f"HERALD_ENV={self.env!r}: expected development or production")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"HERALD_PORT={self.port}: expected 0-65535")
        for name in _POSITIVE:
            if not getattr(self, name) > 0:
                raise ConfigError(f"{PREFIX}{name.upper()}={getattr(self, name)}: must be > 0")
        for name in _NON_NEGATIVE:
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{PREFIX}{name.upper()}={getattr(self, name)}: must be >= 0")
        self.trusted_networks  # noqa: B018 - a typo in a CIDR fails at start-up

    @property
    def trusted_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        """`HERALD_TRUSTED_PROXIES` parsed: `10.0.0.0/8`, `192.168.1.7` (one host), `::1/128`."""
        try:
            return tuple(ipaddress.ip_network(c, strict=False) for c in self.trusted_proxies)
        except ValueError as exc:
            raise ConfigError(f"HERALD_TRUSTED_PROXIES: {exc}") from None

    @property
    def production(self) -> bool:
        return self.env.lower() in {"production", "prod"}

    @property
    def algorithms(self) -> list[str]:
        """Accepted JWT algorithms; never `none`, and never HS* next to a public key."""
        if self.jwt_algorithms:
            return self.jwt_algorithms
        if self.jwt_public_key or self.jwt_jwks_url:
            return ["RS256", "ES256"]
        return ["HS256"]

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        env_file = environ.get(PREFIX + "ENV_FILE")
        merged: dict[str, str] = dict(_read_env_file(Path(env_file))) if env_file else {}
        merged.update(environ)
        for f in dataclasses.fields(cls):
            name = PREFIX + f.name.upper()
            if name not in merged:
                continue
            raw = merged[name]
            try:
                values[f.name] = _parse(f.type, raw)
            except ValueError as exc:
                raise ConfigError(f"{name}={raw!r}: {exc}") from None
        settings = cls(**values)
        if not settings.node_id:
            settings = dataclasses.replace(settings, node_id=_default_node_id())
        return settings


def _parse(type_name: Any, raw: str) -> Any:
    kind = str(type_name)
    if kind == "int":
        return int(raw)
    if kind == "float":
        return float(raw)
    if kind == "bool":
        return _bool(raw)
    if kind.startswith("list"):
        return _str_list(raw)
    return raw


def _read_env_file(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        values[key.strip()] = value.strip().strip('"').strip("'")
    return values


def _default_node_id() -> str:
    # A pod's hostname is its name: good enough to find it with kubectl.
    return os.environ.get("POD_NAME") or socket.gethostname() or "gw-0"


def state_dir(settings: Settings) -> Path:
    if settings.state_dir:
        return Path(settings.state_dir)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "herald"


DEV_SECRETS_FILE = "dev-secrets.json"


def with_dev_secrets(settings: Settings) -> tuple[Settings, bool]:
    """Fill in a missing JWT secret / API key with development ones.

    They are generated once and kept (mode 0600) in the state directory, so
    `herald token` in another terminal signs tokens the server accepts.
    Returns the completed settings and whether anything was generated or
    loaded. Production refuses: a generated key there would silently change
    on every pod and lock every client out.
    """
    needs_jwt = not (settings.jwt_secret or settings.jwt_public_key or settings.jwt_jwks_url)
    needs_key = not settings.api_key
    if not (needs_jwt or needs_key):
        return settings, False
    if settings.production:
        missing = []
        if needs_jwt:
            missing.append("HERALD_JWT_SECRET (or HERALD_JWT_PUBLIC_KEY / HERALD_JWT_JWKS_URL)")
        if needs_key:
            missing.append("HERALD_API_KEY")
        raise ConfigError(
            "HERALD_ENV=production needs " + " and ".join(missing) + "; refusing to start"
        )
    path = state_dir(settings) / DEV_SECRETS_FILE
    stored: dict[str, str] = {}
    if path.exists():
        stored = json.loads(path.read_text())
    changed = False
    for key in ("jwt_secret", "api_key"):
        if not stored.get(key):
            stored[key] = secrets.token_urlsafe(32)
            changed = True
    if changed:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(stored, fh)
    updates: dict[str, str] = {}
    if needs_jwt:
        updates["jwt_secret"] = stored["jwt_secret"]
    if needs_key:
        updates["api_key"] = stored["api_key"]
    return dataclasses.replace(settings, **updates), True
