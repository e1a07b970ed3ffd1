"""Notification body codec and the notification channel logic (spec 1.7, 1.8, 2.5-2.10)."""

from __future__ import annotations

import re
import time
from collections import Counter, deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pydmq.dmq.node import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_LINES,
    LineError,
    Node,
    NodeKey,
    NodeStatus,
    build_local_node,
    build_node,
    wire_key,
)
from pydmq.dmq.nodelist import MembershipPolicy, NodeList
from pydmq.dmq.notification import (
    KAMAILIO_BODY_LIMIT,
    Command,
    LogWarning,
    NotificationLogic,
    RunInitCallbacks,
    SendNotification,
    encode_body,
    encode_line,
    exceeds_kamailio_limit,
    parse_body,
)
from tests.support.spec import wire_dir

A, D, N = NodeStatus.ACTIVE, NodeStatus.DISABLED, NodeStatus.NOT_ACTIVE
WIRE = wire_dir()
DNS = {"peer.example": "10.0.0.7"}


def resolve(host: str) -> str | None:
    return DNS.get(host)


# =========================================================================== strict 5.6.3 parser


class Kamailio563Failure(AssertionError):
    """What would make 5.6.3's extract_node_list fail (and deadlock the node list)."""


_K_URI = re.compile(r"sip:(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-_]+)(?::([0-9]{1,5}))?((?:;[^;]*)*)")
_K_STATUS = {"active", "disabled", "pending", "timeout"}  # 5.6.3's words, case-sensitive
_K_TRANSPORTS = {"udp", "tcp", "tls", "sctp", "ws", "wss"}


def kamailio_563_parse(
    body: bytes, resolvable: frozenset[str] = frozenset()
) -> list[tuple[str, str, str, str]]:
    """An independent, strict re-implementation of 5.6.3's ``extract_node_list`` line loop:
    split on ``\\n``, the length is "up to the newline minus one" even without a newline (the
    last-character drop), only trailing CR/LF/NUL trimmed, every line through the builder; any
    failure fails the whole body. Returns (host, port, transport, status) per line."""
    out: list[tuple[str, str, str, str]] = []
    tmp, end = 0, len(body)
    while tmp < end:
        nl = body.find(b"\n", tmp)
        match = nl + 1 if nl >= 0 else end
        raw = body[tmp : match - 1]
        tmp = match
        raw = raw.rstrip(b"\r\n\x00")
        if not raw:
            raise Kamailio563Failure("empty line: URI parse error")
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError:
            raise Kamailio563Failure(f"non-ASCII line {raw!r}") from None
        m = _K_URI.fullmatch(text)
        if m is None:
            raise Kamailio563Failure(f"URI parse error: {text!r}")
        host, port, paramstr = m.group(1), m.group(2) or "", m.group(3)
        if len(host) > 254:
            raise Kamailio563Failure("host too long")
        params: dict[str, str] = {}
        for item in paramstr.split(";")[1:]:
            if not item:
                raise Kamailio563Failure(f"empty parameter in {text!r}")
            name, _, value = item.partition("=")
            params[name] = value
        status = params.get("status", "pending")
        if status not in _K_STATUS:
            raise Kamailio563Failure(f"unknown status {status!r} in {text!r}")
        transport = ""
        for name, value in params.items():
            if name.lower() == "transport":
                if value.lower() not in _K_TRANSPORTS:
                    raise Kamailio563Failure(f"transport {value!r}")
                transport = value.lower()
        is_ip = re.fullmatch(r"\d{1,3}(\.\d{1,3}){3}", host) or host.startswith("[")
        if not is_ip and host not in resolvable:
            raise Kamailio563Failure(f"cannot resolve {host!r}")
        out.append((host, port, transport, status))
    return out


def test_strict_checker_reproduces_563_quirks() -> None:
    ok = b"sip:1.2.3.4:5060;status=active\r\n"
    assert kamailio_563_parse(ok) == [("1.2.3.4", "5060", "", "active")]
    with pytest.raises(Kamailio563Failure, match="activ'"):
        kamailio_563_parse(b"sip:1.2.3.4:5060;status=active")  # last char dropped
    assert kamailio_563_parse(b"sip:1.2.3.4:5060") == [("1.2.3.4", "506", "", "pending")]
    with pytest.raises(Kamailio563Failure, match="empty line"):
        kamailio_563_parse(ok + b"\r\n")
    with pytest.raises(Kamailio563Failure, match="not_active"):
        kamailio_563_parse(b"sip:1.2.3.4:5060;status=not_active\r\n")
    with pytest.raises(Kamailio563Failure, match="URI"):
        kamailio_563_parse(b"sip:1.2.3.4:;status=active\r\n")  # Kamailio's portless output
    with pytest.raises(Kamailio563Failure, match="resolve"):
        kamailio_563_parse(b"sip:peer.example:5060;status=active\r\n")
    assert kamailio_563_parse(b"") == []


# =========================================================================== golden bodies


def wire_body(name: str) -> bytes:
    data = (WIRE / name).read_bytes()
    head, _, rest = data.partition(b"\r\n\r\n")
    m = re.search(rb"\r\nContent-Length:\s*(\d+)", head, re.IGNORECASE)
    assert m is not None
    return rest[: int(m.group(1))]


