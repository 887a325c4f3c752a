"""Herald's gateway: WebSocket, SSE and HTTP endpoints over a pluggable broker."""

__version__ = "0.1.0"
