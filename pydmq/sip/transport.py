"""Thin asyncio adapters for SIP over UDP, TCP and TLS.

Everything above this module is sans-I/O, so the transport only moves bytes: datagrams and framed
stream messages go up through one synchronous callback, ``send()`` pushes bytes down. Choices that
matter for Kamailio interop:

* UDP is sent from the listening socket itself, because Kamailio nodes recognise a peer by its
  source ip:port (the DMQ ``server_socket``).
* A TCP/TLS connection is looked up by the remote (proto, ip, port), whichever side opened it, so
  replies go back over the connection a request arrived on and repeated sends share one connection
  (Kamailio's connection reuse).
* Limits mirror Kamailio's defaults: 65535-byte messages (BUF_SIZE), 120 s idle lifetime
  (``tcp_connection_lifetime``), 10 s connect timeout (``tcp_connect_timeout``), 2048 connections
  (``tcp_max_connections``). A message that has started to arrive must be complete (header block
  and body) within ``read_timeout`` seconds (Kamailio's ``tcp_msg_read_timeout``, 20 s there,
  10 s here), else the connection is closed: a peer trickling a header byte at a time (slowloris)
  holds a connection for that long at most, whatever the idle timeout.

Connection limit policy: when ``max_connections`` is reached, one connection is closed to make
room: the one idle for the longest time with nothing buffered either way, or the one that has
never delivered a complete message and whose first message has been arriving for the longest
time while nothing of ours waits to be written to it (a slowloris peer), whichever has waited
longer; if every connection is busy the new one is refused (an inbound one is aborted, an
outbound send is reported to ``on_send_error``). So a peer trickling bytes cannot keep
legitimate peers out, while a connection that has proven itself is never cut in the middle of a
message. Connections being opened or in a TLS handshake count toward the limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import gc
import ipaddress
import itertools
import logging
import os
import socket
import ssl
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final, cast

from pydmq.sip.errors import SipParseError
from pydmq.sip.framing import DEFAULT_MAX_HEADERS_BYTES, DEFAULT_MAX_SIZE, StreamFramer
from pydmq.sip.memo import remember
from pydmq.sip.uri import SipUri

__all__ = [
    "DEFAULT_PORTS",
    "PROTOCOLS",
    "Address",
    "ListenSpec",
    "OnMessage",
    "OnSendError",
    "TlsConfig",
    "TransportError",
    "TransportManager",
    "TransportStats",
    "install_uvloop",
    "server_socket_from_address",
    "tune_gc",
    "tune_malloc",
]

log = logging.getLogger(__name__)

PROTOCOLS: Final = frozenset({"udp", "tcp", "tls"})
#: Port used when a socket string leaves it out (RFC 3261 §19.1.2).
DEFAULT_PORTS: Final = {"udp": 5060, "tcp": 5060, "tls": 5061}
_MAX_UDP_PAYLOAD: Final = 65507
_KEEPALIVE_MAX: Final = 8  # a UDP datagram this short made only of CR/LF/NUL/space is a keep-alive
#: Sources whose Address a UDP reader keeps at once (the main process and the receivers).
SOURCE_CACHE_MAX: Final = 4096
_LOG_ONCE_INTERVAL: Final = 60.0
_CLOSE_GRACE: Final = 1.0
# Orders connection activity exactly (uvloop's loop.time() only ticks once per iteration).
_activity = itertools.count()

StrPath = str | os.PathLike[str]
#: ``on_message(data, source, local)``: one complete message, who sent it, the socket it came in on.
OnMessage = Callable[[bytes, "Address", "Address"], None]
#: ``on_send_error(dest, exc)``: bytes for ``dest`` were (or may have been) dropped.
OnSendError = Callable[["Address", Exception], None]


class TransportError(ConnectionError):
    """A send that the transport itself gave up on (no socket, limits, shut down)."""


# --------------------------------------------------------------------------------------------
# Addresses and listen specifications
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Address:
    """A transport address: ``proto`` in ``udp|tcp|tls``, ``host`` an IP literal without brackets.

    Hashable so it can key connections; compares as written, so use the canonical IP text (which
    is what the transport hands out).
    """

    proto: str
    host: str
    port: int

    def sip_hostport(self) -> str:
        """``host:port`` as it appears in SIP (IPv6 in brackets)."""
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.proto}:{self.sip_hostport()}"


@functools.lru_cache(maxsize=4096)
def _parse_ip(host: str) -> tuple[str, socket.AddressFamily]:
    """Canonical text and family of an IP literal (cached: this sits on the send path)."""
    text = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"not an IP address: {host!r}") from None
    return ip.compressed, (socket.AF_INET6 if ip.version == 6 else socket.AF_INET)


@dataclass(frozen=True, slots=True)
class ListenSpec:
    """One socket to listen on, Kamailio's ``proto:host[:port]`` (``server_socket``) form."""

    proto: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> ListenSpec:
        """Parse ``udp:IP[:PORT]``, ``tcp:…``, ``tls:…``; IPv6 goes in brackets.

        The port defaults to 5060 (5061 for tls). Only IP literals are accepted: pydmq does not
        resolve names or interfaces for listening.
        """
        what = f"bad listen socket {text!r}"
        proto, sep, rest = text.strip().partition(":")
        if not sep:
            raise ValueError(f"{what}: expected proto:host[:port]")
        proto = proto.lower()
        if proto not in PROTOCOLS:
            raise ValueError(f"{what}: protocol {proto!r} is not one of udp, tcp, tls")
        port_str: str | None
        if rest.startswith("["):
            close = rest.find("]")
            if close < 0:
                raise ValueError(f"{what}: unterminated IPv6 reference")
            host, tail = rest[1:close], rest[close + 1 :]
            if tail and not tail.startswith(":"):
                raise ValueError(f"{what}: unexpected {tail!r} after the IPv6 address")
            port_str = tail[1:] if tail else None
            bracketed = True
        else:
            if rest.count(":") > 1:
                raise ValueError(f"{what}: an IPv6 address must be written in brackets")
            host, sep, port_str_ = rest.partition(":")
            port_str = port_str_ if sep else None
            bracketed = False
        if not host:
            raise ValueError(f"{what}: missing host")
        try:
            canonical, family = _parse_ip(host)
        except ValueError:
            raise ValueError(f"{what}: host {host!r} is not an IP address") from None
        if bracketed and family != socket.AF_INET6:
            raise ValueError(f"{what}: only IPv6 addresses go in brackets")
        if port_str is None:
            port = DEFAULT_PORTS[proto]
        else:
            if not (port_str.isascii() and port_str.isdigit()) or len(port_str) > 5:
                raise ValueError(f"{what}: bad port {port_str!r}")
            port = int(port_str)
            if port > 65535:
                raise ValueError(f"{what}: port {port} out of range")
        return cls(proto, canonical, port)

    @classmethod
    def from_server_address(cls, address: str) -> ListenSpec:
        """The socket Kamailio derives from ``server_address`` when ``server_socket`` is unset."""
        socket_str = server_socket_from_address(address)
        try:
            return cls.parse(socket_str)
        except ValueError as exc:
            raise ValueError(f"bad server_address {address!r}: {exc}") from None

    @property
    def family(self) -> socket.AddressFamily:
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET

    def __str__(self) -> str:
        return str(Address(self.proto, self.host, self.port))


