"""Tornado request handlers, one module per surface (WebSocket, HTTP API, probes)."""
