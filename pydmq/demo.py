"""``pydmq demo``: a three-node cluster on 127.0.0.1, live in the terminal.

The parent starts each node as its own process (``python -m pydmq.demo node …``), so what you see
is real SIP between real processes. Every node prints JSON lines on stdout (membership changes and
the messages it receives on the ``demo`` channel); the parent shows them as they come and ends
with a summary. Each node broadcasts one message on ``demo`` per round once it sees both peers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from pydmq.config import settings_from_mapping
from pydmq.dmq.api import load_api
from pydmq.dmq.node import Node, NodeStatus
from pydmq.dmq.nodelist import MembershipEvent
from pydmq.dmq.peer import PeerResponse
from pydmq.dmq.runtime import DmqNode
from pydmq.sip.message import Request

CHANNEL = "demo"


def _emit(kind: str, **fields: object) -> None:
    print(json.dumps({"type": kind, **fields}), flush=True)


async def run_node(name: str, address: str, seed: str | None, interval: float) -> int:
    """One demo node: join through ``seed``, broadcast on ``demo`` each ``interval`` seconds."""
    mapping: dict[str, object] = {"server_address": address}
    if seed:
        mapping["notification_address"] = [seed]
    settings, _ = settings_from_mapping({"dmq": mapping, "tm": {"fr_timer": 2.0}})
    node = DmqNode(settings)
    api = load_api(node)

    def members() -> list[str]:
        return [
            f"{n.host}:{n.port_str}={'self' if n.local else n.status.value}"
            for n in node.nodes.nodes()
        ]

    def on_event(event: MembershipEvent) -> None:
        _emit("members", node=name, event=event.kind, peer=event.node_uri, nodes=members())

    def on_message(request: Request, sender: Node | None) -> PeerResponse:
        who = f"{sender.host}:{sender.port_str}" if sender else "?"
        _emit("recv", node=name, sender=who, body=request.body.decode(errors="replace"))
        return PeerResponse(200, "OK")

    node.events.subscribe(on_event)
    api.register_peer(CHANNEL, "pydmq demo channel", on_message)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await node.start()
    _emit("started", node=name, address=address, nodes=members())
    round_no = 0
    try:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval)
            active = node.nodes.active_remote()
            if stop.is_set() or len(active) < 2:
                continue
            round_no += 1
            deliveries = await api.bcast_message(CHANNEL, f"hello #{round_no} from {name}")
            codes = {f"{d.node.host}:{d.node.port_str}": d.status for d in deliveries}
            _emit("sent", node=name, round=round_no, replies=codes)
    finally:
        await node.stop()
        _emit("stopped", node=name)
    return 0


@dataclass
class _View:
    """What the parent has seen of each node."""

    members: dict[str, list[str]] = field(default_factory=dict)
    received: dict[str, set[str]] = field(default_factory=dict)
    #: Set when the demo stops: the summary shows the cluster as it ran, not its shutdown.
    frozen: bool = False

    def all_active(self, names: Sequence[str]) -> bool:
        return all(
            len(self.members.get(n, [])) == len(names)
            and all(m.endswith(("=self", "=" + NodeStatus.ACTIVE.value)) for m in self.members[n])
            for n in names
        )

    def all_received(self, names: Sequence[str]) -> bool:
        return all(len(self.received.get(n, set())) == len(names) - 1 for n in names)


async def _pump(name: str, proc: asyncio.subprocess.Process, view: _View) -> None:
    assert proc.stdout is not None
    while line := await proc.stdout.readline():
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        kind = msg.get("type")
        if view.frozen:
            continue
        if kind in ("started", "members"):
            view.members[name] = msg["nodes"]
            what = f"{msg.get('event', 'started')} {msg.get('peer', '')}".strip()
            print(f"[{name}] {what:<34} list: {', '.join(msg['nodes'])}", flush=True)
        elif kind == "recv":
            view.received.setdefault(name, set()).add(msg["sender"])
            print(
                f"[{name}] received on '{CHANNEL}' from {msg['sender']}: {msg['body']}", flush=True
            )


async def run_demo(host: str, base_port: int, duration: float | None, interval: float) -> int:
    names = ["node1", "node2", "node3"]
    addresses = [f"sip:{host}:{base_port + i}" for i in range(3)]
    seed = addresses[0]
    view = _View()
    procs: list[asyncio.subprocess.Process] = []
    pumps = []
    print(f"pydmq demo: 3 nodes on {host}:{base_port}-{base_port + 2}; Ctrl-C stops", flush=True)
    for i, (name, address) in enumerate(zip(names, addresses, strict=True)):
        args = [sys.executable, "-m", "pydmq.demo", "node", name, address]
        args += ["--interval", str(interval)]
        if i:
            args += ["--seed", seed]
        proc = await asyncio.create_subprocess_exec(
            *args, stdout=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
        procs.append(proc)
        pumps.append(asyncio.ensure_future(_pump(name, proc, view)))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    started = time.monotonic()
    try:
        await asyncio.wait_for(stop.wait(), timeout=duration)
    except TimeoutError:
        pass
    finally:
        view.frozen = True
        for proc in procs:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                await asyncio.wait_for(proc.wait(), timeout=5)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        await asyncio.gather(*pumps, return_exceptions=True)
    elapsed = time.monotonic() - started
    print(f"\nsummary after {elapsed:.1f} s:")
    for name in names:
        print(f"  {name}: list {', '.join(view.members.get(name, []))}")
        got = sorted(view.received.get(name, set()))
        print(f"         received '{CHANNEL}' messages from {len(got)} peer(s): {', '.join(got)}")
    ok = view.all_active(names) and view.all_received(names)
    print("all three nodes active and every message received by all" if ok else "INCOMPLETE")
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the demo processes (``python -m pydmq.demo node NAME ADDRESS``)."""
    parser = argparse.ArgumentParser(prog="python -m pydmq.demo")
    sub = parser.add_subparsers(dest="command", required=True)
    node = sub.add_parser("node")
    node.add_argument("name")
    node.add_argument("address")
    node.add_argument("--seed", default=None)
    node.add_argument("--interval", type=float, default=2.0)
    args = parser.parse_args(argv)
    return asyncio.run(run_node(args.name, args.address, args.seed, args.interval))


if __name__ == "__main__":
    sys.exit(main())
