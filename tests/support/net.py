"""Small network helpers for tests: port allocation, bounded polling, raw SIP over UDP/TCP.

Nothing here depends on pydmq, so the helpers can check pydmq and Kamailio alike.
"""

from __future__ import annotations

import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Literal, TypeVar

__all__ = [
    "SipReply",
    "build_request",
    "free_port",
    "parse_reply",
    "tcp_request",
    "udp_options",
    "udp_request",
    "wait_until",
]

T = TypeVar("T")

PortProto = Literal["udp", "tcp", "both"]

# Ports are drawn from below the kernel's ephemeral range (32768-60999 on Linux), so an outgoing
# connection of some other test cannot grab a port between allocation and the bind by the server.
_PORT_LOW = 20000
_PORT_HIGH = 32000
_handed_out: set[int] = set()
_port_lock = threading.Lock()
_rng = random.Random()  # seeded from os.urandom: pytest-xdist workers get different sequences


def _bindable(port: int, kind: socket.SocketKind, host: str) -> bool:
    with socket.socket(socket.AF_INET, kind) as s:
        if kind == socket.SOCK_STREAM:
            # Kamailio and asyncio set SO_REUSEADDR on listeners; do the same so a port in
            # TIME_WAIT from an earlier test counts as free, as it is for them.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(proto: PortProto = "both", host: str = "127.0.0.1") -> int:
    """A port on ``host`` that is currently free for ``proto`` ("udp", "tcp" or "both").

    Never returns the same port twice in one process. The port is not reserved: bind it soon.
    """
    kinds = {
        "udp": (socket.SOCK_DGRAM,),
        "tcp": (socket.SOCK_STREAM,),
        "both": (socket.SOCK_DGRAM, socket.SOCK_STREAM),
    }[proto]
    with _port_lock:
        for _ in range(2000):
            port = _rng.randrange(_PORT_LOW, _PORT_HIGH)
            if port in _handed_out:
                continue
            if all(_bindable(port, kind, host) for kind in kinds):
                _handed_out.add(port)
                return port
    raise RuntimeError(f"no free {proto} port found on {host}")


def wait_until(
    predicate: Callable[[], T | Literal[False] | None],
    *,
    timeout: float,
    interval: float = 0.1,
    what: str = "condition",
    describe: Callable[[], str] | None = None,
) -> T:
    """Poll ``predicate`` until it returns something truthy and return that value.

    Raises ``TimeoutError`` after ``timeout`` seconds; the message includes ``describe()`` (for
    example the last RPC answer) so a failing test says what it saw.
    """
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = predicate()
        except Exception as exc:  # keep polling; report the last error on timeout
            last_exc = exc
            value = None
        if value:
            return value
        if time.monotonic() >= deadline:
            detail = ""
            if describe is not None:
                try:
                    detail = "\n" + describe()
                except Exception as exc:
                    detail = f"\n(describe failed: {exc!r})"
            if last_exc is not None:
                detail += f"\nlast error: {last_exc!r}"
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what}{detail}")
        time.sleep(interval)


# ---------------------------------------------------------------------------------------------
# Raw SIP: enough to poke a server with exact bytes and read the exact reply.


class SipReply:
    """A parsed SIP response: ``code``, ``reason``, ``headers`` (name, value) in order, ``body``."""

    def __init__(
        self, raw: bytes, code: int, reason: str, headers: list[tuple[str, str]], body: bytes
    ) -> None:
        self.raw = raw
        self.code = code
        self.reason = reason
        self.headers = headers
        self.body = body

    def header(self, name: str) -> str | None:
        """First value of header ``name`` (case-insensitive), or None."""
        low = name.lower()
        for key, value in self.headers:
            if key.lower() == low:
                return value
        return None

    def __repr__(self) -> str:
        return f"SipReply({self.code} {self.reason!r}, body={self.body!r})"


def parse_reply(data: bytes) -> SipReply:
    """Parse one SIP response (raises ValueError if ``data`` is not a response)."""
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        raise ValueError(f"no end of headers in {data!r}")
    lines = head.decode("utf-8", "replace").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("SIP/"):
        raise ValueError(f"not a SIP response: {lines[0]!r}")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if line[:1] in (" ", "\t") and headers:  # folded continuation line
            name, value = headers[-1]
            headers[-1] = (name, value + " " + line.strip())
            continue
        name, _, value = line.partition(":")
        headers.append((name.strip(), value.strip()))
    reply = SipReply(data, int(parts[1]), parts[2] if len(parts) > 2 else "", headers, body)
    clen = reply.header("Content-Length") or reply.header("l")
    if clen is not None:
        reply.body = body[: int(clen)]
    return reply


