"""A `RealtimeGateway`'s spec, defaulted and validated with the CRD's own schema.

A real API server applies the CRD's defaults and bounds before the operator
sees an object; this module applies the same ones again (from `crd.SPEC_SCHEMA`,
never a second copy) so that the operator behaves identically when it talks to
a server that does not (an old CRD, a test server), and so that a bad spec is
refused with the path of the bad field instead of a crash halfway through.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import jsonschema

from herald_operator.crd import SPEC_SCHEMA


class SpecError(ValueError):
    """The spec cannot be acted on; the message names the field."""


# What `kubectl apply` records of the manifest it sent, unknown fields included.
LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"


def applied_spec(metadata: Mapping[str, Any]) -> dict[str, Any] | None:
    """The spec as last applied with kubectl, or None when unknown (not applied, or garbled)."""
    raw = (metadata.get("annotations") or {}).get(LAST_APPLIED)
    if not raw:
        return None
    try:
        spec = json.loads(raw).get("spec")
    except (ValueError, AttributeError):
        return None
    return spec if isinstance(spec, dict) else None


def dropped_fields(applied: Any, stored: Any, where: str = "spec") -> list[str]:
    """Paths set in what was applied and absent from what the API server stored.

    The API server prunes fields its structural schema does not declare (a typo
    such as `minReplica`), silently unless the client shows the warning: the
    operator reports them so the user learns the setting never took effect."""
    if isinstance(applied, dict):
        if not isinstance(stored, dict):
            return []
        found: list[str] = []
        for key, value in applied.items():
            path = f"{where}.{key}"
            if key not in stored:
                found.append(path)
            else:
                found += dropped_fields(value, stored[key], path)
        return found
    if isinstance(applied, list) and isinstance(stored, list) and len(applied) == len(stored):
        found = []
        for i, (a, s) in enumerate(zip(applied, stored, strict=True)):
            found += dropped_fields(a, s, f"{where}[{i}]")
        return found
    return []


def apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    """Fill in `default`s the way a structural-schema API server does (recursively)."""
    if isinstance(value, dict) and "properties" in schema:
        for name, sub in schema["properties"].items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                value[name] = apply_defaults(sub, value[name])
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [apply_defaults(schema["items"], item) for item in value]
    return value


_VALIDATOR = jsonschema.Draft202012Validator(SPEC_SCHEMA)


def _path(error: jsonschema.ValidationError) -> str:
    parts = ["spec"]
    for part in error.absolute_path:
        parts.append(f"[{part}]" if isinstance(part, int) else f".{part}")
    return "".join(parts).replace(".[", "[")


@dataclass(frozen=True)
class SecretRef:
    name: str
    key: str

    @classmethod
    def parse(cls, raw: dict[str, Any] | None) -> SecretRef | None:
        return None if raw is None else cls(raw["name"], raw["key"])


@dataclass(frozen=True)
class ScalingSpec:
    """The numbers the scaling policy needs, nothing else (see `policy.decide`)."""

    min_replicas: int = 2
    max_replicas: int = 10
    target_connections: int = 5000
    target_messages: int = 0
    tolerance: float = 0.1
    up_min_step: int = 1
    up_max_step: int = 4  # replicas added within any `up_period` seconds, at most
    up_period: float = 15.0
    up_window: float = 0.0
    down_window: float = 300.0
    down_step: int = 1  # replicas removed within any `down_period` seconds, at most
    down_period: float = 15.0


@dataclass(frozen=True)
class GatewaySpec:
    image: str
    scaling: ScalingSpec
    autoscale: bool
    replicas: int | None
    image_pull_policy: str
    drain_seconds: int
    redis_url: str | None
    redis_secret: SecretRef | None
    redis_prefix: str
    rebalancing: bool
    rebalance_threshold: float
    max_shed_per_second: int
    raw: dict[str, Any] = field(repr=False, compare=False)

    @property
    def auth(self) -> dict[str, Any]:
        return self.raw["auth"]


def parse_spec(raw: dict[str, Any] | None) -> GatewaySpec:
    """Defaults applied, schema and cross-field rules checked; raises `SpecError`."""
    spec = apply_defaults(SPEC_SCHEMA, copy.deepcopy(dict(raw or {})))
    errors = sorted(_VALIDATOR.iter_errors(spec), key=lambda e: list(e.absolute_path))
    if errors:
        raise SpecError("; ".join(f"{_path(e)}: {e.message}" for e in errors[:5]))
    # The CRD's x-kubernetes-validations (CEL), checked here too.
    if spec["minReplicas"] > spec["maxReplicas"]:
        raise SpecError("spec.minReplicas must not exceed spec.maxReplicas")
    if spec["scaleUp"]["minStep"] > spec["scaleUp"]["maxStep"]:
        raise SpecError("spec.scaleUp.minStep must not exceed spec.scaleUp.maxStep")
    redis = spec["redis"]
    if ("url" in redis) == ("secretRef" in redis):
        raise SpecError("set exactly one of spec.redis.url and spec.redis.secretRef")
    if "jwtSecretRef" in spec["auth"] and "jwtPublicKeyRef" in spec["auth"]:
        raise SpecError("set at most one of spec.auth.jwtSecretRef and spec.auth.jwtPublicKeyRef")
    up, down, rebalancing = spec["scaleUp"], spec["scaleDown"], spec["rebalancing"]
    return GatewaySpec(
        image=spec["image"],
        scaling=ScalingSpec(
            min_replicas=spec["minReplicas"],
            max_replicas=spec["maxReplicas"],
            target_connections=spec["targetConnectionsPerReplica"],
            target_messages=spec["targetMessagesPerReplica"],
            tolerance=float(spec["tolerance"]),
            up_min_step=up["minStep"],
            up_max_step=up["maxStep"],
            up_period=float(up["periodSeconds"]),
            up_window=float(up["stabilizationWindowSeconds"]),
            down_window=float(down["stabilizationWindowSeconds"]),
            down_step=down["step"],
            down_period=float(down["periodSeconds"]),
        ),
        autoscale=spec["autoscale"],
        replicas=spec.get("replicas"),
        image_pull_policy=spec["imagePullPolicy"],
        drain_seconds=spec["drainSeconds"],
        redis_url=redis.get("url"),
        redis_secret=SecretRef.parse(redis.get("secretRef")),
        redis_prefix=redis["prefix"],
        rebalancing=rebalancing["enabled"],
        rebalance_threshold=float(rebalancing["threshold"]),
        max_shed_per_second=rebalancing["maxShedPerSecond"],
        raw=spec,
    )
