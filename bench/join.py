"""Join convergence: how long until every node of an N-node cluster lists all N as active.

Run: ``python bench/join.py [--sizes 3,10,30] [--timeout 120]``.

For each size N: node 0 (``pydmq run``) is started and ready; then nodes 1..N-1 are launched at
once, each with ``notification_address`` = node 0 (the usual seed setup, ``ping_interval`` 60 so
that pings play no part). Every node keeps ``pydmq run --status-file`` up to date on each
membership change; the harness polls those files. Printed per N:

* listening: launch -> the last node listens (Python start-up of N-1 processes on these CPUs);
* converged: launch -> every node lists N active nodes (itself included);
* after listening: converged - listening, the protocol's own part (join with Max-Forwards 2,
  re-broadcast of changed lists).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import PydmqProcess, install_signal_handlers, stop_all


def _active(proc: PydmqProcess) -> int:
    nodes = proc.status().get("nodes", [])
    return sum(1 for n in nodes if n.get("status") == "active")


def converge(n: int, timeout: float) -> dict[str, float]:
    seed = PydmqProcess(dmq={"ping_interval": 60}).start()
    others = [
        PydmqProcess(dmq={"ping_interval": 60, "notification_address": [seed.uri]})
        for _ in range(n - 1)
    ]
    try:
        t0 = time.monotonic()
        for p in others:
            p.launch()
        listening = converged = None
        deadline = t0 + timeout
        everyone = [seed, *others]
        while time.monotonic() < deadline:
            now = time.monotonic()
            if listening is None and all(p.status_path.exists() for p in others):
                listening = now - t0
            if listening is not None and all(_active(p) >= n for p in everyone):
                converged = now - t0
                break
            time.sleep(0.01)
        if converged is None:
            counts = sorted(_active(p) for p in everyone)
            raise RuntimeError(f"{n} nodes did not converge in {timeout}s: active counts {counts}")
        assert listening is not None
        return {"listening": listening, "converged": converged}
    finally:
        for p in reversed(others):
            p.kill()
        seed.kill()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="3,10,30")
    ap.add_argument("--timeout", type=float, default=120.0)
    args = ap.parse_args()
    install_signal_handlers()
    try:
        for n in (int(x) for x in args.sizes.split(",")):
            r = converge(n, args.timeout)
            print(
                f"{n:3d} pydmq nodes: listening {r['listening']:6.2f} s, converged"
                f" {r['converged']:6.2f} s after launch ({r['converged'] - r['listening']:5.2f} s"
                " after the last one listened)",
                flush=True,
            )
    finally:
        stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
