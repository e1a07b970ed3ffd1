"""TransportManager on real sockets (127.0.0.1 and ::1), plus address / listen-spec parsing.

Every scenario waits on events set by callbacks (never on timed sleeps) and checks on the way out
that no task and no socket outlived ``close()``. The scenarios marked ``both_loops`` run
again on uvloop at the end of the module.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import socket
import ssl
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a dependency wherever it builds
    uvloop = None

from pydmq.sip import transport as transport_module
from pydmq.sip.transport import (
    Address,
    ListenSpec,
    TlsConfig,
    TransportError,
    TransportManager,
    install_uvloop,
    server_socket_from_address,
)

pytestmark = pytest.mark.filterwarnings("error::ResourceWarning")

WAIT = 5.0  # safety bound for every await on the network
OK = b"SIP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n"

Scenario = Callable[..., Awaitable[None]]
SCENARIOS: dict[str, Scenario] = {}


def both_loops(fn: Scenario) -> Scenario:
    SCENARIOS[fn.__name__] = fn
    return fn


def kdmq(n: int, body: bytes = b"") -> bytes:
    body = body or f'{{"n":{n}}}'.encode()
    return (
        f"KDMQ sip:htable@127.0.0.1 SIP/2.0\r\n"
        f"Via: SIP/2.0/TCP 127.0.0.1;branch=z9hG4bK{n}\r\n"
        f"Call-ID: {n}@test\r\nCSeq: 10 KDMQ\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


class Inbox:
    """on_message callback that records messages and lets a test await the n-th one."""

    def __init__(self) -> None:
        self.items: list[tuple[bytes, Address, Address]] = []
        self.reply: Callable[[bytes, Address, Address], None] | None = None
        self._changed = asyncio.Event()

    def __call__(self, data: bytes, source: Address, local: Address) -> None:
        self.items.append((data, source, local))
        self._changed.set()
        if self.reply is not None:
            self.reply(data, source, local)

    async def wait(self, n: int) -> list[tuple[bytes, Address, Address]]:
        async with asyncio.timeout(WAIT):
            while len(self.items) < n:
                self._changed.clear()
                await self._changed.wait()
        return self.items[:n]

    @property
    def data(self) -> list[bytes]:
        return [d for d, _, _ in self.items]


class Errors:
    """on_send_error callback with an awaitable first error."""

    def __init__(self) -> None:
        self.items: list[tuple[Address, Exception]] = []
        self._got = asyncio.Event()

    def __call__(self, dest: Address, exc: Exception) -> None:
        self.items.append((dest, exc))
        self._got.set()

    async def first(self) -> tuple[Address, Exception]:
        async with asyncio.timeout(WAIT):
            await self._got.wait()
        return self.items[0]


class LogWaiter(logging.Handler):
    """Collects pydmq.sip.transport records containing ``needle``; wakes a waiter on each."""

    def __init__(self, needle: str) -> None:
        super().__init__(logging.DEBUG)
        self.needle = needle
        self.records: list[logging.LogRecord] = []
        self._got = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.needle in record.getMessage():
            self.records.append(record)
            self._got.set()

    def at(self, level: int) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno == level]

    async def wait(self, n: int = 1) -> list[str]:
        async with asyncio.timeout(WAIT):
            while len(self.records) < n:
                self._got.clear()
                await self._got.wait()
        return [r.getMessage() for r in self.records]


@contextlib.contextmanager
def transport_log(needle: str) -> Any:
    logger = logging.getLogger("pydmq.sip.transport")
    handler = LogWaiter(needle)
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


@contextlib.asynccontextmanager
async def raw_server(
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]] | None = None,
) -> AsyncIterator[int]:
    """A plain asyncio TCP server on 127.0.0.1 that closes every connection on exit."""
    writers: list[asyncio.StreamWriter] = []
    tasks: list[asyncio.Task[None]] = []

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        if handler is not None:
            tasks.append(asyncio.current_task())  # type: ignore[arg-type]
            await handler(reader, writer)

    server = await asyncio.start_server(on_client, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for w in writers:
            w.close()
        for w in writers:
            with contextlib.suppress(ConnectionError):
                await w.wait_closed()
        await server.wait_closed()


def _sockets() -> set[str]:
    """Open socket descriptors (others, like libuv's reserve /dev/null fd, are the loop's)."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith("socket:"):
                found.add(f"{fd} {target}")
    return found


@contextlib.asynccontextmanager
async def no_leaks() -> AsyncIterator[None]:
    """Fail if a task or a socket created inside outlives the block."""
    tasks_before = asyncio.all_tasks()
    sockets_before = _sockets()
    yield
    for _ in range(5):  # let close callbacks that are already scheduled run
        await asyncio.sleep(0)
    leaked_tasks = asyncio.all_tasks() - tasks_before
    assert not leaked_tasks, leaked_tasks
    assert _sockets() - sockets_before == set()


@contextlib.asynccontextmanager
async def manager(
    specs: Iterable[str],
    on_message: Callable[[bytes, Address, Address], None] | None = None,
    **kwargs: Any,
) -> AsyncIterator[TransportManager]:
    mgr = TransportManager(on_message if on_message is not None else Inbox(), **kwargs)
    await mgr.start([ListenSpec.parse(s) for s in specs])
    try:
        yield mgr
    finally:
        await mgr.close()


