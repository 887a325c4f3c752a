"""How the load test reports into Locust's statistics (and so into its CSV/HTML).

Everything goes through `environment.events.request`, the one channel a
distributed run aggregates on the master. Rows, as `type name: one per ...`:

- `ws connect`: connection opened, timed to the `connected` frame;
- `ws subscribe <ns>` / `ws resubscribe <ns>`: subscribe answered (round trip);
- `ws ping`, `ws refresh token`: request answered (round trip);
- `ws close <code>`: a close we did not ask for (a failure unless expected);
- `ws error <code>`: an unsolicited `error` frame (failure);
- `deliver <event>`: message received, timed publish-to-deliver from `sent_at`;
- `deliver-slow <event>`: the same, received by a slow consumer;
- `check lost`: an offset never received (failure);
- `check duplicate`: an offset received twice (failure);
- `check epoch reset`: a channel's history was reset under us (failure);
- `check skipped (slow)`: an offset a slow consumer did not get (expected);
- `POST publish <ns>`, `POST register job`, `GET channel state`: HTTP API
  calls (round trip);
- `REDIS publish <ns>`, `REDIS start publisher`: direct-Redis publishing.

So "messages received" is the request count of the `deliver` rows, "lost"
is the request count of `check lost`, and unexpected closes by code are
the `ws close <code>` rows.
"""

from __future__ import annotations

import time
from typing import Any

WS = "ws"
DELIVER = "deliver"
DELIVER_SLOW = "deliver-slow"
CHECK = "check"

LOST = "lost"
DUPLICATE = "duplicate"
EPOCH_RESET = "epoch reset"
SKIPPED = "skipped (slow)"


class Failure(Exception):
    """What Locust shows in its failures table for one of our entries."""


def ms_since(started: float) -> float:
    """Milliseconds since a `time.perf_counter()` reading: Locust's unit."""
    return (time.perf_counter() - started) * 1000


def namespace(channel: str) -> str:
    return channel.partition(":")[0] + ":"


class Reporter:
    """Fires request events for one user; `slow` routes deliveries to their own rows."""

    def __init__(self, environment: Any, *, slow: bool = False) -> None:
        self._fire = environment.events.request.fire
        self.deliver_type = DELIVER_SLOW if slow else DELIVER

    def record(
        self,
        kind: str,
        name: str,
        ms: float = 0.0,
        *,
        length: int = 0,
        failure: str | None = None,
    ) -> None:
        self._fire(
            request_type=kind,
            name=name,
            response_time=ms,
            response_length=length,
            exception=Failure(failure) if failure is not None else None,
            context={},
        )

    def delivered(self, event: str, ms: float, length: int) -> None:
        self.record(self.deliver_type, event, ms, length=length)

    def check(self, name: str, count: int, detail: str, *, failure: bool = True) -> None:
        """`count` entries, so the CSV's request count is the number of messages concerned."""
        for _ in range(count):
            self.record(CHECK, name, failure=detail if failure else None)
