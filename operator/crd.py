"""The `RealtimeGateway` custom resource definition, as data.

This module is the one source of the CRD: `herald-operator crd` prints it, the
chart's `crds/realtimegateways.herald.io.yaml` is that output (a test keeps
them equal), and `herald_operator.spec` applies the same defaults and bounds
to what the operator reads, because an API server without the CRD installed
(or one that predates a field) must not make the operator guess.
"""

from __future__ import annotations

from typing import Any

GROUP = "herald.io"
VERSION = "v1alpha1"
PLURAL = "realtimegateways"
SINGULAR = "realtimegateway"
KIND = "RealtimeGateway"
SHORT_NAMES = ["rtgw"]
API_VERSION = f"{GROUP}/{VERSION}"

# The most replicas any field may ask for: a bound, not a recommendation.
REPLICA_LIMIT = 1000
NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


def _int(default: int | None = None, minimum: int | None = None,
         maximum: int | None = None, description: str = "") -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "integer"}
    if description:
        schema["description"] = description
    if default is not None:
        schema["default"] = default
    if minimum is not None:
        schema["minimum"] = minimum
    if maximum is not None:
        schema["maximum"] = maximum
    return schema


def _string_map(description: str) -> dict[str, Any]:
    return {"type": "object", "description": description,
            "additionalProperties": {"type": "string"}}


def _free_object(description: str) -> dict[str, Any]:
    """A Kubernetes structure passed through as-is (validated by the API server on the pod)."""
    return {"type": "object", "description": description,
            "x-kubernetes-preserve-unknown-fields": True}


def _free_list(description: str) -> dict[str, Any]:
    return {"type": "array", "description": description,
            "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}}


def _secret_key_ref(description: str, default_key: str) -> dict[str, Any]:
    return {
        "type": "object",
        "description": description,
        "required": ["name"],
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 253,
                     "pattern": NAME_PATTERN, "description": "Secret in the same namespace."},
            "key": {"type": "string", "minLength": 1, "maxLength": 253, "default": default_key,
                    "description": "Key inside the Secret."},
        },
    }


_QUANTITY = {"x-kubernetes-int-or-string": True,
             "anyOf": [{"type": "integer"}, {"type": "string"}]}

