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
import re
import secrets
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PREFIX = "HERALD_"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


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


ENGINES = ("durable", "memory", "redis")
DURABLE_SYNC = ("normal", "full")
# `herald serve`'s event loop: uvloop when installed (a dependency on Linux), else asyncio's.
EVENT_LOOPS = ("auto", "uvloop", "asyncio")
KNOWN_ENVS = frozenset({"development", "dev", "production", "prod"})
_POSITIVE = (
    "redis_timeout",
    "redis_stall_seconds",
    "idempotency_ttl",
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
    "hook_timeout",
    "hook_concurrency",
    "hook_breaker_failures",
    "hook_breaker_cooldown",
    "presence_ttl",
)
_NON_NEGATIVE = ("heartbeat", "drain_seconds", "jwt_leeway", "redis_audit_seconds")


@dataclass(frozen=True)
class Settings:
    """All of Herald's settings. Field name `x_y` is variable `HERALD_X_Y`."""

    host: str = "0.0.0.0"
    port: int = 8080
    env: str = "development"
    node_id: str = ""
    # Engine: `durable` (embedded, kept in state_dir across restarts), `memory`
    # (embedded, lost on restart) or `redis` (shared by many gateways).
    # Empty: redis with a URL, else durable.
    engine: str = ""
    # The durable engine's SQLite `synchronous`: `normal` survives a killed process,
    # `full` also a power loss (docs/operations.md has the measured cost).
    durable_sync: str = "normal"
    redis_url: str = ""
    redis_prefix: str = "herald:"
    # Seconds a Redis command (or a subscribe's confirmation) may take before `unavailable`.
    redis_timeout: float = 5.0
    # Seconds of pub/sub silence after which the gateway is not ready (a stalled link).
    redis_stall_seconds: float = 3.0
    # Seconds between audits of the pub/sub subscriptions against Redis's own count (0 = off).
    redis_audit_seconds: float = 30.0
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
    # Seconds an applied Idempotency-Key is remembered per channel (a retry within it is a no-op).
    idempotency_ttl: float = 600.0
    # Outgoing buffer per connection: past either bound the client is closed (4008).
    send_buffer_bytes: int = 4 * 1024 * 1024
    send_buffer_messages: int = 10000
    drain_seconds: float = 20.0
    # Backend hooks (docs/hooks.md): base URL, and each hook on when its path is set.
    hook_url: str = ""
    hook_connect_path: str = ""
    hook_refresh_path: str = ""
    hook_subscribe_path: str = ""
    hook_publish_path: str = ""
    hook_rpc_path: str = ""
    hook_secret: str = ""
    hook_timeout: float = 5.0
    hook_concurrency: int = 64
    hook_breaker_failures: int = 5
    hook_breaker_cooldown: float = 10.0
    # Redis presence: a member not refreshed by its gateway for this long is gone.
    presence_ttl: float = 15.0
    # Where development secrets (so `herald token` finds them) and the durable engine's
    # file are kept.
    state_dir: str = ""
    demo: bool = True
    # The admin console at /admin (it does nothing until the API key is typed into it).
    admin_console: bool = True
    log_level: str = "INFO"
    # `auto` (uvloop when installed), `uvloop` (required), or `asyncio` (the stock loop).
    event_loop: str = "auto"

    def __post_init__(self) -> None:
        """Refuse values that would fail later, or silently weaken security, at start-up."""
        if self.env.lower() not in KNOWN_ENVS:
            # A typo such as `prodution` must not quietly run with generated secrets.
            raise ConfigError(f"HERALD_ENV={self.env!r}: expected development or production")
        if self.engine and self.engine not in ENGINES:
            expected = ", ".join(ENGINES)
            raise ConfigError(f"HERALD_ENGINE={self.engine!r}: expected one of {expected}")
        if self.durable_sync not in DURABLE_SYNC:
            raise ConfigError(f"HERALD_DURABLE_SYNC={self.durable_sync!r}: expected normal or full")
        if self.engine == "redis" and not self.redis_url:
            raise ConfigError("HERALD_ENGINE=redis needs HERALD_REDIS_URL")
        if self.engine and self.engine != "redis" and self.redis_url:
            # Two settings that disagree: refuse rather than guess which one was meant.
            raise ConfigError(
                f"HERALD_ENGINE={self.engine} contradicts HERALD_REDIS_URL (unset one of them)"
            )
        if self.event_loop not in EVENT_LOOPS:
            expected = ", ".join(EVENT_LOOPS)
            raise ConfigError(f"HERALD_EVENT_LOOP={self.event_loop!r}: expected one of {expected}")
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
    def broker_engine(self) -> str:
        """The engine in use: the explicit setting, else redis with a URL, else durable."""
        return self.engine or ("redis" if self.redis_url else "durable")

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
        given = sources(environ)
        for f in dataclasses.fields(cls):
            name = PREFIX + f.name.upper()
            if name not in given:
                continue
            raw = given[name][0]
            try:
                values[f.name] = _parse(f.type, raw)
            except ValueError as exc:
                raise ConfigError(f"{name}={raw!r}: {exc}") from None
        settings = cls(**values)
        if not settings.node_id:
            settings = dataclasses.replace(settings, node_id=_default_node_id())
        return settings


