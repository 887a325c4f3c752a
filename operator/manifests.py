"""The objects a `RealtimeGateway` owns, as plain dicts (pure: spec in, manifest out).

Deployment: `herald serve` with the registry's node id set to the pod name,
readiness on `/readyz`, startup and liveness on `/healthz`, a preStop pause so endpoints
stop routing before SIGTERM, and `terminationGracePeriodSeconds` = preStop +
drain + margin so Kubernetes never kills a gateway mid-drain. Rolling updates
never take capacity away (`maxUnavailable: 0`). Service and PDB select the
same pods. Every object carries a controller owner reference to the resource,
so deleting the resource lets the garbage collector remove them.
"""

from __future__ import annotations

from typing import Any

from herald_operator.crd import API_VERSION, KIND
from herald_operator.spec import GatewaySpec, SecretRef

PORT = 8080
PRESTOP_SECONDS = 5
GRACE_MARGIN_SECONDS = 10
MANAGED_BY = "herald-operator"

# Pod-spec fields a resource may set; when its spec drops one, the Deployment must too.
OPTIONAL_POD_FIELDS = ("nodeSelector", "tolerations", "affinity", "topologySpreadConstraints",
                       "priorityClassName", "serviceAccountName", "imagePullSecrets")
# Pod-template annotations other tools own (`kubectl rollout restart`): never removed.
FOREIGN_ANNOTATIONS = ("kubectl.kubernetes.io/",)

DEFAULT_POD_SECURITY = {
    "runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001,
    "seccompProfile": {"type": "RuntimeDefault"},
}
DEFAULT_CONTAINER_SECURITY = {
    "runAsNonRoot": True, "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"},
}


def selector_labels(name: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "herald-gateway", "app.kubernetes.io/instance": name}


def selector_string(name: str) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(selector_labels(name).items()))


def labels(name: str) -> dict[str, str]:
    return {**selector_labels(name), "app.kubernetes.io/component": "gateway",
            "app.kubernetes.io/part-of": "herald", "app.kubernetes.io/managed-by": MANAGED_BY}


def owner_reference(name: str, uid: str) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": KIND, "name": name, "uid": uid,
            "controller": True, "blockOwnerDeletion": True}


def _metadata(name: str, namespace: str, uid: str) -> dict[str, Any]:
    return {"name": name, "namespace": namespace, "labels": labels(name),
            "ownerReferences": [owner_reference(name, uid)]}


def _secret_env(var: str, ref: SecretRef) -> dict[str, Any]:
    return {"name": var, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}


def _field_env(var: str, field_path: str) -> dict[str, Any]:
    return {"name": var, "valueFrom": {"fieldRef": {"fieldPath": field_path}}}


def gateway_env(spec: GatewaySpec) -> list[dict[str, Any]]:
    """The gateway's environment; the resource's own `env` comes last and wins."""
    env: list[dict[str, Any]] = [
        {"name": "HERALD_ENV", "value": "production"},
        {"name": "HERALD_PORT", "value": str(PORT)},
        {"name": "HERALD_DRAIN_SECONDS", "value": str(spec.drain_seconds)},
        {"name": "HERALD_REDIS_PREFIX", "value": spec.redis_prefix},
        {"name": "HERALD_DEMO", "value": "false"},
        _field_env("POD_NAME", "metadata.name"),
        _field_env("POD_IP", "status.podIP"),
        _field_env("HERALD_NODE_ID", "metadata.name"),
    ]
    if spec.redis_url:
        env.append({"name": "HERALD_REDIS_URL", "value": spec.redis_url})
    elif spec.redis_secret:
        env.append(_secret_env("HERALD_REDIS_URL", spec.redis_secret))
    auth = spec.auth
    for key, var in (("jwtSecretRef", "HERALD_JWT_SECRET"),
                     ("jwtPublicKeyRef", "HERALD_JWT_PUBLIC_KEY"),
                     ("apiKeyRef", "HERALD_API_KEY")):
        ref = SecretRef.parse(auth.get(key))
        if ref is not None:
            env.append(_secret_env(var, ref))
    if auth.get("jwksUrl"):
        env.append({"name": "HERALD_JWT_JWKS_URL", "value": auth["jwksUrl"]})
    return env + list(spec.raw.get("env") or [])


def termination_grace(spec: GatewaySpec) -> int:
    return PRESTOP_SECONDS + spec.drain_seconds + GRACE_MARGIN_SECONDS


