"""Resident memory of a pydmq node: idle, and holding 100,000 htable cells.

Run: ``python bench/memory.py [--cells 100000]``.

* idle: ``pydmq run`` with the default settings (plus a JSON-RPC listener), and the same with
  the htable table ``t`` replicated (the benchmark configuration), 3 s after start;
* idle with ``[sip] udp_children = 2`` (the ``compare.py`` configuration): the main process's
  RSS and the PSS of the node's three processes;
* holding N cells: a ``pydmq run`` joiner after it received N cells of table ``t`` by the
  join-time sync from a pydmq source (see ``htable_sync.py``);
* for context, Kamailio 5.6.3 idle (``children=2``, htable): the sum of the proportional set
  sizes (PSS) of its processes, since they share their 64 MB shared-memory pool.

Goal: an idle pydmq node at most 60 MB.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import (
    HTABLE_DEF,
    PydmqProcess,
    install_signal_handlers,
    proc_rss_kb,
    start_kamailio,
    stop_all,
    stop_kamailio,
)
from htable_sync import case_from_pydmq

from pydmq.sip.transport import install_uvloop

GOAL_MB = 60


def pss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def idle_rss(htable: bool) -> float:
    proc = PydmqProcess(
        dmq={"ping_interval": 60},
        htable={"tables": [HTABLE_DEF], "enable_dmq": True} if htable else None,
    ).start()
    try:
        time.sleep(3)
        return proc_rss_kb(proc.pid) / 1024
    finally:
        proc.stop()


def idle_with_receivers(children: int) -> tuple[float, float, int]:
    """``[sip] udp_children``: (main RSS, PSS of the node's processes in all, processes)."""
    proc = PydmqProcess(
        dmq={"ping_interval": 60},
        htable={"tables": [HTABLE_DEF], "enable_dmq": True},
        extra={"sip": {"udp_children": children}},
    ).start()
    try:
        time.sleep(3)
        pids = proc.pids()
        return proc_rss_kb(proc.pid) / 1024, sum(pss_kb(p) for p in pids) / 1024, len(pids)
    finally:
        proc.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=100_000)
    args = ap.parse_args()
    install_signal_handlers()
    install_uvloop()
    try:
        plain = idle_rss(False)
        print(f"pydmq idle, default settings      : {plain:6.1f} MB RSS (goal <= {GOAL_MB} MB)")
        with_ht = idle_rss(True)
        print(f"pydmq idle, htable t replicated   : {with_ht:6.1f} MB RSS (goal <= {GOAL_MB} MB)")
        rss, pss, n = idle_with_receivers(2)
        print(
            f"pydmq idle, htable, udp_children=2: {rss:6.1f} MB RSS main process,"
            f" {pss:.1f} MB PSS over its {n} processes"
        )
        r = asyncio.run(case_from_pydmq("pydmq", args.cells, 180.0))
        print(
            f"pydmq holding {args.cells:,} cells       : {r['rss_mb']:6.1f} MB RSS"
            f" (+{r['rss_mb'] - with_ht:.1f} MB,"
            f" {(r['rss_mb'] - with_ht) * 1024 * 1024 / args.cells:.0f} bytes per cell)",
            flush=True,
        )
        kam = start_kamailio(name="memory-k", htable=True, htable_def=HTABLE_DEF)
        try:
            time.sleep(3)
            pids = kam.group_pids()
            total = sum(pss_kb(p) for p in pids) / 1024
            main_rss = proc_rss_kb(kam.pid or pids[0]) / 1024
            print(
                f"Kamailio idle ({len(pids)} processes)      : {total:6.1f} MB PSS in all"
                f" (main process RSS {main_rss:.1f} MB, shm pool 64 MB)"
            )
        finally:
            stop_kamailio(kam)
    finally:
        stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
