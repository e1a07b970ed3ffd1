"""Node records, status words and the node builder (spec 2.1-2.4)."""

from __future__ import annotations

import socket

import pytest

from pydmq.dmq.node import (
    PROTO_NONE,
    Node,
    NodeError,
    NodeStatus,
    build_local_node,
    build_node,
    node_key,
    normalize_ip,
)

DNS = {"seed.example": "10.0.0.1", "v6.example": "2001:db8::0:1"}


def resolve(host: str) -> str | None:
    return DNS.get(host)


# ----------------------------------------------------------------- status words


@pytest.mark.parametrize(
    ("word", "status"),
    [
        ("active", NodeStatus.ACTIVE),
        ("not_active", NodeStatus.NOT_ACTIVE),
        ("disabled", NodeStatus.DISABLED),
        ("pending", NodeStatus.NOT_ACTIVE),  # 5.6.3
        ("timeout", NodeStatus.NOT_ACTIVE),  # 5.6.3
    ],
)
def test_status_words(word: str, status: NodeStatus) -> None:
    assert NodeStatus.from_word(word) is status


@pytest.mark.parametrize("word", ["Active", "ACTIVE", "", "inactive", "active ", "up"])
def test_unknown_status_word_is_an_error(word: str) -> None:
    with pytest.raises(NodeError, match="unknown node status"):
        NodeStatus.from_word(word)


def test_status_values_are_the_61_words() -> None:
    assert [s.value for s in NodeStatus] == ["active", "not_active", "disabled"]


# ----------------------------------------------------------------- builder


def test_build_plain_node() -> None:
    n = build_node("sip:127.0.0.1:5160")
    assert (n.host, n.port_str, n.port, n.proto) == ("127.0.0.1", "5160", 5160, PROTO_NONE)
    assert n.resolved_ip == "127.0.0.1"
    assert n.status is NodeStatus.ACTIVE  # 6.1 default
    assert n.local is False
    assert n.last_notification == 0
    assert n.fail_count == 0
    assert n.orig_uri == "sip:127.0.0.1:5160"
    assert n.key == ("127.0.0.1", "5160", "*")


def test_orig_uri_is_kept_with_params() -> None:
    n = build_node("sip:user@10.1.2.3:5060;status=disabled;foo=bar")
    assert n.orig_uri == "sip:user@10.1.2.3:5060;status=disabled;foo=bar"
    assert n.status is NodeStatus.DISABLED
    assert n.uri.user == "user"


@pytest.mark.parametrize(
    ("uri", "proto"),
    [
        ("sip:1.2.3.4:5060", "*"),
        ("sip:1.2.3.4:5060;transport=udp", "udp"),
        ("sip:1.2.3.4:5060;transport=TCP", "tcp"),
        ("sip:1.2.3.4:5061;transport=tls", "tls"),
        ("sip:1.2.3.4:5060;transport=sctp", "sctp"),
        ("sip:1.2.3.4:80;transport=ws", "ws"),
        ("sip:1.2.3.4:443;transport=wss", "ws"),  # Kamailio folds WSS into WS
        ("sip:1.2.3.4:443;Transport=Ws", "ws"),
    ],
)
def test_proto(uri: str, proto: str) -> None:
    assert build_node(uri).proto == proto


@pytest.mark.parametrize("uri", ["sip:1.2.3.4:5060;transport=foo", "sip:1.2.3.4;transport"])
def test_unknown_transport_is_an_error(uri: str) -> None:
    with pytest.raises(NodeError, match="transport"):
        build_node(uri)


def test_identity_rule() -> None:
    """Host string, port string and proto; nothing is normalised (spec 2.3)."""
    k = node_key
    assert k("sip:h.example:5060") != k("sip:h.example")
    assert k("sip:1.2.3.4:5060;transport=udp") != k("sip:1.2.3.4:5060")
    assert k("sip:H.example:5060") != k("sip:h.example:5060")
    assert k("sip:1.2.3.4:5060") != k("sip:1.2.3.4:05060")
    assert k("sip:1.2.3.4:5060;status=active;x=y") == k("sip:user@1.2.3.4:5060")
    assert k("sip:[::1]:5060") == ("[::1]", "5060", "*")


