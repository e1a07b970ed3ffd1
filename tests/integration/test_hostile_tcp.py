"""Hostile TCP input is bounded: oversize, truncated and slowloris input against a DMQ node.

A node listening on TCP (``server_address ...;transport=tcp``) with a short
``[sip] tcp_msg_read_timeout`` (1 s here, 10 s by default) and a small ``tcp_max_connections``,
and beside it, in the same event loop, a UDP node. Checked:

* a message over ``max_message_size`` (declared by Content-Length, or a header block that never
  ends) closes the connection at once, counted as a parse error, and nothing is handed up;
* a truncated message followed by a close is harmless: no reply, no leaked connection;
* slowloris, many connections each trickling one header byte every 0.5 s: every one of them is
  closed once its message has taken ``tcp_msg_read_timeout``, the connection count never goes
  over ``tcp_max_connections`` (at the cap the most stalled one makes room for a new peer), and
  throughout a legitimate OPTIONS over a new TCP connection and over UDP is answered;
* the timeout is not a false positive: a message sent in two halves 0.3 s apart, or a stream of
  messages split across reads, arrives intact;
* the same for a body trickled after a complete header block.

The clients are plain sockets in threads (``asyncio.to_thread``), so the node's loop does only
the node's work.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from pydmq.config import SipSettings
from pydmq.dmq.runtime import DmqNode
from tests.support.cluster import Cluster
from tests.support.net import build_request, tcp_request, udp_request

pytestmark = pytest.mark.timeout(60)

READ_TIMEOUT = 1.0
MAX_CONNECTIONS = 40


async def _tcp_node(cluster: Cluster, **sip: object) -> DmqNode:
    options = {"tcp_msg_read_timeout": READ_TIMEOUT, "tcp_max_connections": MAX_CONNECTIONS}
    options.update(sip)
    return await cluster.start(transport="tcp", sip=options)


def _port(node: DmqNode) -> int:
    return node.endpoint.local_address(node.endpoint.specs[0].proto).port


def _options(transport: str, port: int) -> object:
    def build(local: tuple[str, int]) -> bytes:
        suffix = ";transport=tcp" if transport == "TCP" else ""
        return build_request(
            "OPTIONS", f"sip:ping@127.0.0.1:{port}{suffix}", local=local, transport=transport
        )

    return build


#: The legitimate probes' own threads: the default executor could be busy with other clients.
_PROBES = ThreadPoolExecutor(max_workers=2, thread_name_prefix="probe")


async def _tcp_ok(port: int) -> float:
    """One OPTIONS over a new TCP connection; the seconds the 200 took."""
    t0 = time.monotonic()
    reply = await asyncio.get_running_loop().run_in_executor(
        _PROBES, lambda: tcp_request("127.0.0.1", port, _options("TCP", port), timeout=2.0)
    )
    assert reply.code == 200, reply
    return time.monotonic() - t0


async def _udp_ok(port: int) -> float:
    t0 = time.monotonic()
    reply = await asyncio.get_running_loop().run_in_executor(
        _PROBES,
        lambda: udp_request("127.0.0.1", port, _options("UDP", port), timeout=2.0, retransmit=None),
    )
    assert reply.code == 200, reply
    return time.monotonic() - t0


def _closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """Whether the node closes ``sock`` within ``timeout`` (EOF or reset), reading anything."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        sock.settimeout(remaining)
        try:
            if not sock.recv(65536):
                return True
        except TimeoutError:
            return False
        except OSError:  # ECONNRESET
            return True


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=2.0)


