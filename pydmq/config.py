"""pydmq settings: one typed, frozen :class:`Settings` object, validated once at start-up.

This is the bottom layer: it imports nothing else from pydmq, so every layer above can take a
``Settings`` (or one of its sections) without import cycles. It does its own light SIP URI check
for that reason.

Sources, lowest to highest precedence (a later source replaces a key, it does not merge lists):

1. built-in defaults (the dataclass defaults below; Kamailio's documented modparam defaults except
   ``dmq.server_address``, which Kamailio leaves NULL and pydmq sets to ``sip:127.0.0.1:5060`` so
   that ``pydmq run`` works without a file);
2. a TOML file (``-c/--config FILE``, else ``$PYDMQ_CONFIG``). Tables ``[dmq]`` (Kamailio's
   modparam names, exactly), ``[tm]``, ``[sip]``, ``[rpc]``, ``[log]``, ``[usrloc]``, ``[htable]``,
   ``[script]``.
   Unknown   tables and keys are errors, because a silently ignored typo is a misconfigured cluster;
3. environment variables ``PYDMQ_<TABLE>_<KEY>``, e.g. ``PYDMQ_DMQ_PING_INTERVAL=5``; lists are
   comma-separated. Only variables whose ``<TABLE>`` is a known table are read, and an unknown
   ``<KEY>`` there is an error; other ``PYDMQ_*`` variables (``PYDMQ_CONFIG``) are left alone;
4. command-line flags: ``--set TABLE.KEY=VALUE`` (repeatable, the last one wins, values written as
   for environment variables), then the convenience flags ``--server-address``,
   ``--notification-address`` (repeatable; together they replace the whole list) and
   ``--ping-interval``, which beat ``--set`` for the same key.

Every value given anywhere is validated, even one a later source overrides, so ``check-config``
reports a bad file even when the environment masks it. The first problem stops loading with one
:class:`ConfigError` naming the parameter, the value, what is allowed and where it came from.
Things that work but are probably unintended (``ping_interval`` below the documented minimum 60)
are returned as warnings and logged on the ``pydmq.config`` logger.

See ``docs/configuration.md`` for every parameter.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import ipaddress
import json
import logging
import math
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

__all__ = [
    "ConfigError",
    "DmqSettings",
    "HtableSettings",
    "HtableSpec",
    "IPNetwork",
    "LogSettings",
    "RpcSettings",
    "ScriptSettings",
    "Settings",
    "SipSettings",
    "TmSettings",
    "UsrlocSettings",
    "add_cli_arguments",
    "load_settings",
    "parse_htable_spec",
    "settings_from_args",
    "settings_from_mapping",
]

logger = logging.getLogger(__name__)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Environment variable naming the config file when ``-c`` is not given.
CONFIG_ENV = "PYDMQ_CONFIG"
ENV_PREFIX = "PYDMQ_"
#: The documented minimum of ``ping_interval``; Kamailio's code only enforces 5.
DOCUMENTED_MIN_PING_INTERVAL = 60
KAMAILIO_MIN_PING_INTERVAL = 5
#: Kamailio modparams of type int are C ints.
_INT_MAX = 2**31 - 1
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class ConfigError(ValueError):
    """A setting is wrong; the message names the parameter, the value and what is allowed."""


# --------------------------------------------------------------------------------------------
# The settings object
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DmqSettings:
    """``[dmq]``: Kamailio's dmq modparams under their own names, plus pydmq extensions."""

    #: This node's SIP URI as advertised to peers; needs an explicit port (Kamailio: NULL).
    server_address: str = "sip:127.0.0.1:5060"
    #: ``proto:host[:port]`` to send/receive on; ``None`` derives it from server_address.
    server_socket: str | None = None
    #: Seed nodes to learn the node list from (the modparam can be repeated in Kamailio).
    notification_address: tuple[str, ...] = ()
    notification_channel: str = "notification_peer"
    #: Expand the (single) notification address to all its SRV/A/AAAA addresses.
    multi_notify: bool = False
    #: Worker queues; 0 runs channel callbacks inline (Kamailio's handle would return -1).
    num_workers: int = 2
    #: Microseconds between queue polls; 0 wakes workers on demand (recommended).
    worker_usleep: int = 0
    #: Seconds between pings of every node.
    ping_interval: int = 60
    # The next four exist from Kamailio 6.1; 5.6.3 has none of them.
    remove_inactive: bool = True
    fail_count_enabled: bool = False
    fail_count_threshold_not_active: int = 0
    fail_count_threshold_disabled: int = 1
    #: pydmq: source networks allowed to send KDMQ requests (default: everyone).
    allowed_sources: tuple[IPNetwork, ...] = (
        ipaddress.ip_network("0.0.0.0/0"),
        ipaddress.ip_network("::/0"),
    )
    #: pydmq: jobs one worker queue may hold before requests are refused with 503.
    max_queue: int = 10000
    #: pydmq: ``IP[:port]`` of the DNS server that multi_notify asks; ``None`` = the system's.
    dns_server: str | None = None


