"""UDP receiver processes: Kamailio's ``children`` for the stateless part of the traffic.

One Python process tops out at about one core, and much of a DMQ node's UDP traffic needs no
state: an OPTIONS ping, a KDMQ for a channel nobody registered, a malformed datagram. With
``[sip] udp_children = N`` each UDP listener becomes a ``SO_REUSEPORT`` group of N + 1 sockets:
one per receiver process, then the main process's own. A classic BPF program on the group
(:mod:`pydmq.sip.steering`) sends responses and KDMQ requests for registered channels straight
to the main process, in arrival order, and spreads the rest over the receivers, which answer
what :class:`StatelessRules` lets them answer and forward anything else, unparsed, to the main
process over a private ``socketpair``.

Pieces, from the inside out:

* :class:`StatelessFront` decides what to do with one datagram: plain code, no I/O, so the rules
  are tested without processes, and it must give the bytes the main process would have sent;
* :class:`Board` is a small shared memory page (``memfd``): the main process publishes the
  registered R-URI users (channels) there under a sequence lock, each receiver its counters;
* :func:`serve` is a receiver's blocking loop (``python -m pydmq.sip.prefork``);
* :class:`PreforkSupervisor` runs in the main process: it starts the receivers, keeps the
  steering program and the board current, reads what receivers forward, restarts one that dies
  and stops them all.

Order: what the main process reads from its own socket keeps the arrival order, so KDMQ on
registered channels from one sender are handled in order, unlike Kamailio's children. Only a
KDMQ the program does not recognise (an unusual spelling of the R-URI) takes the receivers'
path and may overtake or be overtaken.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import mmap
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Final

from pydmq.sip import steering
from pydmq.sip.access import SourceFilter
from pydmq.sip.endpoint import stateless_reply
from pydmq.sip.errors import SipParseError
from pydmq.sip.memo import remember
from pydmq.sip.message import (
    BadRequestError,
    Limits,
    Request,
    parse_message,
    validate_request,
    validate_response,
)
from pydmq.sip.transport import SOURCE_CACHE_MAX, Address, is_keepalive

log = logging.getLogger(__name__)

__all__ = [
    "COUNTERS",
    "Board",
    "PreforkSupervisor",
    "StatelessFront",
    "StatelessRules",
    "serve",
]

# -- the rules --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StatelessRules:
    """What a receiver answers itself. Everything else is forwarded to the main process.

    The defaults are pydmq's route without a script: OPTIONS → 200, ``KDMQ`` for an R-URI user
    (channel) nobody registered → 404 ``User Not Found``, other methods → 404. With a routing
    script (``forward_all``) only what no route can see is answered here: unparsable input
    (dropped, or 400 when a reply can be built) and sources outside ``allowed_sources`` (403).
    """

    forward_all: bool = False
    options: tuple[int, str] | None = (200, "OK")
    #: Requests of this method go to the main process when their R-URI user is registered.
    user_method: str = "KDMQ"
    unknown_user: tuple[int, str] = (404, "User Not Found")
    other_methods: tuple[int, str] | None = (404, "Not Found")
    #: CIDR networks allowed to send requests; empty: everyone.
    allowed_sources: tuple[str, ...] = ()
    forbidden: tuple[int, str] = (403, "Forbidden")
    user_agent: str = "pydmq"
    to_tag: str = "0"
    max_size: int = 65535
    max_headers: int = 100
    max_line: int = 8192

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> StatelessRules:
        raw = json.loads(text)
        for key in ("options", "unknown_user", "other_methods", "forbidden", "allowed_sources"):
            if isinstance(raw.get(key), list):
                raw[key] = tuple(raw[key])
        return cls(**raw)


#: The counters each receiver keeps on the board, in slot order.
COUNTERS: Final = (
    "received",  # datagrams read
    "forwarded",  # handed to the main process
    "answered",  # stateless replies sent
    "options",  # of which 200 to OPTIONS
    "unknown_user",  # of which 404 for an unregistered channel
    "forbidden",  # of which 403 (allowed_sources)
    "bad_requests",  # of which 400 (malformed but answerable)
    "dropped_unparsable",  # input that could not be answered
    "oversize",  # datagrams above max_size
    "send_errors",  # replies the kernel refused
)
_SLOTS: Final = 16


# -- one datagram -----------------------------------------------------------------------------

FORWARD: Final = 1
DROP: Final = 0
#: ``(reply bytes, destination, counter name)``, FORWARD or DROP.
Outcome = tuple[bytes, Address, str] | int


class StatelessFront:
    """Decides, for one datagram, between a stateless reply, forwarding and dropping.

    ``users`` returns the registered R-URI users, or ``None`` when they are not known (then
    every ``user_method`` request is forwarded). Mirrors what the main process does with the
    same input (``SipEndpoint._on_message`` and the DMQ default route).
    """

    def __init__(self, rules: StatelessRules, users: Callable[[], frozenset[str] | None]) -> None:
        self.rules = rules
        self.limits = Limits(rules.max_size, rules.max_headers, rules.max_line)
        self._users = users
        self._sources = SourceFilter(rules.allowed_sources or ("0.0.0.0/0", "::/0"))

    def handle(self, data: bytes, source: Address) -> Outcome:
        rules = self.rules
        try:
            msg = parse_message(data, self.limits)
            if not isinstance(msg, Request):
                validate_response(msg)  # a broken one is dropped here, as the main would
                return FORWARD
            validate_request(msg)
        except BadRequestError as exc:
            return self._bad_request(exc, source)
        except SipParseError:
            return DROP
        method = msg.method
        if method == "ACK":
            return DROP  # the main process ignores every ACK (non-INVITE transactions only)
        if not self._sources.allows(source.host):
            return self._reply(msg, rules.forbidden, source, "forbidden")
        if rules.forward_all:
            return FORWARD
        if method == rules.user_method:
            try:
                user = msg.ruri.user
            except SipParseError:
                return FORWARD  # the main process answers 400 with its own reason
            users = self._users()
            if not user or users is None or user in users:
                return FORWARD
            return self._reply(msg, rules.unknown_user, source, "unknown_user")
        if method == "OPTIONS" and rules.options is not None:
            return self._reply(msg, rules.options, source, "options")
        if rules.other_methods is not None:
            return self._reply(msg, rules.other_methods, source, "answered")
        return FORWARD

    def _reply(
        self, req: Request, answer: tuple[int, str], source: Address, counter: str
    ) -> Outcome:
        rules = self.rules
        data, dest = stateless_reply(req, *answer, source, rules.user_agent, rules.to_tag)
        return data, dest, counter

    def _bad_request(self, exc: BadRequestError, source: Address) -> Outcome:
        req = exc.request
        if req.method == "ACK":
            return DROP
        try:
            return self._reply(req, (400, exc.reason), source, "bad_requests")
        except (SipParseError, ValueError):
            return DROP


# -- the shared board -------------------------------------------------------------------------

_SEQ = struct.Struct("=Q")
_LEN = struct.Struct("=I")
_USERS_AT: Final = 16
_USERS_MAX: Final = 64 * 1024
_COUNTERS_AT: Final = _USERS_AT + _USERS_MAX
_CHILD_BYTES: Final = _SLOTS * 8
_TOO_MANY: Final = 0xFFFFFFFF


class Board:
    """Shared memory between the main process (one writer of the users) and its receivers.

    Users are published under a sequence lock: the sequence is odd while the main process writes,
    and a reader that sees it change retries, so a receiver never acts on half a list. A receiver
    checks only the sequence per request (one 8-byte read) and re-reads the list when it moved.
    """

    def __init__(self, fd: int, children: int) -> None:
        self.fd = fd
        self.children = children
        self.size = _COUNTERS_AT + max(children, 1) * _CHILD_BYTES
        if os.fstat(fd).st_size < self.size:
            os.ftruncate(fd, self.size)
        self.mm = mmap.mmap(fd, self.size)
        self._seen = -1
        self._users: frozenset[str] | None = None

    @classmethod
    def create(cls, children: int) -> Board:
        return cls(os.memfd_create("pydmq-udp-children", os.MFD_CLOEXEC), children)

    def close(self) -> None:
        self.mm.close()
        os.close(self.fd)

    # users: written by the main process
    def publish_users(self, users: Sequence[str]) -> None:
        data = "\n".join(sorted(users)).encode()
        seq = _SEQ.unpack_from(self.mm, 0)[0]
        _SEQ.pack_into(self.mm, 0, seq + 1)  # odd: being written
        if len(data) > _USERS_MAX:
            _LEN.pack_into(self.mm, 8, _TOO_MANY)
        else:
            _LEN.pack_into(self.mm, 8, len(data))
            self.mm[_USERS_AT : _USERS_AT + len(data)] = data
        _SEQ.pack_into(self.mm, 0, seq + 2)

    # users: read by receivers
    def users(self) -> frozenset[str] | None:
        """The published users; ``None`` before the first publication or when they do not fit."""
        mm = self.mm
        seq = _SEQ.unpack_from(mm, 0)[0]
        if seq == self._seen:
            return self._users
        for _ in range(1000):  # the writer holds the lock for microseconds
            if seq & 1 == 0:
                n = _LEN.unpack_from(mm, 8)[0]
                data = None if n == _TOO_MANY else bytes(mm[_USERS_AT : _USERS_AT + n])
                again = _SEQ.unpack_from(mm, 0)[0]
                if again == seq:
                    users = None
                    if seq and data is not None:
                        users = frozenset(data.decode().split("\n")) if data else frozenset()
                    self._seen, self._users = seq, users
                    return users
                seq = again
            else:
                time.sleep(0)
                seq = _SEQ.unpack_from(mm, 0)[0]
        return None  # never settled: forward, the main process knows

    # counters
    def write_counters(self, index: int, values: Sequence[int]) -> None:
        struct.pack_into(f"={len(values)}Q", self.mm, _COUNTERS_AT + index * _CHILD_BYTES, *values)

    def read_counters(self, index: int) -> list[int]:
        at = _COUNTERS_AT + index * _CHILD_BYTES
        return list(struct.unpack_from(f"={len(COUNTERS)}Q", self.mm, at))

    def totals(self) -> dict[str, int]:
        """Every receiver's counters added up (a restarted receiver continues its own)."""
        sums = [0] * len(COUNTERS)
        for index in range(self.children):
            for i, v in enumerate(self.read_counters(index)):
                sums[i] += v
        return dict(zip(COUNTERS, sums, strict=True))


