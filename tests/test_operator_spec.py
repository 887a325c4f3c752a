"""The CRD, the spec parser that applies its schema, the manifests and rebalancing (pure)."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from herald_operator import manifests
from herald_operator.crd import SPEC_SCHEMA, crd_manifest, crd_yaml
from herald_operator.rebalance import (
    PACE_CAP_SECONDS,
    SETTLE_SECONDS,
    NodeLoad,
    deletion_costs,
    imbalance,
    plan_shed,
)
from herald_operator.spec import SpecError, parse_spec

ROOT = Path(__file__).resolve().parent.parent
CHART_CRD = ROOT / "charts/herald/crds/realtimegateways.herald.io.yaml"
MINIMAL = {"image": "herald:1", "redis": {"url": "redis://redis:6379/0"}}


def test_chart_crd_is_the_generated_one():
    assert CHART_CRD.read_text() == crd_yaml(), "run: herald-operator crd > " + str(CHART_CRD)


def test_crd_shape():
    crd = crd_manifest()
    assert crd["metadata"]["name"] == "realtimegateways.herald.io"
    assert crd["spec"]["scope"] == "Namespaced"
    assert crd["spec"]["names"]["shortNames"] == ["rtgw"]
    (version,) = crd["spec"]["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"]["status"] == {}
    assert version["subresources"]["scale"]["specReplicasPath"] == ".spec.replicas"
    columns = {c["name"] for c in version["additionalPrinterColumns"]}
    assert {"Replicas", "Connections", "Age"} <= columns


def test_crd_schema_is_a_valid_json_schema():
    jsonschema.Draft202012Validator.check_schema(
        crd_manifest()["spec"]["versions"][0]["schema"]["openAPIV3Schema"])


def test_herald_operator_crd_command_and_stdlib_operator_intact():
    out = subprocess.run([sys.executable, "-c",
                          "import operator; assert operator.add(2, 3) == 5; "
                          "from herald_operator.cli import main; main(['crd'])"],
                         capture_output=True, text=True, cwd=ROOT, check=True)
    assert yaml.safe_load(out.stdout)["kind"] == "CustomResourceDefinition"


def test_defaults_come_from_the_schema():
    spec = parse_spec(MINIMAL)
    assert spec.scaling.min_replicas == SPEC_SCHEMA["properties"]["minReplicas"]["default"]
    assert spec.scaling.up_max_step == 4 and spec.scaling.down_window == 300
    assert spec.drain_seconds == 20 and spec.redis_prefix == "herald:"
    assert spec.raw["service"] == {"type": "ClusterIP", "port": 80}
    assert spec.raw["pdb"] == {"enabled": True, "maxUnavailable": 1}
    assert spec.rebalancing and spec.rebalance_threshold == 0.2


@pytest.mark.parametrize(("change", "message"), [
    ({"image": ""}, "spec.image"),
    ({"redis": {}}, "exactly one of spec.redis.url and spec.redis.secretRef"),
    ({"redis": {"url": "redis://a", "secretRef": {"name": "s"}}}, "exactly one"),
    ({"redis": {"url": "http://a"}}, "spec.redis.url"),
    ({"minReplicas": 0}, "spec.minReplicas: 0 is less than the minimum of 1"),
    ({"maxReplicas": 5000}, "spec.maxReplicas"),
    ({"minReplicas": 5, "maxReplicas": 3}, "minReplicas must not exceed"),
    ({"scaleUp": {"minStep": 5, "maxStep": 2}}, "minStep must not exceed"),
    ({"scaleDown": {"stabilizationWindowSeconds": -1}}, "stabilizationWindowSeconds"),
    ({"targetConnectionsPerReplica": "many"}, "is not of type 'integer'"),
    ({"service": {"type": "External"}}, "spec.service.type"),
    ({"rebalancing": {"threshold": 0}}, "spec.rebalancing.threshold"),
    ({"auth": {"jwtSecretRef": {"name": "a"}, "jwtPublicKeyRef": {"name": "b"}}},
     "at most one"),
    ({"env": [{"value": "x"}]}, "spec.env[0]: 'name' is a required property"),
    ({"imagePullPolicy": "Sometimes"}, "spec.imagePullPolicy"),
])
def test_bad_specs_are_refused_with_the_field(change, message):
    with pytest.raises(SpecError, match=None) as info:
        parse_spec({**MINIMAL, **change})
    assert message in str(info.value)


def test_missing_spec_is_refused():
    with pytest.raises(SpecError, match="'image' is a required property"):
        parse_spec(None)


def _deploy(**change):
    spec = parse_spec({**MINIMAL, **change})
    return manifests.deployment("gw", "ns", "uid-1", spec, 3)


def test_deployment_manifest():
    deploy = _deploy(drainSeconds=40, env=[{"name": "HERALD_LOG_LEVEL", "value": "DEBUG"}],
                     podTemplate={"nodeSelector": {"pool": "edge"}, "labels": {"team": "a"}})
    pod = deploy["spec"]["template"]["spec"]
    assert deploy["spec"]["replicas"] == 3
    assert pod["terminationGracePeriodSeconds"] == manifests.PRESTOP_SECONDS + 40 + 10
    assert pod["nodeSelector"] == {"pool": "edge"}
    assert deploy["spec"]["template"]["metadata"]["labels"]["team"] == "a"
    assert deploy["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    env = pod["containers"][0]["env"]
    assert env[-1] == {"name": "HERALD_LOG_LEVEL", "value": "DEBUG"}  # user env last, wins
    assert {"name": "HERALD_REDIS_URL", "value": "redis://redis:6379/0"} in env
    assert deploy["metadata"]["ownerReferences"][0]["uid"] == "uid-1"


def test_drift_ignores_server_defaults_but_not_changes():
    desired = {"spec": {"a": 1, "list": [{"x": 1}]}}
    assert manifests.drift(desired, {"spec": {"a": 1, "b": 2, "list": [{"x": 1, "y": 0}]}}) == []
    assert manifests.drift(desired, {"spec": {"a": 2, "list": [{"x": 1}]}}) == [".spec.a"]
    assert manifests.drift(desired, {"spec": {"a": 1, "list": []}}) == [".spec.list"]
    # An API server drops empty maps: that is not drift (or every pass would patch).
    assert manifests.drift({"metadata": {"annotations": {}}, "env": []}, {"metadata": {}}) == []
    assert manifests.drift({"metadata": {"annotations": {"a": "1"}}}, {"metadata": {}}) == \
        [".metadata.annotations"]


def test_deletion_costs_follow_connections():
    costs = deletion_costs(["a", "b", "c"], {"a": 10, "b": 3, "c": 10**12})
    assert costs == {"a": 10, "b": 3, "c": 2**31 - 1}
    assert deletion_costs(["new"], {}) == {"new": 0}


@pytest.mark.parametrize(("loads", "rate", "plan"), [
    ({"a": 100, "b": 100}, 1000, {}),  # balanced
    ({"a": 300, "b": 0, "c": 0}, 1000, {"a": 200}),  # after a scale-up: down to the mean
    ({"a": 300, "b": 0, "c": 0}, 10, {"a": 50}),  # paced: 10/s x 5 s
    ({"a": 300, "b": 280, "c": 0, "d": 0}, 1000, {"a": 155, "b": 135}),
    ({"a": 300, "b": 280, "c": 0, "d": 0}, 40, {"a": 155, "b": 45}),  # fullest first
    ({"a": 110, "b": 90}, 1000, {}),  # within the threshold (10 %)
    ({"a": 11, "b": 19, "c": 19, "d": 20}, 1000, {"b": 1, "c": 1, "d": 2}),  # 36 %: the low one
    ({"a": 500}, 1000, {}),  # nobody to move to
])
def test_shed_plan(loads, rate, plan):
    nodes = [NodeLoad(name, conns) for name, conns in loads.items()]
    assert plan_shed(nodes, 100.0, None, 0.2, rate).shed == plan


def test_imbalance():
    assert imbalance([11, 19, 19, 20]) == pytest.approx(0.362, abs=1e-3)
    assert imbalance([10, 10]) == 0.0 and imbalance([]) == 0.0 and imbalance([0, 0]) == 0.0


def test_shed_plan_waits_while_a_gateway_drains_and_ignores_unready_ones():
    assert plan_shed([NodeLoad("a", 300), NodeLoad("b", 0, draining=True),
                      NodeLoad("c", 0)], 0.0, None, 0.2, 1000).shed == {}
    assert plan_shed([NodeLoad("a", 300), NodeLoad("c", 0, ready=False)], 0.0, None, 0.2,
                     1000).shed == {}


def test_shed_plan_leaves_lightly_loaded_gateways_alone():
    nodes = [NodeLoad("a", 40), NodeLoad("b", 0), NodeLoad("c", 0)]
    assert plan_shed(nodes, 0.0, None, 0.2, 1000, floor=50).shed == {}
    # down to the floor, not the mean
    assert plan_shed(nodes, 0.0, None, 0.2, 1000, floor=30).shed == {"a": 10}


def test_shed_waits_for_counts_newer_than_the_last_shed_and_paces_by_time():
    def nodes(updated: float) -> list[NodeLoad]:
        return [NodeLoad("a", 300, updated=updated), NodeLoad("b", 0, updated=updated)]
    # A record written before the last shed's reconnects landed shows clients already gone.
    waiting = plan_shed(nodes(100.0 + SETTLE_SECONDS - 0.1), 110.0, 100.0, 0.2, 20)
    assert waiting.shed == {} and "newer than the last shed" in waiting.reason
    # Newer counts: the budget is the rate times the time since the last shed, capped.
    assert plan_shed(nodes(104.5), 104.5, 100.0, 0.2, 20).shed == {"a": 90}
    assert plan_shed(nodes(160.0), 160.0, 100.0, 0.2, 20).shed == {
        "a": int(20 * PACE_CAP_SECONDS)}


def test_shed_converges_without_oscillating_at_any_interval():
    """A simulated fleet: shed clients land on a uniformly random gateway after 3 s, the
    registry shows counts 0-2 s old. From 2 full + 2 empty gateways, every reconcile
    interval ends inside the tolerance, and stops shedding once there."""
    for interval in (1.0, 2.0, 5.0, 10.0):
        rng = random.Random(7)
        counts = {"a": 100, "b": 100, "c": 0, "d": 0}
        in_flight: list[tuple[float, int]] = []  # (lands at, how many)
        written = {n: (0.0, c) for n, c in counts.items()}
        last_shed, now, moved = None, 0.0, 0
        while now < 120.0:
            for when, count in [f for f in in_flight if f[0] <= now]:
                for _ in range(count):
                    counts[rng.choice(list(counts))] += 1
                in_flight.remove((when, count))
            for n in counts:  # each gateway writes its record every 2 s
                if now - written[n][0] >= 2.0:
                    written[n] = (now, counts[n])
            if int(now * 10) % int(interval * 10) == 0:
                plan = plan_shed([NodeLoad(n, c, updated=t) for n, (t, c) in written.items()],
                                 now, last_shed, 0.2, 20)
                for node, count in plan.shed.items():
                    counts[node] -= count
                    in_flight.append((now + 3.0, count))
                    moved += count
                if plan.shed:
                    last_shed = now
            now = round(now + 0.1, 1)
        assert imbalance(counts.values()) <= 0.2, (interval, counts)
        assert moved < 200, (interval, moved)  # well under moving everyone


def test_every_spec_field_is_documented():
    doc = (ROOT / "docs/operator.md").read_text()

    def fields(schema, prefix=""):
        for name, sub in schema.get("properties", {}).items():
            yield prefix + name
            if name not in ("podTemplate",) and sub.get("type") == "object":
                yield from fields(sub, prefix + name + ".")

    missing = [f for f in fields(SPEC_SCHEMA) if f.rsplit(".", 1)[-1] not in doc]
    assert not missing, f"docs/operator.md does not mention {missing}"


@pytest.mark.parametrize(("argv", "env", "message"), [
    (["run"], {}, "give --namespace NS (or set POD_NAMESPACE) or --all-namespaces"),
    (["run", "-n", "a", "--all-namespaces"], {}, "not both"),
    (["run", "-n", "a", "--interval", "0.5"], {}, "--interval must be at least 1 second"),
    (["run", "-n", "a"], {"HERALD_OPERATOR_INTERVAL": "soon"},
     "HERALD_OPERATOR_INTERVAL='soon': expected a number"),
])
def test_bad_command_lines_are_refused_with_a_message(monkeypatch, argv, env, message):
    from herald_operator.cli import main

    for name in ("POD_NAMESPACE", "HERALD_OPERATOR_NAMESPACES", "HERALD_OPERATOR_INTERVAL",
                 "HERALD_OPERATOR_ALL_NAMESPACES"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert message in str(exited.value.code)


def test_removals_take_out_what_the_spec_dropped_but_not_what_others_own():
    before = _deploy(podTemplate={"nodeSelector": {"pool": "edge", "zone": "a"},
                                  "affinity": {"nodeAffinity": {}},
                                  "annotations": {"team": "x"}})
    before["spec"]["template"]["metadata"]["annotations"][
        "kubectl.kubernetes.io/restartedAt"] = "2026-11-22T05:00:00Z"
    after = _deploy(podTemplate={"nodeSelector": {"pool": "edge"}})
    assert manifests.removals(after, before) == {"spec": {"template": {
        "metadata": {"annotations": {"team": None}},
        "spec": {"affinity": None, "nodeSelector": {"zone": None}},
    }}}
    assert manifests.removals(after, after) == {}
    patch = manifests.merged({"spec": {"template": {"spec": {"nodeSelector": {"pool": "edge"}}}}},
                             manifests.removals(after, before))
    assert patch["spec"]["template"]["spec"]["nodeSelector"] == {"pool": "edge", "zone": None}


def test_remembered_status_counts_only_while_recent():
    import time

    from herald_operator.kube import Kube
    from herald_operator.reconcile import Context
    from herald_operator.registry import RegistryPool

    ctx = Context(kube=Kube(), registries=RegistryPool(), redis_url="", interval=0.02)
    ctx.remember("uid-1", {"desiredReplicas": 3})
    ctx.remember("uid-1", {"connections": 10})
    assert ctx.recall("uid-1") == {"desiredReplicas": 3, "connections": 10}
    time.sleep(0.1)  # e.g. paused by peering while another replica acted
    assert ctx.recall("uid-1") == {}
    ctx.forget("uid-1")
    assert "uid-1" not in ctx.written