@dataclass(frozen=True, slots=True)
class TmSettings:
    """``[tm]``: non-INVITE client transaction timers, in seconds (Kamailio's tm uses ms)."""

    t1: float = 0.5
    t2: float = 4.0
    t4: float = 5.0
    fr_timer: float = 30.0


@dataclass(frozen=True, slots=True)
class SipSettings:
    """``[sip]``: parser limits, TCP and TLS."""

    max_message_size: int = 65535
    max_headers: int = 100
    max_line: int = 8192
    #: Seconds an idle TCP/TLS connection is kept (Kamailio's tcp_connection_lifetime).
    tcp_idle_timeout: float = 120.0
    #: Seconds a TCP/TLS message may take to arrive once its first byte did (Kamailio's
    #: tcp_msg_read_timeout): a slowloris peer is closed after that.
    tcp_msg_read_timeout: float = 10.0
    #: TCP/TLS connections at once, opening ones included (Kamailio's tcp_max_connections).
    tcp_max_connections: int = 2048
    #: Receiver processes per UDP listener (Kamailio's ``children``; pydmq.sip.prefork): they
    #: answer the stateless requests, the kernel steers the rest to us. 0: we read everything.
    udp_children: int = 0
    tls_certfile: str | None = None
    tls_keyfile: str | None = None
    tls_cafile: str | None = None
    tls_verify_client: bool = False


@dataclass(frozen=True, slots=True)
class RpcSettings:
    """``[rpc]``: JSON-RPC listeners; unauthenticated, hence loopback by default."""

    #: ``host:port`` of the HTTP listener; ``None`` (empty string in TOML) disables it.
    http_address: str | None = "127.0.0.1:5080"
    #: Path of a unix socket listener; ``None`` disables it.
    unix_socket: str | None = None


@dataclass(frozen=True, slots=True)
class LogSettings:
    """``[log]``."""

    level: str = "INFO"


@dataclass(frozen=True, slots=True)
class UsrlocSettings:
    """``[usrloc]``: the replicated location table (dmq_usrloc's modparams, usrloc's
    ``timer_interval`` and ``use_domain``, plus pydmq's sync flow control)."""

    #: Run the location table and its ``usrloc`` channel (dmq_usrloc ``enable``).
    enable: bool = False
    #: Ask the other nodes for their contacts once joined (dmq_usrloc ``sync``).
    sync: bool = True
    #: The usrloc domain (table) replicated (dmq_usrloc ``usrloc_domain``).
    usrloc_domain: str = "location"
    #: Replicate local deletions as RM (dmq_usrloc ``usrloc_delete``).
    usrloc_delete: bool = True
    #: Send and read the ``sock`` key (dmq_usrloc ``replicate_socket_info``).
    replicate_socket_info: bool = False
    #: Contacts per sync message; above 1 sync answers use ``multi`` batches (max 150).
    batch_msg_contacts: int = 1
    #: Largest ``multi`` batch body in bytes (max 60000).
    batch_msg_size: int = 60000
    #: pydmq: sync messages one peer may have unanswered at once (Kamailio: batch_usleep).
    sync_in_flight: int = 8
    #: Seconds between two runs of the expiry timer (usrloc ``timer_interval``).
    timer_interval: int = 60
    #: AoRs are ``user@domain`` instead of ``user`` (usrloc ``use_domain``).
    use_domain: bool = False


@dataclass(frozen=True, slots=True)
class HtableSpec:
    """One table definition, parsed from Kamailio's ``htable`` modparam syntax.

    ``name=>size=8;autoexpire=3600;dmqreplicate=1;initval=0;updateexpire=1`` (see
    :func:`parse_htable_spec`). Database attributes (``dbtable``, ``dbmode``, ``cols``, ...)
    are refused: pydmq has no database.
    """

    name: str
    #: Kamailio's ``size``: the table has 2**size slots (clamped like Kamailio, see ``slots``).
    size: int = 4
    #: Seconds after the last update a cell expires; 0 = cells never expire.
    autoexpire: int = 0
    #: An update of a cell restarts its expiry (Kamailio default 1).
    updateexpire: bool = True
    #: Replicate changes over DMQ (needs ``[htable] enable_dmq``).
    dmqreplicate: bool = False
    #: Integer a missing cell starts from for increments (``initval``); None = not set.
    initval: int | None = None

    @property
    def slots(self) -> int:
        """Number of hash slots, as Kamailio computes it (only visible in dump/stats)."""
        if self.size <= 1:
            return 8
        if self.size > 31:
            return 1 << 14
        return 1 << self.size


_HTABLE_UNSIGNED = ("size", "autoexpire", "updateexpire", "dmqreplicate")
_HTABLE_UNSUPPORTED = ("dbtable", "dbmode", "cols", "coldelim", "colnull", "reloadat")
_HTABLE_INT_MAX = 2**31 - 1


