"""Viewer tokens: minted from Herald's HS256 secret, or read from a file.

Minting suits a local or staging deployment whose secret the SRE holds. A
deployment that trusts an identity provider (RS256/JWKS) cannot be minted
for, so its tokens come ready-made in a file, one per line; they must
outlive the run and grant the channels the scenario watches (the job
scenarios need a `channels` claim such as `job:lt-*`, or an admin role).
"""

from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path

import jwt

from .options import Config, ConfigError


class TokenSource:
    def __init__(self, config: Config) -> None:
        self._config = config
        self._file_tokens: itertools.cycle[str] | None = None
        self._lock = threading.Lock()
        if not config.jwt_secret:
            path = Path(config.token_file)
            try:
                lines = [ln.strip() for ln in path.read_text().splitlines()]
            except OSError as exc:
                raise ConfigError(f"--token-file {path}: {exc.strerror}") from None
            tokens = [ln for ln in lines if ln and not ln.startswith("#")]
            if not tokens:
                raise ConfigError(f"--token-file {path} holds no token")
            self._file_tokens = itertools.cycle(tokens)

    def token(self, sub: str, channels: list[str] | None = None) -> tuple[str, float | None]:
        """A token for `sub` and when to renew it (unix time; None: it cannot be renewed).

        Renewal is due at 80 % of the token's life, counted from the whole
        seconds JWT uses, so a short --token-ttl still renews in time.
        """
        if self._file_tokens is not None:
            with self._lock:
                return next(self._file_tokens), None
        now = time.time()
        exp = int(now + self._config.token_ttl)
        claims: dict[str, object] = {"sub": sub, "iat": int(now), "exp": exp}
        if channels:
            claims["channels"] = channels
        token = jwt.encode(claims, self._config.jwt_secret, algorithm="HS256")
        return token, now + (exp - now) * 0.8
