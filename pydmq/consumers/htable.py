"""htable: Kamailio's shared hash tables, replicated over DMQ channel ``htable``.

Wire-compatible with Kamailio 5.6.3's htable module (``enable_dmq=1``): the same JSON
(:mod:`pydmq.consumers.htable_dmq`), the same table semantics
(:mod:`pydmq.consumers.htable_store`), the same replies (200 / 400 / 500), the same sync
request at join time. Use it like this::

    node = DmqNode(settings)                  # settings.htable: the [htable] table
    ht = attach(node)                         # registers channel "htable"; before node.start()
    await node.start()
    ht.set("t", "k1", "v1")                   # applied here, broadcast as SET_CELL
    ht.incr("t", "hits")                      # SET_CELL with the resulting integer
    ht.get("t", "k1")                         # "v1"
    ht.remove("t", "^tmp-", op="re", on="name")   # RM_CELL_RE, mode 0
    ...
    await ht.close()                          # stops the expiry sweeper and running syncs
    await node.stop()

Replication. A local change of a table with ``dmqreplicate=1`` is applied and sent to every
active node (Kamailio broadcasts first and applies second; both happen in the same event-loop
step here). A change received from a peer is applied to the store directly and never sent
again, so there are no loops. Every mutation replicates as Kamailio's corresponding call does:
``set`` → SET_CELL (+ SET_CELL_EXPIRE when an expiry is given, like ``sht_setxs``), ``incr`` /
``decr`` → SET_CELL with the result, ``delete`` → DEL_CELL (even for a missing key, as Kamailio),
``set_expire`` → SET_CELL_EXPIRE, ``remove`` → RM_CELL_RE / RM_CELL_SW, and ``flush`` →
RM_CELL_RE ``.*`` (Kamailio's ``htable.flush`` / ``sht_reset`` replicate nothing; pydmq keeps
replicated tables equal). Expiry is not replicated: every node runs its own sweep, as in Kamailio,
which is why table definitions must match on every node. Duplicates (UDP retransmissions,
Kamailio's at-least-once delivery) are harmless: every action is idempotent, and a sync request
for a node that is already being synced is ignored.

Order. Kamailio applies what it receives in several workers, in no particular order, so two
changes of one key sent back to back could land the wrong way round. pydmq therefore does not
send a change of a key to a node while an earlier change of the same key (or a table-wide
removal) is still unanswered there; changes of different keys go out concurrently (see
:class:`_Outbox`). Sync groups are not ordered against live changes (as in Kamailio): a change
made while a sync is running can be overtaken by an older copy of the cell in a sync group.

Sync. With ``dmq_init_sync`` the node broadcasts ``{"action":1}`` once it has joined (the DMQ
init callback). Every node that gets a sync request answers the requester (or, if the requester
is not in its node list, every active node, as Kamailio) with all its replicated, unexpired cells
in ``{"cells":[...]}`` groups, then a final ``{"cells":[]}``. Unlike Kamailio, which fires every
60 KB group at once, pydmq sends at most ``sync_window`` groups to one node before their replies
arrive, retries a group that timed out ``sync_retries`` times, and sizes groups by transport:
``sync_group_bytes_udp`` (default 1000: with the headers a datagram fits a 1500-byte MTU, so it
is never fragmented) for UDP nodes, ``sync_group_bytes`` (default 15000, under Kamailio's default
16 KB TCP read buffer) for TCP/TLS nodes. The final group is sent only after every other group
has been answered, so a pydmq receiver can tell that a sync is complete. Progress is logged on
``pydmq.consumers.htable``.

Re-join (pydmq). Kamailio syncs only when a node starts, so changes made on either side of a
network partition never reach the other side. pydmq watches the membership events: when a node
that was known before comes back (``not_active``/``disabled`` -> ``active``, or added again after
it had been removed) it sends that node all its replicated cells, exactly as it answers a sync
request (:meth:`HtableService.sync_to`). Both sides see each other come back, so the exchange
goes both ways. Conflicts (a key changed differently on both sides) resolve the same way on
every node, whatever the order the groups arrive in: a sync cell replaces a live cell only if its
value is not smaller (integers before strings, then numeric / lexicographic order; the larger
value wins, which for counters is the highest count). Live changes (SET_CELL ...) are applied as
they come. Deletions are not remembered: a key deleted on one side during a partition comes back
from the other side. A brand-new node is not pushed to: it asks for a sync itself at join time
(``dmq_init_sync``). Kamailio peers do not push back after a partition.

Expiry. Every ``timer_interval`` seconds (default 20, Kamailio's ``timer_interval``) an asyncio
task removes the expired cells of autoexpire tables. Until then an expired cell is invisible to
``get`` and to sync, but still listed by ``htable.dump`` (as in Kamailio).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from pydmq.config import HtableSettings, Settings
from pydmq.consumers.htable_dmq import (
    ACTION_DEL_CELL,
    ACTION_RM_CELL_RE,
    ACTION_RM_CELL_SW,
    ACTION_SET_CELL,
    ACTION_SET_CELL_EXPIRE,
    ACTION_SYNC,
    CONTENT_TYPE,
    EMPTY_GROUP,
    Action,
    BadRequest,
    Bulk,
    decode,
    decode_set_cell,
    encode_del_cell,
    encode_remove,
    encode_set_cell,
    encode_set_expire,
    encode_sync_cell,
    encode_sync_request,
    iter_groups,
)
from pydmq.consumers.htable_store import (
    Cell,
    HtableError,
    HtablePatternError,
    HtableStore,
    Table,
    UnknownTableError,
    Value,
    check_int,
    check_str,
    compile_posix_re,
)
from pydmq.dmq.api import Delivery, DmqApi, load_api
from pydmq.dmq.node import NodeError, NodeStatus
from pydmq.dmq.nodelist import MembershipEvent
from pydmq.dmq.peer import Peer, PeerResponse
from pydmq.dmq.runtime import DmqError

if TYPE_CHECKING:
    from pydmq.dmq.node import Node, NodeKey
    from pydmq.dmq.runtime import DmqNode
    from pydmq.sip.message import Request

__all__ = ["CHANNEL", "HtableService", "HtableStats", "SyncResult", "attach"]

log = logging.getLogger(__name__)

#: The DMQ channel (R-URI user); Kamailio's ``peer_id`` of htable.
CHANNEL = "htable"
#: A single cell bigger than this cannot travel at all (a UDP datagram carries at most 65507
#: bytes with the SIP headers); it is left out of a sync with an error in the log.
MAX_GROUP_BYTES = 64000
#: Progress lines: at most one per this many cells, per sync.
PROGRESS_STEP = 10000
#: Seconds without a sync group from a node after which its next group starts a new count.
INCOMING_IDLE = 30.0
#: Replication messages one node may have unanswered at once (different keys only).
REPLICATION_WINDOW = 32
#: Replication messages queued for one node that does not answer, before new ones are dropped.
REPLICATION_QUEUE = 10000

_OK = PeerResponse(200, "OK")
_BAD = PeerResponse(400, "Bad Request")
_ERR = PeerResponse(500, "Server Internal Error")
_RETRY_STATUS = frozenset({408, 503})


@dataclass(slots=True)
class HtableStats:
    """Counters of one service (read them, do not write them)."""

    #: Local changes of replicated tables (each goes to every active node).
    replicated: int = 0
    #: Changes not delivered to a node: its queue was full, or it left the active list.
    replication_dropped: int = 0
    #: KDMQ requests received on the channel, by the reply they got.
    received_ok: int = 0
    received_bad: int = 0
    received_error: int = 0
    #: Sync answers this node started, finished completely, and gave up on.
    syncs_started: int = 0
    syncs_completed: int = 0
    syncs_failed: int = 0
    #: Sync groups / cells this node sent (acknowledged with 200).
    groups_sent: int = 0
    cells_sent: int = 0
    #: Sync groups / cells this node received and applied (cells of unknown tables excluded).
    groups_received: int = 0
    cells_received: int = 0
    #: Expired cells removed by the sweep.
    expired: int = 0
    #: Full pushes to a node that came back (re-join) and sync cells that lost to a larger
    #: local value (see "Re-join" in the module docstring).
    rejoin_syncs: int = 0
    sync_cells_kept_local: int = 0
    #: Full pushes to a node that missed changes (a change or sync group it never
    #: acknowledged), made once it answers again: see :meth:`HtableService.repair`.
    repair_syncs: int = 0


@dataclass(slots=True)
class SyncResult:
    """How one sync answer to one node went."""

    node_uri: str
    table: str | None
    cells_total: int
    cells_sent: int = 0
    groups_sent: int = 0
    #: Most groups that were waiting for their reply at the same time (<= ``sync_window``).
    max_in_flight: int = 0
    ok: bool = False
    error: str | None = None
    started: float = 0.0
    finished: float = 0.0

    @property
    def seconds(self) -> float:
        return self.finished - self.started


@dataclass(slots=True)
class _Incoming:
    """Progress of the sync groups arriving from one node."""

    cells: int = 0
    groups: int = 0
    logged: int = 0
    started: float = field(default_factory=time.monotonic)
    last: float = field(default_factory=time.monotonic)


class HtableService:
    """The tables of one node, their Python API and their DMQ channel.

    Build it with :func:`attach` (or directly with ``node=None`` for purely local tables).
    Table-level errors raise :class:`~pydmq.consumers.htable_store.UnknownTableError` (a
    ``LookupError``), bad values ``ValueError``, bad patterns
    :class:`~pydmq.consumers.htable_store.HtablePatternError` (a ``ValueError``).
    """

    def __init__(
        self,
        settings: HtableSettings,
        *,
        node: DmqNode | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.store = HtableStore(settings.specs, clock=clock)
        self.stats = HtableStats()
        self.node = node
        self.api: DmqApi | None = None
        self.peer: Peer | None = None
        #: The outcome of the sync answers sent, latest last.
        self.sync_results: list[SyncResult] = []
        self._syncs: dict[NodeKey, asyncio.Task[SyncResult]] = {}
        self._outboxes: dict[NodeKey, _Outbox] = {}
        self._incoming: dict[object, _Incoming] = {}
        #: nodes seen active before: seeing one come back is a re-join
        self._known: set[NodeKey] = set()
        #: Nodes that did not acknowledge a change or a sync group: they get a full push.
        self._dirty: set[NodeKey] = set()
        #: The sync this node asked for last: nodes asked, final groups seen, cells applied.
        self.sync_in: dict[str, int] = {"asked": 0, "finished": 0, "groups": 0, "cells": 0}
        self._sweeper: asyncio.Task[None] | None = None
        self._repairer: asyncio.Task[None] | None = None
        self._closed = False
        #: Bodies above this are refused (400): no SIP message of ours can be that big.
        self.max_body = 65535 if node is None else max(65535, node.settings.sip.max_message_size)
        if node is not None and settings.enable_dmq:
            self.api = load_api(node)
            init = self._init_callback if settings.dmq_init_sync else None
            self.peer = self.api.register_peer(CHANNEL, "htable", self.handle_message, init)
            node.events.subscribe(self._on_membership)

    # ---- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        """Start the expiry sweeper (needs a running event loop; a second call does nothing)."""
        if self._sweeper is None and not self._closed:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_loop())
        if self._repairer is None and not self._closed and self.node is not None:
            self._repairer = asyncio.get_running_loop().create_task(self._repair_loop())

    async def close(self) -> None:
        """Stop the sweeper and abandon running sync answers. The tables stay readable."""
        self._closed = True
        for outbox in self._outboxes.values():
            outbox.discard()
        tasks: list[asyncio.Task[SyncResult] | asyncio.Task[None]] = list(self._syncs.values())
        for background in (self._sweeper, self._repairer):
            if background is not None:
                tasks.append(background)
        self._sweeper = self._repairer = None
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _sweep_loop(self) -> None:
        interval = self.settings.timer_interval
        while True:
            await asyncio.sleep(interval)
            self.sweep()

    async def _repair_loop(self) -> None:
        assert self.node is not None
        interval = self.node.settings.dmq.ping_interval
        while True:
            await asyncio.sleep(interval)
            self.repair()

    def mark_dirty(self, node: Node) -> None:
        """``node`` missed a change (no 200 for it): push it the whole table once it answers."""
        self._dirty.add(node.key)

    def repair(self) -> int:
        """Push our tables to every node that missed a change and is active again (every
        ``ping_interval`` s). Kamailio drops such changes for good; a one-way cut, where the
        node never looks "removed" and so never re-joins, would otherwise lose them. Returns
        how many pushes started."""
        if self.node is None or self._closed or not self.node.running:
            return 0
        started = 0
        for key in list(self._dirty):
            node = self.node.nodes.find(key)
            if node is None:
                self._dirty.discard(key)  # gone: its re-join brings a full push anyway
            elif node.status is NodeStatus.ACTIVE and self.sync_to(node) is not None:
                self._dirty.discard(key)
                self.stats.repair_syncs += 1
                started += 1
        return started

    def sweep(self, now: float | None = None) -> int:
        """Remove expired cells now (the timer does this every ``timer_interval`` s)."""
        removed = self.store.expire(now)
        if removed:
            self.stats.expired += removed
            log.debug("htable: %d expired cells removed", removed)
        return removed

    # ---- Python API: reading -----------------------------------------------------------------
    def tables(self) -> list[str]:
        """The configured table names, in definition order."""
        return list(self.store.tables)

    def table(self, name: str) -> Table:
        """A table's definition and cells (raises UnknownTableError)."""
        return self.store.table(name)

    def get(self, table: str, key: str, default: Value | None = None) -> Value | None:
        """The value of ``key``, or ``default`` when it is missing or expired."""
        cell = self.store.get(table, key)
        return default if cell is None else cell.value

    def get_cell(self, table: str, key: str) -> Cell | None:
        """The live cell (value, absolute ``expire``, ``flags``) or None."""
        return self.store.get(table, key)

    def items(self, table: str) -> list[tuple[str, Value]]:
        """``(key, value)`` of every live cell, in insertion order."""
        return [(c.name, c.value) for c in self.store.live_cells(table)]

    def __contains__(self, table: object) -> bool:
        return table in self.store

    # ---- Python API: writing (each one replicates) -------------------------------------------
    def set(self, table: str, key: str, value: Value, expire: int | None = None) -> None:
        """``$sht(table=>key) = value``; with ``expire``, ``sht_setxs``/``sht_setxi``: the cell
        then expires ``expire`` seconds from now (``<= 0``: never; autoexpire tables only)."""
        t = self.store.table(table)
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ValueError(f"htable values are str or int, not {type(value).__name__}")
        if expire is not None:
            check_int(expire)
        self.store.set(table, key, value)
        self._replicate(t, key, encode_set_cell(table, key, value))
        if expire is not None:
            self.store.set_expire(table, key, expire)
            self._replicate(t, key, encode_set_expire(table, key, expire))

    def incr(self, table: str, key: str, delta: int = 1) -> int | None:
        """``$shtinc``: add ``delta``; the new value, or None (string cell, or missing without
        ``initval``: nothing changes and nothing is sent, as in Kamailio)."""
        t = self.store.table(table)
        check_str(key)
        check_int(delta)
        cell = self.store.add(table, key, delta)
        if cell is None or isinstance(cell.value, str):
            return None
        self._replicate(t, key, encode_set_cell(table, key, cell.value))
        return cell.value

    def decr(self, table: str, key: str, delta: int = 1) -> int | None:
        """``$shtdec``: :meth:`incr` with ``-delta``."""
        return self.incr(table, key, -delta)

    def delete(self, table: str, key: str) -> bool:
        """``sht_rm`` / ``$sht(...) = $null``: True if the key existed. DEL_CELL goes out either
        way (Kamailio sends it before looking), which also heals a peer that still has it."""
        t = self.store.table(table)
        check_str(key)
        existed = self.store.delete(table, key)
        self._replicate(t, key, encode_del_cell(table, key))
        return existed

    def set_expire(self, table: str, key: str, seconds: int) -> bool:
        """``$shtex(table=>key) = seconds`` (``<= 0``: never); True if a cell changed. Tables
        without ``autoexpire`` ignore it (but it is still sent, as Kamailio does)."""
        t = self.store.table(table)
        check_str(key)
        check_int(seconds)
        changed = self.store.set_expire(table, key, seconds)
        self._replicate(t, key, encode_set_expire(table, key, seconds))
        return changed

    def remove(
        self,
        table: str,
        pattern: str,
        *,
        op: Literal["re", "sw"] = "re",
        on: Literal["name", "value"] = "name",
    ) -> int:
        """``sht_rm_name(table, op, pattern)`` / ``sht_rm_value(...)``: remove the cells whose
        name (``on="name"``) or string value (``on="value"``) matches the POSIX regex
        (``op="re"``) or starts with ``pattern`` (``op="sw"``). Returns the count removed here.
        A bad or empty pattern raises HtablePatternError and nothing is sent."""
        t = self.store.table(table)
        if op not in ("re", "sw") or on not in ("name", "value"):
            raise ValueError(f"op must be 're' or 'sw' and on 'name' or 'value', not {op}/{on}")
        check_str(pattern)
        by_value = on == "value"
        if op == "re":
            compile_posix_re(pattern)  # refuse before anything is sent
            count = self.store.remove_re(table, pattern, by_value=by_value)
        else:
            if not pattern:
                raise HtablePatternError("empty prefix")
            count = self.store.remove_prefix(table, pattern, by_value=by_value)
        self._replicate(
            t, None, encode_remove(table, pattern, prefix=op == "sw", by_value=by_value)
        )
        return count

    def flush(self, table: str) -> int:
        """Empty the table; the count removed. Replicated as RM_CELL_RE ``.*`` on names."""
        t = self.store.table(table)
        count = self.store.flush(table)
        self._replicate(t, None, encode_remove(table, ".*", prefix=False, by_value=False))
        return count

    # ---- replication ------------------------------------------------------------------------
    def _replicate(self, table: Table, key: str | None, body: bytes) -> None:
        """Queue ``body`` (a change of ``key``, or of the whole table when None) for every
        active node; see :class:`_Outbox` for the ordering guarantees."""
        if not table.dmqreplicate or self.api is None or self.peer is None or self.node is None:
            return
        self.stats.replicated += 1
        targets = self.node.nodes.active_remote()
        alive = {n.key for n in targets}
        for gone in [k for k in self._outboxes if k not in alive]:
            self.stats.replication_dropped += self._outboxes.pop(gone).discard()
        for target in targets:
            outbox = self._outboxes.get(target.key)
            if outbox is None:
                outbox = self._outboxes[target.key] = _Outbox(self, target)
            outbox.push(table.name, key, body)

    # ---- DMQ: receiving ---------------------------------------------------------------------
    def handle_message(self, request: Request, node: Node | None) -> PeerResponse:
        """The peer callback of channel ``htable`` (Kamailio's ``ht_dmq_handle_msg``)."""
        response = self._handle(request, node)
        if response.code == 200:
            self.stats.received_ok += 1
        elif response.code == 400:
            self.stats.received_bad += 1
        else:
            self.stats.received_error += 1
        return response

    def _handle(self, request: Request, node: Node | None) -> PeerResponse:
        # The sender's name is only for log lines (and sync bookkeeping): made when needed.
        if request.content_length is None:
            log.warning("htable: KDMQ from %s without Content-Length: 400", _sender(node, request))
            return _BAD
        body = request.body
        if len(body) > self.max_body:
            log.warning(
                "htable: %d-byte body from %s is too big: 400", len(body), _sender(node, request)
            )
            return _BAD
        cell = decode_set_cell(body)  # the usual message, read without a JSON parse
        if cell is not None:
            try:
                self._set_cell(*cell)
            except (HtableError, ValueError) as exc:
                log.error(
                    "htable: failed to replay action %d from %s: %s",
                    ACTION_SET_CELL,
                    _sender(node, request),
                    exc,
                )
                return _ERR
            return _OK
        try:
            message = decode(body)
        except BadRequest as exc:
            log.warning("htable: bad KDMQ from %s: %s: 400", _sender(node, request), exc)
            return _BAD
        if isinstance(message, Bulk):
            self._apply_bulk(message, node, _sender(node, request))
            return _OK
        if message.action == ACTION_SYNC:
            self._answer_sync(node, message.htname or None, _sender(node, request))
            return _OK
        try:
            self._apply_action(message)
        except BadRequest as exc:
            log.warning("htable: bad KDMQ from %s: %s: 400", _sender(node, request), exc)
            return _BAD
        except (HtableError, ValueError) as exc:
            who = _sender(node, request)
            log.error("htable: failed to replay action %d from %s: %s", message.action, who, exc)
            return _ERR
        return _OK

    def _set_cell(self, table: str, name: str, value: Value) -> None:
        """A replayed SET_CELL (never replicated)."""
        if table not in self.store.tables:
            raise UnknownTableError(table)
        self.store.set(table, name, value)

    def _apply_action(self, a: Action) -> None:
        """Kamailio's ``ht_dmq_replay_action``; never replicates."""
        table = a.htname
        if table is None or table not in self.store.tables:
            raise UnknownTableError(table or "")
        action = a.action
        if action == ACTION_SET_CELL:  # the common case first
            if a.cname is None:
                raise BadRequest(f"action {action} without cname")
            self._set_cell(table, a.cname, a.value())
        elif a.action in (ACTION_SET_CELL_EXPIRE, ACTION_DEL_CELL):
            if a.cname is None:
                raise BadRequest(f"action {a.action} without cname")
            if a.action == ACTION_SET_CELL_EXPIRE:
                if a.intval is None:
                    raise BadRequest("SET_CELL_EXPIRE without intval")
                self.store.set_expire(table, a.cname, a.intval)
            else:
                self.store.delete(table, a.cname)
        elif a.action in (ACTION_RM_CELL_RE, ACTION_RM_CELL_SW):
            if a.strval is None:
                raise BadRequest(f"action {a.action} without strval")
            by_value = a.mode != 0
            if a.action == ACTION_RM_CELL_RE:
                self.store.remove_re(table, a.strval, by_value=by_value)
            else:
                self.store.remove_prefix(table, a.strval, by_value=by_value)
        else:
            raise HtableError(f"unrecognized action {a.action}")

    def _apply_bulk(self, bulk: Bulk, node: Node | None, sender: str) -> None:
        """Kamailio's ``ht_dmq_handle_sync``: set each cell with expiry ``expire - now``
        (``<= 0``: the table's default). Cells of unknown tables are skipped with a warning."""
        if bulk.unknown_keys:
            log.warning(
                "htable: sync from %s: unrecognized cell fields %s",
                sender,
                sorted(bulk.unknown_keys),
            )
        now = self.store.now()
        applied = 0
        missing: set[str] = set()
        self.sync_in["groups"] += 1
        if not bulk.cells:
            self.sync_in["finished"] += 1  # the empty group closes one node's answer
        for cell in bulk.cells:
            if cell.htname not in self.store:
                missing.add(cell.htname)
                continue
            current = self.store.get(cell.htname, cell.cname)
            if current is not None and _rank(current.value) > _rank(cell.value):
                self.stats.sync_cells_kept_local += 1  # a partition conflict: see "Re-join"
                continue
            self.store.set(cell.htname, cell.cname, cell.value, expire=cell.expire - now)
            applied += 1
        if missing:
            log.warning(
                "htable: sync from %s: no such tables %s; %d cells skipped",
                sender,
                sorted(missing),
                len(bulk.cells) - applied,
            )
        self.stats.groups_received += 1
        self.stats.cells_received += applied
        self.sync_in["cells"] += applied
        key: object = node.key if node is not None else sender
        progress = self._incoming.get(key)
        now_mono = time.monotonic()
        if progress is None or now_mono - progress.last > INCOMING_IDLE:
            # Kamailio's last group may carry cells, so its syncs only end by going quiet
            progress = self._incoming[key] = _Incoming()
        progress.last = now_mono
        progress.groups += 1
        progress.cells += applied
        if not bulk.cells:  # the final group of a pydmq sender (Kamailio's may have cells)
            log.info(
                "htable: sync from %s complete: %d cells in %d groups (%.2f s)",
                sender,
                progress.cells,
                progress.groups,
                time.monotonic() - progress.started,
            )
            del self._incoming[key]
        elif progress.cells - progress.logged >= PROGRESS_STEP:
            progress.logged = progress.cells
            log.info(
                "htable: sync from %s: %d cells in %d groups so far",
                sender,
                progress.cells,
                progress.groups,
            )
        else:
            log.debug("htable: sync group from %s: %d cells", sender, applied)

    # ---- DMQ: sync --------------------------------------------------------------------------
    def _on_membership(self, event: MembershipEvent) -> None:
        """Push our cells to a known node that comes back (see "Re-join" above)."""
        if event.kind != "up" or self.node is None or self._closed:
            return
        try:
            node = self.node.nodes.find(event.node_uri)
        except NodeError:
            return
        if node is None or node.local or node.status is not NodeStatus.ACTIVE:
            return
        rejoined = event.old_status is not None or node.key in self._known
        self._known.add(node.key)
        if not rejoined or not self.node.running:
            return
        was = event.old_status.value if event.old_status is not None else "removed"
        log.info("htable: %s is back (was %s): sending it our tables", _who(node), was)
        if self.sync_to(node) is not None:
            self.stats.rejoin_syncs += 1

    def _init_callback(self) -> None:
        """DMQ init callback (``dmq_init_sync``): ask every active node for its tables."""
        self.request_sync()

    def request_sync(self, table: str | None = None) -> asyncio.Future[list[Delivery]] | None:
        """Broadcast a sync request (``{"action":1}``, or the 5.8 per-table form) to every
        active node; the broadcast's future, or None when there is no DMQ channel."""
        if self.api is None or self.peer is None:
            return None
        if table is not None:
            self.store.table(table)
        targets = self.node.nodes.active_remote() if self.node is not None else []
        self.sync_in = {"asked": len(targets), "finished": 0, "groups": 0, "cells": 0}
        log.info(
            "htable: requesting sync of %s from %d nodes",
            f"table {table!r}" if table else "all tables",
            len(targets),
        )
        try:
            future = self.api.bcast_message(
                self.peer, encode_sync_request(table), content_type=CONTENT_TYPE
            )
        except (DmqError, RuntimeError) as exc:
            log.warning("htable: sync request not sent: %s", exc)
            return None
        future.add_done_callback(_ignore_outcome)
        return future

    def _answer_sync(self, node: Node | None, table: str | None, sender: str) -> None:
        """Start sending our cells to ``node``; to every active node when the requester is not
        in our node list (Kamailio)."""
        if self.node is None or self._closed:
            return
        targets = [node] if node is not None else self.node.nodes.active_remote()
        if node is None:
            log.info(
                "htable: sync request from unknown node %s: answering all %d active nodes",
                sender,
                len(targets),
            )
        for target in targets:
            self.sync_to(target, table)

    def sync_to(self, node: Node, table: str | None = None) -> asyncio.Task[SyncResult] | None:
        """Send our replicated cells to ``node`` (as if it had asked); the running task, or None
        when a sync to that node is already running (duplicate requests are ignored)."""
        running = self._syncs.get(node.key)
        if running is not None and not running.done():
            # The running push lists the keys of when it started: push again once it is over.
            self._dirty.add(node.key)
            log.info("htable: sync to %s already running; another follows it", _who(node))
            return None
        task = asyncio.get_running_loop().create_task(self._sync(node.snapshot(), table))
        self._syncs[node.key] = task
        task.add_done_callback(functools.partial(self._sync_done, node.key))
        return task

    def _sync_done(self, key: NodeKey, task: asyncio.Task[SyncResult]) -> None:
        if self._syncs.get(key) is task:
            del self._syncs[key]

    def group_limit(self, node: Node) -> int:
        """Largest sync body for ``node``: by its transport (see the module docstring)."""
        if node.proto in ("tcp", "tls"):
            return self.settings.sync_group_bytes
        return self.settings.sync_group_bytes_udp

    def _sync_parts(self, keys: Iterable[tuple[str, str]]) -> Iterator[bytes]:
        for table, name in keys:
            cell = self.store.sync_cell(table, name)
            if cell is None:
                continue
            part = encode_sync_cell(table, cell.name, cell.value, cell.expire)
            if len(part) + 12 > MAX_GROUP_BYTES:
                log.error(
                    "htable: cell %r of %r is too big to sync (%d bytes); left out",
                    name,
                    table,
                    len(part),
                )
                continue
            yield part

    async def _sync(self, node: Node, table: str | None) -> SyncResult:
        loop = asyncio.get_running_loop()
        keys = self.store.sync_keys(table)
        result = SyncResult(_who(node), table, len(keys), started=loop.time())
        self.sync_results.append(result)
        self.stats.syncs_started += 1
        limit = self.group_limit(node)
        window = self.settings.sync_window
        log.info(
            "htable: sync to %s: %d cells, groups of at most %d bytes, %d in flight",
            _who(node),
            len(keys),
            limit,
            window,
        )
        pending: dict[asyncio.Task[int], int] = {}
        logged = 0

        async def reap(block_until: int) -> None:
            nonlocal logged
            while len(pending) > block_until:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    count = pending.pop(task)
                    status = task.result()
                    if status != 200:
                        raise _SyncAborted(f"a group of {count} cells got {status}")
                    result.cells_sent += count
                    result.groups_sent += 1
                    self.stats.groups_sent += 1
                    self.stats.cells_sent += count
                if result.cells_sent - logged >= PROGRESS_STEP:
                    logged = result.cells_sent
                    log.info(
                        "htable: sync to %s: %d/%d cells, %d groups",
                        _who(node),
                        result.cells_sent,
                        result.cells_total,
                        result.groups_sent,
                    )

        try:
            for body, count in iter_groups(self._sync_parts(keys), limit):
                await reap(window - 1)
                pending[loop.create_task(self._deliver(node, body))] = count
                result.max_in_flight = max(result.max_in_flight, len(pending))
            await reap(0)
            status = await self._deliver(node, EMPTY_GROUP)  # the final group, after all others
            if status != 200:
                raise _SyncAborted(f"the final group got {status}")
            result.groups_sent += 1
            self.stats.groups_sent += 1
            result.ok = True
            self.stats.syncs_completed += 1
        except _SyncAborted as exc:
            result.error = str(exc)
            self.stats.syncs_failed += 1
            log.warning(
                "htable: sync to %s abandoned after %d/%d cells: %s",
                _who(node),
                result.cells_sent,
                result.cells_total,
                exc,
            )
        finally:
            for task in pending:
                task.cancel()
            result.finished = loop.time()
        if not result.ok:
            self._dirty.add(node.key)
        if result.ok:
            log.info(
                "htable: sync to %s complete: %d cells in %d groups, %.2f s",
                _who(node),
                result.cells_sent,
                result.groups_sent,
                result.seconds,
            )
        return result

    async def _deliver(self, node: Node, body: bytes) -> int:
        """Send one group; retry on 408/503. The final status (-1: could not be sent)."""
        assert self.api is not None and self.peer is not None
        status = -1
        for _attempt in range(1 + self.settings.sync_retries):
            try:
                future = self.api.send_message(self.peer, body, node, content_type=CONTENT_TYPE)
            except DmqError as exc:
                log.debug("htable: sync group to %s not sent: %s", _who(node), exc)
                return -1
            await asyncio.wait({future})
            if future.cancelled() or future.exception() is not None:
                return -1
            status = future.result()[0].status
            if status not in _RETRY_STATUS:
                return status
            log.info("htable: sync group to %s got %d; retrying", _who(node), status)
        return status


