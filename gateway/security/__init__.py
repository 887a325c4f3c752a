"""Who may connect and how fast: JWT and API-key checks (`auth`), the
admission rules shared by every transport (`admission`), token buckets
(`ratelimit`), and which client address to believe (`proxies`).
"""
