"""``multi_notify`` address expansion and host resolution (spec 2.5).

With ``multi_notify = 1`` Kamailio turns the first ``notification_address`` into one URI per
address found in DNS (``get_dmq_host_list()`` in ``notification_peer.c``), so a whole cluster can
be seeded from one DNS name. This module does the same without blocking the event loop
(``dns.asyncresolver``) and with a hard wall-clock budget, because it runs at startup where a dead
DNS server must not hang the node; a failed expansion is retried by the periodic ping anyway.

Deliberate details, all following Kamailio:

* the SRV query uses the host exactly as written (no ``_sip._udp.`` prefix, no search list);
* SRV records are walked by priority ascending, then weight descending, ties in answer order
  (``get_record()`` sorts them that way); weights are not randomised;
* the limit counts URIs *before* duplicates are dropped, as Kamailio counts before
  ``find_dmq_node_uri()``; a URI longer than 255 characters is skipped and not counted;
* a port of ``0`` counts as "no port" (Kamailio tests ``port_no`` for non-zero).

One deliberate difference: IPv6 addresses are written in the RFC 5952 form (``[2001:db8::1]``),
not Kamailio's uncompressed upper-case ``ip6tosbuf()`` form, so they match how peers normally
write their own ``server_address`` (nodes are identified by the host string).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Sequence

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdata
import dns.rdatatype
import dns.resolver
from dns.rdtypes.IN.A import A
from dns.rdtypes.IN.AAAA import AAAA
from dns.rdtypes.IN.SRV import SRV

from pydmq.sip.errors import SipParseError
from pydmq.sip.uri import SipUri

__all__ = [
    "DEFAULT_LIMIT",
    "DEFAULT_QUERY_LIFETIME",
    "DEFAULT_TIMEOUT",
    "MAX_URI_LEN",
    "expand_notification_address",
    "resolve_host",
    "resolve_host_async",
    "resolver_for_server",
]

log = logging.getLogger(__name__)

#: Kamailio's ``MAXDMQHOSTS``: most URIs one notification address expands to.
DEFAULT_LIMIT = 30
#: Kamailio's ``MAXDMQURILEN``: longer rebuilt URIs are skipped.
MAX_URI_LEN = 255
#: Wall-clock budget (seconds) for a whole expansion or one host resolution.
DEFAULT_TIMEOUT = 5.0
#: Per-query lifetime (seconds) of the resolver built when the caller passes none.
DEFAULT_QUERY_LIFETIME = 2.0


async def expand_notification_address(
    uri_text: str,
    *,
    resolver: dns.asyncresolver.Resolver | None = None,
    limit: int = DEFAULT_LIMIT,
    timeout: float = DEFAULT_TIMEOUT,
) -> list[str]:
    """Expand one notification address into node URIs, in Kamailio's order.

    IP literal: the URI itself (rebuilt). Otherwise: SRV targets (A then AAAA each, with the SRV
    port; only SRV records with the URI's port if it has one), then the name's A, then its AAAA
    records. Each query is bounded by ``resolver.lifetime`` and the whole call by ``timeout``
    seconds; a failing query type is skipped. Never raises for bad input or DNS trouble: it
    returns ``[]`` and logs a warning, since the caller can only retry later.
    """
    try:
        uri = SipUri.parse(uri_text)
    except SipParseError as exc:
        log.warning("multi_notify: cannot parse %r: %s", uri_text, exc)
        return []
    loop = asyncio.get_running_loop()
    expander = _Expander(uri, _raw_params(uri_text), limit)
    if _ip_literal(uri.host_ip) is not None:
        if limit > 0:
            expander.add(uri.host, expander.port)
    elif limit > 0:
        if resolver is None:
            try:
                resolver = _default_resolver()
            except dns.exception.DNSException as exc:
                log.warning("multi_notify: no DNS resolver for %r: %s", uri_text, exc)
                return []
        await expander.expand_name(resolver, loop.time() + timeout)
    if not expander.uris:
        log.warning("multi_notify: %r expanded to no address", uri_text)
    return list(expander.uris)


def resolve_host(host: str) -> str | None:
    """First address of ``host`` (IP literal, ``[v6]`` or name), or ``None``; blocking.

    IPv4 is preferred over IPv6 like Kamailio's ``resolvehost()`` (A first, AAAA as fallback), so
    the choice does not depend on the local RFC 6724 policy. Meant for the node builder, which
    Kamailio also runs blocking; the time it can take is the system resolver's.
    """
    bare = _strip_brackets(host)
    literal = _ip_literal(bare)
    if literal is not None:
        return literal
    if not bare:
        return None
    try:
        infos = socket.getaddrinfo(bare, None, type=socket.SOCK_DGRAM)
    except (OSError, ValueError):  # gaierror; UnicodeError/NUL from a malformed name
        return None
    return _first_address(infos)


async def resolve_host_async(host: str, *, timeout: float = DEFAULT_TIMEOUT) -> str | None:
    """:func:`resolve_host` without blocking the loop, given up after ``timeout`` seconds."""
    bare = _strip_brackets(host)
    literal = _ip_literal(bare)
    if literal is not None:
        return literal
    if not bare:
        return None
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            infos = await loop.getaddrinfo(bare, None, type=socket.SOCK_DGRAM)
    except (TimeoutError, OSError, ValueError):
        return None
    return _first_address(infos)


class _Expander:
    """Collects rebuilt URIs while walking DNS answers, enforcing the limit as Kamailio does."""

    def __init__(self, uri: SipUri, params: str, limit: int) -> None:
        prefix = f"{uri.scheme}:"
        if uri.user is not None:
            prefix += uri.user
            if uri.password is not None:
                prefix += f":{uri.password}"
            prefix += "@"
        self._prefix = prefix
        self._params = params
        self._limit = limit
        self._counted = 0
        self._warned_full = False
        self.host = uri.host
        self.port = uri.port or None
        self.uris: dict[str, None] = {}  # ordered set

    @property
    def full(self) -> bool:
        return self._counted >= self._limit

    def is_full(self) -> bool:
        """Whether another record must be dropped; warns once, like Kamailio's "reached max!"."""
        if not self.full:
            return False
        if not self._warned_full:
            self._warned_full = True
            log.warning(
                "multi_notify: %s: address count reached the limit %d", self.host, self._limit
            )
        return True

    def add(self, host: str, port: int | None) -> None:
        text = self._prefix + host
        if port:
            text += f":{port}"
        if self._params:
            text += f";{self._params}"
        if len(text) > MAX_URI_LEN:
            log.warning(
                "multi_notify: skipping %.40s...: longer than %d characters", text, MAX_URI_LEN
            )
            return
        self._counted += 1
        self.uris.setdefault(text, None)

    async def expand_name(self, resolver: dns.asyncresolver.Resolver, deadline: float) -> None:
        try:
            # Absolute: the name is queried exactly as written, never through the search list.
            name = dns.name.from_text(self.host)
        except (dns.exception.DNSException, ValueError) as exc:
            log.warning("multi_notify: bad host name %r: %s", self.host, exc)
            return
        query = _Query(resolver, deadline)
        srvs = [r for r in await query(name, dns.rdatatype.SRV) if isinstance(r, SRV)]
        srvs.sort(key=lambda r: (r.priority, -r.weight))  # stable, as get_record() inserts
        for srv in srvs:
            if self.port and srv.port != self.port:
                continue
            if self.is_full():
                return
            if srv.target != dns.name.root:  # "." means "no service here"
                await self._add_addresses(query, srv.target, srv.port or None)
        if not self.full:
            await self._add_addresses(query, name, self.port)

    async def _add_addresses(self, query: _Query, name: dns.name.Name, port: int | None) -> None:
        for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            for rdata in await query(name, rdtype):
                # Only address records: the CNAMEs of a chain never become URIs.
                if isinstance(rdata, A):
                    host = rdata.address
                elif isinstance(rdata, AAAA):
                    host = f"[{rdata.address}]"
                else:
                    continue
                if self.is_full():
                    return
                self.add(host, port)


class _Query:
    """One resolver plus the expansion's deadline; a failed query is just an empty answer."""

    def __init__(self, resolver: dns.asyncresolver.Resolver, deadline: float) -> None:
        self._resolver = resolver
        self._deadline = deadline

    async def __call__(
        self, name: dns.name.Name, rdtype: dns.rdatatype.RdataType
    ) -> Sequence[dns.rdata.Rdata]:
        kind = dns.rdatatype.to_text(rdtype)
        remaining = self._deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            log.debug("multi_notify: no time left for %s %s", kind, name)
            return ()
        try:
            answer = await self._resolver.resolve(
                name,
                rdtype,
                search=False,
                raise_on_no_answer=False,
                lifetime=min(self._resolver.lifetime, remaining),
            )
        except (dns.exception.DNSException, OSError) as exc:
            # NXDOMAIN, timeout, SERVFAIL/REFUSED, or a socket error dnspython did not wrap.
            log.debug("multi_notify: %s %s failed: %s", kind, name, exc)
            return ()
        return list(answer.rrset) if answer.rrset is not None else ()


def _default_resolver() -> dns.asyncresolver.Resolver:
    """The system resolver (``/etc/resolv.conf``) with a short per-query lifetime."""
    resolver = dns.asyncresolver.Resolver()
    resolver.lifetime = DEFAULT_QUERY_LIFETIME
    resolver.timeout = min(resolver.timeout, DEFAULT_QUERY_LIFETIME)
    return resolver


def resolver_for_server(server: str | None) -> dns.asyncresolver.Resolver | None:
    """A resolver asking only ``server`` (``IP[:port]``, IPv6 in brackets, port 53 by default),
    ignoring ``/etc/resolv.conf``; ``None`` for ``None`` (then the system resolver is used).

    This is how the ``dmq.dns_server`` setting reaches :func:`expand_notification_address`.
    Raises ``ValueError`` for text that is not an IP address with an optional port.
    """
    if server is None:
        return None
    if server.startswith("["):
        host, _, rest = server[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else rest
    elif server.count(":") == 1:
        host, _, port_text = server.partition(":")
    else:
        host, port_text = server, ""
    port = int(port_text) if port_text.isdigit() else 53
    if (port_text and not port_text.isdigit()) or not 1 <= port <= 65535:
        raise ValueError(f"bad DNS server port in {server!r}")
    address = str(ipaddress.ip_address(host))
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = [dns.nameserver.Do53Nameserver(address, port)]
    # Two tries per query within its lifetime: one lost UDP datagram is not a failed expansion.
    resolver.lifetime = DEFAULT_QUERY_LIFETIME
    resolver.timeout = DEFAULT_QUERY_LIFETIME / 2
    return resolver


def _raw_params(uri_text: str) -> str:
    """The URI parameters exactly as written (``SipUri.params`` is a dict: repeats would merge).

    Cuts the text the same way :meth:`SipUri.parse` does: headers off at ``?``, userinfo off at
    the last ``@``, parameters from the first ``;`` of the host part.
    """
    rest = uri_text[uri_text.find(":") + 1 :]
    rest = rest.split("?", 1)[0]
    rest = rest[rest.rfind("@") + 1 :]
    semi = rest.find(";")
    return rest[semi + 1 :] if semi >= 0 else ""


def _ip_literal(text: str) -> str | None:
    """``text`` as a normalised IP address if it is an IPv4/IPv6 literal, else ``None``."""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def _strip_brackets(host: str) -> str:
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def _first_address(
    infos: Sequence[tuple[socket.AddressFamily, socket.SocketKind, int, str, tuple[object, ...]]],
) -> str | None:
    """First IPv4 address of a ``getaddrinfo`` result, else its first IPv6 address."""
    for family in (socket.AF_INET, socket.AF_INET6):
        for info in infos:
            if info[0] == family:
                return str(info[4][0])
    return None
