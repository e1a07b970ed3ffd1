"""pydmq: Kamailio's DMQ (distributed message queue) as a Python node, wire-compatible."""

__version__ = "0.1.0"
