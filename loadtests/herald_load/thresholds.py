"""Pass/fail checks for headless runs, read from Locust's own statistics.

They run on the master (or the single local process) when Locust quits,
over the same aggregated figures the CSV and HTML reports show, and set
the process exit code: 1 when any check misses, so a CI job or a
Kubernetes Job fails when the deployment falls short.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from .options import Config
from .report import CHECK, DELIVER, DUPLICATE, LOST, WS

log = logging.getLogger("herald.checks")


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def _count(stats: Any, name: str, kind: str) -> int:
    entry = stats.entries.get((name, kind))
    return entry.num_requests if entry is not None else 0


def _publishes(stats: Any) -> tuple[int, int]:
    """Publish requests made and failed (HTTP and direct-Redis): the publisher's side.

    Shown next to `lost`, which is the viewers' side, so a failed run says
    whether publications never made it in or were published and missed.
    """
    rows = [
        entry
        for (name, kind), entry in stats.entries.items()
        if kind in ("POST", "REDIS") and name.startswith("publish ")
    ]
    return sum(e.num_requests for e in rows), sum(e.num_failures for e in rows)


def evaluate(stats: Any, config: Config) -> list[Check]:
    """Every check of the run; thresholds compare with `<` for latency, `<=` for counts."""
    checks: list[Check] = []
    delivers = sorted(
        (entry for (_, kind), entry in stats.entries.items() if kind == DELIVER),
        key=lambda e: e.name,
    )
    delivered = sum(e.num_requests for e in delivers)
    checks.append(
        Check(
            "delivered",
            delivered >= config.check_min_delivered,
            f"{delivered} messages delivered (minimum {config.check_min_delivered})",
        )
    )
    for entry in delivers:
        if entry.num_requests:
            p99 = entry.get_response_time_percentile(0.99)
            checks.append(
                Check(
                    f"p99 deliver {entry.name}",
                    p99 < config.check_p99_ms,
                    f"p99 {p99:.0f} ms (must be below {config.check_p99_ms:g} ms)",
                )
            )
    if config.check_connect_p99_ms is not None:
        connect = stats.entries.get(("connect", WS))
        p99 = None
        if connect is not None and connect.num_requests:
            p99 = connect.get_response_time_percentile(0.99)
        checks.append(
            Check(
                "p99 connect",
                p99 is not None and p99 < config.check_connect_p99_ms,
                f"p99 {'n/a' if p99 is None else f'{p99:.0f}'} ms "
                f"(must be below {config.check_connect_p99_ms:g} ms)",
            )
        )
    lost = _count(stats, LOST, CHECK)
    made, failed = _publishes(stats)
    checks.append(
        Check(
            "lost",
            lost <= config.check_max_lost,
            f"{lost} lost by viewers (at most {config.check_max_lost}); "
            f"publisher side: {failed} of {made} publish requests failed",
        )
    )
    reads = stats.entries.get(("channel state", "GET"))
    if reads is not None and reads.num_requests:
        # A viewer whose channel position could not be read cannot be judged:
        # its losses would be an unseen 0, so the run fails on it.
        checks.append(
            Check(
                "positions read",
                reads.num_failures == 0,
                f"{reads.num_failures} of {reads.num_requests} end-of-run position reads "
                f"failed (must be 0)",
            )
        )
    dups = _count(stats, DUPLICATE, CHECK)
    checks.append(
        Check(
            "duplicates",
            dups <= config.check_max_duplicates,
            f"{dups} duplicates (at most {config.check_max_duplicates})",
        )
    )
    ratio = stats.total.fail_ratio
    checks.append(
        Check(
            "failure ratio",
            ratio <= config.check_fail_ratio,
            f"{stats.total.num_failures}/{stats.total.num_requests} = {ratio:.2%} "
            f"(at most {config.check_fail_ratio:.2%})",
        )
    )
    return checks


def apply(environment: Any, config: Config) -> bool:
    """Log the verdict and set the exit code; True when every check passed."""
    checks = evaluate(environment.stats, config)
    for check in checks:
        log.info("%s %-24s %s", "PASS" if check.ok else "FAIL", check.name, check.detail)
    passed = all(c.ok for c in checks)
    log.info("Herald checks %s (scenario %s)", "PASSED" if passed else "FAILED", config.scenario)
    if not passed:
        environment.process_exit_code = 1
    elif not environment.runner.exceptions:
        # Failures within the allowed ratio are not an error; task crashes still are.
        environment.process_exit_code = 0
    return passed
