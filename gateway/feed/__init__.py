"""Change feeds: database changes published to Herald channels.

`herald feed postgres` (postgres.py) follows an outbox table that a trigger
fills in the application's own transactions (outbox.sql) and publishes each
row through the Python publisher (gateway.sdk), at least once, with the
idempotency key `feed:<outbox id>` so that Herald applies it exactly once.
What a row means is decided in mapping.py (pure functions); this package
never touches engine internals: it is a publisher like any backend.
"""
