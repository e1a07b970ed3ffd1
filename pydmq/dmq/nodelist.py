"""The DMQ node list and its status machine (spec 2.3, 2.6, 2.7 *6.1.x*, 2.11, 5).

Sans-I/O: callers feed replies, timeouts and bodies; the list changes state and records
:class:`MembershipEvent` items for whoever needs to react (consumers, logging, metrics).

Deliberate deviations from Kamailio, each because Kamailio's behaviour is a bug or a hazard:

* A body line whose identity equals the local node is never added as a second, non-local node
  (5.6.3 adds its own ``notification_address`` as a duplicate of itself and pings itself). Our
  identity as advertised (``transport=udp`` dropped, spec 2.3) counts as ourselves too.
* A bad body line is skipped and reported; the other lines still apply (Kamailio aborts the merge,
  and 5.6.3 deadlocks).
* No 5.8+ "same resolved IP" fallback when merging: it conflates several nodes on one IP with
  different ports (every single-host lab), so identity is only the primary rule.
* A body line never revives a ``not_active`` node, except the sender's own line in a request it
  sent (Kamailio 6.1 takes any ``active`` line). Bodies only list active nodes, so a peer that
  has not noticed the failure yet would flip our ``not_active`` entry back to active on every
  exchange: with two or more survivors a dead seed (or any node under ``remove_inactive = 0``)
  would flap between the two statuses instead of staying ``not_active``. A 200 from the node
  itself (spec 2.7) still revives it, as does its own request.
* Nodes named in ``notification_address`` (matched by the configured string *or* by identity) are
  never deleted: the 6.1 "snapshot was disabled -> delete" step is skipped for them and they fall
  through to the rest of the 408 rules (not_active, or the fail-count thresholds).
* Events are our own (Kamailio 5.6.3/6.1 has none; master has event routes): one per add, status
  change and removal of a *remote* node, RPC changes included. The local node emits none.
* No ghosts (``MembershipPolicy.rejoin_holdoff`` > 0, which the runtime sets): for that many
  seconds after a node was deleted because its pings timed out, an ``active`` line about it from
  *another* node (a stale list: that node has not noticed the death yet) does not make it active
  again. It comes back ``disabled`` and is queued for verification
  (:meth:`NodeList.take_unverified`, which the notification logic pings at once): a 200 from the
  node makes it active (a restarted node is back within one round trip), a 408 deletes it again.
  Disabled nodes are neither advertised nor sent to, so a dead node can no longer bounce between
  the lists of nodes that notice its death at different times (Kamailio re-adds it from every
  stale list, and with a few nodes it can circulate for as long as their detection times keep
  overlapping). The node's own line in a request it sent is always taken as is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

from pydmq.dmq.node import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_LINES,
    LineError,
    Node,
    NodeError,
    NodeKey,
    NodeStatus,
    Resolver,
    build_node,
    node_key,
    normalize_ip,
    parse_node_lines,
    parse_node_uri,
    proto_of,
    wire_key,
)

EventKind = Literal["up", "down", "disabled", "removed"]

_KIND_OF: dict[NodeStatus, EventKind] = {
    NodeStatus.ACTIVE: "up",
    NodeStatus.NOT_ACTIVE: "down",
    NodeStatus.DISABLED: "disabled",
}

#: A node, its identity, or a URI text naming it.
NodeRef = Node | NodeKey | str


@dataclass(frozen=True, slots=True)
class MembershipEvent:
    """A remote node was added (``old_status`` None), changed, or removed (``new_status`` None).

    ``kind`` follows the new status (``up`` active, ``down`` not_active, ``disabled``), or is
    ``removed``.
    """

    kind: EventKind
    node_uri: str
    old_status: NodeStatus | None
    new_status: NodeStatus | None


@dataclass(frozen=True, slots=True)
class MembershipPolicy:
    """The modparams that steer the status machine (defaults are Kamailio 6.1's)."""

    remove_inactive: bool = True
    fail_count_enabled: bool = False
    fail_count_threshold_not_active: int = 0
    fail_count_threshold_disabled: int = 1
    notification_addresses: tuple[str, ...] = ()
    #: Seconds after a node was deleted for not answering during which another node's line
    #: about it only re-adds it ``disabled``, pending a ping of its own (0: off, as Kamailio).
    rejoin_holdoff: float = 0.0


class RpcFault(Exception):
    """An RPC fault with Kamailio's code and message (``500 Invalid Parameters``...)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{code} {message}")
        self.code = code
        self.message = message


RPC_STATUS_WORDS = ("active", "not_active", "disabled")


class NodeList:
    """The node list, newest first (``dmq.list_nodes`` order); the local node is always in it.

    Accessors return snapshots, so the only way to change a node is through this class, which
    keeps the identity index, the "local is never changed nor duplicated" rule and the events
    consistent.
    """

    def __init__(
        self,
        local: Node,
        policy: MembershipPolicy | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._policy = policy if policy is not None else MembershipPolicy()
        self._clock = clock
        #: identity -> clock time until which a third party's line cannot make it active
        self._buried: dict[NodeKey, float] = {}
        self._unverified: list[NodeKey] = []
        self._local = dataclasses.replace(local, local=True, status=NodeStatus.ACTIVE)
        self._nodes: list[Node] = [self._local]
        # Our own identity, also as it comes back from a body (udp is never written there), so
        # that no line about ourselves can ever become a second, non-local node.
        self._index: dict[NodeKey, Node] = {
            self._local.key: self._local,
            wire_key(self._local.key): self._local,
        }
        self._events: list[MembershipEvent] = []
        self._notif_uris = frozenset(self._policy.notification_addresses)
        keys: set[NodeKey] = set()
        for text in self._policy.notification_addresses:
            with contextlib.suppress(NodeError):  # such an address never becomes a node
                keys.add(node_key(text))
        self._notif_keys = frozenset(keys)

    # ----------------------------------------------------------------- reading

    @property
    def policy(self) -> MembershipPolicy:
        return self._policy

    @property
    def local(self) -> Node:
        """Snapshot of the local node."""
        return self._local.snapshot()

    def __len__(self) -> int:
        return len(self._nodes)

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes())

    def __contains__(self, ref: object) -> bool:
        if not isinstance(ref, Node | tuple | str):
            return False
        try:
            return self._lookup(ref) is not None
        except (NodeError, TypeError):
            return False

    def nodes(self) -> list[Node]:
        """Snapshots of every node, newest first."""
        return [n.snapshot() for n in self._nodes]

    def find(self, ref: NodeRef) -> Node | None:
        """Snapshot of the node with this identity, the local node included.

        A URI text is parsed (not resolved); a text that is not a node URI raises
        :class:`NodeError`.
        """
        node = self._lookup(ref)
        return node.snapshot() if node is not None else None

    def active_remote(self, except_node: NodeRef | None = None) -> list[Node]:
        """Broadcast targets (spec 2.11): active, non-local, not ``except_node``."""
        skip = self._key_of(except_node) if except_node is not None else None
        return [
            n.snapshot()
            for n in self._nodes
            if not n.local and n.status is NodeStatus.ACTIVE and n.key != skip
        ]

    def remote(self) -> list[Node]:
        """Ping targets (spec 2.8): every non-local node whatever its status."""
        return [n.snapshot() for n in self._nodes if not n.local]

    def is_from_node(self, ip: str) -> bool:
        """``dmq_is_from_node``: the source IP equals the resolved IP of any non-local node."""
        norm = normalize_ip(ip)
        return norm is not None and any(not n.local and n.resolved_ip == norm for n in self._nodes)

    def is_notification_address(self, ref: NodeRef) -> bool:
        """Configured as a ``notification_address``, by exact string or by identity."""
        node = self._lookup(ref) if not isinstance(ref, Node) else ref
        if node is None:
            return False
        return node.orig_uri in self._notif_uris or node.key in self._notif_keys

    def drain_events(self) -> list[MembershipEvent]:
        """Events since the last call, oldest first."""
        events, self._events = self._events, []
        return events

    def take_unverified(self) -> list[Node]:
        """Nodes re-added ``disabled`` from a stale line since the last call (see the module
        notes on ghosts): ping them now, the reply decides. Snapshots; each is returned once."""
        keys, self._unverified = self._unverified, []
        found = (self._index.get(key) for key in dict.fromkeys(keys))
        return [n.snapshot() for n in found if n is not None and n.status is NodeStatus.DISABLED]

    def is_buried(self, ref: NodeRef) -> bool:
        """Deleted for not answering less than ``rejoin_holdoff`` seconds ago."""
        with contextlib.suppress(NodeError):
            key = self._key_of(ref)
            until = self._buried.get(key)
            if until is not None:
                if self._clock() < until:
                    return True
                del self._buried[key]
        return False

    # ----------------------------------------------------------------- changing

    def add(self, node: Node) -> bool:
        """Add a remote node at the front; False if its identity is known (ourselves included)."""
        if node.local or node.key in self._index:
            return False
        self._insert(dataclasses.replace(node, local=False))
        self._buried.pop(node.key, None)
        return True

    def remove(self, ref: NodeRef) -> bool:
        """Delete a remote node; the local node is refused. True if something was deleted."""
        node = self._lookup(ref)
        if node is None or node.local:
            return False
        self._delete(node)
        return True

    def set_status(self, ref: NodeRef, status: NodeStatus) -> bool:
        """Force a remote node's status (admin use); True if it changed. Local is refused."""
        node = self._lookup(ref)
        if node is None or node.local:
            return False
        return self._set_status(node, status)

    def set_local_status(self, status: NodeStatus) -> None:
        """Only for our own shutdown announcement (spec 2.9); emits no event."""
        self._local.status = status

    def merge(
        self,
        source: bytes | str | Iterable[str],
        resolve: Resolver | None = None,
        *,
        max_lines: int = DEFAULT_MAX_LINES,
        max_bytes: int = DEFAULT_MAX_BYTES,
        errors: list[LineError] | None = None,
        sender: NodeRef | None = None,
    ) -> int:
        """Merge a received node list (spec 2.6, 6.1 rules); returns the new-or-changed count.

        Per line: unknown identity -> added with its status (even disabled), except a node
        deleted for not answering less than ``rejoin_holdoff`` ago, which a line other than its
        own brings back only ``disabled`` and unverified (not counted; see
        :meth:`take_unverified`); known, remote, the line has some URI parameter, a different
        status, and the stored status is not disabled -> take the line's status, except that only
        ``sender``'s own line (the node whose request carried the body) may turn a not_active
        node active again; anything about ourselves -> ignored. Bad lines are appended to
        ``errors`` (if given) and skipped; nothing here raises on bad input.

        Names already in the list reuse their stored address (Kamailio resolves once per node
        too), so only genuinely new names reach ``resolve``.
        """
        body = _as_bytes(source)
        known = {n.host: n.resolved_ip for n in self._nodes}

        def lookup(host: str) -> str | None:
            if host in known:
                return known[host]
            if resolve is None:
                raise NodeError(f"cannot resolve host {host[:80]!r}: no resolver")
            return resolve(host)

        nodes, errs = parse_node_lines(body, lookup, max_lines=max_lines, max_bytes=max_bytes)
        if errors is not None:
            errors.extend(errs)
        sender_key: NodeKey | None = None
        with contextlib.suppress(NodeError):
            sender_key = self._key_of(sender) if sender is not None else None
        changed = 0
        for line_node in nodes:
            key = line_node.key
            current = self._index.get(key)
            if current is None:
                if key != sender_key and self.is_buried(key):
                    if line_node.status is NodeStatus.ACTIVE:
                        line_node.status = NodeStatus.DISABLED
                        self._insert(line_node)
                        self._unverified.append(key)
                    continue
                self._insert(line_node)
                self._buried.pop(key, None)
                changed += 1
            elif (
                not current.local
                and line_node.uri.params
                and line_node.status is not current.status
                and current.status is not NodeStatus.DISABLED
                and not (
                    current.status is NodeStatus.NOT_ACTIVE
                    and line_node.status is NodeStatus.ACTIVE
                    and key != sender_key
                )
            ):
                self._set_status(current, line_node.status)
                changed += 1
        return changed

    def on_reply(self, node: Node, status: int) -> None:
        """Notification response callback, spec 2.7 *6.1.x* (body merging is the caller's).

        ``node`` is the snapshot taken when the request was sent; "status at send time" below
        means its status, every other check uses the list's current entry.
        """
        current = self._index.get(node.key)
        if current is None or current.local:
            return
        policy = self._policy
        if status == 200:
            if policy.fail_count_enabled:
                current.fail_count = 0
            self._set_status(current, NodeStatus.ACTIVE)
            self._buried.pop(current.key, None)
        elif status == 408:
            protected = self.is_notification_address(current)
            if node.status is NodeStatus.DISABLED and not protected:
                self._delete(current)
                if policy.rejoin_holdoff > 0:
                    now = self._clock()
                    # forget the expired ones, so that dead identities do not pile up
                    self._buried = {k: t for k, t in self._buried.items() if t > now}
                    self._buried[current.key] = now + policy.rejoin_holdoff
            elif policy.fail_count_enabled:
                self._count_failure(current)
            elif protected or not policy.remove_inactive:
                self._set_status(current, NodeStatus.NOT_ACTIVE)
            else:
                self._set_status(current, NodeStatus.DISABLED)

    def on_consumer_timeout(self, node: NodeRef) -> None:
        """6.1 default response callback on 408: counts only while active, so consumer traffic
        can at most move a node to not_active, never disable or delete it."""
        if not self._policy.fail_count_enabled:
            return
        current = self._lookup(node)
        if current is not None and not current.local and current.status is NodeStatus.ACTIVE:
            self._count_failure(current)

    # ----------------------------------------------------------------- RPC (spec 5)

    def rpc_list_nodes(self) -> list[dict[str, str | int]]:
        """``dmq.list_nodes`` (6.1 fields, in order)."""
        return [
            {
                "host": n.host,
                "port": n.port_str,
                "proto": n.proto,
                "resolved_ip": n.resolved_ip,
                "status": n.status.value,
                "last_notification": n.last_notification,
                "local": int(n.local),
                "fail_count": n.fail_count,
            }
            for n in self._nodes
        ]

    def rpc_remove(self, uri: str | None) -> str:
        """``dmq.remove``: always "removed", even when nothing matched or local was refused."""
        if uri is None:
            raise RpcFault(500, "Invalid Parameters")
        key = self._rpc_key(uri, fault="Failure")
        if key is not None:
            self.remove(key)
        return "Ok. DMQ node removed."

    def rpc_add(self, uri: str | None, resolve: Resolver | None = None) -> str:
        """``dmq.add`` (master): status from ``;status=`` or active."""
        if uri is None:
            raise RpcFault(500, "Invalid Parameters")
        key = self._rpc_key(uri, fault="Failure")
        if key is not None and key in self._index:
            raise RpcFault(500, "Node is already added")
        try:
            node = build_node(uri, resolve)
        except NodeError:
            raise RpcFault(500, "Failure") from None
        self.add(node)
        return "Ok. DMQ node added."

    def rpc_change_status(self, uri: str | None, status: str | None) -> str:
        """``dmq.change_status`` (master). An unparsable URI is reported as Invalid Parameters."""
        if uri is None or status is None:
            raise RpcFault(500, "Invalid Parameters")
        if status not in RPC_STATUS_WORDS:
            raise RpcFault(500, "Invalid Status - use: active, not_active, disabled")
        key = self._rpc_key(uri, fault="Invalid Parameters")
        node = self._index.get(key) if key is not None else None
        if node is None:
            raise RpcFault(500, "Node Not Found")
        if node.local:
            raise RpcFault(500, "Node is local")
        new = NodeStatus(status)
        if node.status is new:
            return f"Ok. DMQ node status is already {status}."
        self._set_status(node, new)
        return "Ok. DMQ node status changed."

    # ----------------------------------------------------------------- internals

    def _rpc_key(self, uri: str, *, fault: str) -> NodeKey | None:
        """Identity of an RPC argument; None when it parses but can name no node (a transport
        Kamailio would call "unknown")."""
        try:
            parsed = parse_node_uri(uri)
        except NodeError:
            raise RpcFault(500, fault) from None
        try:
            return (parsed.host, parsed.port_str, proto_of(parsed))
        except NodeError:
            return None

    def _key_of(self, ref: NodeRef) -> NodeKey:
        if isinstance(ref, Node):
            return ref.key
        if isinstance(ref, str):
            return node_key(ref)
        return ref

    def _lookup(self, ref: NodeRef) -> Node | None:
        return self._index.get(self._key_of(ref))

    def _insert(self, node: Node) -> None:
        node.local = False
        self._nodes.insert(0, node)
        self._index[node.key] = node
        self._events.append(
            MembershipEvent(_KIND_OF[node.status], node.orig_uri, None, node.status)
        )

    def _delete(self, node: Node) -> None:
        self._nodes.remove(node)
        del self._index[node.key]
        self._events.append(MembershipEvent("removed", node.orig_uri, node.status, None))

    def _set_status(self, node: Node, status: NodeStatus) -> bool:
        old = node.status
        if old is status:
            return False
        node.status = status
        if not node.local:
            self._events.append(MembershipEvent(_KIND_OF[status], node.orig_uri, old, status))
        return True

    def _count_failure(self, node: Node) -> None:
        """6.1 ``update_dmq_node_status_on_timeout``: count, then at most one step down."""
        policy = self._policy
        node.fail_count += 1
        if (
            node.fail_count > policy.fail_count_threshold_disabled
            and node.status is NodeStatus.NOT_ACTIVE
        ):
            self._set_status(node, NodeStatus.DISABLED)
        elif (
            node.fail_count > policy.fail_count_threshold_not_active
            and node.status is NodeStatus.ACTIVE
        ):
            self._set_status(node, NodeStatus.NOT_ACTIVE)


def _as_bytes(source: bytes | str | Iterable[str]) -> bytes:
    if isinstance(source, bytes | bytearray | memoryview):
        return bytes(source)
    if isinstance(source, str):
        # Lone surrogates become non-ASCII bytes, which the parser rejects per line.
        return source.encode("utf-8", "surrogatepass")
    return b"".join(line.encode("utf-8", "surrogatepass") + b"\n" for line in source)