def _head(port: int, extra: str = "", content_length: int | None = 0) -> bytes:
    lines = [
        f"OPTIONS sip:ping@127.0.0.1:{port};transport=tcp SIP/2.0",
        "Via: SIP/2.0/TCP 127.0.0.1:9;branch=z9hG4bKhostile" + extra,
        "From: <sip:x@127.0.0.1:9>;tag=1",
        f"To: <sip:ping@127.0.0.1:{port}>",
        "Call-ID: hostile-" + extra,
        "CSeq: 1 OPTIONS",
        "Max-Forwards: 70",
    ]
    if content_length is not None:
        lines.append(f"Content-Length: {content_length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def _wait(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


# ------------------------------------------------------------------------------------ settings


def test_read_timeout_defaults_and_settings() -> None:
    assert SipSettings().tcp_msg_read_timeout == 10.0
    assert SipSettings().tcp_max_connections == 2048


async def test_settings_reach_the_transport(cluster: Cluster) -> None:
    node = await _tcp_node(cluster, tcp_msg_read_timeout=2.5, tcp_max_connections=7)
    transport = node.endpoint.transport
    assert (transport.read_timeout, transport.max_connections) == (2.5, 7)


# ------------------------------------------------------------------------------------ oversize


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(lambda port: _head(port, "a", 70000), id="content-length-over-limit"),
        pytest.param(lambda port: _head(port, "b", 70000) + b"x" * 70000, id="giant-message"),
        pytest.param(
            lambda port: _head(port, "c")[:-4] + b"\r\nX-Big: " + b"y" * 20000, id="endless-head"
        ),
    ],
)
async def test_oversize_message_closes_the_connection(cluster: Cluster, payload: object) -> None:
    node = await _tcp_node(cluster)
    port = _port(node)
    stats = node.endpoint.transport.stats
    received = node.endpoint.stats.received

    def attack() -> bool:
        with _connect(port) as sock:
            with contextlib.suppress(OSError):  # the node may reset while we still send
                sock.sendall(payload(port))  # type: ignore[operator]
            return _closed_by_peer(sock, 2.0)

    assert await asyncio.to_thread(attack), "the node kept the connection open"
    assert stats.parse_errors == 1
    assert node.endpoint.stats.received == received, "part of the oversize message went up"
    await _wait(lambda: node.endpoint.transport.connection_count == 0, 2, "the close")
    await _tcp_ok(port)


# ------------------------------------------------------------------------------------ truncated


async def test_truncated_message_then_close_is_harmless(cluster: Cluster) -> None:
    node = await _tcp_node(cluster)
    port = _port(node)
    received = node.endpoint.stats.received
    whole = _head(port, "t", 10) + b"0123456789"

    def truncated(cut: int) -> bytes:
        with _connect(port) as sock:
            sock.sendall(whole[:cut])
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(2.0)
            data = b""
            with contextlib.suppress(OSError):
                while chunk := sock.recv(65536):
                    data += chunk
            return data

    for cut in (1, 40, len(whole) // 2, len(whole) - 14, len(whole) - 1):
        assert await asyncio.to_thread(truncated, cut) == b"", f"a reply to {cut} bytes"
    assert node.endpoint.stats.received == received
    await _wait(lambda: not node.endpoint.transport.live, 2, "every connection released")
    assert node.endpoint.transport.stats.parse_errors == 0
    await _tcp_ok(port)


# ------------------------------------------------------------------------------------ slowloris


class Slowloris:
    """``n`` threads, each connecting and sending one header byte every 0.5 s until the node
    closes the connection, then connecting again; ``sessions`` holds how long each lasted."""

    def __init__(self, port: int, n: int) -> None:
        self.port = port
        self.stop = threading.Event()
        self.sessions: list[float] = []
        self.threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(n)
        ]

    def _run(self, i: int) -> None:
        data = _head(self.port, f"s{i}")
        while not self.stop.is_set():
            try:
                sock = _connect(self.port)
            except OSError:
                time.sleep(0.05)
                continue
            with sock:
                t0 = time.monotonic()
                for byte in data[:-1]:  # never the last byte: the message never completes
                    if self.stop.is_set():
                        return
                    try:
                        sock.sendall(bytes([byte]))
                    except OSError:
                        break
                    if _closed_by_peer(sock, 0.5):
                        break
                self.sessions.append(time.monotonic() - t0)
            time.sleep(0.05)

    def __enter__(self) -> Slowloris:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(5)


async def _probe_while(
    seconds: float, tcp_port: int, udp_port: int, transport: object
) -> tuple[list[float], int]:
    """Legit OPTIONS over new TCP connections and over UDP for ``seconds``: their latencies,
    and the most TCP connections the node held at once meanwhile."""
    peak = 0
    done = asyncio.Event()

    async def watch() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, transport.connection_count)  # type: ignore[attr-defined]
            await asyncio.sleep(0.01)

    watcher = asyncio.create_task(watch())
    latencies: list[float] = []
    try:
        t_end = time.monotonic() + seconds
        while time.monotonic() < t_end:
            latencies.append(await _tcp_ok(tcp_port))
            latencies.append(await _udp_ok(udp_port))
            await asyncio.sleep(0.1)
    finally:
        done.set()
        await watcher
    return latencies, peak


