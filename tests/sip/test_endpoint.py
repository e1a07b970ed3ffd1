"""SipEndpoint on real sockets (127.0.0.1 and ::1): UDP, TCP, TLS, IPv6.

Every wait is bounded (``WAIT``) and waits for an event (a datagram, a handler call, a future),
never for a timed sleep. Where a test must know that the endpoint has *processed* datagrams that
produce no visible output (an absorbed retransmission, a stray response, garbage), it sends a
marker request from the same socket afterwards and waits for the marker's reply: loopback UDP
between two sockets keeps order and the endpoint handles datagrams synchronously, in order.

The fake-clock retransmission schedule (0, 0.5, 1.5, 3.5, 7.5, 11.5 … 408 at 30 s) is covered in
test_transaction.py; here the same machine runs on real timers with short values.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trustme

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a dependency wherever it builds
    uvloop = None

from pydmq.sip.endpoint import IncomingRequest, SipEndpoint
from pydmq.sip.message import Request, Response, make_response, parse_message
from pydmq.sip.transaction import TimerConfig
from pydmq.sip.transport import Address, ListenSpec, TlsConfig

pytestmark = pytest.mark.filterwarnings("error::ResourceWarning")

WAIT = 5.0  # bound of every await on the network
V4 = "127.0.0.1"
V6 = "::1"

MARK = "z9hG4bKmark"  # requests with this branch prefix are always answered (see marker())

Scenario = Callable[[], Awaitable[None]]
SCENARIOS: dict[str, Scenario] = {}


def both_loops(fn: Scenario) -> Scenario:
    """Also run this scenario on uvloop (see the end of the module)."""
    SCENARIOS[fn.__name__] = fn
    return fn


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------


def hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def family_of(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


class Handler:
    """Request handler: records every request; answers ``200 OK`` unless ``auto`` is off
    (markers are always answered)."""

    def __init__(self, *, auto: bool = True, body: bytes = b"") -> None:
        self.auto = auto
        self.body = body
        self.items: list[IncomingRequest] = []
        self._queue: asyncio.Queue[IncomingRequest] = asyncio.Queue()

    def __call__(self, incoming: IncomingRequest) -> None:
        self.items.append(incoming)
        self._queue.put_nowait(incoming)
        if self.auto or (incoming.request.via.branch or "").startswith(MARK):
            incoming.reply(
                200,
                "OK",
                body=self.body,
                content_type="text/plain" if self.body else None,
                extra_headers=[("X-Test", "yes")],
            )

    async def next(self) -> IncomingRequest:
        async with asyncio.timeout(WAIT):
            return await self._queue.get()


class RawUdp(asyncio.DatagramProtocol):
    """A bare UDP socket: records (data, source, loop time) of every datagram."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.queue: asyncio.Queue[tuple[bytes, tuple[Any, ...], float]] = asyncio.Queue()
        self.loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.queue.put_nowait((data, addr, self.loop.time()))

    @property
    def port(self) -> int:
        assert self.transport is not None
        return int(self.transport.get_extra_info("sockname")[1])

    def send(self, data: bytes, host: str, port: int) -> None:
        assert self.transport is not None
        self.transport.sendto(data, (host, port))

    async def recv(self) -> tuple[bytes, tuple[Any, ...], float]:
        async with asyncio.timeout(WAIT):
            return await self.queue.get()

    async def recv_response(self) -> tuple[Response, bytes, tuple[Any, ...]]:
        data, addr, _ = await self.recv()
        msg = parse_message(data)
        assert isinstance(msg, Response), data
        return msg, data, addr


@contextlib.asynccontextmanager
async def raw_udp(host: str = V4) -> AsyncIterator[RawUdp]:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(RawUdp, local_addr=(host, 0))
    try:
        yield proto
    finally:
        transport.close()
        await asyncio.sleep(0)  # the transport closes its socket in a callback


def assert_quiet(ep: SipEndpoint) -> None:
    """Nothing of ``ep`` is left scheduled or running."""
    assert ep._timer is None
    assert ep._timer_at is None
    assert not ep._futures and not ep._finals and not ep._by_dest and not ep._client_dest
    assert not ep.transport._tasks
    assert not ep.transport.live
    scheduled = getattr(asyncio.get_running_loop(), "_scheduled", [])  # stdlib loop only
    for handle in scheduled:
        if handle.cancelled():
            continue
        owner = getattr(handle._callback, "__self__", None)
        assert owner is not ep, f"timer left behind: {handle}"


