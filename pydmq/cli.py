"""The ``pydmq`` command: the one place that wires a process together."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence

from pydmq import __version__
from pydmq.config import ConfigError, Settings, add_cli_arguments, settings_from_args
from pydmq.consumers.htable import attach as attach_htable
from pydmq.consumers.htable_rpc import rpc_methods as htable_rpc_methods
from pydmq.consumers.usrloc import attach as attach_usrloc
from pydmq.consumers.usrloc_rpc import rpc_methods as usrloc_rpc_methods
from pydmq.dmq.nodelist import MembershipEvent
from pydmq.dmq.runtime import DmqNode
from pydmq.rpc import command as rpc_command
from pydmq.rpc.protocol import Handler
from pydmq.rpc.server import start_rpc
from pydmq.script.loader import ScriptError, ScriptRoute, load_route
from pydmq.sip.transport import install_uvloop, tune_gc, tune_malloc

log = logging.getLogger("pydmq")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _load(args: argparse.Namespace) -> tuple[Settings, list[str]] | None:
    try:
        return settings_from_args(args, os.environ)
    except ConfigError as exc:
        print(f"pydmq: configuration error: {exc}", file=sys.stderr)
        return None


class StatusFile:
    """``pydmq run --status-file PATH``: the node's view of the cluster as a JSON file.

    An observation channel for tests and scripts until the RPC interface exists. The file holds
    ``{"nodes": <dmq.list_nodes rows>, "stats": <DmqStats.snapshot()>}``. It is written once the
    node listens and again after every membership event (a remote node added, changed status or
    removed; the events of one loop iteration share one write), never on a timer, so ``stats``
    are as of the last membership change. Each write
    goes to a temporary file next to PATH that ``os.replace`` then moves over PATH, so a reader
    sees the old or the new content, never a mix. The file is left in place at exit.
    """

    def __init__(self, path: str, node: DmqNode) -> None:
        self.path = os.path.abspath(path)
        self._node = node
        head, tail = os.path.split(self.path)
        self._tmp = os.path.join(head, f".{tail}.{os.getpid()}.tmp")
        self._scheduled = False

    def write(self) -> None:
        """Write the current state; raises ``OSError`` when the file cannot be written."""
        node = self._node
        data = json.dumps({"nodes": node.nodes.rpc_list_nodes(), "stats": node.stats.snapshot()})
        with open(self._tmp, "w", encoding="utf-8") as fh:
            fh.write(data + "\n")
        os.replace(self._tmp, self.path)

    def on_event(self, _event: MembershipEvent) -> None:
        # One write per loop iteration, however many events it brought: a notification body
        # can change hundreds of entries at once, and a write per event would cost O(n^2).
        if self._scheduled:
            return
        self._scheduled = True
        asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        try:
            self.write()
        except OSError as exc:
            log.warning("cannot write status file %s: %s", self.path, exc)


async def _serve(
    settings: Settings,
    duration: float | None,
    status_path: str | None = None,
    route: ScriptRoute | None = None,
) -> int:
    node = DmqNode(settings, route=route)
    # Consumers register their channels before start(), so their join-time sync goes out.
    htable = attach_htable(node) if settings.htable.tables else None
    usrloc = attach_usrloc(node) if settings.usrloc.enable else None
    rpc_extra: dict[str, Handler] = {}
    if htable is not None:
        rpc_extra.update(htable_rpc_methods(htable))
    if usrloc is not None:
        rpc_extra.update(usrloc_rpc_methods(usrloc))
    try:
        await node.start()
    except OSError as exc:
        log.error("cannot listen: %s", exc)
        return 1
    if status_path is not None:
        status = StatusFile(status_path, node)
        try:
            status.write()
        except OSError as exc:
            log.error("cannot write status file %s: %s", status.path, exc)
            await node.stop(announce_timeout=0)
            return 1
        # start() awaits nothing after the events it emits, so none is missed between the
        # first write and subscribing.
        node.events.subscribe(status.on_event)
    try:
        rpc = await start_rpc(node, settings.rpc, extra=rpc_extra)
    except (OSError, ValueError) as exc:
        log.error("cannot start the JSON-RPC listener: %s", exc)
        await node.stop(announce_timeout=0)
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        if duration is None:
            await stop.wait()
        else:
            await asyncio.wait_for(stop.wait(), timeout=duration)
    except TimeoutError:
        pass
    finally:
        # The handlers stay until the node has stopped: a second signal during the shutdown
        # announcement must not kill the process half-way.
        await rpc.close()
        log.info("stopping: announcing status=disabled to %d peer(s)", len(node.nodes.remote()))
        if htable is not None:
            await htable.close()
        if usrloc is not None:
            await usrloc.stop()
        await node.stop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    loaded = _load(args)
    if loaded is None:
        return 2
    settings, _warnings = loaded
    _setup_logging(settings.log.level)
    script = args.script or settings.script.path
    route = None
    if script:
        try:
            route = load_route(script)
        except ScriptError as exc:
            print(f"pydmq: script error: {exc}", file=sys.stderr)
            return 2
        log.info("routing script %s", os.path.abspath(script))
    if install_uvloop():
        log.debug("using uvloop")
    tune_gc()
    if tune_malloc():
        log.debug("glibc mmap threshold pinned")
    return asyncio.run(_serve(settings, args.duration, args.status_file, route))


def cmd_check_config(args: argparse.Namespace) -> int:
    loaded = _load(args)
    if loaded is None:
        return 2
    settings, warnings = loaded
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(json.dumps(settings.to_dict(), indent=2))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pydmq.demo import run_demo  # noqa: PLC0415 - the demo is not needed to run a node

    return asyncio.run(run_demo(args.host, args.base_port, args.duration, args.interval))


def _add_rpc_target_arguments(parser: argparse.ArgumentParser) -> None:
    """``--content-type`` and where the node's JSON-RPC listens (as for ``pydmq rpc``)."""
    parser.add_argument(
        "--content-type", default="text/plain", help="Content-Type of BODY (default text/plain)"
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--http", metavar="HOST:PORT", help="the node's JSON-RPC over HTTP")
    where.add_argument("--unix", metavar="PATH", help="the node's JSON-RPC unix datagram socket")
    parser.add_argument(
        "-c", "--config", metavar="FILE", help="without --http/--unix: this TOML file's [rpc]"
    )
    parser.add_argument("--json", action="store_true", help="print the raw JSON-RPC reply")
    parser.add_argument(
        "--timeout", type=float, default=5.0, help="seconds to wait for the reply (default 5)"
    )


def cmd_send(args: argparse.Namespace) -> int:
    args.method = "dmq.send_message"
    args.params = [args.channel, args.node, args.body, args.content_type]
    return rpc_command.run(args)


def cmd_bcast(args: argparse.Namespace) -> int:
    args.method = "dmq.bcast_message"
    args.params = [args.channel, args.body, args.content_type]
    return rpc_command.run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pydmq", description="Kamailio-compatible DMQ node (distributed message queue)"
    )
    parser.add_argument("--version", action="version", version=f"pydmq {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a DMQ node (default: sip:127.0.0.1:5060)")
    add_cli_arguments(run)
    run.add_argument(
        "--duration", type=float, default=None, help="stop after this many seconds (default: never)"
    )
    run.add_argument(
        "--status-file",
        metavar="PATH",
        default=None,
        help="keep PATH up to date (atomically) as JSON {nodes, stats}: written at start and on"
        " every node-list change (for scripts and tests that watch a node without RPC)",
    )
    run.add_argument(
        "--script",
        metavar="FILE",
        default=None,
        help="Python routing script defining request_route(msg) (overrides [script] path;"
        " default: KDMQ -> dmq_handle_message, OPTIONS -> 200, else 404)",
    )
    run.set_defaults(func=cmd_run)

    demo = sub.add_parser("demo", help="run a 3-node demo cluster on 127.0.0.1, live")
    demo.add_argument("--host", default="127.0.0.1", help="address of all three nodes")
    demo.add_argument("--base-port", type=int, default=5060, help="first of three UDP ports")
    demo.add_argument("--duration", type=float, default=None, help="stop after N seconds")
    demo.add_argument("--interval", type=float, default=2.0, help="seconds between broadcasts")
    demo.set_defaults(func=cmd_demo)

    rpc = sub.add_parser(
        "rpc",
        help="call a JSON-RPC method of a running node (e.g. dmq.list_nodes)",
        description="Call a JSON-RPC method of a running pydmq node (see docs/rpc.md).",
    )
    rpc_command.add_arguments(rpc)
    rpc.set_defaults(func=rpc_command.run)

    send = sub.add_parser(
        "send",
        help="dmq_send_message on a running node (over its JSON-RPC)",
        description="Send BODY on CHANNEL to NODE (a URI in the node list), as the script"
        " function dmq_send_message does on the running node (JSON-RPC dmq.send_message).",
    )
    send.add_argument("channel", metavar="CHANNEL")
    send.add_argument("node", metavar="NODE", help="the node's URI, e.g. sip:10.0.0.21:5060")
    send.add_argument("body", metavar="BODY")
    _add_rpc_target_arguments(send)
    send.set_defaults(func=cmd_send)

    bcast = sub.add_parser(
        "bcast",
        help="dmq_bcast_message on a running node (over its JSON-RPC)",
        description="Send BODY on CHANNEL to every active node, as the script function"
        " dmq_bcast_message does on the running node (JSON-RPC dmq.bcast_message).",
    )
    bcast.add_argument("channel", metavar="CHANNEL")
    bcast.add_argument("body", metavar="BODY")
    _add_rpc_target_arguments(bcast)
    bcast.set_defaults(func=cmd_bcast)

    check = sub.add_parser("check-config", help="validate the configuration and print it")
    add_cli_arguments(check)
    check.set_defaults(func=cmd_check_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
