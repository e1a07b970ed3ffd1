"""JSON-RPC listeners: HTTP (like jsonrpcs over xhttp) and a unix datagram socket (like jsonrpcs'
``dgram_socket``). Both hand request bodies to a :class:`~pydmq.rpc.protocol.Dispatcher`.

Neither has authentication: they listen on loopback by default (``rpc.http_address`` is
``127.0.0.1:5080``) and the unix socket file is created with mode 0600.

HTTP (a deliberately small HTTP/1.1 server on asyncio streams):

* ``POST /RPC`` or ``POST /jsonrpc`` (a query string is ignored) with a ``Content-Length`` body of
  at most ``max_body`` bytes (64 KiB); ``Expect: 100-continue`` is honoured. The reply is
  ``200 OK`` with the JSON-RPC reply, or, for a JSON-RPC error, the HTTP status Kamailio uses:
  the fault code itself with the fault message as reason (``500 Method Not Found``), and 400 for
  -32700/-32600.
* Anything else is answered with a JSON-RPC error body whose ``code`` is the HTTP status and whose
  ``message`` is its reason, and the connection is closed: other paths ``404 Not Found``, other
  methods ``405 Method Not Allowed`` (``Allow: POST``), ``Transfer-Encoding`` ``411 Length
  Required``, a bigger body ``413 Payload Too Large`` (not read: the server discards what the
  client still sends for a moment before closing, so that the client sees the reply rather than
  a reset), a header block over ``max_head`` ``431 Request Header Fields Too Large``, a broken
  request line/header ``400 Bad Request``, more than ``max_connections`` clients ``503 Service
  Unavailable``.
* Persistent connections as HTTP/1.1 says (``Connection: close`` and HTTP/1.0 close them). A
  connection is dropped when a request head or body does not arrive within ``timeout`` seconds,
  which is also the keep-alive idle time.

Unix datagram: a request is one datagram of at most ``max_body`` bytes; the reply goes back, as
one datagram, to the address the client's socket is bound to (an unbound client gets nothing,
as with Kamailio). A longer datagram gets a ``413 Payload Too Large`` error. A reply too big
for a datagram is replaced by a ``-32603`` error that says to use HTTP. A stale socket file is
replaced at start, one still in use is not; the file is removed at close.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import platform
import socket
import stat
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from pydmq import __version__
from pydmq.config import RpcSettings
from pydmq.dmq.runtime import DmqNode
from pydmq.rpc.methods import build_methods
from pydmq.rpc.protocol import (
    INTERNAL_ERROR,
    Dispatcher,
    Handler,
    Reply,
    error_body,
    http_status_of,
)

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MAX_BODY",
    "RPC_PATHS",
    "HttpRpcServer",
    "RpcServers",
    "UnixRpcServer",
    "split_hostport",
    "start_rpc",
]

DEFAULT_MAX_BODY = 64 * 1024
DEFAULT_MAX_HEAD = 8 * 1024
DEFAULT_TIMEOUT = 10.0
DEFAULT_MAX_CONNECTIONS = 64
#: Datagrams in progress at once (async methods); more are answered 503 at once.
DEFAULT_MAX_PENDING = 64
RPC_PATHS = frozenset({"/RPC", "/jsonrpc"})
#: After an error reply that closes the connection, unread request bytes are discarded for at
#: most this long / this much before the socket is closed (a close with unread data is a reset).
LINGER_SECONDS = 2.0
LINGER_BYTES = 16 * 1024 * 1024
_SERVER = f"pydmq ({__version__} ({platform.machine().lower() or 'unknown'}/{sys.platform}))"


def split_hostport(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host without brackets, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdecimal():
        raise ValueError(f"not host:port: {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    number = int(port)
    if number > 65535:
        raise ValueError(f"port out of range: {text!r}")
    return host, number


# ---------------------------------------------------------------------------------------------
# HTTP


class _HttpError(Exception):
    def __init__(self, status: int, reason: str, headers: Iterable[tuple[str, str]] = ()) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason
        self.headers = list(headers)


@dataclass(slots=True)
class _Request:
    body: bytes
    keep_alive: bool


def _reason(text: str) -> str:
    clean = "".join(ch for ch in text if " " <= ch <= "~").strip()
    return clean or "Error"


def _response(
    status: int,
    reason: str,
    body: bytes,
    *,
    close: bool,
    headers: Iterable[tuple[str, str]] = (),
) -> bytes:
    lines = [
        f"HTTP/1.1 {status} {_reason(reason)}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        f"Server: {_SERVER}",
    ]
    lines.extend(f"{name}: {value}" for name, value in headers)
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class HttpRpcServer:
    """JSON-RPC over HTTP/1.1 on ``host``:``port`` (``port`` 0: the OS picks one)."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        host: str,
        port: int,
        *,
        max_body: int = DEFAULT_MAX_BODY,
        max_head: int = DEFAULT_MAX_HEAD,
        timeout: float = DEFAULT_TIMEOUT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        self.dispatcher = dispatcher
        self.host = host
        self.port = port
        self.max_body = max_body
        self.max_head = max_head
        self.timeout = timeout
        self.max_connections = max_connections
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[object]] = set()

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) actually bound; valid after :meth:`start`."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("HTTP RPC server is not listening")
        name = self._server.sockets[0].getsockname()
        return str(name[0]), int(name[1])

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._on_connection, self.host, self.port, limit=self.max_head, reuse_address=True
        )
        log.info("JSON-RPC over HTTP on %s:%d", *self.address)

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        tasks = list(self._connections)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        try:
            if len(self._connections) > self.max_connections:
                await self._fail(reader, writer, _HttpError(503, "Service Unavailable"))
                return
            await self._serve(reader, writer)
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError):
            pass
        except Exception:
            log.exception("JSON-RPC HTTP connection failed")
        finally:
            if task is not None:
                self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                request = await self._read_request(reader, writer)
            except _HttpError as exc:
                await self._fail(reader, writer, exc)
                return
            if request is None:
                return
            reply = await self.dispatcher.handle(request.body)
            if reply.ok:
                status, reason = 200, "OK"
            else:
                assert reply.error_code is not None
                status, reason = http_status_of(reply.error_code), reply.error_message
            writer.write(_response(status, reason, reply.body, close=not request.keep_alive))
            await asyncio.wait_for(writer.drain(), self.timeout)
            if not request.keep_alive:
                return

    async def _read_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> _Request | None:
        """The next request; None when the client is gone or idle for ``timeout``."""
        text = ""
        while not text:  # empty lines before a request are skipped (RFC 9112 2.2)
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.timeout)
            except (asyncio.IncompleteReadError, TimeoutError):
                return None
            except asyncio.LimitOverrunError:
                raise _HttpError(431, "Request Header Fields Too Large") from None
            text = head.lstrip(b"\r\n").decode("latin-1")
        lines = text[:-4].split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or parts[2] not in ("HTTP/1.1", "HTTP/1.0"):
            raise _HttpError(400, "Bad Request")
        method, target, version = parts
        headers: dict[str, list[str]] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip() or line[0] in " \t":
                raise _HttpError(400, "Bad Request")
            headers.setdefault(name.lower(), []).append(value.strip())
        tokens = {
            tok.strip().lower() for v in headers.get("connection", []) for tok in v.split(",")
        }
        keep_alive = "close" not in tokens if version == "HTTP/1.1" else "keep-alive" in tokens

        if target.split("?", 1)[0] not in RPC_PATHS:
            raise _HttpError(404, "Not Found")
        if method != "POST":
            raise _HttpError(405, "Method Not Allowed", [("Allow", "POST")])
        if "transfer-encoding" in headers:
            raise _HttpError(411, "Length Required")
        lengths = set(headers.get("content-length", ["0"]))
        length_text = lengths.pop() if len(lengths) == 1 else ""
        if not (length_text.isascii() and length_text.isdigit()):
            raise _HttpError(400, "Bad Request")
        length = int(length_text)
        if length > self.max_body:
            raise _HttpError(413, "Payload Too Large")
        expect = ",".join(headers.get("expect", [])).lower()
        if "100-continue" in expect and version == "HTTP/1.1":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        try:
            body = await asyncio.wait_for(reader.readexactly(length), self.timeout)
        except (asyncio.IncompleteReadError, TimeoutError):
            return None
        return _Request(body, keep_alive)

    async def _fail(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, exc: _HttpError
    ) -> None:
        """Send an error reply, then close without resetting the connection under the client."""
        body = error_body(exc.status, exc.reason)
        writer.write(_response(exc.status, exc.reason, body, close=True, headers=exc.headers))
        try:
            await asyncio.wait_for(writer.drain(), self.timeout)
            if writer.can_write_eof():
                writer.write_eof()
            await asyncio.wait_for(_discard(reader, LINGER_BYTES), LINGER_SECONDS)
        except (TimeoutError, ConnectionError, OSError):
            pass