async def test_slowloris_is_closed_by_the_read_timeout(cluster: Cluster) -> None:
    node = await _tcp_node(cluster)
    udp = await cluster.start()
    transport = node.endpoint.transport
    attackers = MAX_CONNECTIONS // 2  # under the cap: only the read timeout stops them
    with Slowloris(_port(node), attackers) as attack:
        latencies, peak = await _probe_while(
            2 * READ_TIMEOUT + 0.8, _port(node), _port(udp), transport
        )
        sessions = list(attack.sessions)
    assert len(sessions) >= attackers, f"only {len(sessions)} slowloris sessions ended"
    # Closed one read timeout after the first byte (the idle timeout is 120 s).
    assert min(sessions) > READ_TIMEOUT - 0.1 and max(sessions) < READ_TIMEOUT + 0.8, sessions
    assert transport.stats.read_timeouts >= attackers, transport.stats
    assert transport.stats.evicted == 0, transport.stats
    assert peak <= attackers + 1
    assert max(latencies) < 1.0, f"slowest legit OPTIONS {max(latencies):.2f}s"
    await _wait(lambda: transport.connection_count == 0, 3, "every slowloris connection gone")


async def test_slowloris_over_the_connection_cap_is_bounded(cluster: Cluster) -> None:
    node = await _tcp_node(cluster)
    udp = await cluster.start()
    transport = node.endpoint.transport
    with Slowloris(_port(node), MAX_CONNECTIONS + 20) as attack:
        latencies, peak = await _probe_while(2.5, _port(node), _port(udp), transport)
        sessions = list(attack.sessions)
    assert peak <= MAX_CONNECTIONS, f"{peak} connections at once"
    assert sessions and max(sessions) < READ_TIMEOUT + 0.8, sorted(sessions)[-5:]
    stats = transport.stats
    assert stats.evicted > 0, stats  # the cap was reached: stalled connections made room
    assert stats.refused == 0, stats  # so a legitimate peer always got in
    assert max(latencies) < 1.0, f"slowest legit OPTIONS {max(latencies):.2f}s"
    await _wait(lambda: transport.connection_count == 0, 3, "every slowloris connection gone")


async def test_trickled_body_is_bounded_too(cluster: Cluster) -> None:
    node = await _tcp_node(cluster)
    port = _port(node)

    def attack() -> float:
        with _connect(port) as sock:
            sock.sendall(_head(port, "body", 1000))
            t0 = time.monotonic()
            for _ in range(20):
                with contextlib.suppress(OSError):
                    sock.sendall(b"x")
                if _closed_by_peer(sock, 0.3):
                    return time.monotonic() - t0
            return float("inf")

    took = await asyncio.to_thread(attack)
    assert took < READ_TIMEOUT + 0.7, f"closed after {took:.2f}s"
    assert node.endpoint.transport.stats.read_timeouts == 1


async def test_slow_but_steady_senders_are_not_cut(cluster: Cluster) -> None:
    node = await _tcp_node(cluster)
    port = _port(node)

    def halves() -> int:
        """Two halves 0.3 s apart (under the timeout), then a stream split across reads for
        longer than the timeout: every message completes, so none is cut."""
        answers = 0
        with _connect(port) as sock:
            first = _head(port, "h1")
            sock.sendall(first[:50])
            time.sleep(0.3)
            sock.sendall(first[50:])
            stream = b"".join(_head(port, f"h{i}") for i in range(2, 12))
            step = len(stream) // 10 + 7  # cuts fall inside messages
            for i in range(0, len(stream), step):
                sock.sendall(stream[i : i + step])
                time.sleep(READ_TIMEOUT / 5)
            sock.settimeout(2.0)
            data = b""
            while data.count(b"SIP/2.0 200 ") < 11:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
            answers = data.count(b"SIP/2.0 200 ")
        return answers

    assert await asyncio.to_thread(halves) == 11
    assert node.endpoint.transport.stats.read_timeouts == 0
