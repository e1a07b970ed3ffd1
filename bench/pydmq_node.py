"""Run one pydmq node for the benchmarks: ``python bench/pydmq_node.py -c node.toml``.

``pydmq run`` does not wire the consumers (yet), so this launcher does: a
:class:`~pydmq.dmq.runtime.DmqNode` from the TOML file plus the real htable consumer
(:func:`pydmq.consumers.htable.attach`) when ``[htable] enable_dmq`` is set, on uvloop like
``pydmq run``. It prints ``READY <pid>`` once the node listens; on SIGTERM/SIGINT it stops the
node (announcing ``status=disabled``) and prints ``STATS <json>`` (DMQ, SIP, transaction and
htable counters, RSS) before exiting. ``--status-file`` keeps ``pydmq run``'s JSON status file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pydmq.cli import StatusFile
from pydmq.config import load_settings
from pydmq.dmq.runtime import DmqNode
from pydmq.sip.transport import install_uvloop


def _rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def serve(config: str, status_path: str | None) -> int:
    settings, _ = load_settings(config, {}, [])
    node = DmqNode(settings)
    ht: Any = None
    if settings.htable.enable_dmq or settings.htable.tables:
        from pydmq.consumers.htable import attach  # noqa: PLC0415

        ht = attach(node)
    await node.start()
    if status_path is not None:
        status = StatusFile(status_path, node)
        status.write()
        node.events.subscribe(status.on_event)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"READY {os.getpid()}", flush=True)
    await stop.wait()
    stats: dict[str, Any] = {
        "rss_kb": _rss_kb(),
        "dmq": node.stats.snapshot(),
        "transactions": node.endpoint.layer.stats(),
        "transport_udp_dropped": node.endpoint.transport.stats.udp_dropped,
    }
    if ht is not None:
        hs = ht.stats
        stats["htable"] = {name: getattr(hs, name) for name in hs.__slots__}
        stats["htable_cells"] = {t: len(ht.items(t)) for t in ht.tables()}
        await ht.close()
    await node.stop(announce_timeout=0.5)
    print("STATS " + json.dumps(stats, default=str), flush=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-c", "--config", required=True)
    ap.add_argument("--status-file", default=None)
    args = ap.parse_args()
    settings, _ = load_settings(args.config, {}, [])
    logging.basicConfig(
        level=settings.log.level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    install_uvloop()
    return asyncio.run(serve(args.config, args.status_file))


if __name__ == "__main__":
    sys.exit(main())
