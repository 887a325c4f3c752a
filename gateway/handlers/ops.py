"""Probes and metrics for Kubernetes and Prometheus (PROTOCOL.md §5)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST

from gateway.handlers.base import JsonHandler


class HealthHandler(JsonHandler):
    """GET /healthz: the process and its event loop answer."""

    def get(self) -> None:
        self.write_json({"status": "ok", "node": self.node.id})


class ReadyHandler(JsonHandler):
    """GET /readyz: accepting connections (broker reachable and not draining)."""

    def get(self) -> None:
        node = self.node
        ready = node.ready
        body = {
            "status": "ready" if ready else "not ready",
            "node": node.id,
            "broker": node.broker.ready,
            "draining": node.draining,
        }
        self.write_json(body, 200 if ready else 503)


class MetricsHandler(JsonHandler):
    """GET /metrics: Prometheus text format."""

    def get(self) -> None:
        node = self.node
        node.metrics.subscriptions.set(node.hub.subscription_count)
        node.metrics.channels.set(node.hub.channel_count)
        node.metrics.buffered_bytes.set(sum(s.pending_bytes for s in node.sessions))
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(node.metrics.render())
