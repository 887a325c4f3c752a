"""Command-line options of the Herald load tests, and the resolved `Config`.

Every option can also come from the environment (`LOCUST_*`, or the
`HERALD_*` name Herald itself uses for the same secret) or a Locust config
file. In a distributed run only the master needs them: Locust sends the
master's custom options to its workers with each spawn, which is why users
resolve `Config` when they start rather than at import time.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from .catalog import SCENARIOS


class ConfigError(ValueError):
    """An option is missing or malformed; the message says which and why."""


class _EnvOptions:
    """Adds each option with an environment variable, `LOCUST_<NAME>` unless named.

    Locust's own `add_argument` (not an argument group's) is used because it
    knows `is_secret` (masked in the web UI).
    """

    def __init__(self, parser: Any) -> None:
        self._parser = parser

    def add_argument(self, flag: str, **kwargs: Any) -> None:
        kwargs.setdefault("env_var", "LOCUST_" + flag.lstrip("-").replace("-", "_").upper())
        self._parser.add_argument(flag, **kwargs)


def add_arguments(parser: Any) -> None:
    """Register our options on Locust's parser (the `init_command_line_parser` hook)."""
    g = c = _EnvOptions(parser)
    g.add_argument(
        "--scenario", choices=sorted(SCENARIOS), default=None,
        help="scenario to run (default fanout; or select by --tags NAME)",
    )
    g.add_argument(
        "--jwt-secret", default="", env_var="HERALD_JWT_SECRET", is_secret=True,
        help="HS256 secret to mint viewer tokens with (Herald's HERALD_JWT_SECRET)",
    )
    g.add_argument(
        "--token-file", default="", env_var="HERALD_TOKEN_FILE",
        help="file of ready-made JWTs, one per line, used round-robin (instead of a secret)",
    )
    g.add_argument("--token-ttl", type=float, default=3600.0, help="lifetime of minted tokens (s)")
    g.add_argument(
        "--api-key", default="", env_var="HERALD_API_KEY", is_secret=True,
        help="publisher API key (Herald's HERALD_API_KEY)",
    )
    g.add_argument(
        "--ws-url", default="", help="WebSocket URL (default: --host as ws(s):// + /ws)"
    )
    g.add_argument(
        "--ws-auth", choices=["header", "message"], default="header",
        help="send the token as an Authorization header, or as a first `auth` message "
        "(the browser way)",
    )
    g.add_argument(
        "--publish-via", choices=["http", "redis"], default="http",
        help="publish through the HTTP API, or straight into Redis with Herald's "
        "RedisPublisher (needs --redis-url and Herald installed)",
    )
    g.add_argument(
        "--redis-url", default="", env_var="HERALD_REDIS_URL", is_secret=True,
        help="Redis of the deployment, for --publish-via redis (Herald's HERALD_REDIS_URL)",
    )
    g.add_argument(
        "--redis-prefix", default="herald:", env_var="HERALD_REDIS_PREFIX",
        help="Herald's key prefix in Redis (HERALD_REDIS_PREFIX)",
    )
    g.add_argument("--prefix", default="lt", help="prefix of the job, channel and user names")
    g.add_argument("--jobs", type=int, default=None, help="number of jobs J (job scenarios)")
    g.add_argument("--rate", type=float, default=None, help="publications/s per channel R")
    g.add_argument(
        "--publishers", type=int, default=1, help="publisher users sharing the total rate"
    )
    g.add_argument("--payload-bytes", type=int, default=0, help="padding added to each payload")
    g.add_argument("--ping-interval", type=float, default=10.0, help="viewer ping period (s)")
    g.add_argument("--churn-interval", type=float, default=2.0, help="churn reconnect period (s)")
    g.add_argument(
        "--slow-ratio", type=float, default=0.2, help="share of slow consumers (slow scenario)"
    )
    g.add_argument(
        "--slow-delay", type=float, default=0.05, help="slow consumer's pause per message (s)"
    )
    g.add_argument(
        "--idle-timeout", type=float, default=60.0,
        help="close and reconnect a WebSocket silent for this long (s)",
    )
    g.add_argument(
        "--drain-timeout", type=float, default=5.0,
        help="at the end, how long viewers wait for what was published to arrive (s; 0: off)",
    )
    g.add_argument(
        "--simulate-loss", type=int, default=0, metavar="N",
        help="viewers ignore every Nth message: proves the checks catch a loss (self-test)",
    )
    # Checks: pass/fail thresholds applied when the run ends (exit code 1 on a miss).
    c.add_argument(
        "--check-p99-ms", type=float, default=1000.0,
        help="every event type's publish-to-deliver p99 must be below this (ms)",
    )
    c.add_argument(
        "--check-connect-p99-ms", type=float, default=None,
        help="connect p99 must be below this (ms; off unless set or the scenario sets it)",
    )
    c.add_argument("--check-max-lost", type=int, default=0, help="lost messages allowed")
    c.add_argument("--check-max-duplicates", type=int, default=0, help="duplicates allowed")
    c.add_argument(
        "--check-fail-ratio", type=float, default=0.01, help="largest failure ratio allowed"
    )
    c.add_argument(
        "--check-min-delivered", type=int, default=1,
        help="fewest messages that must be delivered (a run that delivers nothing fails)",
    )