def parse_htable_spec(text: str) -> HtableSpec:
    """Parse ``name=>attr=value;...`` (Kamailio's ``htable`` modparam); ValueError if invalid.

    Attribute names are case-sensitive as in Kamailio; numbers are decimal; a trailing ``;``
    is allowed; an unknown or repeated attribute is an error.
    """
    name, arrow, rest = text.strip().partition("=>")
    name = name.strip()
    if not arrow:
        raise ValueError("must look like name=>size=8;autoexpire=0;dmqreplicate=1")
    if not name or any(c.isspace() or c in "=;" for c in name):
        raise ValueError(f"table name {name!r} must be non-empty, without spaces, '=' or ';'")
    rest = rest.strip()
    if rest.endswith(";"):
        rest = rest[:-1]
    values: dict[str, int] = {}
    for item in rest.split(";") if rest else []:
        key, eq, raw = (part.strip() for part in item.partition("="))
        if key in _HTABLE_UNSUPPORTED:
            raise ValueError(f"attribute {key} is not supported: pydmq has no database")
        if key not in (*_HTABLE_UNSIGNED, "initval"):
            known = (*_HTABLE_UNSIGNED, "initval")
            raise ValueError(
                f"unknown attribute {key!r}{_suggest(key, known)}; allowed: {', '.join(known)}"
            )
        if key in values:
            raise ValueError(f"attribute {key} is given twice")
        pattern = r"-?[0-9]+" if key == "initval" else r"[0-9]+"
        if not eq or not re.fullmatch(pattern, raw) or abs(int(raw)) > _HTABLE_INT_MAX:
            kind = "an integer" if key == "initval" else "a non-negative integer"
            raise ValueError(f"{key} = {raw!r} must be {kind} below 2**31")
        values[key] = int(raw)
    for flag in ("updateexpire", "dmqreplicate"):
        if values.get(flag, 0) > 1:
            raise ValueError(f"{flag} must be 0 or 1, not {values[flag]}")
    return HtableSpec(
        name=name,
        size=values.get("size", 4),
        autoexpire=values.get("autoexpire", 0),
        updateexpire=bool(values.get("updateexpire", 1)),
        dmqreplicate=bool(values.get("dmqreplicate", 0)),
        initval=values.get("initval"),
    )


@dataclass(frozen=True, slots=True)
class HtableSettings:
    """``[htable]``: htable's modparams (``htable`` is ``tables`` here) plus sync flow control."""

    #: Table definitions in Kamailio's syntax, e.g. ``"t=>size=8;autoexpire=0;dmqreplicate=1"``.
    tables: tuple[str, ...] = ()
    #: Register the ``htable`` DMQ channel and replicate tables with ``dmqreplicate=1``.
    enable_dmq: bool = False
    #: Ask the other nodes for their replicated tables once joined.
    dmq_init_sync: bool = False
    #: Seconds between two sweeps of expired cells (Kamailio's ``timer_interval``).
    timer_interval: int = 20
    #: pydmq: sync groups one peer may have unanswered at once.
    sync_window: int = 4
    #: pydmq: largest ``{"cells":[...]}`` body sent to a TCP/TLS node (Kamailio's default
    #: ``tcp_rd_buf_size`` drops SIP messages above 16 KB received over TCP).
    sync_group_bytes: int = 15000
    #: pydmq: largest sync body sent to a UDP node: with the KDMQ headers (about 450 bytes) the
    #: datagram fits a 1500-byte MTU, so it is never fragmented (Kamailio sends up to 60000).
    sync_group_bytes_udp: int = 1000
    #: pydmq: extra attempts of a sync group that timed out (408) or got 503.
    sync_retries: int = 2

    @property
    def specs(self) -> tuple[HtableSpec, ...]:
        """The parsed :attr:`tables`."""
        return tuple(parse_htable_spec(t) for t in self.tables)


@dataclass(frozen=True, slots=True)
class ScriptSettings:
    """``[script]``: the routing script (``pydmq run --script`` overrides ``path``)."""

    #: Python file defining ``request_route(msg)``; ``None``: the default route
    #: (KDMQ -> dmq_handle_message, OPTIONS -> 200, anything else -> 404).
    path: str | None = None


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything a pydmq process is configured with; build it with :func:`load_settings`."""

    dmq: DmqSettings = field(default_factory=DmqSettings)
    tm: TmSettings = field(default_factory=TmSettings)
    sip: SipSettings = field(default_factory=SipSettings)
    rpc: RpcSettings = field(default_factory=RpcSettings)
    log: LogSettings = field(default_factory=LogSettings)
    usrloc: UsrlocSettings = field(default_factory=UsrlocSettings)
    htable: HtableSettings = field(default_factory=HtableSettings)
    script: ScriptSettings = field(default_factory=ScriptSettings)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain JSON-compatible ``{table: {key: value}}`` for ``check-config``; unset is None."""
        return {
            f.name: {
                sf.name: _plain(getattr(getattr(self, f.name), sf.name))
                for sf in dataclasses.fields(getattr(self, f.name))
            }
            for f in dataclasses.fields(self)
        }


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return str(value)
    return value


# --------------------------------------------------------------------------------------------
# Field checkers. A checker turns a native (TOML) value into the stored value or raises
# _Invalid("must ..."); a parser turns environment/CLI text into a native value, leaving text it
# cannot read unchanged so that the checker reports it.
# --------------------------------------------------------------------------------------------


