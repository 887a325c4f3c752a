"""The send floor: what the kernel alone charges one delivery, measured on this machine.

    python -m benchmarks.send_floor --conns 200 --rate 25 --seconds 3

A bare Python loop of `socket.send` of one W1-sized frame (204 bytes) to
`--conns` loopback TCP sockets whose peers another process reads (pinned to
the client core, as the generator is), the sender pinned to the server core:
first in bursts at `--rate` bursts/s (W1's light step: 5,000 deliveries/s over
200 connections is a burst every 40 ms, receivers asleep and woken per
burst), then back to back. Prints the sender's CPU µs per send for both: no
server written in Python delivers a frame for less than this, so a gateway's
"CPU µs per delivery" reads against it. cluster_bench runs it in the same
run and prints it beside the table.
"""

from __future__ import annotations

import argparse
import os
import selectors
import socket
import subprocess
import sys
import time

import orjson

from benchmarks.procs import CLIENT_CORE, SERVER_CORE
from benchmarks.rpc import ROOT

FRAME = b"\x81\x7e\x00\xc8" + b"x" * 200  # 204 bytes, like W1's message frame


def read_all(port: int, conns: int) -> None:
    """The peer: connect `conns` sockets and read them until every one is closed."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {CLIENT_CORE})
    sel = selectors.DefaultSelector()
    for _ in range(conns):
        s = socket.create_connection(("127.0.0.1", port))
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    open_ = conns
    while open_:
        for key, _ in sel.select(timeout=30):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if not sock.recv(1 << 16):
                sel.unregister(sock)
                sock.close()
                open_ -= 1


def _bursts(socks: list[socket.socket], seconds: float, period: float) -> tuple[float, int]:
    """CPU seconds spent sending, and sends made, for `seconds` of bursts every `period`."""
    sent, cpu = 0, 0.0
    deadline = time.monotonic() + seconds
    next_at = time.monotonic()
    while time.monotonic() < deadline:
        c0 = time.process_time()
        for s in socks:
            s.send(FRAME)
        cpu += time.process_time() - c0
        sent += len(socks)
        if period:
            next_at += period
            time.sleep(max(0.0, next_at - time.monotonic()))
    return cpu, sent


def measure(conns: int, rate: float, seconds: float) -> dict[str, float]:
    """Sender CPU µs per send, paced at `rate` bursts/s and back to back."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=conns)
    port = listener.getsockname()[1]
    reader = subprocess.Popen([sys.executable, "-m", "benchmarks.send_floor", "--read",
                               str(port), "--conns", str(conns)], cwd=ROOT)
    socks = [listener.accept()[0] for _ in range(conns)]
    listener.close()
    try:
        for s in socks:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _bursts(socks, min(0.5, seconds), 1 / rate)  # warm-up, not counted
        paced_cpu, paced_n = _bursts(socks, seconds, 1 / rate)
        b2b_cpu, b2b_n = _bursts(socks, seconds, 0.0)
    finally:
        for s in socks:
            s.close()
        reader.wait(timeout=30)
    return {"conns": conns, "rate": rate, "paced_us": 1e6 * paced_cpu / paced_n,
            "back_to_back_us": 1e6 * b2b_cpu / b2b_n, "back_to_back_sends": b2b_n}


def run_pinned(conns: int, rate: float, seconds: float) -> dict[str, float]:
    """`measure` in a process of its own on the server core (as a gateway runs)."""
    out = subprocess.run(["taskset", "-c", SERVER_CORE, sys.executable, "-m",
                          "benchmarks.send_floor", "--conns", str(conns), "--rate", str(rate),
                          "--seconds", str(seconds), "--json"],
                         cwd=ROOT, check=True, capture_output=True, timeout=120)
    return orjson.loads(out.stdout)


def describe(r: dict[str, float]) -> str:
    return (f"send floor ({r['conns']:.0f} loopback sockets, 204-byte frame): "
            f"{r['paced_us']:.1f} CPU us/send in bursts at {r['rate']:.0f}/s, "
            f"{r['back_to_back_us']:.1f} back to back")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conns", type=int, default=200)
    parser.add_argument("--rate", type=float, default=25.0, help="bursts per second (paced)")
    parser.add_argument("--seconds", type=float, default=3.0, help="each of the two phases")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--read", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.read:
        read_all(args.read, args.conns)
        return
    result = measure(args.conns, args.rate, args.seconds)
    print(orjson.dumps(result).decode() if args.json else describe(result))


if __name__ == "__main__":
    main()