@pytest.mark.parametrize(
    ("uri", "status"),
    [
        ("sip:1.2.3.4:5060", NodeStatus.ACTIVE),
        ("sip:1.2.3.4:5060;status=active", NodeStatus.ACTIVE),
        ("sip:1.2.3.4:5060;status=not_active", NodeStatus.NOT_ACTIVE),
        ("sip:1.2.3.4:5060;status=disabled", NodeStatus.DISABLED),
        ("sip:1.2.3.4:5060;status=pending", NodeStatus.NOT_ACTIVE),
        ("sip:1.2.3.4:5060;status=timeout", NodeStatus.NOT_ACTIVE),
        ("sip:1.2.3.4:5060;Status=bogus", NodeStatus.ACTIVE),  # name is case-sensitive
    ],
)
def test_status_param(uri: str, status: NodeStatus) -> None:
    assert build_node(uri).status is status


@pytest.mark.parametrize(
    "uri",
    [
        "sip:1.2.3.4:5060;status=activ",  # the 5.6.3 last-character-drop victim
        "sip:1.2.3.4:5060;status=Active",
        "sip:1.2.3.4:5060;status=",
        "sip:1.2.3.4:5060;status",
    ],
)
def test_bad_status_param(uri: str) -> None:
    with pytest.raises(NodeError, match="status"):
        build_node(uri)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "1.2.3.4:5060",
        "http://1.2.3.4",
        "sip:",
        "sip:1.2.3.4:",
        "sip:1.2.3.4:99999",
        "sip:1.2.3.4:50a",
        "sip:" + "a" * 255 + ":5060",
        "sip:[::1:5060",
        "sip:1.2.3.4;;x",
    ],
)
def test_bad_uri(text: str) -> None:
    with pytest.raises(NodeError, match="invalid node URI"):
        build_node(text, resolve)


def test_node_error_is_a_value_error() -> None:
    assert issubclass(NodeError, ValueError)


def test_ipv6_literal() -> None:
    n = build_node("sip:[2001:DB8::1]:5060")
    assert n.host == "[2001:DB8::1]"  # as written, for identity and list_nodes
    assert n.resolved_ip == "2001:db8::1"  # canonical, for source-IP checks


def test_bad_ipv6_reference() -> None:
    with pytest.raises(NodeError):
        build_node("sip:[not-v6]:5060", resolve)


def test_hostname_goes_through_the_resolver() -> None:
    calls: list[str] = []

    def spy(host: str) -> str | None:
        calls.append(host)
        return DNS.get(host)

    assert build_node("sip:seed.example:5060", spy).resolved_ip == "10.0.0.1"
    assert build_node("sip:v6.example:5060", spy).resolved_ip == "2001:db8::1"
    assert build_node("sip:9.9.9.9:5060", spy).resolved_ip == "9.9.9.9"
    assert calls == ["seed.example", "v6.example"]  # IP literals need no resolver


def test_unresolvable_host() -> None:
    with pytest.raises(NodeError, match="cannot resolve"):
        build_node("sip:nowhere.example:5060", resolve)
    with pytest.raises(NodeError, match="no resolver"):
        build_node("sip:seed.example:5060")


def test_resolver_exceptions_become_node_errors() -> None:
    def broken(host: str) -> str | None:
        raise socket.gaierror(-2, "Name or service not known")

    def idna(host: str) -> str | None:
        raise UnicodeError("label too long")

    for r in (broken, idna):
        with pytest.raises(NodeError, match="cannot resolve"):
            build_node("sip:seed.example:5060", r)


def test_resolver_returning_garbage() -> None:
    with pytest.raises(NodeError, match="non-IP"):
        build_node("sip:seed.example:5060", lambda h: "not an ip")


def test_local_node_is_active_and_local() -> None:
    n = build_local_node("sip:127.0.0.1:5160;status=disabled")
    assert n.local is True
    assert n.status is NodeStatus.ACTIVE


def test_snapshot_is_detached() -> None:
    n = build_node("sip:1.2.3.4:5060")
    s = n.snapshot()
    assert s == n and s is not n
    n.status = NodeStatus.DISABLED
    n.fail_count = 3
    assert s.status is NodeStatus.ACTIVE and s.fail_count == 0
    assert isinstance(s, Node)


def test_node_has_slots() -> None:
    n = build_node("sip:1.2.3.4:5060")
    with pytest.raises(AttributeError):
        n.extra = 1  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("text", "ip"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("[::1]", "::1"),
        ("::FFFF:1.2.3.4", "1.2.3.4"),
        ("2001:DB8:0::1", "2001:db8::1"),
    ],
)
def test_normalize_ip(text: str, ip: str) -> None:
    assert normalize_ip(text) == ip


@pytest.mark.parametrize("text", ["", "host", "1.2.3", "[::1", "300.1.1.1"])
def test_normalize_ip_rejects(text: str) -> None:
    assert normalize_ip(text) is None