@contextlib.asynccontextmanager
async def endpoint(
    *specs: str, handler: Callable[[IncomingRequest], None] | None = None, **kw: Any
) -> AsyncIterator[SipEndpoint]:
    ep = SipEndpoint(
        [ListenSpec.parse(s) for s in specs], handler or Handler(), user_agent="pydmq-test", **kw
    )
    await ep.start()
    try:
        yield ep
    finally:
        await ep.close()
        assert_quiet(ep)


def raw_request(
    *,
    via: str,
    branch: str,
    method: str = "OPTIONS",
    ruri: str = "sip:ping@127.0.0.1",
    to: str = "sip:ping@127.0.0.1",
    max_forwards: str = "70",
    rport: bool = False,
    cseq: str | None = None,
    call_id: str | None = None,
    extra: str = "",
    body: bytes = b"",
    content_length: int | None = None,
    proto: str = "UDP",
) -> bytes:
    """A request as a test peer writes it; ``via`` is the sent-by (host[:port])."""
    params = f";branch={branch}" + (";rport" if rport else "")
    length = len(body) if content_length is None else content_length
    return (
        f"{method} {ruri} SIP/2.0\r\n"
        f"Via: SIP/2.0/{proto} {via}{params}\r\n"
        f"From: <sip:tester@example.org>;tag=ft{branch[-6:]}\r\n"
        f"To: <{to}>\r\n"
        f"Call-ID: {call_id or 'c-' + branch}\r\n"
        f"CSeq: {cseq or '1 ' + method}\r\n"
        f"Max-Forwards: {max_forwards}\r\n"
        f"{extra}"
        f"Content-Length: {length}\r\n\r\n"
    ).encode() + body


async def marker(raw: RawUdp, ep: SipEndpoint, tag: str) -> None:
    """Send a fresh OPTIONS from ``raw`` and wait for its 200, which must be the next datagram
    ``raw`` receives: everything ``raw`` sent before has been processed by ``ep`` by then."""
    port = ep.local_address("udp", socket.AF_INET).port
    branch = f"{MARK}{tag}"
    raw.send(raw_request(via=f"{V4}:{raw.port};rport", branch=branch), V4, port)
    resp, _, _ = await raw.recv_response()
    assert (resp.status, resp.via.branch) == (200, branch)  # and nothing else before it


# ------------------------------------------------------------------------------------------
# TLS certificates
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_config(tmp_path_factory: pytest.TempPathFactory) -> TlsConfig:
    d: Path = tmp_path_factory.mktemp("endpoint-tls")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(d / "ca.pem")
    cert = ca.issue_cert("127.0.0.1", "::1", "localhost")
    with (d / "node.crt").open("wb") as f:
        for pem in cert.cert_chain_pems:
            f.write(pem.bytes())
    cert.private_key_pem.write_to_path(d / "node.key")
    return TlsConfig(d / "node.crt", d / "node.key", d / "ca.pem")


# ------------------------------------------------------------------------------------------
# request / response between two endpoints
# ------------------------------------------------------------------------------------------


