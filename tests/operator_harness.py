"""Running the operator for real against kmock (an in-memory Kubernetes API on loopback).

- `KubeServer`: kmock's `KubernetesEmulator` with the few things a real API
  server does that kopf and the operator rely on: discovery of every resource
  involved (including `v1/namespaces` and `v1/events`, without which kopf
  watches nothing), `metadata.uid`/`creationTimestamp`/`generateName` on create,
  and watches that end after `timeoutSeconds` (or teardown would hang).
- `OperatorProcess`: the `herald-operator run` console script as a subprocess,
  pointed at the server by a kubeconfig file.
- `FleetController`: stands in for the ReplicaSet controller and kubelet (none
  exist here): it keeps Pod objects in line with the Deployment's replicas,
  removes the pods with the lowest `pod-deletion-cost` first, writes the
  Deployment's status, and can start/stop a real process per pod.
- `write_node`: a gateway's registry entry, written with redis-py per the contract.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import kmock
import orjson
import redis

from herald_operator.crd import GROUP, KIND, PLURAL, SHORT_NAMES, VERSION
from herald_operator.rebalance import DELETION_COST

NAMESPACE = "herald-test"
VERBS = {"get", "list", "watch", "create", "update", "patch", "delete"}
RESOURCES = {
    "v1/namespaces": dict(kind="Namespace", namespaced=False),
    "v1/events": dict(kind="Event", namespaced=True),
    "v1/pods": dict(kind="Pod", namespaced=True),
    "v1/services": dict(kind="Service", namespaced=True),
    "apps/v1/deployments": dict(kind="Deployment", namespaced=True,
                                subresources={"status", "scale"}),
    "policy/v1/poddisruptionbudgets": dict(kind="PodDisruptionBudget", namespaced=True),
    f"{GROUP}/{VERSION}/{PLURAL}": dict(kind=KIND, namespaced=True, shortnames=set(SHORT_NAMES),
                                        subresources={"status", "scale"}),
    "kopf.dev/v1/kopfpeerings": dict(kind="KopfPeering", namespaced=True),
}


class KubeServer(kmock.KubernetesEmulator):
    """kmock's emulator, plus what a real API server fills in on create and watch."""

    async def _handle(self, request: kmock.Request) -> Any:
        if request.action == kmock.action.CREATE and isinstance(request.data, dict):
            meta = request.data.setdefault("metadata", {})
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = meta["generateName"] + uuid.uuid4().hex[:8]
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", datetime.datetime.now(datetime.UTC)
                            .strftime("%Y-%m-%dT%H:%M:%SZ"))
            meta.setdefault("generation", 1)
            meta.setdefault("resourceVersion", "1")
            if request.namespace and "namespace" not in meta:
                meta["namespace"] = request.namespace
        return await super()._handle(request)

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
async def kube_server() -> AsyncIterator[Api]:
    async with KubeServer() as handler, kmock.Server(handler) as server:
        for key, info in RESOURCES.items():
            handler.resources[key] = kmock.ResourceInfo(verbs=VERBS, **info)
        api = Api(str(server.url).rstrip("/"), handler)
        async with api:
            # kmock cannot parse POST /api/v1/namespaces: store the Namespace directly.
            handler.objects["v1/namespaces", None, NAMESPACE] = {
                "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}
            yield api


class Api:
    """A plain HTTP client to the test API server, plus access to its stored objects."""

    def __init__(self, url: str, handler: KubeServer) -> None:
        self.url = url
        self.handler = handler
        self.session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Api:
        self.session = aiohttp.ClientSession(self.url + "/")
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
            "users": [{"name": "kmock", "user": {"token": "test-token"}}],
            "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock",
                                                      "namespace": NAMESPACE}}],
        }).decode())
        return path


def ns_path(api: str, plural: str, name: str | None = None, sub: str | None = None) -> str:
    root = "/api/v1" if api == "v1" else f"/apis/{api}"
    out = f"{root}/namespaces/{NAMESPACE}/{plural}"
    return out + (f"/{name}" if name else "") + (f"/{sub}" if sub else "")


GATEWAYS = ns_path(f"{GROUP}/{VERSION}", PLURAL)


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
    """One gateway's registry entry, exactly as the gateways write it."""
    now = time.time() if updated is None else updated
    entry = {"node": node, "pod": node, "ip": "127.0.0.1", "connections": connections,
             "subscriptions": connections, "channels": 1, "msgs_in_per_s": 0.0,
             "msgs_out_per_s": msgs_out, "draining": draining, "ready": ready, "updated": now}
    client.set(f"{prefix}node:{node}", orjson.dumps(entry), ex=10)
    client.zadd(f"{prefix}nodes", {node: now})


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
        return await self.api.post(ns_path("v1", "pods"), {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod_name, "labels": labels},
            "spec": deploy["spec"]["template"]["spec"],
            "status": {"phase": "Running", "podIP": "127.0.0.1",
                       "conditions": [{"type": "Ready", "status": "True"}]},
        })

    async def _remove(self, pod_name: str) -> None:
        self.removed.append(pod_name)
        await self.api.delete(ns_path("v1", "pods", pod_name))
        handle = self.handles.pop(pod_name, None)
        if handle is not None and self.stop_pod is not None:
            await self.stop_pod(pod_name, handle)