GOLDEN = [
    "01_kdmq_notification_peer_maxfwd2.txt",
    "01_kdmq_notification_peer_maxfwd2__reply_200.txt",
    "02_kdmq_notification_peer_maxfwd1.txt",
    "02_kdmq_notification_peer_maxfwd1__reply_200.txt",
    "15_self_kdmq_notification_peer_maxfwd2.txt",
    "15_self_kdmq_notification_peer_maxfwd2__reply_200.txt",
    "16_self_kdmq_notification_peer_maxfwd1.txt",
    "16_self_kdmq_notification_peer_maxfwd1__reply_200.txt",
]


@pytest.mark.parametrize("name", GOLDEN)
def test_golden_bodies_parse(name: str) -> None:
    body = wire_body(name)
    nodes, errors = parse_body(body)
    assert errors == []
    assert nodes and all(n.status is A and n.host == "127.0.0.1" for n in nodes)
    assert len(nodes) == len(kamailio_563_parse(body)) == body.count(b"\r\n")


def test_golden_self_duplicate_reply() -> None:
    """01's reply lists node1 twice (5.6.3 added its own notification address as a node)."""
    nodes, errors = parse_body(wire_body("01_kdmq_notification_peer_maxfwd2__reply_200.txt"))
    assert errors == []
    assert [n.port_str for n in nodes] == ["5161", "5160", "5160"]


def test_golden_join_seen_from_node2() -> None:
    """node2 (5161) joins through node1 (5160), fed the exact 5.6.3 bodies."""
    logic = NotificationLogic(
        NodeList(
            build_local_node("sip:127.0.0.1:5161"),
            MembershipPolicy(notification_addresses=("sip:127.0.0.1:5160",)),
        )
    )
    cmds = logic.start()
    assert [(c.node.port_str, c.max_forwards) for c in sends(cmds)] == [("5160", 2)]
    seed = sends(cmds)[0].node
    # 6.1 rules: the seed is active from the start, so it is listed too.
    assert sends(cmds)[0].body == (
        b"sip:127.0.0.1:5160;status=active\r\nsip:127.0.0.1:5161;status=active\r\n"
    )
    out = logic.on_reply(seed, 200, wire_body("01_kdmq_notification_peer_maxfwd2__reply_200.txt"))
    assert out == [RunInitCallbacks(logic.nodes.find(seed.key))]
    assert [(n.port_str, n.local) for n in logic.nodes.nodes()] == [("5160", False), ("5161", True)]
    # node1's fan-out (MF 1) brings nothing new: no re-broadcast, no second init.
    res = logic.on_request(seed.key, wire_body("02_kdmq_notification_peer_maxfwd1.txt"), 1, True)
    assert (res.status, res.reason, res.content_type, res.changed) == (200, "OK", "text/plain", 0)
    assert res.commands == ()
    assert kamailio_563_parse(res.body) == [
        ("127.0.0.1", "5160", "", "active"),
        ("127.0.0.1", "5161", "", "active"),
    ]


def test_golden_join_seen_from_seed() -> None:
    """node1 (5160) receives 01 (MF 2): adds node2 and fans out with MF 1 — but, unlike 5.6.3,
    not to a duplicate of itself."""
    logic = NotificationLogic(
        NodeList(
            build_local_node("sip:127.0.0.1:5160"),
            MembershipPolicy(notification_addresses=("sip:127.0.0.1:5160",)),
        )
    )
    assert [type(c) for c in logic.start()] == [LogWarning]  # only ourselves configured
    assert len(logic.nodes) == 1
    res = logic.on_request(
        ("127.0.0.1", "5161", "*"), wire_body("01_kdmq_notification_peer_maxfwd2.txt"), 2, True
    )
    assert res.changed == 1
    bcast = sends(res.commands)
    assert [(c.node.port_str, c.max_forwards) for c in bcast] == [("5161", 1)]
    assert bcast[0].body == res.body
    assert res.body == b"sip:127.0.0.1:5161;status=active\r\nsip:127.0.0.1:5160;status=active\r\n"
    assert inits(res.commands) == [RunInitCallbacks(logic.nodes.find("sip:127.0.0.1:5161"))]


# =========================================================================== encode


def peer(uri: str, status: NodeStatus = A) -> Node:
    n = build_node(uri, resolve)
    n.status = status
    return n


def test_encode_lists_local_and_active_only_in_order() -> None:
    local = build_local_node("sip:10.0.0.1:5060")
    nodes = [
        peer("sip:10.0.0.2:5060"),
        peer("sip:10.0.0.3:5060", N),
        peer("sip:10.0.0.4:5060", D),
        peer("sip:10.0.0.5:5060"),
        local,
    ]
    body = encode_body(nodes)
    assert body == (
        b"sip:10.0.0.2:5060;status=active\r\n"
        b"sip:10.0.0.5:5060;status=active\r\n"
        b"sip:10.0.0.1:5060;status=active\r\n"
    )
    assert kamailio_563_parse(body)


