"""The ``notification_peer`` channel: body codec and membership logic (spec 1.7, 1.8, 2.5-2.9).

Sans-I/O. :class:`NotificationLogic` is fed requests, replies and timer ticks and answers with
:class:`RequestOutcome` / lists of :data:`Command`; the runtime turns ``SendNotification`` into
KDMQ requests (with the notification response callback) and feeds each final reply (or the local
408) back through :meth:`NotificationLogic.on_reply`.

Deviations from Kamailio, on purpose:

* ``encode_body`` never writes what 5.6.3 cannot parse (a bad line deadlocks 5.6.3, spec 1.7):
  only ``active``/``disabled``, never ``transport=udp``, CRLF after every line. A node without a
  port is written ``sip:host`` (Kamailio writes the broken ``sip:host:``). Bodies over 1024 bytes
  are produced, but flagged, because Kamailio peers cannot echo them.
* ``parse_body`` is tolerant (a garbage line is skipped and reported, the rest applies) and
  bounded; Kamailio aborts on the first bad line and drops the last character of an unterminated
  last line.
* A request without Content-Length leaves the list alone, as in Kamailio (the parse fails before
  touching it), and is still answered 200 with our list, because Kamailio's callback ignores the
  parse result when building the reply; it triggers no re-broadcast.
* ``shutdown`` really sends the disabled announcement that Kamailio only intends (spec 2.9).
* After ``shutdown`` requests are still answered, but nothing is broadcast, pinged or initialised.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from pydmq.dmq.node import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_LINES,
    LineError,
    Node,
    NodeError,
    NodeStatus,
    Resolver,
    build_node,
    parse_node_lines,
)
from pydmq.dmq.nodelist import NodeList, NodeRef

NOTIFICATION_CHANNEL = "notification_peer"
CONTENT_TYPE = "text/plain"
#: Kamailio's fixed notification body buffer; bigger bodies cannot be answered by Kamailio.
KAMAILIO_BODY_LIMIT = 1024
#: Max-Forwards values (spec 1.8).
MF_REQUEST_NODE_LIST = 2
MF_PING = 1

#: Transports written on the wire (Kamailio's list; udp is never written).
_WIRE_TRANSPORTS = frozenset({"tcp", "tls", "sctp", "ws"})
_SAFE_TOKEN = re.compile(r"[A-Za-z0-9.\-_:\[\]%]+")
_SAFE_PORT = re.compile(r"[0-9]{0,5}")


# --------------------------------------------------------------------------- codec


def encode_line(node: Node) -> str:
    """``sip:<host>:<port>[;transport=<proto>];status=<active|disabled>`` (no CRLF)."""
    hostport = f"{node.host}:{node.port_str}" if node.port_str else node.host
    transport = f";transport={node.proto}" if node.proto in _WIRE_TRANSPORTS else ""
    status = "disabled" if node.status is NodeStatus.DISABLED else "active"
    return f"sip:{hostport}{transport};status={status}"


def encode_body(nodes: Iterable[Node]) -> bytes:
    """The notification body: the local node and active nodes, in the order given, CRLF after
    every line. A hand-made node whose host or port could break the line is left out rather
    than sent to a peer that would choke on it."""
    lines = [
        encode_line(n) + "\r\n"
        for n in nodes
        if (n.local or n.status is NodeStatus.ACTIVE)
        and _SAFE_TOKEN.fullmatch(n.host)
        and _SAFE_PORT.fullmatch(n.port_str)
    ]
    return "".join(lines).encode("ascii")


def exceeds_kamailio_limit(body: bytes) -> bool:
    """True when a Kamailio peer could not build a body this big to answer or forward it."""
    return len(body) > KAMAILIO_BODY_LIMIT


def parse_body(
    body: bytes,
    max_lines: int = DEFAULT_MAX_LINES,
    max_bytes: int = DEFAULT_MAX_BYTES,
    *,
    resolve: Resolver | None = None,
) -> tuple[list[Node], list[LineError]]:
    """Decode a body into nodes, per line, never raising; see :func:`parse_node_lines`.

    Without ``resolve`` only IP-literal hosts make nodes; a name is reported as unresolvable.
    """
    return parse_node_lines(body, resolve, max_lines=max_lines, max_bytes=max_bytes)


# --------------------------------------------------------------------------- commands


@dataclass(frozen=True, slots=True)
class SendNotification:
    """Send a KDMQ on ``channel`` to ``node`` (a snapshot, handed back in ``on_reply``)."""

    node: Node
    body: bytes
    max_forwards: int
    channel: str = NOTIFICATION_CHANNEL
    content_type: str = CONTENT_TYPE

    @property
    def oversize(self) -> bool:
        return exceeds_kamailio_limit(self.body)


@dataclass(frozen=True, slots=True)
class RunInitCallbacks:
    """Run every peer's init callback (consumer sync requests). ``trigger`` is the node whose
    request or reply caused it, when known (for master's ``init_with_single`` style)."""

    trigger: Node | None = None


@dataclass(frozen=True, slots=True)
class LogWarning:
    """Something an operator should see; no action needed from the runtime."""

    message: str


Command = SendNotification | RunInitCallbacks | LogWarning


@dataclass(frozen=True, slots=True)
class RequestOutcome:
    """The reply to an incoming notification and what to do next.

    ``changed`` is the merge result (-1: list left alone). The reply may go out before or after
    ``commands`` are started; Kamailio starts its re-broadcast first, nothing depends on it.
    """

    status: int
    reason: str
    content_type: str
    body: bytes
    commands: tuple[Command, ...]
    changed: int
    errors: tuple[LineError, ...] = ()

    @property
    def oversize(self) -> bool:
        return exceeds_kamailio_limit(self.body)


# --------------------------------------------------------------------------- logic


class NotificationLogic:
    """The notification channel's behaviour around one :class:`NodeList`."""

    def __init__(
        self,
        nodes: NodeList,
        resolve: Resolver | None = None,
        *,
        channel: str = NOTIFICATION_CHANNEL,
    ) -> None:
        self.nodes = nodes
        self.channel = channel
        self._resolve = resolve
        self.init_callbacks_done = False
        self.stopped = False

    @property
    def notification_addresses(self) -> tuple[str, ...]:
        return self.nodes.policy.notification_addresses

    def body(self) -> bytes:
        """Our current node list as a body."""
        return encode_body(self.nodes.nodes())

    def start(self) -> list[Command]:
        """Add the notification addresses (no duplicates, never ourselves), then "request node
        list": our body to every non-local node whatever its status, Max-Forwards 2 (spec 2.5)."""
        if not self.notification_addresses or self.stopped:
            return []
        commands: list[Command] = []
        for text in self.notification_addresses:
            try:
                node = build_node(text, self._resolve)
            except NodeError as exc:
                commands.append(LogWarning(f"notification_address {text!r} not added: {exc}"))
                continue
            self.nodes.add(node)  # refuses duplicates and ourselves
        targets = self.nodes.remote()
        if not targets:
            commands.append(
                LogWarning("no notification node to ask for the node list; the ping will retry")
            )
            return commands
        return commands + self._send(targets, MF_REQUEST_NODE_LIST)

    def on_request(
        self,
        sender: NodeRef | None,
        body: bytes | None,
        max_forwards: int | None,
        has_content_length: bool,
    ) -> RequestOutcome:
        """An incoming notification request (spec 2.6 steps 1-6). Always answered 200."""
        mf = max_forwards - 1 if max_forwards is not None else 0
        commands: list[Command] = []
        errors: list[LineError] = []
        if has_content_length:
            changed = self.nodes.merge(body or b"", self._resolve, errors=errors, sender=sender)
            commands.extend(_error_summary(errors, sender))
        else:
            changed = -1
            commands.append(
                LogWarning("notification request without Content-Length; node list left alone")
            )
        reply = self.body()
        if changed > 0 and mf > 0 and not self.stopped:
            commands.extend(self._send(self.nodes.active_remote(), mf, reply))
        commands.extend(self._verify())
        commands.extend(self._init_once(self._find(sender)))
        return RequestOutcome(
            200, "OK", CONTENT_TYPE, reply, tuple(commands), changed, tuple(errors)
        )

    def on_reply(self, node: Node, status: int, body: bytes | None = None) -> list[Command]:
        """Final reply (or local 408) to one of our notification requests (spec 2.7)."""
        self.nodes.on_reply(node, status)
        if status != 200:
            return []
        commands: list[Command] = []
        if body:
            errors: list[LineError] = []
            self.nodes.merge(body, self._resolve, errors=errors)
            commands.extend(_error_summary(errors, node))
            commands.extend(self._verify())
        commands.extend(self._init_once(self.nodes.find(node.key)))
        return commands

    def on_ping_timer(self) -> list[Command]:
        """Spec 2.8: alone -> forget the init callbacks and redo the start; otherwise ping every
        non-local node whatever its status with Max-Forwards 1."""
        if self.stopped:
            return []
        targets = self.nodes.remote()
        if not targets:
            self.init_callbacks_done = False
            if not self.notification_addresses:
                return [LogWarning("node list holds only ourselves and no notification_address")]
            return self.start()
        return self._send(targets, MF_PING)

    def shutdown(self) -> list[Command]:
        """Announce our departure: local -> disabled, body to every non-local node, MF 1."""
        self.stopped = True
        self.nodes.set_local_status(NodeStatus.DISABLED)
        return self._send(self.nodes.remote(), MF_PING)

    # ------------------------------------------------------------------ internals

    def _send(self, targets: list[Node], mf: int, body: bytes | None = None) -> list[Command]:
        data = self.body() if body is None else body
        commands: list[Command] = [
            SendNotification(node, data, mf, self.channel) for node in targets
        ]
        if commands and exceeds_kamailio_limit(data):
            commands.append(
                LogWarning(
                    f"notification body is {len(data)} bytes, over Kamailio's "
                    f"{KAMAILIO_BODY_LIMIT}; Kamailio peers cannot answer or forward it"
                )
            )
        return commands

    def _verify(self) -> list[Command]:
        """Ping the nodes a stale line brought back ``disabled`` (NodeList.take_unverified):
        their own reply decides whether they are alive, at once rather than a ping later."""
        targets = self.nodes.take_unverified()
        if not targets or self.stopped:
            return []
        return self._send(targets, MF_PING)

    def _init_once(self, trigger: Node | None) -> list[Command]:
        if self.init_callbacks_done or self.stopped:
            return []
        self.init_callbacks_done = True
        return [RunInitCallbacks(trigger)]

    def _find(self, ref: NodeRef | None) -> Node | None:
        if ref is None:
            return None
        try:
            return self.nodes.find(ref)
        except NodeError:
            return None


def _error_summary(errors: list[LineError], source: NodeRef | None) -> list[Command]:
    if not errors:
        return []
    who = source.orig_uri if isinstance(source, Node) else source
    shown = "; ".join(str(e) for e in errors[:3])
    more = f" (+{len(errors) - 3} more)" if len(errors) > 3 else ""
    return [LogWarning(f"{len(errors)} bad line(s) in notification body from {who}: {shown}{more}")]
