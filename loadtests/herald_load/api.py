"""The few HTTP API calls viewers make besides their WebSocket.

- Job registration, before subscribing: a subscribe to a `job:` channel
  whose owner is not recorded gets `not_found`, so every process registers
  the jobs it is about to watch or publish, once. Registration is idempotent
  for the same owner, which makes it safe for many workers at once.
- A channel's current position, when a viewer stops: what it must still
  receive before it may say nothing was lost.
"""

from __future__ import annotations

import time
from urllib.parse import quote

import requests
from gevent.event import AsyncResult
from gevent.lock import Semaphore

from .options import Config
from .report import Reporter, ms_since

_registered: set[tuple[str, str]] = set()
_session = requests.Session()
_one_at_a_time = Semaphore()  # many viewers start at once: register each job once
_positions: dict[tuple[str, str], tuple[float, AsyncResult]] = {}
POSITION_SHARING_SECONDS = 1.0


def api_headers(config: Config) -> dict[str, str]:
    return {"Authorization": f"apikey {config.api_key}", "Content-Type": "application/json"}


def ensure_jobs(config: Config, job_ids: list[str], reporter: Reporter) -> bool:
    """Record `config.owner` as the owner of each job not registered by this process yet."""
    with _one_at_a_time:
        return all([_register(config, job, reporter) for job in job_ids])


def _register(config: Config, job: str, reporter: Reporter) -> bool:
    key = (config.host, job)
    if key in _registered:
        return True
    started = time.perf_counter()
    failure = None
    try:
        reply = _session.post(
            f"{config.host}/api/v1/jobs",
            json={"job": job, "owner": config.owner},
            headers=api_headers(config),
            timeout=10,
        )
        if reply.status_code != 200:
            failure = f"HTTP {reply.status_code}: {reply.text[:200]}"
    except requests.RequestException as exc:
        failure = f"{type(exc).__name__}: {exc}"
    reporter.record("POST", "register job", ms_since(started), failure=failure)
    if failure is None:
        _registered.add(key)
    return failure is None


def channel_position(
    config: Config, token: str, channel: str, reporter: Reporter
) -> tuple[str, int] | None:
    """The (epoch, offset) Herald holds for `channel` (the viewer's own JWT), or None.

    All viewers stop at once, K of them per channel: within a second they
    share one read per process. A read a moment old is still a sound target
    (everything up to it was published), so sharing costs no correctness.
    """
    key = (config.host, channel)
    shared = _positions.get(key)
    if shared is not None and time.monotonic() - shared[0] < POSITION_SHARING_SECONDS:
        return shared[1].get()
    result: AsyncResult = AsyncResult()
    _positions[key] = (time.monotonic(), result)
    position = _read_position(config, token, channel, reporter)
    result.set(position)
    if position is None:
        _positions.pop(key, None)  # the next viewer tries again
    return position


def _read_position(
    config: Config, token: str, channel: str, reporter: Reporter
) -> tuple[str, int] | None:
    started = time.perf_counter()
    failure = None
    position = None
    try:
        reply = requests.get(  # once per viewer, at stop: no pooled connection to hold
            f"{config.host}/api/v1/channels/{quote(channel, safe=':@=')}/state",
            headers={"Authorization": f"Bearer {token}"},
            timeout=10,
        )
        if reply.status_code == 200:
            body = reply.json()
            position = (str(body["epoch"]), int(body["offset"]))
        else:
            failure = f"HTTP {reply.status_code}: {reply.text[:200]}"
    except (requests.RequestException, ValueError, KeyError) as exc:
        failure = f"{type(exc).__name__}: {exc}"
    reporter.record("GET", "channel state", ms_since(started), failure=failure)
    return position
