"""The smaller defects of issue 16's hostile probes, each fixed and pinned here.

(The 503 without Redis's address is in test_idempotency.py, the SSE
`subscribed` id in test_sse.py, the heartbeat close code in
test_ws_protocol.py.)
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import ssl

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from tornado.httpclient import AsyncHTTPClient

from gateway.broker.redis import RedisBroker
from tests.conftest import SECRET, token
from tests.support import public_pem, rsa_key
from tests.test_auth import _public_key_gateway_settings, claims, refused


async def test_a_nul_byte_in_a_static_path_is_a_404_without_a_traceback(gateway, caplog):
    client = AsyncHTTPClient()
    with caplog.at_level(logging.ERROR):
        for path in ("/static/demo.html%00.js", "/static/%00", "/client.js%00"):
            resp = await client.fetch(gateway.url + path, raise_error=False)
            assert resp.code == 404, (path, resp.code)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    ok = await client.fetch(gateway.url + "/static/demo.html", raise_error=False)
    assert ok.code == 200  # the real file is still served


@pytest.mark.parametrize("rid", [{"a": 1}, [1], 1.5, True])
async def test_a_request_id_that_is_not_a_string_or_integer_is_refused(gateway, ws_client, rid):
    client = await ws_client(gateway, token("ida"))
    reply = await client.request({"type": "ping", "id": rid})
    assert reply["type"] == "error" and reply["code"] == "bad_request", reply
    assert "id" not in reply  # not echoed back
    assert (await client.request({"type": "ping", "id": 7}))["id"] == 7


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
async def test_a_date_claim_given_as_a_string_is_refused(gateway, ws_client, claim):
    payload = claims("alice")
    payload[claim] = str(payload["exp"] if claim == "exp" else payload["exp"] - 1200)
    client = await ws_client(gateway, jwt.encode(payload, SECRET, algorithm="HS256"),
                             handshake=False)
    await refused(client, says=f"{claim} must be a number")


async def test_a_token_for_another_key_type_says_so(make_gateway, ws_client):
    """RS256 and ES256 both accepted, the configured key EC: an RS256 token met the
    wrong key type, and the message was a Python generator's repr."""
    ec_pem = public_pem(ec.generate_private_key(ec.SECP256R1()))
    gw = await make_gateway(**_public_key_gateway_settings(ec_pem))
    tok = jwt.encode(claims("alice"), rsa_key(), algorithm="RS256")
    client = await ws_client(gw, tok, handshake=False)
    err = await client.expect("error")
    assert err["code"] == "unauthorized"
    assert err["message"] == "the configured key cannot verify RS256 tokens (wrong key type)"
    assert "generator" not in err["message"]


def _self_signed(tmp_path) -> ssl.SSLContext:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "herald-test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert_path, key_path)
    return ctx


async def test_a_redis_tls_failure_is_logged_with_its_cause(tmp_path, caplog):
    """A TLS endpoint whose certificate nobody trusts: the log says so, not just
    'not reachable'."""

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0, ssl=_self_signed(tmp_path))
    port = server.sockets[0].getsockname()[1]
    broker = RedisBroker(f"rediss://127.0.0.1:{port}/0", timeout=1.0)
    try:
        with caplog.at_level(logging.WARNING, logger="herald.redis"):
            await broker.start()
    finally:
        await broker.close()
        server.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "herald.redis"]
    assert any("certificate verify failed" in line for line in lines), lines
    assert "certificate verify failed" in broker.last_error