@pytest.mark.parametrize(
    ("uri", "line"),
    [
        ("sip:10.0.0.2:5060;transport=udp", "sip:10.0.0.2:5060;status=active"),
        ("sip:10.0.0.2:5060;transport=tcp", "sip:10.0.0.2:5060;transport=tcp;status=active"),
        ("sip:10.0.0.2:5061;transport=TLS", "sip:10.0.0.2:5061;transport=tls;status=active"),
        ("sip:10.0.0.2:5060;transport=sctp", "sip:10.0.0.2:5060;transport=sctp;status=active"),
        ("sip:10.0.0.2:443;transport=wss", "sip:10.0.0.2:443;transport=ws;status=active"),
        ("sip:user:pw@10.0.0.2:5060;lr;x=y;status=active", "sip:10.0.0.2:5060;status=active"),
        ("sip:[2001:db8::1]:5060", "sip:[2001:db8::1]:5060;status=active"),
        ("sip:peer.example:5060", "sip:peer.example:5060;status=active"),
        ("sip:10.0.0.2", "sip:10.0.0.2;status=active"),  # never the broken "sip:h:;"
        ("sips:10.0.0.2:5061", "sip:10.0.0.2:5061;status=active"),
    ],
)
def test_encode_line(uri: str, line: str) -> None:
    assert encode_line(peer(uri)) == line
    assert kamailio_563_parse((line + "\r\n").encode(), frozenset({"peer.example"}))


def test_encode_never_writes_udp_or_other_status_words() -> None:
    local = build_local_node("sip:10.0.0.1:5060;transport=udp")
    local.status = N  # cannot happen through the API; must still not leak "not_active"
    body = encode_body([local, peer("sip:10.0.0.2:5060;transport=udp")])
    assert b"udp" not in body and b"not_active" not in body
    assert kamailio_563_parse(body)


def test_encode_disabled_local_for_shutdown() -> None:
    local = build_local_node("sip:10.0.0.1:5060")
    local.status = D
    body = encode_body([peer("sip:10.0.0.2:5060"), local])
    assert body.endswith(b"sip:10.0.0.1:5060;status=disabled\r\n")
    assert kamailio_563_parse(body)[-1][3] == "disabled"


def test_encode_empty() -> None:
    assert encode_body([]) == b""


def test_encode_skips_hand_made_unsafe_nodes() -> None:
    bad = peer("sip:10.0.0.2:5060")
    bad.host = "10.0.0.2\r\n\r\nx"
    assert encode_body([bad]) == b""


def test_oversize_flag() -> None:
    nodes = [peer(f"sip:10.0.{i // 250}.{i % 250 + 1}:5060") for i in range(40)]
    body = encode_body(nodes)
    assert len(body) > KAMAILIO_BODY_LIMIT and exceeds_kamailio_limit(body)
    assert not exceeds_kamailio_limit(body[:KAMAILIO_BODY_LIMIT])
    assert kamailio_563_parse(body)  # still well-formed, just too big for Kamailio to echo
    assert SendNotification(nodes[0], body, 1).oversize


STATUSES = st.sampled_from([A, N, D])
NODE_URIS = st.builds(
    lambda host, port, params: f"sip:{host}{':' + port if port else ''}{params}",
    st.sampled_from(
        ["10.0.0.2", "10.0.0.3", "192.168.1.1", "[::1]", "[2001:db8::7]", "peer.example"]
    ),
    st.sampled_from(["", "5060", "05060", "1", "65535"]),
    st.sampled_from(
        ["", ";transport=udp", ";transport=tcp", ";transport=tls", ";transport=sctp",
         ";transport=ws", ";transport=wss", ";status=disabled", ";lr;foo=bar"]
    ),
)  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(NODE_URIS, STATUSES, st.booleans()), max_size=30))
def test_encode_is_always_563_parsable_and_round_trips(
    specs: list[tuple[str, NodeStatus, bool]],
) -> None:
    nodes = []
    for uri, status, local in specs:
        n = peer(uri, status)
        n.local = local
        nodes.append(n)
    body = encode_body(nodes)
    assert body == b"" or body.endswith(b"\r\n")
    assert b"\r\n\r\n" not in body and not body.startswith(b"\r\n")
    strict = kamailio_563_parse(body, frozenset({"peer.example"}))
    assert {s[3] for s in strict} <= {"active", "disabled"}
    assert all(s[2] != "udp" for s in strict)
    listed = [n for n in nodes if n.local or n.status is A]
    parsed, errors = parse_body(body, resolve=resolve)
    assert errors == []
    assert [p.key for p in parsed] == [wire_key(n.key) for n in listed]  # udp is never written
    assert [p.status for p in parsed] == [D if n.status is D else A for n in listed]


# =========================================================================== parse (tolerant)


def test_parse_trims_trailing_cr_lf_nul() -> None:
    body = b"sip:10.0.0.2:5060;status=active\r\r\nsip:10.0.0.3:5060;status=disabled\r\n\x00\x00"
    nodes, errors = parse_body(body)
    assert errors == []
    assert [(n.host, n.status) for n in nodes] == [("10.0.0.2", A), ("10.0.0.3", D)]
    assert nodes[0].orig_uri == "sip:10.0.0.2:5060;status=active"


def test_parse_unterminated_last_line_keeps_last_char() -> None:
    """Deliberate deviation from 5.6.3's last-character drop."""
    nodes, errors = parse_body(b"sip:10.0.0.2:5060;status=active")
    assert errors == [] and nodes[0].status is A and nodes[0].port_str == "5060"


def test_parse_lf_only_and_empty() -> None:
    nodes, errors = parse_body(b"sip:10.0.0.2:5060\nsip:10.0.0.3:5060\n")
    assert len(nodes) == 2 and errors == []
    assert parse_body(b"") == ([], [])
    assert parse_body(b"\r\n\x00") == ([], [])


