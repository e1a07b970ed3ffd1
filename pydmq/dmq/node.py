"""DMQ node records, status words and the node builder (spec 2.1-2.4).

Everything here is pure: DNS resolution is an injected callable, so a body full of hostnames can be
tested without a network and a runtime can put a cache or an executor behind it.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from pydmq.sip.errors import SipParseError
from pydmq.sip.uri import SipUri

#: ``resolve(host) -> first IP address as text, or None``. Only called for non-literal hosts.
Resolver = Callable[[str], str | None]

#: Kamailio's primary node identity (spec 2.3): host string, port string, protocol.
NodeKey = tuple[str, str, str]

#: Protocol names as ``dmq.list_nodes`` prints them; ``*`` means "no transport parameter".
PROTO_NONE = "*"
PROTOS = frozenset({PROTO_NONE, "udp", "tcp", "tls", "sctp", "ws"})

#: Kamailio maps ``transport=wss`` to its WS protocol; ``transport=`` is matched case-insensitively.
_TRANSPORT_TO_PROTO = {
    "udp": "udp",
    "tcp": "tcp",
    "tls": "tls",
    "sctp": "sctp",
    "ws": "ws",
    "wss": "ws",
}

#: Body parsing limits. A Kamailio body is at most 1024 bytes (about 30 lines); ours may be
#: larger, but a SIP message is at most 64 KiB, so these bound the work per body.
DEFAULT_MAX_LINES = 2048
DEFAULT_MAX_BYTES = 65536
#: No node line is anywhere near this long (hosts are capped at 254 characters).
MAX_LINE_LENGTH = 1024

_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")


class NodeError(ValueError):
    """A node URI, status word or host that cannot make a node; the message says which."""


class NodeStatus(Enum):
    """6.1 status set. 5.6.3's ``pending`` and ``timeout`` parse as :attr:`NOT_ACTIVE`."""

    ACTIVE = "active"
    NOT_ACTIVE = "not_active"
    DISABLED = "disabled"

    @classmethod
    def from_word(cls, word: str) -> NodeStatus:
        """Map a wire/RPC status word (case-sensitive, like Kamailio); unknown words raise."""
        try:
            return _STATUS_WORDS[word]
        except KeyError:
            raise NodeError(f"unknown node status {_clip(word)!r}") from None


_STATUS_WORDS: dict[str, NodeStatus] = {
    "active": NodeStatus.ACTIVE,
    "not_active": NodeStatus.NOT_ACTIVE,
    "disabled": NodeStatus.DISABLED,
    # 5.6.3 words: a 5.6.3 peer may announce these; 6.1 folded both into not_active.
    "pending": NodeStatus.NOT_ACTIVE,
    "timeout": NodeStatus.NOT_ACTIVE,
}


@dataclass(slots=True)
class Node:
    """One entry of the node list (spec 2.1).

    ``uri`` is shared between snapshots and must be treated as immutable. ``port`` is ``None``
    when the URI has no port (Kamailio stores 0). ``last_notification`` is kept only because
    ``dmq.list_nodes`` prints it; Kamailio never writes it either.
    """

    orig_uri: str
    uri: SipUri
    host: str
    port_str: str
    port: int | None
    proto: str
    resolved_ip: str
    status: NodeStatus = NodeStatus.ACTIVE
    local: bool = False
    last_notification: int = 0
    fail_count: int = 0

    @property
    def key(self) -> NodeKey:
        """Identity used for every lookup: host and port *as written*, and the protocol."""
        return (self.host, self.port_str, self.proto)

    def snapshot(self) -> Node:
        """A detached copy, as Kamailio hands response callbacks the node as it was at send."""
        return dataclasses.replace(self)


def proto_of(uri: SipUri) -> str:
    """The node protocol of ``uri``: ``*`` without ``transport=``; unknown transports raise."""
    if not uri.has_param("transport"):
        return PROTO_NONE
    value = uri.transport
    proto = _TRANSPORT_TO_PROTO.get(value) if value else None
    if proto is None:
        raise NodeError(f"unsupported transport {_clip(value or '')!r}")
    return proto


def wire_key(key: NodeKey) -> NodeKey:
    """The identity a node has once it went through a notification body: ``transport=udp`` is
    never written there (spec 1.7), so a udp node comes back with proto ``*``."""
    host, port_str, proto = key
    return (host, port_str, PROTO_NONE) if proto == "udp" else key


def parse_node_uri(text: str) -> SipUri:
    """Parse a node URI, turning the SIP layer's error into :class:`NodeError`."""
    try:
        return SipUri.parse(text)
    except SipParseError as exc:
        raise NodeError(f"invalid node URI {_clip(text)!r}: {exc.reason}") from None


def node_key(text: str) -> NodeKey:
    """Identity of a URI text without building (or resolving) a node."""
    uri = parse_node_uri(text)
    return (uri.host, uri.port_str, proto_of(uri))


