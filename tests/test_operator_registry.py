"""The operator's registry reader against a real redis-server, and its API client's TLS setup."""

from __future__ import annotations

import base64
import datetime
import time

import kopf
import orjson
import pytest
import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from herald_operator.kube import _ssl_context
from herald_operator.registry import Registry, RegistryUnavailable
from tests.conftest import free_port
from tests.operator_harness import write_node


async def test_reads_fresh_entries_and_skips_stale_expired_and_malformed(redis_url):
    client = redis.Redis.from_url(redis_url)
    now = time.time()
    write_node(client, "gw-a", 120, msgs_out=33.5)
    write_node(client, "gw-b", 7, draining=True, ready=False)
    write_node(client, "gw-old", 999, updated=now - 60)  # heartbeat long gone
    client.zadd("herald:nodes", {"gw-expired": now})  # key already expired: gone
    client.zadd("herald:nodes", {"gw-bad": now})
    client.set("herald:node:gw-bad", b"{not json", ex=10)
    write_node(client, "other", 5, prefix="other:")  # another prefix, another fleet

    registry = Registry(redis_url, "herald:")
    try:
        nodes = {n.node: n for n in await registry.nodes(now)}
    finally:
        await registry.close()
    assert set(nodes) == {"gw-a", "gw-b"}
    assert nodes["gw-a"].connections == 120 and nodes["gw-a"].msgs_out_per_s == 33.5
    assert nodes["gw-b"].draining and not nodes["gw-b"].ready


async def test_negative_or_absurd_figures_are_not_trusted(redis_url):
    client = redis.Redis.from_url(redis_url)
    entry = {"node": "gw-x", "connections": -5, "msgs_out_per_s": "nan",
             "updated": time.time()}
    client.set("herald:node:gw-x", orjson.dumps(entry), ex=10)
    client.zadd("herald:nodes", {"gw-x": time.time()})
    registry = Registry(redis_url, "herald:")
    try:
        (node,) = await registry.nodes()
    finally:
        await registry.close()
    assert node.connections == 0 and node.msgs_out_per_s == 0.0


async def test_shed_is_published_on_the_node_control_channel(redis_url):
    client = redis.Redis.from_url(redis_url)
    pubsub = client.pubsub()
    pubsub.subscribe("herald:control:gw-a")
    pubsub.get_message(timeout=1)  # the subscribe confirmation
    registry = Registry(redis_url, "herald:")
    try:
        await registry.shed("gw-a", 12)
    finally:
        await registry.close()
    message = pubsub.get_message(timeout=2)
    assert orjson.loads(message["data"]) == {"cmd": "shed", "count": 12}
    pubsub.close()


async def test_unreachable_redis_is_reported_not_raised_raw():
    registry = Registry(f"redis://127.0.0.1:{free_port()}/0", "herald:")
    try:
        with pytest.raises(RegistryUnavailable, match="redis is unreachable"):
            await registry.nodes()
    finally:
        await registry.close()


def _self_signed() -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubernetes")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return pem, key_pem


def test_tls_context_from_kubeconfig_style_base64_data():
    pem, key_pem = _self_signed()
    info = kopf.ConnectionInfo(server="https://api.example:6443",
                               ca_data=base64.b64encode(pem).decode(),
                               certificate_data=base64.b64encode(pem).decode(),
                               private_key_data=base64.b64encode(key_pem).decode())
    ctx = _ssl_context(info)
    (ca,) = ctx.get_ca_certs()  # the cluster's CA only, not the system's
    assert ca["subject"] == ((("commonName", "kubernetes"),),)


def test_plain_http_and_insecure_servers_get_no_verification_context():
    assert _ssl_context(kopf.ConnectionInfo(server="http://127.0.0.1:8001")) is False
    assert _ssl_context(kopf.ConnectionInfo(server="https://x", insecure=True)) is False
