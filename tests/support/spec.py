"""Where the project's reference material lives: ``shared/spec`` beside the checkout.

CI lays a copy of ``shared/`` next to the clone; ``PYDMQ_SPEC`` points elsewhere when needed.
A missing directory is an error in the tests that use it, never a skip.
"""

from __future__ import annotations

import os
from pathlib import Path

SPEC_DIR = Path(
    os.environ.get("PYDMQ_SPEC", Path(__file__).resolve().parents[3] / "shared" / "spec")
)
WIRE_DIR = SPEC_DIR / "wire-kamailio-5.6.3"


def wire_dir() -> Path:
    """The golden Kamailio 5.6.3 captures; fails loudly when they are not there."""
    assert WIRE_DIR.is_dir(), f"golden captures missing: {WIRE_DIR} (set PYDMQ_SPEC)"
    return WIRE_DIR
