"""One reconcile pass for one `RealtimeGateway`: read, decide, act, report.

Every trigger (create, spec change, resume, the periodic timer) runs this same
pass, so there is one code path to reason about:

1. parse the spec (a bad one is reported, never half-applied);
2. read the gateways' registry for this resource's pods;
3. decide the replica count (`policy.decide`; `spec.replicas` when autoscale is off);
4. before a scale-down, mark pods with their deletion cost (emptiest go first);
5. create or patch back the Deployment, Service and PDB (drift is corrected);
6. rebalance: ask gateways well above the mean to shed, within a rate budget;
7. return the status to write and the Events to post, with the reasons.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from herald_operator import manifests, metrics
from herald_operator.kube import Kube, path
from herald_operator.policy import Changes, Decision, History, Load, Memory, clamp, decide
from herald_operator.rebalance import DELETION_COST, NodeLoad, deletion_costs, plan_shed
from herald_operator.registry import NodeStats, RegistryPool, RegistryUnavailable
from herald_operator.spec import GatewaySpec, SpecError, applied_spec, dropped_fields, parse_spec

log = logging.getLogger("herald.operator")


@dataclass
class Context:
    """What every pass shares in one operator process."""

    kube: Kube
    registries: RegistryPool
    redis_url: str  # for resources whose Redis URL is in a Secret the operator cannot read
    interval: float
    locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    # The status each resource's last pass wrote, and when: the body kopf hands a handler
    # may not show it yet, and deciding from a stale status would repeat Events and
    # decisions. Only recent entries count: after a peering pause, another replica has
    # written newer status, and the body is the truth again.
    written: dict[str, tuple[float, dict[str, Any]]] = field(default_factory=dict)

    def lock(self, uid: str) -> asyncio.Lock:
        return self.locks.setdefault(uid, asyncio.Lock())

    def remember(self, uid: str, status: dict[str, Any]) -> None:
        merged = {**self.recall(uid), **status}
        self.written[uid] = (time.monotonic(), merged)

    def recall(self, uid: str) -> dict[str, Any]:
        entry = self.written.get(uid)
        if entry is None or time.monotonic() - entry[0] > 3 * self.interval:
            return {}
        return entry[1]

    def forget(self, uid: str) -> None:
        """The resource is gone: drop what was kept for it."""
        self.locks.pop(uid, None)
        self.written.pop(uid, None)

    async def close(self) -> None:
        await self.registries.close()
        await self.kube.close()


@dataclass
class Outcome:
    status: dict[str, Any] = field(default_factory=dict)
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (type, reason, message)

    def event(self, reason: str, message: str, warning: bool = False) -> None:
        self.events.append(("Warning" if warning else "Normal", reason, message))


def _now_iso(now: float, precise: bool = False) -> str:
    stamp = datetime.datetime.fromtimestamp(now, datetime.UTC)
    if precise:
        return stamp.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return stamp.strftime("%Y-%m-%dT%H:%M:%SZ")


class Conditions:
    """The resource's conditions, keeping lastTransitionTime unless the status flips."""

    def __init__(self, previous: list[dict[str, Any]], now: float) -> None:
        self.previous = {c.get("type"): c for c in previous or []}
        self.current: dict[str, dict[str, Any]] = {}
        self.now = now

    def set(self, kind: str, ok: bool, reason: str, message: str = "") -> bool:
        """Record a condition; True when its status changed (worth an Event)."""
        status = "True" if ok else "False"
        old = self.previous.get(kind)
        changed = old is None or old.get("status") != status
        since = _now_iso(self.now) if changed else old.get("lastTransitionTime", _now_iso(self.now))
        self.current[kind] = {"type": kind, "status": status, "reason": reason,
                              "message": message[:1000], "lastTransitionTime": since}
        return changed and (old is not None or not ok)

    def as_list(self) -> list[dict[str, Any]]:
        kept = {k: v for k, v in self.previous.items() if k not in self.current}
        return [*kept.values(), *self.current.values()]


