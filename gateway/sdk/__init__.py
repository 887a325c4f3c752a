"""Python libraries for Herald's users: `publisher` for backends and workers,
`client` for services that consume channels.
"""
