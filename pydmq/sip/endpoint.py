"""The SIP endpoint: transports + parser + transaction layer, driven by one event loop.

This is the only SIP module that knows about asyncio timers. Everything it decides is delegated
to the sans-I/O pieces: ``parse_message`` reads bytes, ``TransactionLayer`` decides what to
(re)send and when a transaction ends, ``TransportManager`` moves bytes. The datagram path stays
synchronous: no task is created per packet.

Receiving (RFC 3261 §8.2, §17.2, §18.2):

* A request is parsed and validated. One that cannot be used but can be answered gets a stateless
  ``400 <reason>`` (never to an ACK); one that cannot even be answered is dropped and counted.
* The top Via is stamped (§18.2.1, RFC 3581): ``rport=<source port>;received=<source ip>`` when
  the client asked for rport, else ``received=<source ip>`` when the sent-by host is not the
  packet's source address.
* The server transaction decides: a new request goes to the handler once; a retransmission gets
  the last response again (or nothing while the handler has not answered); beyond
  ``max_transactions`` live server transactions the request gets a stateless ``503``. A handler
  that raises before answering produces a ``500``.
* Responses go back per §18.2.2: over the connection the request came on (TCP/TLS); over UDP
  from the socket the request arrived on, to the source ip and, with rport, the source port,
  otherwise the sent-by port (5060 when absent).

Sending (§8.1, §17.1, §18.1): ``send_request`` builds the request with a Via carrying the local
listening address of the destination's transport and address family, and starts a client
transaction. The final status arrives exactly once, through ``on_final`` and the returned
future; a local timeout is ``(408, None)``. Send errors are handed to the transaction layer,
which by default (Kamailio tm) keeps the timers running: the request still ends in a local 408 at
``fr_timer``. A request that cannot even be started (destination not an IP literal, no listening
socket for its transport and family, endpoint closed) raises at once and leaves no state.

All transaction timers are served by a single loop ``TimerHandle`` armed at the earliest deadline.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from pydmq.sip.errors import SipParseError
from pydmq.sip.message import (
    DEFAULT_LIMITS,
    BadRequestError,
    Limits,
    Request,
    Response,
    Via,
    make_response,
    new_branch,
    new_call_id,
    new_tag,
    parse_message,
    validate_request,
    validate_response,
)
from pydmq.sip.transaction import (
    Action,
    ClientFinal,
    SendBytes,
    ServerVerdict,
    Terminated,
    TimerConfig,
    TransactionLayer,
    server_key,
)
from pydmq.sip.transport import Address, ListenSpec, TlsConfig, TransportManager

__all__ = [
    "EndpointStats",
    "FinalCallback",
    "IncomingRequest",
    "RequestHandler",
    "SipEndpoint",
]

log = logging.getLogger(__name__)

#: What a request handler gets; it must answer through ``reply`` (or not at all).
RequestHandler = Callable[["IncomingRequest"], None]
#: Called once per client transaction with the final status and the response (None for a local 408).
FinalCallback = Callable[[int, Response | None], None]

_RELIABLE = frozenset({"tcp", "tls"})
_PROTOCOLS = frozenset({"udp", "tcp", "tls"})
#: Max-Forwards of an originated request whose caller did not write one (RFC 3261 §8.1.1.6).
_DEFAULT_MAX_FORWARDS = 70


@dataclass(slots=True)
class EndpointStats:
    """Counters the DMQ layer exposes through RPC and metrics."""

    received: int = 0  # messages handed up by the transports
    sent: int = 0  # messages handed down to the transports
    dropped_unparsable: int = 0  # input that could not even be answered (dropped)
    bad_requests: int = 0  # requests answered with a stateless 400
    stray_responses: int = 0  # responses matching no client transaction
    absorbed_retransmissions: int = 0  # request retransmissions before the answer
    response_retransmissions: int = 0  # request retransmissions answered with the last response
    overloaded: int = 0  # requests answered 503 because max_transactions was reached
    handler_errors: int = 0  # handler exceptions (answered 500 when not answered yet)
    send_errors: int = 0  # sends the transport could not do (or reported as failed)


@dataclass(slots=True)
class IncomingRequest:
    """A request handed up once (retransmissions never reach the handler).

    ``source`` is where it came from, ``local`` the socket it arrived on (replies leave there).
    """

    request: Request
    source: Address
    local: Address
    _endpoint: SipEndpoint
    _key: str
    replied: bool = field(default=False)

    def reply(
        self,
        status: int,
        reason: str,
        *,
        body: bytes = b"",
        content_type: str | None = None,
        extra_headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        """Answer through the server transaction (it also answers later retransmissions).

        A second final reply is ignored (RFC 3261 §17.2.2). A reply that cannot be built
        (status out of range, CR/LF in a value) raises ``ValueError`` and counts as no reply.
        """
        if self.replied:
            log.warning(
                "reply %d to %s %s ignored: already answered",
                status,
                self.request.method,
                self.request.uri,
            )
            return
        self._endpoint._reply(self, status, reason, body, content_type, extra_headers)
        if status >= 200:
            self.replied = True


class SipEndpoint:
    """A SIP user agent core for KDMQ: it answers requests and originates requests."""

    def __init__(
        self,
        specs: Sequence[ListenSpec],
        handler: RequestHandler,
        *,
        timers: TimerConfig | None = None,
        limits: Limits = DEFAULT_LIMITS,
        tls: TlsConfig | None = None,
        user_agent: str = "pydmq",
        tcp_idle_timeout: float = 300.0,
        tcp_read_timeout: float = 10.0,
        max_connections: int = 2048,
        max_transactions: int = 100_000,
        udp_children: int = 0,
    ) -> None:
        self.specs = list(specs)
        self.handler = handler
        self.timers = timers or TimerConfig()
        self.limits = limits
        self.user_agent = user_agent
        self.stats = EndpointStats()
        self.layer = TransactionLayer(self.timers, max_transactions=max_transactions)
        self.transport = TransportManager(
            self._on_message,
            tls=tls,
            max_size=limits.max_size,
            tcp_idle_timeout=tcp_idle_timeout,
            read_timeout=tcp_read_timeout,
            max_connections=max_connections,
            on_send_error=self._on_send_error,
            udp_children=udp_children,
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._finals: dict[str, FinalCallback] = {}
        self._futures: dict[str, asyncio.Future[tuple[int, Response | None]]] = {}
        # Live client transactions by destination, so a transport error reaches them.
        self._client_dest: dict[str, Address] = {}
        self._by_dest: dict[Address, set[str]] = {}
        self._to_tag = new_tag()

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        if self._closed:
            raise RuntimeError("SipEndpoint is closed")
        self._loop = asyncio.get_running_loop()
        await self.transport.start(self.specs)

    async def close(self) -> None:
        """Close the sockets; transactions in flight are abandoned: their ``on_final`` does not
        run and their futures are cancelled. No timer or task outlives this call."""
        if self._closed:
            return
        self._closed = True
        self._cancel_timer()
        futures = list(self._futures.values())
        self._futures.clear()
        self._finals.clear()
        self._client_dest.clear()
        self._by_dest.clear()
        for fut in futures:
            if not fut.done():
                fut.cancel()
        await self.transport.close()
        self._cancel_timer()  # nothing can re-arm it once closed, but be sure

    @property
    def to_tag(self) -> str:
        """The To tag of this endpoint's final replies (receiver processes use it too)."""
        return self._to_tag

    @property
    def closed(self) -> bool:
        return self._closed

    def local_address(self, proto: str, family: int | None = None) -> Address:
        """The listening address of ``proto`` (optionally of an address family).

        Raises ``LookupError`` when there is none.
        """
        return self.transport.local_address(proto, family)

    def now(self) -> float:
        if self._loop is None:
            raise RuntimeError("SipEndpoint.start() has not been called")
        return self._loop.time()

    # -- receiving -------------------------------------------------------------------------
    def _on_message(
        self, data: bytes, source: Address, local: Address, checked: bool = False
    ) -> None:
        if self._closed:
            return
        self.stats.received += 1
        try:
            msg = parse_message(data, self.limits)
            if checked:
                pass
            elif isinstance(msg, Response):
                validate_response(msg)
            else:
                validate_request(msg)
        except SipParseError as exc:
            self._on_parse_error(data, exc, source, local)
            return
        if isinstance(msg, Response):
            self._on_response(msg)
        else:
            self._on_request(msg, source, local)

    def on_checked_message(self, data: bytes, source: Address, local: Address) -> None:
        """A datagram a UDP receiver process (``pydmq.sip.prefork``) has already parsed and
        validated with this same code: parsed again here, but not checked twice."""
        self._on_message(data, source, local, True)

    def _on_parse_error(
        self, data: bytes, exc: SipParseError, source: Address, local: Address
    ) -> None:
        if isinstance(exc, BadRequestError) and exc.request.method != "ACK":
            try:
                resp, dest = stateless_reply(
                    exc.request, 400, exc.reason, source, self.user_agent, self._to_tag
                )
            except (SipParseError, ValueError):
                pass
            else:
                self.stats.bad_requests += 1
                log.info("400 %s to %s", exc.reason, source)
                self._send(resp, dest, local)
                return
        self.stats.dropped_unparsable += 1
        log.debug("dropped %d bytes from %s: %s", len(data), source, exc.reason)

    def _on_request(self, req: Request, source: Address, local: Address) -> None:
        # validate_request has parsed the top Via and the CSeq: neither raises here.
        top = req.via
        key = server_key(req)
        _stamp_via(top, source)
        if req.method == "ACK":
            return  # non-INVITE only: an ACK has nothing to acknowledge here
        now = self.now()
        verdict = self.layer.on_request(key, req.method, source.proto in _RELIABLE, now)
        kind = verdict.kind
        if kind is ServerVerdict.NEW:
            incoming = IncomingRequest(req, source, local, self, key)
            try:
                self.handler(incoming)
            except Exception:
                self.stats.handler_errors += 1
                log.exception("request handler failed for %s %s", req.method, req.uri)
                if not incoming.replied and not self._closed:
                    try:
                        incoming.reply(500, "Server Internal Error")
                    except Exception:
                        log.exception("could not send the 500 for %s %s", req.method, req.uri)
            # The new server transaction's timer is due at now + server_timeout (its answer's
            # Timer J no earlier): re-arm only when the loop timer is not due by then.
            timer_at = self._timer_at
            if timer_at is None or timer_at > now + self.layer.server_timeout:
                self._rearm()
        elif kind is ServerVerdict.RETRANSMISSION:
            self.stats.response_retransmissions += 1
            if verdict.data is not None:
                self._send(verdict.data, _response_address(top, source), local)
        elif kind is ServerVerdict.OVERLOADED:
            self.stats.overloaded += 1
            resp = self.build_response(req, 503, "Service Unavailable")
            self._send(resp.to_bytes(), _response_address(top, source), local)
        else:
            self.stats.absorbed_retransmissions += 1

    def _on_response(self, resp: Response) -> None:
        # validate_response has parsed the top Via and the CSeq.
        branch = resp.via.branch or ""
        method = resp.cseq.method
        if not self.layer.match_client(branch, method):
            self.stats.stray_responses += 1
            log.debug("stray response %d %s (branch %r)", resp.status, method, branch)
            return
        self._apply(self.layer.on_response(branch, method, resp.status, resp, self.now()))

    # -- replying --------------------------------------------------------------------------
    def _reply(
        self,
        incoming: IncomingRequest,
        status: int,
        reason: str,
        body: bytes,
        content_type: str | None,
        extra_headers: Sequence[tuple[str, str]],
    ) -> None:
        if self._closed:
            log.debug("reply %d to %s dropped: endpoint closed", status, incoming.request.method)
            return
        resp = self.build_response(
            incoming.request, status, reason, body, content_type, extra_headers
        )
        data = resp.to_bytes()
        actions = self.layer.on_server_response(incoming._key, status, data, self.now())
        self._send(data, _response_address(incoming.request.via, incoming.source), incoming.local)
        if actions:
            # Nothing to re-arm otherwise: Timer J of an answer is due no earlier than the
            # request's own server timer, which the loop timer already covers.
            self._apply(actions)

    def build_response(
        self,
        request: Request,
        status: int,
        reason: str,
        body: bytes = b"",
        content_type: str | None = None,
        extra_headers: Iterable[tuple[str, str]] = (),
    ) -> Response:
        """A response to ``request`` (RFC 3261 §8.2.6) in the layout of Kamailio's sl replies."""
        return sl_response(
            request,
            status,
            reason,
            self.user_agent,
            self._to_tag,
            body,
            content_type,
            extra_headers,
        )

    # -- sending requests ------------------------------------------------------------------
    def send_request(
        self,
        dest: Address,
        method: str,
        ruri: str,
        *,
        from_uri: str,
        to_uri: str | None = None,
        headers: Sequence[tuple[str, str]] = (),
        body: bytes = b"",
        on_final: FinalCallback | None = None,
    ) -> asyncio.Future[tuple[int, Response | None]]:
        """Originate a non-INVITE request; its final status arrives once, by callback and future.

        A local 408 (fr_timer, also after a send error) is reported as ``(408, None)``. Raises
        (and keeps no state, runs no callback) when the request cannot be started:
        ``RuntimeError`` if the endpoint is not started or closed, ``ValueError`` for a
        destination that is not ``udp|tcp|tls`` to an IP literal, ``LookupError`` when there
        is no listening socket of the destination's transport and address family.
        """
        dest, local, branch = self._prepare_client(dest)
        extra = [("User-Agent", self.user_agent), *headers]
        if not any(name.lower() == "max-forwards" for name, _ in headers):
            extra.insert(0, ("Max-Forwards", str(_DEFAULT_MAX_FORWARDS)))
        req = Request.build(
            method,
            ruri,
            via=f"SIP/2.0/{dest.proto.upper()} {local.sip_hostport()};branch={branch}",
            from_=f"<{from_uri}>;tag={new_tag()}",
            to=f"<{to_uri or ruri}>",
            call_id=new_call_id(local.host),
            cseq=10,
            max_forwards=None,
            headers=extra,
            body=body,
        )
        return self._start_client(branch, method, req.to_bytes(), dest, local, on_final)

    def forward_request(
        self,
        request: Request,
        dest: Address,
        on_final: FinalCallback | None = None,
    ) -> asyncio.Future[tuple[int, Response | None]]:
        """Forward a received non-INVITE ``request`` statefully to ``dest``, as tm's
        ``t_replicate`` does: the copy is ``request`` unchanged (Request-URI, Max-Forwards,
        Route, body) except for a new top Via of ours (the listening address of ``dest``'s
        transport and family, a new branch) and the ``received``/``rport`` this endpoint noted
        in the request's own top Via (RFC 3261 §18.2.1). ``request`` itself is not modified.

        One client transaction per call: UDP retransmissions, a local ``(408, None)`` at
        ``fr_timer``. Responses match it by our branch and the CSeq method and end here (they
        are never relayed upstream); the final status arrives once, through ``on_final`` and
        the returned future. Raises like :meth:`send_request`, and ``ValueError`` for INVITE or
        ACK (only non-INVITE transactions exist here).
        """
        method = request.method
        if method in ("INVITE", "ACK"):
            raise ValueError(f"cannot forward {method}: non-INVITE transactions only")
        dest, local, branch = self._prepare_client(dest)
        copy = Request(method, request.uri, request.header_items(), request.body)
        copy.replace_top_via(request.via)  # as stamped on receipt (received/rport)
        via = f"SIP/2.0/{dest.proto.upper()} {local.sip_hostport()};branch={branch}"
        copy.add("Via", via, first=True)
        return self._start_client(branch, method, copy.to_bytes(), dest, local, on_final)

    def _prepare_client(self, dest: Address) -> tuple[Address, Address, str]:
        """Check that a client transaction to ``dest`` can start; return the canonical
        destination, our listening address for its transport and family, and a fresh branch.
        Raises (keeping no state) as :meth:`send_request` documents."""
        if self._loop is None:
            raise RuntimeError("SipEndpoint.start() has not been called")
        if self._closed:
            raise RuntimeError("SipEndpoint is closed")
        if dest.proto not in _PROTOCOLS:
            raise ValueError(f"unknown transport protocol {dest.proto!r}")
        canonical = _canonical_ip(dest.host)
        if canonical is None:
            raise ValueError(f"destination host {dest.host!r} is not an IP address")
        if canonical != dest.host:
            dest = Address(dest.proto, canonical, dest.port)
        family = socket.AF_INET6 if ":" in canonical else socket.AF_INET
        local = self.local_address(dest.proto, family)
        branch = new_branch()
        while branch in self._client_dest:  # pragma: no cover - 64 random bits
            branch = new_branch()
        return dest, local, branch

    def _start_client(
        self,
        branch: str,
        method: str,
        data: bytes,
        dest: Address,
        local: Address,
        on_final: FinalCallback | None,
    ) -> asyncio.Future[tuple[int, Response | None]]:
        """Start the client transaction and remember who wants its final status."""
        assert self._loop is not None
        actions = self.layer.start_client(
            branch, method, data, dest.proto in _RELIABLE, self.now(), dest=(dest, local)
        )
        fut: asyncio.Future[tuple[int, Response | None]] = self._loop.create_future()
        self._futures[branch] = fut
        if on_final is not None:
            self._finals[branch] = on_final
        self._client_dest[branch] = dest
        self._by_dest.setdefault(dest, set()).add(branch)
        self._apply(actions)
        return fut

    # -- sans-I/O actions ------------------------------------------------------------------
    def _apply(self, actions: Iterable[Action]) -> None:
        try:
            for action in actions:
                if isinstance(action, SendBytes):
                    route = action.dest
                    if isinstance(route, tuple):
                        self._send(action.data, route[0], route[1])
                elif isinstance(action, ClientFinal):
                    self._deliver_final(action.branch, action.status, action.response)
                elif isinstance(action, Terminated) and not action.server:
                    self._forget_client(action.key)
        finally:
            self._rearm()

    def _deliver_final(self, branch: str, status: int, response: object) -> None:
        resp = response if isinstance(response, Response) else None
        cb = self._finals.pop(branch, None)
        fut = self._futures.pop(branch, None)
        if cb is not None:
            try:
                cb(status, resp)
            except Exception:
                log.exception("final-response callback failed (status %d)", status)
        if fut is not None and not fut.done():
            fut.set_result((status, resp))

    def _forget_client(self, branch: str) -> None:
        dest = self._client_dest.pop(branch, None)
        if dest is not None:
            branches = self._by_dest.get(dest)
            if branches is not None:
                branches.discard(branch)
                if not branches:
                    del self._by_dest[dest]

    def _send(self, data: bytes, dest: Address, local: Address | None = None) -> None:
        self.stats.sent += 1
        try:
            self.transport.send(data, dest, local=local if dest.proto == "udp" else None)
        except (OSError, ValueError) as exc:  # the transport reports network trouble itself
            self.stats.send_errors += 1
            log.warning("cannot send to %s: %s", dest, exc)

    def _on_send_error(self, dest: Address, exc: Exception) -> None:
        """The transport dropped bytes for ``dest``: tell its client transactions (Kamailio tm
        keeps their timers, so they still end in a local 408 at fr_timer)."""
        self.stats.send_errors += 1
        log.debug("send to %s failed: %s", dest, exc)
        if self._closed:
            return
        branches = self._by_dest.get(dest)
        if not branches:
            return
        now = self.now()
        actions: list[Action] = []
        for branch in list(branches):
            actions.extend(self.layer.on_transport_error(branch, now))
        self._apply(actions)

    # -- the one timer ---------------------------------------------------------------------
    def _rearm(self) -> None:
        if self._closed or self._loop is None:
            return
        deadline = self.layer.next_deadline()
        if deadline is None:
            return  # a pending handle fires once more, finds nothing due and is not re-armed
        timer_at = self._timer_at
        if self._timer is not None and timer_at is not None and timer_at <= deadline:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = self._loop.call_at(deadline, self._on_timer)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None
        self._timer_at = None

    def _on_timer(self) -> None:
        at = self._timer_at
        self._timer = None
        self._timer_at = None
        if self._closed:
            return
        # The loop may run a handle a hair before its time (clock resolution, uvloop's
        # millisecond timers): what it ran for is due.
        now = self.now()
        if at is not None and now < at:
            now = at
        self._apply(self.layer.on_timer(now))


