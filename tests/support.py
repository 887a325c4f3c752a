"""Helpers for the issue-2 tests: HTTP calls that return (status, JSON), signing keys."""

from __future__ import annotations

from typing import Any

import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from tornado.httpclient import AsyncHTTPClient

from gateway.server import RunningGateway
from tests.conftest import api_headers


async def http(
    gw: RunningGateway,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    *,
    raw: bytes | None = None,
) -> tuple[int, Any]:
    """One real HTTP request; returns (status, parsed JSON body or raw text)."""
    payload = raw if raw is not None else (orjson.dumps(body) if body is not None else None)
    if method == "POST" and payload is None:
        payload = b""
    resp = await AsyncHTTPClient().fetch(
        gw.url + path, method=method, headers=headers or {}, body=payload, raise_error=False
    )
    text = resp.body or b""
    try:
        return resp.code, orjson.loads(text)
    except orjson.JSONDecodeError:
        return resp.code, text.decode()


async def publish(gw: RunningGateway, channel: str, event: str = "e", data: Any = None,
                  owner: str | None = None) -> dict[str, Any]:
    """Publish with the API key; fails the test unless the gateway accepts it."""
    body: dict[str, Any] = {"channel": channel, "event": event, "data": data}
    if owner is not None:
        body["owner"] = owner
    status, reply = await http(gw, "POST", "/api/v1/publish", body, api_headers())
    assert status == 200, reply
    return reply


async def register_job(gw: RunningGateway, job: str, owner: str) -> None:
    status, reply = await http(gw, "POST", "/api/v1/jobs", {"job": job, "owner": owner},
                               api_headers())
    assert status == 200, reply


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def public_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
