"""Herald's Kubernetes operator (imported as `herald_operator`).

It runs fleets of gateways declared as `RealtimeGateway` resources: owns their
Deployment, Service and PodDisruptionBudget, and scales them on the live node
registry the gateways write to Redis. The folder is `operator/` but the import
name is `herald_operator` so the standard library's `operator` stays intact.
"""