async def read_exactly(reader: asyncio.StreamReader, n: int) -> bytes:
    async with asyncio.timeout(WAIT):
        return await reader.readexactly(n)


async def read_to_eof(reader: asyncio.StreamReader) -> bytes:
    """Read until the server closes; a reset counts as closed."""
    async with asyncio.timeout(WAIT):
        try:
            return await reader.read()
        except (ConnectionError, ssl.SSLError):
            return b""


async def close_writer(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        await writer.wait_closed()


def free_port(family: int = socket.AF_INET) -> int:
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1" if family == socket.AF_INET else "::1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------------------------------
# certificates
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    name_only_cert: Path
    name_only_key: Path

    def server(self, **kw: Any) -> TlsConfig:
        return TlsConfig(self.server_cert, self.server_key, self.ca, **kw)

    def client(self, **kw: Any) -> TlsConfig:
        return TlsConfig(self.client_cert, self.client_key, self.ca, **kw)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    d = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    other = trustme.CA()
    ca.cert_pem.write_to_path(d / "ca.pem")
    other.cert_pem.write_to_path(d / "other-ca.pem")

    def issue(name: str, *identities: str) -> tuple[Path, Path]:
        cert = ca.issue_cert(*identities)
        with (d / f"{name}.crt").open("wb") as f:
            for pem in cert.cert_chain_pems:
                f.write(pem.bytes())
        cert.private_key_pem.write_to_path(d / f"{name}.key")
        return d / f"{name}.crt", d / f"{name}.key"

    server_cert, server_key = issue("server", "127.0.0.1", "::1", "localhost")
    client_cert, client_key = issue("client", "node-b.example.org", "127.0.0.1")
    name_cert, name_key = issue("name-only", "node-c.example.org")
    return Certs(
        d / "ca.pem",
        server_cert,
        server_key,
        client_cert,
        client_key,
        d / "other-ca.pem",
        name_cert,
        name_key,
    )


# ------------------------------------------------------------------------------------------
# parsing: Address, ListenSpec, server_address
# ------------------------------------------------------------------------------------------


class TestAddress:
    def test_hostport_v4(self) -> None:
        a = Address("udp", "10.0.0.1", 5060)
        assert a.sip_hostport() == "10.0.0.1:5060"
        assert str(a) == "udp:10.0.0.1:5060"

    def test_hostport_v6(self) -> None:
        a = Address("tls", "::1", 5061)
        assert a.sip_hostport() == "[::1]:5061"
        assert str(a) == "tls:[::1]:5061"

    def test_hashable_and_frozen(self) -> None:
        a = Address("tcp", "::1", 1)
        assert {a: 1}[Address("tcp", "::1", 1)] == 1
        with pytest.raises(AttributeError):
            a.port = 2  # type: ignore[misc]


class TestListenSpecParse:
    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("udp:10.0.0.20:5060", ("udp", "10.0.0.20", 5060)),
            ("tcp:10.0.0.20:5070", ("tcp", "10.0.0.20", 5070)),
            ("tls:10.0.0.20:5061", ("tls", "10.0.0.20", 5061)),
            ("udp:10.0.0.20", ("udp", "10.0.0.20", 5060)),
            ("tcp:10.0.0.20", ("tcp", "10.0.0.20", 5060)),
            ("tls:10.0.0.20", ("tls", "10.0.0.20", 5061)),
            ("UDP:127.0.0.1:0", ("udp", "127.0.0.1", 0)),
            ("udp:[::1]:5060", ("udp", "::1", 5060)),
            ("tls:[::1]", ("tls", "::1", 5061)),
            ("tcp:[2001:DB8:0:0::1]:5080", ("tcp", "2001:db8::1", 5080)),
            ("udp:0.0.0.0:5060", ("udp", "0.0.0.0", 5060)),
            ("udp:[::]:65535", ("udp", "::", 65535)),
            ("  udp:10.0.0.1:5060\n", ("udp", "10.0.0.1", 5060)),
        ],
    )
    def test_valid(self, text: str, expected: tuple[str, str, int]) -> None:
        spec = ListenSpec.parse(text)
        assert (spec.proto, spec.host, spec.port) == expected

    @pytest.mark.parametrize(
        ("text", "why"),
        [
            ("10.0.0.1:5060", "not one of udp, tcp, tls"),
            ("10.0.0.1", "expected proto:host"),
            ("sctp:10.0.0.1:5060", "'sctp' is not one of"),
            ("ws:10.0.0.1:80", "'ws' is not one of"),
            ("udp:", "missing host"),
            ("udp::5060", "missing host"),
            ("udp:[]:5060", "missing host"),
            ("udp:::1:5060", "in brackets"),
            ("udp:[::1:5060", "unterminated"),
            ("udp:[::1]5060", "unexpected '5060'"),
            ("udp:[10.0.0.1]:5060", "only IPv6"),
            ("udp:node1.example.org:5060", "'node1.example.org' is not an IP address"),
            ("udp:eth0", "is not an IP address"),
            ("udp:10.0.0.1:", "bad port ''"),
            ("udp:10.0.0.1:50x", "bad port '50x'"),
            ("udp:10.0.0.1:-1", "bad port"),
            ("udp:10.0.0.1:65536", "port 65536 out of range"),
            ("udp:10.0.0.1:123456", "bad port"),
            ("udp:10.0.0.256:5060", "is not an IP address"),
        ],
    )
    def test_invalid(self, text: str, why: str) -> None:
        with pytest.raises(ValueError, match="bad listen socket") as info:
            ListenSpec.parse(text)
        assert why in str(info.value)
        assert repr(text) in str(info.value)

    def test_str_round_trips(self) -> None:
        for text in ("udp:10.0.0.1:5060", "tls:[::1]:5061"):
            assert str(ListenSpec.parse(text)) == text
            assert ListenSpec.parse(str(ListenSpec.parse(text))) == ListenSpec.parse(text)