# -- the receiver process ---------------------------------------------------------------------

#: A forwarded datagram is ``b"<source ip> <source port>\n"`` followed by the datagram.
#: Receivers announce themselves with ``b"READY <index>\n"`` once their loop runs.
_READY: Final = b"READY "
_FLUSH_EVERY: Final = 0.25  # seconds between two counter writes on the board
_IDLE_CHECK: Final = 1.0  # seconds of silence after which a receiver checks its parent


def _die_with_parent() -> None:
    """Linux: be sent SIGTERM when the main process dies, so no receiver answers OPTIONS for a
    node that is gone (``prctl(PR_SET_PDEATHSIG)``)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def serve(
    sock: socket.socket,
    forward: socket.socket,
    board: Board,
    index: int,
    rules: StatelessRules,
    parent: int,
) -> None:
    """Read ``sock`` until the parent goes away; blocking, one datagram at a time."""
    front = StatelessFront(rules, board.users)
    handle = front.handle
    counts = dict.fromkeys(COUNTERS, 0)
    for name, value in zip(COUNTERS, board.read_counters(index), strict=True):
        counts[name] = value  # a restarted receiver goes on counting where it stopped
    recvfrom, sendto, send_up = sock.recvfrom, sock.sendto, forward.send
    # (ip, port) -> the Address and the head a forwarded datagram of that source carries.
    sources: dict[tuple[str, int], tuple[Address, bytes]] = {}
    max_size = rules.max_size
    clock = time.monotonic
    flush_at = clock() + _FLUSH_EVERY
    # A kernel receive timeout on the blocking socket: settimeout() would poll() before every
    # read. On expiry recvfrom raises BlockingIOError (EAGAIN).
    seconds = int(_IDLE_CHECK)
    micros = int((_IDLE_CHECK - seconds) * 1e6)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", seconds, micros))
    send_up(_READY + str(index).encode() + b"\n")
    while True:
        try:
            data, addr = recvfrom(65536)
        except BlockingIOError:  # idle for _IDLE_CHECK seconds
            if os.getppid() != parent:
                return
            board.write_counters(index, list(counts.values()))
            continue
        except InterruptedError:
            continue
        counts["received"] += 1
        if len(data) > max_size:
            counts["oversize"] += 1
        elif is_keepalive(data):
            pass
        else:
            key = addr[:2]
            known = sources.get(key)
            if known is None:
                known = (Address("udp", key[0], key[1]), f"{key[0]} {key[1]}\n".encode())
                remember(sources, key, known, SOURCE_CACHE_MAX)
            source, head = known
            try:
                outcome = handle(data, source)
            except Exception:  # a bug must not take the receiver down: let the main decide
                log.exception("receiver %d: datagram from %s", index, source)
                outcome = FORWARD
            if outcome == FORWARD:
                send_up(head + data)
                counts["forwarded"] += 1
            elif outcome == DROP:
                counts["dropped_unparsable"] += 1
            else:
                reply, dest, counter = outcome  # type: ignore[misc]
                try:
                    sendto(reply, (dest.host, dest.port))
                except OSError as exc:
                    counts["send_errors"] += 1
                    log.debug("receiver %d: cannot reply to %s: %s", index, dest, exc)
                else:
                    counts["answered"] += 1
                    if counter != "answered":
                        counts[counter] += 1
        now = clock()
        if now >= flush_at:
            flush_at = now + _FLUSH_EVERY
            board.write_counters(index, list(counts.values()))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pydmq.sip.prefork <json>``: what :class:`PreforkSupervisor` starts."""
    args = json.loads((argv if argv is not None else sys.argv[1:])[0])
    logging.basicConfig(
        level=args.get("log_level", "INFO"),
        format=f"%(asctime)s %(levelname)s udp-child-{args['index']} %(name)s: %(message)s",
    )
    _die_with_parent()
    parent = int(args["parent"])
    if os.getppid() != parent:
        return 0  # the parent died while we started
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the group: the main stops us
    sock = socket.socket(fileno=int(args["udp_fd"]))
    forward = socket.socket(fileno=int(args["forward_fd"]))
    sock.setblocking(True)
    forward.setblocking(True)
    board = Board(int(args["board_fd"]), int(args["children"]))
    rules = StatelessRules.from_json(args["rules"])
    # BrokenPipe / ConnectionRefused: the main process is gone or going.
    with contextlib.suppress(BrokenPipeError, ConnectionRefusedError, KeyboardInterrupt):
        serve(sock, forward, board, int(args["index"]), rules, parent)
    return 0