class _Invalid(Exception):
    """Internal: the value is not allowed; ``str(self)`` says what is."""


def _keep(text: str) -> Any:
    return text


@dataclass(frozen=True, slots=True)
class _Field:
    check: Callable[[Any], Any]
    parse: Callable[[str], Any] = _keep


def _int_field(lo: int, hi: int = _INT_MAX, note: str = "") -> _Field:
    allowed = f"must be an integer from {lo} to {hi}{note}"

    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise _Invalid(allowed)
        return value

    def parse(text: str) -> Any:
        t = text.strip()
        return int(t) if re.fullmatch(r"[+-]?[0-9]+", t) else text

    return _Field(check, parse)


def _seconds_field(hi: float) -> _Field:
    allowed = (
        f"must be a number of seconds greater than 0 and at most {hi:g}"
        " (seconds, not milliseconds as in Kamailio's tm modparams)"
    )

    def check(value: Any) -> float:
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or not 0 < value <= hi
        ):
            raise _Invalid(allowed)
        return float(value)

    def parse(text: str) -> Any:
        try:
            return float(text.strip())
        except ValueError:
            return text

    return _Field(check, parse)


_BOOL_TEXT = {"true": True, "false": False, "1": True, "0": False}


def _check_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise _Invalid("must be a boolean: true, false, 1 or 0")


_BOOL = _Field(_check_bool, lambda text: _BOOL_TEXT.get(text.strip().lower(), text))


def _str_field(validate: Callable[[str], str], what: str, *, optional: bool = False) -> _Field:
    """A string checked by ``validate``; ``optional`` maps "" (TOML has no null) to None."""

    def check(value: Any) -> str | None:
        if optional and (value is None or value == ""):
            return None
        if not isinstance(value, str):
            raise _Invalid(f"must be a string: {what}")
        return validate(value)

    return _Field(check)


def _list_field(item: Callable[[str], Any], what: str, *, allow_empty: bool = True) -> _Field:
    """A list of strings; one bare string is a list of one; text from env/CLI is comma-split."""

    def check(value: Any) -> tuple[Any, ...]:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise _Invalid(f"must be {what}, or a list of them")
        if not value and not allow_empty:
            raise _Invalid(f"must list at least one {what}")
        out = []
        for v in value:
            try:
                out.append(item(v))
            except _Invalid as exc:
                raise _Invalid(f"item {_show(v)} {exc}") from None
        return tuple(out)

    def parse(text: str) -> Any:
        return [p.strip() for p in text.split(",") if p.strip()]

    return _Field(check, parse)


# ---- light SIP URI / address checks (pydmq.sip.uri is a layer above us) ---------------------

_URI_EXAMPLE = "sip:10.0.0.20:5060 or sip:10.0.0.20:5061;transport=tls"
_HOSTNAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?")
_PORT = re.compile(r"[0-9]{1,5}")
_CHANNEL = re.compile(r"[A-Za-z0-9\-_.!~*'()&=+$,]+")
_NO_PORT = (
    "must have an explicit port (e.g. sip:10.0.0.20:5060): Kamailio writes a node without a port"
    " as 'sip:host:;status=active' in notification bodies, which peers cannot parse"
)
_NO_UDP = (
    "must not carry transport=udp: UDP is the default anyway, and notification bodies drop"
    " ';transport=udp', so Kamailio 5.6.3 sees the address come back as a different node and"
    " adds a duplicate of it; write the URI without the transport parameter"
)


class _Uri(NamedTuple):
    scheme: str
    host: str
    port: int | None
    transport: str | None


