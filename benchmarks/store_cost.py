"""What a durable write costs, per publication: SQLite (WAL) vs an append-only log.

    python -m benchmarks.store_cost            # about 20 seconds
    python -m benchmarks.store_cost --quick

The figures behind the durable engine's choice of store (docs/operations.md):
the engine's own `Store.write` (one transaction per batch: history rows,
the channel's position and state) with `synchronous=NORMAL` and `FULL`, next
to the cheapest possible alternative, a log file that appends the same
records (`write` + `flush`, and with `fsync` for power-loss safety), before
that log pays for compaction. Batch sizes are what one event-loop turn
gathers: 1 (a quiet gateway) to 100 (a burst). Files in a temporary
directory on the same disk as `$TMPDIR`. A measurement, never a test.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from gateway.broker.store import Batch, Store
from gateway.protocol import wire
from gateway.protocol.publication import Publication

CHANNELS = 1000
DATA = {"jobId": "123", "status": "processing", "progress": 45, "stage": "inference",
        "message": "Running model inference on batch; " + "x" * 36}


def batches(count: int, size: int) -> list[Batch]:
    """`count` batches of `size` publications round-robin over CHANNELS, as the engine builds."""
    out, offsets = [], {}
    n = 0
    for _ in range(count):
        batch = Batch()
        for _ in range(size):
            channel = f"job:bench-{n % CHANNELS}"
            n += 1
            offset = offsets[channel] = offsets.get(channel, 0) + 1
            pub = Publication(channel, "progress", DATA, "epoch1", offset, time.time())
            batch.rows.append((channel, offset, wire.encode(pub.to_record())))
            batch.streams[channel] = ("epoch1", offset, time.time() + 3600,
                                      wire.encode({"progress": DATA}))
            if offset > 100:
                batch.trims.append((channel, offset - 99))
        out.append(batch)
    return out


def sqlite_cost(sync: str, work: list[Batch], root: Path) -> float:
    store = Store(Path(tempfile.mkdtemp(dir=root)) / "engine.sqlite3", sync)
    store.open()
    try:
        start = time.perf_counter()
        for batch in work:
            store.write(batch)
        return time.perf_counter() - start
    finally:
        store.close()


def log_cost(fsync: bool, work: list[Batch], root: Path) -> float:
    path = Path(tempfile.mkdtemp(dir=root)) / "engine.log"
    with path.open("ab") as log:
        start = time.perf_counter()
        for batch in work:
            log.write(b"".join(rec + b"\n" for _, _, rec in batch.rows))
            log.flush()
            if fsync:
                os.fsync(log.fileno())
        return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer publications")
    args = parser.parse_args(argv)
    total = 2000 if args.quick else 10000
    root = Path(tempfile.mkdtemp(prefix="herald-store-cost-"))
    one, five, fifteen = os.getloadavg()
    print(f"store cost per publication, {total:,} publications per cell, files in {root}; "
          f"load average {one:.2f} {five:.2f} {fifteen:.2f}")
    ways: list[tuple[str, Callable[[list[Batch], Path], float]]] = [
        ("sqlite WAL synchronous=NORMAL", lambda w, r: sqlite_cost("normal", w, r)),
        ("sqlite WAL synchronous=FULL", lambda w, r: sqlite_cost("full", w, r)),
        ("append-only log, write+flush", lambda w, r: log_cost(False, w, r)),
        ("append-only log, +fsync", lambda w, r: log_cost(True, w, r)),
    ]
    sizes = (1, 10, 100)
    print(f"{'':32}" + "".join(f"{f'batch {s}: us/pub':>18}{'commits/s':>11}" for s in sizes))
    for name, cost in ways:
        cells = []
        for size in sizes:
            # Batches of 1 under fsync are slow: fewer of them, the same per-publication figure.
            count = max(1, (total // size) // (10 if size == 1 and "FULL" in name else 1))
            seconds = cost(batches(count, size), root)
            cells.append(f"{1e6 * seconds / (count * size):18.1f}{count / seconds:11,.0f}")
        print(f"{name:32}" + "".join(cells), flush=True)


if __name__ == "__main__":
    main()