class TestFromServerAddress:
    @pytest.mark.parametrize(
        ("address", "socket_str", "spec"),
        [
            # the two examples of the module documentation (section 3.1)
            ("sip:10.0.0.20:5060", "udp:10.0.0.20:5060", ("udp", "10.0.0.20", 5060)),
            (
                "sip:10.0.0.20:5061;transport=tls",
                "tls:10.0.0.20:5061",
                ("tls", "10.0.0.20", 5061),
            ),
            ("sip:10.0.0.20:5070;transport=tcp", "tcp:10.0.0.20:5070", ("tcp", "10.0.0.20", 5070)),
            ("sip:10.0.0.20:5060;transport=udp", "udp:10.0.0.20:5060", ("udp", "10.0.0.20", 5060)),
            ("sip:10.0.0.20;transport=TCP", "tcp:10.0.0.20", ("tcp", "10.0.0.20", 5060)),
            ("sip:10.0.0.20", "udp:10.0.0.20", ("udp", "10.0.0.20", 5060)),
            ("sips:10.0.0.20", "tls:10.0.0.20", ("tls", "10.0.0.20", 5061)),
            ("sips:10.0.0.20:5081", "tls:10.0.0.20:5081", ("tls", "10.0.0.20", 5081)),
            ("sip:[::1]:5060", "udp:[::1]:5060", ("udp", "::1", 5060)),
            ("sip:[::1];transport=tls", "tls:[::1]", ("tls", "::1", 5061)),
            ("sip:dmq@10.0.0.20:5060;lr", "udp:10.0.0.20:5060", ("udp", "10.0.0.20", 5060)),
            # the port string is copied as written
            ("sip:10.0.0.20:05060", "udp:10.0.0.20:05060", ("udp", "10.0.0.20", 5060)),
        ],
    )
    def test_valid(self, address: str, socket_str: str, spec: tuple[str, str, int]) -> None:
        assert server_socket_from_address(address) == socket_str
        s = ListenSpec.from_server_address(address)
        assert (s.proto, s.host, s.port) == spec

    @pytest.mark.parametrize(
        ("address", "why"),
        [
            ("10.0.0.20:5060", "scheme"),
            ("http://10.0.0.20", "unsupported scheme"),
            ("sip:", "empty host"),
            ("sip:10.0.0.20:x", "bad port"),
            ("sip:10.0.0.20;transport=sctp", "transport 'sctp' is not supported"),
            ("sip:10.0.0.20;transport=ws", "transport 'ws' is not supported"),
            ("sip:10.0.0.20;transport=tsl", "transport 'tsl' is not supported"),
            ("sip:10.0.0.20;transport=", "empty transport"),
            ("sip:10.0.0.20;transport", "empty transport"),
            ("sip:node1.example.org:5060", "not an IP address"),
        ],
    )
    def test_invalid(self, address: str, why: str) -> None:
        with pytest.raises(ValueError, match=why) as info:
            ListenSpec.from_server_address(address)
        assert repr(address) in str(info.value)


# ------------------------------------------------------------------------------------------
# UDP
# ------------------------------------------------------------------------------------------


@both_loops
async def test_udp_both_directions_from_the_listening_port() -> None:
    async with no_leaks():
        a_in, b_in = Inbox(), Inbox()
        async with (
            manager(["udp:127.0.0.1:0"], a_in) as a,
            manager(["udp:127.0.0.1:0"], b_in) as b,
        ):
            a_addr, b_addr = a.local_address("udp"), b.local_address("udp")
            assert a_addr.port != 0 and b_addr.port != 0
            b_in.reply = lambda data, source, local: b.send(b"re:" + data, source)
            a.send(kdmq(1), b_addr)
            [(data, source, local)] = await b_in.wait(1)
            assert data == kdmq(1)
            assert source == a_addr  # same source port as the listening socket
            assert local == b_addr
            [(data, source, local)] = await a_in.wait(1)
            assert data == b"re:" + kdmq(1)
            assert source == b_addr
            assert local == a_addr


