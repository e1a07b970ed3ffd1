"""DMQ peers (channels): registration, lookup and running their callbacks.

A peer is what Kamailio calls a ``dmq_peer_t``: a channel name (the R-URI user part of a KDMQ),
a message callback that answers requests on that channel, and an optional init callback run once
the node has joined the bus ("please sync"). See dmq-protocol.md §3.1, §3.4 and §1.5.

Callbacks may be plain functions or coroutines; :func:`run_callback` hides the difference and makes
sure a bug in one consumer turns into a ``500`` instead of taking the node down.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias

if TYPE_CHECKING:
    from pydmq.dmq.node import Node
    from pydmq.sip.message import Request

__all__ = [
    "InitCallback",
    "Peer",
    "PeerCallback",
    "PeerError",
    "PeerRegistry",
    "PeerResponse",
    "call_callback",
    "finish_callback",
    "run_callback",
    "run_init_callbacks",
]

logger = logging.getLogger(__name__)

#: Description given to channels registered by a script-level send (Kamailio's is informational).
AUTO_DESCRIPTION = "auto-registered by a script send"


class PeerError(Exception):
    """A peer could not be registered (Kamailio's ``register_dmq_peer`` returns NULL then)."""


@dataclass(slots=True)
class PeerResponse:
    """What a message callback answers; Kamailio's ``peer_reponse_t``.

    Kamailio only sends a reply when the code is positive and the reason non-empty; otherwise
    nothing goes out and the sender sees its local 408 (§1.5 step 4). The body, with a
    ``Content-Type`` header, only travels together with such a code and reason.
    """

    code: int
    reason: str
    body: bytes = b""
    content_type: str | None = None

    @property
    def is_sendable(self) -> bool:
        """True when Kamailio would send this reply at all."""
        return self.code > 0 and bool(self.reason)


#: Message callback: ``(request, sender node or None) -> PeerResponse`` (may be a coroutine).
#: The node is the sender found by the primary identity rule on the From URI (§3.3).
PeerCallback: TypeAlias = Callable[
    ["Request", "Node | None"], "PeerResponse | Awaitable[PeerResponse]"
]

#: Init callback: no arguments in 5.6.3 and 6.1 (master's ``init_with_single`` is not copied).
InitCallback: TypeAlias = Callable[[], "Awaitable[None] | None"]


@dataclass(slots=True, frozen=True)
class Peer:
    """A registered channel. ``description`` is informational only, as in Kamailio."""

    peer_id: str
    description: str
    callback: PeerCallback
    init_callback: InitCallback | None = None


def _accepted_dmq(request: Request, node: Node | None) -> PeerResponse:
    """Kamailio's ``empty_peer_callback``: what an auto-registered channel answers."""
    return PeerResponse(202, "Accepted DMQ")


class PeerRegistry:
    """The peer list. Lookups are exact and case-sensitive, like Kamailio's ``find_peer``.

    Iteration yields the most recently registered peer first because Kamailio inserts at the
    head of its list, and init callbacks run in list order (§3.4); consumers may rely on that.
    """

    def __init__(self) -> None:
        # Insertion-ordered; iteration reverses it to get Kamailio's head-insertion order.
        self._peers: dict[str, Peer] = {}
        #: Called after each registration (the UDP receivers learn the channels from it).
        self.on_change: Callable[[], None] | None = None

    def register(
        self,
        peer_id: str,
        description: str,
        callback: PeerCallback,
        init_callback: InitCallback | None = None,
    ) -> Peer:
        """Register a channel; raise :class:`PeerError` if ``peer_id`` is taken or empty.

        An empty id is refused because a KDMQ without an R-URI user part is never dispatched
        (§1.5 step 1), so such a channel could not receive anything.
        """
        if not peer_id:
            raise PeerError("DMQ peer id must not be empty")
        if peer_id in self._peers:
            raise PeerError(f"DMQ peer {peer_id!r} is already registered")
        peer = Peer(peer_id, description, callback, init_callback)
        self._peers[peer_id] = peer
        if self.on_change is not None:
            self.on_change()
        return peer

    def register_auto(self, peer_id: str) -> Peer:
        """Get ``peer_id``, registering it first with the ``202 Accepted DMQ`` callback.

        This is what ``dmq_send_message`` / ``dmq_bcast_message`` do for an unknown channel
        (§1.5.1): only the sending node learns the channel, an existing peer is left as it is.
        """
        peer = self._peers.get(peer_id)
        if peer is not None:
            return peer
        return self.register(peer_id, AUTO_DESCRIPTION, _accepted_dmq)

    def get(self, peer_id: str) -> Peer | None:
        """The peer with exactly this id (case-sensitive), or None (the caller answers 404)."""
        return self._peers.get(peer_id)

    def ids(self) -> list[str]:
        """Every registered channel."""
        return list(self._peers)

    def __contains__(self, peer_id: object) -> bool:
        return peer_id in self._peers

    def __len__(self) -> int:
        return len(self._peers)

    def __iter__(self) -> Iterator[Peer]:
        """Peers in Kamailio list order: most recently registered first."""
        return reversed(self._peers.values())


def call_callback(peer: Peer, request: Request, node: Node | None) -> object:
    """Call ``peer``'s message callback: its result, an awaitable for an asynchronous one.

    An exception is a bug in consumer code: it is logged once with the peer id and answered
    ``500 Server Internal Error``, the reply the consumers use for processing failures, so one
    bad consumer cannot kill the node.
    """
    try:
        return peer.callback(request, node)
    except Exception:
        logger.exception("DMQ peer %r: message callback failed", peer.peer_id)
        return PeerResponse(500, "Server Internal Error")


async def finish_callback(peer: Peer, pending: Awaitable[object]) -> object:
    """Await what :func:`call_callback` returned for an asynchronous callback, with the same
    rule for exceptions. Cancellation is not caught."""
    try:
        return await pending
    except Exception:
        logger.exception("DMQ peer %r: message callback failed", peer.peer_id)
        return PeerResponse(500, "Server Internal Error")


async def run_callback(peer: Peer, request: Request, node: Node | None) -> PeerResponse:
    """Run ``peer``'s message callback, awaiting it if it is asynchronous.

    Exceptions are answered as in :func:`call_callback`; a return value that is not a
    :class:`PeerResponse` is logged and answered ``500`` too. Cancellation is not caught.
    """
    result = call_callback(peer, request, node)
    if inspect.isawaitable(result):
        result = await finish_callback(peer, result)
    if not isinstance(result, PeerResponse):
        error = TypeError(f"callback returned {type(result).__name__}, not PeerResponse")
        logger.error("DMQ peer %r: message callback failed", peer.peer_id, exc_info=error)
        return PeerResponse(500, "Server Internal Error")
    return result


async def run_init_callbacks(registry: PeerRegistry) -> int:
    """Run every init callback in list order (§3.4); return how many ran without error.

    One consumer failing to start its sync must not keep the others from syncing, so an
    exception is logged with the peer id and the loop goes on.
    """
    ok = 0
    for peer in list(registry):
        if peer.init_callback is None:
            continue
        try:
            result = peer.init_callback()
            if inspect.isawaitable(result):
                await result
        except Exception:
            logger.exception("DMQ peer %r: init callback failed", peer.peer_id)
        else:
            ok += 1
    return ok