@dataclass(frozen=True)
class Config:
    scenario: str
    host: str
    ws_url: str
    ws_auth: str
    jwt_secret: str
    token_file: str
    token_ttl: float
    api_key: str
    publish_via: str
    redis_url: str
    redis_prefix: str
    prefix: str
    jobs: int
    rate: float
    publishers: int
    payload_bytes: int
    ping_interval: float
    churn_interval: float
    slow_ratio: float
    slow_delay: float
    idle_timeout: float
    drain_timeout: float
    simulate_loss: int
    check_p99_ms: float
    check_connect_p99_ms: float | None
    check_max_lost: int
    check_max_duplicates: int
    check_fail_ratio: float
    check_min_delivered: int

    @property
    def owner(self) -> str:
        """The user every test job belongs to (viewers watch through a `channels` claim)."""
        return f"{self.prefix}-owner"

    def job_ids(self) -> list[str]:
        return [f"{self.prefix}-{i}" for i in range(self.jobs)]

    @property
    def broadcast_channel(self) -> str:
        return f"public:{self.prefix}-broadcast"


def scenario_names(options: Any) -> list[str]:
    """`--scenario`, else the scenario names among `--tags`, else fanout."""
    if getattr(options, "scenario", None):
        return [options.scenario]
    tags = getattr(options, "tags", None) or []
    named = [t for t in tags if t in SCENARIOS]
    if tags and not named:
        raise ConfigError(f"--tags {','.join(tags)} names no scenario; known: {sorted(SCENARIOS)}")
    return named or ["fanout"]


def ws_url_from(host: str, path: str = "/ws") -> str:
    """http://h:8080 -> ws://h:8080/ws, https://h/prefix -> wss://h/prefix/ws."""
    parts = urlsplit(host)
    if parts.scheme not in {"http", "https", "ws", "wss"} or not parts.netloc:
        raise ConfigError(f"--host must be an http(s):// URL, got {host!r}")
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + path, "", ""))


def build_config(options: Any, host: str | None) -> Config:
    """Resolve options (explicit value > scenario default > option default) and check them."""
    if not host:
        raise ConfigError("--host is required: the Herald base URL, e.g. http://localhost:8080")
    scenario = scenario_names(options)[0]
    values = {f.name: getattr(options, f.name, None) for f in dataclasses.fields(Config)}
    for key, default in SCENARIOS[scenario].defaults.items():
        if values.get(key) is None:
            values[key] = default
    values.update(
        scenario=scenario,
        host=host.rstrip("/"),
        ws_url=values["ws_url"] or ws_url_from(host),
        jobs=values["jobs"] if values["jobs"] is not None else 1,
        rate=values["rate"] if values["rate"] is not None else 1.0,
    )
    if not values["jwt_secret"] and not values["token_file"]:
        raise ConfigError("viewers need --jwt-secret (or HERALD_JWT_SECRET) or --token-file")
    if not values["api_key"]:
        raise ConfigError("publishers need --api-key (or HERALD_API_KEY)")
    if values["publish_via"] == "redis" and not values["redis_url"]:
        raise ConfigError("--publish-via redis needs --redis-url (or HERALD_REDIS_URL)")
    for name in ("jobs", "publishers"):
        if values[name] < 1:
            raise ConfigError(f"--{name} must be at least 1")
    if values["rate"] <= 0:
        raise ConfigError("--rate must be positive")
    if values["simulate_loss"] < 0:
        raise ConfigError("--simulate-loss must be 0 (off) or a positive N")
    if not 0 <= values["slow_ratio"] <= 1:
        raise ConfigError("--slow-ratio must be between 0 and 1")
    return Config(**values)


def config_of(environment: Any) -> Config:
    """The run's Config, resolved once per set of options (workers get theirs at spawn)."""
    options = environment.parsed_options
    cached = getattr(environment, "_herald_config", None)
    if cached is not None and cached[0] == (id(options), environment.host, vars(options).copy()):
        return cached[1]
    config = build_config(options, environment.host)
    environment._herald_config = ((id(options), environment.host, vars(options).copy()), config)
    return config
