"""Fixtures shared by the test packages."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.support.cluster import Cluster


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    """In-process DMQ nodes on real UDP, every one stopped at the end (tests/support/cluster.py).

    Test modules that run node processes define their own ``cluster`` instead."""
    c = Cluster()
    try:
        yield c
    finally:
        await c.close()