def test_parse_garbage_lines_do_not_abort_others() -> None:
    body = (
        b"sip:10.0.0.2:5060;status=active\r\n"
        b"\r\n"
        b"hello world\r\n"
        b"sip:10.0.0.3:5060;status=not_a_status\r\n"
        b"sip:10.0.0.4:5060;status=ACTIVE\r\n"
        b"sip:\xc3\xa9t\xc3\xa9.example:5060\r\n"
        b"sip:10.0.0.5:50\x0160\r\n"
        b"sip:" + b"a" * 2000 + b"\r\n"
        b"sip:nowhere.example:5060\r\n"
        b"sip:10.0.0.6:5060;transport=carrier-pigeon\r\n"
        b"sip:10.0.0.9:5060;status=disabled\r\n"
    )
    nodes, errors = parse_body(body, resolve=resolve)
    assert [n.host for n in nodes] == ["10.0.0.2", "10.0.0.9"]
    assert [e.line_no for e in errors] == list(range(2, 11))
    reasons = " | ".join(e.reason for e in errors)
    for word in ("empty line", "invalid node URI", "unknown node status", "non-ASCII",
                 "longer than", "cannot resolve", "transport"):  # fmt: skip
        assert word in reasons
    assert all(len(e.text) <= 83 for e in errors)  # error texts are clipped


def test_parse_10000_lines_is_capped_and_fast() -> None:
    body = b"".join(
        b"sip:10.0.%d.%d:5060;status=active\r\n" % divmod(i, 250) for i in range(10_000)
    )
    t0 = time.perf_counter()
    nodes, errors = parse_body(body, max_bytes=len(body))
    assert time.perf_counter() - t0 < 2.0
    assert len(nodes) == DEFAULT_MAX_LINES
    assert [e.line_no for e in errors] == [0] and "lines" in errors[0].reason


def test_parse_10000_garbage_lines_fast() -> None:
    body = b"garbage;status=whatever\r\n" * 10_000
    t0 = time.perf_counter()
    nodes, errors = parse_body(body, max_lines=20_000, max_bytes=len(body))
    assert time.perf_counter() - t0 < 2.0
    assert nodes == [] and len(errors) == 10_000


def test_parse_1mb_is_capped() -> None:
    one_line = b"sip:" + b"a" * (1 << 20)
    t0 = time.perf_counter()
    nodes, errors = parse_body(one_line)
    assert nodes == [] and errors[0].line_no == 0 and "exceeds" in errors[0].reason
    one = b"sip:10.0.0.2:5060;status=active\r\n"
    nodes, errors = parse_body(one * 32_000)  # ~1 MB of valid lines
    assert time.perf_counter() - t0 < 2.0
    assert len(nodes) == DEFAULT_MAX_BYTES // len(one)
    assert "exceeds" in errors[0].reason
    assert all(n.port_str == "5060" for n in nodes)  # cut on a line boundary


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_parse_arbitrary_bytes_never_raises(body: bytes) -> None:
    nodes, errors = parse_body(body, max_lines=50, max_bytes=400, resolve=resolve)
    assert all(isinstance(n, Node) for n in nodes)
    assert all(isinstance(e, LineError) for e in errors)


# =========================================================================== logic helpers

LOCAL = "sip:10.0.0.1:5060"
SEED = "sip:10.0.0.5:5060"


def sends(cmds: list[Command] | tuple[Command, ...]) -> list[SendNotification]:
    return [c for c in cmds if isinstance(c, SendNotification)]


def inits(cmds: list[Command] | tuple[Command, ...]) -> list[RunInitCallbacks]:
    return [c for c in cmds if isinstance(c, RunInitCallbacks)]


def warnings_(cmds: list[Command] | tuple[Command, ...]) -> list[str]:
    return [c.message for c in cmds if isinstance(c, LogWarning)]


def make_logic(*addresses: str, local: str = LOCAL, **policy: object) -> NotificationLogic:
    nl = NodeList(
        build_local_node(local),
        MembershipPolicy(notification_addresses=addresses, **policy),  # type: ignore[arg-type]
    )
    return NotificationLogic(nl, resolve)


def line(uri: str, status: str = "active") -> bytes:
    return f"{uri};status={status}\r\n".encode()


# =========================================================================== start (2.5)


def test_start_adds_addresses_and_requests_node_list() -> None:
    logic = make_logic(SEED, "sip:peer.example:5060", SEED, LOCAL, "garbage", "sip:nx.example:1")
    cmds = logic.start()
    assert [n.orig_uri for n in logic.nodes.remote()] == ["sip:peer.example:5060", SEED]
    assert all(n.status is A for n in logic.nodes.remote())  # 6.1 default
    out = sends(cmds)
    assert [(c.node.orig_uri, c.max_forwards, c.channel) for c in out] == [
        ("sip:peer.example:5060", 2, "notification_peer"),
        (SEED, 2, "notification_peer"),
    ]
    assert out[0].body == logic.body()
    assert len(warnings_(cmds)) == 2  # garbage, unresolvable
    assert inits(cmds) == []


def test_start_goes_to_every_remote_node_whatever_status() -> None:
    logic = make_logic(SEED)
    logic.nodes.add(build_node("sip:10.0.0.6:5060;status=disabled"))
    logic.nodes.add(build_node("sip:10.0.0.7:5060;status=not_active"))
    assert sorted(c.node.host for c in sends(logic.start())) == ["10.0.0.5", "10.0.0.6", "10.0.0.7"]


