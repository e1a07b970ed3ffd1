"""Run one pydmq node for the benchmarks: ``python bench/pydmq_node.py -c node.toml``.

``pydmq run`` does not wire the consumers yet, so this launcher does what it will: a
:class:`~pydmq.dmq.runtime.DmqNode` from the TOML file, plus the real htable consumer
(:func:`pydmq.consumers.htable.attach`) when ``[htable] enable_dmq`` is set. It prints
``READY <pid>`` on stdout once the node listens and stops cleanly on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pydmq.config import load_settings
from pydmq.dmq.runtime import DmqNode
from pydmq.sip.transport import install_uvloop


async def serve(config: str) -> int:
    settings, _ = load_settings(config, {}, [])
    node = DmqNode(settings)
    ht = None
    if settings.htable.enable_dmq:
        from pydmq.consumers.htable import attach  # noqa: PLC0415

        ht = attach(node)
    await node.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"READY {os.getpid()}", flush=True)
    await stop.wait()
    if ht is not None:
        await ht.close()
    await node.stop(announce_timeout=0.2)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-c", "--config", required=True)
    ap.add_argument("--log-level", default="WARNING")
    args = ap.parse_args()
    logging.basicConfig(level=args.log_level, stream=sys.stderr)
    install_uvloop()
    return asyncio.run(serve(args.config))


if __name__ == "__main__":
    sys.exit(main())