def build_node(text: str, resolve: Resolver | None = None) -> Node:
    """The node builder of spec 2.4 (6.1 rules: default status active).

    URI parse, ``status=`` (name and value case-sensitive; 5.6.3 words accepted), then the host is
    resolved once: IP literals directly, names through ``resolve``. Any failure is a
    :class:`NodeError`, so callers decide per line instead of aborting a whole body.
    """
    uri = parse_node_uri(text)
    proto = proto_of(uri)
    status = NodeStatus.ACTIVE
    if "status" in uri.params:
        word = uri.params["status"]
        status = NodeStatus.from_word(word if word is not None else "")
    resolved = _resolve_host(uri.host, resolve)
    return Node(
        orig_uri=text,
        uri=uri,
        host=uri.host,
        port_str=uri.port_str,
        port=uri.port,
        proto=proto,
        resolved_ip=resolved,
        status=status,
    )


def build_local_node(text: str, resolve: Resolver | None = None) -> Node:
    """The local node from ``server_address``: always active and local, as in ``mod_init``."""
    node = build_node(text, resolve)
    node.local = True
    node.status = NodeStatus.ACTIVE
    return node


def normalize_ip(text: str) -> str | None:
    """Canonical text of an IP literal (brackets allowed, v4-mapped IPv6 folded to IPv4), or
    ``None`` if it is not one."""
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        # A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d; compare them as IPv4.
        return str(ip.ipv4_mapped)
    return str(ip)


def _resolve_host(host: str, resolve: Resolver | None) -> str:
    literal = normalize_ip(host)
    if literal is not None:
        return literal
    if host.startswith("["):
        raise NodeError(f"invalid IPv6 reference {_clip(host)!r}")
    if resolve is None:
        raise NodeError(f"cannot resolve host {_clip(host)!r}: no resolver")
    try:
        answer = resolve(host)
    except NodeError:
        raise
    except (OSError, ValueError) as exc:  # socket.gaierror, UnicodeError (IDNA), ...
        raise NodeError(f"cannot resolve host {_clip(host)!r}: {exc}") from None
    if answer is None:
        raise NodeError(f"cannot resolve host {_clip(host)!r}")
    ip = normalize_ip(answer)
    if ip is None:
        raise NodeError(f"resolver returned a non-IP {_clip(answer)!r} for {_clip(host)!r}")
    return ip


@dataclass(frozen=True, slots=True)
class LineError:
    """Why one body line (1-based ``line_no``; 0 = the body as a whole) was not used."""

    line_no: int
    text: str
    reason: str

    def __str__(self) -> str:
        where = f"line {self.line_no}" if self.line_no else "body"
        return f"{where}: {self.reason}" + (f" ({self.text!r})" if self.text else "")


def parse_node_lines(
    body: bytes,
    resolve: Resolver | None = None,
    *,
    max_lines: int = DEFAULT_MAX_LINES,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> tuple[list[Node], list[LineError]]:
    """Tolerant notification-body parser (spec 1.7), shared by the codec and the merge.

    Unlike Kamailio, a bad line is reported and skipped instead of aborting the rest, and the last
    line keeps its last character even without a trailing newline. Work is bounded: at most
    ``max_bytes`` of input (cut at a line boundary) and ``max_lines`` lines are looked at, and a
    name is resolved at most once per body.
    """
    errors: list[LineError] = []
    if len(body) > max_bytes:
        errors.append(
            LineError(0, "", f"body of {len(body)} bytes exceeds {max_bytes}; rest ignored")
        )
        cut = body.rfind(b"\n", 0, max_bytes)
        body = body[: cut + 1] if cut >= 0 else b""
    body = body.rstrip(b"\r\n\x00")
    if not body:
        return [], errors
    raw_lines = body.split(b"\n", max_lines)
    if len(raw_lines) > max_lines:
        errors.append(LineError(0, "", f"more than {max_lines} lines; rest ignored"))
        del raw_lines[max_lines:]
    cache: dict[str, str | NodeError | None] = {}

    def cached(host: str) -> str | None:
        # One lookup per name and body: a body repeating an unresolvable name must not turn
        # into thousands of blocking DNS queries.
        if host not in cache:
            try:
                cache[host] = _resolve_host(host, resolve)
            except NodeError as exc:
                cache[host] = exc
        answer = cache[host]
        if isinstance(answer, NodeError):
            raise answer
        return answer

    nodes: list[Node] = []
    for line_no, raw in enumerate(raw_lines, 1):
        line = raw.rstrip(b"\r\n\x00")
        shown = _clip(line.decode("ascii", "backslashreplace"))
        if not line:
            errors.append(LineError(line_no, "", "empty line"))
            continue
        if len(line) > MAX_LINE_LENGTH:
            errors.append(LineError(line_no, shown, f"longer than {MAX_LINE_LENGTH} bytes"))
            continue
        if not line.isascii() or _CONTROL.search(line):
            errors.append(LineError(line_no, shown, "non-ASCII or control character"))
            continue
        try:
            nodes.append(build_node(line.decode("ascii"), cached))
        except NodeError as exc:
            errors.append(LineError(line_no, shown, str(exc)))
    return nodes, errors


def _clip(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
