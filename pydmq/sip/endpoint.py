"""The SIP endpoint: transports + parser + transaction layer, driven by one event loop.

This is the only SIP module that knows about asyncio timers. Everything it decides is delegated
to the sans-I/O pieces: ``parse_message`` reads bytes, ``TransactionLayer`` decides what to
(re)send and when a transaction ends, ``TransportManager`` moves bytes. The datagram path stays
synchronous: no task is created per packet.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from pydmq.sip.errors import SipParseError
from pydmq.sip.message import (
    DEFAULT_LIMITS,
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
    ClientFinal,
    SendBytes,
    ServerVerdict,
    Terminated,
    TimerConfig,
    TransactionLayer,
    server_key,
)
from pydmq.sip.transport import Address, ListenSpec, TlsConfig, TransportManager

log = logging.getLogger(__name__)

#: What a request handler gets; it must answer through ``reply`` (or not at all).
RequestHandler = Callable[["IncomingRequest"], None]
#: Called once per client transaction with the final status and the response (None for a local 408).
FinalCallback = Callable[[int, Response | None], None]

_RELIABLE = frozenset({"tcp", "tls"})


@dataclass(slots=True)
class EndpointStats:
    """Counters the DMQ layer exposes through RPC and metrics."""

    received: int = 0
    sent: int = 0
    dropped_unparsable: int = 0
    bad_requests: int = 0
    stray_responses: int = 0
    absorbed_retransmissions: int = 0
    overloaded: int = 0
    send_errors: int = 0


@dataclass(slots=True)
class IncomingRequest:
    """A request handed up once (retransmissions never reach the handler)."""

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
        """Answer through the server transaction (it also answers later retransmissions)."""
        if self.replied and status >= 200:
            log.warning("second final reply %d to %s ignored", status, self.request.method)
            return
        if status >= 200:
            self.replied = True
        self._endpoint._reply(self, status, reason, body, content_type, extra_headers)


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
        max_transactions: int = 100_000,
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
            on_send_error=self._on_send_error,
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._finals: dict[str, FinalCallback] = {}
        self._futures: dict[str, asyncio.Future[tuple[int, Response | None]]] = {}
        self._to_tag = new_tag()

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self.transport.start(self.specs)

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for fut in self._futures.values():
            if not fut.done():
                fut.cancel()
        self._futures.clear()
        self._finals.clear()
        await self.transport.close()

    def local_address(self, proto: str) -> Address:
        return self.transport.local_address(proto)

    def now(self) -> float:
        assert self._loop is not None, "endpoint not started"
        return self._loop.time()

    # -- receiving -------------------------------------------------------------------------
    def _on_message(self, data: bytes, source: Address, local: Address) -> None:
        self.stats.received += 1
        try:
            msg = parse_message(data, self.limits)
            if isinstance(msg, Response):
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

    def _on_parse_error(
        self, data: bytes, exc: SipParseError, source: Address, local: Address
    ) -> None:
        request = getattr(exc, "request", None)
        if exc.answerable and isinstance(request, Request) and request.method != "ACK":
            self.stats.bad_requests += 1
            log.info("400 %s to %s:%d", exc.reason, source.host, source.port)
            try:
                self._send_stateless(request, source, local, 400, exc.reason)
            except SipParseError:
                self.stats.dropped_unparsable += 1
            return
        self.stats.dropped_unparsable += 1
        log.debug("dropped unparsable %d bytes from %s: %s", len(data), source, exc.reason)

    def _on_request(self, req: Request, source: Address, local: Address) -> None:
        try:
            top = req.via
            key = server_key(req)
        except SipParseError as exc:
            self.stats.bad_requests += 1
            self._send_stateless(req, source, local, 400, exc.reason)
            return
        if source.proto == "udp":
            _stamp_via(top, source)
        if req.method == "ACK":
            return  # non-INVITE only: an ACK has nothing to acknowledge here
        verdict = self.layer.on_request(key, req.method, source.proto in _RELIABLE, self.now())
        if verdict.kind is ServerVerdict.NEW:
            incoming = IncomingRequest(req, source, local, self, key)
            try:
                self.handler(incoming)
            except Exception:
                log.exception("request handler failed for %s %s", req.method, req.uri)
                if not incoming.replied:
                    incoming.reply(500, "Server Internal Error")
        elif verdict.kind is ServerVerdict.RETRANSMIT and verdict.data is not None:
            self._send(verdict.data, _response_address(req, source))
        elif verdict.kind is ServerVerdict.OVERLOADED:
            self.stats.overloaded += 1
            self._send_stateless(req, source, local, 503, "Service Unavailable")
        else:
            self.stats.absorbed_retransmissions += 1
        self._rearm()

    def _on_response(self, resp: Response) -> None:
        try:
            branch = resp.via.branch or ""
            method = resp.cseq.method
        except SipParseError:
            self.stats.stray_responses += 1
            return
        actions = self.layer.on_response(branch, method, resp.status, resp, self.now())
        if not actions and resp.status >= 200 and branch not in self._finals:
            self.stats.stray_responses += 1
        self._apply(actions)

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
        resp = self.build_response(
            incoming.request, status, reason, body, content_type, extra_headers
        )
        data = resp.to_bytes()
        actions = self.layer.on_server_response(incoming._key, status, data, self.now())
        self._send(data, _response_address(incoming.request, incoming.source))
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
        headers = [("Server", self.user_agent), *extra_headers]
        tag = None if status == 100 else self._to_tag
        return make_response(
            request,
            status,
            reason,
            to_tag=tag,
            extra_headers=headers,
            body=body,
            content_type=content_type,
        )

    def _send_stateless(
        self, req: Request, source: Address, local: Address, status: int, reason: str
    ) -> None:
        """Reply without a transaction (bad requests, overload): nothing is kept."""
        resp = self.build_response(req, status, reason)
        self._send(resp.to_bytes(), _response_address(req, source))

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

        A local 408 (fr_timer, or an unusable destination) is reported as ``(408, None)``.
        """
        local = self.local_address(dest.proto)
        branch = new_branch()
        via = f"SIP/2.0/{dest.proto.upper()} {local.sip_hostport()};branch={branch}"
        req = Request.build(
            method,
            ruri,
            via=via,
            from_=f"<{from_uri}>;tag={new_tag()}",
            to=f"<{to_uri or ruri}>",
            call_id=new_call_id(local.host),
            cseq=10,
            max_forwards=None,
            headers=[("User-Agent", self.user_agent), *headers],
            body=body,
        )
        data = req.to_bytes()
        assert self._loop is not None, "endpoint not started"
        fut: asyncio.Future[tuple[int, Response | None]] = self._loop.create_future()
        self._futures[branch] = fut
        if on_final is not None:
            self._finals[branch] = on_final
        actions = self.layer.start_client(
            branch, method, data, dest.proto in _RELIABLE, self.now(), dest=dest
        )
        self._apply(actions)
        return fut

    # -- sans-I/O actions ------------------------------------------------------------------
    def _apply(self, actions: Iterable[object]) -> None:
        for action in actions:
            if isinstance(action, SendBytes):
                dest = action.dest
                if isinstance(dest, Address):
                    self._send(action.data, dest)
            elif isinstance(action, ClientFinal):
                self._deliver_final(action.branch, action.status, action.response)
            elif isinstance(action, Terminated):
                pass
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

    def _send(self, data: bytes, dest: Address | None) -> None:
        if dest is None:
            return
        self.stats.sent += 1
        try:
            self.transport.send(data, dest)
        except OSError as exc:
            self._on_send_error(dest, exc)

    def _on_send_error(self, dest: Address, exc: Exception) -> None:
        self.stats.send_errors += 1
        log.debug("send to %s failed: %s", dest, exc)

    def _rearm(self) -> None:
        deadline = self.layer.next_deadline()
        if deadline is None or self._loop is None:
            return
        if self._timer is not None and self._timer_at is not None and self._timer_at <= deadline:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = self._loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self._apply(self.layer.on_timer(self.now()))


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def _stamp_via(via: Via, source: Address) -> None:
    """RFC 3261 §18.2.1 and RFC 3581: record where a request really came from."""
    if via.rport is not None:
        via.params["rport"] = str(source.port)
        via.params["received"] = source.host
    elif via.host.strip("[]") != source.host:
        via.params["received"] = source.host


def _response_address(req: Request, source: Address) -> Address | None:
    """RFC 3261 §18.2.2: where a response to ``req`` goes."""
    if source.proto in _RELIABLE:
        return source  # back over the connection the request came on
    try:
        via = req.via
    except SipParseError:
        return source
    received = via.received or None
    rport = via.rport
    if rport:
        return Address(source.proto, received or source.host, int(rport))
    host = received or via.host.strip("[]")
    if not _is_ip(host):
        host = source.host  # no resolver on the hot path; the source is what we know
    return Address(source.proto, host, via.port or 5060)