def sl_response(
    request: Request,
    status: int,
    reason: str,
    user_agent: str,
    to_tag: str,
    body: bytes = b"",
    content_type: str | None = None,
    extra_headers: Iterable[tuple[str, str]] = (),
) -> Response:
    """A reply in the layout of Kamailio's sl module: ``Server`` first, then ``extra_headers``;
    ``to_tag`` on every To without a tag except in a 100 (RFC 3261 §8.2.6)."""
    return make_response(
        request,
        status,
        reason,
        to_tag=None if status == 100 else to_tag,
        extra_headers=[("Server", user_agent), *extra_headers],
        body=body,
        content_type=content_type,
    )


def stateless_reply(
    request: Request, status: int, reason: str, source: Address, user_agent: str, to_tag: str
) -> tuple[bytes, Address]:
    """Answer ``request`` from ``source`` without a transaction: stamp its top Via (§18.2.1),
    build the reply, and say where it goes (§18.2.2). Raises ``SipParseError`` (no usable
    Via) or ``ValueError`` (a reason that cannot be written) when there is no reply to send."""
    via = request.via
    _stamp_via(via, source)
    data = sl_response(request, status, reason, user_agent, to_tag).to_bytes()
    return data, _response_address(via, source)


@functools.lru_cache(maxsize=1024)
def _canonical_ip(host: str) -> str | None:
    """``host`` (brackets allowed) as the transport writes IPs, or None if it is not an IP."""
    text = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return ipaddress.ip_address(text).compressed
    except ValueError:
        return None


