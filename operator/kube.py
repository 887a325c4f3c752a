"""A small Kubernetes API client for the objects the operator owns.

kopf watches and patches the `RealtimeGateway`s itself; for the children
(Deployment, Service, PodDisruptionBudget, Pods) the operator needs only get,
list, create, JSON-merge-patch and delete, so it speaks them over the aiohttp
that kopf already brings, with the credentials kopf's own login functions find
(in-cluster service account first, then `KUBECONFIG`).
"""

from __future__ import annotations

import base64
import logging
import os
import ssl
import tempfile
from typing import Any
from urllib.parse import quote

import aiohttp
import kopf

log = logging.getLogger("herald.operator.kube")

MERGE_PATCH = "application/merge-patch+json"
TIMEOUT = aiohttp.ClientTimeout(total=30, connect=10)


class KubeError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


def path(api: str, plural: str, namespace: str, name: str | None = None,
         sub: str | None = None) -> str:
    """`api` is `v1` for the core group or `group/version` otherwise."""
    root = "/api/v1" if api == "v1" else f"/apis/{api}"
    url = f"{root}/namespaces/{quote(namespace)}/{plural}"
    if name is not None:
        url += f"/{quote(name)}"
    if sub is not None:
        url += f"/{sub}"
    return url


def login() -> kopf.ConnectionInfo:
    settings = kopf.OperatorSettings()
    info = kopf.login_with_service_account(settings=settings, logger=log) or \
        kopf.login_with_kubeconfig(settings=settings, logger=log)
    if info is None:
        raise RuntimeError("no Kubernetes credentials: not in a pod and no KUBECONFIG")
    return info


def _pem(data: str | bytes) -> bytes:
    """PEM bytes from kubeconfig's `*-data` fields (base64 of PEM) or from PEM itself."""
    raw = data.encode() if isinstance(data, str) else data
    return raw if raw.lstrip().startswith(b"-----") else base64.b64decode(raw)


def _ssl_context(info: kopf.ConnectionInfo) -> ssl.SSLContext | bool:
    if not info.server.startswith("https"):
        return False
    if info.insecure:
        return False
    # With the cluster's CA given, trust only it (not the system's CAs).
    ctx = ssl.create_default_context(
        cafile=os.fspath(info.ca_path) if info.ca_path else None,
        cadata=_pem(info.ca_data).decode() if info.ca_data else None)
    cert, key = info.certificate_path, info.private_key_path
    if info.certificate_data or info.private_key_data:
        tmp = tempfile.mkdtemp(prefix="herald-operator-")
        if info.certificate_data:
            cert = os.path.join(tmp, "cert.pem")
            with open(cert, "wb") as f:
                f.write(_pem(info.certificate_data))
        if info.private_key_data:
            key = os.path.join(tmp, "key.pem")
            with open(key, "wb") as f:
                f.write(_pem(info.private_key_data))
    if cert:
        ctx.load_cert_chain(os.fspath(cert), os.fspath(key) if key else None)
    return ctx


class Kube:
    """get / list / create / merge-patch / delete, with a re-login on 401."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._info: kopf.ConnectionInfo | None = None

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._info = info = login()
            headers = {"Accept": "application/json", "User-Agent": "herald-operator"}
            if info.token:
                headers["Authorization"] = f"{info.scheme or 'Bearer'} {info.token}"
            auth = None
            if info.username and info.password:
                auth = aiohttp.BasicAuth(info.username, info.password)
            self._session = aiohttp.ClientSession(
                base_url=info.server.rstrip("/") + "/", headers=headers, auth=auth,
                timeout=TIMEOUT,
                connector=aiohttp.TCPConnector(ssl=_ssl_context(info)),
            )
        return self._session

    async def request(self, method: str, url: str, *, body: Any = None,
                      params: dict[str, str] | None = None,
                      content_type: str = "application/json") -> Any:
        for attempt in (1, 2):
            session = self._open()
            async with session.request(method, url.lstrip("/"), json=body, params=params,
                                       headers={"Content-Type": content_type}) as rsp:
                if rsp.status == 401 and attempt == 1:
                    await self.close()  # a rotated token: log in again once
                    continue
                if rsp.status >= 400:
                    text = await rsp.text()
                    raise KubeError(rsp.status, text[:500])
                return await rsp.json(content_type=None)
        raise AssertionError("unreachable")

    async def get(self, url: str) -> dict[str, Any] | None:
        try:
            return await self.request("GET", url)
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise

    async def list(self, url: str, labels: dict[str, str]) -> list[dict[str, Any]]:
        """Items whose labels match (filtered here too: not every server filters)."""
        selector = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
        result = await self.request("GET", url, params={"labelSelector": selector})
        items = result.get("items") or []
        return [item for item in items
                if all((item.get("metadata", {}).get("labels") or {}).get(k) == v
                       for k, v in labels.items())]

    async def create(self, url: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self.request("POST", url, body=body)

    async def patch(self, url: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self.request("PATCH", url, body=body, content_type=MERGE_PATCH)

    async def delete(self, url: str) -> None:
        try:
            await self.request("DELETE", url)
        except KubeError as exc:
            if exc.status != 404:
                raise

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
