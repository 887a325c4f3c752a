"""The operator process (kopf, `herald-operator run`) against kmock and a real Redis.

No cluster exists here: kmock is the Kubernetes API, enforcing the RBAC the
chart renders for the operator, the owner-reference admission rule and the
CRD's structural schema (tests/operator_harness.py): every test here fails if
the operator makes a request the chart's Role does not grant.
`FleetController` plays the ReplicaSet controller; the registry entries are
written with redis-py exactly as gateways write them.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis

from herald_operator.rebalance import DELETION_COST, PACE_CAP_SECONDS, SETTLE_SECONDS
from herald_operator.spec import LAST_APPLIED
from tests.conftest import free_port
from tests.operator_harness import (
    GATEWAYS,
    Api,
    FleetController,
    OperatorProcess,
    chart_authorizer,
    gateway,
    gateway_path,
    kube_server,
    ns_path,
    wait_for,
    write_node,
)

pytestmark = pytest.mark.timeout(120)

async def events(api: Api, reason: str | None = None) -> list[dict[str, Any]]:
    found = await api.items(ns_path("v1", "events"))
    return [e for e in found if reason is None or e.get("reason") == reason]


async def deployment(api: Api, name: str = "gw") -> dict[str, Any] | None:
    return await api.get(ns_path("apps/v1", "deployments", name))


async def replicas(api: Api) -> int | None:
    deploy = await deployment(api)
    return None if deploy is None else deploy["spec"]["replicas"]


@pytest.fixture
async def api():
    async with kube_server() as server:
        yield server


@pytest.fixture
async def operator(api: Api, tmp_path: Path, redis_url: str):
    started: list[OperatorProcess] = []

    def start(*args: str) -> OperatorProcess:
        proc = OperatorProcess(api, tmp_path, "--standalone", "--interval", "1",
                               "--metrics-port", "0", *args, redis_url=redis_url)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        await proc.stop()


async def test_creating_a_gateway_yields_deployment_service_and_pdb(api, operator):
    proc = operator()
    created = await api.post(GATEWAYS, gateway())
    uid = created["metadata"]["uid"]

    deploy = await wait_for(lambda: deployment(api), "the Deployment", proc=proc)
    svc = await wait_for(lambda: api.get(ns_path("v1", "services", "gw")), "the Service")
    pdb = await wait_for(lambda: api.get(ns_path("policy/v1", "poddisruptionbudgets", "gw")),
                         "the PDB")
    for obj in (deploy, svc, pdb):
        (owner,) = obj["metadata"]["ownerReferences"]
        assert owner["uid"] == uid and owner["kind"] == "RealtimeGateway" and owner["controller"]
    assert deploy["spec"]["replicas"] == 2  # starts at minReplicas
    pod = deploy["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["herald", "serve"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert "preStop" in container["lifecycle"]
    assert pod["terminationGracePeriodSeconds"] == 5 + 7 + 10  # preStop + drain + margin
    env = {e["name"]: e for e in container["env"]}
    assert env["HERALD_DRAIN_SECONDS"]["value"] == "7"
    assert env["HERALD_NODE_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["HERALD_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "herald-redis", "key": "redis-url"}
    assert env["HERALD_JWT_SECRET"]["valueFrom"]["secretKeyRef"]["key"] == "jwt-secret"
    assert container["securityContext"]["runAsNonRoot"] is True
    assert svc["spec"]["selector"] == deploy["spec"]["selector"]["matchLabels"]
    assert pdb["spec"]["maxUnavailable"] == 1

    status = await wait_for(
        lambda: _status(api, "desiredReplicas"), "status.desiredReplicas", proc=proc)
    assert status["desiredReplicas"] == 2
    assert status["selector"] == ("app.kubernetes.io/instance=gw,"
                                  "app.kubernetes.io/name=herald-gateway")
    created_events = await wait_for(lambda: events(api, "Created"), "Created events")
    assert {e["involvedObject"]["name"] for e in created_events} == {"gw"}

    # Deleting it: kopf's finalizer (it stops the timer first) is released at once; the
    # garbage collector takes the children by their owner references.
    assert "herald.io/operator" in (await api.get(gateway_path("gw")))["metadata"]["finalizers"]
    await api.delete(gateway_path("gw"))

    async def gone() -> bool:
        return await api.get(gateway_path("gw")) is None
    await wait_for(gone, "the RealtimeGateway to go", proc=proc)
    assert "ERROR" not in proc.log_tail(10**6)


async def _status(api: Api, key: str, name: str = "gw") -> dict[str, Any] | None:
    body = await api.get(gateway_path(name))
    status = (body or {}).get("status") or {}
    return status if key in status else None


async def test_spec_change_rolls_out_and_drift_is_corrected(api, operator):
    proc = operator()
    await api.post(GATEWAYS, gateway())
    await wait_for(lambda: deployment(api), "the Deployment", proc=proc)

    await api.patch(gateway_path("gw"), {"spec": {"image": "herald:v2", "drainSeconds": 30}})

    async def rolled_out():
        deploy = await deployment(api)
        pod = deploy["spec"]["template"]["spec"]
        return pod["containers"][0]["image"] == "herald:v2" and \
            pod["terminationGracePeriodSeconds"] == 45
    await wait_for(rolled_out, "the new image and grace period", proc=proc)

    # Someone edits the Deployment by hand: the operator puts it back.
    deploy = await deployment(api)
    tampered = copy.deepcopy(deploy["spec"]["template"]["spec"]["containers"])
    tampered[0]["image"] = "evil:latest"
    await api.patch(ns_path("apps/v1", "deployments", "gw"),
                    {"spec": {"template": {"spec": {"containers": tampered}}}})
    await wait_for(rolled_out, "the drift corrected", proc=proc)
    assert await wait_for(lambda: events(api, "Updated"), "an Updated event")

    # A pod-template override added, then dropped from the spec, leaves the Deployment too.
    await api.patch(gateway_path("gw"), {"spec": {"podTemplate": {
        "nodeSelector": {"pool": "edge", "zone": "a"}, "tolerations": [{"key": "edge"}]}}})

    async def pod_spec_has(selector, tolerations):
        pod = (await deployment(api))["spec"]["template"]["spec"]
        return pod.get("nodeSelector") == selector and pod.get("tolerations") == tolerations
    await wait_for(lambda: pod_spec_has({"pool": "edge", "zone": "a"}, [{"key": "edge"}]),
                   "the node selector and tolerations", proc=proc)
    await api.patch(gateway_path("gw"), {"spec": {"podTemplate": {
        "nodeSelector": {"zone": None}, "tolerations": None}}})
    await wait_for(lambda: pod_spec_has({"pool": "edge"}, None), "them gone", proc=proc)

    # Someone deletes the Service: it comes back.
    await api.delete(ns_path("v1", "services", "gw"))
    assert await api.get(ns_path("v1", "services", "gw")) is None
    await wait_for(lambda: api.get(ns_path("v1", "services", "gw")), "the Service back",
                   proc=proc)


async def test_bad_spec_is_reported_not_applied(api, operator):
    proc = operator()
    await api.post(GATEWAYS, gateway(minReplicas=5, maxReplicas=2))
    status = await wait_for(lambda: _status(api, "conditions"), "conditions", proc=proc)
    (cond,) = [c for c in status["conditions"] if c["type"] == "SpecValid"]
    assert cond["status"] == "False" and "minReplicas" in cond["message"]
    (event,) = await wait_for(lambda: events(api, "InvalidSpec"), "an InvalidSpec event")
    assert event["type"] == "Warning"
    assert await deployment(api) is None


async def test_registry_load_scales_up_then_down_after_the_window(api, operator, redis_url):
    client = redis.Redis.from_url(redis_url)
    metrics_port = free_port()
    proc = operator("--metrics-port", str(metrics_port))
    await api.post(GATEWAYS, gateway())
    async with FleetController(api, "gw") as fleet:
        await wait_for(lambda: _pods_are(fleet, 2), "2 pods", proc=proc)

        # 450 connections at 100 per replica: 5 replicas, reached in steps of at most 2.
        async def loaded():
            pods = [p["metadata"]["name"] for p in await fleet.pods()]
            for i, pod in enumerate(sorted(pods)):
                write_node(client, pod, 450 // len(pods) + (1 if i < 450 % len(pods) else 0))
            return await replicas(api) == 5
        await wait_for(loaded, "5 replicas", proc=proc)
        history = [v.get("spec", {}).get("replicas") for v in _versions(api, "deployments")]
        steps = [b - a for a, b in itertools.pairwise(history)
                 if a is not None and b is not None and b > a]
        assert steps and max(steps) <= 2, history
        status = await wait_for(lambda: _status(api, "lastScaleReason"), "lastScaleReason")
        assert "scaling up" in status["lastScaleReason"]
        assert (await wait_for(lambda: events(api, "ScaledUp"), "ScaledUp events"))

        # Load drops to 120 (2 replicas' worth): nothing happens before the 6 s window...
        lowered_at = time.monotonic()
        costs = {}

        async def lowered():
            pods = sorted(p["metadata"]["name"] for p in await fleet.pods())
            for i, pod in enumerate(pods):
                costs[pod] = 50 if i == 0 else 70 // (len(pods) - 1)
                write_node(client, pod, costs[pod])
            return await replicas(api) == 2
        while time.monotonic() - lowered_at < 4:
            await lowered()
            assert await replicas(api) == 5, "scaled down inside the stabilisation window"
            await asyncio.sleep(0.3)
        # ...then it steps down one replica at a time, emptiest pods first.
        await wait_for(lowered, "2 replicas after the window", timeout=60, proc=proc)
        assert (await wait_for(lambda: events(api, "ScaledDown"), "ScaledDown events"))
        pods_left = {p["metadata"]["name"] for p in await fleet.pods()}
        assert pods_left, "pods remain"
        annotated = [p for p in await fleet.pods()
                     if DELETION_COST in (p["metadata"].get("annotations") or {})]
        assert annotated, "deletion costs were set on the pods"
        removed_costs = [costs.get(p, 0) for p in fleet.removed]
        kept_costs = [costs[p] for p in pods_left if p in costs]
        assert max(removed_costs) <= min(kept_costs), (fleet.removed, pods_left, costs)

        # status.replicas mirrors what the Deployment has (the scale subresource reads it).
        status = await wait_for(lambda: _status_is(api, "replicas", 2), "status.replicas == 2")
    assert status["desiredReplicas"] == 2 and status["reportingNodes"] >= 2
    assert status["connections"] > 0 and status["readyReplicas"] == 2
    assert any(c["type"] == "RegistryFresh" and c["status"] == "True"
               for c in status["conditions"])
    async with aiohttp.ClientSession() as http, \
            http.get(f"http://127.0.0.1:{metrics_port}/metrics") as rsp:
        text = await rsp.text()
    assert 'herald_operator_scale_decisions_total{direction="up",gateway="gw"' in text


def _versions(api: Api, plural: str) -> list[dict[str, Any]]:
    for key, obj in api.handler.objects.items():
        if key[0].plural == plural:
            return [v.raw for v in obj.history if v is not None]
    return []


async def _pods_are(fleet: FleetController, count: int) -> bool:
    return len(await fleet.pods()) == count


async def test_rebalancing_asks_the_fullest_gateways_to_shed_within_the_budget(
        api, operator, redis_url):
    client = redis.Redis.from_url(redis_url)
    control = client.pubsub()
    control.psubscribe("herald:control:*")
    proc = operator()
    await api.post(GATEWAYS, gateway(rebalancing={"enabled": True, "threshold": 0.2,
                                                  "maxShedPerSecond": 30},
                                     targetConnectionsPerReplica=600))
    async with FleetController(api, "gw") as fleet:
        await wait_for(lambda: _pods_are(fleet, 2), "2 pods", proc=proc)
        # A just-added empty gateway next to a full one: gw-0 holds everything.
        commands: list[tuple[float, str, dict[str, Any]]] = []

        async def shed_seen():
            write_node(client, "gw-0", 400)
            write_node(client, "gw-1", 0)
            while (message := control.get_message(timeout=0.05)) is not None:
                if message["type"] == "pmessage":
                    commands.append((time.monotonic(), message["channel"].decode(),
                                     orjson.loads(message["data"])))
            return len(commands) >= 2
        await wait_for(shed_seen, "two shed requests", proc=proc)
    assert {channel for _, channel, _ in commands} == {"herald:control:gw-0"}
    for _, _, command in commands:
        # Paced by time: 30 connections/s, at most PACE_CAP_SECONDS of it per round.
        assert command["cmd"] == "shed" and 0 < command["count"] <= 30 * PACE_CAP_SECONDS
    # One pass per second, but the second shed waited for records newer than the first.
    assert commands[1][0] - commands[0][0] >= SETTLE_SECONDS - 0.5
    assert await wait_for(lambda: events(api, "Rebalancing"), "a Rebalancing event")
    assert (await _status(api, "lastRebalanceTime"))["lastRebalanceTime"]
    control.close()


async def test_stale_registry_never_scales_down(api, operator, redis_url):
    client = redis.Redis.from_url(redis_url)
    proc = operator()
    await api.post(GATEWAYS, gateway(scaleDown={"stabilizationWindowSeconds": 1, "step": 5,
                                              "periodSeconds": 1}))
    async with FleetController(api, "gw") as fleet:
        async def loaded():
            for pod in await fleet.pods():
                write_node(client, pod["metadata"]["name"], 200)
            return await replicas(api) == 6
        await wait_for(loaded, "6 replicas", proc=proc)
        # Every gateway stops reporting (Redis lost them): far past the 1 s window,
        # the operator holds the replicas and says why.
        client.flushall()
        status = await wait_for(lambda: _condition(api, "RegistryFresh", "False"),
                                "RegistryFresh=False", proc=proc)
        assert "no fresh registry entry" in status["message"]
        await asyncio.sleep(4)
        assert await replicas(api) == 6
        assert len(await fleet.pods()) == 6
        assert await wait_for(lambda: events(api, "RegistryStale"), "a RegistryStale event")
        status = await _status(api, "lastDecision")
        assert "holding" in status["lastDecision"]


async def _condition(api: Api, kind: str, value: str) -> dict[str, Any] | None:
    status = await _status(api, "conditions") or {}
    for cond in status.get("conditions", []):
        if cond["type"] == kind and cond["status"] == value:
            return cond
    return None


async def test_peering_keeps_one_replica_active_and_fails_over_a_sigkill(api, tmp_path, redis_url):
    await api.post(ns_path("kopf.dev/v1", "kopfpeerings"), {
        "apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": "herald"}})

    def start(priority: int) -> OperatorProcess:
        return OperatorProcess(api, tmp_path, "--peering", "herald", "--priority",
                               str(priority), "--interval", "1", "--metrics-port", "0",
                               redis_url=redis_url)

    leader = start(200)
    standby = None
    try:
        def registered(priority: int):
            async def check():
                peering = await api.get(ns_path("kopf.dev/v1", "kopfpeerings", "herald"))
                return any(p.get("priority") == priority
                           for p in (peering.get("status") or {}).values() if isinstance(p, dict))
            return check
        await wait_for(registered(200), "the leader in the peering object", proc=leader)
        await wait_for(lambda: _logged(leader, "Resuming operations"), "the leader to act",
                       proc=leader)
        standby = start(100)  # starts paused, and stays paused: a higher priority is alive
        await wait_for(registered(100), "the standby in the peering object", proc=standby)

        await api.post(GATEWAYS, gateway())
        await wait_for(lambda: deployment(api), "the Deployment", proc=leader)
        await asyncio.sleep(2)  # several timer intervals
        assert "Handler 'reconcile' succeeded" in leader.log_tail(10**6)
        assert "reconcile" not in standby.log_tail(10**6)
        assert "Timer 'tick'" not in standby.log_tail(10**6)

        # The leader is killed (no goodbye): the standby resumes once the leader's
        # keep-alive is older than --peering-lifetime (6 s; benchmarks/operator_bench.py
        # measures it), then acts on the next change.
        leader.proc.kill()
        leader.proc.wait()
        await wait_for(lambda: _logged(standby, "Resuming operations"), "the standby to resume",
                       timeout=30, proc=standby)
        await api.patch(gateway_path("gw"), {"spec": {"image": "herald:failover"}})

        async def rolled_out():
            deploy = await deployment(api)
            return deploy["spec"]["template"]["spec"]["containers"][0]["image"] == \
                "herald:failover"
        await wait_for(rolled_out, "the standby to roll out the change", proc=standby)
    finally:
        await leader.stop()
        if standby is not None:
            await standby.stop()


async def _logged(proc: OperatorProcess, text: str) -> bool:
    return text in proc.log_tail(10**6)


async def test_autoscale_off_follows_spec_replicas_within_bounds(api, operator):
    health = free_port()
    proc = operator("--health-port", str(health))
    await api.post(GATEWAYS, gateway(autoscale=False, replicas=3))
    await wait_for(lambda: _replicas_are(api, 3), "3 replicas", proc=proc)
    # What `kubectl scale` / an HPA does through the scale subresource: spec.replicas.
    await api.patch(gateway_path("gw"), {"spec": {"replicas": 9}})
    await wait_for(lambda: _replicas_are(api, 6), "clamped to maxReplicas", proc=proc)
    status = await _status(api, "lastDecision")
    assert "autoscale off" in status["lastDecision"]
    async with FleetController(api, "gw") as fleet:
        await wait_for(lambda: _pods_are(fleet, 6), "6 pods", proc=proc)
        await api.patch(gateway_path("gw"), {"spec": {"replicas": 2}})
        await wait_for(lambda: _pods_are(fleet, 2), "2 pods", proc=proc)
        annotated = [p for p in await fleet.pods()
                     if DELETION_COST in (p["metadata"].get("annotations") or {})]
        assert annotated, "deletion costs are set before a manual scale-down too"
    async with aiohttp.ClientSession() as http, \
            http.get(f"http://127.0.0.1:{health}/healthz") as rsp:
        assert rsp.status == 200


async def _replicas_are(api: Api, count: int) -> bool:
    return await replicas(api) == count


async def _status_is(api: Api, key: str, value: Any) -> dict[str, Any] | None:
    status = await _status(api, key)
    return status if status and status[key] == value else None


def _without_finalizers(rules: list[dict[str, Any]]) -> None:
    for rule in rules:
        rule["resources"] = [r for r in rule["resources"] if r != "realtimegateways/finalizers"]


async def test_the_role_without_finalizers_is_refused_naming_the_rule(tmp_path, redis_url):
    """The other way round: with `realtimegateways/finalizers` taken out of the chart's
    Role, a hardened API server refuses the children, and the stand-in says which rule."""
    authorizer = chart_authorizer(edit=_without_finalizers)
    async with kube_server(authorizer, expect_denials=True) as api:
        proc = OperatorProcess(api, tmp_path, "--standalone", "--interval", "1",
                               "--metrics-port", "0", redis_url=redis_url)
        try:
            await api.post(GATEWAYS, gateway())

            async def refused() -> list[str]:
                return api.handler.denials
            (denial, *_) = await wait_for(refused, "a refusal", proc=proc)
            assert "cannot set blockOwnerDeletion" in denial
            assert "missing rule: {apiGroups: [herald.io], resources: " \
                   "[realtimegateways/finalizers], verbs: [update]}" in denial
            assert await deployment(api) is None
            with pytest.raises(AssertionError, match="realtimegateways/finalizers"):
                api.handler.assert_allowed()
        finally:
            await proc.stop()


async def test_unknown_spec_fields_are_pruned_and_reported(api, operator):
    """`minReplica` (a typo) is dropped by the API server as a real one does; the operator
    compares kubectl's record of the applied manifest with what was stored and warns."""
    proc = operator()
    body = gateway(minReplica=4, service={"port": 80, "portt": 81})
    body["metadata"]["annotations"] = {LAST_APPLIED: orjson.dumps(body).decode()}
    created = await api.post(GATEWAYS, body)
    assert "minReplica" not in created["spec"] and "portt" not in created["spec"]["service"]
    assert created["spec"]["minReplicas"] == 2  # defaulted by the server
    cond = await wait_for(lambda: _condition(api, "SpecApplied", "False"),
                          "SpecApplied=False", proc=proc)
    assert cond["reason"] == "UnknownFields"
    assert "spec.minReplica," in cond["message"] and "spec.service.portt" in cond["message"]
    (event,) = await wait_for(lambda: events(api, "UnknownFields"), "an UnknownFields event")
    assert event["type"] == "Warning"
    # Fixed and re-applied: the condition clears, and the fleet follows the real field.
    fixed = gateway(minReplicas=4)
    await api.patch(gateway_path("gw"), {
        "metadata": {"annotations": {LAST_APPLIED: orjson.dumps(fixed).decode()}},
        "spec": {"minReplicas": 4, "service": {"port": 80}}})
    await wait_for(lambda: _condition(api, "SpecApplied", "True"), "SpecApplied=True",
                   proc=proc)
    await wait_for(lambda: _replicas_are(api, 4), "4 replicas", proc=proc)
