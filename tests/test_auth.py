"""Every way to authenticate on `/ws`, and what each bad token gets.

A refused connection always gets an `error` frame (code `unauthorized`, or
`token_expired` for an expired token) and then close code 4001.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time

import jwt
import pytest
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from tornado.web import Application, RequestHandler

import gateway.security.auth
from gateway.config import Settings
from gateway.protocol.errors import CloseCode
from tests.conftest import SECRET, free_port, token
from tests.support import ec_key, public_pem, publish, rsa_key


async def refused(client, code: str = "unauthorized", says: str = "") -> None:
    """The connection gets `error` with `code` (mentioning `says`) and closes with 4001."""
    err = await client.expect("error")
    assert err["code"] == code, err
    assert says in err["message"], err
    assert await client.closed() == CloseCode.UNAUTHORIZED


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict, payload: dict, key: bytes | None = None) -> str:
    """A hand-made JWT: lets a test sign with any algorithm/key pairing, however wrong."""
    signing = b64(json.dumps(header).encode()) + "." + b64(json.dumps(payload).encode())
    sig = b"" if key is None else hmac.new(key, signing.encode(), hashlib.sha256).digest()
    return signing + "." + b64(sig)


def claims(sub: str = "user-1", ttl: int = 600) -> dict:
    return {"sub": sub, "exp": int(time.time()) + ttl}


# -- the three ways in ---------------------------------------------------------


async def test_header_token_connects(gateway, ws_client):
    client = await ws_client(gateway, token("alice"), handshake=False)
    assert (await client.expect("connected"))["user"] == "alice"


async def test_first_message_auth_connects_and_echoes_id(gateway, ws_client):
    client = await ws_client(gateway)
    connected = await client.request({"type": "auth", "token": token("alice"), "id": 1})
    assert connected["type"] == "connected" and connected["user"] == "alice"
    assert connected["id"] == 1
    assert (await client.expect("subscribed"))["channel"] == "user:alice"


async def test_query_token_connects(gateway, ws_client):
    client = await ws_client(gateway, path=f"/ws?token={token('alice')}")
    assert (await client.expect("connected"))["user"] == "alice"


async def test_query_token_refused_when_disabled(make_gateway, ws_client):
    """allow_query_token=False: `?token=` -> unauthorized 'query-string tokens are disabled'."""
    gw = await make_gateway(allow_query_token=False)
    client = await ws_client(gw, path=f"/ws?token={token('alice')}")
    await refused(client, says="query-string tokens are disabled")


async def test_empty_auth_message_says_token_missing_when_query_disabled(make_gateway, ws_client):
    """An `auth` message with an empty token is 'token missing', not about query strings."""
    gw = await make_gateway(allow_query_token=False)
    client = await ws_client(gw)
    await client.send({"type": "auth", "token": ""})
    await refused(client, says="token missing")


async def test_query_disabled_still_accepts_header_and_message(make_gateway, ws_client):
    gw = await make_gateway(allow_query_token=False)
    by_header = await ws_client(gw, token("alice"), handshake=False)
    assert (await by_header.expect("connected"))["user"] == "alice"
    by_message = await ws_client(gw)
    assert (await by_message.request({"type": "auth", "token": token("bob")}))["user"] == "bob"


async def test_ping_allowed_before_auth(gateway, ws_client):
    client = await ws_client(gateway)
    assert (await client.request({"type": "ping", "id": 1}))["type"] == "pong"


async def test_subscribe_before_auth_is_unauthorized(gateway, ws_client):
    """Anything but auth/ping before authenticating -> unauthorized 'authenticate first', 4001."""
    client = await ws_client(gateway)
    await client.send({"type": "subscribe", "channel": "system:a", "id": 3})
    err = await client.expect("error")
    assert err["id"] == 3
    assert err["code"] == "unauthorized" and "authenticate first" in err["message"]
    assert await client.closed() == CloseCode.UNAUTHORIZED


async def test_auth_timeout_closes(make_gateway, ws_client):
    """No auth within auth_timeout -> unauthorized 'no auth message within the timeout', 4001."""
    gw = await make_gateway(auth_timeout=0.2)
    client = await ws_client(gw)
    await refused(client, says="within the timeout")


# -- bad tokens ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "code", "says"),
    [
        (lambda: token("alice", ttl=-60), "token_expired", "expired"),
        (lambda: jwt.encode(claims(), "another-secret-0123456789abcdef-0123456789", "HS256"),
         "unauthorized", "signature"),
        (lambda: jwt.encode(claims(), None, algorithm="none"), "unauthorized", "'none'"),
        (lambda: forge({"alg": "None", "typ": "JWT"}, claims()), "unauthorized", "'None'"),
        (lambda: jwt.encode(claims(), SECRET * 2, "HS512"), "unauthorized", "'HS512'"),
        (lambda: jwt.encode({"exp": int(time.time()) + 60}, SECRET, "HS256"),
         "unauthorized", "'sub'"),
        (lambda: jwt.encode({"sub": "alice"}, SECRET, "HS256"), "unauthorized", "'exp'"),
        (lambda: jwt.encode({"sub": "", "exp": int(time.time()) + 60}, SECRET, "HS256"),
         "unauthorized", "sub"),
        (lambda: "not-a-jwt", "unauthorized", "not a JWT"),
        (lambda: token("alice")[:-4] + "AAAA", "unauthorized", "signature"),
    ],
    ids=["expired", "wrong-signature", "alg-none", "alg-None-forged", "alg-not-allowed",
         "missing-sub", "missing-exp", "empty-sub", "garbage", "tampered"],
)
async def test_bad_header_token_is_refused(gateway, ws_client, bad, code, says):
    client = await ws_client(gateway, bad(), handshake=False)
    await refused(client, code, says)


async def test_bad_token_in_auth_message_is_refused(gateway, ws_client):
    client = await ws_client(gateway)
    await client.send({"type": "auth", "token": token("alice", ttl=-60), "id": 7})
    err = await client.expect("error")
    assert err["id"] == 7 and err["code"] == "token_expired"
    assert await client.closed() == CloseCode.UNAUTHORIZED


@pytest.mark.parametrize("value", [None, 42, ""], ids=["missing", "number", "empty"])
async def test_auth_message_without_token_is_refused(gateway, ws_client, value):
    client = await ws_client(gateway)
    await client.send({"type": "auth", "token": value} if value is not None else {"type": "auth"})
    await refused(client, says="token missing")


async def test_audience_and_issuer_are_checked(make_gateway, ws_client):
    gw = await make_gateway(jwt_audience="herald", jwt_issuer="https://idp.test")
    good = token("alice", extra={"aud": "herald", "iss": "https://idp.test"})
    ok = await ws_client(gw, good, handshake=False)
    assert (await ok.expect("connected"))["user"] == "alice"
    wrong_aud = await ws_client(gw, token("a", extra={"aud": "other", "iss": "https://idp.test"}),
                                handshake=False)
    await refused(wrong_aud, says="ud")
    wrong_iss = await ws_client(gw, token("a", extra={"aud": "herald", "iss": "https://evil"}),
                                handshake=False)
    await refused(wrong_iss, says="ssuer")


# -- refresh and expiry ------------------------------------------------------------


async def test_refresh_with_same_sub_is_authenticated(gateway, ws_client):
    client = await ws_client(gateway, token("alice", ttl=60))
    reply = await client.request({"type": "auth", "token": token("alice", ttl=7200), "id": 9})
    assert reply["type"] == "authenticated" and reply["id"] == 9
    assert reply["expires"] > time.time() + 3600
    # Subscriptions survive a refresh.
    await publish_marker(gateway, "alice")
    assert (await client.expect("message"))["event"] == "marker"


async def publish_marker(gw, user: str) -> None:
    await publish(gw, f"user:{user}", "marker", {})


async def test_refresh_with_another_sub_closes_4001(gateway, ws_client):
    """A refresh token for another user -> unauthorized 'must keep its sub', 4001."""
    client = await ws_client(gateway, token("alice"))
    await client.send({"type": "auth", "token": token("mallory"), "id": 2})
    err = await client.expect("error")
    assert err["id"] == 2 and "keep its sub" in err["message"]
    assert await client.closed() == CloseCode.UNAUTHORIZED


async def test_refresh_with_invalid_token_closes_4001(gateway, ws_client):
    client = await ws_client(gateway, token("alice"))
    await client.send({"type": "auth", "token": token("alice", ttl=-60)})
    await refused(client, "token_expired")


async def test_expiry_while_connected_sends_token_expired(gateway, ws_client):
    """No refresh before `exp` -> `token_expired` then close 4001."""
    client = await ws_client(gateway, token("alice", ttl=1))
    await refused(client, "token_expired", "expired")


async def test_refresh_postpones_expiry(gateway, ws_client):
    client = await ws_client(gateway, token("alice", ttl=1))
    reply = await client.request({"type": "auth", "token": token("alice", ttl=600)})
    assert reply["type"] == "authenticated"
    await asyncio.sleep(1.5)  # past the first token's expiry
    assert (await client.request({"type": "ping"}))["type"] == "pong"


# -- public keys: RS256 / ES256 via HERALD_JWT_PUBLIC_KEY ---------------------------


def _public_key_gateway_settings(pem: str) -> dict:
    """Settings as an operator gives them: one-line PEM with `\\n` escapes in the env."""
    env = {"HERALD_JWT_PUBLIC_KEY": pem.replace("\n", "\\n")}
    parsed = Settings.from_env(env)
    return {"jwt_public_key": parsed.jwt_public_key, "jwt_secret": ""}


@pytest.mark.parametrize(("make_key", "alg"), [(rsa_key, "RS256"), (ec_key, "ES256")])
async def test_public_key_tokens(make_gateway, ws_client, make_key, alg):
    key = make_key()
    gw = await make_gateway(**_public_key_gateway_settings(public_pem(key)))
    good = jwt.encode(claims("alice"), key, algorithm=alg)
    client = await ws_client(gw, good, handshake=False)
    assert (await client.expect("connected"))["user"] == "alice"
    other = make_key()
    forged = await ws_client(gw, jwt.encode(claims("alice"), other, algorithm=alg),
                             handshake=False)
    await refused(forged, says="signature")


async def test_hs256_refused_when_public_key_configured(make_gateway, ws_client):
    """Key confusion: an HS256 token (even HMAC'd with the public PEM) -> unauthorized."""
    key = rsa_key()
    pem = public_pem(key)
    gw = await make_gateway(**_public_key_gateway_settings(pem))
    with_secret = await ws_client(gw, token("alice"), handshake=False)
    await refused(with_secret, says="'HS256' is not accepted")
    confused = forge({"alg": "HS256", "typ": "JWT"}, claims("alice"), pem.encode())
    with_pem = await ws_client(gw, confused, handshake=False)
    await refused(with_pem, says="'HS256' is not accepted")


# -- JWKS from a real local HTTP server, with key rotation --------------------------


class JwksServer:
    """A real Tornado server publishing a JWKS document, counting its fetches."""

    def __init__(self) -> None:
        self.keys: list[dict] = []
        self.fetches = 0
        server = self

        class Handler(RequestHandler):
            def get(self) -> None:
                server.fetches += 1
                self.write({"keys": server.keys})

        self.http = HTTPServer(Application([(r"/jwks.json", Handler)]))
        sockets = bind_sockets(0, "127.0.0.1")
        self.http.add_sockets(sockets)
        self.url = f"http://127.0.0.1:{sockets[0].getsockname()[1]}/jwks.json"

    def publish(self, *entries: tuple[str, object]) -> None:
        self.keys = []
        for kid, key in entries:
            algo = RSAAlgorithm if isinstance(key, type(rsa_key())) else ECAlgorithm
            jwk = algo.to_jwk(key.public_key(), as_dict=True)
            jwk.update(kid=kid, use="sig")
            self.keys.append(jwk)


@pytest.fixture
async def jwks():
    server = JwksServer()
    yield server
    server.http.stop()


def signed(key, kid: str, sub: str = "alice", alg: str = "RS256") -> str:
    return jwt.encode(claims(sub), key, algorithm=alg, headers={"kid": kid})


async def test_jwks_keys_verify_tokens_by_kid(make_gateway, ws_client, jwks):
    rsa_a, ec_b = rsa_key(), ec_key()
    jwks.publish(("a", rsa_a), ("b", ec_b))
    gw = await make_gateway(jwt_secret="", jwt_jwks_url=jwks.url)
    first = await ws_client(gw, signed(rsa_a, "a"), handshake=False)
    assert (await first.expect("connected"))["user"] == "alice"
    second = await ws_client(gw, signed(ec_b, "b", "bob", "ES256"), handshake=False)
    assert (await second.expect("connected"))["user"] == "bob"
    assert jwks.fetches == 1  # cached
    wrong = await ws_client(gw, signed(rsa_key(), "a"), handshake=False)
    await refused(wrong, says="signature")


async def test_jwks_unknown_kid_refetch_is_rate_limited(make_gateway, ws_client, jwks):
    """Forged kids do not hammer the identity provider: one refetch per JWKS_MIN_REFRESH."""
    key = rsa_key()
    jwks.publish(("a", key))
    gw = await make_gateway(jwt_secret="", jwt_jwks_url=jwks.url)
    ok = await ws_client(gw, signed(key, "a"), handshake=False)
    await ok.expect("connected")
    for n in range(3):
        client = await ws_client(gw, signed(key, f"forged-{n}"), handshake=False)
        await refused(client, says="unknown key")
    assert jwks.fetches == 1


async def test_jwks_rotation_picks_up_new_kid(make_gateway, ws_client, jwks, monkeypatch):
    """After the provider rotates keys, a token with the new kid is accepted (one refetch)
    and one signed by the retired key is refused."""
    monkeypatch.setattr(gateway.security.auth, "JWKS_MIN_REFRESH", 0.0)
    old, new = rsa_key(), rsa_key()
    jwks.publish(("k1", old))
    gw = await make_gateway(jwt_secret="", jwt_jwks_url=jwks.url)
    before = await ws_client(gw, signed(old, "k1"), handshake=False)
    await before.expect("connected")
    jwks.publish(("k2", new))
    after = await ws_client(gw, signed(new, "k2", "bob"), handshake=False)
    assert (await after.expect("connected"))["user"] == "bob"
    assert jwks.fetches == 2
    retired = await ws_client(gw, signed(old, "k1"), handshake=False)
    await refused(retired, says="unknown key")


async def test_jwks_refuses_hs256(make_gateway, ws_client, jwks):
    jwks.publish(("a", rsa_key()))
    gw = await make_gateway(jwt_secret="", jwt_jwks_url=jwks.url)
    client = await ws_client(gw, token("alice"), handshake=False)
    await refused(client, says="'HS256' is not accepted")


async def test_jwks_unreachable_refuses_cleanly(make_gateway, ws_client):
    gw = await make_gateway(jwt_secret="",
                            jwt_jwks_url=f"http://127.0.0.1:{free_port()}/jwks.json")
    client = await ws_client(gw, signed(rsa_key(), "a"), handshake=False)
    await refused(client, says="unknown key")


async def test_jwks_single_key_without_kid(make_gateway, ws_client, jwks):
    """A provider with one key and tokens without `kid` (some do that) still verifies."""
    key = rsa_key()
    jwks.publish(("", key))
    for entry in jwks.keys:
        entry.pop("kid")
    gw = await make_gateway(jwt_secret="", jwt_jwks_url=jwks.url)
    tok = jwt.encode(claims("alice"), key, algorithm="RS256")
    client = await ws_client(gw, tok, handshake=False)
    assert (await client.expect("connected"))["user"] == "alice"


async def test_jwks_garbage_document_refuses_cleanly(make_gateway, ws_client, jwks):
    jwks.keys = [{"kty": "RSA", "kid": "a", "n": "not-base64!", "e": "AQAB"}]
    gw = await make_gateway(jwt_secret="", jwt_jwks_url=jwks.url)
    client = await ws_client(gw, signed(rsa_key(), "a"), handshake=False)
    await refused(client, says="unknown key")


async def test_refused_connections_are_counted_by_close_code(gateway, ws_client):
    client = await ws_client(gateway, token("alice", ttl=-60), handshake=False)
    await refused(client, "token_expired")
    registry = gateway.node.metrics.registry
    for _ in range(100):
        if registry.get_sample_value("herald_disconnects_total", {"code": "4001"}):
            break
        await asyncio.sleep(0.01)
    assert registry.get_sample_value("herald_disconnects_total", {"code": "4001"}) == 1
    assert registry.get_sample_value("herald_errors_total", {"code": "token_expired"}) == 1


async def test_refresh_with_fewer_rights_drops_what_it_no_longer_allows(gateway, ws_client):
    """A refreshed token without the admin role / channels grant -> each such subscription
    is dropped with an `error` naming its channel, and stops receiving; the rest stays."""
    old = token("alice", roles=["admin"], channels=["dashboard:*"])
    client = await ws_client(gateway, old)
    for channel in ("admin:metrics", "dashboard:sales", "system:news"):
        assert (await client.request({"type": "subscribe", "channel": channel}))[
            "type"] == "subscribed"
    await client.send({"type": "auth", "token": token("alice"), "id": 8})
    dropped = [await client.expect("error"), await client.expect("error")]
    assert sorted(e["channel"] for e in dropped) == ["admin:metrics", "dashboard:sales"]
    assert all(e["code"] == "forbidden" and "unsubscribed" in e["message"] for e in dropped)
    assert (await client.expect("authenticated"))["id"] == 8
    for channel in ("admin:metrics", "dashboard:sales", "system:news"):
        await publish(gateway, channel, "tick", {})
    msg = await client.expect("message")
    assert msg["channel"] == "system:news"  # still allowed to everyone
    await publish_marker(gateway, "alice")
    assert (await client.expect("message"))["event"] == "marker"


async def test_refresh_with_same_rights_keeps_everything(gateway, ws_client):
    grants = {"roles": ["admin"], "channels": ["dashboard:*"]}
    client = await ws_client(gateway, token("alice", **grants))
    await client.request({"type": "subscribe", "channel": "dashboard:sales"})
    reply = await client.request({"type": "auth", "token": token("alice", ttl=7200, **grants)})
    assert reply["type"] == "authenticated"
    await publish(gateway, "dashboard:sales", "tick", {})
    assert (await client.expect("message"))["channel"] == "dashboard:sales"


def test_hmac_secret_checks_run_once_per_secret_and_still_refuse_public_keys(monkeypatch):
    """HS* secrets are checked once (not per token), and an asymmetric key is refused every time."""
    hs256 = jwt.api_jws._jws_global_obj._algorithms["HS256"]
    assert isinstance(hs256, gateway.security.auth._CheckedHMAC)
    checks = []
    parent = jwt.algorithms.HMACAlgorithm.prepare_key
    monkeypatch.setattr(jwt.algorithms.HMACAlgorithm, "prepare_key",
                        lambda self, key: checks.append(key) or parent(self, key))
    secret = "once-checked-secret-0123456789abcdef"
    signed = jwt.encode({"sub": "u", "exp": time.time() + 60}, secret, algorithm="HS256")
    for _ in range(3):
        assert jwt.decode(signed, secret, algorithms=["HS256"])["sub"] == "u"
    assert checks.count(secret) == 1
    pem = public_pem(rsa_key())
    for _ in range(2):
        with pytest.raises(jwt.InvalidKeyError):
            jwt.decode(signed, pem, algorithms=["HS256"])