async def exchange(proto: str, host: str, tls: TlsConfig | None = None) -> None:
    """OPTIONS from a dual-stack client to a server on ``host`` over ``proto``."""
    handler = Handler(body=b"pong")
    family = family_of(host)
    async with (
        endpoint(f"{proto}:{hostport(host, 0)}", handler=handler, tls=tls) as server,
        endpoint(f"{proto}:{V4}:0", f"{proto}:[{V6}]:0", tls=tls) as client,
    ):
        dest = server.local_address(proto)
        calls: list[tuple[int, Response | None]] = []
        fut = client.send_request(
            dest,
            "OPTIONS",
            f"sip:ping@{dest.sip_hostport()}",
            from_uri=f"sip:client@{client.local_address(proto, family).sip_hostport()}",
            body=b"ping",
            headers=[("Content-Type", "text/plain")],
            on_final=lambda status, resp: calls.append((status, resp)),
        )
        async with asyncio.timeout(WAIT):
            status, resp = await fut
        assert status == 200
        assert resp is not None and resp.body == b"pong"
        assert resp.reason == "OK" and resp.get("X-Test") == "yes"
        assert resp.get("Server") == "pydmq-test"
        assert resp.to.tag  # §8.2.6.2
        assert calls == [(200, resp)]

        incoming = handler.items[0]
        req = incoming.request
        assert len(handler.items) == 1
        assert req.method == "OPTIONS" and req.body == b"ping"
        # The Via sent-by is the client's listening address of this transport and family.
        own = client.local_address(proto, family)
        assert req.via.transport == proto.upper()
        assert req.via.host == (f"[{host}]" if family == socket.AF_INET6 else host)
        assert req.via.port == own.port
        assert req.via.branch is not None and req.via.branch.startswith("z9hG4bK")
        assert req.max_forwards == 70  # RFC 3261 §8.1.1.6 default
        assert req.get("User-Agent") == "pydmq-test"
        assert req.cseq.seq == 10 and req.cseq.method == "OPTIONS"
        assert incoming.source.proto == proto and incoming.source.host == host
        assert incoming.local == dest
        if proto == "udp":
            assert incoming.source.port == own.port  # sent from the listening socket
        else:
            # The response came back over the connection the request opened (§18.2.2).
            assert server.transport.connection_count == 1
            assert client.transport.connection_count == 1
        assert client.layer.live_clients == (0 if proto != "udp" else 1)  # UDP: Completed (T4)
        assert client.stats.stray_responses == 0


@both_loops
async def scenario_udp_v4() -> None:
    await exchange("udp", V4)


@both_loops
async def scenario_tcp_v6() -> None:
    await exchange("tcp", V6)


@pytest.mark.parametrize("host", [V4, V6], ids=["v4", "v6"])
@pytest.mark.parametrize("proto", ["udp", "tcp", "tls"])
async def test_request_response(proto: str, host: str, tls_config: TlsConfig) -> None:
    await exchange(proto, host, tls_config if proto == "tls" else None)


async def test_udp_reply_leaves_from_the_socket_the_request_arrived_on() -> None:
    async with endpoint(f"udp:{V4}:0", f"udp:{V4}:0") as ep, raw_udp() as raw:
        ports = [e.local.port for e in ep.transport._udp]
        assert len(set(ports)) == 2
        for n, port in enumerate(reversed(ports)):
            raw.send(raw_request(via=f"{V4}:{raw.port}", branch=f"z9hG4bKsock{n}"), V4, port)
            resp, _, addr = await raw.recv_response()
            assert resp.status == 200
            assert addr[1] == port


# ------------------------------------------------------------------------------------------
# server transactions: retransmissions, bad input, overload, handler errors
# ------------------------------------------------------------------------------------------


@both_loops
async def scenario_retransmitted_request_reaches_handler_once() -> None:
    handler = Handler(auto=False)
    async with endpoint(f"udp:{V4}:0", handler=handler) as ep, raw_udp() as raw:
        port = ep.local_address("udp").port
        data = raw_request(via=f"{V4}:{raw.port}", branch="z9hG4bKretrans1")
        raw.send(data, V4, port)
        raw.send(data, V4, port)  # before the answer: absorbed
        first = await handler.next()
        # A different request after the retransmission: once it is handed up, the
        # retransmission before it has been seen (and absorbed).
        raw.send(raw_request(via=f"{V4}:{raw.port}", branch="z9hG4bKother"), V4, port)
        other = await handler.next()
        assert ep.stats.absorbed_retransmissions == 1
        assert raw.queue.empty()  # nothing was answered yet

        first.reply(200, "OK", body=b"once", content_type="text/plain")
        resp, reply_bytes, _ = await raw.recv_response()
        assert resp.status == 200 and resp.body == b"once"
        raw.send(data, V4, port)  # after the answer: the same reply again
        raw.send(data, V4, port)
        for _ in range(2):
            again, _, _ = await raw.recv()
            assert again == reply_bytes
        assert ep.stats.response_retransmissions == 2
        assert [i.request.via.branch for i in handler.items] == ["z9hG4bKretrans1", "z9hG4bKother"]
        other.reply(200, "OK")
        await raw.recv_response()


async def test_retransmitted_request_reaches_handler_once() -> None:
    await scenario_retransmitted_request_reaches_handler_once()


