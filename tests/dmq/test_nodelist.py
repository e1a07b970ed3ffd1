"""Node list: identity, merge (spec 2.6), status machine (2.7 6.1.x), events, RPC (5)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pydmq.dmq.node import (
    LineError,
    NodeError,
    NodeKey,
    NodeStatus,
    build_local_node,
    build_node,
    node_key,
)
from pydmq.dmq.nodelist import MembershipEvent, MembershipPolicy, NodeList, RpcFault

A, D, N = NodeStatus.ACTIVE, NodeStatus.DISABLED, NodeStatus.NOT_ACTIVE
LOCAL = "sip:10.0.0.1:5060"
PEER = "sip:10.0.0.2:5060"
PEER_KEY: NodeKey = ("10.0.0.2", "5060", "*")
DNS = {"peer.example": "10.0.0.7", "seed.example": "10.0.0.8"}


def resolve(host: str) -> str | None:
    return DNS.get(host)


def make(policy: MembershipPolicy | None = None, *peers: str) -> NodeList:
    nl = NodeList(build_local_node(LOCAL), policy)
    for p in peers:
        assert nl.add(build_node(p, resolve))
    nl.drain_events()
    return nl


def status(nl: NodeList, ref: str | NodeKey) -> NodeStatus | None:
    n = nl.find(ref)
    return n.status if n is not None else None


def keys(nl: NodeList) -> list[NodeKey]:
    return [n.key for n in nl.nodes()]


# ----------------------------------------------------------------- basics


def test_local_only_at_start() -> None:
    nl = make()
    assert len(nl) == 1
    assert nl.local.local and nl.local.status is A
    assert nl.remote() == [] and nl.active_remote() == []


def test_local_is_forced_local_and_active() -> None:
    node = build_node(LOCAL + ";status=disabled")
    nl = NodeList(node)
    assert nl.local.local and nl.local.status is A
    assert node.local is False  # the argument is not mutated


def test_newest_first_order() -> None:
    nl = make(None, "sip:10.0.0.2:5060", "sip:10.0.0.3:5060", "sip:10.0.0.4:5060")
    assert [n.port_str + n.host[-1] for n in nl.nodes()] == ["50604", "50603", "50602", "50601"]
    assert nl.nodes()[-1].local


def test_find_by_key_and_text() -> None:
    nl = make(None, PEER)
    assert nl.find(PEER_KEY) is not None
    assert nl.find("sip:10.0.0.2:5060;status=disabled") is not None  # params do not matter
    assert nl.find("sip:10.0.0.2") is None  # port string matters
    assert nl.find("sip:10.0.0.2:5060;transport=udp") is None  # proto matters
    assert nl.find(LOCAL) is not None and nl.find(LOCAL).local  # type: ignore[union-attr]
    with pytest.raises(NodeError):
        nl.find("not a uri")
    assert PEER in nl and PEER_KEY in nl and "garbage" not in nl and 42 not in nl


def test_find_returns_snapshots() -> None:
    nl = make(None, PEER)
    n = nl.find(PEER)
    assert n is not None
    n.status = D
    assert status(nl, PEER) is A


def test_add_refuses_duplicates_and_ourselves() -> None:
    nl = make(None, PEER)
    assert not nl.add(build_node(PEER + ";status=disabled"))
    assert not nl.add(build_node(LOCAL))
    assert not nl.add(build_local_node("sip:10.0.0.99:5060"))
    assert len(nl) == 2
    assert nl.add(build_node(PEER + ";transport=udp"))  # a different identity
    assert len(nl) == 3


def test_remove_refuses_local() -> None:
    nl = make(None, PEER)
    assert not nl.remove(LOCAL)
    assert not nl.remove("sip:10.0.0.3:5060")
    assert nl.remove(PEER)
    assert keys(nl) == [nl.local.key]


def test_broadcast_and_ping_targets() -> None:
    nl = make(None, "sip:10.0.0.2:5060", "sip:10.0.0.3:5060", "sip:10.0.0.4:5060")
    nl.set_status("sip:10.0.0.3:5060", N)
    nl.set_status("sip:10.0.0.4:5060", D)
    assert [n.host for n in nl.active_remote()] == ["10.0.0.2"]
    assert nl.active_remote(except_node="sip:10.0.0.2:5060") == []
    assert nl.active_remote(except_node=("10.0.0.2", "5060", "*")) == []
    assert [n.host for n in nl.remote()] == ["10.0.0.4", "10.0.0.3", "10.0.0.2"]
    assert all(not n.local for n in nl.remote())


def test_is_from_node_any_status_not_local() -> None:
    nl = make(None, "sip:10.0.0.2:5060", "sip:peer.example:5060", "sip:[2001:db8::5]:5060")
    nl.set_status("sip:10.0.0.2:5060", D)
    assert nl.is_from_node("10.0.0.2")  # disabled still counts
    assert nl.is_from_node("10.0.0.7")  # resolved address of a name
    assert nl.is_from_node("2001:DB8:0::5")
    assert nl.is_from_node("::ffff:10.0.0.2")  # dual-stack socket view
    assert not nl.is_from_node("10.0.0.1")  # ourselves
    assert not nl.is_from_node("10.0.0.9")
    assert not nl.is_from_node("garbage")


def test_set_local_status_emits_nothing() -> None:
    nl = make()
    nl.set_local_status(D)
    assert nl.local.status is D
    assert nl.drain_events() == []
    assert not nl.set_status(LOCAL, A)


# ----------------------------------------------------------------- merge (2.6)

MERGE_TABLE = [
    # stored status (None = unknown), line, expected count, expected status after
    (None, "sip:10.0.0.2:5060;status=active", 1, A),
    (None, "sip:10.0.0.2:5060", 1, A),  # 6.1 default
    (None, "sip:10.0.0.2:5060;status=disabled", 1, D),  # a disabled node does get added
    (None, "sip:10.0.0.2:5060;status=pending", 1, N),  # 5.6.3 word
    (None, "sip:10.0.0.2:5060;status=not_active", 1, N),
    (A, "sip:10.0.0.2:5060;status=active", 0, A),  # repeats are ignored
    (A, "sip:10.0.0.2:5060;status=disabled", 1, D),
    (A, "sip:10.0.0.2:5060;status=not_active", 1, N),
    (A, "sip:10.0.0.2:5060;status=timeout", 1, N),
    (N, "sip:10.0.0.2:5060;status=active", 0, N),  # pydmq: hearsay never revives not_active
    (N, "sip:10.0.0.2:5060;status=disabled", 1, D),
    (N, "sip:10.0.0.2:5060;status=not_active", 0, N),
    (D, "sip:10.0.0.2:5060;status=active", 0, D),  # 5.6.3/6.1: a body never revives
    (D, "sip:10.0.0.2:5060;status=not_active", 0, D),
    (N, "sip:10.0.0.2:5060", 0, N),  # no URI parameter at all: no change
    (A, "sip:10.0.0.2:5060;foo=bar;status=disabled", 1, D),  # some parameter: status applies
    (N, "sip:10.0.0.2:5060;foo=bar", 0, N),  # default status active: not a revival either
    (A, "sip:user@10.0.0.2:5060;status=disabled", 1, D),  # user part is not identity
]


@pytest.mark.parametrize(("stored", "line", "count", "after"), MERGE_TABLE)
def test_merge_rules(stored: NodeStatus | None, line: str, count: int, after: NodeStatus) -> None:
    nl = make()
    if stored is not None:
        nl.add(build_node(PEER))
        nl.set_status(PEER, stored)
    for body in (line + "\r\n", line, line.encode(), [line]):
        fresh = make()
        if stored is not None:
            fresh.add(build_node(PEER))
            fresh.set_status(PEER, stored)
        assert fresh.merge(body) == count, body
        assert status(fresh, PEER) is after
        assert len(fresh) == 2


def test_merge_not_active_revived_only_by_the_senders_own_line() -> None:
    """Bodies list only active nodes, so a peer that has not noticed a failure yet still says
    active; only the node itself (its own request) brings a not_active entry back."""
    other = "sip:10.0.0.3:5060"
    nl = make()
    nl.add(build_node(PEER))
    nl.add(build_node(other))
    nl.set_status(PEER, N)
    body = f"{PEER};status=active\r\n{other};status=active\r\n"
    assert nl.merge(body, sender=other) == 0
    assert status(nl, PEER) is N
    assert nl.merge(body, sender=node_key(PEER)) == 1
    assert status(nl, PEER) is A
    nl.set_status(PEER, N)
    assert nl.merge(body, sender="sip:notification_peer@10.0.0.2:5060") == 1  # a From URI
    assert status(nl, PEER) is A
    nl.set_status(PEER, N)
    assert nl.merge(body, sender="not a uri") == 0  # an unparsable sender is nobody
    assert status(nl, PEER) is N


@pytest.mark.parametrize(
    "line",
    [
        LOCAL + ";status=disabled",
        LOCAL + ";status=not_active",
        LOCAL + ";status=active",
        LOCAL,
        "sip:user@10.0.0.1:5060;status=disabled",
    ],
)
def test_merge_never_touches_nor_duplicates_local(line: str) -> None:
    nl = make(None, PEER)
    assert nl.merge((line + "\r\n") * 3) == 0
    assert len(nl) == 2
    assert [n for n in nl.nodes() if n.key == nl.local.key] == [nl.local]
    assert nl.local.status is A
    assert nl.drain_events() == []


def test_merge_self_duplicate_golden_reply_from_node1_view() -> None:
    """5.6.3's node1 advertises itself twice (local + its own notification address); a node
    whose identity is ours must stay exactly one local entry."""
    nl = NodeList(build_local_node("sip:127.0.0.1:5160"))
    body = (
        b"sip:127.0.0.1:5161;status=active\r\n"
        b"sip:127.0.0.1:5160;status=active\r\n"
        b"sip:127.0.0.1:5160;status=active\r\n"
    )
    assert nl.merge(body) == 1
    assert keys(nl) == [("127.0.0.1", "5161", "*"), ("127.0.0.1", "5160", "*")]
    assert [n.local for n in nl.nodes()] == [False, True]


def test_merge_transport_udp_is_another_identity() -> None:
    nl = make(None, PEER)
    assert nl.merge(PEER + ";transport=udp;status=disabled\r\n") == 1
    assert status(nl, PEER) is A
    assert status(nl, PEER + ";transport=udp") is D


def test_merge_no_ip_fallback() -> None:
    """Two instances on one IP with different ports are two nodes (no 5.8+ IP fallback)."""
    nl = NodeList(build_local_node("sip:127.0.0.1:5160"))
    assert (
        nl.merge(b"sip:127.0.0.1:5161;status=active\r\nsip:127.0.0.1:5162;status=active\r\n") == 2
    )
    assert len(nl) == 3


def test_merge_duplicates_in_one_body_count_once() -> None:
    nl = make()
    assert nl.merge(f"{PEER};status=active\r\n{PEER};status=active\r\n") == 1
    assert len(nl) == 2


def test_merge_adds_newest_first_in_body_order() -> None:
    nl = make()
    nl.merge("sip:10.0.0.2:1\r\nsip:10.0.0.2:2\r\nsip:10.0.0.2:3\r\n")
    assert [n.port_str for n in nl.nodes()] == ["3", "2", "1", "5060"]


def test_merge_keeps_line_as_orig_uri() -> None:
    nl = make()
    nl.merge("sip:10.0.0.2:5060;status=active;x=1\r\n")
    assert nl.find(PEER).orig_uri == "sip:10.0.0.2:5060;status=active;x=1"  # type: ignore[union-attr]


def test_merge_bad_lines_reported_good_lines_applied() -> None:
    nl = make()
    errors: list[LineError] = []
    body = (
        "sip:10.0.0.2:5060;status=active\r\n"
        "garbage\r\n"
        "sip:10.0.0.3:5060;status=bogus\r\n"
        "\r\n"
        "sip:nowhere.example:5060;status=active\r\n"
        "sip:10.0.0.4:5060;status=active\r\n"
    )
    assert nl.merge(body, resolve, errors=errors) == 2
    assert [e.line_no for e in errors] == [2, 3, 4, 5]
    assert {n.host for n in nl.remote()} == {"10.0.0.2", "10.0.0.4"}


def test_merge_known_names_do_not_hit_dns() -> None:
    calls: list[str] = []

    def spy(host: str) -> str | None:
        calls.append(host)
        return DNS.get(host)

    nl = make(None, "sip:peer.example:5060")
    nl.merge("sip:peer.example:5060;status=active\r\n" * 50 + "sip:seed.example:5060\r\n" * 50, spy)
    assert calls == ["seed.example"]


def test_merge_unresolvable_name_resolved_once_per_body() -> None:
    calls: list[str] = []

    def spy(host: str) -> str | None:
        calls.append(host)
        return None

    nl = make()
    errors: list[LineError] = []
    nl.merge("sip:nowhere.example:5060\r\n" * 500, spy, errors=errors)
    assert calls == ["nowhere.example"]
    assert len(errors) == 500 and len(nl) == 1


def test_merge_missing_resolver_only_literals() -> None:
    nl = make()
    errors: list[LineError] = []
    assert nl.merge("sip:peer.example:5060\r\nsip:10.0.0.2:5060\r\n", errors=errors) == 1
    assert "no resolver" in errors[0].reason


# ----------------------------------------------------------------- replies (2.7 6.1.x)

DEFAULT = MembershipPolicy()
KEEP = MembershipPolicy(remove_inactive=False)
FC = MembershipPolicy(fail_count_enabled=True)
FC_KEEP = MembershipPolicy(fail_count_enabled=True, remove_inactive=False)

GONE = None

REPLY_TABLE = [
    # policy, status at send time, current status, code, expected status (None = deleted)
    (DEFAULT, A, A, 200, A),
    (DEFAULT, D, D, 200, A),  # a 200 is what revives a disabled node
    (DEFAULT, N, N, 200, A),
    (DEFAULT, A, A, 408, D),
    (DEFAULT, N, N, 408, D),
    (DEFAULT, A, N, 408, D),
    (DEFAULT, D, D, 408, GONE),
    (DEFAULT, D, A, 408, GONE),  # decided on the snapshot, as 6.1 does
    (KEEP, A, A, 408, N),
    (KEEP, N, N, 408, N),
    (KEEP, D, D, 408, GONE),  # 6.1: the snapshot check comes first, even with remove_inactive=0
    (FC, A, A, 408, N),
    (FC, N, N, 408, N),  # fail_count 1 is not > 1 yet
    (FC, D, D, 408, GONE),
    (FC, N, D, 408, D),
    (FC_KEEP, A, A, 408, N),
    (FC_KEEP, D, D, 408, GONE),
]


@pytest.mark.parametrize(("policy", "snap", "current", "code", "after"), REPLY_TABLE)
def test_reply_transitions(
    policy: MembershipPolicy,
    snap: NodeStatus,
    current: NodeStatus,
    code: int,
    after: NodeStatus | None,
) -> None:
    nl = make(policy, PEER)
    nl.set_status(PEER, snap)
    snapshot = nl.find(PEER)
    assert snapshot is not None
    nl.set_status(PEER, current)
    nl.on_reply(snapshot, code)
    assert status(nl, PEER) is after


@pytest.mark.parametrize("code", [100, 180, 202, 404, 480, 486, 500, 503, 603])
@pytest.mark.parametrize("policy", [DEFAULT, KEEP, FC])
@pytest.mark.parametrize("st_", [A, N, D])
def test_other_codes_are_ignored(code: int, policy: MembershipPolicy, st_: NodeStatus) -> None:
    nl = make(policy, PEER)
    nl.set_status(PEER, st_)
    nl.drain_events()
    nl.on_reply(nl.find(PEER), code)  # type: ignore[arg-type]
    assert status(nl, PEER) is st_
    assert nl.find(PEER).fail_count == 0  # type: ignore[union-attr]
    assert nl.drain_events() == []


def timeout(nl: NodeList, ref: str = PEER) -> None:
    snap = nl.find(ref)
    assert snap is not None
    nl.on_reply(snap, 408)


def test_default_path_two_timeouts_delete() -> None:
    nl = make(DEFAULT, PEER)
    timeout(nl)
    assert status(nl, PEER) is D
    timeout(nl)
    assert status(nl, PEER) is None
    assert len(nl) == 1


def test_remove_inactive_0_never_deletes_by_timeout() -> None:
    nl = make(KEEP, PEER)
    for _ in range(10):
        timeout(nl)
        assert status(nl, PEER) is N


def test_fail_count_default_thresholds_path() -> None:
    """1st timeout -> not_active, 2nd -> disabled, 3rd -> deleted (spec 2.7)."""
    nl = make(FC, PEER)
    timeout(nl)
    assert (status(nl, PEER), nl.find(PEER).fail_count) == (N, 1)  # type: ignore[union-attr]
    timeout(nl)
    assert (status(nl, PEER), nl.find(PEER).fail_count) == (D, 2)  # type: ignore[union-attr]
    timeout(nl)
    assert status(nl, PEER) is None


def test_fail_count_custom_thresholds() -> None:
    nl = make(
        MembershipPolicy(
            fail_count_enabled=True,
            fail_count_threshold_not_active=2,
            fail_count_threshold_disabled=4,
        ),
        PEER,
    )
    seen = []
    for _ in range(6):
        timeout(nl)
        n = nl.find(PEER)
        seen.append((n.status, n.fail_count) if n else None)
    assert seen == [(A, 1), (A, 2), (N, 3), (N, 4), (D, 5), None]


def test_fail_count_one_step_per_timeout() -> None:
    """With thresholds already exceeded an active node still only goes to not_active."""
    nl = make(FC, PEER)
    for _ in range(3):
        nl.on_consumer_timeout(PEER)  # only the first one counts (active)
    nl.set_status(PEER, A)
    timeout(nl)
    assert status(nl, PEER) is N


def test_200_resets_fail_count_only_when_enabled() -> None:
    nl = make(FC, PEER)
    timeout(nl)
    timeout(nl)
    assert nl.find(PEER).fail_count == 2  # type: ignore[union-attr]
    nl.on_reply(nl.find(PEER), 200)  # type: ignore[arg-type]
    n = nl.find(PEER)
    assert n is not None and (n.status, n.fail_count) == (A, 0)


def test_reply_for_a_node_no_longer_listed_is_harmless() -> None:
    nl = make(DEFAULT, PEER)
    snap = nl.find(PEER)
    nl.remove(PEER)
    nl.drain_events()
    for code in (200, 408):
        nl.on_reply(snap, code)  # type: ignore[arg-type]
    assert len(nl) == 1 and nl.drain_events() == []


def test_reply_about_local_never_changes_it() -> None:
    nl = make(DEFAULT)
    for code in (408, 408, 200):
        nl.on_reply(nl.local, code)
    assert len(nl) == 1 and nl.local.status is A


# ----------------------------------------------------------------- notification addresses

SEED = "sip:10.0.0.5:5060"


@pytest.mark.parametrize("policy", [DEFAULT, KEEP])
def test_notification_address_goes_not_active_never_deleted(policy: MembershipPolicy) -> None:
    p = MembershipPolicy(remove_inactive=policy.remove_inactive, notification_addresses=(SEED,))
    nl = make(p, SEED)
    for _ in range(5):
        timeout(nl, SEED)
        assert status(nl, SEED) is N


def test_notification_address_survives_snapshot_disabled() -> None:
    """Deliberate deviation: 6.1 deletes a node whose snapshot was disabled, even a
    notification address; we never delete those and apply the rest of the rules."""
    nl = make(MembershipPolicy(notification_addresses=(SEED,)), SEED)
    nl.set_status(SEED, D)  # e.g. its shutdown announcement
    timeout(nl, SEED)
    assert status(nl, SEED) is N
    nl.on_reply(nl.find(SEED), 200)  # type: ignore[arg-type]
    assert status(nl, SEED) is A


def test_notification_address_fail_count_path_never_deletes() -> None:
    nl = make(MembershipPolicy(fail_count_enabled=True, notification_addresses=(SEED,)), SEED)
    seen = []
    for _ in range(6):
        timeout(nl, SEED)
        n = nl.find(SEED)
        seen.append((n.status, n.fail_count) if n else None)
    assert seen == [(N, 1), (D, 2), (D, 3), (D, 4), (D, 5), (D, 6)]


def test_notification_address_matched_by_identity_too() -> None:
    """Kamailio compares orig_uri strings; a seed learned from a body as
    ``sip:h:p;status=active`` must still be protected."""
    nl = make(MembershipPolicy(notification_addresses=(SEED,)))
    nl.merge(SEED + ";status=active\r\n")
    assert nl.is_notification_address(SEED)
    for _ in range(3):
        timeout(nl, SEED)
    assert status(nl, SEED) is N
    assert not nl.is_notification_address(PEER)
    assert not nl.is_notification_address("sip:10.0.0.5:5061")


def test_unparsable_notification_address_is_ignored() -> None:
    nl = make(MembershipPolicy(notification_addresses=("garbage", SEED)), SEED)
    assert nl.is_notification_address(SEED)


# ----------------------------------------------------------------- consumer timeouts


def test_consumer_timeout_without_fail_count_does_nothing() -> None:
    nl = make(DEFAULT, PEER)
    for _ in range(5):
        nl.on_consumer_timeout(PEER)
    n = nl.find(PEER)
    assert n is not None and (n.status, n.fail_count) == (A, 0)


def test_consumer_timeout_at_most_not_active() -> None:
    nl = make(FC, PEER)
    for _ in range(10):
        nl.on_consumer_timeout(nl.find(PEER))  # type: ignore[arg-type]
    n = nl.find(PEER)
    assert n is not None and (n.status, n.fail_count) == (N, 1)  # counted only while active


def test_consumer_timeout_thresholds() -> None:
    nl = make(MembershipPolicy(fail_count_enabled=True, fail_count_threshold_not_active=2), PEER)
    nl.on_consumer_timeout(PEER)
    nl.on_consumer_timeout(PEER)
    assert status(nl, PEER) is A
    nl.on_consumer_timeout(PEER)
    assert status(nl, PEER) is N


def test_consumer_timeout_on_disabled_or_unknown_or_local() -> None:
    nl = make(FC, PEER)
    nl.set_status(PEER, D)
    nl.on_consumer_timeout(PEER)
    nl.on_consumer_timeout("sip:10.0.0.77:5060")
    nl.on_consumer_timeout(LOCAL)
    n = nl.find(PEER)
    assert n is not None and (n.status, n.fail_count) == (D, 0)
    assert nl.local.status is A


# ----------------------------------------------------------------- events


def test_events() -> None:
    nl = make(DEFAULT)
    nl.merge(f"{PEER};status=active\r\nsip:10.0.0.3:5060;status=disabled\r\n")
    nl.set_status(PEER, N)
    snap = nl.find(PEER)
    assert snap is not None
    nl.on_reply(snap, 200)
    timeout(nl)
    timeout(nl)
    nl.on_reply(snap, 200)  # gone: no event, not re-added by a bare status change
    p = f"{PEER};status=active"
    assert nl.drain_events() == [
        MembershipEvent("up", p, None, A),
        MembershipEvent("disabled", "sip:10.0.0.3:5060;status=disabled", None, D),
        MembershipEvent("down", p, A, N),
        MembershipEvent("up", p, N, A),
        MembershipEvent("disabled", p, A, D),
        MembershipEvent("removed", p, D, None),
    ]
    assert nl.drain_events() == []


def test_no_event_without_change() -> None:
    nl = make(KEEP, PEER)
    timeout(nl)
    nl.drain_events()
    timeout(nl)
    nl.merge(PEER + ";status=not_active\r\n")
    nl.set_status(PEER, N)
    assert nl.drain_events() == []


# ----------------------------------------------------------------- RPC (spec 5)


def test_rpc_list_nodes() -> None:
    nl = make(FC, "sip:10.0.0.2:5060;transport=tcp")
    timeout(nl, "sip:10.0.0.2:5060;transport=tcp")
    out = nl.rpc_list_nodes()
    assert out == [
        {
            "host": "10.0.0.2",
            "port": "5060",
            "proto": "tcp",
            "resolved_ip": "10.0.0.2",
            "status": "not_active",
            "last_notification": 0,
            "local": 0,
            "fail_count": 1,
        },
        {
            "host": "10.0.0.1",
            "port": "5060",
            "proto": "*",
            "resolved_ip": "10.0.0.1",
            "status": "active",
            "last_notification": 0,
            "local": 1,
            "fail_count": 0,
        },
    ]
    assert list(out[0]) == [
        "host", "port", "proto", "resolved_ip", "status", "last_notification", "local",
        "fail_count",
    ]  # fmt: skip


def fault(fn: object, *args: object) -> str:
    with pytest.raises(RpcFault) as info:
        fn(*args)  # type: ignore[operator]
    assert info.value.code == 500
    return info.value.message


def test_rpc_remove() -> None:
    nl = make(None, PEER)
    assert fault(nl.rpc_remove, None) == "Invalid Parameters"
    assert fault(nl.rpc_remove, "garbage") == "Failure"
    assert fault(nl.rpc_remove, "") == "Failure"
    assert nl.rpc_remove("sip:10.0.0.9:5060") == "Ok. DMQ node removed."
    assert nl.rpc_remove(LOCAL) == "Ok. DMQ node removed."
    assert nl.rpc_remove("sip:10.0.0.2:5060;transport=bogus") == "Ok. DMQ node removed."
    assert len(nl) == 2
    assert nl.rpc_remove(PEER + ";status=active") == "Ok. DMQ node removed."
    assert len(nl) == 1 and nl.local.local


def test_rpc_add() -> None:
    nl = make(None, PEER)
    assert fault(nl.rpc_add, None) == "Invalid Parameters"
    assert fault(nl.rpc_add, PEER) == "Node is already added"
    assert fault(nl.rpc_add, LOCAL) == "Node is already added"
    assert fault(nl.rpc_add, "garbage") == "Failure"
    assert fault(nl.rpc_add, "sip:nowhere.example:5060", resolve) == "Failure"
    assert fault(nl.rpc_add, "sip:10.0.0.3:5060;status=bogus") == "Failure"
    assert nl.rpc_add("sip:peer.example:5060;status=disabled", resolve) == "Ok. DMQ node added."
    assert status(nl, "sip:peer.example:5060") is D
    assert nl.rpc_add("sip:10.0.0.3:5060") == "Ok. DMQ node added."
    assert status(nl, "sip:10.0.0.3:5060") is A


def test_rpc_change_status() -> None:
    nl = make(None, PEER)
    assert fault(nl.rpc_change_status, None, "active") == "Invalid Parameters"
    assert fault(nl.rpc_change_status, PEER, None) == "Invalid Parameters"
    bad = "Invalid Status - use: active, not_active, disabled"
    for word in ("pending", "timeout", "Active", ""):
        assert fault(nl.rpc_change_status, PEER, word) == bad
    assert fault(nl.rpc_change_status, "garbage", "active") == "Invalid Parameters"
    assert fault(nl.rpc_change_status, "sip:10.0.0.9:5060", "active") == "Node Not Found"
    assert fault(nl.rpc_change_status, LOCAL, "disabled") == "Node is local"
    assert nl.rpc_change_status(PEER, "active") == "Ok. DMQ node status is already active."
    assert nl.rpc_change_status(PEER, "not_active") == "Ok. DMQ node status changed."
    assert status(nl, PEER) is N
    assert nl.rpc_change_status(PEER, "disabled") == "Ok. DMQ node status changed."
    assert nl.rpc_change_status(PEER, "disabled") == "Ok. DMQ node status is already disabled."
    assert nl.local.status is A


# ----------------------------------------------------------------- property: merge is safe

HOSTS = [
    "10.0.0.1",
    "10.0.0.2",
    "10.0.0.3",
    "[::1]",
    "peer.example",
    "nowhere.example",
    "Peer.example",
]
PORTS = ["", "5060", "05060", "5061"]
PARAMS = [
    "",
    ";status=active",
    ";status=disabled",
    ";status=not_active",
    ";status=pending",
    ";status=timeout",
    ";status=bogus",
    ";transport=udp",
    ";transport=tcp",
    ";transport=wss;status=active",
    ";transport=xyz",
    ";x=y",
]


@st.composite
def node_lines(draw: st.DrawFn) -> str:
    host = draw(st.sampled_from(HOSTS))
    port = draw(st.sampled_from(PORTS))
    params = draw(st.sampled_from(PARAMS))
    return f"sip:{host}{':' + port if port else ''}{params}"


lines = st.one_of(node_lines(), st.text(max_size=40), st.sampled_from(["", "sip:", "\x00", "\r"]))
separators = st.sampled_from(["\r\n", "\n", "\r\n\r\n", "\n\x00", "\r\r\n"])


@st.composite
def bodies(draw: st.DrawFn) -> bytes | str:
    parts = draw(st.lists(st.tuples(lines, separators), max_size=25))
    text = "".join(a + b for a, b in parts)
    if draw(st.booleans()):
        return text.encode("utf-8", "surrogatepass")
    return text


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.one_of(bodies(), st.binary(max_size=200)), min_size=1, max_size=4),
    st.sampled_from([DEFAULT, KEEP, FC]),
)
def test_merge_arbitrary_text_never_raises_nor_duplicates(
    payloads: list[bytes | str], policy: MembershipPolicy
) -> None:
    nl = make(policy, PEER)
    local = nl.local
    for payload in payloads:
        errors: list[LineError] = []
        changed = nl.merge(payload, resolve, errors=errors)
        assert changed >= 0
        assert all(isinstance(e, LineError) and str(e) for e in errors)
        ks = keys(nl)
        assert len(ks) == len(set(ks))
        assert [n for n in nl.nodes() if n.local] == [local]
        assert sum(1 for k in ks if k == local.key) == 1
    for ev in nl.drain_events():
        assert ev.node_uri != LOCAL


def test_udp_local_is_not_duplicated_by_its_advertised_form() -> None:
    """A local ``transport=udp`` node is advertised without it (spec 2.3); when that line comes
    back it is still us (5.6.3 would add a non-local duplicate of itself)."""
    nl = NodeList(build_local_node("sip:10.0.0.1:5060;transport=udp"))
    assert (
        nl.merge(b"sip:10.0.0.1:5060;status=disabled\r\nsip:10.0.0.1:5060;transport=udp\r\n") == 0
    )
    assert len(nl) == 1 and nl.local.status is A
    assert not nl.add(build_node("sip:10.0.0.1:5060"))
    assert nl.find("sip:10.0.0.1:5060") == nl.local
    assert fault(nl.rpc_change_status, "sip:10.0.0.1:5060", "disabled") == "Node is local"
    assert [n.local for n in nl.nodes()] == [True] and len(nl.rpc_list_nodes()) == 1


# ----------------------------------------------------------------- rejoin holdoff (no ghosts)


def test_holdoff_buries_only_nodes_deleted_for_not_answering_and_expires() -> None:
    now = [100.0]
    nl = NodeList(
        build_local_node(LOCAL), MembershipPolicy(rejoin_holdoff=5.0), clock=lambda: now[0]
    )
    nl.add(build_node(PEER))
    other = "sip:10.0.0.3:5060"
    nl.add(build_node(other))
    timeout(nl)
    timeout(nl)
    assert status(nl, PEER) is GONE and nl.is_buried(PEER)
    nl.rpc_remove(other)  # an operator's removal buries nothing
    assert not nl.is_buried(other)
    nl.drain_events()
    # a third party's "active" line: back as disabled, queued for verification, not counted
    assert nl.merge(PEER + ";status=active\r\n", sender="sip:10.0.0.3:5060") == 0
    assert status(nl, PEER) is D
    assert [n.key for n in nl.take_unverified()] == [PEER_KEY]
    assert nl.take_unverified() == []
    timeout(nl)  # the verification ping (sent while disabled) times out: deleted again
    assert status(nl, PEER) is GONE
    # a "disabled" line about it is not even added
    assert nl.merge(PEER + ";status=disabled\r\n") == 0 and status(nl, PEER) is GONE
    # its own line in its own request is taken as is
    assert nl.merge(PEER + ";status=active\r\n", sender=PEER) == 1
    assert status(nl, PEER) is A and not nl.is_buried(PEER)
    timeout(nl)
    timeout(nl)
    assert nl.is_buried(PEER)
    now[0] += 5.0  # holdoff over: Kamailio's rule again
    assert nl.merge(PEER + ";status=active\r\n") == 1 and status(nl, PEER) is A
    assert nl.take_unverified() == []


def test_holdoff_verified_node_becomes_active_on_its_200() -> None:
    nl = NodeList(build_local_node(LOCAL), MembershipPolicy(rejoin_holdoff=60.0))
    nl.add(build_node(PEER))
    timeout(nl)
    timeout(nl)
    nl.merge(PEER + ";status=active\r\n")
    (snap,) = nl.take_unverified()
    nl.on_reply(snap, 200)
    assert status(nl, PEER) is A and not nl.is_buried(PEER)


def test_no_holdoff_by_default() -> None:
    nl = make(DEFAULT, PEER)
    timeout(nl)
    timeout(nl)
    assert not nl.is_buried(PEER)
    assert nl.merge(PEER + ";status=active\r\n") == 1 and status(nl, PEER) is A
