"""Who a client is: JWT verification, and the API key of publishers.

Algorithms are an explicit allow-list (never `none`, never HS* when a public
key is configured, which is the classic key-confusion attack). Keys from an
identity provider's JWKS URL are cached and re-fetched when a token names an
unknown `kid`, at most once per `JWKS_MIN_REFRESH` seconds so a flood of
forged `kid`s cannot turn Herald into a DoS against the provider.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import jwt
import orjson
from jwt import PyJWK
from tornado.httpclient import AsyncHTTPClient

from gateway.config import ConfigError, Settings
from gateway.protocol.errors import ProtocolError
from gateway.telemetry import audit

log = logging.getLogger("herald.auth")

JWKS_MIN_REFRESH = 30.0
# The `info` claim (what presence shows of a client) is kept per subscription: bounded.
MAX_INFO_BYTES = 1024
ADMIN_ROLE = "admin"
# HMAC secrets whose checks passed (one per configured key): bounded all the same.
_HMAC_CHECKED_MAX = 64


class _CheckedHMAC(jwt.algorithms.HMACAlgorithm):
    """PyJWT's HMAC, remembering which secrets already passed its key checks.

    PyJWT re-checks the secret on every decode (is it PEM, SSH, DER? the DER
    probe asks `cryptography` to parse it twice and fail): about a tenth of a
    gateway's CPU on a connect storm, for an answer that never changes for a
    configured key. The checks still run, once per distinct secret; a secret
    that fails them is not remembered and fails every time.
    """

    def __init__(self, hash_alg: Any) -> None:
        super().__init__(hash_alg)
        self._checked: dict[bytes, bytes] = {}

    def prepare_key(self, key: str | bytes) -> bytes:
        raw = key.encode() if isinstance(key, str) else key
        prepared = self._checked.get(raw) if isinstance(raw, bytes) else None
        if prepared is None:
            prepared = super().prepare_key(key)
            if len(self._checked) >= _HMAC_CHECKED_MAX:
                self._checked.clear()
            self._checked[raw] = prepared
        return prepared


def _install_checked_hmac() -> None:
    """Swap PyJWT's HS256/384/512 for `_CheckedHMAC` (its public registry, process-wide)."""
    for name, hash_alg in (("HS256", jwt.algorithms.HMACAlgorithm.SHA256),
                           ("HS384", jwt.algorithms.HMACAlgorithm.SHA384),
                           ("HS512", jwt.algorithms.HMACAlgorithm.SHA512)):
        jwt.unregister_algorithm(name)
        jwt.register_algorithm(name, _CheckedHMAC(hash_alg))


_install_checked_hmac()


@dataclass(frozen=True, slots=True)
class Claims:
    """What Herald uses from a verified token."""

    sub: str
    exp: float
    roles: frozenset[str]
    channels: tuple[str, ...]
    # The token's `info` claim (or the connect hook's): what presence shows of the client.
    info: Any = None

    @property
    def admin(self) -> bool:
        return ADMIN_ROLE in self.roles


def _claim_path(payload: dict[str, Any], path: str) -> Any:
    """Dotted lookup, for providers that nest roles (`app_metadata.roles`)."""
    value: Any = payload
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


# Most tokens carry no roles: one shared empty set instead of one each.
_NO_ROLES: frozenset[str] = frozenset()


def _str_set(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str)]
    return []


def checked_algorithms(settings: Settings) -> list[str]:
    """The accepted algorithms, refusing a configuration that would open a hole.

    `none` would accept unsigned tokens; HS* next to a public key or JWKS
    lets anyone who knows the (public) key sign tokens; an unknown name is a
    typo that would otherwise lock every client out with a vague error.
    """
    algorithms = settings.algorithms
    known = jwt.algorithms.get_default_algorithms()
    for alg in algorithms:
        if alg.lower() == "none":
            raise ConfigError("HERALD_JWT_ALGORITHMS must not contain 'none'")
        if alg not in known:
            raise ConfigError(f"HERALD_JWT_ALGORITHMS: unknown algorithm {alg!r}")
        if alg.startswith("HS") and (settings.jwt_public_key or settings.jwt_jwks_url):
            raise ConfigError(
                f"HERALD_JWT_ALGORITHMS: {alg} cannot be used with a public key or JWKS"
            )
    return algorithms


