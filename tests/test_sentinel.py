"""`redis+sentinel://` URLs: gateways and publishers find the master through a real Sentinel."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.sdk.publisher import RedisPublisher
from tests.conftest import RedisProcess, free_port


@pytest.fixture
def sentinel(redis_process: RedisProcess, redis_url: str, tmp_path: Path) -> Iterator[int]:
    """A real Sentinel (redis-server --sentinel) watching the test Redis as `herald-main`."""
    port = free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
        f"sentinel monitor herald-main 127.0.0.1 {redis_process.port} 1\n"
        "sentinel down-after-milliseconds herald-main 5000\n"
    )
    binary = shutil.which("redis-server")
    assert binary is not None
    proc = subprocess.Popen([binary, str(conf), "--sentinel"], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                s.sendall(b"SENTINEL get-master-addr-by-name herald-main\r\n")
                if str(redis_process.port).encode() in s.recv(256):
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("sentinel did not start")
        time.sleep(0.05)
    yield port
    proc.kill()
    proc.wait()


async def test_gateway_and_publisher_reach_the_master_through_sentinel(sentinel, spawn_gateway):
    from tests.test_cluster import connect

    url = f"redis+sentinel://127.0.0.1:{sentinel}/herald-main"
    gw = spawn_gateway("gw-sentinel", HERALD_REDIS_URL=url)
    client = await connect(gw, "sam")
    async with RedisPublisher(url) as pub:
        pos = await pub.publish("user:sam", "hello", {"via": "sentinel"})
    msg = await client.expect("message")
    assert (msg["offset"], msg["data"]) == (pos["offset"], {"via": "sentinel"})
    await client.close()


async def test_a_sentinel_url_without_a_master_name_is_refused():
    with pytest.raises(ValueError, match="master name"):
        RedisPublisher("redis+sentinel://127.0.0.1:26379")