_PUBLIC = frozenset({"jwt_public_key"})


def is_secret(name: str) -> bool:
    """Settings whose values never appear in output (`herald check-config`, logs).

    By name, so a new `*_secret` / `*_key` / `*_password` setting is masked
    without anyone remembering to list it.
    """
    return name.endswith(("secret", "password", "key")) and name not in _PUBLIC


def masked(name: str, value: Any) -> str:
    """A setting's value as it may be shown: secrets as `****` and URLs without passwords."""
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value)
    if text and is_secret(name):
        return "****"
    if len(text) > 60:
        return text[:57] + "..."
    # redis://user:password@host -> redis://user:****@host
    return re.sub(r"^([a-z][a-z0-9+.-]*://[^:/@]*:)[^@/]*@", r"\1****@", text)


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


def sources(environ: Mapping[str, str] | None = None) -> dict[str, tuple[str, str]]:
    """Every `HERALD_*` value given, with where it came from (`environment` or the file).

    The env file is read first and the environment wins over it, so a Helm
    value or a shell export can override a checked-in file.
    """
    environ = os.environ if environ is None else environ
    given: dict[str, tuple[str, str]] = {}
    env_file = environ.get(PREFIX + "ENV_FILE")
    if env_file:
        for name, value in read_env_file(Path(env_file)).items():
            given[name] = (value, env_file)
    for name, value in environ.items():
        if name.startswith(PREFIX):
            given[name] = (value, "environment")
    return given


def read_env_file(path: Path) -> dict[str, str]:
    """`NAME=value` lines, as systemd's EnvironmentFile and a shell's `set -a; . file` read them.

    Blank lines and `#` comments are skipped, a leading `export ` is allowed
    (so the same file can be sourced by a shell), and one pair of matching
    quotes around the value is removed. Any other line is an error naming
    the file and line: a silently skipped line is a setting that is not
    applied.
    """
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"HERALD_ENV_FILE={str(path)!r}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"HERALD_ENV_FILE={str(path)!r}: not UTF-8 text") from None
    values: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export "):].lstrip()
        key, eq, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not _NAME.fullmatch(key):
            # The line is not echoed: it may hold a secret written the wrong way.
            raise ConfigError(f"HERALD_ENV_FILE {path}, line {number}: expected NAME=value")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        values[key] = value
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


def missing_secrets(settings: Settings) -> list[str]:
    """The secret fields a development server fills in: no JWT key of any kind, no API key."""
    missing = []
    if not (settings.jwt_secret or settings.jwt_public_key or settings.jwt_jwks_url):
        missing.append("jwt_secret")
    if not settings.api_key:
        missing.append("api_key")
    return missing


def with_dev_secrets(settings: Settings, *, create: bool = True) -> tuple[Settings, bool]:
    """Fill in a missing JWT secret / API key with development ones.

    They are generated once and kept (mode 0600) in the state directory, so
    `herald token` in another terminal signs tokens the server accepts.
    Returns the completed settings and whether anything was generated or
    loaded. Production refuses: a generated key there would silently change
    on every pod and lock every client out. With `create=False` (the
    commands that only read secrets: `herald token`, `api-key`,
    `check-token`) a state directory without them is an error: minting with
    fresh secrets would print a token no running server accepts.
    """
    missing = missing_secrets(settings)
    if not missing:
        return settings, False
    if settings.production:
        names = {
            "jwt_secret": "HERALD_JWT_SECRET (or HERALD_JWT_PUBLIC_KEY / HERALD_JWT_JWKS_URL)",
            "api_key": "HERALD_API_KEY",
        }
        raise ConfigError(
            "HERALD_ENV=production needs " + " and ".join(names[key] for key in missing)
            + "; refusing to start"
        )
    path = state_dir(settings) / DEV_SECRETS_FILE
    stored: dict[str, str] = {}
    if path.exists():
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path}: unreadable development secrets ({exc})") from None
    changed = False
    for key in missing:
        if not stored.get(key):
            if not create:
                raise ConfigError(
                    f"no development secrets in {path}: start `herald serve` with this "
                    "HERALD_STATE_DIR first (or set HERALD_JWT_SECRET and HERALD_API_KEY)"
                )
            stored[key] = secrets.token_urlsafe(32)
            changed = True
    if changed:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(stored, fh)
    return dataclasses.replace(settings, **{key: stored[key] for key in missing}), True
