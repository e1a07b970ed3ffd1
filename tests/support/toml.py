"""Write node configuration files for tests that start ``pydmq run -c FILE`` processes."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any


def to_toml(tables: Mapping[str, Mapping[str, Any]]) -> str:
    """``{"dmq": {...}, "tm": {...}}`` as TOML; empty tables are left out. Values are the plain
    kinds settings use: bool, int, float, str and lists of those."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)  # a JSON string of plain ASCII is a TOML basic string
        return "[" + ", ".join(value(x) for x in v) + "]"

    return "".join(
        f"[{name}]\n" + "".join(f"{k} = {value(v)}\n" for k, v in body.items()) + "\n"
        for name, body in tables.items()
        if body
    )
