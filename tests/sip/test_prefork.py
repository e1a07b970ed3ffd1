"""The sans-I/O parts of the UDP receivers: the shared board and the stateless rules.

The processes themselves, against real sockets, are in ``tests/dmq/test_udp_children.py``.
"""

from __future__ import annotations

import pytest

from pydmq.sip.message import parse_message
from pydmq.sip.prefork import (
    COUNTERS,
    DROP,
    FORWARD,
    Board,
    StatelessFront,
    StatelessRules,
)
from pydmq.sip.transport import Address
from tests.support.net import build_request

SOURCE = Address("udp", "127.0.0.1", 40000)


@pytest.fixture
def board() -> Board:
    b = Board.create(2)
    yield b  # type: ignore[misc]
    b.close()


def test_users_are_unknown_until_published(board: Board) -> None:
    assert board.users() is None
    board.publish_users(["b", "a"])
    assert board.users() == frozenset({"a", "b"})
    board.publish_users([])
    assert board.users() == frozenset()


def test_a_second_mapping_sees_what_the_writer_publishes(board: Board) -> None:
    reader = Board(board.fd, 2)  # what a receiver process maps
    board.publish_users(["notification_peer"])
    assert reader.users() == frozenset({"notification_peer"})
    board.publish_users(["notification_peer", "htable"])
    assert reader.users() == frozenset({"notification_peer", "htable"})
    reader.mm.close()


def test_too_many_users_means_unknown(board: Board) -> None:
    board.publish_users([f"channel-{i:06d}" for i in range(10_000)])  # > 64 KB
    assert board.users() is None


def test_a_half_written_list_is_never_read(board: Board) -> None:
    board.publish_users(["a"])
    seq = int.from_bytes(board.mm[0:8], "little")
    board.mm[0:8] = (seq + 1).to_bytes(8, "little")  # the writer's lock, held forever
    fresh = Board(board.fd, 2)
    assert fresh.users() is None  # gave up waiting: forward everything to the main process
    fresh.mm.close()


def test_counters_add_up_per_receiver(board: Board) -> None:
    board.write_counters(0, [1] * len(COUNTERS))
    board.write_counters(1, list(range(len(COUNTERS))))
    totals = board.totals()
    assert list(totals) == list(COUNTERS)
    assert totals["received"] == 1 and totals["send_errors"] == len(COUNTERS)


def test_rules_survive_the_trip_to_the_process() -> None:
    rules = StatelessRules(forward_all=True, allowed_sources=("10.0.0.0/8",), to_tag="abc")
    assert StatelessRules.from_json(rules.to_json()) == rules


def _front(**rules: object) -> StatelessFront:
    return StatelessFront(StatelessRules(**rules), lambda: frozenset({"known"}))  # type: ignore[arg-type]


def _request(method: str, user: str = "") -> bytes:
    at = f"{user}@" if user else ""
    return build_request(method, f"sip:{at}127.0.0.1:5060", local=("127.0.0.1", 40000))


def test_what_is_answered_forwarded_and_dropped() -> None:
    front = _front()
    assert front.handle(_request("KDMQ", "known"), SOURCE) == FORWARD
    assert front.handle(_request("ACK", "known"), SOURCE) == DROP
    assert front.handle(b"junk\r\n\r\n", SOURCE) == DROP
    reply = front.handle(_request("KDMQ", "other"), SOURCE)
    assert isinstance(reply, tuple)
    data, dest, counter = reply
    assert data.startswith(b"SIP/2.0 404 User Not Found\r\n") and counter == "unknown_user"
    assert dest == SOURCE  # rport: back to where it came from
    response = b"SIP/2.0 200 OK\r\n" + _request("KDMQ", "known").split(b"\r\n", 1)[1]
    assert front.handle(response, SOURCE) == FORWARD


def test_unknown_users_go_to_the_main_process_until_published() -> None:
    front = StatelessFront(StatelessRules(), lambda: None)
    assert front.handle(_request("KDMQ", "other"), SOURCE) == FORWARD


def test_a_script_sees_every_parsed_request() -> None:
    front = _front(forward_all=True)
    for method, user in (("OPTIONS", ""), ("KDMQ", "other"), ("MESSAGE", "x")):
        assert front.handle(_request(method, user), SOURCE) == FORWARD
    assert front.handle(b"junk\r\n\r\n", SOURCE) == DROP


def test_sources_outside_allowed_sources_get_403() -> None:
    front = _front(allowed_sources=("10.0.0.0/8",))
    reply = front.handle(_request("OPTIONS"), SOURCE)
    assert isinstance(reply, tuple) and reply[0].startswith(b"SIP/2.0 403 Forbidden\r\n")
    inside = Address("udp", "10.1.2.3", 5060)
    assert front.handle(_request("KDMQ", "known"), inside) == FORWARD
    mapped = Address("udp", "::ffff:10.1.2.3", 5060)  # a dual-stack socket's view of IPv4
    assert front.handle(_request("KDMQ", "known"), mapped) == FORWARD


def test_everyone_allowed_means_no_check() -> None:
    front = _front(allowed_sources=("0.0.0.0/0", "::/0"))
    reply = front.handle(_request("OPTIONS"), SOURCE)
    assert isinstance(reply, tuple) and reply[0].startswith(b"SIP/2.0 200 OK\r\n")


def test_replies_carry_the_nodes_server_header_and_to_tag() -> None:
    front = _front(user_agent="pydmq-test", to_tag="t0")
    reply = front.handle(_request("OPTIONS"), SOURCE)
    assert isinstance(reply, tuple)
    msg = parse_message(reply[0])
    assert msg.get("Server") == "pydmq-test"
    assert msg.to.params.get("tag") == "t0"