@pytest.mark.parametrize(
    ("kw", "reason"),
    [
        ({"method": "OPTIONS", "cseq": "1 KDMQ"}, "CSeq method mismatch"),
        ({"body": b"short", "content_length": 999}, "Bad Content-Length"),
        ({"extra": "Content-Length: 5\r\n", "body": b"hello"}, "Bad Content-Length"),
        ({"ruri": "sip:@127.0.0.1"}, "Bad Request-URI"),
        ({"max_forwards": "lots"}, "Bad Max-Forwards"),
    ],
    ids=["cseq-mismatch", "cl-too-big", "cl-twice", "bad-ruri", "bad-max-forwards"],
)
async def test_bad_request_gets_400_with_reason(kw: dict[str, Any], reason: str) -> None:
    handler = Handler()
    async with endpoint(f"udp:{V4}:0", handler=handler) as ep, raw_udp() as raw, raw_udp() as b:
        port = ep.local_address("udp").port
        # Sent-by names another port with rport: the 400 follows rport back to the sender,
        # with the top Via stamped like any other response.
        data = raw_request(via=f"{V4}:{b.port}", branch="z9hG4bKbad1", rport=True, **kw)
        raw.send(data, V4, port)
        resp, _, addr = await raw.recv_response()
        assert (resp.status, resp.reason) == (400, reason)
        assert addr[1] == port
        assert resp.via.rport == str(raw.port) and resp.via.received == V4
        assert resp.call_id == "c-z9hG4bKbad1"
        assert resp.to.tag
        assert not handler.items
        assert ep.stats.bad_requests == 1
        assert ep.layer.live_servers == 0  # stateless
        assert b.queue.empty()


async def test_unanswerable_input_is_dropped_and_counted() -> None:
    handler = Handler()
    async with endpoint(f"udp:{V4}:0", handler=handler) as ep, raw_udp() as raw:
        port = ep.local_address("udp").port
        via = f"{V4}:{raw.port};rport"
        no_call_id = raw_request(via=via, branch="z9hG4bKnocid").replace(
            b"Call-ID: c-z9hG4bKnocid\r\n", b""
        )
        bad_ack = raw_request(via=via, branch="z9hG4bKack", method="ACK", cseq="1 INVITE")
        garbage = [
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 not sip at all",
            b"hello world\r\n\r\n",
            no_call_id,  # cannot be answered without a Call-ID
            b"SIP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n",  # response without Via etc.
            bad_ack,  # a bad ACK is never answered
        ]
        for data in garbage:
            raw.send(data, V4, port)
        await marker(raw, ep, "after-garbage")
        assert ep.stats.dropped_unparsable == len(garbage)
        assert ep.stats.bad_requests == 0
        assert [i.request.via.branch for i in handler.items] == ["z9hG4bKmarkafter-garbage"]
        assert raw.queue.empty()  # no reply to any of the garbage


async def test_overload_gets_503() -> None:
    handler = Handler(auto=False)
    async with (
        endpoint(f"udp:{V4}:0", handler=handler, max_transactions=1) as ep,
        raw_udp() as raw,
    ):
        port = ep.local_address("udp").port
        raw.send(raw_request(via=f"{V4}:{raw.port}", branch="z9hG4bKload1"), V4, port)
        first = await handler.next()
        raw.send(raw_request(via=f"{V4}:{raw.port}", branch="z9hG4bKload2"), V4, port)
        resp, _, _ = await raw.recv_response()
        assert (resp.status, resp.reason) == (503, "Service Unavailable")
        assert resp.via.branch == "z9hG4bKload2"
        assert ep.stats.overloaded == 1
        assert len(handler.items) == 1
        first.reply(200, "OK")
        resp, _, _ = await raw.recv_response()
        assert (resp.status, resp.via.branch) == (200, "z9hG4bKload1")


async def test_handler_that_raises_gets_500() -> None:
    def handler(incoming: IncomingRequest) -> None:
        raise RuntimeError("boom")

    async with endpoint(f"udp:{V4}:0", handler=handler) as ep, raw_udp() as raw:
        port = ep.local_address("udp").port
        data = raw_request(via=f"{V4}:{raw.port}", branch="z9hG4bKboom")
        raw.send(data, V4, port)
        resp, first, _ = await raw.recv_response()
        assert (resp.status, resp.reason) == (500, "Server Internal Error")
        raw.send(data, V4, port)  # the server transaction answers the retransmission
        again, _, _ = await raw.recv()
        assert again == first
        assert ep.stats.handler_errors == 1