async def _discard(reader: asyncio.StreamReader, limit: int) -> None:
    total = 0
    while total < limit:
        chunk = await reader.read(65536)
        if not chunk:
            return
        total += len(chunk)


# ---------------------------------------------------------------------------------------------
# Unix datagram


def _remove_stale_socket(path: str) -> None:
    """Delete a socket file nobody listens on; refuse other files and live sockets."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(errno.EEXIST, "exists and is not a socket", path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            pass  # stale: nobody bound to it
        else:
            raise OSError(errno.EADDRINUSE, "socket in use by another process", path)
    os.unlink(path)


class UnixRpcServer:
    """JSON-RPC over a unix datagram socket at ``path`` (file mode ``mode``, default 0600)."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        path: str,
        *,
        max_request: int = DEFAULT_MAX_BODY,
        max_pending: int = DEFAULT_MAX_PENDING,
        mode: int = 0o600,
    ) -> None:
        self.dispatcher = dispatcher
        self.path = path
        self.max_request = max_request
        self.max_pending = max_pending
        self.mode = mode
        self._sock: socket.socket | None = None
        self._inode: int | None = None
        self._pending: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        _remove_stale_socket(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        bound = False
        try:
            sock.setblocking(False)
            old_umask = os.umask(0o177)  # never world-accessible, not even for a moment
            try:
                sock.bind(self.path)
                bound = True
            finally:
                os.umask(old_umask)
            os.chmod(self.path, self.mode)
            with contextlib.suppress(OSError):  # room for big replies (capped by wmem_max)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
            self._inode = os.stat(self.path).st_ino
            loop.add_reader(sock.fileno(), self._on_readable)
        except BaseException:
            sock.close()
            if bound:
                with contextlib.suppress(OSError):
                    os.unlink(self.path)
            raise
        self._sock = sock
        self._loop = loop
        log.info("JSON-RPC over unix datagram socket %s", self.path)

    async def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        if self._loop is not None:
            self._loop.remove_reader(sock.fileno())
        tasks = list(self._pending)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        sock.close()
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)

    def _on_readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        trunc = getattr(socket, "MSG_TRUNC", 0)
        for _ in range(64):  # then let the loop run other work
            try:
                data, _anc, flags, addr = sock.recvmsg(self.max_request)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("JSON-RPC unix socket receive failed: %s", exc)
                return
            if flags & trunc:
                self._send(error_body(413, "Payload Too Large"), addr)
            elif len(self._pending) >= self.max_pending:
                self._send(error_body(503, "Service Unavailable"), addr)
            else:
                task = asyncio.ensure_future(self._serve(data, addr))
                self._pending.add(task)
                task.add_done_callback(self._pending.discard)

    async def _serve(self, data: bytes, addr: object) -> None:
        reply: Reply = await self.dispatcher.handle(data)
        self._send(reply.body, addr)

    def _send(self, body: bytes, addr: object) -> None:
        sock = self._sock
        if sock is None or not isinstance(addr, str | bytes) or not addr:
            log.debug("JSON-RPC unix request from an unbound socket: no reply possible")
            return
        try:
            sock.sendto(body, addr)
        except OSError as exc:
            if exc.errno != errno.EMSGSIZE:
                log.debug("JSON-RPC unix reply to %r lost: %s", addr, exc)
                return
            small = error_body(INTERNAL_ERROR, "Reply too large for a datagram, use HTTP")
            with contextlib.suppress(OSError):
                sock.sendto(small, addr)


