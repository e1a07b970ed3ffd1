"""The dmq module's script functions (Kamailio docs, section 4; spec section 4), for Python routes.

Each function takes the current :class:`~pydmq.script.msg.Msg` first; the same functions are
methods of ``Msg`` (``msg.dmq_t_replicate()``). Return values are Kamailio's, so a route ported
from a ``kamailio.cfg`` reads the same:

======================================== ================================================
function                                 returns
======================================== ================================================
``dmq_handle_message(msg, continue_=0)`` ``continue_`` (values above 1 count as 1) when the
                                         request was queued for a DMQ worker or answered
                                         ``404 User Not Found``; -1 when it could not be
                                         (no user part in the R-URI: ``400``; worker queue
                                         full: ``503``)
``dmq_process_message(msg, continue_=0)`` the same, the channel callback running inline
``dmq_send_message(msg, channel, node,`` 1 when the KDMQ was sent; -1 (nothing sent) for a
``body, content_type)``                  node URI that is not in the node list or cannot
                                         be parsed, or a request that cannot be started
``dmq_bcast_message(msg, channel, body,`` 1 when a KDMQ went to every active non-local node
``content_type)``                        (also when there is none); -1 at the first node
                                         a request cannot be started for (the loop stops)
``dmq_t_replicate(msg, skip_loop_test=0)`` 0 when the request was forwarded to every active
                                         non-local node (also when there is none); -1
                                         when skipped by the loop test, or on error
``dmq_is_from_node(msg)``                1 when the source IP is any non-local node's
                                         resolved IP (whatever its status), else -1
======================================== ================================================

In native Kamailio cfg a return value of 0 ends the script and a negative one is "false". A
Python route decides its own flow: nothing ends because a function returned 0, so test the value
(``if msg.dmq_t_replicate() == 0: ...``) or simply ``return`` after the call, which is what
``dmq_handle_message()`` without ``continue`` means in Kamailio. ``continue_`` only changes the
value returned, exactly as in Kamailio.

``dmq_send_message`` / ``dmq_bcast_message`` register an unknown channel on this node first,
with the callback that answers ``202 Accepted DMQ`` (spec 1.5.1), and their replies go to the
*notification* response callback (spec 1.6, 2.7): a 200 makes the node active (its body is read
as a node list), a 408 lowers its status. :func:`send_message` and :func:`bcast_message` are
the same calls without a message, for code outside a route (timers, RPC); :func:`send` and
:func:`bcast` raise :class:`SendError` with the reason instead of returning -1.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from pydmq.dmq.node import NodeError, node_key
from pydmq.dmq.peer import PeerError
from pydmq.dmq.runtime import DmqError, DmqNode, FinalFuture, default_route, node_address
from pydmq.sip.errors import SipParseError

if TYPE_CHECKING:
    from pydmq.dmq.node import Node
    from pydmq.script.msg import Msg
    from pydmq.sip.message import Response

__all__ = [
    "SendError",
    "bcast",
    "bcast_message",
    "default_request_route",
    "dmq_bcast_message",
    "dmq_handle_message",
    "dmq_is_from_node",
    "dmq_process_message",
    "dmq_send_message",
    "dmq_t_replicate",
    "is_from_node",
    "send",
    "send_message",
]

log = logging.getLogger(__name__)

#: Max-Forwards of script sends (Kamailio's ``ki_dmq_send_message`` / ``ki_dmq_bcast_message``).
SCRIPT_MAX_FORWARDS = 1


class SendError(Exception):
    """A script-level send could not be done; ``reason`` says why (also the RPC fault text)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# -- handle / process ------------------------------------------------------------------------


def _continue_value(continue_: int) -> int:
    # w_dmq_handle_message: "if(i>1) i = 1"; anything else is returned as given.
    return 1 if continue_ > 1 else int(continue_)


