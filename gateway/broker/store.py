"""The durable engine's file: SQLite in WAL mode, one writer, whole batches per transaction.

Everything here is synchronous and runs on the engine's one writer thread
(`durable.py`), so the event loop never waits for the disk. The tables
mirror the memory engine's structures exactly (a channel's position and
state, its kept history, job owners); the engine decides what changed and
this module only writes it, in one transaction per batch, so a restart
sees either all of a batch or none of it.

Why SQLite and not an append-only log: docs/operations.md ("The durable
engine") has the measured cost of both; in short SQLite trims and expires
in place (a log needs a compaction pass as large as everything kept), its
WAL survives a killed process after every commit, and the file can be
inspected with the `sqlite3` tool.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from gateway.config import DURABLE_SYNC, ConfigError

SCHEMA_VERSION = 1
STORE_FILE = "engine.sqlite3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS streams (
    channel TEXT PRIMARY KEY,
    epoch TEXT NOT NULL,
    offset INTEGER NOT NULL,
    expires REAL NOT NULL,
    state BLOB NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS history (
    channel TEXT NOT NULL,
    offset INTEGER NOT NULL,
    record BLOB NOT NULL,
    PRIMARY KEY (channel, offset)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS idempotency (
    channel TEXT NOT NULL,
    key TEXT NOT NULL,
    epoch TEXT NOT NULL,
    offset INTEGER NOT NULL,
    expires REAL NOT NULL,
    PRIMARY KEY (channel, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS owners (
    channel TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    expires REAL NOT NULL
) WITHOUT ROWID;
"""


class StoreError(ConfigError):
    """The store cannot be opened (locked by another process, wrong version, unwritable).

    A `ConfigError`: it is the state directory setting that has to change,
    and `herald serve` reports it in one line like any bad setting.
    """


@dataclass(slots=True)
class StreamRow:
    epoch: str
    offset: int
    expires: float
    state: dict[str, Any]
    records: list[dict[str, Any]] = field(default_factory=list)  # history, oldest first


@dataclass(slots=True)
class Loaded:
    """What a restart restores: live channels (soonest-expiring first) and owners."""

    streams: dict[str, StreamRow]
    owners: dict[str, tuple[str, float]]
    keys: list[tuple[str, str, str, int, float]]  # idempotency keys, oldest first


@dataclass(slots=True)
class Batch:
    """One transaction: channels rewritten or dropped, history rows added or trimmed, owners."""

    # channel -> (epoch, offset, expires, state JSON), or None to drop the channel
    streams: dict[str, tuple[str, int, float, bytes] | None] = field(default_factory=dict)
    # channels whose every history row goes first (dropped, or a new epoch)
    cleared: list[str] = field(default_factory=list)
    # (channel, offset below which history rows go)
    trims: list[tuple[str, int]] = field(default_factory=list)
    rows: list[tuple[str, int, bytes]] = field(default_factory=list)
    owners: dict[str, tuple[str, float] | None] = field(default_factory=dict)
    # idempotency keys applied: (channel, key, epoch, offset, expires)
    keys: list[tuple[str, str, str, int, float]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.streams or self.owners or self.keys)


class Store:
    """The open file. Not thread-safe: one thread (the engine's writer) uses it."""

    def __init__(self, path: Path, synchronous: str = "normal") -> None:
        if synchronous not in DURABLE_SYNC:
            raise StoreError(f"synchronous must be one of {DURABLE_SYNC}, not {synchronous!r}")
        self.path = path
        self._synchronous = synchronous
        self._db: sqlite3.Connection | None = None
        self._lock_fd: int | None = None

    def open(self) -> None:
        """Create or open the file; refuse a second process on the same file."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._lock_fd = os.open(str(self.path) + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StoreError(f"cannot create {self.path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._release()
            raise StoreError(
                f"{self.path} is in use by another herald process: give this one its own "
                "HERALD_STATE_DIR, or HERALD_ENGINE=memory"
            ) from None
        try:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={self._synchronous.upper()}")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                db.close()
                raise StoreError(
                    f"{self.path} has store version {version}; this Herald reads "
                    f"{SCHEMA_VERSION} (move the file away to start empty)"
                )
            db.executescript(_SCHEMA)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.Error as exc:
            self._release()
            raise StoreError(f"cannot open {self.path}: {exc}") from None
        self._db = db

    def load(self, now: float | None = None) -> Loaded:
        """Everything still live; what expired while the process was down is deleted."""
        db = self._conn
        now = time.time() if now is None else now
        with self._transaction():
            db.execute(
                "DELETE FROM history WHERE channel IN "
                "(SELECT channel FROM streams WHERE expires <= ?)", (now,),
            )
            db.execute("DELETE FROM streams WHERE expires <= ?", (now,))
            db.execute("DELETE FROM owners WHERE expires <= ?", (now,))
            db.execute("DELETE FROM idempotency WHERE expires <= ?", (now,))
        streams = {
            channel: StreamRow(epoch, offset, expires, orjson.loads(state))
            for channel, epoch, offset, expires, state in db.execute(
                "SELECT channel, epoch, offset, expires, state FROM streams ORDER BY expires"
            )
        }
        for channel, record in db.execute(
            "SELECT channel, record FROM history ORDER BY channel, offset"
        ):
            row = streams.get(channel)
            if row is not None:
                row.records.append(orjson.loads(record))
        owners = {
            channel: (owner, expires)
            for channel, owner, expires in db.execute("SELECT channel, owner, expires FROM owners")
        }
        keys = list(db.execute(
            "SELECT channel, key, epoch, offset, expires FROM idempotency ORDER BY expires"
        ))
        return Loaded(streams, owners, keys)

    def write(self, batch: Batch) -> None:
        """Apply one batch in one transaction (all of it or, on an error, none)."""
        db = self._conn
        with self._transaction():
            if batch.cleared:
                db.executemany(
                    "DELETE FROM history WHERE channel = ?", [(c,) for c in batch.cleared]
                )
            if batch.trims:
                db.executemany(
                    "DELETE FROM history WHERE channel = ? AND offset < ?", batch.trims
                )
            if batch.rows:
                db.executemany("INSERT OR REPLACE INTO history VALUES (?, ?, ?)", batch.rows)
            kept = [(c, *v) for c, v in batch.streams.items() if v is not None]
            dropped = [(c,) for c, v in batch.streams.items() if v is None]
            if kept:
                db.executemany("INSERT OR REPLACE INTO streams VALUES (?, ?, ?, ?, ?)", kept)
            if dropped:
                db.executemany("DELETE FROM streams WHERE channel = ?", dropped)
            owners = [(c, *v) for c, v in batch.owners.items() if v is not None]
            gone = [(c,) for c, v in batch.owners.items() if v is None]
            if owners:
                db.executemany("INSERT OR REPLACE INTO owners VALUES (?, ?, ?)", owners)
            if gone:
                db.executemany("DELETE FROM owners WHERE channel = ?", gone)
            if batch.keys:
                db.executemany(
                    "INSERT OR REPLACE INTO idempotency VALUES (?, ?, ?, ?, ?)", batch.keys
                )

    def close(self) -> None:
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._db.close()
            self._db = None
        self._release()

    @property
    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreError("store is not open")
        return self._db

    @contextlib.contextmanager
    def _transaction(self):  # type: ignore[no-untyped-def]
        db = self._conn
        db.execute("BEGIN IMMEDIATE")
        try:
            yield
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):  # a failed COMMIT may have ended it
                db.execute("ROLLBACK")
            raise

    def _release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor drops the flock
            self._lock_fd = None