def _live_pods(pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [p for p in pods
            if not p.get("metadata", {}).get("deletionTimestamp")
            and (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")]


def _ready(pod: dict[str, Any]) -> bool:
    status = pod.get("status") or {}
    return status.get("phase") == "Running" and any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or [])


def _pairs(status: Mapping[str, Any], key: str) -> tuple[tuple[float, int], ...]:
    """[[unix time, int], ...] from the status; a garbled entry is skipped, not fatal."""
    out = []
    for item in status.get(key) or []:
        try:
            out.append((float(item[0]), int(item[1])))
        except (TypeError, ValueError, IndexError):
            continue
    return tuple(out)


def _memory(status: Mapping[str, Any]) -> Memory:
    history: History = _pairs(status, "recommendations")
    changes: Changes = _pairs(status, "scaleChanges")
    return Memory(history, changes)


async def reconcile(ctx: Context, body: Mapping[str, Any], now: float) -> Outcome:
    meta = body["metadata"]
    name, namespace, uid = meta["name"], meta["namespace"], meta["uid"]
    status = {**(body.get("status") or {}), **ctx.recall(uid)}
    out = Outcome()
    conditions = Conditions(status.get("conditions") or [], now)
    out.status["observedGeneration"] = meta.get("generation", 0)
    try:
        spec = parse_spec(body.get("spec"))
    except SpecError as exc:
        if conditions.set("SpecValid", False, "InvalidSpec", str(exc)):
            out.event("InvalidSpec", str(exc), warning=True)
        out.status["conditions"] = conditions.as_list()
        return out
    conditions.set("SpecValid", True, "Valid")
    _check_applied(meta, body.get("spec"), conditions, out)

    pods = _live_pods(await ctx.kube.list(path("v1", "pods", namespace),
                                          manifests.selector_labels(name)))
    pod_names = {p["metadata"]["name"] for p in pods}
    # Pods that should be in the registry: ready ones (a starting or broken pod is not).
    running = sum(1 for p in pods if _ready(p))
    nodes = await _read_registry(ctx, spec, name, namespace, pod_names, now, conditions, out)

    deploy_url = path("apps/v1", "deployments", namespace, name)
    deploy = await ctx.kube.get(deploy_url)
    current = status.get("desiredReplicas")
    if current is None and deploy is not None:
        current = deploy.get("spec", {}).get("replicas")
    decision = _decide(spec, current, nodes, running, _memory(status), now)

    if decision.direction == "down" and pods:
        await _mark_deletion_costs(ctx, namespace, pods, nodes or [])

    deploy = await _ensure(ctx, out, "Deployment", deploy_url, deploy,
                           manifests.deployment(name, namespace, uid, spec, decision.replicas),
                           path("apps/v1", "deployments", namespace), namespace, name)
    svc_url = path("v1", "services", namespace, name)
    await _ensure(ctx, out, "Service", svc_url, await ctx.kube.get(svc_url),
                  manifests.service(name, namespace, uid, spec),
                  path("v1", "services", namespace), namespace, name)
    pdb_url = path("policy/v1", "poddisruptionbudgets", namespace, name)
    if spec.raw["pdb"]["enabled"]:
        await _ensure(ctx, out, "PodDisruptionBudget", pdb_url, await ctx.kube.get(pdb_url),
                      manifests.disruption_budget(name, namespace, uid, spec),
                      path("policy/v1", "poddisruptionbudgets", namespace), namespace, name)
    else:
        await ctx.kube.delete(pdb_url)

    deploy_status = deploy.get("status") or {}
    ready = int(deploy_status.get("readyReplicas") or 0)
    if decision.direction != "down" and nodes is not None:
        await _rebalance(ctx, spec, name, namespace, nodes, running, ready, decision, now,
                         _unix(status.get("lastRebalanceTime")), out)

    labels = (namespace, name)
    metrics.DESIRED.labels(*labels).set(decision.replicas)
    if decision.replicas != current and current is not None:
        direction = "up" if decision.replicas > current else "down"
        metrics.DECISIONS.labels(*labels, direction).inc()
        out.event("ScaledUp" if direction == "up" else "ScaledDown", decision.reason)
        out.status["lastScaleTime"] = _now_iso(now)
        out.status["lastScaleReason"] = decision.reason
    conditions.set("Available", ready >= min(decision.replicas, spec.scaling.min_replicas),
                   "ReplicasReady" if ready else "NoReadyReplicas",
                   f"{ready}/{decision.replicas} replicas ready")
    out.status.update({
        "desiredReplicas": decision.replicas,
        "replicas": int(deploy_status.get("replicas") or 0),
        "readyReplicas": ready,
        "selector": manifests.selector_string(name),
        "lastDecision": decision.reason,
        "recommendations": [[t, r] for t, r in decision.memory.history],
        "scaleChanges": [[t, d] for t, d in decision.memory.changes],
        "conditions": conditions.as_list(),
    })
    if nodes is not None:
        metrics.CONNECTIONS.labels(*labels).set(sum(n.connections for n in nodes))
        metrics.REPORTING.labels(*labels).set(len(nodes))
        out.status.update({
            "connections": sum(n.connections for n in nodes),
            "subscriptions": sum(n.subscriptions for n in nodes),
            "msgsInPerSecond": round(sum(n.msgs_in_per_s for n in nodes), 2),
            "msgsOutPerSecond": round(sum(n.msgs_out_per_s for n in nodes), 2),
            "reportingNodes": len(nodes),
        })
    return out


def _check_applied(meta: Mapping[str, Any], stored: Any, conditions: Conditions,
                   out: Outcome) -> None:
    """Say so when the API server dropped fields of the applied spec (unknown to the CRD)."""
    applied = applied_spec(meta)
    if applied is None:
        return
    dropped = dropped_fields(applied, stored or {})
    if not dropped:
        conditions.set("SpecApplied", True, "AsApplied")
        return
    message = (f"the API server dropped {', '.join(dropped[:10])}: not in the "
               "RealtimeGateway schema (misspelt?), so not in effect")
    if conditions.set("SpecApplied", False, "UnknownFields", message):
        out.event("UnknownFields", message, warning=True)


async def _read_registry(ctx: Context, spec: GatewaySpec, name: str, namespace: str,
                         pod_names: set[str], now: float, conditions: Conditions,
                         out: Outcome) -> list[NodeStats] | None:
    """This resource's fresh registry entries, or None when Redis cannot be read."""
    url = spec.redis_url or ctx.redis_url
    if not url:
        message = "spec.redis is a secretRef and the operator has no --redis-url"
        if conditions.set("RegistryFresh", False, "NoRedisURL", message):
            out.event("RegistryUnavailable", message, warning=True)
        return None
    try:
        everyone = await ctx.registries.get(url, spec.redis_prefix).nodes(now)
    except RegistryUnavailable as exc:
        metrics.REGISTRY_ERRORS.labels(namespace, name).inc()
        message = f"cannot read the registry: {exc}; holding replicas"
        if conditions.set("RegistryFresh", False, "RedisUnavailable", message):
            out.event("RegistryUnavailable", message, warning=True)
        return None
    nodes = [n for n in everyone if n.name in pod_names]
    if nodes:
        conditions.set("RegistryFresh", True, "Reporting",
                       f"{len(nodes)} of {len(pod_names)} pods reporting")
    elif conditions.set("RegistryFresh", False, "NoEntries",
                        f"no fresh registry entry for any of {len(pod_names)} pods"):
        out.event("RegistryStale", "no gateway reports in the registry; holding replicas",
                  warning=True)
    return nodes


def _decide(spec: GatewaySpec, current: int | None, nodes: list[NodeStats] | None,
            running: int, memory: Memory, now: float) -> Decision:
    if not spec.autoscale:
        fixed = clamp(spec.replicas if spec.replicas is not None else
                      (current or spec.scaling.min_replicas), spec.scaling)
        direction: Literal["up", "down", "hold"] = "hold"
        if current is not None and fixed != current:
            direction = "up" if fixed > current else "down"  # "down" sets deletion costs
        return Decision(fixed, direction, f"autoscale off: {fixed} replicas (spec.replicas)",
                        None, memory)
    if current is None:
        start = spec.scaling.min_replicas
        return Decision(start, "hold", f"new fleet: starting at minReplicas ({start})",
                        None, memory)
    load = None
    if nodes:
        load = Load(connections=sum(n.connections for n in nodes),
                    msgs_out_per_s=sum(n.msgs_out_per_s for n in nodes),
                    reporting=len(nodes), expected=max(running, len(nodes)))
    return decide(spec.scaling, int(current), load, memory, now)


async def _mark_deletion_costs(ctx: Context, namespace: str, pods: list[dict[str, Any]],
                               nodes: list[NodeStats]) -> None:
    costs = deletion_costs([p["metadata"]["name"] for p in pods],
                           {n.name: n.connections for n in nodes})
    for pod in pods:
        pod_name = pod["metadata"]["name"]
        value = str(costs[pod_name])
        if (pod["metadata"].get("annotations") or {}).get(DELETION_COST) == value:
            continue
        await ctx.kube.patch(path("v1", "pods", namespace, pod_name),
                             {"metadata": {"annotations": {DELETION_COST: value}}})


async def _ensure(ctx: Context, out: Outcome, kind: str, url: str,
                  actual: dict[str, Any] | None, desired: dict[str, Any],
                  collection: str, namespace: str, name: str) -> dict[str, Any]:
    if actual is None:
        created = await ctx.kube.create(collection, desired)
        out.event("Created", f"created {kind} {namespace}/{name}")
        return created
    # ownerReferences are set on create only: changing them later needs `delete` on the
    # child (OwnerReferencesPermissionEnforcement), which the operator is not granted.
    wanted = {"metadata": {"labels": desired["metadata"]["labels"]}, "spec": desired["spec"]}
    if "annotations" in desired["metadata"]:
        wanted["metadata"]["annotations"] = desired["metadata"]["annotations"]
    paths = manifests.drift(wanted, actual)
    if kind == "Deployment":
        gone = manifests.removals(desired, actual)
        if gone:
            paths.append(".spec.template (fields the spec dropped)")
            wanted = manifests.merged(wanted, gone)
    if not paths:
        return actual
    patched = await ctx.kube.patch(url, wanted)
    only_replicas = paths == [".spec.replicas"]
    if not only_replicas:
        metrics.DRIFT.labels(namespace, name, kind).inc()
        out.event("Updated", f"{kind} {namespace}/{name} brought in line with the spec "
                             f"({', '.join(paths[:5])})")
    return patched


async def _rebalance(ctx: Context, spec: GatewaySpec, name: str, namespace: str,
                     nodes: list[NodeStats], running: int, ready: int, decision: Decision,
                     now: float, last_shed: float | None, out: Outcome) -> None:
    """Shed toward the mean once every wanted pod runs, reports, and is ready."""
    if not spec.rebalancing or len(nodes) < 2:
        return
    if ready < decision.replicas or running < decision.replicas or len(nodes) < running:
        return
    plan = plan_shed([NodeLoad(n.node, n.connections, n.ready, n.draining, n.updated)
                      for n in nodes], now, last_shed, spec.rebalance_threshold,
                     spec.max_shed_per_second, spec.scaling.target_connections // 2)
    if not plan.shed:
        return
    try:
        registry = ctx.registries.get(spec.redis_url or ctx.redis_url, spec.redis_prefix)
        for node, count in plan.shed.items():
            await registry.shed(node, count)
    except RegistryUnavailable as exc:
        log.warning("rebalance of %s/%s failed: %s", namespace, name, exc)
        return
    metrics.SHED.labels(namespace, name).inc(sum(plan.shed.values()))
    mean = sum(n.connections for n in nodes) / len(nodes)
    text = ", ".join(f"{node} sheds {count}" for node, count in plan.shed.items())
    out.event("Rebalancing", f"{plan.reason}, mean {mean:.0f} connections per gateway: {text}")
    # With its fraction: the next shed waits for registry records written after it.
    out.status["lastRebalanceTime"] = _now_iso(now, precise=True)


def _unix(stamp: Any) -> float | None:
    """An RFC 3339 time from the status as unix time (None when absent or garbled)."""
    if not isinstance(stamp, str):
        return None
    try:
        return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None