async def test_second_final_reply_and_bad_reply_are_refused() -> None:
    handler = Handler(auto=False)
    async with endpoint(f"udp:{V4}:0", handler=handler) as ep, raw_udp() as raw:
        port = ep.local_address("udp").port
        raw.send(raw_request(via=f"{V4}:{raw.port}", branch="z9hG4bKtwice"), V4, port)
        incoming = await handler.next()
        with pytest.raises(ValueError):
            incoming.reply(200, "OK\r\nX-Injected: 1")
        assert not incoming.replied  # a reply that could not be built is no reply
        incoming.reply(202, "Accepted")
        resp, _, _ = await raw.recv_response()
        assert (resp.status, resp.reason) == (202, "Accepted")
        incoming.reply(500, "Too Late")  # ignored (§17.2.2)
        await marker(raw, ep, "twice")  # the next response is the marker's: no 500 was sent
        assert incoming.replied


# ------------------------------------------------------------------------------------------
# response routing, RFC 3261 §18.2.1 / §18.2.2 and RFC 3581
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "sent_by", "rport", "to_sender", "received"),
    [
        (V4, V4, True, True, V4),  # rport: source ip:port, received always added
        (V4, V4, False, False, None),  # no rport: the sent-by port, nothing stamped
        (V4, "192.0.2.7", False, False, V4),  # sent-by host differs: received, sent-by port
        (V4, "node.invalid", False, False, V4),  # a name is never the source address
        (V6, "[0:0::1]", False, False, None),  # the same IPv6 address written differently
        (V6, "[::1]", True, True, V6),
    ],
    ids=["rport", "no-rport", "other-host", "hostname", "v6-same", "v6-rport"],
)
async def test_response_routing(
    host: str, sent_by: str, rport: bool, to_sender: bool, received: str | None
) -> None:
    async with (
        endpoint(f"udp:{hostport(host, 0)}") as ep,
        raw_udp(host) as sender,
        raw_udp(host) as other,
    ):
        port = ep.local_address("udp").port
        data = raw_request(via=f"{sent_by}:{other.port}", branch="z9hG4bKroute", rport=rport)
        sender.send(data, host, port)
        target = sender if to_sender else other
        resp, _, addr = await target.recv_response()
        assert resp.status == 200
        assert addr[1] == port
        via = resp.via
        assert via.host == sent_by and via.port == other.port
        assert via.received == received
        assert via.rport == (str(sender.port) if rport else None)
        if rport:  # Kamailio's order: rport filled in place, received appended
            assert str(via).endswith(f";branch=z9hG4bKroute;rport={sender.port};received={host}")
        # Nothing went to the other socket: a later reply is the next thing there.
        check = raw_request(via=f"{sent_by}:{other.port}", branch="z9hG4bKcheck", rport=True)
        sender.send(check, host, port)
        follow, _, _ = await sender.recv_response()
        assert follow.via.branch == "z9hG4bKcheck"
        assert other.queue.empty()


# ------------------------------------------------------------------------------------------
# client transactions
# ------------------------------------------------------------------------------------------


async def test_udp_retransmission_schedule_on_real_timers() -> None:
    timers = TimerConfig(t1=0.05, t2=0.4, fr_timer=1.0)
    loop = asyncio.get_running_loop()
    async with endpoint(f"udp:{V4}:0", timers=timers) as ep, raw_udp() as silent:
        calls: list[tuple[int, Response | None, float]] = []
        t0 = loop.time()
        fut = ep.send_request(
            Address("udp", V4, silent.port),
            "KDMQ",
            f"sip:notification_peer@{V4}:{silent.port}",
            from_uri=f"sip:notification_peer@{ep.local_address('udp').sip_hostport()}",
            headers=[("Max-Forwards", "1"), ("Content-Type", "text/plain")],
            body=b"sip:127.0.0.1:5060;status=active\r\n",
            on_final=lambda status, resp: calls.append((status, resp, loop.time())),
        )
        # One loop timer, armed at the transaction layer's earliest deadline.
        assert ep._timer is not None and ep._timer_at == ep.layer.next_deadline()
        async with asyncio.timeout(WAIT):
            status, resp = await fut
        assert (status, resp) == (408, None)
        assert len(calls) == 1 and calls[0][:2] == (408, None)
        assert calls[0][2] - t0 == pytest.approx(1.0, abs=0.1)
        assert calls[0][2] - t0 >= 1.0 - 0.005

        arrivals = []
        while not silent.queue.empty():
            arrivals.append(silent.queue.get_nowait())
        # T1 doubling up to T2, no send at or after fr_timer: 0, .05, .15, .35, .75.
        expected = [0.0, 0.05, 0.15, 0.35, 0.75]
        assert len(arrivals) == len(expected), [round(a[2] - t0, 3) for a in arrivals]
        assert len({data for data, _, _ in arrivals}) == 1  # the same bytes every time
        assert all(addr[1] == ep.local_address("udp").port for _, addr, _ in arrivals)
        first = arrivals[0][2]
        offsets = [at - first for _, _, at in arrivals]
        for got, want in zip(offsets, expected, strict=True):
            assert want - 0.005 <= got <= want + 0.06, offsets
        gaps = [b - a for a, b in itertools.pairwise(offsets)]
        for small, big in itertools.pairwise(gaps):
            assert big == pytest.approx(2 * small, abs=0.05), gaps
        assert ep.layer.live_clients == 0
        assert ep.layer.next_deadline() is None
        assert ep.layer.retransmissions == 4 and ep.layer.timeouts == 1