def dmq_handle_message(msg: Msg, continue_: int = 0) -> int:
    """Hand a KDMQ to the channel named by the R-URI user part, through a DMQ worker.

    Unknown channel: ``404 User Not Found``. Known: the job is queued on the sender's worker,
    which runs the channel callback and sends its reply later (``num_workers = 0`` runs it
    inline). Returns ``continue_`` (0 by default, above 1 clamped to 1), or -1 when the request
    could not be dispatched: no user part in the R-URI (pydmq answers ``400``, Kamailio sends
    nothing) or a full worker queue (``503``). Do not reply yourself after a non-negative value:
    the request is answered (or will be).
    """
    if msg.node.handle_message(msg.incoming, inline=False) < 0:
        return -1
    return _continue_value(continue_)


def dmq_process_message(msg: Msg, continue_: int = 0) -> int:
    """Like :func:`dmq_handle_message`, but the channel callback runs right here and a
    synchronous callback's reply has gone out when this returns (a coroutine callback is
    finished in a task). Same return values."""
    if msg.node.handle_message(msg.incoming, inline=True) < 0:
        return -1
    return _continue_value(continue_)


# -- send / bcast ----------------------------------------------------------------------------


def _data(body: bytes | str) -> bytes:
    return body.encode() if isinstance(body, str) else bytes(body)


def _register(dmq: DmqNode, channel: str) -> None:
    if channel not in dmq.peers:
        log.info("DMQ channel %r not found: registering it (answers 202 Accepted DMQ)", channel)
    try:
        dmq.peers.register_auto(channel)
    except PeerError as exc:
        raise SendError("Invalid Channel", str(exc)) from None


def _send_one(
    dmq: DmqNode, node: Node, channel: str, data: bytes, content_type: str
) -> FinalFuture:
    try:
        return dmq.send_kdmq(
            node,
            channel,
            data,
            max_forwards=SCRIPT_MAX_FORWARDS,
            content_type=content_type,
            callback=dmq.notification_response,
        )
    except (DmqError, ValueError, LookupError, RuntimeError) as exc:
        raise SendError("Send Failed", f"{node.orig_uri}: {exc}") from None


def send(
    dmq: DmqNode, channel: str, node: str, body: bytes | str, content_type: str = "text/plain"
) -> FinalFuture:
    """One KDMQ on ``channel`` to the listed node ``node`` (a URI, matched by host, port and
    transport as written), whatever its status, with Max-Forwards 1.

    Registers an unknown ``channel`` first (even when the node is then not found, as Kamailio
    does). Returns the future of the final ``(status, response)``; raises :class:`SendError`
    (nothing sent) when ``node`` is not listed, is not a URI, or the request cannot start.
    """
    _register(dmq, channel)
    try:
        target = dmq.nodes.find(node_key(node))
    except NodeError as exc:
        raise SendError("Invalid Node URI", str(exc)) from None
    if target is None:
        raise SendError("Node Not Found", node)
    return _send_one(dmq, target, channel, _data(body), content_type)


def bcast(
    dmq: DmqNode, channel: str, body: bytes | str, content_type: str = "text/plain"
) -> list[FinalFuture]:
    """One KDMQ on ``channel`` to every active non-local node, Max-Forwards 1.

    Registers an unknown ``channel`` first. Returns one future per node (none without active
    nodes); at the first request that cannot start it stops and raises :class:`SendError` (the
    requests already sent go on).
    """
    _register(dmq, channel)
    data = _data(body)
    return [_send_one(dmq, n, channel, data, content_type) for n in dmq.nodes.active_remote()]


def send_message(
    dmq: DmqNode, channel: str, node: str, body: bytes | str, content_type: str = "text/plain"
) -> int:
    """:func:`send` with Kamailio's return value: 1, or -1 (logged) when nothing was sent."""
    try:
        send(dmq, channel, node, body, content_type)
    except SendError as exc:
        log.error("dmq_send_message(%r, %r): %s", channel, node, exc)
        return -1
    return 1


def bcast_message(
    dmq: DmqNode, channel: str, body: bytes | str, content_type: str = "text/plain"
) -> int:
    """:func:`bcast` with Kamailio's return value: 1, or -1 (logged) at the first failure."""
    try:
        bcast(dmq, channel, body, content_type)
    except SendError as exc:
        log.error("dmq_bcast_message(%r): %s", channel, exc)
        return -1
    return 1