SPEC_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["image", "redis"],
    "x-kubernetes-validations": [
        {"rule": "self.minReplicas <= self.maxReplicas",
         "message": "minReplicas must not exceed maxReplicas"},
    ],
    "properties": {
        "image": {"type": "string", "minLength": 1, "maxLength": 512,
                  "description": "Gateway image (runs `herald serve`)."},
        "imagePullPolicy": {"type": "string", "enum": ["Always", "IfNotPresent", "Never"],
                            "default": "IfNotPresent"},
        "imagePullSecrets": {
            "type": "array", "description": "Secrets for pulling the image.",
            "items": {"type": "object", "required": ["name"],
                      "properties": {"name": {"type": "string", "minLength": 1}}},
        },
        "replicas": _int(None, 0, REPLICA_LIMIT,
                         "Fixed replica count, used only when `autoscale` is false "
                         "(the scale subresource writes it: kubectl scale, HPA)."),
        "autoscale": {"type": "boolean", "default": True,
                      "description": "Scale on the live registry (true) or follow `replicas`."},
        "minReplicas": _int(2, 1, REPLICA_LIMIT, "Fewest replicas, whatever the load."),
        "maxReplicas": _int(10, 1, REPLICA_LIMIT, "Most replicas, whatever the load."),
        "targetConnectionsPerReplica": _int(5000, 1, 1_000_000,
                                            "Connections one replica should hold."),
        "targetMessagesPerReplica": _int(0, 0, 10_000_000,
                                         "Messages/s one replica should write (0 = ignore)."),
        "tolerance": {"type": "number", "default": 0.1, "minimum": 0.0, "maximum": 1.0,
                      "description": "No scaling while the load needs within this fraction "
                                     "of the current replicas (as HPA's tolerance)."},
        "scaleUp": {
            "type": "object", "default": {},
            "description": "Scale up by bounded steps, limited per period of time "
                           "(independent of the operator's reconcile interval).",
            "properties": {
                "minStep": _int(1, 1, REPLICA_LIMIT, "Fewest replicas one scale-up adds."),
                "maxStep": _int(4, 1, REPLICA_LIMIT,
                                "Most replicas added within any periodSeconds."),
                "periodSeconds": _int(15, 1, 1800, "The period maxStep applies to."),
                "stabilizationWindowSeconds": _int(
                    0, 0, 3600, "Scale up to the lowest recommendation of this window "
                                "(0: at once)."),
            },
            "x-kubernetes-validations": [
                {"rule": "self.minStep <= self.maxStep",
                 "message": "scaleUp.minStep must not exceed scaleUp.maxStep"},
            ],
        },
        "scaleDown": {
            "type": "object", "default": {},
            "description": "Scale down only after the lower recommendation held for the "
                           "window, by bounded steps per period of time.",
            "properties": {
                "stabilizationWindowSeconds": _int(300, 0, 3600),
                "step": _int(1, 1, REPLICA_LIMIT,
                             "Most replicas removed within any periodSeconds."),
                "periodSeconds": _int(15, 1, 1800, "The period step applies to."),
            },
        },
        "drainSeconds": _int(20, 1, 3600,
                             "How long a stopping gateway spreads its clients' reconnects over."),
        "rebalancing": {
            "type": "object", "default": {},
            "description": "After a scale-up, ask the fullest gateways to shed connections.",
            "properties": {
                "enabled": {"type": "boolean", "default": True},
                "threshold": {"type": "number", "default": 0.2, "minimum": 0.05,
                              "maximum": 10.0,
                              "description": "Shed while some gateway is further than "
                                             "threshold x mean from the mean."},
                "maxShedPerSecond": _int(20, 1, 10_000,
                                         "Most connections asked to move per second, in all."),
            },
        },
        "redis": {
            "type": "object",
            "description": "Where the gateways (and the operator) find Redis.",
            "x-kubernetes-validations": [
                {"rule": "has(self.url) != has(self.secretRef)",
                 "message": "set exactly one of redis.url and redis.secretRef"},
            ],
            "properties": {
                "url": {"type": "string", "maxLength": 2048,
                        "pattern": r"^(redis|rediss|redis\+sentinel|redis\+cluster)://",
                        "description": "redis://, rediss://, redis+sentinel:// or "
                                       "redis+cluster:// URL (no password here: use "
                                       "secretRef for one)."},
                "secretRef": _secret_key_ref("Secret holding the full Redis URL.", "redis-url"),
                "prefix": {"type": "string", "default": "herald:", "maxLength": 64,
                           "pattern": r"^[A-Za-z0-9:_.-]*$"},
            },
        },
        "auth": {
            "type": "object", "default": {},
            "description": "Secrets the gateways authenticate with.",
            "x-kubernetes-validations": [
                {"rule": "!(has(self.jwtSecretRef) && has(self.jwtPublicKeyRef))",
                 "message": "set at most one of auth.jwtSecretRef and auth.jwtPublicKeyRef"},
            ],
            "properties": {
                "jwtSecretRef": _secret_key_ref("HS256 secret (HERALD_JWT_SECRET).",
                                                "jwt-secret"),
                "jwtPublicKeyRef": _secret_key_ref("PEM public key (HERALD_JWT_PUBLIC_KEY).",
                                                   "jwt-public-key"),
                "jwksUrl": {"type": "string", "maxLength": 2048, "pattern": r"^https?://",
                            "description": "JWKS URL (HERALD_JWT_JWKS_URL)."},
                "apiKeyRef": _secret_key_ref("Publisher API key (HERALD_API_KEY).", "api-key"),
            },
        },
        "resources": {
            "type": "object",
            "description": "Gateway container resources.",
            "default": {"requests": {"cpu": "250m", "memory": "256Mi"},
                        "limits": {"memory": "512Mi"}},
            "properties": {
                "limits": {"type": "object", "additionalProperties": _QUANTITY},
                "requests": {"type": "object", "additionalProperties": _QUANTITY},
            },
        },
        "env": {
            "type": "array", "description": "Extra environment (Kubernetes EnvVar objects).",
            "items": {"type": "object", "required": ["name"],
                      "x-kubernetes-preserve-unknown-fields": True,
                      "properties": {"name": {"type": "string", "minLength": 1}}},
        },
        "service": {
            "type": "object", "default": {},
            "properties": {
                "type": {"type": "string", "enum": ["ClusterIP", "NodePort", "LoadBalancer"],
                         "default": "ClusterIP"},
                "port": _int(80, 1, 65535),
                "annotations": _string_map("Annotations of the Service."),
            },
        },
        "pdb": {
            "type": "object", "default": {},
            "properties": {
                "enabled": {"type": "boolean", "default": True},
                "maxUnavailable": _int(1, 0, REPLICA_LIMIT),
            },
        },
        "podTemplate": {
            "type": "object", "default": {},
            "description": "Overrides of the gateway pods.",
            "properties": {
                "labels": _string_map("Extra pod labels."),
                "annotations": _string_map("Extra pod annotations."),
                "nodeSelector": _string_map("Node selector."),
                "tolerations": _free_list("Tolerations."),
                "affinity": _free_object("Affinity."),
                "topologySpreadConstraints": _free_list("Topology spread constraints."),
                "priorityClassName": {"type": "string", "maxLength": 253},
                "serviceAccountName": {"type": "string", "maxLength": 253},
                "securityContext": _free_object("Pod security context (secure default)."),
                "containerSecurityContext": _free_object(
                    "Container security context (secure default)."),
            },
        },
    },
}

