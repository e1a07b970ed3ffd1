"""multi_notify expansion (spec 2.5) against a real DNS server (dnsmasq on 127.0.0.1)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import dns.asyncresolver
import pytest

from pydmq.dmq.multinotify import (
    expand_notification_address,
    resolve_host,
    resolve_host_async,
    resolver_for_server,
)
from tests.support.dns import (
    DnsmasqServer,
    SrvRecord,
    dnsmasq_path,
    resolver_for,
    silent_udp_server,
)
from tests.support.net import free_port

MANY = [f"10.9.0.{i}" for i in range(1, 41)]

HOSTS = {
    "n1.dmq.test": ["10.0.0.1", "10.0.0.11", "2001:db8::1"],
    "n2.dmq.test": ["10.0.0.2"],
    "_sip._udp.dmq.test": ["10.0.0.100"],  # the SRV owner's own A record comes last
    "a-only.test": ["10.0.1.1", "10.0.1.2"],
    "dual.test": ["10.0.2.1", "2001:db8::21", "2001:db8:0:0:1::1"],
    "x1.test": ["10.0.3.1"],
    "x2.test": ["10.0.3.2"],
    "x3.test": ["10.0.3.3"],
    "s.test": ["10.0.0.123"],
    "many.test": MANY,
}
SRV = [
    # Given in reverse of the expected walk order: dnsmasq answers as it likes, the walk sorts.
    SrvRecord("_sip._udp.dmq.test", "n2.dmq.test", 5070, priority=20),
    SrvRecord("_sip._udp.dmq.test", "n1.dmq.test", 5060, priority=10),
    SrvRecord("order.test", "x1.test", 5001, priority=20, weight=50),
    SrvRecord("order.test", "x2.test", 5002, priority=10, weight=1),
    SrvRecord("order.test", "x3.test", 5003, priority=10, weight=9),
    SrvRecord("dup.test", "a-only.test", 5060, priority=10),
    SrvRecord("dup.test", "a-only.test", 5060, priority=20),
]
CNAMES = {"alias.test": "n1.dmq.test"}


def assert_rrset_groups(got: list[str], expected: list[set[str]]) -> None:
    """Order across RRsets is the module's; order inside one is the server's (dnsmasq rotates)."""
    assert len(got) == sum(map(len, expected)), got
    start = 0
    for group in expected:
        assert set(got[start : start + len(group)]) == group, got
        start += len(group)


@pytest.fixture(scope="module")
def dns_server() -> Iterator[DnsmasqServer]:
    assert dnsmasq_path() is not None, "dnsmasq missing: scripts/test.sh installs it"
    with DnsmasqServer(hosts=HOSTS, srv=SRV, cnames=CNAMES) as server:
        yield server


@pytest.fixture
def resolver(dns_server: DnsmasqServer) -> dns.asyncresolver.Resolver:
    return dns_server.resolver()


async def test_srv_targets_then_own_addresses(resolver):
    got = await expand_notification_address("sip:_sip._udp.dmq.test", resolver=resolver)
    assert_rrset_groups(
        got,
        [
            {"sip:10.0.0.1:5060", "sip:10.0.0.11:5060"},  # priority 10 target: A ...
            {"sip:[2001:db8::1]:5060"},  # ... then AAAA
            {"sip:10.0.0.2:5070"},  # priority 20 target
            {"sip:10.0.0.100"},  # the name's own A, with the URI's (absent) port
        ],
    )


async def test_resolver_for_server_asks_that_server(dns_server):
    """``dmq.dns_server`` as the runtime uses it: only that server, not /etc/resolv.conf."""
    resolver = resolver_for_server(f"{dns_server.host}:{dns_server.port}")
    got = await expand_notification_address("sip:_sip._udp.dmq.test", resolver=resolver)
    assert "sip:10.0.0.2:5070" in got and "sip:10.0.0.1:5060" in got


@pytest.mark.parametrize(
    ("text", "address", "port"),
    [
        ("127.0.0.1:5353", "127.0.0.1", 5353),
        ("10.0.0.53", "10.0.0.53", 53),
        ("[::1]:5353", "::1", 5353),
        ("[2001:db8::53]", "2001:db8::53", 53),
        ("::1", "::1", 53),
    ],
)
def test_resolver_for_server_parses_ip_and_port(text, address, port):
    resolver = resolver_for_server(text)
    assert resolver is not None
    [server] = resolver.nameservers
    assert (server.address, server.port) == (address, port)  # type: ignore[union-attr]
    assert resolver_for_server(None) is None  # None: the caller uses the system resolver


@pytest.mark.parametrize("text", ["dns.test:53", "127.0.0.1:x", "127.0.0.1:0", "[::1]x", ""])
def test_resolver_for_server_rejects_bad_text(text):
    with pytest.raises(ValueError):
        resolver_for_server(text)


async def test_srv_port_filter_and_params(resolver):
    got = await expand_notification_address(
        "sip:_sip._udp.dmq.test:5070;transport=tcp", resolver=resolver
    )
    assert got == ["sip:10.0.0.2:5070;transport=tcp", "sip:10.0.0.100:5070;transport=tcp"]


async def test_srv_port_filter_matching_nothing(resolver):
    got = await expand_notification_address("sip:_sip._udp.dmq.test:5999", resolver=resolver)
    assert got == ["sip:10.0.0.100:5999"]


async def test_srv_order_priority_then_weight(resolver):
    got = await expand_notification_address("sip:order.test", resolver=resolver)
    assert got == ["sip:10.0.3.3:5003", "sip:10.0.3.2:5002", "sip:10.0.3.1:5001"]


async def test_a_records_only(resolver):
    got = await expand_notification_address("sip:a-only.test:5060", resolver=resolver)
    assert_rrset_groups(got, [{"sip:10.0.1.1:5060", "sip:10.0.1.2:5060"}])


async def test_a_then_aaaa_in_brackets(resolver):
    got = await expand_notification_address("sip:dual.test", resolver=resolver)
    assert_rrset_groups(got, [{"sip:10.0.2.1"}, {"sip:[2001:db8::21]", "sip:[2001:db8::1:0:0:1]"}])


async def test_cname_chain_yields_only_addresses(resolver):
    got = await expand_notification_address("sip:alias.test:5080", resolver=resolver)
    assert_rrset_groups(
        got, [{"sip:10.0.0.1:5080", "sip:10.0.0.11:5080"}, {"sip:[2001:db8::1]:5080"}]
    )


async def test_scheme_userinfo_and_raw_params_kept(resolver):
    got = await expand_notification_address(
        "sips:dmq:secret@a-only.test:5061;transport=tls;lr;x=1;x=2?Subject=dropped",
        resolver=resolver,
    )
    assert_rrset_groups(
        got,
        [
            {
                "sips:dmq:secret@10.0.1.1:5061;transport=tls;lr;x=1;x=2",
                "sips:dmq:secret@10.0.1.2:5061;transport=tls;lr;x=1;x=2",
            }
        ],
    )


async def test_duplicates_removed_in_order(resolver):
    # Both SRV records point at a-only.test:5060: the second walk adds nothing new.
    got = await expand_notification_address("sip:dup.test", resolver=resolver)
    assert_rrset_groups(got, [{"sip:10.0.1.1:5060", "sip:10.0.1.2:5060"}])


@pytest.mark.parametrize(
    "uri",
    [
        "sip:10.1.2.3:5060;transport=tcp",
        "sip:10.1.2.3",
        "sips:user@[2001:db8::5]:5061;transport=tls",
        "sip:[2001:db8::5]",
    ],
)
async def test_ip_literal_untouched_without_dns(uri):
    # A resolver that cannot answer: a literal must not need DNS at all.
    dead = resolver_for(free_port("udp"), lifetime=5.0)
    start = time.monotonic()
    assert await expand_notification_address(uri, resolver=dead) == [uri]
    assert time.monotonic() - start < 0.5


async def test_ip_literal_with_default_resolver():
    got = await expand_notification_address("sip:192.0.2.7:5060;transport=udp")
    assert got == ["sip:192.0.2.7:5060;transport=udp"]


@pytest.mark.parametrize("uri", ["sip:nothing.test", "sip:nothing.test:5060", "sip:host.example"])
async def test_unknown_name_gives_empty_list_and_warning(resolver, caplog, uri):
    with caplog.at_level(logging.WARNING, logger="pydmq.dmq.multinotify"):
        assert await expand_notification_address(uri, resolver=resolver) == []
    assert "expanded to no address" in caplog.text


async def test_unparsable_uri_gives_empty_list(resolver, caplog):
    with caplog.at_level(logging.WARNING, logger="pydmq.dmq.multinotify"):
        assert await expand_notification_address("http://a-only.test", resolver=resolver) == []
    assert "cannot parse" in caplog.text


async def test_more_than_limit_records_capped_at_30(resolver, caplog):
    with caplog.at_level(logging.WARNING, logger="pydmq.dmq.multinotify"):
        got = await expand_notification_address("sip:many.test:5060", resolver=resolver)
    assert len(got) == 30
    assert len(set(got)) == 30
    assert set(got) <= {f"sip:{ip}:5060" for ip in MANY}
    assert "reached the limit 30" in caplog.text


async def test_limit_reached_during_srv_stops_there(resolver):
    got = await expand_notification_address("sip:_sip._udp.dmq.test", resolver=resolver, limit=4)
    assert_rrset_groups(
        got,
        [
            {"sip:10.0.0.1:5060", "sip:10.0.0.11:5060"},
            {"sip:[2001:db8::1]:5060"},
            {"sip:10.0.0.2:5070"},
        ],
    )


async def test_uri_longer_than_255_is_skipped(resolver):
    # "sip:10.0.0.123;p=" is 17 characters: 238 more make exactly 255.
    fits = "sip:s.test;p=" + "a" * 238
    assert await expand_notification_address(fits, resolver=resolver) == [
        "sip:10.0.0.123;p=" + "a" * 238
    ]
    assert await expand_notification_address(fits + "a", resolver=resolver) == []


async def test_dead_dns_server_gives_empty_list_quickly():
    # Nothing listens: each of SRV, A, AAAA fails on its own and the call still returns.
    dead = resolver_for(free_port("udp"), lifetime=0.3, timeout=0.3)
    start = time.monotonic()
    got = await expand_notification_address("sip:_sip._udp.dmq.test", resolver=dead, timeout=2.0)
    assert got == []
    assert time.monotonic() - start < 2.0


async def test_silent_dns_server_bounded_by_total_timeout():
    # Per-query lifetime far above the budget: the overall timeout must still cut it.
    with silent_udp_server() as port:
        hung = resolver_for(port, lifetime=10.0, timeout=10.0)
        start = time.monotonic()
        got = await expand_notification_address("sip:a-only.test", resolver=hung, timeout=0.6)
        elapsed = time.monotonic() - start
    assert got == []
    assert 0.5 < elapsed < 1.5


async def test_silent_dns_server_each_query_type_times_out():
    # Each of SRV, A, AAAA times out on its own lifetime and the next type is still tried.
    with silent_udp_server() as port:
        hung = resolver_for(port, lifetime=0.2, timeout=0.2)
        start = time.monotonic()
        got = await expand_notification_address("sip:a-only.test", resolver=hung, timeout=5.0)
        elapsed = time.monotonic() - start
    assert got == []
    assert 0.55 < elapsed < 2.0


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("[::1]", "::1"),
        ("2001:DB8::1", "2001:db8::1"),
        ("localhost", "127.0.0.1"),
        ("", None),
        ("a" * 64 + ".test", None),
    ],
)
async def test_resolve_host(host, expected):
    assert resolve_host(host) == expected
    assert await resolve_host_async(host) == expected
