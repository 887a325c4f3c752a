"""The Locust side of direct-Redis publishing: a child process per publisher.

See redis_bridge.py for why a child process. Pipes of gevent's (patched)
subprocess are cooperative, so waiting for a reply yields to the viewers.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson

BRIDGE = Path(__file__).with_name("redis_bridge.py")


class BridgeError(Exception):
    """The bridge process is gone (bad URL, Herald not installed...)."""


class RedisBridge:
    def __init__(self, redis_url: str, prefix: str) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, str(BRIDGE), redis_url, prefix],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )

    def ready(self) -> str | None:
        """Wait until the bridge answers (Herald imported, loop running); None or why not."""
        try:
            reply = self.call({"op": "ping"})
        except BridgeError as exc:
            return str(exc)
        return None if reply.get("ok") else str(reply.get("error"))

    def call(self, request: dict[str, Any]) -> dict[str, Any]:
        """One request, one reply; raises BridgeError if the process died."""
        stdin, stdout = self._proc.stdin, self._proc.stdout
        assert stdin is not None and stdout is not None
        try:
            stdin.write(orjson.dumps(request) + b"\n")
            stdin.flush()
            line = stdout.readline()
        except OSError as exc:
            raise BridgeError(f"redis bridge: {exc}") from None
        if not line:
            raise BridgeError(f"redis bridge exited with {self._proc.wait()}")
        return orjson.loads(line)

    def close(self) -> None:
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