def test_start_without_addresses_is_a_seed() -> None:
    assert make_logic().start() == []


def test_start_with_only_ourselves_warns() -> None:
    logic = make_logic(LOCAL, "sip:10.0.0.1:5060;status=disabled")
    cmds = logic.start()
    assert sends(cmds) == [] and len(warnings_(cmds)) == 1 and len(logic.nodes) == 1


def test_custom_channel() -> None:
    logic = NotificationLogic(
        NodeList(build_local_node(LOCAL), MembershipPolicy(notification_addresses=(SEED,))),
        channel="my_notify",
    )
    assert sends(logic.start())[0].channel == "my_notify"


# =========================================================================== requests (2.6, 1.8)


@pytest.mark.parametrize(
    ("mf", "expected"), [(2, [1]), (3, [2]), (1, []), (0, []), (None, []), (-5, [])]
)
def test_rebroadcast_rule(mf: int | None, expected: list[int]) -> None:
    logic = make_logic()
    logic.nodes.add(build_node("sip:10.0.0.3:5060"))
    logic.nodes.add(build_node("sip:10.0.0.4:5060;status=disabled"))
    sender = ("10.0.0.2", "5060", "*")
    res = logic.on_request(sender, line("sip:10.0.0.2:5060"), mf, True)
    assert res.changed == 1 and res.status == 200
    out = sends(res.commands)
    if expected:
        # every active non-local node, the sender included; never the disabled one
        assert sorted(c.node.host for c in out) == ["10.0.0.2", "10.0.0.3"]
        assert {c.max_forwards for c in out} == set(expected)
        assert all(c.body == res.body for c in out)
    else:
        assert out == []


def test_no_rebroadcast_when_nothing_changed() -> None:
    logic = make_logic()
    logic.nodes.add(build_node("sip:10.0.0.2:5060"))
    res = logic.on_request(None, line("sip:10.0.0.2:5060") + line(LOCAL), 2, True)
    assert res.changed == 0 and sends(res.commands) == []


def test_status_change_counts_as_change() -> None:
    logic = make_logic()
    logic.nodes.add(build_node("sip:10.0.0.2:5060"))
    logic.nodes.add(build_node("sip:10.0.0.3:5060"))
    res = logic.on_request(None, line("sip:10.0.0.2:5060", "disabled"), 2, True)
    assert res.changed == 1
    assert [c.node.host for c in sends(res.commands)] == ["10.0.0.3"]
    assert b"10.0.0.2" not in res.body


def test_reply_body_contains_what_was_learned() -> None:
    logic = make_logic()
    res = logic.on_request(None, line("sip:10.0.0.2:5060"), 1, True)
    assert res.body == line("sip:10.0.0.2:5060") + line(LOCAL)
    assert (res.status, res.reason, res.content_type) == (200, "OK", "text/plain")
    assert not res.oversize


def test_missing_content_length_leaves_list_alone_but_answers() -> None:
    logic = make_logic()
    res = logic.on_request(("10.0.0.2", "5060", "*"), line("sip:10.0.0.2:5060"), 2, False)
    assert res.changed == -1 and len(logic.nodes) == 1
    assert res.status == 200 and res.body == line(LOCAL)
    assert sends(res.commands) == []
    assert len(inits(res.commands)) == 1  # Kamailio runs them regardless of the parse
    assert any("Content-Length" in w for w in warnings_(res.commands))


def test_empty_or_missing_body_with_content_length() -> None:
    logic = make_logic()
    for body in (None, b""):
        res = logic.on_request(None, body, 2, True)
        assert res.changed == 0 and res.status == 200


@pytest.mark.parametrize(
    "body",
    [
        b"garbage\r\n" * 100,
        b"sip:10.0.0.9:5060;status=not_a_word\r\n",
        b"\x00\xff\xfe" * 1000,
        b"sip:10.0.0.1:5060;status=disabled\r\n",  # about ourselves
        b"x" * (1 << 20),
        b"\r\n" * 10_000,
        b"sip:bad host:5060\r\nsip:10.0.0.9:;status=active\r\n",
    ],
)
def test_garbage_bodies_leave_the_list_unharmed(body: bytes) -> None:
    logic = make_logic()
    logic.nodes.add(build_node("sip:10.0.0.2:5060"))
    before = logic.nodes.nodes()
    logic.nodes.drain_events()
    res = logic.on_request(None, body, 2, True)
    assert logic.nodes.nodes() == before
    assert logic.nodes.drain_events() == []
    assert res.status == 200 and res.changed == 0 and sends(res.commands) == []
    assert kamailio_563_parse(res.body)


def test_init_callbacks_exactly_once() -> None:
    logic = make_logic(SEED)
    cmds = logic.start()
    seed = sends(cmds)[0].node
    res = logic.on_request(("10.0.0.2", "5060", "*"), line("sip:10.0.0.2:5060"), 1, True)
    assert inits(res.commands) == [RunInitCallbacks(logic.nodes.find("sip:10.0.0.2:5060"))]
    assert inits(logic.on_reply(seed, 200, line(SEED))) == []
    assert inits(logic.on_request(None, b"", 1, True).commands) == []
    assert logic.init_callbacks_done


def test_init_trigger_unknown_sender() -> None:
    res = make_logic().on_request("not a uri", b"", 1, True)
    assert inits(res.commands) == [RunInitCallbacks(None)]


# =========================================================================== replies (2.7)