def _check_host(host: str) -> None:
    if not host:
        raise _Invalid("has no host")
    if host.startswith("["):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise _Invalid(f"host {host} is not an IPv6 address") from None
    elif re.fullmatch(r"[0-9.]+", host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise _Invalid(f"host {host} is not an IPv4 address") from None
    elif not _HOSTNAME.fullmatch(host) or ".." in host:
        raise _Invalid(f"host {host!r} is not an IP address or a host name")


def _split_hostport(hostport: str, *, min_port: int = 1) -> tuple[str, int | None]:
    """``host[:port]`` with IPv6 in brackets; the port, when written, must be a number."""
    if hostport.startswith("["):
        end = hostport.find("]")
        if end < 0:
            raise _Invalid("has an IPv6 address with no closing ']'")
        host, rest = hostport[: end + 1], hostport[end + 1 :]
        if rest and not rest.startswith(":"):
            raise _Invalid(f"has {rest!r} after the host where ':port' belongs")
    else:
        host, colon, port_text = hostport.partition(":")
        if ":" in port_text:
            raise _Invalid("has more than one ':'; write an IPv6 address in brackets, e.g. [::1]")
        rest = colon + port_text
    _check_host(host)
    if not rest:
        return host, None
    port_text = rest[1:]
    if not port_text:
        raise _Invalid("has ':' after the host but no port number")
    if not _PORT.fullmatch(port_text) or not min_port <= int(port_text) <= 65535:
        raise _Invalid(f"port {port_text!r} must be a number from {min_port} to 65535")
    return host, int(port_text)


def _parse_sip_uri(text: str) -> _Uri:
    scheme, colon, rest = text.partition(":")
    if not colon or scheme.lower() not in ("sip", "sips"):
        raise _Invalid(f"must be a sip: or sips: URI, e.g. {_URI_EXAMPLE}")
    if any(c.isspace() for c in text):
        raise _Invalid("must not contain whitespace")
    if "?" in rest:
        raise _Invalid("must not carry URI headers ('?...')")
    rest = rest[rest.rfind("@") + 1 :]  # a user part is allowed and ignored, as in Kamailio
    hostport, _, paramstr = rest.partition(";")
    try:
        host, port = _split_hostport(hostport)
    except _Invalid as exc:
        raise _Invalid(f"{exc} (expected a SIP URI such as {_URI_EXAMPLE})") from None
    transport: str | None = None
    if paramstr:
        for item in paramstr.split(";"):
            name, _, value = item.partition("=")
            if not name:
                raise _Invalid("has an empty ';parameter'")
            if name.lower() == "transport":
                transport = value.lower()
    if transport == "udp":
        raise _Invalid(_NO_UDP)
    if transport is not None and transport not in ("tcp", "tls"):
        raise _Invalid(
            f"transport={transport} is not supported: use tcp or tls, or no transport for UDP"
        )
    return _Uri(scheme.lower(), host, port, transport)


def _server_address(text: str) -> str:
    uri = _parse_sip_uri(text)
    if uri.port is None:
        raise _Invalid(_NO_PORT)
    if _is_unspecified(uri.host):
        raise _Invalid(
            f"host {uri.host} cannot be advertised to peers: give the address peers reach this"
            " node at (listen on a wildcard with server_socket if needed)"
        )
    return text


def _notification_address(text: str) -> str:
    _parse_sip_uri(text)
    return text


def _server_socket(text: str) -> str:
    proto, colon, hostport = text.partition(":")
    if not colon or proto.lower() not in ("udp", "tcp", "tls"):
        raise _Invalid(
            "must look like proto:host[:port] with proto udp, tcp or tls, e.g. udp:10.0.0.20:5060"
        )
    try:
        _split_hostport(hostport)
    except _Invalid as exc:
        raise _Invalid(f"{exc} (expected proto:host[:port], e.g. udp:10.0.0.20:5060)") from None
    return text


def _dns_server(text: str) -> str:
    example = "e.g. 10.0.0.53, 127.0.0.1:5353 or [::1]:53"
    try:
        host, _port = _split_hostport(text)
    except _Invalid as exc:
        raise _Invalid(f"must be IP[:port], {example} ({exc})") from None
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        raise _Invalid(
            f"must be an IP address with an optional port, {example}: a DNS server named by a"
            " host name would need DNS to be found"
        ) from None
    return text


def _channel(text: str) -> str:
    if not _CHANNEL.fullmatch(text):
        raise _Invalid(
            "must be a non-empty SIP user part (letters, digits, and -_.!~*'()&=+$,), since the"
            " channel name is the Request-URI user"
        )
    return text


def _cidr(text: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(text.strip())
    except ValueError as exc:
        raise _Invalid(f"must be an IP network in CIDR form, e.g. 10.0.0.0/24 ({exc})") from None


def _http_address(text: str) -> str:
    try:
        _host, port = _split_hostport(text, min_port=0)
    except _Invalid as exc:
        raise _Invalid(
            f"must be host:port, e.g. 127.0.0.1:5080 or [::1]:5080, or empty to disable ({exc})"
        ) from None
    if port is None:
        raise _Invalid("must be host:port with an explicit port, e.g. 127.0.0.1:5080")
    return text


def _is_loopback(address: str) -> bool:
    """Whether the ``host:port`` of an HTTP listener is a loopback IP (or ``localhost``)."""
    host = address.rpartition(":")[0].strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _unix_socket(text: str) -> str:
    if "\0" in text or len(os.fsencode(text)) > 107:
        raise _Invalid("must be a path of at most 107 bytes (the AF_UNIX limit), or empty")
    return text


def _existing_file(text: str) -> str:
    if not os.path.isfile(text):
        raise _Invalid("must name an existing, readable file (or be empty)")
    return text


def _log_level(text: str) -> str:
    level = text.strip().upper()
    if level not in _LOG_LEVELS:
        raise _Invalid("must be one of " + ", ".join(_LOG_LEVELS) + " (any case)")
    return level


def _usrloc_domain(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_]+", text):
        raise _Invalid("must be a table name: letters, digits and _ (e.g. location)")
    return text


def _htable_table(text: str) -> str:
    try:
        parse_htable_spec(text)
    except ValueError as exc:
        raise _Invalid(str(exc)) from None
    return text.strip()


def _is_unspecified(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        return False


_FIELDS: dict[str, dict[str, _Field]] = {
    "dmq": {
        "server_address": _str_field(_server_address, f"a SIP URI, e.g. {_URI_EXAMPLE}"),
        "server_socket": _str_field(_server_socket, "proto:host[:port]", optional=True),
        "notification_address": _list_field(_notification_address, "a sip: or sips: URI"),
        "notification_channel": _str_field(_channel, "a channel name"),
        "multi_notify": _BOOL,
        "num_workers": _int_field(0, 1024, " (0 = run channel callbacks inline)"),
        "worker_usleep": _int_field(0, note=" (microseconds; 0 = wake workers on demand)"),
        "ping_interval": _int_field(
            1, 86400, f" (documented minimum {DOCUMENTED_MIN_PING_INTERVAL})"
        ),
        "remove_inactive": _BOOL,
        "fail_count_enabled": _BOOL,
        "fail_count_threshold_not_active": _int_field(0),
        "fail_count_threshold_disabled": _int_field(0),
        "allowed_sources": _list_field(_cidr, "a CIDR network", allow_empty=False),
        "max_queue": _int_field(1),
        "dns_server": _str_field(_dns_server, "IP[:port]", optional=True),
    },
    "tm": {
        "t1": _seconds_field(60),
        "t2": _seconds_field(600),
        "t4": _seconds_field(600),
        "fr_timer": _seconds_field(3600),
    },
    "sip": {
        "max_message_size": _int_field(1024, 16 * 1024 * 1024, " (bytes)"),
        "max_headers": _int_field(1, 10000),
        "max_line": _int_field(256, 65535, " (bytes)"),
        "tcp_idle_timeout": _seconds_field(86400),
        "tcp_msg_read_timeout": _seconds_field(3600),
        "tcp_max_connections": _int_field(1, 1_000_000),
        "udp_children": _int_field(0, 64),
        "tls_certfile": _str_field(_existing_file, "a file path", optional=True),
        "tls_keyfile": _str_field(_existing_file, "a file path", optional=True),
        "tls_cafile": _str_field(_existing_file, "a file path", optional=True),
        "tls_verify_client": _BOOL,
    },
    "rpc": {
        "http_address": _str_field(_http_address, "host:port", optional=True),
        "unix_socket": _str_field(_unix_socket, "a path", optional=True),
    },
    "log": {
        "level": _str_field(_log_level, "a log level name"),
    },
    "script": {
        "path": _str_field(_existing_file, "a Python file", optional=True),
    },
    "usrloc": {
        "enable": _BOOL,
        "sync": _BOOL,
        "usrloc_domain": _str_field(_usrloc_domain, "a usrloc table name"),
        "usrloc_delete": _BOOL,
        "replicate_socket_info": _BOOL,
        "batch_msg_contacts": _int_field(1, 150),
        "batch_msg_size": _int_field(1, 60000, " (bytes)"),
        "sync_in_flight": _int_field(1, 1000),
        "timer_interval": _int_field(1, 86400, " (seconds)"),
        "use_domain": _BOOL,
    },
    "htable": {
        "tables": _list_field(_htable_table, "a table definition like t=>size=8;dmqreplicate=1"),
        "enable_dmq": _BOOL,
        "dmq_init_sync": _BOOL,
        "timer_interval": _int_field(1, 86400, " (seconds)"),
        "sync_window": _int_field(1, 64),
        "sync_group_bytes": _int_field(1024, 60000, " (bytes)"),
        "sync_group_bytes_udp": _int_field(512, 60000, " (bytes)"),
        "sync_retries": _int_field(0, 10),
    },
}


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _show(value: Any) -> str:
    """A value as the user would write it in TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return str(value)


def _suggest(name: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _unknown_key(table: str, key: str, source: str) -> ConfigError:
    known = _FIELDS[table]
    return ConfigError(
        f"unknown setting {table}.{key} [from {source}]{_suggest(key, known)};"
        f" [{table}] accepts: {', '.join(known)}"
    )


def _unknown_table(table: str, source: str) -> ConfigError:
    return ConfigError(
        f"unknown table [{table}] [from {source}]{_suggest(table, _FIELDS)};"
        f" known tables: {', '.join(f'[{t}]' for t in _FIELDS)}"
    )


class _Values:
    """Checked values by (table, key); a later ``set`` replaces an earlier one."""

    def __init__(self) -> None:
        self.values: dict[str, dict[str, Any]] = {table: {} for table in _FIELDS}

    def set(self, table: str, key: str, value: Any, source: str, *, text: bool) -> None:
        if table not in _FIELDS:
            raise _unknown_table(table, source)
        spec = _FIELDS[table].get(key)
        if spec is None:
            raise _unknown_key(table, key, source)
        raw = spec.parse(value) if text and isinstance(value, str) else value
        try:
            self.values[table][key] = spec.check(raw)
        except _Invalid as exc:
            raise ConfigError(f"{table}.{key} = {_show(raw)}: {exc} [from {source}]") from None

    def add_mapping(self, data: Mapping[str, Any], source: str) -> None:
        for table, body in data.items():
            if not isinstance(body, Mapping):
                owner = [t for t, keys in _FIELDS.items() if table in keys]
                hint = f"; put it under [{owner[0]}]" if owner else ""
                if table in _FIELDS:
                    raise ConfigError(f"{table} [from {source}]: must be a table [{table}]")
                raise ConfigError(
                    f"unknown top-level key {table} [from {source}]: settings live in tables"
                    f" ({', '.join(f'[{t}]' for t in _FIELDS)}){hint}"
                )
            if table not in _FIELDS:
                raise _unknown_table(table, source)
            for key, value in body.items():
                self.set(table, key, value, source, text=False)

    def add_environ(self, environ: Mapping[str, str]) -> None:
        for name in sorted(environ):
            if not name.startswith(ENV_PREFIX):
                continue
            table, sep, key = name[len(ENV_PREFIX) :].partition("_")
            if not sep or table.lower() not in _FIELDS:
                continue  # PYDMQ_CONFIG and variables for other tools
            self.set(table.lower(), key.lower(), environ[name], f"environment {name}", text=True)

    def add_override(self, item: str) -> None:
        dotted, eq, value = item.partition("=")
        table, dot, key = dotted.strip().partition(".")
        if not eq or not dot or not table or not key:
            raise ConfigError(
                f"--set {item!r}: expected TABLE.KEY=VALUE, e.g. dmq.ping_interval=90"
            )
        self.set(table, key, value, f"--set {dotted.strip()}", text=True)

    def build(self) -> Settings:
        v = self.values
        return Settings(
            dmq=DmqSettings(**v["dmq"]),
            tm=TmSettings(**v["tm"]),
            sip=SipSettings(**v["sip"]),
            rpc=RpcSettings(**v["rpc"]),
            log=LogSettings(**v["log"]),
            usrloc=UsrlocSettings(**v["usrloc"]),
            htable=HtableSettings(**v["htable"]),
            script=ScriptSettings(**v["script"]),
        )


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None


def _tls_user(dmq: DmqSettings) -> str | None:
    """The setting (``name = value``) that makes this node speak TLS, if any."""
    uri = _parse_sip_uri(dmq.server_address)
    if uri.scheme == "sips" or uri.transport == "tls":
        return f"dmq.server_address = {_show(dmq.server_address)}"
    if dmq.server_socket is not None and dmq.server_socket.lower().startswith("tls:"):
        return f"dmq.server_socket = {_show(dmq.server_socket)}"
    return None


def _cross_check(s: Settings) -> list[str]:
    """Rules between parameters: raise for the impossible, return warnings for the doubtful."""
    warnings: list[str] = []
    d = s.dmq
    if d.multi_notify and len(d.notification_address) > 1:
        raise ConfigError(
            f"dmq.multi_notify = 1 with {len(d.notification_address)} notification_address"
            f" values {_show(d.notification_address)}: Kamailio does not support multi_notify"
            " with several notification addresses (it would use only the first); give one"
            " address whose name resolves to every seed, or set multi_notify = 0"
        )
    if d.dns_server is not None and not d.multi_notify:
        warnings.append(
            f"dmq.dns_server = {_show(d.dns_server)} has no effect with multi_notify = 0: it is"
            " only used to expand the notification address; node host names are always"
            " resolved by the system resolver"
        )
    if s.tm.t2 < s.tm.t1:
        raise ConfigError(
            f"tm.t2 = {s.tm.t2:g}: must be at least tm.t1 ({s.tm.t1:g}), since UDP"
            " retransmissions start at t1 and double up to t2"
        )
    tls_user = _tls_user(d)
    if tls_user is not None and s.sip.tls_certfile is None:
        raise ConfigError(
            f"sip.tls_certfile is not set, but {tls_user} uses TLS, which needs a certificate"
            " (and sip.tls_keyfile unless the key is in the same PEM file)"
        )
    if s.sip.tls_keyfile is not None and s.sip.tls_certfile is None:
        raise ConfigError(
            f"sip.tls_keyfile = {_show(s.sip.tls_keyfile)}: needs sip.tls_certfile as well"
        )
    if d.ping_interval < DOCUMENTED_MIN_PING_INTERVAL:
        floor = (
            f"; Kamailio peers never ping more often than every {KAMAILIO_MIN_PING_INTERVAL} s"
            if d.ping_interval < KAMAILIO_MIN_PING_INTERVAL
            else f" (Kamailio's code enforces only {KAMAILIO_MIN_PING_INTERVAL})"
        )
        warnings.append(
            f"dmq.ping_interval = {d.ping_interval} is below the documented minimum of"
            f" {DOCUMENTED_MIN_PING_INTERVAL} seconds{floor}; every node pings every node each"
            " interval, so the traffic grows with the square of the cluster size"
        )
    seen: set[str] = set()
    for addr in d.notification_address:
        if addr in seen:
            warnings.append(
                f"dmq.notification_address lists {_show(addr)} twice; Kamailio 5.6.3 would add"
                " it as two nodes"
            )
        seen.add(addr)
        uri = _parse_sip_uri(addr)
        if uri.port is None and not d.multi_notify:
            warnings.append(
                f"dmq.notification_address {_show(addr)} has no port: once that node is active"
                " Kamailio advertises it as 'sip:host:;status=active', which peers cannot parse;"
                " write the port"
            )
        try:
            ip = ipaddress.ip_address(uri.host.strip("[]"))
        except ValueError:
            continue
        if not any(ip in net for net in d.allowed_sources if net.version == ip.version):
            warnings.append(
                f"dmq.notification_address {_show(addr)} is outside dmq.allowed_sources:"
                " its requests will be refused"
            )
    if s.sip.tls_verify_client and s.sip.tls_cafile is None:
        warnings.append(
            "sip.tls_verify_client = true without sip.tls_cafile: client certificates are"
            " checked against the system CA store"
        )
    if s.rpc.http_address is not None and not _is_loopback(s.rpc.http_address):
        warnings.append(
            f"rpc.http_address = {_show(s.rpc.http_address)} is not a loopback address:"
            " JSON-RPC has no authentication, so anyone who reaches it can change the node list"
            " and send KDMQ; keep it on 127.0.0.1/::1 (or use rpc.unix_socket)"
        )
    warnings += _htable_check(s.htable)
    return warnings


def _htable_check(h: HtableSettings) -> list[str]:
    """Duplicate table names are an error (Kamailio refuses to start); DMQ knobs without DMQ
    are warnings."""
    warnings: list[str] = []
    seen: set[str] = set()
    for spec in h.specs:
        if spec.name in seen:
            raise ConfigError(
                f"htable.tables defines table {spec.name!r} twice (Kamailio: htable already"
                " configured)"
            )
        seen.add(spec.name)
        if spec.dmqreplicate and not h.enable_dmq:
            warnings.append(
                f"htable table {spec.name!r} has dmqreplicate=1 but htable.enable_dmq = 0:"
                " it is not replicated"
            )
    if h.dmq_init_sync and not h.enable_dmq:
        warnings.append("htable.dmq_init_sync = 1 has no effect with htable.enable_dmq = 0")
    return warnings


def _finish(values: _Values) -> tuple[Settings, list[str]]:
    settings = values.build()
    warnings = _cross_check(settings)
    for message in warnings:
        logger.warning("%s", message)
    return settings, warnings


def _collect(path: str | None, environ: Mapping[str, str], overrides: Sequence[str]) -> _Values:
    values = _Values()
    if path is not None:
        values.add_mapping(_read_toml(path), f"file {path}")
    values.add_environ(environ)
    for item in overrides:
        values.add_override(item)
    return values


def load_settings(
    path: str | None, environ: Mapping[str, str], overrides: Sequence[str]
) -> tuple[Settings, list[str]]:
    """Defaults < TOML file ``path`` < ``PYDMQ_<TABLE>_<KEY>`` in ``environ`` < ``overrides``.

    ``overrides`` are ``TABLE.KEY=VALUE`` strings as given to ``--set``. Returns the settings and
    the warnings (also logged). Raises :class:`ConfigError` on the first problem.
    """
    return _finish(_collect(path, environ, overrides))


def settings_from_mapping(
    data: Mapping[str, Any], source: str = "mapping"
) -> tuple[Settings, list[str]]:
    """Settings from a TOML-shaped ``{table: {key: value}}`` mapping, for embedding and tests."""
    values = _Values()
    values.add_mapping(data, source)
    return _finish(values)


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the configuration flags; :func:`settings_from_args` reads them back."""
    group = parser.add_argument_group(
        "configuration",
        "precedence: defaults < --config file < PYDMQ_<TABLE>_<KEY> environment variables"
        " < --set < the convenience flags below",
    )
    group.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        default=None,
        help=f"TOML settings file (default: ${CONFIG_ENV}, else built-in defaults)",
    )
    group.add_argument(
        "--set",
        dest="settings_overrides",
        metavar="TABLE.KEY=VALUE",
        action="append",
        default=None,
        help="override one setting, e.g. dmq.ping_interval=90 (repeatable; lists comma-separated)",
    )
    group.add_argument("--server-address", metavar="URI", default=None, help="dmq.server_address")
    group.add_argument(
        "--notification-address",
        metavar="URI",
        action="append",
        default=None,
        help="dmq.notification_address (repeatable; replaces the configured list)",
    )
    group.add_argument("--ping-interval", metavar="SECONDS", default=None, help="dmq.ping_interval")


def settings_from_args(
    args: argparse.Namespace, environ: Mapping[str, str]
) -> tuple[Settings, list[str]]:
    """Load settings as :func:`add_cli_arguments` flags and ``environ`` say."""
    path: str | None = getattr(args, "config", None) or environ.get(CONFIG_ENV) or None
    overrides: list[str] = getattr(args, "settings_overrides", None) or []
    values = _collect(path, environ, overrides)
    server_address: str | None = getattr(args, "server_address", None)
    if server_address is not None:
        values.set("dmq", "server_address", server_address, "--server-address", text=False)
    notification: list[str] | None = getattr(args, "notification_address", None)
    if notification is not None:
        values.set(
            "dmq", "notification_address", notification, "--notification-address", text=False
        )
    ping: str | None = getattr(args, "ping_interval", None)
    if ping is not None:
        values.set("dmq", "ping_interval", ping, "--ping-interval", text=True)
    return _finish(values)