def live_handles(ep: SipEndpoint) -> int:
    """Loop timer handles of ``ep`` that are still pending (stdlib loop)."""
    scheduled = asyncio.get_running_loop()._scheduled  # type: ignore[attr-defined]
    return sum(
        1 for h in scheduled if not h.cancelled() and getattr(h._callback, "__self__", None) is ep
    )


async def test_one_timer_handle_at_the_earliest_deadline() -> None:
    timers = TimerConfig(t1=0.05, t2=0.4, fr_timer=1.0)
    handler = Handler(auto=False)
    async with (
        endpoint(f"udp:{V4}:0", handler=handler, timers=timers) as ep,
        raw_udp() as peer,
    ):
        # An unanswered server transaction: its guard timer is 64*T1 = 3.2 s away.
        peer.send(
            raw_request(via=f"{V4}:{peer.port}", branch="z9hG4bKheld"),
            V4,
            ep.local_address("udp").port,
        )
        held = await handler.next()
        guard = ep.layer.next_deadline()
        assert ep._timer_at == guard and live_handles(ep) == 1
        # A client transaction: Timer E at T1 is earlier, so the one handle moves there.
        fut = ep.send_request(
            Address("udp", V4, peer.port),
            "OPTIONS",
            f"sip:x@{V4}:{peer.port}",
            from_uri="sip:me@127.0.0.1",
        )
        assert guard is not None and ep._timer_at is not None and ep._timer_at < guard
        assert ep._timer_at == ep.layer.next_deadline() and live_handles(ep) == 1
        first, _, t_first = await peer.recv()
        again, _, t_again = await peer.recv()  # Timer E fired on that handle
        assert again == first
        assert t_again - t_first == pytest.approx(0.05, abs=0.04)
        assert ep._timer_at == ep.layer.next_deadline() and live_handles(ep) == 1
        req = parse_message(first)
        assert isinstance(req, Request)
        peer.send(make_response(req, 200, "OK").to_bytes(), V4, ep.local_address("udp").port)
        async with asyncio.timeout(WAIT):
            assert (await fut)[0] == 200
        held.reply(200, "OK")
        # Left: Timer K (T4 = 5 s) and Timer J (64*T1). The handle is not moved later when the
        # earliest timer is cancelled (it wakes once for nothing and re-arms), but it is never
        # later than the earliest deadline and there is still only one.
        deadline = ep.layer.next_deadline()
        assert deadline is not None and ep._timer_at is not None and ep._timer_at <= deadline
        assert live_handles(ep) == 1


async def test_final_is_delivered_once_and_strays_are_counted() -> None:
    async with endpoint(f"udp:{V4}:0") as ep, raw_udp() as peer:
        calls: list[tuple[int, Response | None]] = []
        fut = ep.send_request(
            Address("udp", V4, peer.port),
            "OPTIONS",
            f"sip:ping@{V4}:{peer.port}",
            from_uri="sip:me@127.0.0.1",
            on_final=lambda status, resp: calls.append((status, resp)),
        )
        data, addr, _ = await peer.recv()
        req = parse_message(data)
        assert isinstance(req, Request)
        trying = make_response(req, 100, "Trying").to_bytes()
        ok = make_response(req, 200, "OK", to_tag="t1").to_bytes()
        peer.send(trying, addr[0], addr[1])
        peer.send(ok, addr[0], addr[1])
        peer.send(ok, addr[0], addr[1])  # a retransmitted final: absorbed, not stray
        async with asyncio.timeout(WAIT):
            status, resp = await fut
        assert status == 200 and resp is not None and resp.to.tag == "t1"
        branch = req.via.branch
        assert branch is not None
        peer.send(ok.replace(branch.encode(), b"z9hG4bKunknown"), addr[0], addr[1])
        peer.send(ok.replace(b"10 OPTIONS", b"10 KDMQ"), addr[0], addr[1])  # other method
        await marker(peer, ep, "strays")
        assert calls == [(200, resp)]
        assert ep.stats.stray_responses == 2
        assert ep.layer.absorbed_responses == 1


