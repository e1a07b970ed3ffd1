"""Soak: a 3-node cluster, one node broadcasting 2,000 KDMQ/s for 10 minutes; no loss, flat RSS.

Run::

    python bench/soak.py                                   # the acceptance run: 600 s
    python bench/soak.py --duration 60 --warmup 40         # a short proof run

Three ``pydmq`` node processes on 127.0.0.1 (this file re-run with ``--serve``: a
:class:`~pydmq.dmq.runtime.DmqNode` from a TOML file, set up like ``pydmq run`` (uvloop, the
garbage-collector and malloc tuning), with a ``soak`` channel and extra JSON-RPC methods on its
unix socket: ``soak.start``, ``soak.stats``, ``soak.expect`` (allocate the receiver's bitmap
before the load) and ``soak.memory`` (Python blocks, RSS, optionally after ``malloc_trim``,
for ``--diagnose``)). Once they list each other as active, the sender broadcasts ``--rate``
messages a second on the ``soak`` channel for ``--duration`` seconds (``DmqApi.bcast_message``,
so every message is one KDMQ to each of the two other nodes, UDP, Kamailio's tm timers). Each
body carries the sender's sequence number; each receiver marks the numbers it got per sender
(a bitmap), so it can tell losses, duplicates (the callback run twice for one message) and
reordering apart. The sender counts the final replies per status code.

RSS (VmRSS from ``/proc``) of every node is sampled every second. "Start" is taken
``--warmup`` seconds into the load: by then the receivers' server transactions, which linger
64*T1 = 32 s after their answer over UDP (RFC 3261 Timer J), have reached their steady number,
so growth after that point is what would grow without bound. RSS before the load is printed too.

Printed: sent, delivered/expected per receiver, lost, duplicates, out of order, the replies by
code, and per node RSS idle / start / peak / end with the growth from start to end. Exit status
0 when nothing was lost or duplicated, every reply was a 200 and every node's growth is under
``--max-growth`` percent (10 by default), else 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import dataclasses
import gc
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pydmq.config import load_settings  # noqa: E402
from pydmq.dmq.api import load_api  # noqa: E402
from pydmq.dmq.node import Node  # noqa: E402
from pydmq.dmq.peer import PeerResponse  # noqa: E402
from pydmq.dmq.runtime import DmqNode  # noqa: E402
from pydmq.rpc.client import call as rpc_call  # noqa: E402
from pydmq.rpc.server import start_rpc  # noqa: E402
from pydmq.sip.message import Request, Response  # noqa: E402
from pydmq.sip.transport import install_uvloop, tune_gc, tune_malloc  # noqa: E402
from tests.support.net import free_port  # noqa: E402

CHANNEL = "soak"


def rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


# ------------------------------------------------------------------------------------ node side


class Tally:
    """What one receiver got from each sender: a bitmap of sequence numbers."""

    def __init__(self) -> None:
        self.seen: dict[str, bytearray] = {}
        self.count: dict[str, int] = {}
        self.dups: dict[str, int] = {}
        self.reordered: dict[str, int] = {}
        self.last: dict[str, int] = {}
        self.bad = 0

    def expect(self, sender: str, n: int) -> None:
        """Allocate the bitmap up front, so that it does not count as growth."""
        bits = self.seen.setdefault(sender, bytearray())
        if len(bits) < n:
            bits.extend(bytes(n - len(bits)))

    def on_message(self, request: Request, node: Node | None) -> PeerResponse:
        sender = node.orig_uri if node is not None else "?"
        try:
            seq = int(request.body)
        except ValueError:
            self.bad += 1
            return PeerResponse(400, "Bad Sequence")
        bits = self.seen.setdefault(sender, bytearray())
        if seq >= len(bits):
            bits.extend(bytes(max(seq + 1 - len(bits), 65536)))
        if bits[seq]:
            self.dups[sender] = self.dups.get(sender, 0) + 1
        else:
            bits[seq] = 1
            self.count[sender] = self.count.get(sender, 0) + 1
        if seq < self.last.get(sender, -1):
            self.reordered[sender] = self.reordered.get(sender, 0) + 1
        self.last[sender] = max(seq, self.last.get(sender, -1))
        return PeerResponse(200, "OK")

    def report(self, expected: int | None) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for sender, bits in self.seen.items():
            n = expected if expected is not None else self.last.get(sender, -1) + 1
            missing = n - sum(bits[:n])
            out[sender] = {
                "unique": self.count.get(sender, 0),
                "missing": missing,
                "first_missing": [i for i in range(n) if not bits[i]][:10] if missing else [],
                "duplicates": self.dups.get(sender, 0),
                "reordered": self.reordered.get(sender, 0),
            }
        return out


class Sender:
    """Broadcasts ``rate`` messages a second for ``duration`` seconds; counts the replies."""

    def __init__(self, node: DmqNode) -> None:
        self.node = node
        self.api = load_api(node)
        self.sent = 0
        self.replies: dict[int, int] = {}
        self.outstanding = 0
        self.errors = 0
        self.done = False
        self.started_at = 0.0
        self.ended_at = 0.0
        self.max_lag = 0
        self.task: asyncio.Task[None] | None = None

    def on_reply(self, _resp: Response | None, status: int, _node: Node) -> None:
        self.replies[status] = self.replies.get(status, 0) + 1
        self.outstanding -= 1

    async def run(self, rate: float, duration: float) -> None:
        loop = asyncio.get_running_loop()
        t0 = self.started_at = loop.time()
        while True:
            now = loop.time()
            if now - t0 >= duration:
                break
            due = min(int(rate * (now - t0)) + 1, int(rate * duration)) - self.sent
            self.max_lag = max(self.max_lag, due)
            targets = len(self.node.nodes.active_remote())
            for _ in range(max(0, due)):
                try:
                    self.api.bcast_message(CHANNEL, str(self.sent).encode(), resp_cb=self.on_reply)
                except Exception:
                    self.errors += 1
                    logging.exception("bcast failed")
                else:
                    self.outstanding += targets
                self.sent += 1
            await asyncio.sleep(0.002)
        self.ended_at = loop.time()
        self.done = True


async def serve(config: str, role: str) -> int:
    settings, _ = load_settings(config, {}, [])
    logging.basicConfig(level=settings.log.level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    node = DmqNode(settings)
    tally = Tally()
    load_api(node).register_peer(CHANNEL, "soak test", tally.on_message)
    sender = Sender(node) if role == "sender" else None

    def start(params: list[Any] | dict[str, Any]) -> object:
        assert sender is not None and isinstance(params, list)
        sender.task = asyncio.ensure_future(sender.run(float(params[0]), float(params[1])))
        return "started"

    def expect(params: list[Any] | dict[str, Any]) -> object:
        assert isinstance(params, list)
        tally.expect(str(params[0]), int(params[1]))
        return "ok"

    def memory(params: list[Any] | dict[str, Any]) -> object:
        """Allocated Python blocks and RSS; with ``["trim"]`` first return freed heap memory
        to the system (glibc ``malloc_trim``), which tells live data from allocator caching."""
        trim = isinstance(params, list) and params[:1] == ["trim"]
        before = rss_kb(os.getpid())
        if trim:
            gc.collect()
            with contextlib.suppress(OSError, AttributeError):
                ctypes.CDLL("libc.so.6").malloc_trim(0)
        return {"blocks": sys.getallocatedblocks(), "rss_kb": rss_kb(os.getpid()),
                "rss_before_trim_kb": before}  # fmt: skip

    def stats(params: list[Any] | dict[str, Any]) -> object:
        expected = int(params[0]) if isinstance(params, list) and params else None
        out: dict[str, Any] = {
            "rss_kb": rss_kb(os.getpid()),
            "received": tally.report(expected),
            "bad": tally.bad,
            "active": len(node.nodes.active_remote()),
            "transactions": node.endpoint.layer.stats(),
            "sip": dataclasses.asdict(node.endpoint.stats),
        }
        if sender is not None:
            out["sender"] = {
                "sent": sender.sent, "replies": {str(k): v for k, v in sender.replies.items()},
                "outstanding": sender.outstanding, "errors": sender.errors, "done": sender.done,
                "elapsed": (sender.ended_at or asyncio.get_running_loop().time())
                - sender.started_at,
                "max_lag": sender.max_lag,
            }  # fmt: skip
        return out

    await node.start()
    extra = {
        "soak.start": start,
        "soak.stats": stats,
        "soak.expect": expect,
        "soak.memory": memory,
    }
    rpc = await start_rpc(node, settings.rpc, extra=extra)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print("READY", flush=True)
    await stop.wait()
    await rpc.close()
    await node.stop(announce_timeout=0.5)
    return 0


# ------------------------------------------------------------------------------------ driver


@dataclass
class Proc:
    name: str
    port: int
    workdir: Path
    rundir: Path
    role: str
    seeds: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    rss: list[tuple[float, int]] = field(default_factory=list)

    @property
    def uri(self) -> str:
        return f"sip:127.0.0.1:{self.port}"

    @property
    def sock(self) -> str:
        return str(self.rundir / f"{self.name}.sock")

    def start(self, log_level: str) -> None:
        config = self.workdir / f"{self.name}.toml"
        config.write_text(
            "[dmq]\n"
            f'server_address = "sip:127.0.0.1:{self.port}"\n'
            f"notification_address = {json.dumps(self.seeds)}\n"
            "ping_interval = 10\n"
            "[rpc]\n"
            f'http_address = ""\nunix_socket = "{self.sock}"\n'
            f'[log]\nlevel = "{log_level}"\n'
        )
        log = (self.workdir / f"{self.name}.log").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(config), "--role", self.role],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log, cwd=ROOT,
            start_new_session=True,
        )  # fmt: skip
        log.close()

    def rpc(self, method: str, *params: object) -> Any:
        return rpc_call(method, list(params), unix=self.sock, timeout=10)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        return self.proc.returncode


def wait_for(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except Exception:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def drive(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="pydmq-soak-"))
    rundir = Path(tempfile.mkdtemp(prefix="soak-"))
    ports = [free_port("udp") for _ in range(3)]
    seed = f"sip:127.0.0.1:{ports[0]}"
    nodes = [
        Proc("sender", ports[0], workdir, rundir, "sender"),
        Proc("recv1", ports[1], workdir, rundir, "receiver", [seed]),
        Proc("recv2", ports[2], workdir, rundir, "receiver", [seed]),
    ]
    print(f"work directory {workdir}; {args.rate}/s for {args.duration:g} s, warmup"
          f" {args.warmup:g} s", flush=True)  # fmt: skip
    ok = False
    try:
        for n in nodes:
            n.start(args.log_level)
        wait_for(lambda: all(n.rpc("soak.stats")["active"] == 2 for n in nodes), 30, "the cluster")
        time.sleep(1.0)
        sender = nodes[0]
        for n in nodes[1:]:
            n.rpc("soak.expect", sender.uri, int(args.rate * args.duration) + 1)
        idle = {n.name: rss_kb(n.pid) for n in nodes}
        sender.rpc("soak.start", args.rate, args.duration)
        t0 = time.monotonic()
        start_rss: dict[str, int] = {}
        objects_start: dict[str, Any] = {}
        next_report = t0 + args.report_every
        while True:
            now = time.monotonic()
            for n in nodes:
                if not n.alive():
                    raise RuntimeError(f"{n.name} died; see {workdir}/{n.name}.log")
                n.rss.append((now - t0, rss_kb(n.pid)))
            if not start_rss and now - t0 >= args.warmup:
                start_rss = {n.name: n.rss[-1][1] for n in nodes}
                if args.diagnose:
                    objects_start = {n.name: n.rpc("soak.memory") for n in nodes}
            st = sender.rpc("soak.stats")["sender"]
            if now >= next_report:
                next_report += args.report_every
                print(f"t={now - t0:5.0f}s sent {st['sent']} replies {st['replies']}"
                      f" outstanding {st['outstanding']} RSS "
                      + " ".join(f"{n.name}={n.rss[-1][1] / 1024:.1f}MB" for n in nodes),
                      flush=True)  # fmt: skip
            if st["done"] and st["outstanding"] == 0:
                break
            if st["done"] and now - t0 > args.duration + 60:
                print("replies still outstanding 60 s after the end", flush=True)
                break
            time.sleep(1.0)
        if not start_rss:
            start_rss = {n.name: n.rss[0][1] for n in nodes}
        end_rss = {n.name: rss_kb(n.pid) for n in nodes}
        if args.diagnose and objects_start:
            for n in nodes:
                before, after = objects_start[n.name], n.rpc("soak.memory", "trim")
                print(f"{n.name}: Python blocks {before['blocks']} -> {after['blocks']}; RSS"
                      f" {after['rss_before_trim_kb'] / 1024:.1f} MB, after malloc_trim"
                      f" {after['rss_kb'] / 1024:.1f} MB")  # fmt: skip
        final = {n.name: n.rpc("soak.stats", st["sent"]) for n in nodes}
        sent = final["sender"]["sender"]["sent"]
        replies = final["sender"]["sender"]["replies"]
        print()
        print(f"sent {sent} broadcasts in {final['sender']['sender']['elapsed']:.1f} s"
              f" ({sent / max(final['sender']['sender']['elapsed'], 1e-9):.0f}/s), replies"
              f" {replies}, send errors {final['sender']['sender']['errors']}")  # fmt: skip
        lost = dups = 0
        delivered_total = 0
        for name in ("recv1", "recv2"):
            received = final[name]["received"]
            got = next(iter(received.values())) if len(received) == 1 else {}
            delivered_total += got.get("unique", 0)
            lost += got.get("missing", sent)
            dups += got.get("duplicates", 0)
            print(
                f"{name}: delivered {got.get('unique', 0)}/{sent}, missing"
                f" {got.get('missing', sent)} {got.get('first_missing', [])}, duplicates"
                f" {got.get('duplicates', 0)}, out of order {got.get('reordered', 0)}"
            )
        print(f"delivered/expected: {delivered_total}/{2 * sent}; lost {lost}; duplicates {dups}")
        worst = 0.0
        for n in nodes:
            peak = max(kb for _, kb in n.rss)
            growth = 100.0 * (end_rss[n.name] - start_rss[n.name]) / max(start_rss[n.name], 1)
            worst = max(worst, growth)
            print(f"RSS {n.name}: idle {idle[n.name] / 1024:.1f} MB, start (t={args.warmup:g}s)"
                  f" {start_rss[n.name] / 1024:.1f} MB, peak {peak / 1024:.1f} MB, end"
                  f" {end_rss[n.name] / 1024:.1f} MB, growth {growth:+.1f} %")  # fmt: skip
        ok = lost == 0 and dups == 0 and set(replies) == {"200"} and worst < args.max_growth
    finally:
        codes = [n.stop() for n in nodes]
        shutil.rmtree(rundir, ignore_errors=True)
    print(f"exit statuses {codes}")
    ok = ok and codes == [0, 0, 0]
    print("PASS" if ok else f"FAIL (logs in {workdir})")
    if ok and not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--rate", type=float, default=2000.0, help="broadcasts per second")
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    parser.add_argument("--warmup", type=float, default=60.0,
                        help="seconds into the load when the start RSS is taken")  # fmt: skip
    parser.add_argument("--max-growth", type=float, default=10.0, help="percent")
    parser.add_argument("--report-every", type=float, default=10.0)
    parser.add_argument("--log-level", default="WARNING")
    parser.add_argument("--keep", action="store_true", help="keep the logs")
    parser.add_argument(
        "--diagnose", action="store_true", help="print Python blocks and RSS after malloc_trim"
    )
    parser.add_argument("--serve", metavar="CONFIG", help=argparse.SUPPRESS)
    parser.add_argument("--role", default="receiver", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        # The process set-up of ``pydmq run``.
        install_uvloop()
        tune_gc()
        tune_malloc()
        return asyncio.run(serve(args.serve, args.role))
    if args.warmup >= args.duration:
        parser.error("--warmup must be shorter than --duration")
    return drive(args)


if __name__ == "__main__":
    sys.exit(main())