@both_loops
async def test_udp_many_datagrams_and_keepalives_dropped() -> None:
    async with no_leaks():
        inbox = Inbox()
        async with manager(["udp:127.0.0.1:0"], inbox) as mgr:
            dest = mgr.local_address("udp")
            loop = asyncio.get_running_loop()
            transport, _ = await loop.create_datagram_endpoint(
                asyncio.DatagramProtocol, remote_addr=(dest.host, dest.port)
            )
            try:
                for i in range(50):
                    transport.sendto(b"\r\n\r\n")
                    transport.sendto(kdmq(i))
                await inbox.wait(50)
                assert inbox.data == [kdmq(i) for i in range(50)]
            finally:
                transport.close()


async def test_udp_oversize_datagram_dropped() -> None:
    async with no_leaks():
        inbox = Inbox()
        async with manager(["udp:127.0.0.1:0"], inbox, max_size=1000) as mgr:
            dest = mgr.local_address("udp")
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.sendto(kdmq(1, b"x" * 2000), (dest.host, dest.port))
                s.sendto(kdmq(2), (dest.host, dest.port))
            await inbox.wait(1)
            assert inbox.data == [kdmq(2)]
            assert mgr.stats.udp_dropped == 1


async def test_udp_send_without_matching_family_is_reported() -> None:
    async with no_leaks():
        errors = Errors()
        async with manager(["udp:127.0.0.1:0"], on_send_error=errors) as mgr:
            mgr.send(b"x", Address("udp", "::1", 5060))
            assert errors.items == []  # never reported from inside send()
            dest, exc = await errors.first()
            assert dest == Address("udp", "::1", 5060)
            assert isinstance(exc, TransportError)


async def test_on_message_exception_does_not_break_the_socket() -> None:
    async with no_leaks():
        inbox = Inbox()
        boom = kdmq(0, b"boom")

        def flaky(data: bytes, source: Address, local: Address) -> None:
            if data == boom:
                raise RuntimeError("boom")
            inbox(data, source, local)

        async with (
            manager(["udp:127.0.0.1:0", "tcp:127.0.0.1:0"]) as a,
            manager(["udp:127.0.0.1:0", "tcp:127.0.0.1:0"], flaky) as b,
        ):
            for i, proto in enumerate(("udp", "tcp")):
                a.send(boom, b.local_address(proto))
                a.send(kdmq(i), b.local_address(proto))
                await inbox.wait(i + 1)
            assert inbox.data == [kdmq(0), kdmq(1)]
            assert b.stats.accepted == 1 and b.connection_count == 1


async def test_send_rejects_programming_errors() -> None:
    async with no_leaks(), manager(["udp:127.0.0.1:0"]) as mgr:
        with pytest.raises(ValueError, match="unknown transport"):
            mgr.send(b"x", Address("sctp", "127.0.0.1", 5060))
        with pytest.raises(ValueError, match="not an IP address"):
            mgr.send(b"x", Address("udp", "localhost", 5060))
        with pytest.raises(LookupError):
            mgr.local_address("tls")


async def test_send_before_start_raises() -> None:
    mgr = TransportManager(Inbox())
    with pytest.raises(RuntimeError, match="start"):
        mgr.send(b"x", Address("tcp", "127.0.0.1", 5060))


# ------------------------------------------------------------------------------------------
# TCP
# ------------------------------------------------------------------------------------------


@both_loops
async def test_tcp_messages_split_at_every_byte_boundary() -> None:
    async with no_leaks():
        inbox = Inbox()
        async with manager(["tcp:127.0.0.1:0"], inbox) as mgr:
            dest = mgr.local_address("tcp")
            _reader, writer = await asyncio.open_connection(dest.host, dest.port)
            m = kdmq(7, b'{"action":1,"htname":"t","cname":"k","type":0,"strval":"v"}')
            for i in range(1, len(m)):
                writer.write(m[:i])
                await writer.drain()
                writer.write(m[i:])
                await writer.drain()
            await inbox.wait(len(m) - 1)
            assert inbox.data == [m] * (len(m) - 1)
            assert mgr.stats.accepted == 1
            await close_writer(writer)


@both_loops
async def test_tcp_several_messages_in_one_segment_and_ping() -> None:
    async with no_leaks():
        inbox = Inbox()
        async with manager(["tcp:127.0.0.1:0"], inbox) as mgr:
            dest = mgr.local_address("tcp")
            reader, writer = await asyncio.open_connection(dest.host, dest.port)
            writer.write(b"\r\n\r\n" + kdmq(1) + kdmq(2) + b"\r\n" + kdmq(3, b"a" * 5000))
            assert await read_exactly(reader, 2) == b"\r\n"  # RFC 5626 pong
            await inbox.wait(3)
            assert inbox.data == [kdmq(1), kdmq(2), kdmq(3, b"a" * 5000)]
            (_, source, local) = inbox.items[0]
            assert source == Address("tcp", "127.0.0.1", writer.get_extra_info("sockname")[1])
            assert local == dest
            await close_writer(writer)


@both_loops
async def test_tcp_reply_goes_back_over_the_inbound_connection() -> None:
    async with no_leaks():
        inbox = Inbox()
        async with manager(["tcp:127.0.0.1:0"], inbox) as mgr:
            inbox.reply = lambda data, source, local: mgr.send(OK, source)
            dest = mgr.local_address("tcp")
            reader, writer = await asyncio.open_connection(dest.host, dest.port)
            writer.write(kdmq(1))
            assert await read_exactly(reader, len(OK)) == OK
            writer.write(kdmq(2))
            assert await read_exactly(reader, len(OK)) == OK
            assert mgr.stats.connected == 0  # no outbound connection was opened
            assert mgr.connection_count == 1
            await close_writer(writer)


