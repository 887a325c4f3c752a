"""The operator's own Prometheus metrics (served on `--metrics-port`)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

REGISTRY = CollectorRegistry(auto_describe=True)
_LABELS = ("namespace", "gateway")

RECONCILES = Counter("herald_operator_reconciles", "Reconcile passes, by result.",
                     (*_LABELS, "result"), registry=REGISTRY)
RECONCILE_SECONDS = Histogram("herald_operator_reconcile_seconds", "Time per reconcile pass.",
                              registry=REGISTRY)
DECISIONS = Counter("herald_operator_scale_decisions", "Replica changes, by direction.",
                    (*_LABELS, "direction"), registry=REGISTRY)
DESIRED = Gauge("herald_operator_desired_replicas", "Replicas the operator last set.",
                _LABELS, registry=REGISTRY)
CONNECTIONS = Gauge("herald_operator_connections", "Connections the registry reports.",
                    _LABELS, registry=REGISTRY)
REPORTING = Gauge("herald_operator_reporting_nodes", "Gateways with a fresh registry entry.",
                  _LABELS, registry=REGISTRY)
REGISTRY_ERRORS = Counter("herald_operator_registry_errors", "Failed registry reads.",
                          _LABELS, registry=REGISTRY)
SHED = Counter("herald_operator_shed_requested", "Connections gateways were asked to shed.",
               _LABELS, registry=REGISTRY)
DRIFT = Counter("herald_operator_drift_corrections", "Owned objects patched back into shape.",
                (*_LABELS, "kind"), registry=REGISTRY)


def serve(port: int, addr: str = "0.0.0.0") -> None:
    start_http_server(port, addr=addr, registry=REGISTRY)
