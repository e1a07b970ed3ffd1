"""The message a ``request_route`` gets: Kamailio's ``$rm``, ``$ru``, ``$hdr(...)``, ``$rb``,
``$si``/``$sp``/``$pr``, ``sl_send_reply`` and ``drop``, plus the DMQ script functions.

A :class:`Msg` wraps one received request (an :class:`~pydmq.sip.endpoint.IncomingRequest`) and
the :class:`~pydmq.dmq.runtime.DmqNode` that received it. Retransmissions never reach the route:
the server transaction absorbs them and answers them with the reply the route gave.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from pydmq.script import functions
from pydmq.sip.errors import SipParseError

if TYPE_CHECKING:
    from pydmq.dmq.runtime import DmqNode
    from pydmq.sip.endpoint import IncomingRequest
    from pydmq.sip.message import Request, Response
    from pydmq.sip.transport import Address
    from pydmq.sip.uri import SipUri

__all__ = ["Headers", "Msg"]

log = logging.getLogger(__name__)


class Headers:
    """Read-only, case-insensitive view of a request's headers (compact forms accepted).

    ``get(name)`` is the first value (for comma-list headers such as Via the first element),
    ``get_all(name)`` every value in order with comma lists split; ``name in headers`` tests
    presence; iterating yields ``(name as written, value)`` rows.
    """

    __slots__ = ("_request",)

    def __init__(self, request: Request) -> None:
        self._request = request

    def get(self, name: str, default: str | None = None) -> str | None:
        value = self._request.get(name)
        return default if value is None else value

    def get_all(self, name: str) -> list[str]:
        return self._request.get_all(name)

    def __getitem__(self, name: str) -> str:
        value = self._request.get(name)
        if value is None:
            raise KeyError(name)
        return value

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._request.get(name) is not None

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self._request.header_items())

    def __len__(self) -> int:
        return len(self._request.header_items())

    def __repr__(self) -> str:
        return f"Headers({self._request.header_items()!r})"


class Msg:
    """One request in the routing script.

    Attributes and properties (read-only):

    * ``method`` (``$rm``), ``ruri`` (``$ru``, the Request-URI text), ``ruri_parsed`` (a
      :class:`~pydmq.sip.uri.SipUri`, raises :class:`~pydmq.sip.errors.SipParseError` when the
      R-URI is not a SIP URI), ``ruser`` (``$rU``, None when absent or unparsable);
    * ``headers`` (:class:`Headers`), ``body`` (bytes, ``$rb``), ``call_id``;
    * ``source_ip`` / ``source_port`` / ``transport`` (``$si`` / ``$sp`` / ``$pr``: ``udp``,
      ``tcp`` or ``tls``), ``source`` and ``local`` (:class:`~pydmq.sip.transport.Address`);
    * ``request`` (the underlying :class:`~pydmq.sip.message.Request`), ``node`` (the
      :class:`~pydmq.dmq.runtime.DmqNode`);
    * ``replied`` (a final reply went out), ``dropped`` (:meth:`drop` was called), ``handled``
      (either);
    * ``replications``: one future per request :meth:`dmq_t_replicate` forwarded, resolving to
      ``(status, response or None)`` once that node's transaction ends (a local 408 is
      ``(408, None)``). Awaiting them is optional.
    """

    __slots__ = ("_dropped", "_headers", "incoming", "node", "replications")

    def __init__(self, node: DmqNode, incoming: IncomingRequest) -> None:
        self.node = node
        self.incoming = incoming
        self._headers = Headers(incoming.request)
        self._dropped = False
        self.replications: list[asyncio.Future[tuple[int, Response | None]]] = []

    # -- the request -----------------------------------------------------------------------
    @property
    def request(self) -> Request:
        return self.incoming.request

    @property
    def method(self) -> str:
        return self.incoming.request.method

    def is_method(self, *methods: str) -> bool:
        """True when the method is one of ``methods`` (case-sensitive, as SIP methods are)."""
        return self.incoming.request.method in methods

    @property
    def ruri(self) -> str:
        return self.incoming.request.uri

    @property
    def ruri_parsed(self) -> SipUri:
        return self.incoming.request.ruri

    @property
    def ruser(self) -> str | None:
        try:
            return self.incoming.request.ruri.user
        except SipParseError:
            return None

    @property
    def headers(self) -> Headers:
        return self._headers

    @property
    def body(self) -> bytes:
        return self.incoming.request.body

    @property
    def call_id(self) -> str:
        return self.incoming.request.call_id

    @property
    def source(self) -> Address:
        return self.incoming.source

    @property
    def local(self) -> Address:
        return self.incoming.local

    @property
    def source_ip(self) -> str:
        return self.incoming.source.host

    @property
    def source_port(self) -> int:
        return self.incoming.source.port

    @property
    def transport(self) -> str:
        return self.incoming.source.proto

    # -- answering -------------------------------------------------------------------------
    @property
    def replied(self) -> bool:
        return self.incoming.replied

    @property
    def dropped(self) -> bool:
        return self._dropped

    @property
    def handled(self) -> bool:
        return self._dropped or self.incoming.replied

    def reply(
        self,
        code: int,
        reason: str,
        body: bytes | str = b"",
        content_type: str | None = None,
        headers: Sequence[tuple[str, str]] = (),
    ) -> bool:
        """``sl_send_reply``: answer now; ``True`` when the reply went out.

        The reply goes through the server transaction, which answers later retransmissions of
        the request with it. A body goes with ``Content-Type: <content_type>`` (``text/plain``
        when not given). Ignored (``False``, logged) after :meth:`drop` or after a final
        reply; raises ``ValueError`` for a code outside 100..699 or CR/LF in a value.
        """
        if self._dropped:
            log.warning("reply %d to %s %s ignored: dropped", code, self.method, self.ruri)
            return False
        if self.incoming.replied:
            log.warning("reply %d to %s %s ignored: already answered", code, self.method, self.ruri)
            return False
        if isinstance(body, str):
            body = body.encode()
        if body and content_type is None:
            content_type = "text/plain"
        if not 100 <= code <= 699:
            raise ValueError(f"reply code {code} is not in 100..699")
        self.incoming.reply(
            code,
            reason,
            body=body,
            content_type=content_type if body else None,
            extra_headers=headers,
        )
        return True

    def drop(self) -> None:
        """Kamailio's ``drop``: no reply will be sent (later :meth:`reply` calls are ignored).

        It does not stop the route by itself: return after it. Requests already forwarded by
        :meth:`dmq_t_replicate` go on.
        """
        self._dropped = True

    # -- the dmq module's functions (see pydmq.script.functions) -----------------------------
    def dmq_handle_message(self, continue_: int = 0) -> int:
        return functions.dmq_handle_message(self, continue_)

    def dmq_process_message(self, continue_: int = 0) -> int:
        return functions.dmq_process_message(self, continue_)

    def dmq_send_message(
        self, channel: str, node: str, body: bytes | str, content_type: str = "text/plain"
    ) -> int:
        return functions.dmq_send_message(self, channel, node, body, content_type)

    def dmq_bcast_message(
        self, channel: str, body: bytes | str, content_type: str = "text/plain"
    ) -> int:
        return functions.dmq_bcast_message(self, channel, body, content_type)

    def dmq_t_replicate(self, skip_loop_test: int = 0) -> int:
        return functions.dmq_t_replicate(self, skip_loop_test)

    def dmq_is_from_node(self) -> int:
        return functions.dmq_is_from_node(self)

    dmq_handle_message.__doc__ = functions.dmq_handle_message.__doc__
    dmq_process_message.__doc__ = functions.dmq_process_message.__doc__
    dmq_send_message.__doc__ = functions.dmq_send_message.__doc__
    dmq_bcast_message.__doc__ = functions.dmq_bcast_message.__doc__
    dmq_t_replicate.__doc__ = functions.dmq_t_replicate.__doc__
    dmq_is_from_node.__doc__ = functions.dmq_is_from_node.__doc__

    def __repr__(self) -> str:
        return f"<Msg {self.method} {self.ruri} from {self.source}>"
