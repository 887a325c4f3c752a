"""Which users make up each scenario (catalog.py says what each one proves).

`select` runs on the master (or the single local process) when Locust
starts: it keeps only the chosen scenario's user classes and sets their
weights and publisher counts from the options. Workers keep every class,
because the master tells them which ones to spawn.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from locust import User

from .catalog import SCENARIOS
from .options import Config, config_of, scenario_names
from .users import (
    BroadcastPublisher,
    BroadcastViewer,
    ChurnViewer,
    JobPublisher,
    JobViewer,
    Publisher,
    SlowViewer,
)

Roles = Callable[[Config], dict[type[User], int]]

# Scenario -> its user classes and their weights (publishers get `fixed_count`
# = --publishers instead; their weight is ignored).
ROLES: dict[str, Roles] = {
    "storm": lambda c: {BroadcastViewer: 1, BroadcastPublisher: 0},
    "fanout": lambda c: {JobViewer: 1, JobPublisher: 0},
    "broadcast": lambda c: {BroadcastViewer: 1, BroadcastPublisher: 0},
    "churn": lambda c: {ChurnViewer: 1, JobPublisher: 0},
    "slow": lambda c: {
        JobViewer: round((1 - c.slow_ratio) * 100),
        SlowViewer: round(c.slow_ratio * 100),
        JobPublisher: 0,
    },
    "soak": lambda c: {JobViewer: 9, ChurnViewer: 1, JobPublisher: 0},
}
assert set(ROLES) == set(SCENARIOS), "every scenario needs its roles"


def _tag_tasks() -> None:
    """Tag each class's tasks with the scenarios it plays in, so `--tags NAME` works too.

    Classes share their base's task functions, so a task carries the union
    of its classes' scenarios; which classes run is decided by `select`.
    """
    probe = Config.__new__(Config)
    object.__setattr__(probe, "slow_ratio", 0.5)
    for name, roles in ROLES.items():
        for cls in roles(probe):
            for fn in cls.tasks:
                fn.locust_tag_set = getattr(fn, "locust_tag_set", set()) | {name}


_tag_tasks()


def select(environment: Any) -> list[str]:
    """Keep the scenario's user classes on `environment`; returns the scenario names."""
    config = config_of(environment)
    names = scenario_names(environment.parsed_options)
    chosen: dict[type[User], int] = {}
    for name in names:
        chosen.update(ROLES[name](config))
    classes = []
    for cls, weight in chosen.items():
        if issubclass(cls, Publisher):
            cls.fixed_count = config.publishers
        elif weight <= 0:
            continue
        else:
            cls.weight = weight
        classes.append(cls)
    environment.user_classes[:] = classes
    return names
