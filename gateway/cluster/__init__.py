"""The contract between gateways and the operator: where the node registry
lives, what a node record holds and how long it counts, and the control
commands. It imports neither engines nor core, so the operator can import it
without pulling in the gateway.
"""