class Authenticator:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._algorithms = checked_algorithms(settings)
        self._static_key: Any = settings.jwt_secret or settings.jwt_public_key or None
        if settings.jwt_public_key:
            self._static_key = settings.jwt_public_key.replace("\\n", "\n")
        self._jwks: dict[str, PyJWK] = {}
        self._jwks_fetched = -math.inf  # the first unknown kid always fetches
        self._api_key = settings.api_key.encode()

    def check_api_key(self, header: str | None, **context: Any) -> bool:
        """`Authorization: apikey <key>`, compared in constant time.

        A refusal is an audit event (`apikey.failure`, with `context` and
        whether a key was sent at all): never the key.
        """
        scheme, _, key = (header or "").partition(" ")
        if self._api_key and scheme.lower() == "apikey" and hmac.compare_digest(
            key.strip().encode(), self._api_key
        ):
            return True
        reason = "no API key" if scheme.lower() != "apikey" else "wrong API key"
        audit.event("apikey.failure", reason=reason, **context)
        return False

    async def verify(self, token: object, *, refresh: bool = False, **context: Any) -> Claims:
        """Verify a token or raise `unauthorized` / `token_expired` with the reason.

        Every outcome is an audit event (`auth.success`, `auth.refresh` for a
        refresh, `auth.failure` with the reason), carrying `context` (client,
        address, transport): never the token.
        """
        try:
            claims = await self._verify(token)
        except ProtocolError as exc:
            audit.event("auth.failure", reason=f"{exc.code}: {exc.message}",
                        refresh=refresh or None, **context)
            raise
        audit.event("auth.refresh" if refresh else "auth.success", subject=claims.sub, **context)
        return claims

    async def _verify(self, token: object) -> Claims:
        if not isinstance(token, str) or not token:
            raise ProtocolError("unauthorized", "token missing")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise ProtocolError("unauthorized", "token is not a JWT") from None
        alg = header.get("alg")
        if alg not in self._algorithms:
            raise ProtocolError("unauthorized", f"algorithm {alg!r} is not accepted")
        key = await self._key_for(header)
        opts = self._settings
        try:
            payload = jwt.decode(
                token,
                key=key,
                algorithms=self._algorithms,
                audience=opts.jwt_audience or None,
                issuer=opts.jwt_issuer or None,
                leeway=opts.jwt_leeway,
                options={"require": ["sub", "exp"], "verify_aud": bool(opts.jwt_audience)},
            )
        except jwt.ExpiredSignatureError:
            raise ProtocolError("token_expired", "token has expired") from None
        except jwt.MissingRequiredClaimError as exc:
            raise ProtocolError("unauthorized", f"token lacks claim {exc.claim!r}") from None
        except jwt.InvalidSignatureError:
            raise ProtocolError("unauthorized", "token signature is invalid") from None
        except jwt.InvalidKeyError:
            # PyJWT's own message here is a generator's repr ("Expected one of <generator...").
            raise ProtocolError(
                "unauthorized", f"the configured key cannot verify {alg} tokens (wrong key type)"
            ) from None
        except jwt.PyJWTError as exc:
            raise ProtocolError("unauthorized", f"token is invalid: {exc}") from None
        sub = payload["sub"]
        if not isinstance(sub, str) or not sub:
            raise ProtocolError("unauthorized", "token sub must be a non-empty string")
        for claim in ("exp", "nbf", "iat"):
            # PyJWT takes "9999999999" (a string) as a date; RFC 7519 says a number.
            value = payload.get(claim)
            if claim in payload and (isinstance(value, bool) or not isinstance(value, int | float)):
                raise ProtocolError("unauthorized", f"token {claim} must be a number (NumericDate)")
        info = payload.get("info")
        if info is not None and len(orjson.dumps(info)) > MAX_INFO_BYTES:
            raise ProtocolError("unauthorized", f"token info claim over {MAX_INFO_BYTES} bytes")
        return Claims(
            sub=sub,
            exp=float(payload["exp"]),
            roles=frozenset(_str_set(_claim_path(payload, opts.jwt_roles_claim))) or _NO_ROLES,
            channels=tuple(_str_set(_claim_path(payload, opts.jwt_channels_claim))),
            info=info,
        )

    async def _key_for(self, header: dict[str, Any]) -> Any:
        if not self._settings.jwt_jwks_url:
            if self._static_key is None:
                raise ProtocolError("unauthorized", "no verification key configured")
            return self._static_key
        kid = header.get("kid")
        if kid not in self._jwks and time.monotonic() - self._jwks_fetched > JWKS_MIN_REFRESH:
            await self._refresh_jwks()
        if kid in self._jwks:
            return self._jwks[kid]
        if kid is None and len(self._jwks) == 1:
            return next(iter(self._jwks.values()))
        raise ProtocolError("unauthorized", "token signed by an unknown key")

    async def _refresh_jwks(self) -> None:
        self._jwks_fetched = time.monotonic()
        try:
            response = await AsyncHTTPClient().fetch(self._settings.jwt_jwks_url, request_timeout=5)
            keys = json.loads(response.body)["keys"]
        except Exception as exc:
            log.warning("JWKS fetch failed: %s", exc)
            return
        fresh: dict[str, PyJWK] = {}
        for data in keys:
            try:
                fresh[data.get("kid", "")] = PyJWK(data)
            except jwt.PyJWTError as exc:
                log.warning("JWKS key %s skipped: %s", data.get("kid"), exc)
        if fresh:
            self._jwks = fresh


def mint_token(
    secret: str,
    sub: str,
    *,
    roles: list[str] | None = None,
    channels: list[str] | None = None,
    ttl: float = 3600.0,
    algorithm: str = "HS256",
    roles_claim: str = "roles",
    channels_claim: str = "channels",
    extra: dict[str, Any] | None = None,
) -> str:
    """Sign a development token (the `herald token` command and the tests)."""
    now = int(time.time())
    payload: dict[str, Any] = {"sub": sub, "iat": now, "exp": now + int(ttl)}
    if roles:
        payload[roles_claim] = roles
    if channels:
        payload[channels_claim] = channels
    payload.update(extra or {})
    return jwt.encode(payload, secret, algorithm=algorithm)