def test_reply_200_marks_active_merges_and_inits() -> None:
    logic = make_logic(SEED, remove_inactive=True)
    seed = sends(logic.start())[0].node
    logic.nodes.set_status(SEED, D)
    out = logic.on_reply(seed, 200, line(SEED) + line("sip:10.0.0.6:5060") + line(LOCAL))
    assert logic.nodes.find(SEED).status is A  # type: ignore[union-attr]
    assert logic.nodes.find("sip:10.0.0.6:5060") is not None
    assert len(inits(out)) == 1


def test_reply_408_and_others() -> None:
    logic = make_logic()
    logic.nodes.add(build_node("sip:10.0.0.2:5060"))
    snap = logic.nodes.find("sip:10.0.0.2:5060")
    assert snap is not None
    assert logic.on_reply(snap, 404, line("sip:10.0.0.3:5060")) == []  # body not parsed
    assert len(logic.nodes) == 2
    assert logic.on_reply(snap, 408) == []
    assert logic.nodes.find(snap.key).status is D  # type: ignore[union-attr]
    assert not logic.init_callbacks_done
    logic.on_reply(logic.nodes.find(snap.key), 408)  # type: ignore[arg-type]
    assert logic.nodes.find(snap.key) is None


def test_reply_with_garbage_body_warns() -> None:
    logic = make_logic()
    logic.nodes.add(build_node("sip:10.0.0.2:5060"))
    out = logic.on_reply(logic.nodes.find("sip:10.0.0.2:5060"), 200, b"junk\r\n" * 5)  # type: ignore[arg-type]
    assert len(logic.nodes) == 2
    assert any("5 bad line(s)" in w and "+2 more" in w for w in warnings_(out))


# =========================================================================== ping (2.8)


def test_ping_every_remote_whatever_status_mf1() -> None:
    logic = make_logic(SEED)
    logic.start()
    logic.nodes.add(build_node("sip:10.0.0.6:5060;status=disabled"))
    logic.nodes.add(build_node("sip:10.0.0.7:5060;status=not_active"))
    out = sends(logic.on_ping_timer())
    assert sorted(c.node.host for c in out) == ["10.0.0.5", "10.0.0.6", "10.0.0.7"]
    assert {c.max_forwards for c in out} == {1}
    assert all(c.body == logic.body() for c in out)


def test_ping_rebuild_when_alone_and_init_again() -> None:
    logic = make_logic(SEED)
    seed = sends(logic.start())[0].node
    assert len(inits(logic.on_reply(seed, 200, line(SEED)))) == 1
    logic.nodes.rpc_remove(SEED)  # the list shrinks to ourselves
    cmds = logic.on_ping_timer()
    assert not logic.init_callbacks_done
    assert [(c.node.orig_uri, c.max_forwards) for c in sends(cmds)] == [(SEED, 2)]
    assert len(inits(logic.on_reply(sends(cmds)[0].node, 200, line(SEED)))) == 1


def test_ping_alone_without_addresses() -> None:
    logic = make_logic()
    cmds = logic.on_ping_timer()
    assert sends(cmds) == [] and len(warnings_(cmds)) == 1


def test_oversize_body_warns_on_send() -> None:
    logic = make_logic()
    body = b"".join(line(f"sip:10.0.{i // 250}.{i % 250 + 2}:5060") for i in range(40))
    logic.on_request(None, body, 1, True)
    cmds = logic.on_ping_timer()
    assert len(sends(cmds)) == 40 and all(c.oversize for c in sends(cmds))
    assert any("1024" in w for w in warnings_(cmds))


# =========================================================================== shutdown (2.9)


def test_shutdown_announces_disabled() -> None:
    logic = make_logic(SEED)
    logic.start()
    logic.nodes.add(build_node("sip:10.0.0.6:5060;status=disabled"))
    cmds = logic.shutdown()
    out = sends(cmds)
    assert sorted(c.node.host for c in out) == ["10.0.0.5", "10.0.0.6"]
    assert {c.max_forwards for c in out} == {1}
    assert logic.nodes.local.status is D
    strict = kamailio_563_parse(out[0].body)
    assert ("10.0.0.1", "5060", "", "disabled") in strict
    assert logic.on_ping_timer() == [] and logic.start() == []
    res = logic.on_request(None, line("sip:10.0.0.9:5060"), 2, True)
    assert res.status == 200 and res.commands == ()  # answered, no fan-out, no init


def test_shutdown_received_marks_sender_disabled() -> None:
    a, b = make_logic(), make_logic(local="sip:10.0.0.2:5060")
    a.on_request(None, b.body(), 1, True)
    assert a.nodes.find("sip:10.0.0.2:5060").status is A  # type: ignore[union-attr]
    a.nodes.drain_events()
    announcement = sends(b.shutdown()) or [SendNotification(b.nodes.local, b.body(), 1)]
    a.on_request(b.nodes.local.key, announcement[0].body, 1, True)
    assert a.nodes.find("sip:10.0.0.2:5060").status is D  # type: ignore[union-attr]
    assert [e.kind for e in a.nodes.drain_events()] == ["disabled"]


# =========================================================================== in-memory cluster


