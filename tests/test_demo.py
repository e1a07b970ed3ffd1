"""`pydmq demo`: three real node processes form a cluster and exchange broadcasts."""

from __future__ import annotations

import socket
import subprocess
import sys


def _three_free_udp_ports() -> int:
    """A base port whose next two ports are free on 127.0.0.1 (UDP)."""
    for base in range(32000, 32600, 3):
        socks = []
        try:
            for port in range(base, base + 3):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise AssertionError("no three consecutive free UDP ports")


def test_demo_forms_cluster_and_delivers_broadcasts() -> None:
    base = _three_free_udp_ports()
    proc = subprocess.run(
        [sys.executable, "-m", "pydmq", "demo", "--duration", "10", "--base-port", str(base)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "all three nodes active and every message received by all" in out
    summary = out.split("summary after", 1)[1]
    for i in range(3):
        me = f"127.0.0.1:{base + i}"
        assert f"{me}=self" in summary
        others = [f"127.0.0.1:{base + j}" for j in range(3) if j != i]
        line = next(ln for ln in summary.splitlines() if f"{me}=self" in ln)
        assert all(f"{o}=active" in line for o in others), line
    assert summary.count("received 'demo' messages from 2 peer(s)") == 3