def deployment(name: str, namespace: str, uid: str, spec: GatewaySpec,
               replicas: int) -> dict[str, Any]:
    tpl = spec.raw["podTemplate"]
    probe = {"httpGet": {"path": "/readyz", "port": "http"},
             "periodSeconds": 5, "timeoutSeconds": 2, "failureThreshold": 2}
    container = {
        "name": "gateway",
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": ["herald", "serve"],
        "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"}],
        "env": gateway_env(spec),
        "readinessProbe": probe,
        # Up to a minute to start (Redis may still be coming up), then liveness.
        "startupProbe": {"httpGet": {"path": "/healthz", "port": "http"},
                         "periodSeconds": 2, "timeoutSeconds": 2, "failureThreshold": 30},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"},
                          "periodSeconds": 10, "timeoutSeconds": 2, "failureThreshold": 3},
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(PRESTOP_SECONDS)]}}},
        "resources": spec.raw["resources"],
        "securityContext": tpl.get("containerSecurityContext") or DEFAULT_CONTAINER_SECURITY,
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    pod_spec: dict[str, Any] = {
        "terminationGracePeriodSeconds": termination_grace(spec),
        "automountServiceAccountToken": False,
        "securityContext": tpl.get("securityContext") or DEFAULT_POD_SECURITY,
        "containers": [container],
        "volumes": [{"name": "tmp", "emptyDir": {}}],
    }
    for key in OPTIONAL_POD_FIELDS:
        value = spec.raw.get(key) if key == "imagePullSecrets" else tpl.get(key)
        if value:
            pod_spec[key] = value
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(name, namespace, uid),
        "spec": {
            "replicas": replicas,
            "revisionHistoryLimit": 5,
            "selector": {"matchLabels": selector_labels(name)},
            "strategy": {"type": "RollingUpdate",
                         "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": 0}},
            "template": {
                "metadata": {"labels": {**(tpl.get("labels") or {}), **labels(name)},
                             "annotations": dict(tpl.get("annotations") or {})},
                "spec": pod_spec,
            },
        },
    }


def service(name: str, namespace: str, uid: str, spec: GatewaySpec) -> dict[str, Any]:
    svc = spec.raw["service"]
    meta = _metadata(name, namespace, uid)
    meta["annotations"] = dict(svc.get("annotations") or {})
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {"type": svc["type"], "selector": selector_labels(name),
                 "ports": [{"name": "http", "port": svc["port"], "targetPort": "http",
                            "protocol": "TCP"}]},
    }


def disruption_budget(name: str, namespace: str, uid: str,
                      spec: GatewaySpec) -> dict[str, Any]:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(name, namespace, uid),
        "spec": {"maxUnavailable": spec.raw["pdb"]["maxUnavailable"],
                 "selector": {"matchLabels": selector_labels(name)}},
    }


def drift(desired: Any, actual: Any, where: str = "") -> list[str]:
    """Paths where `actual` does not contain `desired` (servers add defaults: those are fine;
    they also drop empty maps and lists, so an empty one matches an absent one)."""
    if desired in ({}, []) and actual is None:
        return []
    if isinstance(desired, dict):
        if not isinstance(actual, dict):
            return [where or "."]
        found: list[str] = []
        for key, value in desired.items():
            found += drift(value, actual.get(key), f"{where}.{key}")
        return found
    if isinstance(desired, list):
        if not isinstance(actual, list) or len(actual) != len(desired):
            return [where]
        found = []
        for i, (d, a) in enumerate(zip(desired, actual, strict=True)):
            found += drift(d, a, f"{where}[{i}]")
        return found
    return [] if desired == actual else [where]


def removals(desired: dict[str, Any], actual: dict[str, Any]) -> dict[str, Any]:
    """A JSON-merge-patch fragment (nulls) taking out of a Deployment's pod template what
    the spec no longer asks for: a merge patch only adds and replaces, never removes."""
    d_tpl, a_tpl = desired["spec"]["template"], actual.get("spec", {}).get("template", {})
    d_pod, a_pod = d_tpl["spec"], a_tpl.get("spec") or {}
    pod: dict[str, Any] = {key: None for key in OPTIONAL_POD_FIELDS
                           if key in a_pod and key not in d_pod}
    if "nodeSelector" in d_pod:
        gone = {k: None for k in a_pod.get("nodeSelector") or {} if k not in d_pod["nodeSelector"]}
        if gone:
            pod["nodeSelector"] = gone
    meta: dict[str, Any] = {}
    for field in ("labels", "annotations"):
        wanted = d_tpl["metadata"].get(field) or {}
        gone = {k: None for k in (a_tpl.get("metadata") or {}).get(field) or {}
                if k not in wanted and not k.startswith(FOREIGN_ANNOTATIONS)}
        if gone:
            meta[field] = gone
    template: dict[str, Any] = {}
    if meta:
        template["metadata"] = meta
    if pod:
        template["spec"] = pod
    return {"spec": {"template": template}} if template else {}


def merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`base` with `extra` merged in, recursively (a copy)."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out