def build_request(
    method: str,
    ruri: str,
    *,
    local: tuple[str, int],
    transport: str = "UDP",
    from_uri: str | None = None,
    to_uri: str | None = None,
    headers: Iterable[tuple[str, str]] = (),
    body: bytes | str = b"",
    call_id: str | None = None,
    cseq: int = 1,
    max_forwards: int | None = 70,
) -> bytes:
    """Build a request with the mandatory headers and a correct Content-Length.

    ``headers`` are appended after the mandatory ones, in order (a Content-Type goes there too).
    """
    host, port = local
    body_b = body.encode() if isinstance(body, str) else body
    branch = "z9hG4bK" + uuid.uuid4().hex[:16]
    lines = [
        f"{method} {ruri} SIP/2.0",
        f"Via: SIP/2.0/{transport.upper()} {host}:{port};branch={branch};rport",
        f"From: <{from_uri or f'sip:test@{host}:{port}'}>;tag={uuid.uuid4().hex[:8]}",
        f"To: <{to_uri or ruri}>",
        f"Call-ID: {call_id or uuid.uuid4().hex + '@' + host}",
        f"CSeq: {cseq} {method}",
    ]
    if max_forwards is not None:
        lines.append(f"Max-Forwards: {max_forwards}")
    lines.extend(f"{name}: {value}" for name, value in headers)
    lines.append(f"Content-Length: {len(body_b)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body_b


def udp_request(
    host: str,
    port: int,
    build: Callable[[tuple[str, int]], bytes],
    *,
    timeout: float = 5.0,
    retransmit: float | None = 0.5,
    final_only: bool = True,
    netns: str | None = None,
) -> SipReply:
    """Send a request over UDP from a fresh socket on 127.0.0.1 and return the (final) reply.

    ``build`` gets the local (host, port) and returns the bytes (e.g. ``lambda local:
    build_request("OPTIONS", uri, local=local)``). The same bytes are retransmitted every
    ``retransmit`` seconds (None: never) until a reply arrives. Provisional replies are skipped
    unless ``final_only`` is False. ``netns``: create the socket inside that network namespace
    (see :mod:`tests.support.netns`), for a server that listens only there.
    """
    if netns is not None:
        from .netns import netns_socket  # noqa: PLC0415 (only the namespace tests need it)

        new_sock = netns_socket(netns, socket.AF_INET, socket.SOCK_DGRAM)
    else:
        new_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with new_sock as sock:
        sock.bind(("127.0.0.1", 0))
        local = sock.getsockname()
        data = build((local[0], local[1]))
        deadline = time.monotonic() + timeout
        sock.sendto(data, (host, port))
        next_send = time.monotonic() + (retransmit or timeout + 1)
        while True:
            now = time.monotonic()
            if now >= deadline:
                raise TimeoutError(f"no SIP reply from {host}:{port} within {timeout}s")
            sock.settimeout(max(0.01, min(deadline, next_send) - now))
            try:
                raw, _ = sock.recvfrom(65535)
            except (TimeoutError, ConnectionRefusedError):
                # ICMP port unreachable surfaces as ConnectionRefusedError: keep trying until the
                # deadline, the server may still be starting.
                if retransmit is not None and time.monotonic() >= next_send:
                    sock.sendto(data, (host, port))
                    next_send = time.monotonic() + retransmit
                continue
            reply = parse_reply(raw)
            if final_only and reply.code < 200:
                continue
            return reply


def tcp_request(
    host: str,
    port: int,
    build: Callable[[tuple[str, int]], bytes],
    *,
    timeout: float = 5.0,
    final_only: bool = True,
) -> SipReply:
    """Like :func:`udp_request` over a fresh TCP connection (framing by Content-Length)."""
    deadline = time.monotonic() + timeout
    with socket.create_connection((host, port), timeout=timeout) as sock:
        local = sock.getsockname()
        sock.sendall(build((local[0], local[1])))
        buf = b""
        while True:
            head_end = buf.find(b"\r\n\r\n")
            if head_end >= 0:
                reply = parse_reply(buf[: head_end + 4])
                clen = int(reply.header("Content-Length") or reply.header("l") or "0")
                total = head_end + 4 + clen
                if len(buf) >= total:
                    reply = parse_reply(buf[:total])
                    buf = buf[total:]
                    if final_only and reply.code < 200:
                        continue
                    return reply
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no SIP reply from {host}:{port} within {timeout}s")
            sock.settimeout(remaining)
            chunk = sock.recv(65535)
            if not chunk:
                raise ConnectionError(f"{host}:{port} closed the connection; got {buf!r}")
            buf += chunk


def udp_options(port: int, *, timeout: float = 3.0) -> int:
    """The status of the final reply to an OPTIONS sent to ``127.0.0.1:port`` over UDP."""
    return udp_request(
        "127.0.0.1",
        port,
        lambda local: build_request("OPTIONS", f"sip:127.0.0.1:{port}", local=local),
        timeout=timeout,
    ).code
