"""One gateway process's delivery machinery, transport- and engine-agnostic
(centrifuge's node/hub split):

- `node`: what a subscribe or publish means (rules, recovery, drain)
- `hub`: local fan-out to this node's subscribers
- `session`: one client connection, whatever its transport
- `outbox`: each connection's bounded, conflating send path
- `publishing`: the publish rules shared by every way in
- `registry`: this node's record in the cluster registry
- `heartbeat`: one liveness timer for every WebSocket
"""
