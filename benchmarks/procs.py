"""The processes a benchmark run starts and reads: redis-server, gateways, Socket.IO servers.

Servers under test are pinned to core 0 with `taskset -c 0`; the conductor
pins itself to core 1 first, so everything it starts without `taskset`
(redis-server, the generator, the publisher) inherits core 1. CPU time and
memory are read from /proc, the same way for every process.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from benchmarks.rpc import ROOT

SERVER_CORE = "0"
CLIENT_CORE = 1
SECRET = "bench-secret-0123456789abcdef0123456789abcdef"
API_KEY = "bench-api-key-0123456789"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def stop_on_sigterm() -> None:
    """SIGTERM raises SystemExit inside the event loop, so every `finally` runs and
    kills the processes the run started (a killed benchmark leaves none behind)."""

    def _raise(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _raise)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (/proc/PID/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def wait_seconds(pid: int) -> float:
    """Seconds the process's threads were runnable but waiting for a CPU (schedstat).

    On a shared machine this is the time other processes took from it: a
    figure measured while it is high says more about the neighbours.
    """
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[1])
        except (OSError, IndexError):
            continue  # a thread that ended meanwhile
    return total / 1e9


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def get_json(url: str, headers: dict[str, str] | None = None, timeout: float = 10) -> Any:
    request = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return orjson.loads(response.read())


def _raise_nofile() -> None:
    """In the child: the open-file soft limit up to the hard one (20,000 here)."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def pin_self_to_client_core() -> None:
    if hasattr(os, "sched_setaffinity") and os.cpu_count() and os.cpu_count() > 1:
        os.sched_setaffinity(0, {CLIENT_CORE})


@dataclass
class Proc:
    """A started process and where it listens."""

    name: str
    port: int
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def wait_ready(self, path: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log.read_text()[-2000:]}")
            with contextlib.suppress(OSError, ValueError):
                get_json(f"http://127.0.0.1:{self.port}{path}", timeout=1)
                return
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} not ready after {timeout}s")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()


@dataclass
class Redis:
    port: int
    popen: subprocess.Popen[bytes]
    dir: str

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        return self.popen.pid

    @classmethod
    def start(cls) -> Redis:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server is not installed (apt-get install redis-server)")
        port, workdir = free_port(), tempfile.mkdtemp(prefix="herald-bench-redis-")
        popen = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", workdir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(
                ("127.0.0.1", port), timeout=0.2
            ) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return cls(port, popen, workdir)
            time.sleep(0.05)
        popen.kill()
        raise SystemExit("redis-server did not start")

    def flushall(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(b"FLUSHALL\r\n")
            s.recv(16)

    def stop(self) -> None:
        self.popen.kill()
        self.popen.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def _spawn(name: str, module: str, env: dict[str, str], logdir: Path) -> subprocess.Popen[bytes]:
    log = logdir / f"{name}.log"
    return subprocess.Popen(
        ["taskset", "-c", SERVER_CORE, sys.executable, "-m", module, *(
            ["serve"] if module == "gateway" else [])],
        env=env, cwd=ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT,
        preexec_fn=_raise_nofile,
    )


@dataclass
class Cluster:
    """N servers of one system (Herald gateways or Socket.IO servers) on one Redis."""

    system: str  # "herald" | "sio" | "tornado" | "picows"
    redis: Redis
    logdir: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    servers: list[Proc] = field(default_factory=list)

    def start(self, count: int) -> None:
        base = {k: v for k, v in os.environ.items() if not k.startswith(("HERALD_", "BENCH_"))}
        for i in range(count):
            port = free_port()
            name = f"{self.system}-{i}"
            env = dict(base)
            if self.system == "herald":
                env.update(self.herald_env(port, name))
                module, ready = "gateway", "/readyz"
            else:
                env.update(BENCH_PORT=str(port), BENCH_REDIS_URL=self.redis.url,
                           BENCH_SECRET=SECRET)
                module = f"benchmarks.{self.system}_server"
                ready = "/readyz"
            popen = _spawn(name, module, env, self.logdir)
            proc = Proc(name, port, popen, self.logdir / f"{name}.log")
            self.servers.append(proc)
            proc.wait_ready(ready)

    def herald_env(self, port: int, node_id: str) -> dict[str, str]:
        env = {
            "HERALD_HOST": "127.0.0.1",
            "HERALD_PORT": str(port),
            "HERALD_NODE_ID": node_id,
            "HERALD_REDIS_URL": self.redis.url,
            "HERALD_JWT_SECRET": SECRET,
            "HERALD_API_KEY": API_KEY,
            "HERALD_DEMO": "false",
            "HERALD_LOG_LEVEL": "WARNING",
            "HERALD_STATE_DIR": str(self.logdir / "state"),
            # Every client comes from 127.0.0.1: the per-IP connect rate (a
            # production guard against floods from one address) would be the
            # only thing measured in the connect storm of W3.
            "HERALD_IP_CONNECT_RATE": "1000000",
            "HERALD_IP_CONNECT_BURST": "1000000",
        }
        env.update(self.extra_env)
        if env.get("HERALD_ENGINE") in {"memory", "durable"}:
            del env["HERALD_REDIS_URL"]  # an embedded engine: one gateway, no Redis
        return env

    @property
    def ports(self) -> list[int]:
        return [s.port for s in self.servers]

    @property
    def pids(self) -> list[int]:
        return [s.pid for s in self.servers]

    def messages_in(self) -> list[int]:
        """Publications each server has read from Redis so far."""
        out = []
        for s in self.servers:
            if self.system == "herald":
                stats = get_json(f"http://127.0.0.1:{s.port}/api/v1/stats",
                                 {"Authorization": f"apikey {API_KEY}"})
            else:
                stats = get_json(f"http://127.0.0.1:{s.port}/stats")
            out.append(int(stats["broker_messages_in"]))
        return out

    def stop(self) -> None:
        for s in self.servers:
            s.stop()
        self.servers.clear()