@both_loops
async def test_tcp_connection_reused_both_ways() -> None:
    async with no_leaks():
        a_in, b_in = Inbox(), Inbox()
        async with (
            manager(["tcp:127.0.0.1:0"], a_in) as a,
            manager(["tcp:127.0.0.1:0"], b_in) as b,
        ):
            b_in.reply = lambda data, source, local: b.send(b"re:" + data, source)
            b_addr = b.local_address("tcp")
            a.send(kdmq(1), b_addr)
            a.send(kdmq(2), b_addr)  # queued while the connection is being opened
            await b_in.wait(2)
            await a_in.wait(2)
            a.send(kdmq(3), b_addr)  # on the established connection
            await b_in.wait(3)
            await a_in.wait(3)
            assert b_in.data == [kdmq(1), kdmq(2), kdmq(3)]
            assert a_in.data == [b"re:" + kdmq(i) for i in (1, 2, 3)]
            assert len({source for _, source, _ in b_in.items}) == 1  # one client port
            assert {source for _, source, _ in a_in.items} == {b_addr}
            assert {local for _, _, local in a_in.items} == {a.local_address("tcp")}
            assert (a.stats.connected, a.stats.accepted) == (1, 0)
            assert (b.stats.connected, b.stats.accepted) == (0, 1)
            assert a.connections() == [b_addr]
            assert a.connection_count == b.connection_count == 1


async def test_tcp_connect_failure_is_reported_once() -> None:
    async with no_leaks():
        errors = Errors()
        async with manager(["tcp:127.0.0.1:0"], on_send_error=errors) as mgr:
            dest = Address("tcp", "127.0.0.1", free_port())
            mgr.send(kdmq(1), dest)
            mgr.send(kdmq(2), dest)  # joins the same pending connection
            got_dest, exc = await errors.first()
            assert got_dest == dest
            assert isinstance(exc, ConnectionRefusedError)
            assert mgr.stats.connect_failures == 1
            assert mgr.connection_count == 0
            assert mgr.connections() == []


@both_loops
async def test_tcp_idle_inbound_connection_closed() -> None:
    async with no_leaks():
        inbox = Inbox()
        async with manager(["tcp:127.0.0.1:0"], inbox, tcp_idle_timeout=0.2) as mgr:
            dest = mgr.local_address("tcp")
            reader, writer = await asyncio.open_connection(dest.host, dest.port)
            writer.write(kdmq(1))
            await inbox.wait(1)
            assert await read_to_eof(reader) == b""
            assert mgr.stats.idle_closed == 1
            assert mgr.connection_count == 0
            await close_writer(writer)


async def test_tcp_idle_outbound_connection_closed_then_reopened() -> None:
    async with no_leaks():
        received: list[bytes] = []
        eof = asyncio.Event()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            received.append(await reader.read())  # until pydmq closes its idle connection
            eof.set()

        async with (
            raw_server(handle) as port,
            manager(["tcp:127.0.0.1:0"], tcp_idle_timeout=0.2) as mgr,
        ):
            dest = Address("tcp", "127.0.0.1", port)
            for i in range(2):
                eof.clear()
                mgr.send(kdmq(i), dest)
                assert mgr.connections() == [dest]
                async with asyncio.timeout(WAIT):
                    await eof.wait()
                assert mgr.stats.idle_closed == i + 1
                assert mgr.connections() == []
            assert received == [kdmq(0), kdmq(1)]
            assert mgr.stats.connected == 2


@both_loops
async def test_tcp_oversize_message_closes_only_that_connection() -> None:
    async with no_leaks():
        inbox = Inbox()
        with transport_log("closing") as logs:
            async with manager(["tcp:127.0.0.1:0"], inbox, max_size=4096) as mgr:
                dest = mgr.local_address("tcp")
                r1, w1 = await asyncio.open_connection(dest.host, dest.port)
                _r2, w2 = await asyncio.open_connection(dest.host, dest.port)
                w1.write(b"KDMQ sip:a@b SIP/2.0\r\nContent-Length: 100000\r\n\r\n")
                assert await read_to_eof(r1) == b""
                assert mgr.stats.parse_errors == 1
                [line] = await logs.wait(1)
                assert "Message too large" in line
                assert logs.records[0].levelno == logging.WARNING
                w2.write(kdmq(2))  # the server and other connections are fine
                await inbox.wait(1)
                _r3, w3 = await asyncio.open_connection(dest.host, dest.port)
                w3.write(kdmq(3))
                await inbox.wait(2)
                assert inbox.data == [kdmq(2), kdmq(3)]
                for w in (w1, w2, w3):
                    await close_writer(w)


async def test_tcp_header_flood_closes_connection() -> None:
    async with no_leaks(), manager(["tcp:127.0.0.1:0"], max_headers_bytes=1024) as mgr:
        dest = mgr.local_address("tcp")
        reader, writer = await asyncio.open_connection(dest.host, dest.port)
        writer.write(b"X" * 2048)
        assert await read_to_eof(reader) == b""
        assert mgr.stats.parse_errors == 1
        await close_writer(writer)


