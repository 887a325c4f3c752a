"""Where a gateway spends its time: py-spy samples, folded into a top-N of functions.

py-spy (`pip install py-spy`, in the `bench` extra) attaches to the running
gateway by pid with `--nonblocking` (it does not pause the process) and
writes collapsed stacks (`frame;frame;... count`). Self time is the
innermost frame of a sample; total time counts a function once per sample
it appears in.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Any

_LINE = re.compile(r"^(.*) (\d+)$")
# Frames every sample passes through (the event loop, the entry point): no information.
_PLUMBING = ("<frozen runpy>", "asyncio/runners.py", "asyncio/base_events.py",
             "asyncio/events.py", "gateway/__main__.py", "gateway/cli.py")


def py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(found).exists():
        raise SystemExit("--profile needs py-spy (pip install -e '.[bench]')")
    return found


async def start(pid: int, duration: float, out: Path) -> asyncio.subprocess.Process:
    out.parent.mkdir(parents=True, exist_ok=True)
    return await asyncio.create_subprocess_exec(
        py_spy(), "record", "--pid", str(pid), "--duration", str(int(duration)),
        "--rate", "200", "--format", "raw", "--function", "--nonblocking", "-o", str(out),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )


async def finish(proc: asyncio.subprocess.Process, within: float) -> None:
    try:
        await asyncio.wait_for(proc.wait(), within)
    except TimeoutError:
        proc.kill()
        await proc.wait()


def top_functions(path: Path, count: int = 10) -> dict[str, Any]:
    """The `count` functions with the most self and total samples."""
    self_time: Counter[str] = Counter()
    total_time: Counter[str] = Counter()
    samples = 0
    if not path.exists():
        return {"samples": 0, "self": [], "total": []}
    for line in path.read_text().splitlines():
        match = _LINE.match(line)
        if not match:
            continue
        frames, n = match.group(1).split(";"), int(match.group(2))
        samples += n
        self_time[frames[-1]] += n
        for frame in set(frames):
            if not any(p in frame for p in _PLUMBING):
                total_time[frame] += n
    return {
        "samples": samples,
        "self": self_time.most_common(count),
        "total": total_time.most_common(count),
    }


def format_top(top: dict[str, Any]) -> list[str]:
    samples = max(top["samples"], 1)
    lines = [f"py-spy: {top['samples']} samples; top functions by self time:"]
    lines += [f"  {100 * n / samples:5.1f}%  {name}" for name, n in top["self"]]
    lines.append("by total time (inclusive; event-loop plumbing left out):")
    lines += [f"  {100 * n / samples:5.1f}%  {name}" for name, n in top["total"]]
    return lines
