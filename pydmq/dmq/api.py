"""The developer API: Kamailio's ``dmq_load_api()`` for Python code (chapter 2 of the docs).

Kamailio hands modules a struct of functions; Python code gets a :class:`DmqApi` from
:func:`load_api`. Each send call takes an optional response callback (run once per destination
with the final code, a local 408 on timeout) and also returns an awaitable, so asyncio code can
simply ``await api.bcast_message(...)``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from pydmq.dmq.node import Node, NodeError, node_key
from pydmq.dmq.peer import InitCallback, Peer, PeerCallback
from pydmq.dmq.runtime import DmqError, DmqNode, FinalFuture, ResponseCallback
from pydmq.sip.message import Response

__all__ = ["Delivery", "DmqApi", "DmqError", "load_api"]


@dataclass(frozen=True, slots=True)
class Delivery:
    """The outcome of one destination of a send: its node (snapshot), final code and reply."""

    node: Node
    status: int
    response: Response | None


class DmqApi:
    """``register_peer``, ``bcast_message``, ``send_message`` and ``find_node`` of one node."""

    def __init__(self, dmq: DmqNode) -> None:
        self._dmq = dmq

    def register_peer(
        self,
        peer_id: str,
        description: str,
        callback: PeerCallback,
        init_callback: InitCallback | None = None,
    ) -> Peer:
        """Register a channel; raises :class:`~pydmq.dmq.peer.PeerError` if it exists."""
        return self._dmq.peers.register(peer_id, description, callback, init_callback)

    def find_node(self, uri: str) -> Node | None:
        """The live node matching ``uri`` by Kamailio's identity rule (host, port, transport)."""
        try:
            return self._dmq.nodes.find(node_key(uri))
        except NodeError:
            return None

    def bcast_message(
        self,
        peer: Peer | str,
        body: bytes | str,
        except_node: Node | None = None,
        resp_cb: ResponseCallback | None = None,
        max_forwards: int = 1,
        content_type: str = "text/plain",
    ) -> asyncio.Future[list[Delivery]]:
        """One KDMQ to every active non-local node except ``except_node``.

        The result lists one :class:`Delivery` per destination once all have finished. Without
        ``resp_cb`` the 6.1 default applies: a 408 counts as a failure while failure counting
        is on. Raises :class:`DmqError` when a request cannot even be started (Kamailio stops
        the loop there and returns -1); the requests already started go on and their
        callbacks still run.

        ``except_node`` is compared by identity (host, port, transport), so a snapshot, the
        sender node a message callback got, or a node from :meth:`find_node` all work.
        """
        targets = self._dmq.nodes.active_remote(except_node)
        futures = [self._send(peer, body, n, resp_cb, max_forwards, content_type) for n in targets]
        return self._gather(futures, targets)

    def send_message(
        self,
        peer: Peer | str,
        body: bytes | str,
        node: Node,
        resp_cb: ResponseCallback | None = None,
        max_forwards: int = 1,
        content_type: str = "text/plain",
    ) -> asyncio.Future[list[Delivery]]:
        """One KDMQ to ``node`` whatever its status (unicast ignores status, as in Kamailio).

        ``node`` need not be in the node list: its resolved address is where the request goes.
        Raises :class:`DmqError` if the request cannot be started.
        """
        return self._gather(
            [self._send(peer, body, node, resp_cb, max_forwards, content_type)], [node]
        )

    def _send(
        self,
        peer: Peer | str,
        body: bytes | str,
        node: Node,
        resp_cb: ResponseCallback | None,
        max_forwards: int,
        content_type: str,
    ) -> FinalFuture:
        channel = peer.peer_id if isinstance(peer, Peer) else peer
        if not channel:
            raise DmqError("a KDMQ needs a channel (the R-URI user part)")
        data = body.encode() if isinstance(body, str) else body
        return self._dmq.send_kdmq(
            node,
            channel,
            data,
            max_forwards=max_forwards,
            content_type=content_type,
            callback=resp_cb or self._dmq.consumer_response,
        )

    @staticmethod
    def _gather(
        futures: Sequence[FinalFuture], nodes: Sequence[Node]
    ) -> asyncio.Future[list[Delivery]]:
        """One future for all destinations, completed by the last final reply.

        A plain future, not a task: nothing runs per send, and a caller that only uses
        ``resp_cb`` (Kamailio style) and drops the future leaves nothing behind. It is cancelled
        if the node stops before every destination has its final reply (the transactions are
        abandoned then, and their callbacks do not run).
        """
        snapshots = [n.snapshot() for n in nodes]
        outer: asyncio.Future[list[Delivery]] = asyncio.get_running_loop().create_future()
        if not futures:
            outer.set_result([])
            return outer
        remaining = len(futures)

        def one_done(_: FinalFuture) -> None:
            nonlocal remaining
            remaining -= 1
            if remaining or outer.done():
                return
            if any(f.cancelled() for f in futures):
                outer.cancel()
                return
            for f in futures:
                exc = f.exception()
                if exc is not None:
                    outer.set_exception(exc)
                    return
            outer.set_result(
                [
                    Delivery(node, status, response)
                    for node, (status, response) in zip(
                        snapshots, (f.result() for f in futures), strict=True
                    )
                ]
            )

        for f in futures:
            f.add_done_callback(one_done)
        return outer


def load_api(dmq: DmqNode) -> DmqApi:
    """``dmq_load_api()``: the functions other components use to ride on DMQ."""
    return DmqApi(dmq)