def dmq_send_message(
    msg: Msg, channel: str, node: str, body: bytes | str, content_type: str = "text/plain"
) -> int:
    """Send ``body`` on ``channel`` to the node ``node`` (its URI, e.g. ``sip:10.0.0.21:5060``).

    An unregistered channel is registered on this node first (answering ``202 Accepted
    DMQ``); the node must be in the node list (any status). Max-Forwards 1; the reply goes to
    the notification response callback (a 200 marks the node active and its body is read as a
    node list, so receivers should answer with an empty body). Returns 1, or -1 when nothing
    was sent (node not listed or not a URI, no socket for its transport).
    """
    return send_message(msg.node, channel, node, body, content_type)


def dmq_bcast_message(
    msg: Msg, channel: str, body: bytes | str, content_type: str = "text/plain"
) -> int:
    """Send ``body`` on ``channel`` to every active node but this one (same rules as
    :func:`dmq_send_message`). Returns 1, also when no node is active; -1 when a request
    could not be started, in which case the nodes after that one get nothing."""
    return bcast_message(msg.node, channel, body, content_type)


# -- t_replicate / is_from_node --------------------------------------------------------------


def is_from_node(dmq: DmqNode, ip: str) -> bool:
    """True when ``ip`` is the resolved IP of a non-local node, whatever its status (spec 2.11)."""
    return dmq.nodes.is_from_node(ip)


def dmq_is_from_node(msg: Msg) -> int:
    """1 when the request's source IP is the resolved IP of any non-local node in the list
    (active or not: the docs say "active", the code does not check), else -1."""
    return 1 if msg.node.nodes.is_from_node(msg.source_ip) else -1


def dmq_t_replicate(msg: Msg, skip_loop_test: int = 0) -> int:
    """Replicate the current request (REGISTER, PUBLISH, ...) to every active node but this one.

    Loop test first, unless ``skip_loop_test`` is non-zero: a request whose source IP is any
    non-local node's resolved IP (any status) is not replicated, and -1 is returned.

    Each active non-local node gets the request statefully forwarded, otherwise unchanged: the
    R-URI stays, the node's host, port and transport only choose the next hop, a Via of ours
    with a new branch goes on top, Max-Forwards is left alone. One client transaction per node
    (UDP retransmissions, a local 408 at ``fr_timer``); their replies are absorbed, never relayed
    to the sender: answer it yourself (``msg.reply``). The futures of the outcomes are appended
    to ``msg.replications``.

    Returns 0 when every active node got it (also when there is none), -1 when skipped by the
    loop test or when a request could not be started (the nodes after that one get nothing).
    """
    dmq = msg.node
    if not skip_loop_test and dmq.nodes.is_from_node(msg.source_ip):
        log.debug(
            "dmq_t_replicate: %s %s comes from node %s: not replicated",
            msg.method,
            msg.ruri,
            msg.source_ip,
        )
        return -1
    for node in dmq.nodes.active_remote():
        dest = node_address(node)
        try:
            fut = dmq.endpoint.forward_request(
                msg.request, dest, on_final=_replication_done(msg, node)
            )
        except (ValueError, LookupError, RuntimeError, SipParseError) as exc:
            log.error(
                "dmq_t_replicate: cannot replicate %s %s to %s: %s",
                msg.method,
                msg.ruri,
                node.orig_uri,
                exc,
            )
            return -1
        msg.replications.append(fut)
    return 0


def _replication_done(msg: Msg, node: Node) -> Callable[[int, Response | None], None]:
    uri = node.orig_uri
    method = msg.method

    def on_final(status: int, response: Response | None) -> None:
        if response is None:
            log.info("dmq_t_replicate: %s to %s: no reply (local %d)", method, uri, status)
        else:
            log.debug("dmq_t_replicate: %s to %s: %d %s", method, uri, status, response.reason)

    return on_final


# -- the default route -----------------------------------------------------------------------


def default_request_route(msg: Msg) -> None:
    """What pydmq does without a script: KDMQ -> :func:`dmq_handle_message`, OPTIONS ->
    ``200 OK``, anything else -> ``404 Not Found``. A script can end with it as a fallback."""
    default_route(msg.node, msg.incoming)