class _Outbox:
    """Replication messages on their way to one node.

    Kamailio hands received KDMQ requests to several workers, so two changes sent back to back
    may be applied in the wrong order (dmq-protocol.md §1.5.3): ``set k 41`` then ``incr k``
    could leave 41 on the peer. Both Kamailio and pydmq reply only after applying a change, so
    the outbox sends a change of a key only when no earlier change of the same key (or of the
    whole table: regex / prefix removal, flush) is still waiting for its reply. Changes of
    different keys commute and go out together, up to :data:`REPLICATION_WINDOW` at a time;
    the queue is FIFO. A node that stops answering holds at most :data:`REPLICATION_QUEUE`
    changes; more are dropped with a warning (a later sync repairs that node).
    """

    __slots__ = ("in_flight", "node", "queue", "service", "warned")

    def __init__(self, service: HtableService, node: Node) -> None:
        self.service = service
        self.node = node.snapshot()
        self.queue: deque[tuple[str, str | None, bytes]] = deque()
        self.in_flight: dict[asyncio.Future[list[Delivery]], tuple[str, str | None]] = {}
        self.warned = False

    def push(self, table: str, key: str | None, body: bytes) -> None:
        if len(self.queue) >= REPLICATION_QUEUE:
            self.service.stats.replication_dropped += 1
            self.service.mark_dirty(self.node)
            if not self.warned:
                self.warned = True
                log.warning(
                    "htable: %s is not answering; changes for it are being dropped", _who(self.node)
                )
            return
        self.queue.append((table, key, body))
        self.pump()

    def _blocked(self, table: str, key: str | None) -> bool:
        return any(
            t == table and (key is None or k is None or k == key)
            for t, k in self.in_flight.values()
        )

    def pump(self) -> None:
        service = self.service
        assert service.api is not None and service.peer is not None
        while self.queue and len(self.in_flight) < REPLICATION_WINDOW:
            table, key, body = self.queue[0]
            if self._blocked(table, key):
                return
            self.queue.popleft()
            try:
                future = service.api.send_message(
                    service.peer, body, self.node, content_type=CONTENT_TYPE
                )
            except DmqError as exc:
                service.stats.replication_dropped += 1
                service.mark_dirty(self.node)
                log.debug("htable: change for %s not sent: %s", _who(self.node), exc)
                continue
            self.in_flight[future] = (table, key)
            future.add_done_callback(self._done)

    def _done(self, future: asyncio.Future[list[Delivery]]) -> None:
        self.in_flight.pop(future, None)
        _ignore_outcome(future)
        if not future.cancelled() and future.exception() is None:
            self.warned = False
            if any(d.status != 200 for d in future.result()):
                self.service.mark_dirty(self.node)
        self.pump()

    def discard(self) -> int:
        """Forget what is queued (the node left the active list); the count dropped."""
        count = len(self.queue)
        self.queue.clear()
        return count


