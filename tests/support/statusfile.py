"""Read what ``pydmq run --status-file PATH`` writes (replaced atomically: always whole JSON)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_status(path: Path) -> dict[str, Any] | None:
    """The last status the node wrote, or None before its first write."""
    try:
        return json.loads(path.read_text())  # type: ignore[no-any-return]
    except FileNotFoundError:
        return None


def status_rows(path: Path) -> dict[str, dict[str, Any]]:
    """``host:port`` -> ``dmq.list_nodes`` row, the local node included ({} before start)."""
    status = read_status(path)
    if status is None:
        return {}
    return {f"{r['host']}:{r['port']}": r for r in status["nodes"]}