_CONDITION = {
    "type": "object",
    "required": ["type", "status"],
    "properties": {
        "type": {"type": "string"},
        "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
        "reason": {"type": "string"},
        "message": {"type": "string"},
        "lastTransitionTime": {"type": "string", "format": "date-time"},
    },
}

STATUS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "replicas": {"type": "integer", "description": "Replicas the Deployment has."},
        "readyReplicas": {"type": "integer"},
        "desiredReplicas": {"type": "integer", "description": "The operator's last decision."},
        "selector": {"type": "string", "description": "Pod label selector (scale subresource)."},
        "connections": {"type": "integer"},
        "subscriptions": {"type": "integer"},
        "msgsInPerSecond": {"type": "number"},
        "msgsOutPerSecond": {"type": "number"},
        "reportingNodes": {"type": "integer"},
        "lastScaleTime": {"type": "string", "format": "date-time"},
        "lastScaleReason": {"type": "string"},
        "lastDecision": {"type": "string",
                         "description": "The last policy verdict, scaled or not."},
        "lastRebalanceTime": {"type": "string", "format": "date-time"},
        "observedGeneration": {"type": "integer"},
        "recommendations": {
            "type": "array",
            "description": "Recent recommendations [unix time, replicas] (the windows).",
            "x-kubernetes-list-type": "atomic",
            "items": {"type": "array", "items": {"type": "number"}},
        },
        "scaleChanges": {
            "type": "array",
            "description": "Recent scale changes [unix time, replicas added or removed] "
                           "(the per-period limits).",
            "x-kubernetes-list-type": "atomic",
            "items": {"type": "array", "items": {"type": "number"}},
        },
        "conditions": {"type": "array", "items": _CONDITION,
                       "x-kubernetes-list-type": "map",
                       "x-kubernetes-list-map-keys": ["type"]},
    },
}

PRINTER_COLUMNS = [
    {"name": "Replicas", "type": "integer", "jsonPath": ".status.replicas"},
    {"name": "Desired", "type": "integer", "jsonPath": ".status.desiredReplicas"},
    {"name": "Ready", "type": "integer", "jsonPath": ".status.readyReplicas"},
    {"name": "Connections", "type": "integer", "jsonPath": ".status.connections"},
    {"name": "Msgs/s", "type": "number", "jsonPath": ".status.msgsOutPerSecond",
     "priority": 1},
    {"name": "Last Scale", "type": "string", "jsonPath": ".status.lastScaleReason",
     "priority": 1},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def crd_manifest() -> dict[str, Any]:
    """The CustomResourceDefinition object, ready to dump as YAML."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{PLURAL}.{GROUP}",
            "labels": {"app.kubernetes.io/part-of": "herald"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {"plural": PLURAL, "singular": SINGULAR, "kind": KIND,
                      "listKind": f"{KIND}List", "shortNames": SHORT_NAMES,
                      "categories": ["herald"]},
            "versions": [{
                "name": VERSION,
                "served": True,
                "storage": True,
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "description": "A fleet of Herald gateways, run and scaled by the operator.",
                    "required": ["spec"],
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "metadata": {"type": "object"},
                        "spec": SPEC_SCHEMA,
                        "status": STATUS_SCHEMA,
                    },
                }},
                "subresources": {
                    "status": {},
                    "scale": {"specReplicasPath": ".spec.replicas",
                              "statusReplicasPath": ".status.replicas",
                              "labelSelectorPath": ".status.selector"},
                },
                "additionalPrinterColumns": PRINTER_COLUMNS,
            }],
        },
    }


def crd_yaml() -> str:
    import yaml

    header = ("# Generated by `herald-operator crd` from operator/crd.py: edit that, not this.\n")
    return header + yaml.safe_dump(crd_manifest(), sort_keys=False, width=100)
