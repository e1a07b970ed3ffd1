"""Non-INVITE SIP transactions (RFC 3261 §17.1.2 client, §17.2.2 server), sans-I/O.

Nothing here reads a clock, sleeps or touches a socket: every entry point takes ``now`` (seconds,
monotonic) and returns what to send; the caller owns I/O and wakes up at :meth:`next_deadline`.
All timers of all transactions live in one ``heapq`` with lazy cancellation, so the cost per
transaction is a few heap operations and there is no per-transaction task or callback.

Defaults follow Kamailio 5.6.3 tm, because that is what a DMQ peer does on the wire:
T1 = 0.5 s, T2 = 4 s, T4 = 5 s and Timer F = ``fr_timer`` = 30 s (tm's default, *not* 64*T1).
Over UDP a request is sent at 0, 0.5, 1.5, 3.5, 7.5, 11.5, …, 27.5 s and ends in a local 408 at
30 s (see ``spec/wire-kamailio-5.6.3/retransmissions.txt``).

API (all methods of :class:`TransactionLayer`; ``now`` is always the caller's clock):

Client (one per destination; DMQ never forks):
    ``start_client(branch, method, data, reliable, now, *, dest=None) -> list[Action]``
        Creates the transaction and returns the first ``SendBytes``. ``dest`` is opaque and comes
        back in every ``SendBytes`` of this transaction so the endpoint can route retransmissions.
    ``on_response(branch, cseq_method, status, response, now) -> list[Action]``
        Matches by branch *and* CSeq method; anything unmatched returns ``[]`` (and is counted;
        :meth:`TransactionLayer.match_client` answers the question without side effects).
        1xx → Proceeding, no action. First 2xx-6xx → exactly one ``ClientFinal``; over a reliable
        transport also ``Terminated`` (Timer K = 0), otherwise Completed for T4, where retransmitted
        responses are absorbed.
    ``on_transport_error(branch, now, *, immediate=None) -> list[Action]``
        Kamailio keeps the timers running after a send error and ends in the same local 408 at
        ``fr_timer``; that is the default. ``immediate=True`` (or the layer-wide
        ``immediate_408_on_transport_error``) ends the transaction now with a local 408 instead.

Server (keyed by :func:`server_key` (a parsed request) or :func:`server_key_from_parts`,
RFC 3261 §17.2.3):
    ``on_request(key, method, reliable, now) -> ServerVerdict``
        ``verdict.kind`` is one of ``ServerVerdict.NEW`` (hand the request to the application),
        ``ABSORB`` (a retransmission arrived before the application answered; it must not reach
        the application again: Kamailio's DMQ runs its callback twice here, spec §1.5.2, we do
        not), ``RETRANSMISSION`` (alias ``RETRANSMIT``: resend ``verdict.data``, the last
        response, to the retransmission's source) or ``OVERLOADED`` (``max_transactions``
        requests are waiting for their answer: answer 503 statelessly). ACK never creates state.
        Answered transactions waiting out Timer J also count toward ``max_transactions``, but
        they never cause a 503: the oldest one is forgotten early to make room (``evicted``).
    ``on_server_response(key, status, data, now) -> list[Action]``
        Records the response the caller is sending itself (the caller knows where responses go,
        §18.2.2). 1xx → Proceeding. Final → Completed for Timer J = 64*T1 (unreliable), or
        ``Terminated`` at once (reliable). A final after a final is discarded (§17.2.2) and an
        unknown key (expired, overloaded, never created) is ignored: both return ``[]``.

Timers:
    ``next_deadline() -> float | None`` and ``on_timer(now) -> list[Action]`` (fires everything due:
    client timers in deadline order, then the server ones in deadline order). Client timers live
    in one heap; the server ones, whose durations are all 64*T1, in two FIFO queues (unanswered
    guard, Completed linger), so a request costs no heap operation.

Actions: :class:`SendBytes` (client request send or retransmission: send ``data`` to ``dest``),
:class:`ClientFinal` (exactly once per client transaction; a local 408 has ``response=None``),
:class:`Terminated` (state dropped; ``server`` says which key namespace).

Counters are plain attributes and :meth:`TransactionLayer.stats` returns them as a dict.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass
from enum import Enum, IntEnum
from typing import ClassVar, Final, Protocol

__all__ = [
    "DEFAULT_MAX_TRANSACTIONS",
    "MAGIC_COOKIE",
    "Action",
    "ClientFinal",
    "ClientState",
    "RequestLike",
    "SendBytes",
    "ServerState",
    "ServerVerdict",
    "Terminated",
    "TimerConfig",
    "TransactionLayer",
    "VerdictKind",
    "server_key",
    "server_key_from_parts",
]

#: RFC 3261 branch prefix; without it the request is from an RFC 2543 element (§17.2.3).
MAGIC_COOKIE: Final = "z9hG4bK"

#: Default cap on live server transactions. Over UDP a transaction lingers 64*T1 = 32 s after the
#: answer (holding the response bytes, ~0.6 KB in all with a 300-byte response), so above
#: 100k / 32 s ~ 3k UDP requests/s the oldest answered ones are forgotten early (``evicted``): a
#: retransmission of one of them (its answer was lost at least three times in a row, at 20k/s
#: it is then 5 s old) is handled as a new request, as Kamailio handles every retransmission.
#: Only unanswered transactions beyond the cap get ``OVERLOADED`` (503). Over TCP/TLS state is
#: dropped at the answer.
DEFAULT_MAX_TRANSACTIONS: Final = 100_000

# Heap entry kinds (client transactions only): E retransmit, F timeout, K completed-linger.
# Server timers (G unanswered guard, J completed-linger) live in FIFO queues, not in the heap.
_E: Final = 0
_F: Final = 1
_K: Final = 2

# Rebuild the heap when cancelled entries exceed live ones by this much (keeps it O(live)).
_COMPACT_SLACK: Final = 4096


@dataclass(frozen=True, slots=True)
class TimerConfig:
    """RFC 3261 timer values in seconds; defaults are Kamailio tm's.

    ``fr_timer`` is Timer F for client transactions (tm's ``fr_timer``, 30 s), not 64*T1.
    """

    t1: float = 0.5
    t2: float = 4.0
    t4: float = 5.0
    fr_timer: float = 30.0

    def __post_init__(self) -> None:
        for name in ("t1", "t2", "t4", "fr_timer"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"TimerConfig.{name} must be a number, got {value!r}")
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"TimerConfig.{name} must be positive and finite, got {value!r}")
        if self.t1 > self.t2:
            raise ValueError(f"TimerConfig.t1 ({self.t1}) must not exceed t2 ({self.t2})")


# --------------------------------------------------------------------------------------- actions


@dataclass(slots=True)
class SendBytes:
    """Send ``data`` to ``dest``: the first send or a retransmission of a client request.

    ``key`` is the branch; ``dest`` is whatever the caller passed to ``start_client``.
    """

    data: bytes
    key: str
    dest: object = None


@dataclass(slots=True)
class ClientFinal:
    """The client transaction's one final outcome; ``response is None`` means a local 408."""

    branch: str
    status: int
    response: object | None


@dataclass(slots=True)
class Terminated:
    """The transaction with ``key`` is gone; ``server`` tells which namespace the key is in."""

    key: str
    server: bool = False


Action = SendBytes | ClientFinal | Terminated


class VerdictKind(Enum):
    """What the endpoint must do with an incoming request."""

    NEW = "new"
    ABSORB = "absorb"
    RETRANSMISSION = "retransmission"
    RETRANSMIT = "retransmission"  # alias of RETRANSMISSION
    OVERLOADED = "overloaded"


@dataclass(frozen=True, slots=True)
class ServerVerdict:
    """Result of :meth:`TransactionLayer.on_request`; test it with ``verdict.kind is ...``.

    The kinds are also reachable as ``ServerVerdict.NEW`` etc. For ``RETRANSMISSION``, ``data``
    is the last response sent for this transaction; otherwise it is ``None``.
    """

    NEW: ClassVar[VerdictKind] = VerdictKind.NEW
    ABSORB: ClassVar[VerdictKind] = VerdictKind.ABSORB
    RETRANSMISSION: ClassVar[VerdictKind] = VerdictKind.RETRANSMISSION
    RETRANSMIT: ClassVar[VerdictKind] = VerdictKind.RETRANSMISSION
    OVERLOADED: ClassVar[VerdictKind] = VerdictKind.OVERLOADED

    kind: VerdictKind
    data: bytes | None = None


# Shared verdicts (no allocation on the hot path).
_NEW: Final = ServerVerdict(VerdictKind.NEW)
_ABSORB: Final = ServerVerdict(VerdictKind.ABSORB)
_OVERLOADED: Final = ServerVerdict(VerdictKind.OVERLOADED)


class ClientState(IntEnum):
    """RFC 3261 Figure 6 states (Terminated transactions are dropped, not kept)."""

    TRYING = 1
    PROCEEDING = 2
    COMPLETED = 3


class ServerState(IntEnum):
    """RFC 3261 Figure 8 states (Terminated transactions are dropped, not kept)."""

    TRYING = 1
    PROCEEDING = 2
    COMPLETED = 3


# ------------------------------------------------------------------------------------ server keys


class _ViaLike(Protocol):
    @property
    def branch(self) -> str | None: ...
    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int | None: ...


class _CSeqLike(Protocol):
    @property
    def seq(self) -> int: ...


class _NameAddrLike(Protocol):
    @property
    def tag(self) -> str | None: ...


class RequestLike(Protocol):
    """The parts of ``pydmq.sip.message.Request`` that :func:`server_key` reads."""

    @property
    def method(self) -> str: ...
    @property
    def via(self) -> _ViaLike: ...
    @property
    def call_id(self) -> str: ...
    @property
    def cseq(self) -> _CSeqLike: ...
    @property
    def from_(self) -> _NameAddrLike: ...


def server_key_from_parts(
    method: str,
    branch: str | None,
    sent_by_host: str,
    sent_by_port: int | None,
    *,
    call_id: str = "",
    cseq: int = 0,
    from_tag: str | None = None,
    top_via: str = "",
) -> str:
    """Server transaction key per RFC 3261 §17.2.3.

    With a ``z9hG4bK`` branch: branch + sent-by (host lower-cased, port as written or empty) +
    method. Otherwise (RFC 2543 peer) fall back to Call-ID + CSeq number + From tag + the whole
    top Via + method. The first form starts with ``z9hG4bK``, the second with ``2543|``, so the
    two cannot collide.
    ACK is not mapped to INVITE: DMQ has no INVITE server transactions.
    """
    if branch is not None and branch.startswith(MAGIC_COOKIE):
        port = "" if sent_by_port is None else str(sent_by_port)
        return f"{branch}|{sent_by_host.lower()}:{port}|{method}"
    return f"2543|{call_id}|{cseq}|{from_tag or ''}|{top_via}|{method}"


def server_key(request: RequestLike) -> str:
    """Server transaction key of a parsed request (see :func:`server_key_from_parts`).

    Only the headers the key needs are read, so a lazily parsed request stays cheap; a bad
    header propagates the parser's ``SipParseError``.
    """
    via = request.via
    branch = via.branch
    if branch is not None and branch.startswith(MAGIC_COOKIE):
        # server_key_from_parts' RFC 3261 form, inlined (it runs for every request)
        port = via.port
        return f"{branch}|{via.host.lower()}:{'' if port is None else port}|{request.method}"
    return server_key_from_parts(
        request.method,
        branch,
        via.host,
        via.port,
        call_id=request.call_id,
        cseq=request.cseq.seq,
        from_tag=request.from_.tag,
        top_via=str(via),
    )


# ---------------------------------------------------------------------------- transaction records


class _Client:
    """One non-INVITE client transaction. ``timer_e``/``timer_fk`` are live heap seqs (0 = none)."""

    __slots__ = (
        "data",
        "deadline_f",
        "dest",
        "interval",
        "method",
        "reliable",
        "state",
        "timer_e",
        "timer_fk",
    )

    def __init__(
        self,
        method: str,
        data: bytes,
        reliable: bool,
        *,
        dest: object,
        deadline_f: float,
        t1: float,
    ) -> None:
        self.method = method
        self.data = data
        self.reliable = reliable
        self.dest = dest
        self.state = ClientState.TRYING
        self.deadline_f = deadline_f
        self.interval = t1
        self.timer_e = 0
        self.timer_fk = 0


class _Server:
    """A non-INVITE server transaction until its final response (then only the response bytes
    are kept, in ``TransactionLayer._done``). ``response`` is the last provisional one sent
    (None: nothing sent yet); ``deadline`` is when the unanswered guard (64*T1) drops it."""

    __slots__ = ("deadline", "key", "reliable", "response", "state")

    def __init__(self, key: str, reliable: bool, deadline: float) -> None:
        self.key = key
        self.reliable = reliable
        self.deadline = deadline
        self.state = ServerState.TRYING
        self.response: bytes | None = None


# ---------------------------------------------------------------------------------- the layer


class TransactionLayer:
    """All client and server non-INVITE transactions of one endpoint, driven by the caller.

    ``max_transactions`` caps live *server* transactions so a request flood cannot grow memory
    without bound: when that many are waiting for their answer :meth:`on_request` returns
    ``OVERLOADED``; when answered ones (kept for Timer J) fill the room, the oldest answered one
    is forgotten to make room for the new request (counted in ``evicted``). (Client transactions
    are only created by this node, so their number is bounded by its own sending.)
    An unanswered server transaction is dropped after 64*T1 (by then every RFC client has given
    up), so an application that never replies cannot leak state either.
    """

    def __init__(
        self,
        timers: TimerConfig | None = None,
        *,
        max_transactions: int = DEFAULT_MAX_TRANSACTIONS,
        immediate_408_on_transport_error: bool = False,
    ) -> None:
        if max_transactions < 1:
            raise ValueError("max_transactions must be >= 1")
        self.timers = timers if timers is not None else TimerConfig()
        self.max_transactions = max_transactions
        self.immediate_408_on_transport_error = immediate_408_on_transport_error
        self._clients: dict[str, _Client] = {}
        #: Server transactions not answered yet (Trying/Proceeding).
        self._servers: dict[str, _Server] = {}
        #: Every _Server in arrival order (= guard deadline order); answered ones are skipped.
        self._guard: deque[_Server] = deque()
        #: Completed server transactions: key -> final response, in completion order.
        self._done: dict[str, bytes] = {}
        #: (Timer J deadline, key) of every entry of ``_done``, in the same order.
        self._linger: deque[tuple[float, str]] = deque()
        # (deadline, seq, key, kind); an entry is live iff its seq is in _live.
        self._heap: list[tuple[float, int, str, int]] = []
        self._live: set[int] = set()
        self._seq = 0
        self._timer_j = 64 * self.timers.t1
        #: How long a server transaction lives (64*T1): both the unanswered guard and Timer J.
        #: A new request's timer is due ``now + server_timeout``, its answer's no earlier.
        self.server_timeout = self._timer_j
        # Counters (the DMQ layer exports them).
        self.retransmissions = 0  # client request retransmissions sent by Timer E
        self.timeouts = 0  # local 408s (Timer F or immediate transport error)
        self.transport_errors = 0  # on_transport_error calls for live client transactions
        self.unmatched_responses = 0  # responses with unknown branch / other CSeq method / bad code
        self.absorbed_responses = 0  # response retransmissions swallowed in Completed
        self.absorbed_requests = 0  # request retransmissions swallowed before the answer
        self.response_retransmissions = 0  # RETRANSMISSION verdicts (last response resent)
        self.overloaded = 0  # OVERLOADED verdicts
        self.server_unanswered = 0  # server transactions dropped without a final response
        self.discarded_responses = 0  # finals after the first final, or for unknown keys
        self.evicted = 0  # answered server transactions forgotten before Timer J (at the cap)

    # ------------------------------------------------------------------------------ introspection

    @property
    def live_clients(self) -> int:
        """Client transactions not yet terminated."""
        return len(self._clients)

    @property
    def live_servers(self) -> int:
        """Server transactions not yet terminated (unanswered, or answered within Timer J)."""
        return len(self._servers) + len(self._done)

    def client_state(self, branch: str) -> ClientState | None:
        """State of a client transaction, ``None`` once terminated (or never started)."""
        tx = self._clients.get(branch)
        return None if tx is None else tx.state

    def server_state(self, key: str) -> ServerState | None:
        """State of a server transaction, ``None`` once terminated (or never created)."""
        tx = self._servers.get(key)
        if tx is not None:
            return tx.state
        return ServerState.COMPLETED if key in self._done else None

    def match_client(self, branch: str, cseq_method: str) -> bool:
        """Whether a response with this branch and CSeq method belongs to a live transaction."""
        tx = self._clients.get(branch)
        return tx is not None and tx.method == cseq_method

    def stats(self) -> dict[str, int]:
        """Counters and gauges for monitoring."""
        return {
            "clients_live": len(self._clients),
            "servers_live": len(self._servers) + len(self._done),
            "servers_unanswered": len(self._servers),
            "timers_pending": len(self._live),
            "heap_size": len(self._heap),
            "server_timer_queue": len(self._guard) + len(self._linger),
            "retransmissions": self.retransmissions,
            "timeouts": self.timeouts,
            "transport_errors": self.transport_errors,
            "unmatched_responses": self.unmatched_responses,
            "absorbed_responses": self.absorbed_responses,
            "absorbed_requests": self.absorbed_requests,
            "response_retransmissions": self.response_retransmissions,
            "overloaded": self.overloaded,
            "server_unanswered": self.server_unanswered,
            "discarded_responses": self.discarded_responses,
            "evicted": self.evicted,
        }

    # -------------------------------------------------------------------------------------- client

    def start_client(
        self,
        branch: str,
        method: str,
        data: bytes,
        reliable: bool,
        now: float,
        *,
        dest: object = None,
    ) -> list[Action]:
        """Start a client transaction and return the initial send.

        Raises ``ValueError`` if ``branch`` is still live: branches must be unique, and reusing
        one would make responses ambiguous.
        """
        if branch in self._clients:
            raise ValueError(f"client transaction {branch!r} already exists")
        t = self.timers
        deadline_f = now + t.fr_timer
        tx = _Client(method, data, reliable, dest=dest, deadline_f=deadline_f, t1=t.t1)
        self._clients[branch] = tx
        tx.timer_fk = self._push(deadline_f, branch, _F)
        if not reliable and now + t.t1 < deadline_f:
            tx.timer_e = self._push(now + t.t1, branch, _E)
        return [SendBytes(data, branch, dest)]

    def on_response(
        self, branch: str, cseq_method: str, status: int, response: object, now: float
    ) -> list[Action]:
        """Feed a response; returns ``[]`` for 1xx, absorbed and unmatched responses."""
        tx = self._clients.get(branch)
        if tx is None or tx.method != cseq_method or not 100 <= status <= 699:
            self.unmatched_responses += 1
            return []
        if tx.state is ClientState.COMPLETED:
            self.absorbed_responses += 1
            return []
        if status < 200:
            tx.state = ClientState.PROCEEDING  # Timer E continues, next interval T2
            return []
        final = ClientFinal(branch, status, response)
        self._cancel(tx.timer_e)
        self._cancel(tx.timer_fk)
        tx.timer_e = 0
        tx.data = b""  # never retransmitted again; free it while lingering in Completed
        if tx.reliable:
            del self._clients[branch]
            return [final, Terminated(branch)]
        tx.state = ClientState.COMPLETED
        tx.timer_fk = self._push(now + self.timers.t4, branch, _K)
        return [final]

    def on_transport_error(
        self, branch: str, now: float, *, immediate: bool | None = None
    ) -> list[Action]:
        """A send for ``branch`` failed.

        Default (Kamailio tm): nothing changes, retransmissions and Timer F continue and the
        transaction ends in a local 408 at ``fr_timer``. With ``immediate`` (per call, or the
        layer's ``immediate_408_on_transport_error``) it ends now with a local 408.
        """
        tx = self._clients.get(branch)
        if tx is None or tx.state is ClientState.COMPLETED:
            return []
        self.transport_errors += 1
        if not (self.immediate_408_on_transport_error if immediate is None else immediate):
            return []
        self._cancel(tx.timer_e)
        self._cancel(tx.timer_fk)
        del self._clients[branch]
        self.timeouts += 1
        return [ClientFinal(branch, 408, None), Terminated(branch)]

    # -------------------------------------------------------------------------------------- server

    def on_request(self, key: str, method: str, reliable: bool, now: float) -> ServerVerdict:
        """Classify an incoming request (see the module docstring). ACK never creates state."""
        tx = self._servers.get(key)
        if tx is not None:
            if tx.response is None:
                self.absorbed_requests += 1
                return _ABSORB
            self.response_retransmissions += 1
            return ServerVerdict(VerdictKind.RETRANSMISSION, tx.response)
        done = self._done.get(key)
        if done is not None:
            self.response_retransmissions += 1
            return ServerVerdict(VerdictKind.RETRANSMISSION, done)
        if method == "ACK":
            return _NEW
        servers = self._servers
        cap = self.max_transactions
        if len(servers) >= cap:
            self.overloaded += 1
            return _OVERLOADED
        if len(servers) + len(self._done) >= cap:
            # Room for the new request: forget the oldest answered transaction.
            del self._done[self._linger.popleft()[1]]
            self.evicted += 1
        tx = servers[key] = _Server(key, reliable, now + self._timer_j)
        self._guard.append(tx)
        return _NEW

    def on_server_response(self, key: str, status: int, data: bytes, now: float) -> list[Action]:
        """Record the response ``data`` that the caller sends for ``key`` (it sends it itself).

        The bytes are kept to answer request retransmissions (``RETRANSMISSION`` verdicts).
        """
        if not 100 <= status <= 699:
            raise ValueError(f"invalid response status {status}")
        tx = self._servers.get(key)
        if tx is None:  # answered already, expired, overloaded or never created
            self.discarded_responses += 1
            return []
        if status < 200:
            tx.response = data
            tx.state = ServerState.PROCEEDING
            return []
        del self._servers[key]
        tx.state = ServerState.COMPLETED  # its guard entry is skipped from now on
        tx.response = None
        guard = self._guard
        while guard and guard[0].state is ServerState.COMPLETED:
            guard.popleft()  # answered in order: drop moot guards now, not at the next timer
        if tx.reliable:
            return [Terminated(key, server=True)]
        self._done[key] = data
        self._linger.append((now + self._timer_j, key))
        return []

    # -------------------------------------------------------------------------------------- timers

    def next_deadline(self) -> float | None:
        """Earliest pending deadline, or ``None`` when no timer is pending."""
        heap, live = self._heap, self._live
        while heap and heap[0][1] not in live:
            heapq.heappop(heap)
        best = heap[0][0] if heap else None
        guard = self._guard
        while guard and guard[0].state is ServerState.COMPLETED:
            guard.popleft()  # answered: its guard is moot (cheap, usually the head)
        if guard and (best is None or guard[0].deadline < best):
            best = guard[0].deadline
        linger = self._linger
        if linger and (best is None or linger[0][0] < best):
            best = linger[0][0]
        return best

    def on_timer(self, now: float) -> list[Action]:
        """Fire every timer due at ``now`` and return the resulting actions: client timers in
        deadline order, then unanswered server transactions dropped by their 64*T1 guard, then
        answered ones at the end of Timer J."""
        actions: list[Action] = []
        heap, live = self._heap, self._live
        while heap and heap[0][0] <= now:
            deadline, seq, key, kind = heapq.heappop(heap)
            if seq not in live:
                continue
            live.remove(seq)
            client = self._clients.get(key)
            if client is not None:
                self._fire_client(client, key, kind, deadline, now=now, out=actions)
        guard = self._guard
        while guard and guard[0].deadline <= now:
            tx = guard.popleft()
            if tx.state is not ServerState.COMPLETED:
                tx.state = ServerState.COMPLETED
                del self._servers[tx.key]
                self.server_unanswered += 1
                actions.append(Terminated(tx.key, server=True))
        linger, done = self._linger, self._done
        while linger and linger[0][0] <= now:
            key = linger.popleft()[1]
            del done[key]
            actions.append(Terminated(key, server=True))
        return actions

    def _fire_client(
        self, tx: _Client, branch: str, kind: int, deadline: float, *, now: float, out: list[Action]
    ) -> None:
        if kind == _E:
            tx.timer_e = 0
            self.retransmissions += 1
            out.append(SendBytes(tx.data, branch, tx.dest))
            t = self.timers
            # Trying doubles up to T2; Proceeding always uses T2 (RFC 3261 §17.1.2.2).
            tx.interval = t.t2 if tx.state is ClientState.PROCEEDING else min(2 * tx.interval, t.t2)
            # Anchor on the scheduled deadline so a late wake-up does not shift the schedule,
            # but never schedule into the past (no catch-up bursts after a stall).
            nxt = deadline + tx.interval
            if nxt <= now:
                nxt = now + tx.interval
            if nxt < tx.deadline_f:  # Timer F wins a tie: no send at the instant of the 408
                tx.timer_e = self._push(nxt, branch, _E)
        elif kind == _F:
            self._cancel(tx.timer_e)
            del self._clients[branch]
            self.timeouts += 1
            out.append(ClientFinal(branch, 408, None))
            out.append(Terminated(branch))
        else:  # _K
            del self._clients[branch]
            out.append(Terminated(branch))

    def _push(self, deadline: float, key: str, kind: int) -> int:
        self._seq += 1
        seq = self._seq
        heap = self._heap
        heapq.heappush(heap, (deadline, seq, key, kind))
        self._live.add(seq)
        if len(heap) > 2 * len(self._live) + _COMPACT_SLACK:
            self._compact()
        return seq

    def _cancel(self, seq: int) -> None:
        if seq:
            self._live.discard(seq)

    def _compact(self) -> None:
        """Drop cancelled entries in place (callers may hold a reference to the list)."""
        live = self._live
        heap = self._heap
        heap[:] = [entry for entry in heap if entry[1] in live]
        heapq.heapify(heap)
