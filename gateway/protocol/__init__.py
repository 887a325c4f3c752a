"""The wire contract (PROTOCOL.md): what a channel name, a publication, an
error and each server frame are. The bottom layer: it imports nothing else of
Herald, so clients, engines and the core all speak the same types.

- `channels`: names, namespaces and their rules
- `errors`: error codes, close codes, `ProtocolError`
- `wire`: JSON and WebSocket/SSE framing
"""
