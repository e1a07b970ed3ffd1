"""The RPC methods of a pydmq node, named and answering as Kamailio's (spec 5).

:func:`build_methods` returns the method table for one :class:`~pydmq.dmq.runtime.DmqNode`:

====================== ============================== =========================================
method                 params                         result
====================== ============================== =========================================
``dmq.list_nodes``     --                             array of node structs (spec 5, 6.1 fields)
``dmq.remove``         ``uri``                        ``"Ok. DMQ node removed."``
``dmq.add``            ``uri``                        ``"Ok. DMQ node added."`` (master)
``dmq.change_status``  ``uri``, ``status``            ``"Ok. DMQ node status changed."`` (master)
``dmq.stats``          --                             counters (pydmq's own)
``dmq.send_message``   ``channel``, ``node``, ``body``,   ``{"rc": 1, "sent": 1}`` (pydmq's own,
                       [``content_type``]                 see ``pydmq.script.functions.send``)
``dmq.bcast_message``  ``channel``, ``body``,             ``{"rc": 1, "sent": <node count>}``
                       [``content_type``]                 (pydmq's own, ``...functions.bcast``)
``core.version``       --                             ``"pydmq 0.1.0 (x86_64/linux) ..."``
``core.uptime``        --                             ``{now, up_since, uptime}``
``system.listMethods`` --                             sorted method names
``system.methodHelp``  ``method``                     the method's one-line description
====================== ============================== =========================================

Parameters are strings; a number is taken as its text, as Kamailio's ``rpc->scan`` does (so
``dmq.remove 5`` is ``500 Failure``, an unparsable URI); null, booleans, arrays and objects are
``500 Invalid Parameters``. Extra positional parameters are ignored, as in Kamailio.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import sys
import time
from collections.abc import Mapping

from pydmq import __version__
from pydmq.dmq.multinotify import resolve_host_async
from pydmq.dmq.node import NodeError, parse_node_uri
from pydmq.dmq.nodelist import RpcFault
from pydmq.dmq.runtime import DmqNode
from pydmq.rpc.protocol import Handler, MethodTable, Params
from pydmq.script.functions import SendError, bcast, send

__all__ = ["build_methods", "version_string"]

INVALID_PARAMETERS = "Invalid Parameters"


def version_string() -> str:
    """Like Kamailio's ``core.version`` (``kamailio 5.6.3 (x86_64/linux) ``)."""
    machine = platform.machine().lower() or "unknown"
    return (
        f"pydmq {__version__} ({machine}/{sys.platform}) "
        f"{platform.python_implementation()}/{platform.python_version()}"
    )


def _text(params: Params, index: int) -> str | None:
    """Parameter ``index`` as text; None when absent or null (the method then faults)."""
    if index >= len(params):
        return None
    value = params[index]
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return json.dumps(value)
    raise RpcFault(500, INVALID_PARAMETERS)


def _ctime(wall: float) -> str:
    # Kamailio prints ctime() without its newline: "Mon Nov 30 13:49:07 2026" (local time)
    return time.ctime(wall)


def build_methods(node: DmqNode, extra: Mapping[str, Handler] | None = None) -> MethodTable:
    """The method table for ``node``, plus ``extra`` ``{name: handler}`` (consumers' methods,
    such as ``ul.dump``); ``core.uptime`` counts from this call."""
    up_wall = time.time()
    up_mono = time.monotonic()
    table = MethodTable()

    def changed() -> None:
        # The node list records membership events; the runtime publishes them (log + event bus)
        # only after its own actions, so publish the ones an RPC change caused right away.
        node.publish_events()

    # -- dmq ---------------------------------------------------------------------------------
    def list_nodes(_params: Params) -> object:
        return node.nodes.rpc_list_nodes()

    def remove(params: Params) -> object:
        text = node.nodes.rpc_remove(_text(params, 0))
        changed()
        return text

    async def add(params: Params) -> object:
        uri = _text(params, 0)
        if uri is None:
            raise RpcFault(500, INVALID_PARAMETERS)
        # Resolve a host name without blocking the loop, then build the node with the answer.
        answers: dict[str, str | None] = {}
        try:
            host = parse_node_uri(uri).host
        except NodeError:
            host = None  # rpc_add reports it (500 Failure)
        if host is not None:
            answers[host] = await resolve_host_async(host)
        text = node.nodes.rpc_add(uri, answers.get)
        changed()
        return text

    def change_status(params: Params) -> object:
        text = node.nodes.rpc_change_status(_text(params, 0), _text(params, 1))
        changed()
        return text

    def stats(_params: Params) -> object:
        endpoint = node.endpoint
        return {
            "dmq": node.stats.snapshot(),
            "workers": node.workers.counters(),
            "sip": dataclasses.asdict(endpoint.stats),
            "transport": dataclasses.asdict(endpoint.transport.stats),
            "transactions": endpoint.layer.stats(),
            "udp_receivers": node.receiver_stats(),
        }

    # -- the script functions dmq_send_message / dmq_bcast_message -------------------------------
    def send_message(params: Params) -> object:
        channel, uri, body = _text(params, 0), _text(params, 1), _text(params, 2)
        if channel is None or uri is None or body is None:
            raise RpcFault(500, INVALID_PARAMETERS)
        try:
            send(node, channel, uri, body, _text(params, 3) or "text/plain")
        except SendError as exc:
            raise RpcFault(500, str(exc)) from None
        return {"rc": 1, "sent": 1}

    def bcast_message(params: Params) -> object:
        channel, body = _text(params, 0), _text(params, 1)
        if channel is None or body is None:
            raise RpcFault(500, INVALID_PARAMETERS)
        try:
            futures = bcast(node, channel, body, _text(params, 2) or "text/plain")
        except SendError as exc:
            raise RpcFault(500, str(exc)) from None
        return {"rc": 1, "sent": len(futures)}

    # -- core / system -----------------------------------------------------------------------
    def version(_params: Params) -> object:
        return version_string()

    def uptime(_params: Params) -> object:
        return {
            "now": _ctime(time.time()),
            "up_since": _ctime(up_wall),
            "uptime": int(time.monotonic() - up_mono),
        }

    def list_methods(_params: Params) -> object:
        return table.names()

    def method_help(params: Params) -> object:
        name = _text(params, 0)
        if name is None:
            raise RpcFault(400, "Method Name Expected")
        method = table.get(name)
        if method is None:
            raise RpcFault(400, "command not found")
        return method.doc

    table.add("dmq.list_nodes", list_nodes, "List DMQ nodes")
    table.add("dmq.remove", remove, "Remove a DMQ node", ["uri"])
    table.add("dmq.add", add, "Add a DMQ node", ["uri"])
    table.add(
        "dmq.change_status",
        change_status,
        "Change the status of a DMQ node (active, not_active, disabled)",
        ["uri", "status"],
    )
    table.add("dmq.stats", stats, "DMQ, SIP, transport and transaction counters", [])
    table.add(
        "dmq.send_message",
        send_message,
        "Send a KDMQ to one node, as the script function dmq_send_message",
        ["channel", "node", "body", "content_type"],
    )
    table.add(
        "dmq.bcast_message",
        bcast_message,
        "Send a KDMQ to every active node, as the script function dmq_bcast_message",
        ["channel", "body", "content_type"],
    )
    table.add("core.version", version, "Returns the version string of the server.")
    table.add("core.uptime", uptime, "Returns uptime of SIP server.")
    table.add("system.listMethods", list_methods, "Lists all RPC methods supported by the server.")
    table.add(
        "system.methodHelp", method_help, "Print the help string for given method.", ["method"]
    )
    if extra:
        table.update(extra)
    return table