# ---------------------------------------------------------------------------------------------
# Both, from settings


class RpcServers:
    """The listeners ``[rpc]`` asks for: HTTP unless ``http_address`` is unset or empty, unix
    datagram when ``unix_socket`` is set."""

    def __init__(self, settings: RpcSettings, dispatcher: Dispatcher) -> None:
        self.settings = settings
        self.dispatcher = dispatcher
        self.http: HttpRpcServer | None = None
        self.unix: UnixRpcServer | None = None

    async def start(self) -> None:
        """Listen; raises ``OSError`` (nothing left open) when a listener cannot be set up."""
        try:
            if self.settings.http_address:
                host, port = split_hostport(self.settings.http_address)
                self.http = HttpRpcServer(self.dispatcher, host, port)
                await self.http.start()
            if self.settings.unix_socket:
                self.unix = UnixRpcServer(self.dispatcher, self.settings.unix_socket)
                await self.unix.start()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        http, unix = self.http, self.unix
        self.http = self.unix = None
        if http is not None:
            await http.close()
        if unix is not None:
            await unix.close()


async def start_rpc(
    node: DmqNode,
    settings: RpcSettings | None = None,
    *,
    extra: Mapping[str, Handler] | None = None,
) -> RpcServers:
    """Serve ``node``'s methods (plus ``extra`` ``{name: handler}``) on the listeners of
    ``settings`` (default: the node's); raises ``OSError``/``ValueError`` if one cannot start."""
    rpc_settings = settings if settings is not None else node.settings.rpc
    servers = RpcServers(rpc_settings, Dispatcher(build_methods(node, extra)))
    await servers.start()
    return servers
