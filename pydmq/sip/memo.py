"""The bounded caches of the parser: the same few headers and URIs arrive over and over."""

from __future__ import annotations

from typing import TypeVar

__all__ = ["remember"]

K = TypeVar("K")
V = TypeVar("V")


def remember(cache: dict[K, V], key: K, value: V, limit: int) -> None:
    """Store ``value`` in ``cache``, which never holds more than ``limit`` entries: when full it
    starts afresh, which costs nothing per hit (unlike LRU bookkeeping) and keeps a stream of
    distinct hostile values from growing it. Callers also refuse keys too long to be worth it."""
    if len(cache) >= limit:
        cache.clear()
    cache[key] = value
