"""`helm uninstall` pre-delete hook: delete the chart's RealtimeGateway first.

Why: the operator's timers make kopf put a finalizer on every RealtimeGateway,
and Helm deletes the operator (and its RBAC) before custom resources. Without
this hook the resource would wait forever for a finalizer nobody removes, and
its namespace with it. Run before anything is deleted, it asks for the
deletion while the operator still runs (the operator removes its finalizer and
the garbage collector removes the gateway Deployment, Service and PDB). If the
operator does not finish in time (it was already gone or broken), the hook
removes the operator's finalizer itself, so an uninstall never hangs.

Environment:
  HERALD_NAMESPACE        namespace of the resources
  HERALD_GATEWAYS         comma-separated RealtimeGateway names
  HERALD_FINALIZER        the operator's finalizer (herald.io/operator)
  HERALD_CLEANUP_TIMEOUT  seconds to wait for the operator (default 60)
  HERALD_KUBE_API         API server URL (default: in-cluster, from the service account)
Standard library only: it runs in the Herald image without extra packages.
"""

from __future__ import annotations

import json
import os
import ssl
import sys
import time
import urllib.error
import urllib.request
from typing import Any

ACCOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
API = "apis/herald.io/v1alpha1"


class Kube:
    """Just enough of the Kubernetes API: get, delete and merge-patch one object."""

    def __init__(self) -> None:
        base = os.environ.get("HERALD_KUBE_API", "")
        self.context: ssl.SSLContext | None = None
        self.token = ""
        if not base:
            host = os.environ["KUBERNETES_SERVICE_HOST"]
            port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
            base = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
            self.context = ssl.create_default_context(cafile=f"{ACCOUNT}/ca.crt")
            with open(f"{ACCOUNT}/token") as fh:
                self.token = fh.read().strip()
        self.base = base.rstrip("/")

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.base}/{path}", data=data, method=method)
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", "application/merge-patch+json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=10, context=self.context) as rsp:
                return rsp.status, json.loads(rsp.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, None


def wait_gone(kube: Kube, paths: list[str], seconds: float) -> list[str]:
    """Poll until every object is gone (404) or time runs out; return those left."""
    deadline = time.monotonic() + seconds
    left = list(paths)
    while left:
        left = [p for p in left if kube.call("GET", p)[0] != 404]
        if not left or time.monotonic() >= deadline:
            break
        time.sleep(1)
    return left


def main() -> int:
    namespace = os.environ["HERALD_NAMESPACE"]
    names = [n.strip() for n in os.environ.get("HERALD_GATEWAYS", "").split(",") if n.strip()]
    finalizer = os.environ.get("HERALD_FINALIZER", "herald.io/operator")
    timeout = float(os.environ.get("HERALD_CLEANUP_TIMEOUT", "60"))
    kube = Kube()
    paths = [f"{API}/namespaces/{namespace}/realtimegateways/{name}" for name in names]
    for path in paths:
        status, _ = kube.call("DELETE", path)
        if status not in (200, 202, 404):
            print(f"cleanup: DELETE {path} answered HTTP {status}", file=sys.stderr)
            return 1
    left = wait_gone(kube, paths, timeout)
    for path in left:
        status, body = kube.call("GET", path)
        if status != 200:
            continue
        finalizers = body.get("metadata", {}).get("finalizers") or []
        kept = [f for f in finalizers if f != finalizer]
        print(f"cleanup: the operator did not finish {path} in {timeout:.0f}s; "
              f"removing its finalizer {finalizer!r}", file=sys.stderr)
        kube.call("PATCH", path, {"metadata": {"finalizers": kept or None}})
    left = wait_gone(kube, left, 30)
    if left:
        print(f"cleanup: still present: {left}", file=sys.stderr)
        return 1
    print(f"cleanup: deleted {', '.join(names) or 'nothing'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