class Cluster:
    """Several NotificationLogic instances exchanging commands in memory. Requests are answered
    synchronously; a dead node's requests end in the sender's local 408."""

    def __init__(self) -> None:
        self.logic: dict[NodeKey, NotificationLogic] = {}
        self.alive: set[NodeKey] = set()
        self.inits: Counter[NodeKey] = Counter()
        self.mf_sent: Counter[int] = Counter()
        self.queue: deque[tuple[NodeKey, Command]] = deque()

    def boot(self, local: str, *addresses: str, **policy: object) -> NodeKey:
        logic = make_logic(*addresses, local=local, **policy)
        key = logic.nodes.local.key
        self.logic[key] = logic
        self.alive.add(key)
        self.inits[key] = 0  # a restarted node is a new process
        self.run(key, logic.start())
        return key

    def kill(self, key: NodeKey) -> None:
        self.alive.discard(key)

    def tick(self) -> None:
        for key in list(self.alive):
            self.run(key, self.logic[key].on_ping_timer())

    def run(self, origin: NodeKey, cmds: list[Command] | tuple[Command, ...]) -> None:
        self.queue.extend((origin, c) for c in cmds)
        steps = 0
        while self.queue:
            steps += 1
            assert steps < 10_000, "no convergence"
            src, cmd = self.queue.popleft()
            if isinstance(cmd, RunInitCallbacks):
                self.inits[src] += 1
            elif isinstance(cmd, SendNotification):
                self.mf_sent[cmd.max_forwards] += 1
                assert kamailio_563_parse(cmd.body)
                dest = cmd.node.key
                sender = self.logic[src]
                if dest in self.alive:
                    res = self.logic[dest].on_request(src, cmd.body, cmd.max_forwards, True)
                    assert kamailio_563_parse(res.body)
                    self.queue.extend((dest, c) for c in res.commands)
                    self.queue.extend((src, c) for c in sender.on_reply(cmd.node, 200, res.body))
                else:
                    self.queue.extend((src, c) for c in sender.on_reply(cmd.node, 408, None))

    def view(self, key: NodeKey) -> dict[NodeKey, NodeStatus]:
        return {n.key: n.status for n in self.logic[key].nodes.nodes()}


B_URI, C_URI, A_URI = "sip:10.0.0.2:5060", "sip:10.0.0.3:5060", "sip:10.0.0.1:5060"


def test_walkthrough_join_converges() -> None:
    """Spec 2.10 with three nodes: B is the seed, C then A join through B."""
    c = Cluster()
    b = c.boot(B_URI)
    assert c.inits[b] == 0  # a seed inits on the first notification it receives
    cc = c.boot(C_URI, B_URI)
    a = c.boot(A_URI, B_URI)
    everyone = {a, b, cc}
    for k in everyone:
        view = c.view(k)
        assert set(view) == everyone
        assert set(view.values()) == {A}
        assert [n.key for n in c.logic[k].nodes.nodes() if n.local] == [k]
        assert c.inits[k] == 1
    assert set(c.mf_sent) <= {1, 2}  # never 0: receivers of the fan-out do not re-broadcast
    # steady state: pings change nothing and run no init callbacks
    for _ in range(3):
        c.tick()
    assert all(set(c.view(k).values()) == {A} for k in everyone)
    assert all(c.inits[k] == 1 for k in everyone)
    assert all(c.logic[k].nodes.drain_events() or True for k in everyone)


def test_walkthrough_fanout_reaches_third_node_without_pings() -> None:
    """The seed's MF 1 fan-out alone tells C about A (no ping needed)."""
    c = Cluster()
    c.boot(B_URI)
    cc = c.boot(C_URI, B_URI)
    a = c.boot(A_URI, B_URI)
    assert a in c.view(cc) and cc in c.view(a)
    assert c.mf_sent[2] == 2  # one request-node-list per joiner


def test_cluster_dead_node_disabled_then_removed() -> None:
    c = Cluster()
    b = c.boot(B_URI)
    cc = c.boot(C_URI, B_URI)
    a = c.boot(A_URI, B_URI)
    for k in (a, b, cc):
        c.logic[k].nodes.drain_events()
    c.kill(cc)
    c.tick()
    assert c.view(a)[cc] is D and c.view(b)[cc] is D
    c.tick()
    assert cc not in c.view(a) and cc not in c.view(b)
    assert [e.kind for e in c.logic[a].nodes.drain_events()] == ["disabled", "removed"]


def test_cluster_seed_death_and_restart() -> None:
    c = Cluster()
    b = c.boot(B_URI)
    a = c.boot(A_URI, B_URI)
    c.kill(b)
    for _ in range(5):
        c.tick()
    assert c.view(a)[b] is N  # notification address: never deleted
    # B restarts with an empty list; A's next ping re-introduces both.
    c.logic.pop(b)
    b = c.boot(B_URI)
    c.tick()
    assert c.view(a)[b] is A and c.view(b)[a] is A
    assert c.inits[b] == 1


def test_cluster_dead_seed_stays_not_active_with_two_survivors() -> None:
    """Survivors whose pings are out of phase: the one that has not noticed yet still lists the
    seed as active, which must not flip the other's not_active entry back (no flapping)."""
    c = Cluster()
    b = c.boot(B_URI)
    a = c.boot(A_URI, B_URI)
    cc = c.boot(C_URI, B_URI)
    c.kill(b)
    c.run(a, c.logic[a].on_ping_timer())  # A notices first
    assert c.view(a)[b] is N and c.view(cc)[b] is A
    c.run(cc, c.logic[cc].on_ping_timer())  # C pings A with "B active", then notices itself
    assert c.view(a)[b] is N and c.view(cc)[b] is N
    for _ in range(3):
        c.tick()
    assert c.view(a)[b] is N and c.view(cc)[b] is N
    assert [e.kind for e in c.logic[a].nodes.drain_events() if e.node_uri == B_URI] == [
        "up",
        "down",
    ]


