"""What an outbox row means: pure decisions, no I/O (the kopf way).

The documented mapping (docs/feed.md):

- a row of the jobs table (`--table`, default `jobs`) becomes a `progress`
  event on `job:{id}` with data `{jobId, status, progress, stage, message}`
  (the same message as `Publisher.job_progress`), owned by the row's
  `--owner-column` (default `user_id`); a terminal status (`completed`,
  `failed`, `cancelled`) also notifies `user:{owner}` — the gateway does that
  for every job publication;
- its idempotency key is `feed:<outbox id>`: one key per change, so a change
  republished after a crash is applied once;
- a row that cannot be mapped (another table, no id, no owner, no status, a
  progress that is not a number, a DELETE) or whose data is too big is a bad
  row: `Unmappable` with the reason, and the feed counts it, logs it with its
  key and moves it to `herald_outbox_dead`.

Whether a publish failure is worth retrying is decided here too (`retryable`).
"""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import Any

import orjson

# Publish failures that say nothing about the row: Herald or the way to it is
# unwell (or misconfigured, for `unauthorized`), so the row waits and is retried.
RETRYABLE = frozenset({"unavailable", "internal", "rate_limited", "unauthorized"})
# `{"jobId":,"status":,"progress":,"stage":,"message":}` around the values.
DATA_KEYS_BYTES = len(b'{"jobId":,"status":,"progress":,"stage":,"message":}') - len(b"[,,,,]")


class Unmappable(Exception):
    """This row cannot become a publication; `reason` says why (logged, kept in the dead table)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclasses.dataclass(frozen=True, slots=True)
class OutboxRow:
    id: int
    table: str
    op: str
    row: Any  # the row as JSON (to_jsonb)
    created_at: datetime

    @property
    def key(self) -> str:
        """The idempotency key of this change."""
        return f"feed:{self.id}"


@dataclasses.dataclass(frozen=True, slots=True)
class JobUpdate:
    """A job's progress, as `Publisher.job_progress` takes it."""

    job_id: str
    owner: str
    status: str
    progress: float
    stage: str | None
    message: str | None

    @property
    def channel(self) -> str:
        return f"job:{self.job_id}"


@dataclasses.dataclass(frozen=True, slots=True)
class JobsMapping:
    """Which table holds jobs and which of its columns say what."""

    table: str = "jobs"
    id_column: str = "id"
    owner_column: str = "user_id"
    status_column: str = "status"
    progress_column: str = "progress"
    stage_column: str = "stage"
    message_column: str = "message"
    max_bytes: int = 262144  # the gateway's HERALD_MAX_PUBLISH_BYTES default

    def map(self, change: OutboxRow) -> JobUpdate:
        """The job update this row announces, or `Unmappable`."""
        if change.table != self.table:
            raise Unmappable(f"no mapping for table {change.table!r}")
        if change.op not in {"INSERT", "UPDATE"}:
            raise Unmappable(f"{change.op} is not published")
        row = change.row
        if not isinstance(row, dict):
            raise Unmappable("the row is not a JSON object")
        job_id = _text(row.get(self.id_column))
        if job_id is None:
            raise Unmappable(f"no {self.id_column}")
        owner = _text(row.get(self.owner_column))
        if owner is None:
            raise Unmappable(f"no owner in {self.owner_column}")
        status = row.get(self.status_column)
        if not isinstance(status, str) or not status:
            raise Unmappable(f"no {self.status_column}")
        progress = row.get(self.progress_column)
        if progress is None:
            progress = 0
        if isinstance(progress, bool) or not isinstance(progress, int | float):
            raise Unmappable(f"{self.progress_column} is not a number")
        stage = _optional_text(row.get(self.stage_column))
        message = _optional_text(row.get(self.message_column))
        # The publication's data is these values under five short keys: its
        # size to within those keys' bytes, without building it twice.
        size = len(orjson.dumps((job_id, status, progress, stage, message))) + DATA_KEYS_BYTES
        if size > self.max_bytes:
            raise Unmappable(f"too big: {size} bytes > {self.max_bytes}")
        return JobUpdate(job_id, owner, status, progress, stage, message)


def retryable(code: str) -> bool:
    """A publish that failed with this protocol code: retry (True) or a bad row (False)."""
    return code in RETRYABLE


Mapped = tuple[OutboxRow, JobUpdate]


def in_channel_order(updates: list[Mapped]) -> list[list[Mapped]]:
    """Group a batch by channel, each group in outbox order: groups may go out
    concurrently, a group's rows one after the other (order is per channel)."""
    groups: dict[str, list[Mapped]] = {}
    for item in updates:
        groups.setdefault(item[1].channel, []).append(item)
    return list(groups.values())


def _text(value: Any) -> str | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | str):
        text = str(value)
        return text or None
    return None


def _optional_text(value: Any) -> str | None:
    return None if value is None else str(value)
