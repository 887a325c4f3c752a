"""What a real API server enforces on a write, as pure functions (used by the test stand-in).

The operator tests run against kmock (tests/operator_harness.py); these are the
rules kmock does not know and a real cluster applies to every request:

- **RBAC** (`Authorizer`): the request's verb, API group, resource,
  subresource, namespace and name must be granted by a rule of the Role or
  ClusterRole bound to the caller, as the chart renders it. The denial reads
  like the API server's, plus the rule that would grant it.
- **OwnerReferencesPermissionEnforcement** (`owner_reference_checks`): changing
  an existing object's `ownerReferences` needs `delete` on that object; adding
  a reference with `blockOwnerDeletion: true` needs `update` on the owner's
  `finalizers` subresource (the plugin OpenShift enables by default).
- **Structural schemas** (`prune`, `default`): fields a CRD's schema does not
  declare are dropped (unless `x-kubernetes-preserve-unknown-fields`), then
  `default`s are filled in, before the object is validated and stored.
- **JSON merge patch** (`merge_patch`, `merge_diff`): RFC 7386, to compute the
  object a PATCH would store, so the checks above see the result, not the patch.

Not emulated: CEL `x-kubernetes-validations` (the operator re-checks those
rules itself, see operator/spec.py), server-side apply, admission webhooks.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Attributes:
    """One authorisation question, as the API server's authorizer sees it."""

    verb: str
    group: str
    resource: str
    subresource: str | None = None
    namespace: str | None = None
    name: str | None = None

    @property
    def full_resource(self) -> str:
        return f"{self.resource}/{self.subresource}" if self.subresource else self.resource

    def rule(self) -> str:
        """The RBAC rule that would allow this request, in the chart's YAML style."""
        group = self.group or '""'
        return f"{{apiGroups: [{group}], resources: [{self.full_resource}], verbs: [{self.verb}]}}"

    def forbidden(self, user: str) -> str:
        """The message a real API server answers with (403 Forbidden)."""
        kind = f"{self.resource}.{self.group}" if self.group else self.resource
        what = f'{kind} "{self.name}"' if self.name else kind
        where = (f' in the namespace "{self.namespace}"' if self.namespace
                 else " at the cluster scope")
        return (f'{what} is forbidden: User "{user}" cannot {self.verb} resource '
                f'"{self.full_resource}" in API group "{self.group}"{where}')


def _matches(values: Iterable[str], wanted: str) -> bool:
    values = list(values)
    return "*" in values or wanted in values


@dataclass(frozen=True)
class Grant:
    """The rules of one Role (in `namespace`) or ClusterRole (`namespace` None: everywhere)."""

    rules: tuple[Mapping[str, Any], ...]
    namespace: str | None

    def allows(self, attrs: Attributes) -> bool:
        if self.namespace is not None and attrs.namespace != self.namespace:
            return False
        for rule in self.rules:
            if not _matches(rule.get("verbs") or [], attrs.verb):
                continue
            if not _matches(rule.get("apiGroups") or [], attrs.group):
                continue
            resources = rule.get("resources") or []
            if not (_matches(resources, attrs.full_resource)
                    or (attrs.subresource and f"*/{attrs.subresource}" in resources)):
                continue
            names = rule.get("resourceNames") or []
            # resourceNames cannot restrict create, list or watch (no name is known yet).
            if names and (attrs.name is None or attrs.name not in names):
                continue
            return True
        return False


class Authorizer:
    """RBAC for one user: allowed when any of its grants allows."""

    def __init__(self, user: str, grants: Iterable[Grant]) -> None:
        self.user = user
        self.grants = tuple(grants)

    def allows(self, attrs: Attributes) -> bool:
        return any(g.allows(attrs) for g in self.grants)

    @classmethod
    def from_chart(cls, user: str, docs: Iterable[Mapping[str, Any]],
                   role_name: str) -> Authorizer:
        """The grants of the Role/ClusterRole named `role_name` in rendered chart objects,
        scoped the way its binding (RoleBinding or ClusterRoleBinding) scopes it."""
        docs = list(docs)
        grants = []
        for doc in docs:
            if doc.get("kind") in ("Role", "ClusterRole") and \
                    doc["metadata"]["name"] == role_name:
                namespace = doc["metadata"].get("namespace") if doc["kind"] == "Role" else None
                grants.append(Grant(tuple(doc.get("rules") or []), namespace))
        if not grants:
            raise AssertionError(f"the chart renders no Role or ClusterRole {role_name!r}")
        return cls(user, grants)


def verb_of(method: str, named: bool, watch: bool) -> str:
    """The RBAC verb of an HTTP request on a resource URL."""
    method = method.upper()
    if method == "GET":
        return "watch" if watch else ("get" if named else "list")
    return {"POST": "create", "PUT": "update", "PATCH": "patch",
            "DELETE": "delete" if named else "deletecollection"}.get(method, method.lower())