async def test_send_error_keeps_timers_until_fr_timer() -> None:
    """Kamailio tm: a failed TCP connect is no immediate error; the request ends in the local
    408 at fr_timer."""
    with socket.socket() as s:  # a port with no listener: the connect is refused
        s.bind((V4, 0))
        closed_port = s.getsockname()[1]
    loop = asyncio.get_running_loop()
    timers = TimerConfig(fr_timer=0.5)
    async with endpoint(f"tcp:{V4}:0", timers=timers) as ep:
        calls: list[tuple[int, Response | None]] = []
        t0 = loop.time()
        fut = ep.send_request(
            Address("tcp", V4, closed_port),
            "OPTIONS",
            f"sip:x@{V4}:{closed_port};transport=tcp",
            from_uri="sip:me@127.0.0.1;transport=tcp",
            on_final=lambda status, resp: calls.append((status, resp)),
        )
        async with asyncio.timeout(WAIT):
            assert await fut == (408, None)
        assert loop.time() - t0 >= 0.5 - 0.005
        assert calls == [(408, None)]
        assert ep.layer.transport_errors == 1  # the error reached the transaction
        assert ep.stats.send_errors >= 1
        assert ep.layer.live_clients == 0


async def test_requests_that_cannot_start_raise_without_state() -> None:
    async with endpoint(f"udp:{V4}:0") as ep:

        def send(dest: Address) -> Any:
            return ep.send_request(dest, "OPTIONS", "sip:x@example.org", from_uri="sip:me@h")

        with pytest.raises(ValueError, match="not an IP"):
            send(Address("udp", "example.org", 5060))
        with pytest.raises(ValueError, match="protocol"):
            send(Address("sctp", V4, 5060))
        with pytest.raises(LookupError):
            send(Address("tcp", V4, 5060))  # no TCP listener
        with pytest.raises(LookupError):
            send(Address("udp", V6, 5060))  # no IPv6 UDP socket
        assert ep.layer.live_clients == 0 and not ep._futures
        assert ep._timer is None
    with pytest.raises(RuntimeError):
        send(Address("udp", V4, 5060))  # closed


async def test_close_abandons_transactions_and_leaves_nothing() -> None:
    handler = Handler(auto=False)
    calls: list[tuple[int, Response | None]] = []
    async with raw_udp() as silent:
        ep = SipEndpoint([ListenSpec.parse(f"udp:{V4}:0")], handler)
        await ep.start()
        fut = ep.send_request(
            Address("udp", V4, silent.port),
            "OPTIONS",
            f"sip:x@{V4}:{silent.port}",
            from_uri="sip:me@127.0.0.1",
            on_final=lambda status, resp: calls.append((status, resp)),
        )
        await silent.recv()
        # An unanswered server transaction too.
        silent.send(
            raw_request(via=f"{V4}:{silent.port}", branch="z9hG4bKopen"),
            V4,
            ep.local_address("udp").port,
        )
        incoming = await handler.next()
        assert ep.layer.live_clients == 1 and ep.layer.live_servers == 1
        await ep.close()
        assert fut.cancelled()
        assert calls == []
        assert_quiet(ep)
        incoming.reply(200, "OK")  # a late answer is dropped quietly
        assert_quiet(ep)
        await ep.close()  # idempotent
    current = asyncio.current_task()
    assert [t for t in asyncio.all_tasks() if t is not current] == []


# ------------------------------------------------------------------------------------------
# uvloop
# ------------------------------------------------------------------------------------------


@pytest.mark.skipif(uvloop is None, reason="uvloop is not installed")
@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_on_uvloop(name: str) -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(SCENARIOS[name]())