@both_loops
async def test_connection_limit_evicts_the_oldest_idle() -> None:
    async with no_leaks():
        inbox = Inbox()
        async with manager(["tcp:127.0.0.1:0"], inbox, max_connections=2) as mgr:
            dest = mgr.local_address("tcp")
            clients = []
            for i in range(3):
                reader, writer = await asyncio.open_connection(dest.host, dest.port)
                writer.write(kdmq(i))
                await inbox.wait(i + 1)
                clients.append((reader, writer))
            assert await read_to_eof(clients[0][0]) == b""  # the oldest idle one went
            assert mgr.stats.evicted == 1
            assert mgr.connection_count == 2
            clients[1][1].write(kdmq(10))
            clients[2][1].write(kdmq(11))
            await inbox.wait(5)
            for _, w in clients:
                await close_writer(w)


async def test_connection_limit_refuses_when_all_busy() -> None:
    async with no_leaks():
        inbox = Inbox()
        async with manager(["tcp:127.0.0.1:0"], inbox, max_connections=1) as mgr:
            dest = mgr.local_address("tcp")
            _r1, w1 = await asyncio.open_connection(dest.host, dest.port)
            # One whole message plus half of the next: when the first is delivered the
            # connection holds a partial message, so it is busy and must not be evicted.
            w1.write(kdmq(1) + kdmq(2)[:20])
            await inbox.wait(1)
            r2, w2 = await asyncio.open_connection(dest.host, dest.port)
            assert await read_to_eof(r2) == b""
            assert mgr.stats.refused == 1
            w1.write(kdmq(2)[20:])
            await inbox.wait(2)
            assert inbox.data == [kdmq(1), kdmq(2)]
            await close_writer(w1)
            await close_writer(w2)


async def test_outbound_refused_at_connection_limit(certs: Certs) -> None:
    async with no_leaks():
        errors = Errors()
        async with (
            raw_server() as port,  # accepts TCP but never answers the TLS handshake
            manager(
                ["tcp:127.0.0.1:0"],
                tls=certs.client(),
                max_connections=1,
                connect_timeout=WAIT * 2,
                on_send_error=errors,
            ) as mgr,
        ):
            mgr.send(kdmq(1), Address("tls", "127.0.0.1", port))  # stuck in the handshake
            mgr.send(kdmq(2), Address("tcp", "127.0.0.1", port))
            dest, exc = await errors.first()
            assert dest == Address("tcp", "127.0.0.1", port)
            assert isinstance(exc, TransportError)
            assert "too many connections" in str(exc)
            assert mgr.stats.refused == 1
            assert mgr.connection_count == 1


async def test_write_buffer_is_bounded() -> None:
    async with no_leaks():
        errors = Errors()
        first = asyncio.Event()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readexactly(len(kdmq(0)))
            first.set()  # ...and never read again

        async with (
            raw_server(handle) as port,
            manager(["tcp:127.0.0.1:0"], max_write_buffer=256 * 1024, on_send_error=errors) as mgr,
        ):
            dest = Address("tcp", "127.0.0.1", port)
            mgr.send(kdmq(0), dest)
            async with asyncio.timeout(WAIT):
                await first.wait()
            chunk = kdmq(1, b"x" * 65536)
            for _ in range(2000):  # up to 128 MiB: far beyond any socket buffer
                mgr.send(chunk, dest)
                if errors.items or mgr.stats.send_errors:
                    break
            got_dest, exc = await errors.first()
            assert got_dest == dest
            assert "write buffer full" in str(exc)
            assert mgr.connections() == []  # the stuck connection was dropped