def server_socket_from_address(address: str) -> str:
    """Build the ``server_socket`` string from a ``server_address`` URI, as Kamailio does.

    ``<proto>:<host>[:<port>]`` with host and port copied as written, the proto taken from
    ``;transport=`` and ``udp`` when there is none (``tls`` for a ``sips:`` URI). Kamailio would
    fall back to udp for an unknown transport; pydmq refuses it instead, since it could only be a
    typo or a transport (sctp, ws) it cannot listen on.
    """
    what = f"bad server_address {address!r}"
    try:
        uri = SipUri.parse(address.strip())
    except SipParseError as exc:
        raise ValueError(f"{what}: {exc.reason}") from None
    transport = uri.transport
    if transport is None:
        if uri.has_param("transport"):
            raise ValueError(f"{what}: empty transport parameter")
        proto = "tls" if uri.scheme == "sips" else "udp"
    elif transport in PROTOCOLS:
        proto = transport
    else:
        raise ValueError(f"{what}: transport {transport!r} is not supported (udp, tcp, tls)")
    if uri.port_str:
        return f"{proto}:{uri.host}:{uri.port_str}"
    return f"{proto}:{uri.host}"


# --------------------------------------------------------------------------------------------
# TLS
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """Certificates and verification policy for both ends of TLS connections.

    ``verify_client`` makes the server demand a certificate signed by ``cafile`` (mutual TLS).
    ``verify_server`` checks the peer's chain against ``cafile`` (or the system store);
    ``server_hostname_check`` additionally matches it against the IP we dialled, off by default
    because cluster certificates rarely carry every node's IP.
    """

    certfile: StrPath
    keyfile: StrPath
    cafile: StrPath | None = None
    verify_client: bool = False
    verify_server: bool = True
    server_hostname_check: bool = False

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.certfile, self.keyfile)
        if self.verify_client:
            ctx.verify_mode = ssl.CERT_REQUIRED
            self._load_trust(ctx, ssl.Purpose.CLIENT_AUTH)
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """Client side; always offers our certificate, since a peer may require it whatever our
        own ``verify_client`` says (it is only sent when the server asks for one)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        if self.verify_server:
            ctx.verify_mode = ssl.CERT_REQUIRED
            self._load_trust(ctx, ssl.Purpose.SERVER_AUTH)
            ctx.check_hostname = self.server_hostname_check
        else:
            ctx.verify_mode = ssl.CERT_NONE
        ctx.load_cert_chain(self.certfile, self.keyfile)
        return ctx

    def _load_trust(self, ctx: ssl.SSLContext, purpose: ssl.Purpose) -> None:
        if self.cafile is not None:
            ctx.load_verify_locations(self.cafile)
        else:
            ctx.load_default_certs(purpose)


# --------------------------------------------------------------------------------------------
# Manager
# --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class TransportStats:
    """Counters for the unusual events (the hot path counts nothing)."""

    udp_dropped: int = 0
    accepted: int = 0
    connected: int = 0
    connect_failures: int = 0
    tls_handshake_failures: int = 0
    parse_errors: int = 0
    idle_closed: int = 0
    read_timeouts: int = 0
    evicted: int = 0
    refused: int = 0
    send_errors: int = 0


class _LogOnce:
    """Log a recurring problem once per key per interval, so a misbehaving peer cannot flood."""

    __slots__ = ("_last",)

    def __init__(self) -> None:
        self._last: dict[object, float] = {}

    def __call__(self, key: object, now: float, msg: str, *args: object) -> None:
        last = self._last.get(key)
        if last is not None and now - last < _LOG_ONCE_INTERVAL:
            log.debug(msg, *args)
            return
        if len(self._last) >= 1024:
            self._last.clear()
        self._last[key] = now
        log.warning(msg, *args)


class _State(enum.Enum):
    CONNECTING = 1
    OPEN = 2
    CLOSED = 3


class _StreamConn(asyncio.Protocol):
    """One TCP or TLS connection: framing in, buffered writes out, idle timer."""

    def __init__(
        self, mgr: TransportManager, proto: str, key: Address | None, local: Address | None
    ) -> None:
        self.mgr = mgr
        self.proto = proto
        self.key = key
        self.local = local
        self.transport: asyncio.Transport | None = None
        self.state = _State.CONNECTING
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self.framer = StreamFramer(mgr.max_size, mgr.max_headers_bytes)
        self.last_active = mgr.loop.time()
        self.used = next(_activity)
        self.idle_handle: asyncio.TimerHandle | None = None
        #: When the incomplete message in the framer started to arrive (None: nothing pending).
        self.read_started: float | None = None
        self.read_handle: asyncio.TimerHandle | None = None
        #: Whether a complete message ever arrived here (see the connection limit policy).
        self.proven = False
        self.task: asyncio.Task[None] | None = None
        #: The TCP transport below a TLS server connection, closed if we give up mid-handshake.
        self.raw: asyncio.Transport | None = None
        self.lost: asyncio.Future[None] = mgr.loop.create_future()

    # asyncio callbacks

    def connection_made(self, base_transport: asyncio.BaseTransport) -> None:
        # cast, not isinstance: uvloop's and some asyncio transports skip the ABCs.
        transport = cast(asyncio.Transport, base_transport)
        mgr = self.mgr
        if self.key is None:  # inbound plain TCP: admitted here, TLS was admitted at accept
            peer = transport.get_extra_info("peername")
            self.key = Address(self.proto, peer[0], peer[1])
            if mgr.closed or not mgr.admit(self.key):
                self.state = _State.CLOSED
                transport.abort()
                self._resolve()
                return
            mgr.register(self)
            mgr.stats.accepted += 1
        if self.state is _State.CLOSED:  # closed while connecting
            self.transport = transport  # so that fail() leaves resolving to connection_lost
            transport.abort()
            return
        self.transport = transport
        self.state = _State.OPEN
        if self.local is None:
            sock = transport.get_extra_info("sockname")
            self.local = Address(self.proto, sock[0], sock[1])
        if self.pending:
            data = b"".join(self.pending)
            self.pending.clear()
            self.pending_bytes = 0
            transport.write(data)
        self.last_active = mgr.loop.time()
        self.used = next(_activity)
        if mgr.tcp_idle_timeout > 0:
            self.idle_handle = mgr.loop.call_at(
                self.last_active + mgr.tcp_idle_timeout, self._idle_check
            )

    def data_received(self, data: bytes) -> None:
        mgr = self.mgr
        self.last_active = mgr.loop.time()
        self.used = next(_activity)
        try:
            messages = self.framer.feed(data)
        except SipParseError as exc:
            mgr.stats.parse_errors += 1
            host = self.key.host if self.key is not None else None
            mgr.log_once(("parse", host), self.last_active, "closing %s: %s", self.key, exc.reason)
            self.close()
            return
        if self.framer.buffered:
            # A message is incomplete: it started in this read unless an older one still is.
            if self.read_started is None or messages:
                self.read_started = self.last_active
                if self.read_handle is None and mgr.read_timeout > 0:
                    self.read_handle = mgr.loop.call_at(
                        self.last_active + mgr.read_timeout, self._read_check
                    )
        else:
            self.read_started = None
        if messages:
            self.proven = True
        if self.framer.pings:
            self.write(b"\r\n" * self.framer.take_pings())
        for message in messages:
            if self.state is _State.CLOSED:
                break
            mgr.deliver(message, self.key, self.local)  # type: ignore[arg-type]

    def connection_lost(self, exc: Exception | None) -> None:
        self.state = _State.CLOSED
        self.mgr.forget(self)
        self._resolve()

    # our side

    def write(self, data: bytes) -> None:
        mgr = self.mgr
        transport = self.transport
        if transport is None:
            if self.pending_bytes + len(data) > mgr.max_write_buffer:
                self._overflow()
                return
            self.pending.append(data)
            self.pending_bytes += len(data)
        else:
            if transport.get_write_buffer_size() + len(data) > mgr.max_write_buffer:
                self._overflow()
                return
            transport.write(data)
        self.last_active = mgr.loop.time()
        self.used = next(_activity)

    def is_busy(self) -> bool:
        """Whether closing would lose bytes in either direction."""
        t = self.transport
        return (
            t is None
            or bool(self.pending)
            or self.framer.buffered > 0
            or t.get_write_buffer_size() > 0
        )

    def close(self) -> None:
        """Stop using this connection; it stays in ``mgr.live`` until the socket is gone."""
        if self.state is _State.CLOSED:
            return
        self.state = _State.CLOSED
        self.mgr.forget(self)
        if self.transport is not None:
            self.transport.close()  # connection_lost resolves ``lost``
        elif self.raw is not None:
            self.raw.abort()  # still in the TLS handshake; _TlsServer resolves ``lost``
        elif self.task is not None:
            self.task.cancel()  # the connect task resolves ``lost``
        else:
            self._resolve()

    def abort(self) -> None:
        self.close()
        if self.transport is not None:
            self.transport.abort()

    def fail(self) -> None:
        """Opening failed (connect error, cancelled, TLS handshake refused); let go of it."""
        self.state = _State.CLOSED
        self.mgr.forget(self)
        if self.transport is not None:
            self.transport.abort()
        else:
            self._resolve()

    def _overflow(self) -> None:
        assert self.key is not None
        self.mgr.report(self.key, TransportError(f"write buffer full for {self.key}"))
        self.abort()

    def _idle_check(self) -> None:
        self.idle_handle = None
        if self.state is not _State.OPEN:
            return
        mgr = self.mgr
        deadline = self.last_active + mgr.tcp_idle_timeout
        if mgr.loop.time() >= deadline:
            mgr.stats.idle_closed += 1
            log.debug("closing idle connection %s", self.key)
            self.close()
        else:
            self.idle_handle = mgr.loop.call_at(deadline, self._idle_check)

    def _read_check(self) -> None:
        self.read_handle = None
        started = self.read_started
        if self.state is not _State.OPEN or started is None:
            return
        mgr = self.mgr
        deadline = started + mgr.read_timeout
        if mgr.loop.time() >= deadline:
            mgr.stats.read_timeouts += 1
            host = self.key.host if self.key is not None else None
            mgr.log_once(
                ("read", host),
                mgr.loop.time(),
                "closing %s: no complete message within %g s (%d bytes buffered)",
                self.key,
                mgr.read_timeout,
                self.framer.buffered,
            )
            self.close()
        else:
            self.read_handle = mgr.loop.call_at(deadline, self._read_check)

    def is_stalled_reader(self) -> bool:
        """Never delivered a message, and only its incomplete first one would be lost by
        closing (nothing of ours is waiting)."""
        t = self.transport
        return (
            not self.proven
            and self.read_started is not None
            and t is not None
            and not self.pending
            and t.get_write_buffer_size() == 0
        )

    def _resolve(self) -> None:
        if self.idle_handle is not None:
            self.idle_handle.cancel()
            self.idle_handle = None
        if self.read_handle is not None:
            self.read_handle.cancel()
            self.read_handle = None
        self.mgr.live.discard(self)
        self.mgr.counted.discard(self)
        if not self.lost.done():
            self.lost.set_result(None)


class _TlsServer(asyncio.Protocol):
    """Server side of TLS on an accepted TCP connection, on ``ssl.SSLObject`` memory BIOs.

    asyncio's ``create_server(ssl=...)`` drops failed handshakes without telling the application,
    and ``loop.start_tls`` loses the ClientHello on uvloop (it reads before the upgrade). Driving
    the handshake here lets us log and count failures (a client without a certificate when
    ``verify_client`` is on) on either loop, without a task per connection.
    """

    def __init__(self, mgr: TransportManager, local: Address, ctx: ssl.SSLContext) -> None:
        self.mgr = mgr
        self.local = local
        self.ctx = ctx
        self.raw: asyncio.Transport | None = None
        self.conn: _StreamConn | None = None
        self.app: _TlsTransport | None = None
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.sslobj: ssl.SSLObject | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.failed = False

    def connection_made(self, base_transport: asyncio.BaseTransport) -> None:
        raw = cast(asyncio.Transport, base_transport)
        mgr = self.mgr
        peer = raw.get_extra_info("peername")
        key = Address("tls", peer[0], peer[1])
        if mgr.closed or not mgr.admit(key):
            raw.abort()
            return
        self.raw = raw
        self.conn = conn = _StreamConn(mgr, "tls", key, self.local)
        conn.raw = raw
        mgr.register(conn)
        self.sslobj = self.ctx.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.timer = mgr.loop.call_later(mgr.connect_timeout, self._handshake_timeout)

    def data_received(self, data: bytes) -> None:
        sslobj = self.sslobj
        if sslobj is None or self.failed:
            return
        self.incoming.write(data)
        if self.app is None:
            try:
                sslobj.do_handshake()
            except ssl.SSLWantReadError:
                self._flush()
                return
            except Exception as exc:
                self._fail(exc)
                return
            self._handshake_done()
        chunks: list[bytes] = []
        closing = False
        try:
            while True:
                chunk = sslobj.read(65536)
                if not chunk:  # the peer sent close_notify (no more data raises WantRead)
                    closing = True
                    break
                chunks.append(chunk)
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:
            closing = True
        except ssl.SSLError as exc:
            self._fail(exc)
            return
        self._flush()  # TLS 1.3 may answer reads (key updates, tickets)
        conn = self.conn
        if chunks and conn is not None:
            conn.data_received(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        if closing and self.app is not None:
            self.app.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        conn = self.conn
        if conn is None:
            return
        if self.app is not None:
            conn.connection_lost(exc)
        else:
            conn.fail()

    # ours

    def write(self, data: bytes) -> None:
        sslobj = self.sslobj
        if sslobj is None or self.raw is None or self.raw.is_closing():
            return
        view = memoryview(data)
        try:
            while view:
                view = view[sslobj.write(view) :]
        except ssl.SSLError as exc:
            self._fail(exc)
            return
        self._flush()

    def shutdown(self) -> None:
        """Send close_notify and close; waiting for the peer's would only delay the close."""
        if self.sslobj is not None and self.app is not None and not self.failed:
            with contextlib.suppress(ssl.SSLError, ValueError):
                self.sslobj.unwrap()
            self._flush()
        if self.raw is not None:
            self.raw.close()

    def _flush(self) -> None:
        data = self.outgoing.read()
        if data and self.raw is not None:
            self.raw.write(data)

    def _handshake_done(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        conn = self.conn
        assert conn is not None and self.raw is not None
        self.app = _TlsTransport(self, self.raw)
        self._flush()
        self.mgr.stats.accepted += 1
        conn.connection_made(self.app)

    def _handshake_timeout(self) -> None:
        self.timer = None
        self._fail(TimeoutError())

    def _fail(self, exc: Exception) -> None:
        """Log once, send whatever alert OpenSSL queued, and close."""
        if self.failed:
            return
        self.failed = True
        mgr = self.mgr
        conn = self.conn
        key = conn.key if conn is not None else None
        if self.app is None:
            mgr.stats.tls_handshake_failures += 1
            mgr.log_once(
                ("tls", key.host if key else None),
                mgr.loop.time(),
                "TLS handshake with %s failed: %s",
                key,
                _why(exc),
            )
        else:
            mgr.log_once(("tls", key), mgr.loop.time(), "TLS error on %s: %s", key, _why(exc))
        self._flush()
        if self.raw is not None:
            self.raw.close()


class _TlsTransport(asyncio.Transport):
    """What ``_StreamConn`` sees of a connection served by :class:`_TlsServer`."""

    def __init__(self, layer: _TlsServer, raw: asyncio.Transport) -> None:
        super().__init__()
        self._layer = layer
        self._raw = raw

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._layer.write(bytes(data))

    def close(self) -> None:
        self._layer.shutdown()

    def abort(self) -> None:
        self._raw.abort()

    def is_closing(self) -> bool:
        return self._raw.is_closing()

    def get_write_buffer_size(self) -> int:
        return self._raw.get_write_buffer_size()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self._layer.sslobj
        if name == "peercert" and self._layer.sslobj is not None:
            return self._layer.sslobj.getpeercert()
        return self._raw.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self._raw.pause_reading()

    def resume_reading(self) -> None:
        self._raw.resume_reading()

    def is_reading(self) -> bool:
        return self._raw.is_reading()


class _DatagramEndpoint(asyncio.DatagramProtocol):
    """One UDP socket. ``datagram_received`` is the hot path: no task, no copy, one dict hit."""

    def __init__(self, mgr: TransportManager, local: Address) -> None:
        self.mgr = mgr
        self.local = local
        self.transport: asyncio.DatagramTransport | None = None
        self.lost: asyncio.Future[None] = mgr.loop.create_future()
        self._on_message = mgr.on_message
        self._max_size = mgr.max_size
        self._sources: dict[Any, Address] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if len(data) > self._max_size:
            self.mgr.stats.udp_dropped += 1
            return
        if len(data) <= _KEEPALIVE_MAX and is_keepalive(data):  # no call for the others
            return
        source = self._sources.get(addr)
        if source is None:
            source = Address("udp", addr[0], addr[1])
            remember(self._sources, addr, source, SOURCE_CACHE_MAX)
        try:
            self._on_message(data, source, self.local)
        except Exception:
            log.exception("on_message failed for a datagram from %s", source)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors on an unconnected socket cannot be tied to a destination.
        log.debug("UDP socket %s: %s", self.local, exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)


class TransportManager:
    """Owns the listening sockets and stream connections of one node.

    ``on_message`` is called synchronously from the protocol callbacks (never in a task) with each
    complete message; it must not block. ``send`` never blocks or raises for network trouble:
    failures go to ``on_send_error``, always from a later loop iteration, never from inside
    ``send``. A failed connect reports once for everything queued on it.
    """

    def __init__(
        self,
        on_message: OnMessage,
        *,
        tls: TlsConfig | None = None,
        max_size: int = DEFAULT_MAX_SIZE,
        max_headers_bytes: int = DEFAULT_MAX_HEADERS_BYTES,
        tcp_idle_timeout: float = 120.0,
        connect_timeout: float = 10.0,
        read_timeout: float = 10.0,
        max_connections: int = 2048,
        max_write_buffer: int = 4 * 1024 * 1024,
        on_send_error: OnSendError | None = None,
        udp_children: int = 0,
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self.on_message = on_message
        self.on_send_error = on_send_error
        #: Each UDP listener is a SO_REUSEPORT group: this many receiver sockets (for the
        #: processes of ``pydmq.sip.prefork``, see ``receiver_sockets``), then ours.
        self.udp_children = udp_children
        self._receiver_sockets: list[tuple[list[socket.socket], Address]] = []
        self.tls = tls
        self.max_size = max_size
        self.max_headers_bytes = max_headers_bytes
        self.tcp_idle_timeout = tcp_idle_timeout
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_connections = max_connections
        self.max_write_buffer = max_write_buffer
        self.stats = TransportStats()
        self.log_once = _LogOnce()
        # Built now so that bad certificate paths fail at construction, not at first use.
        self._server_ctx = tls.server_context() if tls is not None else None
        self._client_ctx = tls.client_context() if tls is not None else None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.closed = False
        self._udp: list[_DatagramEndpoint] = []
        self._udp_by_family: dict[int, _DatagramEndpoint] = {}
        self._udp_by_local: dict[Address, _DatagramEndpoint] = {}
        self._servers: list[tuple[asyncio.Server, Address]] = []
        self._stream_local: dict[tuple[str, int], Address] = {}
        self._conns: dict[Address, _StreamConn] = {}
        #: Connections whose socket may still be open (close() waits for all of them).
        self.live: set[_StreamConn] = set()
        #: Connections not yet being closed: what ``max_connections`` limits.
        self.counted: set[_StreamConn] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("TransportManager.start() has not been called")
        return self._loop

    # ---------------------------------------------------------------- lifecycle

    async def start(self, specs: Iterable[ListenSpec]) -> None:
        """Open every listener; on any failure close the ones already open and re-raise."""
        if self._loop is not None:
            raise RuntimeError("TransportManager already started")
        self._loop = asyncio.get_running_loop()
        try:
            for spec in specs:
                if spec.proto == "udp":
                    await self._start_udp(spec)
                else:
                    await self._start_stream(spec)
        except BaseException:
            await self.close()
            raise

    async def _start_udp(self, spec: ListenSpec) -> None:
        if self.udp_children:
            group = _reuseport_group(spec, self.udp_children + 1)
            sock = group.pop()
        else:
            group = []
            sock = _udp_socket(spec.family)
            try:
                sock.bind((spec.host, spec.port))
            except BaseException:
                sock.close()
                raise
        sock.setblocking(False)
        local = Address("udp", spec.host, sock.getsockname()[1])
        if group:
            self._receiver_sockets.append((group, local))
        endpoint = _DatagramEndpoint(self, local)
        await self.loop.create_datagram_endpoint(lambda: endpoint, sock=sock)
        self._udp.append(endpoint)
        self._udp_by_family.setdefault(spec.family, endpoint)
        self._udp_by_local[local] = endpoint

    async def _start_stream(self, spec: ListenSpec) -> None:
        local_box: list[Address] = []
        factory: Callable[[], asyncio.BaseProtocol]
        if spec.proto == "tls":
            if self._server_ctx is None:
                raise ValueError(f"cannot listen on {spec}: no TlsConfig given")
            ctx = self._server_ctx
            factory = lambda: _TlsServer(self, local_box[0], ctx)  # noqa: E731
        else:
            factory = lambda: _StreamConn(self, "tcp", None, local_box[0])  # noqa: E731
        server = await self.loop.create_server(
            factory, spec.host, spec.port, family=spec.family, reuse_address=True
        )
        port = server.sockets[0].getsockname()[1]
        local = Address(spec.proto, spec.host, port)
        local_box.append(local)
        self._servers.append((server, local))
        self._stream_local.setdefault((spec.proto, spec.family), local)

    async def close(self) -> None:
        """Close listeners and connections and wait until every socket and task is gone."""
        if self.closed:
            return
        self.closed = True
        for server, _ in self._servers:
            server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for conn in list(self.live):
            conn.close()
        waits = [conn.lost for conn in self.live]
        if waits:
            _, late = await asyncio.wait(waits, timeout=_CLOSE_GRACE)
            if late:  # a peer that does not finish the TLS shutdown or read its data
                for conn in list(self.live):
                    if conn.transport is not None:
                        conn.transport.abort()
                _, late = await asyncio.wait(late, timeout=_CLOSE_GRACE)
                if late:
                    log.warning("%d connections did not close", len(late))
        for group, _ in self._receiver_sockets:
            for receiver in group:
                receiver.close()
        self._receiver_sockets.clear()
        for endpoint in self._udp:
            if endpoint.transport is not None:
                endpoint.transport.close()
        if self._udp:
            await asyncio.gather(*(e.lost for e in self._udp if e.transport is not None))
        for server, _ in self._servers:
            await server.wait_closed()
        # Transports close their sockets in a callback scheduled by close()/abort().
        for _ in range(3):
            await asyncio.sleep(0)

    # ---------------------------------------------------------------- queries

    def local_address(self, proto: str, family: int | None = None) -> Address:
        """The bound address of the first ``proto`` listener (optionally of ``family``)."""
        if proto == "udp":
            for endpoint in self._udp:
                if family is None or _family_of(endpoint.local.host) == family:
                    return endpoint.local
        else:
            for _, local in self._servers:
                if local.proto == proto and (family is None or _family_of(local.host) == family):
                    return local
        raise LookupError(f"no {proto} listener" + ("" if family is None else f" for {family!r}"))

    def receiver_sockets(self) -> list[tuple[list[socket.socket], Address]]:
        """Per UDP listener, the sockets of its receiver processes (``udp_children``)."""
        return list(self._receiver_sockets)

    @property
    def connection_count(self) -> int:
        """Open or opening TCP/TLS connections (what ``max_connections`` limits)."""
        return len(self.counted)

    def connections(self) -> list[Address]:
        """Remote addresses of the connections ``send`` can reuse."""
        return list(self._conns)

    # ---------------------------------------------------------------- sending

    def send(self, data: bytes, dest: Address, *, local: Address | None = None) -> None:
        """Send one message to ``dest`` without waiting.

        UDP leaves from the listening socket (``local`` if given, else the first one of the right
        address family). TCP/TLS use the connection to ``dest`` if there is one, else open one in
        a task and queue ``data`` until it is up. Raises only for programming errors (unknown
        proto, host not an IP literal, not started).
        """
        if dest.proto == "udp":
            endpoint = self._udp_by_local.get(local) if local is not None else None
            host, family = _parse_ip(dest.host)
            if endpoint is None:
                endpoint = self._udp_by_family.get(family)
            if endpoint is None or endpoint.transport is None or self.closed:
                self.report(dest, TransportError(f"no UDP socket to send to {dest}"))
                return
            if len(data) > _MAX_UDP_PAYLOAD:
                self.report(dest, TransportError(f"{len(data)} bytes do not fit a datagram"))
                return
            endpoint.transport.sendto(data, (host, dest.port))
        elif dest.proto in ("tcp", "tls"):
            self._send_stream(data, dest)
        else:
            raise ValueError(f"unknown transport protocol {dest.proto!r}")

    def _send_stream(self, data: bytes, dest: Address) -> None:
        host, family = _parse_ip(dest.host)
        key = dest if host == dest.host else Address(dest.proto, host, dest.port)
        conn = self._conns.get(key)
        if conn is not None:
            if conn.transport is None or not conn.transport.is_closing():
                conn.write(data)
                return
            conn.close()  # asyncio is tearing it down (peer reset): open a new one

        if self.closed:
            self.report(dest, TransportError("transport is closed"))
            return
        if dest.proto == "tls" and self._client_ctx is None:
            self.report(dest, TransportError(f"cannot send to {dest}: no TlsConfig given"))
            return
        if not self.admit(key):
            self.report(dest, TransportError(f"too many connections, not connecting to {dest}"))
            return
        conn = _StreamConn(self, dest.proto, key, self._stream_local.get((dest.proto, family)))
        conn.write(data)
        self.register(conn)
        conn.task = self.spawn(self._connect(conn))

    async def _connect(self, conn: _StreamConn) -> None:
        key = conn.key
        assert key is not None
        ctx = self._client_ctx if key.proto == "tls" else None
        try:
            async with asyncio.timeout(self.connect_timeout):
                await self.loop.create_connection(
                    lambda: conn,
                    key.host,
                    key.port,
                    ssl=ctx,
                    server_hostname=key.host if ctx is not None else None,
                    ssl_handshake_timeout=self.connect_timeout if ctx is not None else None,
                )
        except asyncio.CancelledError:
            conn.fail()
            raise
        except Exception as exc:
            self.stats.connect_failures += 1
            self.log_once(
                ("connect", key), self.loop.time(), "cannot connect to %s: %s", key, _why(exc)
            )
            conn.fail()
            self.report(key, exc)
            return
        self.stats.connected += 1

    # ---------------------------------------------------------------- shared with the protocols

    def deliver(self, data: bytes, source: Address, local: Address) -> None:
        try:
            self.on_message(data, source, local)
        except Exception:
            log.exception("on_message failed for a message from %s", source)

    def report(self, dest: Address, exc: Exception) -> None:
        self.stats.send_errors += 1
        if self.on_send_error is not None:
            self.loop.call_soon(self._call_send_error, dest, exc)

    def _call_send_error(self, dest: Address, exc: Exception) -> None:
        assert self.on_send_error is not None
        try:
            self.on_send_error(dest, exc)
        except Exception:
            log.exception("on_send_error failed for %s", dest)

    def spawn(self, coro: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def admit(self, key: Address) -> bool:
        """Make room for one more connection if needed; False means refuse it."""
        if len(self.counted) < self.max_connections:
            return True
        idle: _StreamConn | None = None
        for conn in self.counted:
            if (
                conn.state is _State.OPEN
                and not conn.is_busy()
                and (idle is None or conn.used < idle.used)
            ):
                idle = conn
        stalled = self._stalled_reader()
        # Whichever has waited longer: a stalled message (slowloris) goes before a peer that
        # just connected or a connection that was used a moment ago.
        victim, what = idle, "idle"
        if (
            stalled is not None
            and stalled.read_started is not None
            and (idle is None or stalled.read_started < idle.last_active)
        ):
            victim, what = stalled, "stalled"
        if victim is None:
            self.stats.refused += 1
            self.log_once(
                "refused",
                self.loop.time(),
                "connection limit (%d) reached, refusing %s",
                self.max_connections,
                key,
            )
            return False
        self.stats.evicted += 1
        self.log_once(
            "evicted",
            self.loop.time(),
            "connection limit (%d) reached, closing %s %s for %s",
            self.max_connections,
            what,
            victim.key,
            key,
        )
        victim.close()
        return True

    def _stalled_reader(self) -> _StreamConn | None:
        """The connection whose incomplete first message started the longest time ago, among
        those that never delivered one and have nothing of ours to write (slowloris peers)."""
        victim: _StreamConn | None = None
        oldest = 0.0
        for conn in self.counted:
            started = conn.read_started
            if (
                started is not None
                and conn.state is _State.OPEN
                and conn.is_stalled_reader()
                and (victim is None or started < oldest)
            ):
                victim, oldest = conn, started
        return victim

    def register(self, conn: _StreamConn) -> None:
        assert conn.key is not None
        self.live.add(conn)
        self.counted.add(conn)
        existing = self._conns.get(conn.key)
        if existing is None or existing.state is _State.CLOSED:
            self._conns[conn.key] = conn

    def forget(self, conn: _StreamConn) -> None:
        self.counted.discard(conn)
        if conn.key is not None and self._conns.get(conn.key) is conn:
            del self._conns[conn.key]


def _family_of(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _why(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


#: What we ask the kernel for; it caps the request at net.core.{r,w}mem_max.
UDP_BUFFER_BYTES = 4 * 1024 * 1024


def is_keepalive(data: bytes) -> bool:
    """A UDP keep-alive (RFC 5626 style CRLF pings, NUL or blanks): dropped, never parsed."""
    return len(data) <= _KEEPALIVE_MAX and not data.strip(b"\r\n\x00 \t")


def _udp_socket(family: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        _grow_udp_buffers(sock)
    except BaseException:
        sock.close()
        raise
    return sock


def _reuseport_group(spec: ListenSpec, size: int) -> list[socket.socket]:
    """``size`` UDP sockets bound to ``spec`` in one SO_REUSEPORT group, in group order.

    The port is first bound without SO_REUSEPORT: if another process (a second pydmq on the same
    port, say) holds it, this fails with "address in use" instead of silently sharing its
    traffic; it also picks the port when ``spec.port`` is 0.
    """
    if not hasattr(socket, "SO_REUSEPORT"):
        raise OSError("udp_children needs SO_REUSEPORT, which this system lacks")
    probe = _udp_socket(spec.family)
    try:
        probe.bind((spec.host, spec.port))
        port = probe.getsockname()[1]
    finally:
        probe.close()
    group: list[socket.socket] = []
    try:
        for _ in range(size):
            sock = _udp_socket(spec.family)
            group.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((spec.host, port))
    except BaseException:
        for sock in group:
            sock.close()
        raise
    return group


def _grow_udp_buffers(sock: socket.socket) -> None:
    """Ask for large UDP buffers, as Kamailio does at start-up: a peer's sync burst (dozens of
    60 KB datagrams at once) overflows the default ~200 KB receive buffer and is dropped."""
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, UDP_BUFFER_BYTES)
        except OSError as exc:  # a restricted kernel: keep the default
            log.debug("cannot set UDP buffer option %s: %s", option, exc)


def install_uvloop() -> bool:
    """Make new event loops uvloop ones when uvloop is importable; return whether it did.

    Everything in pydmq also runs on the stdlib loop, so a missing uvloop is not an error.
    """
    try:
        import uvloop  # noqa: PLC0415 - optional dependency
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


#: Allocations of container objects between two young-generation collections (CPython: 700).
GC_GEN0_THRESHOLD = 50_000


def tune_gc() -> None:
    """Garbage-collector settings for a long-running node; call once, after start-up imports.

    ``gc.freeze()`` moves every object alive now (modules, classes, configuration) out of the
    collector's sight, and a larger young generation makes collections rarer: with CPython's
    defaults a node receiving KDMQ at 10k/s ran a full collection (15-20 ms, the whole heap)
    about every 8,000 requests, ~10 % of the CPU of the worker-queue path and 20 ms stalls
    (bench/hotpath.py, bench/PERFORMANCE.md). Reference cycles are still collected.
    """
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


#: glibc's ``M_MMAP_THRESHOLD`` parameter number for ``mallopt``, and the value we pin it to
#: (its static default).
_M_MMAP_THRESHOLD = -3
MALLOC_MMAP_THRESHOLD = 128 * 1024


def tune_malloc() -> bool:
    """Pin glibc's mmap threshold for a long-running node; return whether it was done.

    glibc raises the threshold each time a large mmapped block is freed (up to 32 MiB), so after
    the first multi-megabyte dict table (the live transactions at thousands of requests a second)
    is resized, later tables come from the heap, leave holes when freed, and are rarely handed
    back: RSS creeps up in steps (bench/soak.py: +11 % in 10 minutes at 2,000 broadcasts/s with
    no live object more). A pinned threshold keeps large blocks mmapped, so freeing one returns
    it at once (the same soak: +0.3 %). ``MALLOC_MMAP_THRESHOLD_`` in the environment wins;
    other C libraries are left alone.
    """
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is not None:
        return False
    try:
        import ctypes  # noqa: PLC0415 - only a node process needs it

        libc = ctypes.CDLL(None)
        mallopt = getattr(libc, "gnu_get_libc_version", None) and getattr(libc, "mallopt", None)
        if mallopt is None:
            return False
        return bool(mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD))
    except OSError:
        return False
