"""htable join-time sync of 100,000 cells: how long until the joiner holds them all.

Run: ``python bench/htable_sync.py [--cells 100000] [--cases pp,pk,kp]``.

Cases (source -> joiner), the joiner always started with ``dmq_init_sync = 1``:

* ``pp`` pydmq -> pydmq: the source is a :class:`DmqNode` with the htable consumer in this
  process, its table ``t`` filled directly; the joiner is ``pydmq run``. Also prints the
  joiner's resident memory once it holds every cell.
* ``pk`` pydmq -> Kamailio 5.6.3: the same source, a Kamailio joiner (htable ``t``).
* ``kp`` Kamailio -> pydmq: a Kamailio source, filled first by this process broadcasting
  SET_CELLs to it over DMQ, then a ``pydmq run`` joiner.

The time runs from the moment the joiner is ready (listening) to the moment its table ``t``
holds every cell (``htable.stats`` over JSON-RPC, polled every 100 ms): join, sync request,
then every sync group received and applied. pydmq answers a sync with groups of
``sync_group_bytes_udp`` (1000 bytes) over UDP, ``sync_window`` (4) in flight; Kamailio sends
its whole table at once in groups of up to 60 KB.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import (
    HTABLE_DEF,
    KamailioNode,
    PydmqProcess,
    free_port,
    install_signal_handlers,
    proc_rss_kb,
    start_kamailio,
    stop_all,
    stop_kamailio,
    table_cells,
)

from pydmq.config import settings_from_mapping
from pydmq.consumers.htable import HtableService, attach
from pydmq.consumers.htable_dmq import CONTENT_TYPE, encode_set_cell
from pydmq.dmq.api import load_api
from pydmq.dmq.runtime import DmqNode
from pydmq.sip.transport import install_uvloop


def kamailio_cells(node: KamailioNode) -> int:
    cells = table_cells(node.rpc_result)
    return -1 if cells is None else cells


def pydmq_cells(proc: PydmqProcess) -> int:
    cells = table_cells(proc.rpc)
    return -1 if cells is None else cells


async def wait_cells(count: Callable[[], int], want: int, timeout: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if await asyncio.to_thread(count) >= want:
            return time.monotonic() - t0
        await asyncio.sleep(0.1)
    raise TimeoutError(f"only {await asyncio.to_thread(count)} of {want} cells after {timeout}s")


async def pydmq_source(cells: int) -> tuple[DmqNode, HtableService]:
    port = free_port("udp")
    settings, _ = settings_from_mapping(
        {
            "dmq": {"server_address": f"sip:127.0.0.1:{port}", "ping_interval": 60},
            "htable": {"tables": [HTABLE_DEF], "enable_dmq": True, "dmq_init_sync": False},
            "log": {"level": "WARNING"},
        }
    )
    node = DmqNode(settings)
    ht = attach(node)
    await node.start()
    for i in range(cells):
        ht.store.set("t", f"key-{i:06d}", f"value-{i:06d}")
    return node, ht


def pydmq_joiner(seed: str) -> PydmqProcess:
    return PydmqProcess(
        dmq={"ping_interval": 60, "notification_address": [seed]},
        htable={"tables": [HTABLE_DEF], "enable_dmq": True, "dmq_init_sync": True},
    ).start()


async def case_from_pydmq(joiner_kind: str, cells: int, timeout: float) -> dict[str, float]:
    node, ht = await pydmq_source(cells)
    out: dict[str, float] = {}
    try:
        seed = node.local.orig_uri
        if joiner_kind == "pydmq":
            proc = await asyncio.to_thread(pydmq_joiner, seed)
            try:
                out["seconds"] = await wait_cells(lambda: pydmq_cells(proc), cells, timeout)
                out["rss_mb"] = proc_rss_kb(proc.pid) / 1024
            finally:
                await asyncio.to_thread(proc.stop)
        else:
            kam = await asyncio.to_thread(
                start_kamailio,
                name="sync-k",
                htable=True,
                htable_def=HTABLE_DEF,
                dmq_init_sync=True,
                notification_addresses=[seed],
                ping_interval=60,
            )
            try:
                out["seconds"] = await wait_cells(lambda: kamailio_cells(kam), cells, timeout)
            finally:
                await asyncio.to_thread(stop_kamailio, kam)
    finally:
        await ht.close()
        await node.stop(announce_timeout=0.3)
    return out


async def fill_kamailio(kam: KamailioNode, cells: int, window: int = 256) -> float:
    """Broadcast ``cells`` SET_CELLs to ``kam`` from a throw-away pydmq node; seconds taken."""
    port = free_port("udp")
    settings, _ = settings_from_mapping(
        {
            "dmq": {
                "server_address": f"sip:127.0.0.1:{port}",
                "notification_address": [kam.uri],
                "ping_interval": 60,
            },
            "log": {"level": "WARNING"},
        }
    )
    node = DmqNode(settings)
    api = load_api(node)
    await node.start()
    try:
        while not node.nodes.active_remote(None):
            await asyncio.sleep(0.05)
        t0 = time.monotonic()
        inflight: set[asyncio.Future[object]] = set()
        for i in range(cells):
            body = encode_set_cell("t", f"key-{i:06d}", f"value-{i:06d}")
            inflight.add(api.bcast_message("htable", body, content_type=CONTENT_TYPE))  # type: ignore[arg-type]
            if len(inflight) >= window:
                _, inflight = await asyncio.wait(inflight, return_when=asyncio.FIRST_COMPLETED)
        if inflight:
            await asyncio.wait(inflight)
        return time.monotonic() - t0
    finally:
        await node.stop(announce_timeout=0.3)


async def case_from_kamailio(cells: int, timeout: float) -> dict[str, float]:
    kam = await asyncio.to_thread(
        start_kamailio,
        name="sync-src",
        htable=True,
        htable_def="t=>size=16;autoexpire=0;dmqreplicate=1;",
        ping_interval=60,
        shm_mb=256,
    )
    out: dict[str, float] = {}
    try:
        out["fill_seconds"] = await fill_kamailio(kam, cells)
        have = await asyncio.to_thread(kamailio_cells, kam)
        if have < cells:
            raise RuntimeError(f"Kamailio holds {have} of {cells} cells after the fill")
        proc = await asyncio.to_thread(pydmq_joiner, kam.uri)
        try:
            out["seconds"] = await wait_cells(lambda: pydmq_cells(proc), cells, timeout)
            out["rss_mb"] = proc_rss_kb(proc.pid) / 1024
        finally:
            await asyncio.to_thread(proc.stop)
    finally:
        await asyncio.to_thread(stop_kamailio, kam)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=100_000)
    ap.add_argument("--cases", default="pp,pk,kp")
    ap.add_argument("--timeout", type=float, default=180.0)
    args = ap.parse_args()
    install_signal_handlers()
    install_uvloop()
    n = args.cells
    results: dict[str, dict[str, float]] = {}
    try:
        for case in args.cases.split(","):
            if case == "pp":
                r = results[case] = asyncio.run(case_from_pydmq("pydmq", n, args.timeout))
                print(
                    f"pydmq -> pydmq   : {n:,} cells in {r['seconds']:6.2f} s"
                    f" ({n / r['seconds']:9,.0f} cells/s); joiner RSS {r['rss_mb']:.0f} MB",
                    flush=True,
                )
            elif case == "pk":
                r = results[case] = asyncio.run(case_from_pydmq("kamailio", n, args.timeout))
                print(
                    f"pydmq -> Kamailio: {n:,} cells in {r['seconds']:6.2f} s"
                    f" ({n / r['seconds']:9,.0f} cells/s)",
                    flush=True,
                )
            elif case == "kp":
                r = results[case] = asyncio.run(case_from_kamailio(n, args.timeout))
                print(
                    f"Kamailio -> pydmq: {n:,} cells in {r['seconds']:6.2f} s"
                    f" ({n / r['seconds']:9,.0f} cells/s); joiner RSS {r['rss_mb']:.0f} MB"
                    f" (filling Kamailio by DMQ took {r['fill_seconds']:.1f} s)",
                    flush=True,
                )
    finally:
        stop_all()
    if "pp" in results and "pk" in results:
        print(
            "ratio pydmq joiner / Kamailio joiner (same pydmq source, time; lower is faster):"
            f" {results['pp']['seconds'] / results['pk']['seconds']:.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
