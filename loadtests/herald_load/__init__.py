"""Herald's Locust load tests: WebSocket viewers, HTTP publishers, scenarios, checks.

`loadtests/locustfile.py` wires these modules into Locust; README.md next to
it says how to run them.
"""
