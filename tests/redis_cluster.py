"""A real Redis Cluster on loopback for the tests: 3 masters, 1 replica each.

Six `redis-server` processes (Debian's 7.x) with `--cluster-enabled yes`,
joined by `redis-cli --cluster create --cluster-replicas 1`. The node
timeout is 1 s, so a SIGKILLed master's replica takes over within a couple
of seconds, as it would in production after `cluster-node-timeout`.

Helpers do to the cluster what operations and failures do to a real one:
`kill_master` (SIGKILL, then wait for the replica's promotion), `restart`
(the killed node rejoins as a replica), `migrate_slot` (CLUSTER SETSLOT
IMPORTING/MIGRATING, MIGRATE of the keys, SETSLOT NODE on every master —
what `redis-cli --cluster reshard` does, for one slot). Every wait is
bounded and fails the test loudly.
"""

from __future__ import annotations

import dataclasses
import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import NoReturn

NODE_TIMEOUT_MS = 1000


class ClusterFailure(RuntimeError):
    """The cluster did not do what a helper waited for (a test or benchmark fails on it)."""


def fail(message: str) -> NoReturn:
    raise ClusterFailure(message)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cluster_ports(count: int) -> list[int]:
    """Ports whose cluster-bus twins (port + 10000) are free too."""
    ports: list[int] = []
    tries = 0
    while len(ports) < count:
        tries += 1
        if tries > 2000:
            fail("no free loopback ports for a Redis Cluster")
        port = random.randint(20000, 29999)
        if port not in ports and _port_free(port) and _port_free(port + 10000):
            ports.append(port)
    return ports


