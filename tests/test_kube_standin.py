"""The API-server stand-in refuses what a real API server refuses (tests/kube_policy.py,
tests/operator_harness.py): the operator tests are only as strict as it is."""

from __future__ import annotations

from typing import Any

import aiohttp

from herald_operator import manifests
from tests.kube_policy import Attributes, Authorizer, Grant, owner_reference_checks, prune
from tests.operator_harness import (
    GATEWAYS,
    NAMESPACE,
    OPERATOR_TOKEN,
    chart_crds,
    gateway_path,
    kube_server,
    ns_path,
)

ROLE = Grant(({"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get", "create"]},
              {"apiGroups": ["herald.io"], "resources": ["realtimegateways/finalizers"],
               "verbs": ["update"], "resourceNames": ["gw"]}), "ns")


def test_rbac_matches_verb_group_resource_subresource_namespace_and_name() -> None:
    auth = Authorizer("sa", [ROLE])
    assert auth.allows(Attributes("get", "apps", "deployments", None, "ns", "gw"))
    assert not auth.allows(Attributes("patch", "apps", "deployments", None, "ns", "gw"))
    assert not auth.allows(Attributes("get", "", "deployments", None, "ns", "gw"))  # group
    assert not auth.allows(Attributes("get", "apps", "deployments", "scale", "ns", "gw"))
    assert not auth.allows(Attributes("get", "apps", "deployments", None, "other", "gw"))
    assert auth.allows(Attributes("update", "herald.io", "realtimegateways", "finalizers",
                                  "ns", "gw"))
    assert not auth.allows(Attributes("update", "herald.io", "realtimegateways", "finalizers",
                                      "ns", "gw2"))  # resourceNames
    cluster = Authorizer("sa", [Grant(ROLE.rules, None)])
    assert cluster.allows(Attributes("get", "apps", "deployments", None, "other", "gw"))


def test_owner_references_need_finalizers_on_the_owner_and_delete_to_change() -> None:
    child = {"metadata": {"ownerReferences": [manifests.owner_reference("gw", "u1")]}}
    attrs = Attributes("create", "apps", "deployments", None, "ns", "gw")
    ((check, reason),) = owner_reference_checks(None, child, attrs)
    assert check == Attributes("update", "herald.io", "realtimegateways", "finalizers", "ns", "gw")
    assert "blockOwnerDeletion" in reason
    assert owner_reference_checks(child, child, attrs) == []  # unchanged: nothing to check
    bare = {"metadata": {}}
    verbs = [c.verb for c, _ in owner_reference_checks(bare, child, attrs)]
    assert verbs == ["delete", "update"]


def test_pruning_drops_undeclared_fields_and_keeps_preserved_ones() -> None:
    schema = chart_crds()["herald.io/v1alpha1/realtimegateways"]
    body = {"apiVersion": "herald.io/v1alpha1", "kind": "RealtimeGateway",
            "metadata": {"name": "gw", "anything": 1},
            "spec": {"image": "x", "minReplica": 3, "redis": {"url": "redis://r", "db": 1},
                     "podTemplate": {"affinity": {"nodeAffinity": {"free": True}}}},
            "extra": True}
    pruned, dropped = prune(schema, body)
    assert dropped == ["spec.minReplica", "spec.redis.db", "extra"]
    assert pruned["metadata"] == body["metadata"]
    assert pruned["spec"]["podTemplate"]["affinity"] == {"nodeAffinity": {"free": True}}


async def _call(url: str, method: str, path: str, token: str | None, body: Any = None,
                content_type: str = "application/json") -> tuple[int, dict[str, Any], list[str]]:
    headers = {"Content-Type": content_type}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    async with aiohttp.ClientSession() as http, \
            http.request(method, url + path, json=body, headers=headers) as rsp:
        return rsp.status, await rsp.json(content_type=None), rsp.headers.getall("Warning", [])


async def test_http_refusals_warnings_and_subresources() -> None:
    async with kube_server(expect_denials=True) as api:
        assert (await _call(api.url, "GET", ns_path("v1", "pods"), None))[0] == 401
        # The chart's Role: the operator may read pods but not Secrets, nor delete Deployments.
        assert (await _call(api.url, "GET", ns_path("v1", "pods"), OPERATOR_TOKEN))[0] == 200
        status, body, _ = await _call(api.url, "GET", ns_path("v1", "secrets", "x"),
                                      OPERATOR_TOKEN)
        assert status == 403 and 'cannot get resource "secrets"' in body["message"]
        status, _, _ = await _call(api.url, "DELETE", ns_path("apps/v1", "deployments", "gw"),
                                   OPERATOR_TOKEN)
        assert status == 403 and len(api.handler.denials) == 2

        gw = {"apiVersion": "herald.io/v1alpha1", "kind": "RealtimeGateway",
              "metadata": {"name": "gw", "namespace": NAMESPACE},
              "spec": {"image": "x", "redis": {"url": "redis://r"}, "minReplica": 1},
              "status": {"replicas": 7}}
        status, created, warnings = await _call(api.url, "POST", GATEWAYS, "admin-token", gw)
        assert status == 201 or status == 200, created
        assert warnings == ['299 - "unknown field \\"spec.minReplica\\""']
        assert "status" not in created and created["metadata"]["generation"] == 1
        # Invalid values are refused (422), not stored.
        status, body, _ = await _call(api.url, "PATCH", gateway_path("gw"), "admin-token",
                                      {"spec": {"maxReplicas": 0}},
                                      "application/merge-patch+json")
        assert status == 422 and "maxReplicas" in body["message"]
        # Status only through /status; spec changes bump the generation.
        await api.patch(gateway_path("gw"), {"spec": {"image": "y"}, "status": {"replicas": 3}})
        await api.patch(gateway_path("gw", "status"), {"spec": {"image": "z"},
                                                      "status": {"replicas": 2}})
        stored = await api.get(gateway_path("gw"))
        assert stored["spec"]["image"] == "y" and stored["status"] == {"replicas": 2}
        assert stored["metadata"]["generation"] == 2
        # A JSON patch whose test op fails is a 422 (kopf relies on it for its finalizer).
        status, _, _ = await _call(api.url, "PATCH", gateway_path("gw"), "admin-token",
                                   [{"op": "test", "path": "/metadata/resourceVersion",
                                     "value": "stale"}], "application/json-patch+json")
        assert status == 422
