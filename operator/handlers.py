"""kopf wiring: every trigger runs `reconcile` under a per-resource lock.

Handlers are registered into a registry built at start-up (not at import), so
the timer's interval comes from the command line. kopf keeps its bookkeeping
in `herald.io/` annotations rather than in the resource's status, whose schema
is ours.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import kopf

from herald_operator import metrics
from herald_operator.crd import GROUP, PLURAL, VERSION
from herald_operator.kube import login
from herald_operator.reconcile import Context, reconcile

log = logging.getLogger("herald.operator")


def settings(watch_timeout: float, peering_priority: int | None = None,
             clusterwide: bool = False, peering_lifetime: int = 6) -> kopf.OperatorSettings:
    s = kopf.OperatorSettings()
    # Serving named namespaces needs no cluster-wide list/watch of namespaces and CRDs:
    # least privilege (a namespaced Role suffices); a new CRD version needs a restart.
    s.scanning.disabled = not clusterwide
    s.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    s.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration")
    s.persistence.finalizer = f"{GROUP}/operator"
    # A watch that the server never ends would hang shutdown: bound every stream.
    s.watching.server_timeout = watch_timeout
    s.watching.client_timeout = watch_timeout + 30
    s.posting.reporting_component = "herald-operator"
    s.posting.level = logging.WARNING  # kopf's own logs: only warnings become Events
    s.execution.max_workers = 4
    if peering_priority is not None:
        s.peering.priority = peering_priority
    # kopf renews a keep-alive every max(1, lifetime - 5..10) s and a standby resumes
    # when the active one's is `lifetime` old. kopf's 60 s left a killed replica's fleet
    # unmanaged for most of a minute; 6 s means one PATCH per second per replica.
    s.peering.lifetime = peering_lifetime
    return s


async def run_pass(ctx: Context, body: kopf.Body, patch: kopf.Patch) -> None:
    meta = body["metadata"]
    labels = (meta["namespace"], meta["name"])
    started = time.monotonic()
    try:
        async with ctx.lock(meta["uid"]):
            outcome = await reconcile(ctx, body, time.time())
            ctx.remember(meta["uid"], outcome.status)
    except Exception:
        metrics.RECONCILES.labels(*labels, "error").inc()
        raise
    finally:
        metrics.RECONCILE_SECONDS.observe(time.monotonic() - started)
    metrics.RECONCILES.labels(*labels, "ok").inc()
    for key, value in outcome.status.items():
        patch.status[key] = value
    for kind, reason, message in outcome.events:
        log.log(logging.WARNING if kind == "Warning" else logging.INFO,
                "%s/%s %s: %s", *labels, reason, message)
        kopf.event(body, type=kind, reason=reason, message=message)


def register(registry: kopf.OperatorRegistry, ctx: Context) -> None:
    @kopf.on.login(registry=registry, id="login")
    def credentials(**_: Any) -> kopf.ConnectionInfo:
        """The same credentials for kopf's watches as for our own client."""
        return login()

    same: dict[str, Any] = {"registry": registry, "backoff": 5, "id": "reconcile"}

    @kopf.on.create(GROUP, VERSION, PLURAL, **same)
    @kopf.on.update(GROUP, VERSION, PLURAL, field="spec", **same)
    @kopf.on.resume(GROUP, VERSION, PLURAL, **same)
    async def changed(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
        """Roll a new or changed spec out at once, not at the next tick."""
        await run_pass(ctx, body, patch)

    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry, id="forget")
    async def forget(event: kopf.RawEvent, **_: Any) -> None:
        """A deleted resource's lock and remembered status go with it."""
        if event.get("type") == "DELETED":
            ctx.forget(event["object"]["metadata"]["uid"])

    @kopf.timer(GROUP, VERSION, PLURAL, interval=ctx.interval, registry=registry, id="tick")
    async def tick(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
        """Scale on the registry, rebalance, and put drifted children back."""
        await run_pass(ctx, body, patch)