def command(port: int, *args: str, timeout: float = 5.0) -> str:
    """One command through `redis-cli` (raw output), for the fixture's own use."""
    out = subprocess.run(
        ["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args],
        capture_output=True, text=True, timeout=timeout, check=False,
    )
    return out.stdout.strip()


@dataclasses.dataclass
class ClusterNode:
    port: int
    dir: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        binary = shutil.which("redis-server")
        if binary is None:
            fail("redis-server is not installed (./dev.sh test installs it)")
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1",
             "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
             "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
             # A replica may always take over, however long its master was silent.
             "--cluster-replica-validity-factor", "0",
             # Replicas sync at once (the default waits 5 s for more of them).
             "--repl-diskless-sync-delay", "0",
             "--save", "", "--appendonly", "no", "--dir", str(self.dir),
             "--maxclients", "10000"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if command(self.port, "PING") == "PONG":
                return
            time.sleep(0.05)
        fail(f"redis cluster node {self.port} did not start")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            self.proc = None


@dataclasses.dataclass
class NodeInfo:
    id: str
    port: int
    master: bool
    master_id: str | None
    slots: list[tuple[int, int]]
    failed: bool


class RedisCluster:
    """Real cluster nodes (by default 3 masters, 1 replica each); `url` is Herald's form."""

    def __init__(self, root: Path, masters: int = 3, replicas: int = 1) -> None:
        self.masters_count = masters
        count = masters * (1 + replicas)
        self.replicas = replicas
        self.nodes = [ClusterNode(port, root / str(port)) for port in cluster_ports(count)]

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        if self.masters_count == 1 and not self.replicas:
            # `--cluster create` wants 3 masters; one node takes every slot itself.
            command(self.nodes[0].port, "CLUSTER", "ADDSLOTSRANGE", "0", "16383")
            self.wait_healthy()
            return
        out = subprocess.run(
            ["redis-cli", "--cluster", "create",
             *[f"127.0.0.1:{n.port}" for n in self.nodes],
             "--cluster-replicas", str(self.replicas), "--cluster-yes"],
            capture_output=True, text=True, timeout=60, check=False,
        )
        if out.returncode != 0:
            fail(f"redis-cli --cluster create failed: {out.stdout}\n{out.stderr}")
        self.wait_healthy()

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()

    @property
    def url(self) -> str:
        seeds = ",".join(f"127.0.0.1:{n.port}" for n in self.nodes[: self.masters_count])
        return f"redis+cluster://{seeds}"

    def live_port(self) -> int:
        for node in self.nodes:
            if node.alive:
                return node.port
        fail("every cluster node is down")

    # -- what the cluster looks like -------------------------------------------

    def topology(self) -> list[NodeInfo]:
        """`CLUSTER NODES` as seen by a live node."""
        infos = []
        for line in command(self.live_port(), "CLUSTER", "NODES").splitlines():
            fields = line.split()
            if len(fields) < 8:
                continue
            flags = fields[2].split(",")
            slots = []
            for item in fields[8:]:
                if item.startswith("["):
                    continue  # a slot being migrated/imported
                lo, _, hi = item.partition("-")
                slots.append((int(lo), int(hi or lo)))
            infos.append(NodeInfo(
                id=fields[0],
                port=int(fields[1].split("@")[0].rpartition(":")[2]),
                master="master" in flags,
                master_id=None if fields[3] == "-" else fields[3],
                slots=slots,
                failed="fail" in flags or "fail?" in flags,
            ))
        return infos

    def masters(self) -> list[NodeInfo]:
        return sorted((n for n in self.topology() if n.master and n.slots and not n.failed),
                      key=lambda n: n.port)

    def owner_port(self, slot: int) -> int:
        for info in self.masters():
            if any(lo <= slot <= hi for lo, hi in info.slots):
                return info.port
        fail(f"slot {slot} has no live owner")

    def keyslot(self, key: str) -> int:
        return int(command(self.live_port(), "CLUSTER", "KEYSLOT", key))

    def node(self, port: int) -> ClusterNode:
        return next(n for n in self.nodes if n.port == port)

    def state_ok(self, port: int) -> bool:
        return "cluster_state:ok" in command(port, "CLUSTER", "INFO")

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Every live node says `cluster_state:ok` and agrees on the masters; replicas in sync."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                live = [n for n in self.nodes if n.alive]
                if all(self.state_ok(n.port) for n in live):
                    infos = self.topology()
                    masters = [i for i in infos if i.master and i.slots and not i.failed]
                    replicas = [i for i in infos if not i.master and not i.failed]
                    want = self.masters_count
                    if len(masters) == want and len(replicas) == len(live) - want and all(
                        self._views_agree(n.port, masters) for n in live
                    ) and all(self._replicating(r.port) for r in replicas):
                        return
            except subprocess.TimeoutExpired:
                pass
            time.sleep(0.1)
        fail("redis cluster did not become healthy:\n"
                    + command(self.live_port(), "CLUSTER", "NODES"))

    def _replicating(self, port: int) -> bool:
        return "master_link_status:up" in command(port, "INFO", "replication")

    def _views_agree(self, port: int, masters: list[NodeInfo]) -> bool:
        want = {m.port for m in masters}
        seen = set()
        for line in command(port, "CLUSTER", "NODES").splitlines():
            fields = line.split()
            if len(fields) > 8 and "master" in fields[2] and "fail" not in fields[2]:
                seen.add(int(fields[1].split("@")[0].rpartition(":")[2]))
        return seen == want

    # -- faults and operations --------------------------------------------------

    def flush(self) -> None:
        for info in self.masters():
            command(info.port, "FLUSHALL")

    def kill_master(self, slot: int) -> int:
        """SIGKILL the master of `slot`; once its replica owns the slot, return the dead port."""
        port = self.owner_port(slot)
        self.node(port).kill()
        self.wait_owner_changed(slot, port)
        return port

    def owner_port_or_none(self, slot: int) -> int | None:
        for info in self.masters():
            if any(lo <= slot <= hi for lo, hi in info.slots):
                return info.port
        return None

    def wait_owner_changed(self, slot: int, old: int) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if self.owner_port_or_none(slot) not in (None, old) and all(
                    self.state_ok(n.port) for n in self.nodes if n.alive
                ):
                    return
            except subprocess.TimeoutExpired:
                pass
            time.sleep(0.05)
        fail(f"no replica took over slot {slot} after its master died")

    def kill_shard(self, slot: int) -> list[int]:
        """SIGKILL the master of `slot` and its replica: the shard is gone until `restart`."""
        owner = next(i for i in self.masters()
                     if any(lo <= slot <= hi for lo, hi in i.slots))
        ports = [owner.port] + [i.port for i in self.topology() if i.master_id == owner.id]
        for port in ports:
            self.node(port).kill()
        return ports

    def restart(self, *ports: int) -> None:
        """Start killed nodes again (same port and nodes.conf); they rejoin."""
        for port in ports:
            self.node(port).start()
        self.wait_healthy()

    def migrate_slot(self, slot: int) -> tuple[int, int]:
        """Move one slot, with its keys, to another master. Returns (from port, to port)."""
        masters = self.masters()
        source = next(m for m in masters if any(lo <= slot <= hi for lo, hi in m.slots))
        target = next(m for m in masters if m.port != source.port)
        command(target.port, "CLUSTER", "SETSLOT", str(slot), "IMPORTING", source.id)
        command(source.port, "CLUSTER", "SETSLOT", str(slot), "MIGRATING", target.id)
        for _ in range(10_000):
            keys = command(source.port, "CLUSTER", "GETKEYSINSLOT", str(slot), "100").split()
            if not keys:
                break
            out = command(source.port, "MIGRATE", "127.0.0.1", str(target.port), "", "0",
                          "5000", "KEYS", *keys)
            if out not in ("OK", "NOKEY"):
                fail(f"MIGRATE failed: {out}")
        for m in masters:
            command(m.port, "CLUSTER", "SETSLOT", str(slot), "NODE", target.id)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if all(self._owner_seen_by(n.port, slot) == target.port
                   for n in self.nodes if n.alive):
                return source.port, target.port
            time.sleep(0.05)
        fail(f"slot {slot} did not settle on {target.port}")

    def _owner_seen_by(self, port: int, slot: int) -> int | None:
        for line in command(port, "CLUSTER", "NODES").splitlines():
            fields = line.split()
            if len(fields) > 8 and "master" in fields[2]:
                for item in fields[8:]:
                    if item.startswith("["):
                        continue
                    lo, _, hi = item.partition("-")
                    if int(lo) <= slot <= int(hi or lo):
                        return int(fields[1].split("@")[0].rpartition(":")[2])
        return None

    def shard_channels(self, port: int) -> set[str]:
        """`PUBSUB SHARDCHANNELS` on one node."""
        return set(command(port, "PUBSUB", "SHARDCHANNELS").split())