# -- the main process's side ------------------------------------------------------------------

OnMessage = Callable[[bytes, Address, Address], None]
_RESTART_DELAY: Final = 1.0
_WATCH_EVERY: Final = 0.5
_READY_TIMEOUT: Final = 15.0
_DRAIN_BATCH: Final = 256
_UNIX_BUFFER: Final = 4 * 1024 * 1024


def _child_env() -> dict[str, str]:
    """Our environment, with the directory this pydmq was imported from first on PYTHONPATH:
    a receiver must run the same code as the node, installed or not (a source checkout)."""
    root = str(Path(__file__).resolve().parents[2])
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": root + (os.pathsep + path if path else "")}


@dataclass(slots=True)
class _Child:
    index: int
    sock: socket.socket
    forward_fd: int
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    ready: asyncio.Future[None] | None = None


@dataclass(slots=True)
class _Channel:
    """One UDP socket's forwarding pipe: receivers write one end, the main process reads."""

    local: Address
    ours: socket.socket
    theirs: socket.socket
    sources: dict[bytes, Address] = field(default_factory=dict)


class PreforkSupervisor:
    """Runs one receiver process per receiver socket and feeds what they forward to
    ``on_message``; keeps the steering program (:mod:`pydmq.sip.steering`) up to date.

    ``groups`` holds, per UDP listener, the receiver sockets of its SO_REUSEPORT group (the main
    process's own socket comes last in the group). A receiver that exits is restarted after a
    second (logged); :meth:`stop` ends them all (SIGTERM, then SIGKILL after a grace period).
    """

    def __init__(
        self,
        groups: Sequence[tuple[Sequence[socket.socket], Address]],
        rules: StatelessRules,
        on_message: OnMessage,
        *,
        log_level: str = "INFO",
    ) -> None:
        if not groups or not all(socks for socks, _ in groups):
            raise ValueError("no receiver sockets")
        self.rules = rules
        self.on_message = on_message
        self.log_level = log_level
        self.board = Board.create(sum(len(socks) for socks, _ in groups))
        self._groups = [(list(socks), local) for socks, local in groups]
        self._channels: list[_Channel] = []
        self._children: list[_Child] = []
        self._steering_warned = False
        for socks, local in self._groups:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
            for s in (ours, theirs):
                for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                    with contextlib.suppress(OSError):  # a restricted kernel: defaults
                        s.setsockopt(socket.SOL_SOCKET, option, _UNIX_BUFFER)
            ours.setblocking(False)
            self._channels.append(_Channel(local, ours, theirs))
            for sock in socks:
                index = len(self._children)
                self._children.append(_Child(index, sock, theirs.fileno()))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watch: asyncio.TimerHandle | None = None
        self._stopping = False
        self._stopped = False

    # lifecycle
    async def start(self) -> None:
        """Start every receiver and wait until each reads its socket (raises on failure)."""
        loop = self._loop = asyncio.get_running_loop()
        for channel in self._channels:
            loop.add_reader(channel.ours.fileno(), self._drain, channel)
        for child in self._children:
            self._spawn(child)
        problem = f"not ready after {_READY_TIMEOUT:g} s"
        deadline = loop.time() + _READY_TIMEOUT
        while loop.time() < deadline:
            waits = [c.ready for c in self._children if c.ready is not None and not c.ready.done()]
            if not waits:
                self._watch = loop.call_later(_WATCH_EVERY, self._check)
                return
            dead = [c for c in self._children if c.proc is not None and c.proc.poll() is not None]
            if dead:
                problem = f"receiver {dead[0].index} exited with {dead[0].proc.returncode}"  # type: ignore[union-attr]
                break
            await asyncio.wait(waits, timeout=0.05)
        await self.stop()
        raise RuntimeError(f"UDP receiver processes did not start: {problem}")

    async def stop(self) -> None:
        """End every receiver and release the pipes and the board; a second call does nothing."""
        if self._stopped:
            return
        self._stopped = True
        self._stopping = True
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        procs = [c.proc for c in self._children if c.proc is not None]
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 2.0
        for proc in procs:
            while proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if self._loop is not None:
            for channel in self._channels:
                self._loop.remove_reader(channel.ours.fileno())
        for channel in self._channels:
            channel.ours.close()
            channel.theirs.close()
        self.board.close()

    # state
    def publish_users(self, users: Sequence[str]) -> None:
        """Tell the kernel and the receivers which channels the main process serves: from the
        moment this returns, none of them is answered 404 by a receiver."""
        self.board.publish_users(users)
        for socks, local in self._groups:
            program = steering.build_program(users, len(socks))
            try:
                steering.attach(socks[0], program)
            except OSError as exc:
                if not self._steering_warned:
                    self._steering_warned = True
                    log.warning(
                        "UDP %s: no steering program (%s); datagrams are spread by source "
                        "address, and receivers forward what is not theirs",
                        local,
                        exc,
                    )

    def counters(self) -> dict[str, int]:
        return self.board.totals()

    def pids(self) -> list[int]:
        return [c.proc.pid for c in self._children if c.proc is not None]

    @property
    def restarts(self) -> int:
        return sum(c.restarts for c in self._children)

    # internals
    def _spawn(self, child: _Child) -> None:
        assert self._loop is not None
        child.ready = self._loop.create_future()
        args = {
            "index": child.index,
            "children": len(self._children),
            "parent": os.getpid(),
            "udp_fd": child.sock.fileno(),
            "forward_fd": child.forward_fd,
            "board_fd": self.board.fd,
            "rules": self.rules.to_json(),
            "log_level": self.log_level,
        }
        child.proc = subprocess.Popen(
            [sys.executable, "-m", "pydmq.sip.prefork", json.dumps(args)],
            pass_fds=(child.sock.fileno(), child.forward_fd, self.board.fd),
            stdin=subprocess.DEVNULL,
            env=_child_env(),
        )

    def _check(self) -> None:
        """Restart receivers that exited (bounded: once per child per check)."""
        if self._stopping or self._loop is None:
            return
        for child in self._children:
            proc = child.proc
            if proc is not None and proc.poll() is not None:
                child.restarts += 1
                log.error(
                    "UDP receiver %d (pid %d) exited with %s; restarting it",
                    child.index,
                    proc.pid,
                    proc.returncode,
                )
                child.proc = None
                self._loop.call_later(_RESTART_DELAY, self._restart, child)
        self._watch = self._loop.call_later(_WATCH_EVERY, self._check)

    def _restart(self, child: _Child) -> None:
        if not self._stopping and child.proc is None:
            self._spawn(child)

    def _drain(self, channel: _Channel) -> None:
        recv = channel.ours.recv
        sources = channel.sources
        local = channel.local
        on_message = self.on_message
        for _ in range(_DRAIN_BATCH):
            try:
                packet = recv(70000)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.error("UDP receivers' pipe on %s failed: %s", local, exc)
                return
            nl = packet.find(b"\n")
            if nl <= 0:
                continue
            head = packet[:nl]
            if head.startswith(_READY):
                self._ready(int(head[len(_READY) :]))
                continue
            source = sources.get(head)
            if source is None:
                host, _, port = head.decode().rpartition(" ")
                source = Address("udp", host, int(port))
                remember(sources, head, source, SOURCE_CACHE_MAX)
            try:
                on_message(packet[nl + 1 :], source, local)
            except Exception:
                log.exception("on_message failed for a datagram from %s", source)

    def _ready(self, index: int) -> None:
        if 0 <= index < len(self._children):
            ready = self._children[index].ready
            if ready is not None and not ready.done():
                ready.set_result(None)


if __name__ == "__main__":
    sys.exit(main())