class _SyncAborted(Exception):
    pass


def _ignore_outcome(future: asyncio.Future[list[Delivery]]) -> None:
    """Replication is fire-and-forget, as in Kamailio (its htable response callback is a no-op);
    retrieve the outcome so that asyncio does not complain about it."""
    if not future.cancelled():
        with contextlib.suppress(Exception):
            future.result()


def _rank(value: Value) -> tuple[int, int] | tuple[int, str]:
    """The order of conflicting values: integers before strings, each in its natural order."""
    return (1, value) if isinstance(value, str) else (0, value)


def _who(node: Node) -> str:
    """A node for log lines: ``sip:host:port[;transport=t]`` without the status parameter."""
    port = f":{node.port_str}" if node.port_str else ""
    transport = f";transport={node.proto}" if node.proto in ("tcp", "tls") else ""
    return f"sip:{node.host}{port}{transport}"


def _sender(node: Node | None, request: Request) -> str:
    """The sender of ``request`` for log lines: the node, else the From URI as written."""
    return _who(node) if node is not None else _from_text(request)


def _from_text(request: Request) -> str:
    try:
        return str(request.from_.uri)
    except Exception:
        return "unknown sender"


def attach(
    node: DmqNode,
    settings: HtableSettings | Settings | None = None,
    *,
    clock: Callable[[], float] = time.time,
) -> HtableService:
    """Give ``node`` htable: tables from ``settings`` (default: ``node.settings.htable``), the
    ``htable`` channel when ``enable_dmq`` is set. Call it before ``node.start()`` so that the
    join-time sync request (``dmq_init_sync``) goes out; attached later, it is sent at once.
    The expiry sweeper starts now if an event loop is running, else call :meth:`start`."""
    if settings is None:
        settings = node.settings.htable
    elif isinstance(settings, Settings):
        settings = settings.htable
    service = HtableService(settings, node=node, clock=clock)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return service
    service.start()
    if node.running and settings.enable_dmq and settings.dmq_init_sync:
        asyncio.get_running_loop().call_soon(service.request_sync)
    return service
