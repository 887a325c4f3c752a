"""Herald load tests. Run: locust -f loadtests/locustfile.py --scenario NAME --host URL ...

See loadtests/README.md for the scenarios, options, checks and reports.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import gevent
import locust.stats
from herald_load import scenarios, thresholds
from herald_load.options import ConfigError, add_arguments, config_of
from herald_load.users import (  # noqa: F401 - Locust collects the user classes from here
    BroadcastPublisher,
    BroadcastViewer,
    ChurnViewer,
    JobPublisher,
    JobViewer,
    SlowViewer,
)
from locust import events
from locust.runners import MasterRunner, WorkerRunner

log = logging.getLogger("herald.loadtest")


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    add_arguments(parser)


@events.init.add_listener
def _select(environment: Any, **_: Any) -> None:
    if isinstance(environment.runner, WorkerRunner):
        return  # the master chooses; workers learn its options at spawn
    if isinstance(environment.runner, MasterRunner):
        _stop_workers_before_quitting(environment.runner)
    if not environment.host:
        return  # web UI without --host: checked when the test starts
    try:
        names = scenarios.select(environment)
    except ConfigError as exc:
        sys.exit(f"herald loadtest: {exc}")
    log.info("scenario %s: %s", ",".join(names), [c.__name__ for c in environment.user_classes])


def _stop_workers_before_quitting(runner: MasterRunner) -> None:
    """Make a master's quit stop the workers' users first, and wait for them.

    Viewers check, when they stop, that everything published reached them
    (`--drain-timeout`). A master that quits straight away (the end of a
    headless run) waits only half a second for its workers' last figures
    and would judge the run without those checks; stopping first waits
    until every worker has stopped its users.
    """
    quit_now = runner.quit

    def stop_then_quit() -> None:
        runner.stop()
        quit_now()

    runner.quit = stop_then_quit  # type: ignore[method-assign]


@events.test_start.add_listener
def _check_config(environment: Any, **_: Any) -> None:
    if isinstance(environment.runner, WorkerRunner):
        return
    try:
        scenarios.select(environment)
    except ConfigError as exc:
        log.error("herald loadtest: %s", exc)
        environment.runner.quit()


@events.quitting.add_listener
def _verdict(environment: Any, **_: Any) -> None:
    if isinstance(environment.runner, WorkerRunner) or not environment.host:
        return
    if getattr(environment.parsed_options, "csv_prefix", None):
        # Locust rewrites the --csv files once a second and not at exit, so the
        # final second would be missing from them (locustio/locust#1806): let
        # its writer make one more pass over the final figures.
        gevent.sleep(locust.stats.CSV_STATS_INTERVAL_SEC + 0.2)
    thresholds.apply(environment, config_of(environment))
