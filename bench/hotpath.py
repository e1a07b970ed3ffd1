"""CPU cost of one request on pydmq's receive path, without sockets (one core).

Run: ``python bench/hotpath.py [--count N] [--rounds R] [--profile] [--only KIND]``. A real
:class:`DmqNode` (with the htable consumer) is started on a loopback port, then datagrams shaped
like sipp's (a fresh branch, Call-ID and From tag each) are fed straight into
``SipEndpoint._on_message``; replies go to a counting stub instead of the socket. Prints the
microseconds per request (best of ``--rounds``) for the three ``compare.py`` scenarios: (a) KDMQ
``htable`` SET_CELL through the worker queue, (b) KDMQ on an unknown channel (404), (c) OPTIONS.
This is the Python part of the server's cost: the kernel's share (recvfrom/sendto on loopback)
and the event loop's come on top, and are what ``compare.py`` sees.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import math
import pstats
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pydmq.config import settings_from_mapping
from pydmq.dmq.runtime import DmqNode
from pydmq.sip.transport import Address, install_uvloop

SRC = Address("udp", "127.0.0.1", 26999)


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def request(kind: str, i: int, port: int) -> bytes:
    if kind == "options":
        method, user, ctype, body = "OPTIONS", None, None, b""
    elif kind == "unknown":
        method, user, ctype, body = "KDMQ", "nochannel", "text/plain", b"x"
    else:
        method, user, ctype = "KDMQ", "htable", "application/json"
        body = b'{"action":2,"htname":"t","cname":"k%d","type":2,"strval":"v%d","mode":1}' % (
            i % 1000,
            i,
        )
    ruri = f"sip:{user}@127.0.0.1:{port}" if user else f"sip:127.0.0.1:{port}"
    lines = [
        f"{method} {ruri} SIP/2.0",
        f"Via: SIP/2.0/UDP 127.0.0.1:26999;branch=z9hG4bK-4242-{i}-0;rport",
        f"From: <sip:{user or 'sipp'}@127.0.0.1:26999>;tag=4242SIPpTag00{i}",
        f"To: <{ruri}>",
        f"Call-ID: {i}-4242@127.0.0.1",
        f"CSeq: {10 if method == 'KDMQ' else 1} {method}",
        "Max-Forwards: 1" if method == "KDMQ" else "Max-Forwards: 70",
    ]
    if ctype:
        lines.append(f"Content-Type: {ctype}")
    lines.append(f"Content-Length: {len(body):5d}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def run(kind: str, count: int, rounds: int, profile: bool) -> float:
    settings, _ = settings_from_mapping(
        {
            "dmq": {"server_address": f"sip:127.0.0.1:{free_udp_port()}", "num_workers": 2},
            "htable": {"tables": ["t=>size=8;autoexpire=0;dmqreplicate=1;"], "enable_dmq": True},
            "log": {"level": "WARNING"},
        }
    )
    node = DmqNode(settings)
    from pydmq.consumers.htable import attach  # noqa: PLC0415

    ht = attach(node)
    await node.start()
    ep = node.endpoint
    local = ep.local_address("udp")
    replies = [0]
    codes: dict[bytes, int] = {}

    def fake_send(data: bytes, dest: Address, *, local: Address | None = None) -> None:
        replies[0] += 1
        code = data[8:11]
        codes[code] = codes.get(code, 0) + 1

    ep.transport.send = fake_send  # type: ignore[method-assign]
    on_message = ep._on_message
    prof = cProfile.Profile() if profile else None
    best = math.inf
    batch = 64  # let the workers run between batches, as the loop does between reads
    for r in range(rounds):
        msgs = [request(kind, r * count + i, local.port) for i in range(count)]
        replies[0] = 0
        t0 = time.process_time()  # CPU time: other jobs on the machine do not count
        if prof:
            prof.enable()
        for start in range(0, count, batch):
            for data in msgs[start : start + batch]:
                on_message(data, SRC, local)
            await asyncio.sleep(0)
        while replies[0] < count:
            await asyncio.sleep(0)
        if prof:
            prof.disable()
        best = min(best, (time.process_time() - t0) / count * 1e6)
    await ht.close()
    await node.stop(announce=False)
    expected = b"404" if kind == "unknown" else b"200"
    if set(codes) != {expected}:
        print(f"  unexpected replies for {kind}: {codes}")
    if prof:
        pstats.Stats(prof).sort_stats("tottime").print_stats(30)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=20_000, help="requests per round")
    ap.add_argument("--rounds", type=int, default=5, help="the best round is reported")
    ap.add_argument("--profile", action="store_true", help="cProfile each scenario")
    ap.add_argument("--only", choices=["htable", "unknown", "options"])
    args = ap.parse_args()
    install_uvloop()
    for kind, label in (
        ("htable", "(a) KDMQ htable SET_CELL, worker queue, 200"),
        ("unknown", "(b) KDMQ unknown channel, 404"),
        ("options", "(c) OPTIONS, 200"),
    ):
        if args.only and kind != args.only:
            continue
        us = asyncio.run(run(kind, args.count, args.rounds, args.profile))
        print(f"{label:48s} {us:7.1f} us/request  ({1e6 / us:9,.0f} /s on one core)")


if __name__ == "__main__":
    main()
