"""``bench/compare.py --smoke`` runs end to end: both servers answer every scenario.

This proves the benchmark harness works (Kamailio and pydmq start, sipp drives them, the report
is written). It asserts nothing about speed: a smoke probe is 300 requests/s for 3 s.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.kamailio,
    pytest.mark.skipif(
        shutil.which("sipp") is None
        or (shutil.which("kamailio") or shutil.which("kamailio", path="/usr/sbin:/sbin")) is None,
        reason="needs sipp and kamailio (scripts/test.sh installs them)",
    ),
]


@pytest.mark.timeout(120)
def test_compare_smoke_produces_a_report(tmp_path: Path) -> None:
    out = tmp_path / "RESULTS.md"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "compare.py"), "--smoke", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text()
    assert "| scenario | Kamailio | pydmq |" in text
    rows = [line for line in text.splitlines() if line.startswith("| (")]
    assert [row[:4] for row in rows] == ["| (a", "| (b", "| (c"]
    # Every scenario was run against both servers and each answered (a probe that was not
    # perfectly clean on a loaded machine is fine: this is not a measurement).
    answered = {
        (m.group(1), m.group(2))
        for m in re.finditer(r"^\s+(Kamailio|pydmq)\s+\(([abc])\).* ok=(\d+)", text, re.M)
        if int(m.group(3)) > 0
    }
    assert answered == {(s, k) for s in ("Kamailio", "pydmq") for k in "abc"}, text
