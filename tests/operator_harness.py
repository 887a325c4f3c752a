"""Running the operator for real against kmock, made to refuse what a real API server refuses.

- `KubeServer`: kmock's `KubernetesEmulator` plus what a real API server does
  and the operator depends on, so a test fails where a cluster would:
  * authentication by bearer token: the test itself is a cluster admin
    (`ADMIN_TOKEN`), the operator is its service account (`OPERATOR_TOKEN`)
    and gets exactly the RBAC of the Role/ClusterRole **the chart renders**
    (`chart_authorizer`, real `helm template`); anything else is 401;
  * RBAC on every request (verb, group, resource, subresource, namespace,
    name) and the OwnerReferencesPermissionEnforcement admission plugin
    (`blockOwnerDeletion: true` needs `update` on the owner's `finalizers`):
    a refusal is a 403 with the API server's message, recorded in `denials`,
    and `kube_server()` fails the test at exit naming the missing rule;
  * custom resources pruned, defaulted and validated against the CRDs in
    charts/herald/crds (unknown fields dropped with a `Warning` header, as
    kubectl shows), status and spec kept apart by the status subresource,
    `resourceVersion` and `generation` maintained, JSON patches with a failed
    `test` op answered 422 (kopf relies on that for its finalizer);
  * discovery of every resource involved (including `v1/namespaces` and
    `v1/events`), `metadata.uid`/`creationTimestamp`/`generateName` on create,
    and watches that end after `timeoutSeconds` (or teardown would hang).
  The pure rules live in tests/kube_policy.py.
- `OperatorProcess`: the `herald-operator run` console script as a subprocess,
  pointed at the server by a kubeconfig file with the operator's token.
- `FleetController`: stands in for the ReplicaSet controller and kubelet (none
  exist here): it keeps Pod objects in line with the Deployment's replicas,
  removes the pods with the lowest `pod-deletion-cost` first, writes the
  Deployment's status, and can start/stop a real process per pod.
- `write_node`: a gateway's registry entry, written with redis-py per the contract.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime
import functools
import itertools
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import jsonpatch
import jsonschema
import kmock
import orjson
import redis
import yaml

from gateway.cluster.keys import RegistryKeys
from gateway.cluster.record import TTL, NodeRecord
from herald_operator.crd import GROUP, KIND, PLURAL, SHORT_NAMES, VERSION
from herald_operator.rebalance import DELETION_COST
from tests.kube_policy import (
    Attributes,
    Authorizer,
    default,
    merge_diff,
    merge_patch,
    owner_reference_checks,
    prune,
    verb_of,
)

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "herald"
NAMESPACE = "herald-test"
RELEASE = "rel"
OPERATOR_ROLE = f"{RELEASE}-herald-operator"
OPERATOR_USER = f"system:serviceaccount:{NAMESPACE}:{OPERATOR_ROLE}"
ADMIN_TOKEN = "admin-token"
OPERATOR_TOKEN = "operator-token"
VERBS = {"get", "list", "watch", "create", "update", "patch", "delete"}
RESOURCES = {
    "v1/namespaces": dict(kind="Namespace", namespaced=False),
    "v1/events": dict(kind="Event", namespaced=True),
    "v1/pods": dict(kind="Pod", namespaced=True, subresources={"status"}),
    "v1/services": dict(kind="Service", namespaced=True, subresources={"status"}),
    "apps/v1/deployments": dict(kind="Deployment", namespaced=True,
                                subresources={"status", "scale"}),
    "policy/v1/poddisruptionbudgets": dict(kind="PodDisruptionBudget", namespaced=True,
                                           subresources={"status"}),
    f"{GROUP}/{VERSION}/{PLURAL}": dict(kind=KIND, namespaced=True, shortnames=set(SHORT_NAMES),
                                        subresources={"status", "scale"}),
    "kopf.dev/v1/kopfpeerings": dict(kind="KopfPeering", namespaced=True),
    "coordination.k8s.io/v1/leases": dict(kind="Lease", namespaced=True),
}


@functools.cache
def _helm() -> tuple[str, dict[str, str]]:
    sys.path.insert(0, str(ROOT / "scripts"))
    from fetch_helm import fetch_helm

    home = tempfile.mkdtemp(prefix="helm-home-")
    env = {**os.environ, "HOME": home, "XDG_CACHE_HOME": f"{home}/cache",
           "XDG_CONFIG_HOME": f"{home}/config", "XDG_DATA_HOME": f"{home}/data"}
    return str(fetch_helm(ROOT / ".tools")), env


@functools.cache
def render_chart(*sets: str) -> tuple[dict[str, Any], ...]:
    """The chart's objects as the real `helm template` renders them (cached per values)."""
    binary, env = _helm()
    args = [binary, "template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    for item in sets:
        args += ["--set", item]
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    return tuple(d for d in yaml.safe_load_all(done.stdout) if d)


def chart_authorizer(*sets: str,
                     edit: Callable[[list[dict[str, Any]]], None] | None = None) -> Authorizer:
    """The operator's RBAC as the chart renders it; `edit` may change the rules first
    (to prove that a test goes red without one)."""
    docs = copy.deepcopy(list(render_chart(*sets)))
    for doc in docs:
        if doc.get("kind") in ("Role", "ClusterRole") and doc["metadata"]["name"] == OPERATOR_ROLE:
            if edit is not None:
                edit(doc["rules"])
    return Authorizer.from_chart(OPERATOR_USER, docs, OPERATOR_ROLE)


@functools.cache
def chart_crds() -> dict[str, dict[str, Any]]:
    """'group/version/plural' -> openAPIV3Schema, from the CRDs the chart installs."""
    out = {}
    for path in sorted((CHART / "crds").glob("*.yaml")):
        for crd in yaml.safe_load_all(path.read_text()):
            if not crd:
                continue
            spec = crd["spec"]
            for version in spec["versions"]:
                key = f"{spec['group']}/{version['name']}/{spec['names']['plural']}"
                out[key] = version["schema"]["openAPIV3Schema"]
    return out


def _key(resource: kmock.resource) -> str:
    group = f"{resource.group}/" if resource.group else ""
    return f"{group}{resource.version}/{resource.plural}"


class Refused(kmock.KubernetesError):
    """A request a real API server refuses (kmock renders it as a Kubernetes Status)."""


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class KubeServer(kmock.KubernetesEmulator):
    """kmock's emulator, enforcing what a real API server enforces (see the module doc)."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.authorizer: Authorizer = chart_authorizer()
        self.denials: list[str] = []
        self.crds = chart_crds()
        self._versions = itertools.count(1)

    # -- authentication and authorisation ------------------------------------------------

    def _authorize(self, request: kmock.Request) -> None:
        auth = request.headers.get("Authorization", "")
        if auth == f"Bearer {ADMIN_TOKEN}":
            return
        if auth != f"Bearer {OPERATOR_TOKEN}":
            raise Refused(status=401, reason="Unauthorized", message="Unauthorized")
        if request.resource is None or request.resource.plural is None:
            return  # discovery (/api, /apis, /version): every authenticated user may read it
        attrs = self._attributes(request)
        if not self.authorizer.allows(attrs):
            self._deny(attrs, attrs.forbidden(self.authorizer.user))

    def _attributes(self, request: kmock.Request) -> Attributes:
        assert request.resource is not None
        watch = request.params.get("watch") in ("true", "1")
        return Attributes(verb_of(str(request.method.value), request.name is not None, watch),
                          request.resource.group or "", request.resource.plural,
                          request.subresource, request.namespace, request.name)

    def _deny(self, attrs: Attributes, message: str) -> None:
        self.denials.append(f"{message}\n    missing rule: {attrs.rule()}")
        raise Refused(status=403, reason="Forbidden", message=message)

    def assert_allowed(self) -> None:
        """Fail naming every rule the operator needed and the RBAC did not grant."""
        assert not self.denials, "the API server refused the operator:\n" + "\n".join(
            dict.fromkeys(self.denials))

    # -- writes: what the stored object becomes ------------------------------------------

    def _stored(self, request: kmock.Request, name: str | None) -> dict[str, Any] | None:
        key = (request.resource, request.namespace, name)
        if key not in self.objects or self.objects[key].deleted:
            return None
        return copy.deepcopy(dict(self.objects[key].raw))

    def _admit(self, request: kmock.Request) -> list[str]:
        """Rewrite a create/patch into what a real server stores; the warnings to send."""
        assert request.resource is not None
        data, creating = request.data, request.action == kmock.action.CREATE
        if creating and isinstance(data, dict):
            meta = data.setdefault("metadata", {})
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = meta["generateName"] + uuid.uuid4().hex[:8]
            if request.namespace and "namespace" not in meta:
                meta["namespace"] = request.namespace
        name = request.name if not creating else (data or {}).get("metadata", {}).get("name")
        old = None if creating else self._stored(request, name)
        if old is None and not creating:
            return []  # kmock answers 404
        new = self._apply(old, data)
        info = RESOURCES.get(_key(request.resource), {})
        sub = request.subresource
        if "status" in info.get("subresources", ()):
            if sub == "status":
                new = {**(old or {}), "status": new.get("status")}
            else:  # the main resource: status changes only through /status
                new.pop("status", None)
                if old is not None and "status" in old:
                    new["status"] = old["status"]
        new.setdefault("metadata", {})
        warnings: list[str] = []
        schema = self.crds.get(_key(request.resource))
        if schema is not None:
            new, dropped = prune(schema, new)
            new = default(schema, new)
            warnings = [f'unknown field "{path}"' for path in dropped]
            errors = list(jsonschema.Draft202012Validator(schema).iter_errors(new))
            if errors:
                kind = f"{info.get('kind', request.resource.plural)}.{request.resource.group}"
                raise Refused(status=422, reason="Invalid", message=f'{kind} "{name}" is invalid: '
                              + "; ".join(f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
                                          for e in errors[:5]))
        if sub is None and request.headers.get("Authorization") == f"Bearer {OPERATOR_TOKEN}":
            attrs = self._attributes(request)
            attrs = Attributes(attrs.verb, attrs.group, attrs.resource, None,
                               request.namespace or new["metadata"].get("namespace"), name)
            for check, reason in owner_reference_checks(old, new, attrs):
                if not self.authorizer.allows(check):
                    kind = f"{attrs.resource}.{attrs.group}" if attrs.group else attrs.resource
                    self._deny(check, f'{kind} "{name}" is forbidden: {reason}: '
                                      f'{check.forbidden(self.authorizer.user)}')
        meta = new["metadata"]
        meta["resourceVersion"] = str(next(self._versions))
        if creating:
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", _now())
            meta["generation"] = 1
        elif sub is None and old is not None and old.get("spec") != new.get("spec"):
            meta["generation"] = int(old["metadata"].get("generation", 1)) + 1
        # kmock stores request.data: a create stores it whole, a patch merges it.
        object.__setattr__(request, "data", new if creating else merge_diff(old or {}, new))
        return warnings

    @staticmethod
    def _apply(old: dict[str, Any] | None, data: Any) -> dict[str, Any]:
        if isinstance(data, list):  # application/json-patch+json
            try:
                return jsonpatch.apply_patch(old or {}, data, in_place=False)
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
                raise Refused(status=422, reason="Invalid", message=str(exc)) from None
        if not isinstance(data, dict):
            raise Refused(status=400, reason="BadRequest", message="the body is not an object")
        return merge_patch(old or {}, data) if old is not None else copy.deepcopy(data)

    async def _handle(self, request: kmock.Request) -> Any:
        self._authorize(request)
        warnings: list[str] = []
        if request.resource is not None and request.action in (
                kmock.action.CREATE, kmock.action.UPDATE):
            async with self._lock:
                warnings = self._admit(request)
        response = await super()._handle(request)
        for text in warnings:
            quoted = text.replace('"', '\\"')
            response.headers.add("Warning", f'299 - "{quoted}"')
        return response

    async def _serve_watch(self, request: kmock.Request) -> AsyncIterator[Any]:
        raw = request.params.get("timeoutSeconds")
        deadline = asyncio.get_running_loop().time() + float(raw) if raw else None
        stream = super()._serve_watch(request)
        try:
            while True:
                remaining = None
                if deadline is not None:
                    remaining = deadline - asyncio.get_running_loop().time()
                    if remaining <= 0:
                        return
                try:
                    item = await asyncio.wait_for(anext(stream), remaining)
                except (StopAsyncIteration, TimeoutError):
                    return
                yield item
        finally:
            await stream.aclose()


@contextlib.asynccontextmanager
async def kube_server(authorizer: Authorizer | None = None,
                      expect_denials: bool = False) -> AsyncIterator[Api]:
    """The stand-in API server; at exit it fails the test if the operator was refused
    anything (unless the test is about a refusal)."""
    async with KubeServer() as handler, kmock.Server(handler) as server:
        if authorizer is not None:
            handler.authorizer = authorizer
        for key, info in RESOURCES.items():
            handler.resources[key] = kmock.ResourceInfo(verbs=VERBS, **info)
        api = Api(str(server.url).rstrip("/"), handler)
        async with api:
            # kmock cannot parse POST /api/v1/namespaces: store the Namespace directly.
            handler.objects["v1/namespaces", None, NAMESPACE] = {
                "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}
            yield api
        if not expect_denials:
            handler.assert_allowed()


class Api:
    """A plain HTTP client to the test API server, plus access to its stored objects."""

    def __init__(self, url: str, handler: KubeServer) -> None:
        self.url = url
        self.handler = handler
        self.session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Api:
        self.session = aiohttp.ClientSession(
            self.url + "/", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.session is not None
        await self.session.close()

    async def _call(self, method: str, path: str, body: Any = None) -> Any:
        assert self.session is not None
        headers = {"Content-Type": "application/merge-patch+json" if method == "PATCH"
                   else "application/json"}
        async with self.session.request(method, path.lstrip("/"), json=body,
                                        headers=headers) as rsp:
            data = await rsp.json(content_type=None)
            if rsp.status == 404:
                return None
            assert rsp.status < 400, (method, path, rsp.status, data)
            return data

    async def get(self, path: str) -> Any:
        return await self._call("GET", path)

    async def post(self, path: str, body: Any) -> Any:
        return await self._call("POST", path, body)

    async def patch(self, path: str, body: Any) -> Any:
        return await self._call("PATCH", path, body)

    async def delete(self, path: str) -> Any:
        return await self._call("DELETE", path)

    async def items(self, path: str) -> list[dict[str, Any]]:
        return (await self.get(path) or {}).get("items") or []

    def kubeconfig(self, directory: Path) -> Path:
        path = directory / "kubeconfig"
        path.write_text(orjson.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
            "clusters": [{"name": "kmock", "cluster": {"server": self.url}}],
            "users": [{"name": "kmock", "user": {"token": OPERATOR_TOKEN}}],
            "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock",
                                                      "namespace": NAMESPACE}}],
        }).decode())
        return path


def ns_path(api: str, plural: str, name: str | None = None, sub: str | None = None) -> str:
    root = "/api/v1" if api == "v1" else f"/apis/{api}"
    out = f"{root}/namespaces/{NAMESPACE}/{plural}"
    return out + (f"/{name}" if name else "") + (f"/{sub}" if sub else "")


GATEWAYS = ns_path(f"{GROUP}/{VERSION}", PLURAL)

# The RealtimeGateway the operator tests and benchmarks/operator_bench.py create:
# small numbers, 1 s periods and a 6 s window, so a policy plays out in seconds.
GATEWAY: dict[str, Any] = {
    "apiVersion": "herald.io/v1alpha1",
    "kind": "RealtimeGateway",
    "metadata": {"name": "gw", "namespace": NAMESPACE},
    "spec": {
        "image": "herald:test",
        "redis": {"secretRef": {"name": "herald-redis"}},
        "auth": {"jwtSecretRef": {"name": "herald-auth"}, "apiKeyRef": {"name": "herald-auth"}},
        "minReplicas": 2,
        "maxReplicas": 6,
        "targetConnectionsPerReplica": 100,
        "scaleUp": {"maxStep": 2, "periodSeconds": 1},
        "scaleDown": {"stabilizationWindowSeconds": 6, "step": 1, "periodSeconds": 1},
        "drainSeconds": 7,
        "rebalancing": {"enabled": False},
    },
}


def gateway(**spec: Any) -> dict[str, Any]:
    """A fresh copy of GATEWAY with `spec` fields replaced."""
    body = copy.deepcopy(GATEWAY)
    body["spec"].update(spec)
    return body


def gateway_path(name: str, sub: str | None = None) -> str:
    return ns_path(f"{GROUP}/{VERSION}", PLURAL, name, sub)


async def wait_for(check: Callable[[], Awaitable[Any]], what: str, timeout: float = 30.0,
                   proc: OperatorProcess | None = None) -> Any:
    """Poll until `check()` is truthy; on timeout fail with `what` (and the operator's log)."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            log = proc.log_tail() if proc else ""
            raise AssertionError(f"timed out waiting for {what}\n{log}")
        await asyncio.sleep(0.2)


class OperatorProcess:
    """`herald-operator run` in a subprocess, its log kept in a file."""

    def __init__(self, api: Api, tmp: Path, *args: str, redis_url: str = "") -> None:
        self.log_path = tmp / f"operator-{uuid.uuid4().hex[:6]}.log"
        env = {**os.environ, "KUBECONFIG": str(api.kubeconfig(tmp)),
               "HERALD_REDIS_URL": redis_url}
        command = [sys.executable, "-c", "from herald_operator.cli import main; main()",
                   "run", "--namespace", NAMESPACE, "--watch-timeout", "3", *args]
        self._log = open(self.log_path, "wb")  # closed in stop()
        self.proc = subprocess.Popen(command, env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT)

    def log_tail(self, chars: int = 6000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    async def stop(self) -> int | None:
        """SIGINT and wait, serving the loop: the API server it says goodbye to runs in it."""
        if self.proc.poll() is None:
            started = time.monotonic()
            self.proc.send_signal(signal.SIGINT)
            for _ in range(400):  # up to 20 s
                if self.proc.poll() is not None:
                    break
                await asyncio.sleep(0.05)
            else:
                self.proc.kill()
                self.proc.wait()
            if not self._log.closed:
                self._log.write(f"[harness] stopped in {time.monotonic() - started:.1f}s\n"
                                .encode())
        self._log.close()
        return self.proc.returncode


def write_node(client: redis.Redis, node: str, connections: int, *, prefix: str = "herald:",
               msgs_out: float = 0.0, ready: bool = True, draining: bool = False,
               updated: float | None = None) -> None:
    """One gateway's registry entry, in the contract's own keys and record format."""
    now = time.time() if updated is None else updated
    record = NodeRecord(node=node, pod=node, ip="127.0.0.1", connections=connections,
                        subscriptions=connections, channels=1, msgs_out_per_s=msgs_out,
                        draining=draining, ready=ready, updated=now)
    keys = RegistryKeys(prefix)
    client.set(keys.node(node), orjson.dumps(record.to_dict()), px=int(TTL * 1000))
    client.zadd(keys.nodes, {node: now})


Spawner = Callable[[str], Awaitable[Any]]
Stopper = Callable[[str, Any], Awaitable[None]]


class FleetController:
    """The ReplicaSet controller and kubelet for one Deployment, in miniature.

    Pods are named `<deployment>-<n>`; a scale-down removes the pods with the
    lowest `controller.kubernetes.io/pod-deletion-cost` first (as Kubernetes
    does), so tests can see the operator's annotations take effect.
    """

    def __init__(self, api: Api, name: str, spawn: Spawner | None = None,
                 stop: Stopper | None = None) -> None:
        self.api, self.name = api, name
        self.spawn, self.stop_pod = spawn, stop
        self.handles: dict[str, Any] = {}
        self.removed: list[str] = []
        self._next = 0
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> FleetController:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        for pod, handle in list(self.handles.items()):
            if self.stop_pod is not None:
                await self.stop_pod(pod, handle)

    async def pods(self) -> list[dict[str, Any]]:
        return [p for p in await self.api.items(ns_path("v1", "pods"))
                if p["metadata"].get("labels", {}).get("app.kubernetes.io/instance")
                == self.name]

    async def _run(self) -> None:
        while True:
            await self.sync()
            await asyncio.sleep(0.2)

    async def sync(self) -> None:
        deploy = await self.api.get(ns_path("apps/v1", "deployments", self.name))
        if deploy is None:
            return
        want = int(deploy["spec"].get("replicas") or 0)
        pods = await self.pods()
        while len(pods) < want:
            pods.append(await self._add(deploy))
        if len(pods) > want:
            def cost(p: dict[str, Any]) -> tuple[int, str]:
                annotations = p["metadata"].get("annotations") or {}
                return int(annotations.get(DELETION_COST, 0)), p["metadata"]["name"]
            for pod in sorted(pods, key=cost)[:len(pods) - want]:
                await self._remove(pod["metadata"]["name"])
            pods = await self.pods()
        await self.api.patch(ns_path("apps/v1", "deployments", self.name, "status"),
                             {"status": {"replicas": len(pods), "readyReplicas": len(pods),
                                         "availableReplicas": len(pods)}})

    async def _add(self, deploy: dict[str, Any]) -> dict[str, Any]:
        pod_name = f"{self.name}-{self._next}"
        self._next += 1
        if self.spawn is not None:
            self.handles[pod_name] = await self.spawn(pod_name)
        labels = deploy["spec"]["template"]["metadata"]["labels"]
        await self.api.post(ns_path("v1", "pods"), {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod_name, "labels": labels},
            "spec": deploy["spec"]["template"]["spec"],
        })
        # The kubelet reports the pod's state through the status subresource.
        return await self.api.patch(ns_path("v1", "pods", pod_name, "status"), {
            "status": {"phase": "Running", "podIP": "127.0.0.1",
                       "conditions": [{"type": "Ready", "status": "True"}]}})

    async def _remove(self, pod_name: str) -> None:
        self.removed.append(pod_name)
        await self.api.delete(ns_path("v1", "pods", pod_name))
        handle = self.handles.pop(pod_name, None)
        if handle is not None and self.stop_pod is not None:
            await self.stop_pod(pod_name, handle)
