"""Prometheus metrics of one node, in a registry of its own.

A registry per node (not the global default) lets tests run several gateways
in one process and read each one's figures. Names follow Prometheus
conventions: `herald_` prefix, `_total` counters, base units (seconds, bytes).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# `*_created` series double the exposition for no use on dashboards.
disable_created_metrics()

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.connections = Gauge(
            "herald_connections", "Open client connections by transport", ["transport"], registry=r
        )
        self.connects = Counter(
            "herald_connects_total", "Accepted client connections", ["transport"], registry=r
        )
        self.disconnects = Counter(
            "herald_disconnects_total", "Closed connections by close code", ["code"], registry=r
        )
        self.subscriptions = Gauge(
            "herald_subscriptions", "Client subscriptions on this node", registry=r
        )
        self.channels = Gauge(
            "herald_channels", "Channels with at least one local subscriber", registry=r
        )
        self.messages_in = Counter(
            "herald_messages_in_total", "Frames received from clients", registry=r
        )
        self.messages_out = Counter(
            "herald_messages_out_total", "Publications written to clients", registry=r
        )
        self.publications = Counter(
            "herald_publications_total", "Publications accepted by this node", registry=r
        )
        self.duplicates = Counter(
            "herald_publications_duplicate_total",
            "Publishes whose Idempotency-Key was already applied (answered, nothing published)",
            registry=r,
        )
        self.errors = Counter(
            "herald_errors_total", "Error replies sent, by code", ["code"], registry=r
        )
        self.dropped = Counter(
            "herald_messages_dropped_total",
            "Publications not written to a client, by reason",
            ["reason"],
            registry=r,
        )
        self.conflated = Counter(
            "herald_messages_conflated_total",
            "Pending progress messages replaced by a newer one (slow clients)",
            registry=r,
        )
        self.publish_latency = Histogram(
            "herald_publish_duration_seconds",
            "Time to accept a publication (engine round trip included)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.recovered = Counter(
            "herald_recoveries_total",
            "Subscribes with `since`, by outcome",
            ["recovered"],
            registry=r,
        )

        self.shed = Counter(
            "herald_connections_shed_total",
            "Clients asked to reconnect elsewhere, by reason (rebalance, draining)",
            ["reason"],
            registry=r,
        )

        self.slow_consumers = Counter(
            "herald_slow_consumers_total",
            "Connections closed (4008) because their outgoing buffer passed its bound",
            registry=r,
        )
        self.refused = Counter(
            "herald_connections_refused_total",
            "Connections refused before serving, by reason (ip_rate, user_cap, draining)",
            ["reason"],
            registry=r,
        )
        self.buffered_bytes = Gauge(
            "herald_send_buffer_bytes",
            "Bytes waiting to be written to clients (all connections, at scrape time)",
            registry=r,
        )

        self.delivery_latency = Histogram(
            "herald_delivery_latency_seconds",
            "From publication to hand-off to this node's subscribers (queueing included)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.broker_roundtrip = Histogram(
            "herald_broker_roundtrip_seconds",
            "Round trip of a PING to the engine (Redis), every registry interval",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.unauthenticated = Gauge(
            "herald_connections_unauthenticated",
            "WebSocket connections open but not yet authenticated",
            registry=r,
        )
        self.hook_requests = Counter(
            "herald_hook_requests_total",
            "Backend hook calls by hook and outcome (ok, rejected, timeout, error, "
            "malformed, overloaded, circuit_open)",
            ["hook", "outcome"],
            registry=r,
        )
        self.disconnected = Counter(
            "herald_admin_disconnects_total",
            "Connections closed by the server API, by whether they were told to reconnect",
            ["reconnect"],
            registry=r,
        )
        self.presence_full = Counter(
            "herald_presence_full_total",
            "Subscriptions not listed in presence because the channel's list was full",
            registry=r,
        )
        self.presence_errors = Counter(
            "herald_presence_errors_total",
            "Presence store calls that failed (store unreachable), by operation",
            ["op"],
            registry=r,
        )
        self.presence_events = Counter(
            "herald_presence_events_total", "join/leave frames sent to subscribers", registry=r
        )
        self.hook_duration = Histogram(
            "herald_hook_duration_seconds",
            "Backend hook call duration (calls that went out)",
            ["hook"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

    def bind(self, read: Callable[[], dict[str, float]]) -> None:
        """Figures read from the node at scrape time (engine state, drain progress)."""
        self.registry.register(_NodeCollector(read))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _NodeCollector(Collector):
    """Values that live on the node and engine, exported without double bookkeeping."""

    def __init__(self, read: Callable[[], dict[str, float]]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        values = self._read()
        yield GaugeMetricFamily(
            "herald_broker_up", "1 while the engine (Redis) is reachable", value=values["up"]
        )
        yield CounterMetricFamily(
            "herald_broker_reconnects",
            "Times the engine's pub/sub connection was re-established",
            value=values["reconnects"],
        )
        yield CounterMetricFamily(
            "herald_broker_stalls",
            "Times the engine's pub/sub connection went silent (not ready until it answers)",
            value=values["stalls"],
        )
        yield CounterMetricFamily(
            "herald_broker_subscription_drift",
            "Subscriptions the periodic audit found out of step with Redis (then repaired)",
            value=values["drift"],
        )
        yield CounterMetricFamily(
            "herald_broker_bad_records",
            "Records in the engine that were not publications, dropped (their offsets are gaps)",
            value=values["bad_records"],
        )
        yield CounterMetricFamily(
            "herald_broker_messages_in",
            "Publications received from the engine for local subscribers",
            value=values["messages_in"],
        )
        yield GaugeMetricFamily(
            "herald_draining", "1 while this node drains its connections", value=values["draining"]
        )