async def test_close_does_not_hang_on_a_peer_that_stops_reading(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(transport_module, "_CLOSE_GRACE", 0.05)
    async with no_leaks():
        first = asyncio.Event()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readexactly(len(kdmq(0)))
            first.set()

        async with raw_server(handle) as port:
            mgr = TransportManager(Inbox(), max_write_buffer=1 << 30)
            await mgr.start([ListenSpec.parse("tcp:127.0.0.1:0")])
            dest = Address("tcp", "127.0.0.1", port)
            mgr.send(kdmq(0), dest)
            async with asyncio.timeout(WAIT):
                await first.wait()
            for _ in range(300):  # ~20 MiB, more than the kernel buffers hold
                mgr.send(kdmq(1, b"x" * 65536), dest)
            async with asyncio.timeout(WAIT):
                await mgr.close()  # waits the grace period, then aborts


async def test_close_is_idempotent_and_send_after_close_reported() -> None:
    async with no_leaks():
        errors = Errors()
        mgr = TransportManager(Inbox(), on_send_error=errors)
        await mgr.start([ListenSpec.parse("tcp:127.0.0.1:0"), ListenSpec.parse("udp:127.0.0.1:0")])
        await mgr.close()
        await mgr.close()
        mgr.send(b"x", Address("tcp", "127.0.0.1", 5060))
        mgr.send(b"x", Address("udp", "127.0.0.1", 5060))
        await errors.first()
        assert len(errors.items) == 2


async def test_start_failure_closes_what_was_opened() -> None:
    async with no_leaks():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
            busy.bind(("127.0.0.1", 0))
            port = busy.getsockname()[1]
            mgr = TransportManager(Inbox())
            with pytest.raises(OSError):
                await mgr.start(
                    [ListenSpec.parse("tcp:127.0.0.1:0"), ListenSpec.parse(f"udp:127.0.0.1:{port}")]
                )


async def test_tls_listener_needs_config() -> None:
    async with no_leaks():
        mgr = TransportManager(Inbox())
        with pytest.raises(ValueError, match="no TlsConfig"):
            await mgr.start([ListenSpec.parse("tls:127.0.0.1:0")])


# ------------------------------------------------------------------------------------------
# TLS
# ------------------------------------------------------------------------------------------


@both_loops
async def test_tls_request_and_reply(certs: Certs) -> None:
    async with no_leaks():
        a_in, b_in = Inbox(), Inbox()
        async with (
            manager(["tls:127.0.0.1:0"], a_in, tls=certs.client()) as a,
            manager(["tls:127.0.0.1:0"], b_in, tls=certs.server()) as b,
        ):
            b_in.reply = lambda data, source, local: b.send(b"re:" + data, source)
            b_addr = b.local_address("tls")
            a.send(kdmq(1), b_addr)
            a.send(kdmq(2, b"z" * 20000), b_addr)
            await b_in.wait(2)
            await a_in.wait(2)
            assert b_in.data == [kdmq(1), kdmq(2, b"z" * 20000)]
            assert a_in.data == [b"re:" + kdmq(1), b"re:" + kdmq(2, b"z" * 20000)]
            assert a_in.items[0][1] == b_addr
            assert b_in.items[0][2] == b_addr
            assert (a.stats.connected, b.stats.accepted) == (1, 1)
            assert a.connection_count == b.connection_count == 1


async def test_tls_hostname_check(certs: Certs) -> None:
    async with no_leaks():
        inbox = Inbox()
        errors = Errors()
        async with (
            manager(["tls:127.0.0.1:0"], inbox, tls=certs.server()) as good,
            manager(
                ["tls:127.0.0.1:0"],
                tls=TlsConfig(certs.name_only_cert, certs.name_only_key, certs.ca),
            ) as bad,
            manager(
                ["tls:127.0.0.1:0"],
                tls=certs.client(server_hostname_check=True),
                on_send_error=errors,
            ) as client,
        ):
            client.send(kdmq(1), good.local_address("tls"))  # certificate names 127.0.0.1
            await inbox.wait(1)
            client.send(kdmq(2), bad.local_address("tls"))  # certificate names a DNS name
            dest, exc = await errors.first()
            assert dest == bad.local_address("tls")
            assert isinstance(exc, ssl.SSLCertVerificationError)


async def test_tls_unknown_server_ca_is_reported(certs: Certs) -> None:
    async with no_leaks():
        errors = Errors()
        untrusting = TlsConfig(certs.client_cert, certs.client_key, certs.other_ca)
        async with (
            manager(["tls:127.0.0.1:0"], tls=certs.server()) as server,
            manager(["tls:127.0.0.1:0"], tls=untrusting, on_send_error=errors) as client,
        ):
            client.send(kdmq(1), server.local_address("tls"))
            _, exc = await errors.first()
            assert isinstance(exc, ssl.SSLCertVerificationError)
            assert client.stats.connect_failures == 1


async def test_tls_without_server_verification(certs: Certs) -> None:
    async with no_leaks():
        inbox = Inbox()
        lax = TlsConfig(certs.client_cert, certs.client_key, certs.other_ca, verify_server=False)
        async with (
            manager(["tls:127.0.0.1:0"], inbox, tls=certs.server()) as server,
            manager(["tls:127.0.0.1:0"], tls=lax) as client,
        ):
            client.send(kdmq(1), server.local_address("tls"))
            await inbox.wait(1)


@both_loops
async def test_mutual_tls(certs: Certs) -> None:
    async with no_leaks():
        inbox = Inbox()
        with transport_log("TLS handshake") as logs:
            async with (
                manager(["tls:127.0.0.1:0"], inbox, tls=certs.server(verify_client=True)) as b,
                manager(["tls:127.0.0.1:0"], tls=certs.client(verify_client=True)) as a,
            ):
                dest = b.local_address("tls")
                # a CA-signed client certificate is accepted
                a.send(kdmq(1), dest)
                await inbox.wait(1)
                assert b.stats.accepted == 1

                # a client without a certificate is rejected, twice, logged once
                no_cert = ssl.create_default_context(cafile=str(certs.ca))
                no_cert.check_hostname = False
                for _ in range(2):
                    try:
                        async with asyncio.timeout(WAIT):
                            reader, writer = await asyncio.open_connection(
                                dest.host, dest.port, ssl=no_cert
                            )
                    except (ssl.SSLError, ConnectionError):
                        pass
                    else:  # TLS 1.3: the client learns of the rejection on its first read
                        writer.write(kdmq(99))
                        assert await read_to_eof(reader) == b""
                        await close_writer(writer)
                await logs.wait(2)
                assert b.stats.tls_handshake_failures == 2
                [line] = logs.at(logging.WARNING)  # the repeat is only logged at debug level
                assert len(logs.at(logging.DEBUG)) == 1
                assert "TLS handshake with tls:127.0.0.1:" in line
                assert "certificate" in line.lower()
                assert b.connection_count == 1

                # the server still serves: the existing connection and a new one
                a.send(kdmq(2), dest)
                async with manager(["tls:127.0.0.1:0"], tls=certs.client(verify_client=True)) as c:
                    c.send(kdmq(3), dest)
                    await inbox.wait(3)
                assert sorted(inbox.data) == sorted([kdmq(1), kdmq(2), kdmq(3)])
                assert inbox.items[0][2] == dest


async def test_tls_handshake_timeout(certs: Certs) -> None:
    async with no_leaks():
        with transport_log("TLS handshake") as logs:
            async with manager(["tls:127.0.0.1:0"], tls=certs.server(), connect_timeout=0.2) as mgr:
                dest = mgr.local_address("tls")
                # plain TCP that never sends a ClientHello holds a slot until the timeout
                reader, writer = await asyncio.open_connection(dest.host, dest.port)
                assert await read_to_eof(reader) == b""
                [line] = await logs.wait(1)
                assert "timed out" in line
                assert mgr.stats.tls_handshake_failures == 1
                assert mgr.connection_count == 0
                await close_writer(writer)


# ------------------------------------------------------------------------------------------
# IPv6
# ------------------------------------------------------------------------------------------


def _require_ipv6_loopback() -> None:
    assert socket.has_ipv6, "Python was built without IPv6 support"
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
    except OSError as exc:  # pragma: no cover - environment problem, reported loudly
        pytest.fail(f"cannot bind [::1] on this host: {exc}")


@both_loops
async def test_ipv6_udp_and_tcp(certs: Certs) -> None:
    _require_ipv6_loopback()
    async with no_leaks():
        specs = ["udp:[::1]:0", "tcp:[::1]:0", "tls:[::1]:0", "udp:127.0.0.1:0"]
        a_in, b_in = Inbox(), Inbox()
        async with (
            manager(specs, a_in, tls=certs.client()) as a,
            manager(specs, b_in, tls=certs.server()) as b,
        ):
            b_in.reply = lambda data, source, local: b.send(b"re:" + data, source, local=local)
            for i, proto in enumerate(("udp", "tcp", "tls")):
                dest = b.local_address(proto, socket.AF_INET6)
                assert dest.host == "::1"
                a.send(kdmq(i), dest)
                [*_, (data, source, local)] = await b_in.wait(i + 1)
                assert data == kdmq(i)
                assert source.host == "::1" and local == dest
                [*_, (data, source, _)] = await a_in.wait(i + 1)
                assert data == b"re:" + kdmq(i)
                assert source == dest
            # UDP goes out of the socket of the destination's address family
            assert b_in.items[0][1] == a.local_address("udp", socket.AF_INET6)
            a.send(kdmq(9), b.local_address("udp", socket.AF_INET))
            [*_, (_, source, _)] = await b_in.wait(4)
            assert source == a.local_address("udp", socket.AF_INET)


async def test_ipv6_send_accepts_bracketed_or_expanded_hosts() -> None:
    _require_ipv6_loopback()
    async with no_leaks():
        inbox = Inbox()
        async with (
            manager(["tcp:[::1]:0"]) as a,
            manager(["tcp:[::1]:0"], inbox) as b,
        ):
            port = b.local_address("tcp").port
            a.send(kdmq(1), Address("tcp", "0:0:0:0:0:0:0:1", port))
            a.send(kdmq(2), Address("tcp", "[::1]", port))
            await inbox.wait(2)
            assert a.connections() == [Address("tcp", "::1", port)]
            assert a.stats.connected == 1


# ------------------------------------------------------------------------------------------
# event loops
# ------------------------------------------------------------------------------------------


needs_uvloop = pytest.mark.skipif(uvloop is None, reason="uvloop is not installed")


@needs_uvloop
def test_install_uvloop() -> None:
    old = asyncio.get_event_loop_policy()
    try:
        assert install_uvloop() is True
        assert isinstance(asyncio.get_event_loop_policy(), uvloop.EventLoopPolicy)
        loop = asyncio.new_event_loop()
        try:
            assert isinstance(loop, uvloop.Loop)
        finally:
            loop.close()
    finally:
        asyncio.set_event_loop_policy(old)


def test_install_uvloop_without_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    old = asyncio.get_event_loop_policy()
    monkeypatch.setitem(sys.modules, "uvloop", None)  # makes `import uvloop` fail
    assert install_uvloop() is False
    assert asyncio.get_event_loop_policy() is old


@needs_uvloop
@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_on_uvloop(name: str, certs: Certs) -> None:
    """The same scenarios on uvloop, whose transports and TLS are separate implementations."""
    scenario = SCENARIOS[name]
    kwargs = {"certs": certs} if "certs" in inspect.signature(scenario).parameters else {}
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert isinstance(runner.get_loop(), uvloop.Loop)
        runner.run(scenario(**kwargs))