def test_cluster_not_active_node_revived_by_its_own_request() -> None:
    """A node kept as not_active that comes back and asks for the list is active again at once
    (its own line in its own request), not only after the next ping."""
    c = Cluster()
    b = c.boot(B_URI, remove_inactive=False)
    a = c.boot(A_URI, B_URI, remove_inactive=False)
    c.kill(a)
    c.run(b, c.logic[b].on_ping_timer())
    assert c.view(b)[a] is N
    c.logic.pop(a)
    c.boot(A_URI, B_URI, remove_inactive=False)  # its request-node-list reaches B
    assert c.view(b)[a] is A


def test_cluster_fail_count_policy() -> None:
    c = Cluster()
    b = c.boot(B_URI, fail_count_enabled=True)
    a = c.boot(A_URI, B_URI, fail_count_enabled=True)
    c.kill(a)
    seen = []
    for _ in range(3):
        c.tick()
        seen.append(c.view(b).get(a))
    assert seen == [N, D, None]


def test_cluster_lonely_node_rebuilds_and_reinits() -> None:
    c = Cluster()
    b = c.boot(B_URI)
    a = c.boot(A_URI, B_URI)
    assert c.inits[a] == 1
    c.logic[a].nodes.rpc_remove(B_URI)
    c.run(a, c.logic[a].on_ping_timer())  # A alone: re-adds B with MF 2, inits again
    assert c.view(a)[b] is A
    assert c.inits[a] == 2


D_URI = "sip:10.0.0.4:5060"


def _ghost_cluster(holdoff: float) -> tuple[Cluster, NodeKey, NodeKey, NodeKey, NodeKey]:
    """Seed B; A, C, D joined; D then dies and A runs two ping rounds (the first times D out,
    the second deletes it) while C has not pinged yet, so C still lists D as active."""
    c = Cluster()
    b = c.boot(B_URI, rejoin_holdoff=holdoff)
    a = c.boot(A_URI, B_URI, rejoin_holdoff=holdoff)
    cc = c.boot(C_URI, B_URI, rejoin_holdoff=holdoff)
    d = c.boot(D_URI, B_URI, rejoin_holdoff=holdoff)
    for k in (a, b, cc, d):
        c.logic[k].nodes.drain_events()
    c.kill(d)
    c.run(a, c.logic[a].on_ping_timer())
    c.run(a, c.logic[a].on_ping_timer())
    assert c.view(cc)[d] is A
    return c, a, b, cc, d


def _kinds(c: Cluster, key: NodeKey, uri: str) -> list[str]:
    return [e.kind for e in c.logic[key].nodes.drain_events() if e.node_uri.startswith(uri)]


def test_ghost_comes_back_from_a_stale_list_without_holdoff() -> None:
    """Kamailio's behaviour (holdoff 0): after A deleted the dead D, C's stale list (here: C's
    next ping, and already C's replies to A's pings) makes it active on A again."""
    c, a, _b, cc, d = _ghost_cluster(0.0)
    c.run(cc, [SendNotification(c.logic[a].nodes.local, c.logic[cc].body(), 1)])
    assert c.view(a)[d] is A
    kinds = _kinds(c, a, D_URI)
    assert "removed" in kinds and kinds[kinds.index("removed") + 1] == "up", kinds


def test_no_ghost_from_a_stale_list_with_holdoff() -> None:
    """With a holdoff, the stale line brings D back only disabled (not advertised, not sent
    to) and A pings it at once; the 408 deletes it again. It is never active again."""
    c, a, _b, cc, d = _ghost_cluster(10.0)
    assert d not in c.view(a)
    outcome = c.logic[a].on_request(cc, c.logic[cc].body(), 1, True)
    assert c.view(a)[d] is D and outcome.changed == 0
    assert b"10.0.0.4" not in c.logic[a].body()
    verify = sends(outcome.commands)
    assert [(s.node.key, s.max_forwards) for s in verify] == [(d, 1)]
    c.run(a, list(outcome.commands))  # the verification ping times out: D is gone again
    assert d not in c.view(a)
    kinds = _kinds(c, a, D_URI)
    # every time: back disabled at most, and deleted by the verification ping's 408
    assert kinds[-2:] == ["disabled", "removed"] and "up" not in kinds, kinds


def test_restarted_node_is_back_at_once_despite_holdoff() -> None:
    """D deleted everywhere, then restarted on the same address: its own request makes it
    active on the seed B at once; A gets the seed's fan-out (a third party's line), re-adds it
    disabled, and the verification ping's 200 makes it active, without waiting for a ping
    round."""
    c, a, b, _cc, d = _ghost_cluster(10.0)
    c.run(b, c.logic[b].on_ping_timer())
    c.run(b, c.logic[b].on_ping_timer())
    assert d not in c.view(b) and c.logic[b].nodes.is_buried(d)
    c.logic.pop(d)
    c.boot(D_URI, B_URI, rejoin_holdoff=10.0)
    assert c.view(b)[d] is A and c.view(a)[d] is A
    assert not c.logic[a].nodes.is_buried(d) and not c.logic[b].nodes.is_buried(d)