def _set_param(via: Via, name: str, value: str) -> None:
    """Set a Via parameter, replacing it in place whatever case it was written in."""
    params = via.params
    for key in params:
        if key.lower() == name:
            params[key] = value
            return
    params[name] = value


def _stamp_via(via: Via, source: Address) -> None:
    """RFC 3261 §18.2.1 and RFC 3581: record in the top Via where a request really came from.

    With rport: ``rport=<source port>`` in place and ``received=<source ip>`` (always, RFC 3581
    §4). Without: ``received`` only when the sent-by host is not the source address.
    """
    if via.rport is not None:
        _set_param(via, "rport", str(source.port))
        _set_param(via, "received", source.host)
    elif via.host != source.host and _canonical_ip(via.host) != source.host:
        _set_param(via, "received", source.host)


def _response_address(via: Via, source: Address) -> Address:
    """RFC 3261 §18.2.2 and RFC 3581 §4: where a response to a request from ``source`` goes.

    TCP/TLS: back to the source (the connection the request came on). UDP: to the source ip
    (what ``received`` holds when it is set, and the sent-by host otherwise); to the source
    port with rport, else to the sent-by port (5060 when absent).
    """
    if source.proto != "udp" or via.rport is not None:
        return source
    port = via.port or 5060
    return source if port == source.port else Address("udp", source.host, port)
