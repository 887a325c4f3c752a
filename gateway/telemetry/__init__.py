"""What the gateway tells its operators: OpenTelemetry spans (`tracing`),
Prometheus metrics (`metrics`), JSON log lines (`logs`). Costs nothing when
off; imported by every layer above the protocol.
"""
