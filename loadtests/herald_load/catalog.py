"""The scenarios by name: what each proves and the defaults it runs with.

Kept free of user classes so options and docs can list scenarios without
importing Locust users; `scenarios.py` maps each name to its classes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ScenarioInfo:
    name: str
    proves: str
    # Option defaults for this scenario (an explicit command-line value wins).
    defaults: dict[str, Any] = field(default_factory=dict)


SCENARIOS: dict[str, ScenarioInfo] = {
    info.name: info
    for info in (
        ScenarioInfo(
            "storm",
            "Ramp to N connections at the spawn rate: the gateways accept them "
            "(connect p99), and every open connection is live (a 1/s broadcast "
            "heartbeat reaches all of them, none lost).",
            {"rate": 1.0, "check_connect_p99_ms": 5000.0},
        ),
        ScenarioInfo(
            "fanout",
            "J jobs x K viewers at R updates/s per job: job progress reaches every "
            "watcher of its job in order (p99 publish-to-deliver, zero lost).",
            {"jobs": 10, "rate": 2.0},
        ),
        ScenarioInfo(
            "broadcast",
            "One public channel watched by every connection: the node's fan-out "
            "of one publication to all (delivered msgs/s, p99, zero lost).",
            {"rate": 5.0},
        ),
        ScenarioInfo(
            "churn",
            "Viewers reconnect continuously and resubscribe with `since`: "
            "recovery replays exactly what they missed (zero lost, zero duplicates).",
            {"jobs": 10, "rate": 5.0},
        ),
        ScenarioInfo(
            "slow",
            "Slow consumers (tiny receive buffer, slow reads) on the same jobs as "
            "normal viewers: the normal ones keep their p99 and lose nothing; "
            "the slow ones are bounded (4008) and recover by offset.",
            {"jobs": 10, "rate": 10.0},
        ),
        ScenarioInfo(
            "soak",
            "Hours at a moderate steady rate with some churn: no slow leak "
            "(memory, latency drift, lost messages) and tokens refreshed in place.",
            {"jobs": 20, "rate": 1.0},
        ),
    )
}
