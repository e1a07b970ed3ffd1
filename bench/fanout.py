"""Broadcast fan-out: KDMQ messages per second delivered to 4 nodes.

Run: ``python bench/fanout.py [--seconds 10] [--window 64] [--receivers pydmq,kamailio]``.

A pydmq sender (a :class:`DmqNode` in this process, on uvloop) joins a cluster of 4 receiver
nodes and broadcasts htable SET_CELL messages (``api.bcast_message("htable", ...)``, one KDMQ
per receiver each, over UDP) as fast as it can with ``--window`` broadcasts in flight, for
``--seconds``. A broadcast counts once every receiver answered it; "delivered" counts every
200 OK. Run once with 4 ``pydmq run`` receivers and once with 4 Kamailio 5.6.3 receivers
(htable ``t``, ``children=2``, ``num_workers=2``), so the ratio compares the receivers with the
same sender. Every process shares the machine's CPUs, so the sender's own cost is in both.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import (
    HTABLE_DEF,
    CpuMeter,
    PydmqProcess,
    free_port,
    install_signal_handlers,
    start_kamailio,
    stop_kamailio,
)

from pydmq.config import settings_from_mapping
from pydmq.consumers.htable_dmq import CONTENT_TYPE, encode_set_cell
from pydmq.dmq.api import load_api
from pydmq.dmq.runtime import DmqNode
from pydmq.sip.transport import install_uvloop

NODES = 4


async def drive(uris: list[str], seconds: float, window: int) -> dict[str, float]:
    port = free_port("udp")
    settings, _ = settings_from_mapping(
        {
            "dmq": {
                "server_address": f"sip:127.0.0.1:{port}",
                "notification_address": uris,
                "ping_interval": 60,
            },
            "log": {"level": "WARNING"},
        }
    )
    node = DmqNode(settings)
    api = load_api(node)
    await node.start()
    try:
        deadline = time.monotonic() + 15
        while len(node.nodes.active_remote(None)) < len(uris):
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(node.nodes.active_remote(None))} nodes joined")
            await asyncio.sleep(0.05)
        sent = delivered = failed = 0
        inflight: set[asyncio.Future[object]] = set()
        t0 = time.monotonic()
        end = t0 + seconds
        i = 0
        while time.monotonic() < end:
            while len(inflight) < window:
                i += 1
                body = encode_set_cell("t", f"k{i % 1000}", f"v{i}")
                fut = api.bcast_message("htable", body, content_type=CONTENT_TYPE)
                inflight.add(fut)  # type: ignore[arg-type]
                sent += 1
            done, _ = await asyncio.wait(inflight, return_when=asyncio.FIRST_COMPLETED)
            for fut in done:
                inflight.discard(fut)
                for d in fut.result():  # type: ignore[attr-defined]
                    if d.status == 200:
                        delivered += 1
                    else:
                        failed += 1
        if inflight:
            done, _ = await asyncio.wait(inflight, timeout=35)
            for fut in done:
                for d in fut.result():  # type: ignore[attr-defined]
                    delivered += d.status == 200
                    failed += d.status != 200
        elapsed = time.monotonic() - t0
        return {
            "broadcasts": sent,
            "delivered": delivered,
            "failed": failed,
            "seconds": elapsed,
            "delivered_per_s": delivered / elapsed,
            "broadcasts_per_s": sent / elapsed,
        }
    finally:
        await node.stop(announce_timeout=0.5)


def run_case(kind: str, seconds: float, window: int) -> dict[str, float]:
    procs: list[PydmqProcess] = []
    kams = []
    try:
        if kind == "pydmq":
            for _ in range(NODES):
                procs.append(
                    PydmqProcess(
                        dmq={"num_workers": 2, "ping_interval": 60},
                        htable={"tables": [HTABLE_DEF], "enable_dmq": True},
                    ).start()
                )
            uris = [p.uri for p in procs]

            def pids() -> list[int]:
                return [p.pid for p in procs]
        else:
            for i in range(NODES):
                kams.append(
                    start_kamailio(
                        name=f"fanout-k{i}",
                        htable=True,
                        htable_def=HTABLE_DEF,
                        dmq_init_sync=False,
                        ping_interval=60,
                    )
                )
            uris = [k.uri for k in kams]

            def pids() -> list[int]:
                return [pid for k in kams for pid in k.group_pids()]

        meter = CpuMeter(pids)
        meter.start()
        result = asyncio.run(drive(uris, seconds, window))
        result["receivers_cpu"] = meter.stop()
        return result
    finally:
        for p in procs:
            p.stop()
        for k in kams:
            with contextlib.suppress(Exception):
                stop_kamailio(k)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--window", type=int, default=64, help="broadcasts in flight")
    ap.add_argument("--receivers", default="pydmq,kamailio")
    args = ap.parse_args()
    install_signal_handlers()
    install_uvloop()
    results: dict[str, dict[str, float]] = {}
    for kind in [k.strip() for k in args.receivers.split(",") if k.strip()]:
        r = results[kind] = run_case(kind, args.seconds, args.window)
        print(
            f"sender pydmq -> {NODES} {kind:8s} receivers: {r['delivered_per_s']:9,.0f} delivered/s"
            f" ({r['broadcasts_per_s']:,.0f} broadcasts/s, {r['failed']:.0f} failed,"
            f" receivers' CPU {r['receivers_cpu']:.0f}% of a core)",
            flush=True,
        )
    if "pydmq" in results and "kamailio" in results:
        ratio = results["pydmq"]["delivered_per_s"] / results["kamailio"]["delivered_per_s"]
        print(f"ratio (pydmq receivers / Kamailio receivers): {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
