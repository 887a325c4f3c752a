"""The few HTTP API calls viewers need before they subscribe (job registration).

A subscribe to a `job:` channel whose owner is not recorded gets
`not_found`, so every process registers the jobs it is about to watch or
publish, once. Registration is idempotent for the same owner, which is
what makes it safe for many workers to do it concurrently.
"""

from __future__ import annotations

import time

import requests
from gevent.lock import Semaphore

from .options import Config
from .report import Reporter, ms_since

_registered: set[tuple[str, str]] = set()
_session = requests.Session()
_one_at_a_time = Semaphore()  # many viewers start at once: register each job once


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
