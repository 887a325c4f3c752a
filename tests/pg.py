"""A throwaway PostgreSQL cluster from Debian's `postgresql` package, on a free
loopback port, for the change-feed tests.

`initdb` and `postgres` refuse to run as root, and the tests run as root in
CI: as root the server runs as the `postgres` user through `setpriv` (which
execs, so the process we hold is the server itself). Durability is off
(fsync, synchronous_commit): a test database is thrown away anyway.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest


def _binary(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                   key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    path = found[-1] if found else shutil.which(name)
    if not path:
        pytest.fail(f"{name} not found: install Debian's postgresql (./dev.sh test does)")
    return path


@dataclasses.dataclass
class PostgresProcess:
    port: int
    dir: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _as_owner(self) -> list[str]:
        if os.geteuid() != 0:
            return []
        return ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", "--"]

    def init(self) -> None:
        data = self.dir / "data"
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.dir, user.pw_uid, user.pw_gid)
        subprocess.run(
            [*self._as_owner(), _binary("initdb"), "-D", str(data), "-U", "postgres",
             "--auth=trust", "--no-sync", "-E", "UTF8", "--locale=C"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120,
        )

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [*self._as_owner(), _binary("postgres"), "-D", str(self.dir / "data"),
             "-p", str(self.port), "-k", str(self.dir), "-c", "listen_addresses=127.0.0.1",
             "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
             "-c", "max_connections=50"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        import psycopg

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"postgres exited with {self.proc.returncode}")
            try:
                psycopg.connect(self.dsn, connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                time.sleep(0.1)
        pytest.fail("postgres did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            # SIGINT is the "fast" shutdown (SIGTERM, "smart", waits for every client to leave).
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def start_postgres(port: int) -> tuple[PostgresProcess, tempfile.TemporaryDirectory[str]]:
    tmp = tempfile.TemporaryDirectory(prefix="herald-pg-")
    server = PostgresProcess(port, Path(tmp.name))
    server.init()
    server.start()
    return server, tmp