# -- OwnerReferencesPermissionEnforcement ---------------------------------------------------


def _refs(obj: Mapping[str, Any] | None) -> list[Mapping[str, Any]]:
    return list(((obj or {}).get("metadata") or {}).get("ownerReferences") or [])


def owner_reference_checks(old: Mapping[str, Any] | None, new: Mapping[str, Any],
                           attrs: Attributes) -> list[tuple[Attributes, str]]:
    """What the admission plugin asks the authorizer for this write, each with its reason.

    `old` is None on create. Mirrors plugin/pkg/admission/gc: nothing to check when
    the references did not change; an update that changes them needs `delete` on the
    object; every reference that newly blocks its owner's deletion needs `update` on
    the owner's `finalizers` (an ownerReference names an object in the same namespace).
    """
    new_refs, old_refs = _refs(new), _refs(old)
    if old is not None and new_refs == old_refs:
        return []
    if old is None and not new_refs:
        return []
    checks: list[tuple[Attributes, str]] = []
    if old is not None:
        checks.append((Attributes("delete", attrs.group, attrs.resource, None, attrs.namespace,
                                  attrs.name),
                       "cannot set an ownerRef on a resource you can't delete"))
    blocking_before = {r.get("uid") for r in old_refs if r.get("blockOwnerDeletion")}
    for ref in new_refs:
        if not ref.get("blockOwnerDeletion") or ref.get("uid") in blocking_before:
            continue
        group = str(ref.get("apiVersion", "")).rpartition("/")[0]
        plural = plural_of(str(ref.get("kind", "")))
        checks.append((Attributes("update", group, plural, "finalizers", attrs.namespace,
                                  str(ref.get("name"))),
                       "cannot set blockOwnerDeletion if an ownerReference refers to a "
                       "resource you can't set finalizers on"))
    return checks


# Kind -> plural, what the API server's REST mapper answers (for the kinds the tests use).
PLURALS = {"RealtimeGateway": "realtimegateways", "Deployment": "deployments",
           "ReplicaSet": "replicasets", "Service": "services", "Pod": "pods",
           "PodDisruptionBudget": "poddisruptionbudgets"}


def plural_of(kind: str) -> str:
    return PLURALS.get(kind, kind.lower() + "s")


# -- JSON merge patch (RFC 7386) --------------------------------------------------------------


def merge_patch(target: Any, patch: Any) -> Any:
    """`target` with `patch` applied (a copy): objects merge, null removes, the rest replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def merge_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """The merge patch that turns `old` into `new`."""
    diff: dict[str, Any] = {key: None for key in old if key not in new}
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, dict) and isinstance(before, dict):
            sub = merge_diff(before, value)
            if sub:
                diff[key] = sub
        elif key not in old or before != value:
            diff[key] = copy.deepcopy(value)
    return diff


# -- structural schemas ----------------------------------------------------------------------

ROOT_FIELDS = ("apiVersion", "kind", "metadata")


def prune(schema: Mapping[str, Any], value: Any, where: str = "") -> tuple[Any, list[str]]:
    """(value without the fields `schema` does not declare, the dropped paths).

    As the API server prunes a custom resource: at the root, apiVersion/kind/metadata
    stay; an object keeps its declared `properties`, or every key when it has
    `additionalProperties` or `x-kubernetes-preserve-unknown-fields`."""
    dropped: list[str] = []
    if isinstance(value, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        preserve = bool(schema.get("x-kubernetes-preserve-unknown-fields"))
        out: dict[str, Any] = {}
        for key, item in value.items():
            path = f"{where}.{key}" if where else key
            if not where and key in ROOT_FIELDS:
                out[key] = item
            elif props is not None and key in props:
                out[key], sub = prune(props[key], item, path)
                dropped += sub
            elif isinstance(extra, dict):
                out[key], sub = prune(extra, item, path)
                dropped += sub
            elif preserve or extra is True:
                out[key] = item
            else:
                dropped.append(path)
        return out, dropped
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        items = []
        for i, item in enumerate(value):
            pruned, sub = prune(schema["items"], item, f"{where}[{i}]")
            items.append(pruned)
            dropped += sub
        return items, dropped
    return value, dropped


def default(schema: Mapping[str, Any], value: Any) -> Any:
    """`default`s filled in where a field is absent (recursively, on a copy)."""
    if isinstance(value, dict) and "properties" in schema:
        out = dict(value)
        for key, sub in schema["properties"].items():
            if key not in out and "default" in sub:
                out[key] = copy.deepcopy(sub["default"])
            if key in out:
                out[key] = default(sub, out[key])
        return out
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [default(schema["items"], item) for item in value]
    return value
