"""Fake-clock tests for the sans-I/O non-INVITE transaction layer."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pydmq.sip.transaction import (
    Action,
    ClientFinal,
    ClientState,
    SendBytes,
    ServerState,
    ServerVerdict,
    Terminated,
    TimerConfig,
    TransactionLayer,
    VerdictKind,
    server_key,
    server_key_from_parts,
)
from tests.support.spec import wire_dir

NEW, ABSORB, OVERLOADED = ServerVerdict.NEW, ServerVerdict.ABSORB, ServerVerdict.OVERLOADED

KAMAILIO_SCHEDULE = [0.0, 0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5]
RETRANSMISSIONS_TXT = wire_dir() / "retransmissions.txt"
REQ = b"KDMQ sip:notification_peer@10.0.0.2:5060 SIP/2.0\r\n\r\n"


def drive(layer: TransactionLayer, until: float) -> list[tuple[float, Action]]:
    """Advance a fake clock from deadline to deadline up to ``until``; return timed actions."""
    out: list[tuple[float, Action]] = []
    while (d := layer.next_deadline()) is not None and d <= until:
        out.extend((d, a) for a in layer.on_timer(d))
    return out


def send_times(start: list[Action], timed: list[tuple[float, Action]], t0: float = 0.0) -> list:
    times = [t0 for a in start if isinstance(a, SendBytes)]
    return times + [t for t, a in timed if isinstance(a, SendBytes)]


def finals(timed: list[tuple[float, Action]]) -> list[tuple[float, ClientFinal]]:
    return [(t, a) for t, a in timed if isinstance(a, ClientFinal)]


# ------------------------------------------------------------------------------------ TimerConfig


def test_timer_config_defaults_are_kamailio_tm() -> None:
    assert TimerConfig() == TimerConfig(t1=0.5, t2=4.0, t4=5.0, fr_timer=30.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"t1": 0},
        {"t1": -0.5},
        {"t2": 0.0},
        {"t4": -1},
        {"fr_timer": 0},
        {"t1": math.nan},
        {"fr_timer": math.inf},
        {"t1": 5.0, "t2": 4.0},
    ],
)
def test_timer_config_rejects_bad_values(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        TimerConfig(**kwargs)


def test_timer_config_rejects_non_numbers() -> None:
    with pytest.raises(TypeError):
        TimerConfig(t1=True)
    with pytest.raises(TypeError):
        TimerConfig(t2="4")  # type: ignore[arg-type]


def test_timer_config_t1_equal_t2_is_fine() -> None:
    layer = TransactionLayer(TimerConfig(t1=1.0, t2=1.0, fr_timer=3.5))
    start = layer.start_client("z9hG4bKa", "KDMQ", REQ, False, 0.0)
    assert send_times(start, drive(layer, 100)) == [0.0, 1.0, 2.0, 3.0]


# ------------------------------------------------------------------------------- client, UDP


def test_udp_schedule_matches_kamailio_and_408_at_fr_timer() -> None:
    layer = TransactionLayer()
    start = layer.start_client("z9hG4bKx1", "KDMQ", REQ, False, 100.0, dest=("udp", "h", 5060))
    timed = drive(layer, 1000.0)
    rel = [t - 100.0 for t in send_times(start, timed, 100.0)]
    assert rel == pytest.approx(KAMAILIO_SCHEDULE, abs=1e-9)
    assert all(a.data == REQ and a.key == "z9hG4bKx1" for _, a in timed if isinstance(a, SendBytes))
    assert all(a.dest == ("udp", "h", 5060) for _, a in timed if isinstance(a, SendBytes))
    ((t408, final),) = finals(timed)
    assert t408 == pytest.approx(130.0)
    assert final == ClientFinal("z9hG4bKx1", 408, None)
    assert timed[-1] == (t408, Terminated("z9hG4bKx1"))
    assert layer.retransmissions == 9 and layer.timeouts == 1
    assert layer.live_clients == 0 and layer.next_deadline() is None
    assert layer.stats()["heap_size"] == 0


def test_udp_schedule_matches_captured_kamailio_retransmissions() -> None:
    layer = TransactionLayer()
    start = layer.start_client("z9hG4bKcap", "KDMQ", REQ, False, 0.0)
    ours = send_times(start, drive(layer, 100.0))
    rows = [ln for ln in RETRANSMISSIONS_TXT.read_text().splitlines() if "sends=" in ln]
    assert rows
    for row in rows:
        sends = int(re.search(r"sends=(\d+)", row).group(1))  # type: ignore[union-attr]
        offsets = [float(x) for x in re.findall(r"[+ ](\d+\.\d+)", row.split(" at ", 1)[1])]
        assert sends == len(offsets) == len(ours)
        assert offsets == pytest.approx(ours, abs=0.006)  # capture jitter is a few ms


def test_custom_timers() -> None:
    layer = TransactionLayer(TimerConfig(t1=0.1, t2=0.4, t4=1.0, fr_timer=2.0))
    start = layer.start_client("z9hG4bKc", "KDMQ", REQ, False, 0.0)
    timed = drive(layer, 10.0)
    assert send_times(start, timed) == pytest.approx([0.0, 0.1, 0.3, 0.7, 1.1, 1.5, 1.9])
    assert [t for t, _ in finals(timed)] == pytest.approx([2.0])


def test_timer_f_wins_a_tie_with_timer_e() -> None:
    # The 11th send would be at 31.5; with fr_timer = 31.5 the 408 comes instead of that send.
    layer = TransactionLayer(TimerConfig(fr_timer=31.5))
    start = layer.start_client("z9hG4bKtie", "KDMQ", REQ, False, 0.0)
    timed = drive(layer, 100.0)
    assert send_times(start, timed) == KAMAILIO_SCHEDULE
    assert [t for t, _ in finals(timed)] == [31.5]


def test_proceeding_retransmits_at_t2() -> None:
    layer = TransactionLayer()
    start = layer.start_client("z9hG4bKp", "KDMQ", REQ, False, 0.0)
    timed = drive(layer, 0.7)  # sends at 0.5; the next is scheduled at 1.5 (interval 1 s)
    assert layer.on_response("z9hG4bKp", "KDMQ", 100, object(), 0.7) == []
    assert layer.client_state("z9hG4bKp") is ClientState.PROCEEDING
    timed += drive(layer, 100.0)
    # The pending Timer E still fires at 1.5, then every T2 = 4 s; Timer F stays at fr_timer.
    assert send_times(start, timed) == [0.0, 0.5, 1.5, 5.5, 9.5, 13.5, 17.5, 21.5, 25.5, 29.5]
    assert [(t, f.status) for t, f in finals(timed)] == [(30.0, 408)]


def test_final_response_stops_retransmissions_and_reports_once() -> None:
    layer = TransactionLayer()
    start = layer.start_client("z9hG4bKf", "KDMQ", REQ, False, 0.0)
    timed = drive(layer, 1.6)
    response = object()
    assert layer.on_response("z9hG4bKf", "KDMQ", 200, response, 1.6) == [
        ClientFinal("z9hG4bKf", 200, response)
    ]
    assert layer.client_state("z9hG4bKf") is ClientState.COMPLETED
    # Retransmitted / late responses in Completed are absorbed.
    assert layer.on_response("z9hG4bKf", "KDMQ", 200, object(), 2.0) == []
    assert layer.on_response("z9hG4bKf", "KDMQ", 404, object(), 2.1) == []
    assert layer.on_response("z9hG4bKf", "KDMQ", 180, object(), 2.2) == []
    assert layer.absorbed_responses == 3
    later = drive(layer, 100.0)
    assert send_times(start, timed + later) == [0.0, 0.5, 1.5]
    assert later == [(pytest.approx(6.6), Terminated("z9hG4bKf"))]  # Timer K = T4
    assert layer.timeouts == 0 and layer.live_clients == 0
    assert layer.next_deadline() is None and layer.stats()["heap_size"] == 0
    # After Terminated the branch is unknown.
    assert layer.on_response("z9hG4bKf", "KDMQ", 200, object(), 7.0) == []
    assert layer.unmatched_responses == 1


@pytest.mark.parametrize("status", [200, 202, 301, 404, 408, 500, 503, 603])
def test_any_final_class_completes(status: int) -> None:
    layer = TransactionLayer()
    layer.start_client("b", "KDMQ", REQ, False, 0.0)
    (final,) = layer.on_response("b", "KDMQ", status, "r", 0.1)
    assert isinstance(final, ClientFinal) and final.status == status and final.response == "r"
    assert finals(drive(layer, 100.0)) == []


def test_final_at_the_instant_of_timer_f_gives_one_final() -> None:
    layer = TransactionLayer()
    layer.start_client("b", "KDMQ", REQ, False, 0.0)
    drive(layer, 29.9)
    assert layer.on_response("b", "KDMQ", 200, None, 30.0) == [ClientFinal("b", 200, None)]
    assert finals(drive(layer, 100.0)) == []
    assert layer.timeouts == 0


def test_final_shortly_before_timer_f_cancels_it() -> None:
    # Timer K (T4) outlives the original Timer F deadline: the cancelled F must not fire.
    layer = TransactionLayer()
    layer.start_client("b", "KDMQ", REQ, False, 0.0)
    drive(layer, 28.0)
    assert layer.on_response("b", "KDMQ", 200, None, 28.0) == [ClientFinal("b", 200, None)]
    assert drive(layer, 100.0) == [(33.0, Terminated("b"))]


def test_timeout_is_reported_exactly_once() -> None:
    layer = TransactionLayer()
    layer.start_client("b", "KDMQ", REQ, False, 0.0)
    actions = layer.on_timer(1000.0) + layer.on_timer(1000.0) + layer.on_timer(2000.0)
    assert [a for a in actions if isinstance(a, ClientFinal)] == [ClientFinal("b", 408, None)]
    assert layer.on_response("b", "KDMQ", 200, None, 1000.0) == []  # too late: unmatched


def test_late_wakeup_does_not_burst() -> None:
    layer = TransactionLayer()
    layer.start_client("b", "KDMQ", REQ, False, 0.0)
    actions = layer.on_timer(10.0)  # the event loop stalled for 10 s
    assert sum(isinstance(a, SendBytes) for a in actions) == 1
    nd = layer.next_deadline()
    assert nd is not None and nd > 10.0


def test_wrong_method_or_branch_is_not_matched() -> None:
    layer = TransactionLayer()
    layer.start_client("z9hG4bKm", "KDMQ", REQ, False, 0.0)
    assert layer.on_response("z9hG4bKm", "OPTIONS", 200, None, 0.1) == []
    assert layer.on_response("z9hG4bKm", "kdmq", 200, None, 0.1) == []  # methods are case-sensitive
    assert layer.on_response("z9hG4bKother", "KDMQ", 200, None, 0.1) == []
    assert layer.on_response("z9hG4bKm", "KDMQ", 99, None, 0.1) == []
    assert layer.on_response("z9hG4bKm", "KDMQ", 700, None, 0.1) == []
    assert layer.unmatched_responses == 5
    assert layer.client_state("z9hG4bKm") is ClientState.TRYING
    assert layer.match_client("z9hG4bKm", "KDMQ") and not layer.match_client("z9hG4bKm", "OPTIONS")
    # The transaction is untouched: retransmissions and the 408 still happen.
    assert [t for t, _ in finals(drive(layer, 100.0))] == [30.0]


def test_duplicate_live_branch_is_rejected() -> None:
    layer = TransactionLayer()
    layer.start_client("b", "KDMQ", REQ, False, 0.0)
    with pytest.raises(ValueError):
        layer.start_client("b", "KDMQ", REQ, False, 0.1)


# --------------------------------------------------------------------------- client, reliable


def test_reliable_no_retransmission_and_408_at_fr_timer() -> None:
    layer = TransactionLayer()
    start = layer.start_client("z9hG4bKt", "KDMQ", REQ, True, 5.0, dest="conn")
    assert start == [SendBytes(REQ, "z9hG4bKt", "conn")]
    assert layer.next_deadline() == 35.0
    timed = drive(layer, 100.0)
    assert timed == [(35.0, ClientFinal("z9hG4bKt", 408, None)), (35.0, Terminated("z9hG4bKt"))]
    assert layer.retransmissions == 0


def test_reliable_final_terminates_at_once() -> None:
    layer = TransactionLayer()
    layer.start_client("b", "KDMQ", REQ, True, 0.0)
    layer.on_response("b", "KDMQ", 100, None, 0.1)
    assert layer.on_response("b", "KDMQ", 200, "ok", 0.2) == [
        ClientFinal("b", 200, "ok"),
        Terminated("b"),
    ]
    assert layer.live_clients == 0 and layer.next_deadline() is None


# ---------------------------------------------------------------------------- transport errors


def test_transport_error_keeps_timers_by_default() -> None:
    layer = TransactionLayer()
    start = layer.start_client("b", "KDMQ", REQ, False, 0.0)
    assert layer.on_transport_error("b", 0.0) == []
    timed = drive(layer, 100.0)
    assert send_times(start, timed) == KAMAILIO_SCHEDULE
    assert [(t, f.status, f.response) for t, f in finals(timed)] == [(30.0, 408, None)]
    assert layer.transport_errors == 1


def test_transport_error_immediate_option() -> None:
    layer = TransactionLayer()
    layer.start_client("b", "KDMQ", REQ, False, 0.0)
    assert layer.on_transport_error("b", 0.2, immediate=True) == [
        ClientFinal("b", 408, None),
        Terminated("b"),
    ]
    assert layer.next_deadline() is None and layer.timeouts == 1
    assert layer.on_transport_error("b", 0.3, immediate=True) == []  # already gone

    fast = TransactionLayer(immediate_408_on_transport_error=True)
    fast.start_client("c", "KDMQ", REQ, True, 0.0)
    assert fast.on_transport_error("c", 0.0)[0] == ClientFinal("c", 408, None)
    fast.start_client("d", "KDMQ", REQ, True, 0.0)
    assert fast.on_transport_error("d", 0.0, immediate=False) == []  # per-call override


def test_transport_error_after_final_is_ignored() -> None:
    layer = TransactionLayer()
    layer.start_client("b", "KDMQ", REQ, False, 0.0)
    layer.on_response("b", "KDMQ", 200, None, 0.1)
    assert layer.on_transport_error("b", 0.2, immediate=True) == []
    assert layer.transport_errors == 0


# -------------------------------------------------------------------------------------- server

K1 = server_key_from_parts("KDMQ", "z9hG4bKs1", "10.0.0.1", 5060)


def kind(layer: TransactionLayer, key: str, t: float, *, reliable: bool = False) -> VerdictKind:
    return layer.on_request(key, "KDMQ", reliable, t).kind


def test_server_retransmission_before_answer_is_absorbed() -> None:
    layer = TransactionLayer()
    app_calls = 0
    for t in (0.0, 0.5, 1.5):  # original + two UDP retransmissions, the app is still working
        verdict = layer.on_request(K1, "KDMQ", False, t)
        if verdict.kind is ServerVerdict.NEW:
            app_calls += 1
        else:
            assert verdict.kind is ServerVerdict.ABSORB and verdict.data is None
    assert app_calls == 1 and layer.absorbed_requests == 2
    assert layer.server_state(K1) is ServerState.TRYING


def test_server_resends_last_response_after_answer_and_forgets_after_timer_j() -> None:
    layer = TransactionLayer()
    assert kind(layer, K1, 0.0) is NEW
    resp = b"SIP/2.0 200 OK\r\n\r\n"
    assert layer.on_server_response(K1, 200, resp, 0.1) == []  # the caller sends it itself
    assert layer.server_state(K1) is ServerState.COMPLETED
    verdict = layer.on_request(K1, "KDMQ", False, 0.5)
    assert verdict.kind is ServerVerdict.RETRANSMIT is VerdictKind.RETRANSMISSION
    assert verdict.data == resp
    assert layer.response_retransmissions == 1
    # A second final from the application is discarded (RFC 3261 §17.2.2).
    assert layer.on_server_response(K1, 500, b"x", 1.0) == []
    assert layer.on_request(K1, "KDMQ", False, 1.5).data == resp
    assert layer.discarded_responses == 1
    assert drive(layer, 32.0) == []
    assert drive(layer, 32.1) == [(pytest.approx(32.1), Terminated(K1, server=True))]
    assert layer.server_state(K1) is None and layer.live_servers == 0
    assert layer.next_deadline() is None and layer.stats()["heap_size"] == 0


def test_server_provisional_then_final() -> None:
    layer = TransactionLayer()
    layer.on_request(K1, "KDMQ", False, 0.0)
    assert layer.on_server_response(K1, 100, b"100", 0.1) == []
    assert layer.server_state(K1) is ServerState.PROCEEDING
    assert layer.on_request(K1, "KDMQ", False, 0.5).data == b"100"
    layer.on_server_response(K1, 200, b"200", 0.6)
    assert layer.on_request(K1, "KDMQ", False, 1.5).data == b"200"


def test_server_reliable_terminates_at_once() -> None:
    layer = TransactionLayer()
    assert kind(layer, K1, 0.0, reliable=True) is NEW
    assert kind(layer, K1, 0.1, reliable=True) is ABSORB
    assert layer.on_server_response(K1, 200, b"ok", 0.1) == [Terminated(K1, server=True)]
    assert layer.live_servers == 0 and layer.next_deadline() is None


def test_server_unanswered_is_dropped_and_late_answer_is_ignored() -> None:
    layer = TransactionLayer()
    layer.on_request(K1, "KDMQ", False, 0.0)
    assert drive(layer, 100.0) == [(32.0, Terminated(K1, server=True))]
    assert layer.server_unanswered == 1 and layer.live_servers == 0
    assert layer.on_server_response(K1, 200, b"late", 40.0) == []
    assert layer.live_servers == 0 and layer.next_deadline() is None


def test_server_ack_creates_no_state() -> None:
    layer = TransactionLayer()
    key = server_key_from_parts("ACK", "z9hG4bKack", "10.0.0.1", 5060)
    assert layer.on_request(key, "ACK", False, 0.0).kind is NEW
    assert layer.live_servers == 0


def test_server_invalid_status_is_a_programming_error() -> None:
    layer = TransactionLayer()
    layer.on_request(K1, "KDMQ", False, 0.0)
    with pytest.raises(ValueError):
        layer.on_server_response(K1, 42, b"", 0.1)


def test_overload_cap() -> None:
    layer = TransactionLayer(max_transactions=3)
    keys = [server_key_from_parts("KDMQ", f"z9hG4bK{i}", "10.0.0.1", 5060) for i in range(5)]
    assert [kind(layer, k, 0.0) for k in keys[:3]] == [NEW] * 3
    assert kind(layer, keys[3], 0.1) is OVERLOADED
    assert kind(layer, keys[0], 0.1) is ABSORB  # existing ones still work at the cap
    assert layer.overloaded == 1 and layer.live_servers == 3
    layer.on_server_response(keys[0], 200, b"ok", 0.2)
    assert kind(layer, keys[0], 0.3) is VerdictKind.RETRANSMISSION
    drive(layer, 0.2 + 32.0)  # Timer J and the unanswered guard free every slot
    assert layer.live_servers == 0
    assert kind(layer, keys[4], 40.0) is NEW
    assert layer.evicted == 0


def test_answered_transactions_make_room_at_the_cap() -> None:
    """At the cap, the oldest answered transaction is forgotten instead of answering 503."""
    layer = TransactionLayer(max_transactions=2)
    keys = [server_key_from_parts("KDMQ", f"z9hG4bKe{i}", "10.0.0.1", 5060) for i in range(4)]
    for i, k in enumerate(keys[:2]):
        assert kind(layer, k, 0.1 * i) is NEW
        layer.on_server_response(k, 200, f"ok{i}".encode(), 0.1 * i)
    assert kind(layer, keys[2], 0.3) is NEW  # keys[0] (answered first) is forgotten
    assert layer.evicted == 1 and layer.live_servers == 2 and layer.overloaded == 0
    assert layer.server_state(keys[0]) is None
    assert layer.on_request(keys[1], "KDMQ", False, 0.4).data == b"ok1"  # still remembered
    assert kind(layer, keys[0], 0.5) is NEW  # a late retransmission counts as new now
    assert layer.evicted == 2 and layer.server_state(keys[1]) is None
    # Two unanswered: nothing answered left to forget, so the next one is overloaded.
    assert kind(layer, keys[3], 0.6) is OVERLOADED
    drive(layer, 100.0)
    assert layer.live_servers == 0 and layer.next_deadline() is None
    with pytest.raises(ValueError):
        TransactionLayer(max_transactions=0)


# ----------------------------------------------------------------------------------- server keys


@dataclass
class FakeVia:
    host: str
    port: int | None
    branch: str | None
    text: str

    def __str__(self) -> str:
        return self.text


@dataclass
class FakeCSeq:
    seq: int
    method: str


@dataclass
class FakeNameAddr:
    tag: str | None


@dataclass
class FakeRequest:
    method: str
    via: FakeVia
    call_id: str
    cseq: FakeCSeq
    from_: FakeNameAddr


def test_server_key_rfc3261() -> None:
    base = server_key_from_parts("KDMQ", "z9hG4bKabc", "Node1.example", 5060)
    assert base == server_key_from_parts(
        "KDMQ", "z9hG4bKabc", "node1.example", 5060, call_id="ignored"
    )
    assert base != server_key_from_parts("OPTIONS", "z9hG4bKabc", "node1.example", 5060)
    assert base != server_key_from_parts("KDMQ", "z9hG4bKabc", "node1.example", 5061)
    assert base != server_key_from_parts("KDMQ", "z9hG4bKabc", "node1.example", None)
    assert base != server_key_from_parts("KDMQ", "z9hG4bKabd", "node1.example", 5060)


def test_server_key_rfc2543_fallback() -> None:
    via = "SIP/2.0/UDP 10.0.0.1:5060;branch=1234"
    base = server_key_from_parts(
        "KDMQ", "1234", "10.0.0.1", 5060, call_id="c1", cseq=10, from_tag="ft", top_via=via
    )
    assert base.startswith("2543|")
    same = dict(call_id="c1", cseq=10, from_tag="ft", top_via=via)
    assert base == server_key_from_parts("KDMQ", "1234", "10.0.0.1", 5060, **same)
    for change in (
        {"call_id": "c2"},
        {"cseq": 11},
        {"from_tag": "other"},
        {"top_via": via + ";rport"},
    ):
        assert base != server_key_from_parts("KDMQ", "1234", "10.0.0.1", 5060, **{**same, **change})
    assert base != server_key_from_parts("OPTIONS", "1234", "10.0.0.1", 5060, **same)
    # No branch at all is RFC 2543 too.
    assert server_key_from_parts("KDMQ", None, "h", None, call_id="c1").startswith("2543|")


def test_server_key_for_request() -> None:
    via = FakeVia("10.0.0.1", 5060, "z9hG4bKq", "SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKq")
    req = FakeRequest("KDMQ", via, "cid", FakeCSeq(7, "KDMQ"), FakeNameAddr("ft"))
    assert server_key(req) == server_key_from_parts("KDMQ", "z9hG4bKq", "10.0.0.1", 5060)
    old = FakeVia("10.0.0.1", None, "abc", "SIP/2.0/UDP 10.0.0.1;branch=abc")
    req2 = FakeRequest("KDMQ", old, "cid", FakeCSeq(7, "KDMQ"), FakeNameAddr(None))
    assert server_key(req2) == server_key_from_parts(
        "KDMQ", "abc", "10.0.0.1", None, call_id="cid", cseq=7, from_tag=None, top_via=str(old)
    )


KAMAILIO_KDMQ = (
    b"KDMQ sip:htable@127.0.0.1:5162 SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 127.0.0.1:5160;branch=z9hG4bKed87.7a7a5545000000000000000000000000.0\r\n"
    b"To: <sip:htable@127.0.0.1:5162>\r\n"
    b"From: <sip:htable@127.0.0.1:5160>;tag=65245ff20f3c7e6337f3fba7d7f916cd-a6e933ac\r\n"
    b"CSeq: 10 KDMQ\r\n"
    b"Call-ID: 14972ed068dc9e96-16834@127.0.0.1\r\n"
    b"Content-Length: 0\r\n\r\n"
)


def test_server_key_of_a_parsed_kamailio_request() -> None:
    message = pytest.importorskip("pydmq.sip.message")
    req = message.parse_message(KAMAILIO_KDMQ)
    branch = "z9hG4bKed87.7a7a5545000000000000000000000000.0"
    assert server_key(req) == server_key_from_parts("KDMQ", branch, "127.0.0.1", 5160)
    # A retransmission (same bytes) maps to the same transaction; an RFC 2543 branch falls back.
    assert server_key(message.parse_message(KAMAILIO_KDMQ)) == server_key(req)
    old = message.parse_message(KAMAILIO_KDMQ.replace(b"branch=z9hG4bK", b"branch=x"))
    assert server_key(old).startswith("2543|14972ed068dc9e96-16834@127.0.0.1|10|65245ff")


# ------------------------------------------------------------------------- heap and efficiency


def test_heap_is_compacted_under_churn() -> None:
    layer = TransactionLayer()
    for i in range(30_000):
        b = f"z9hG4bK{i}"
        layer.start_client(b, "KDMQ", REQ, False, i * 1e-4)
        layer.on_response(b, "KDMQ", 200, None, i * 1e-4)
    st_ = layer.stats()
    # Each answered transaction left a cancelled Timer E and F behind; compaction bounds them.
    assert st_["heap_size"] <= 2 * st_["timers_pending"] + 4096 + 1
    drive(layer, 1000.0)
    assert layer.stats()["heap_size"] == 0 and layer.live_clients == 0


def test_many_transactions_leave_no_state() -> None:
    """20,000 client+server pairs run to completion and every timer and state is dropped
    (speed is measured by bench/, never asserted here)."""
    layer = TransactionLayer()
    n = 20_000
    for i in range(n):
        now = i * 1e-4
        b = f"z9hG4bK{i}"
        layer.start_client(b, "KDMQ", REQ, False, now, dest=i)
        layer.on_timer(now)
        k = f"{b}|10.0.0.1:5060|KDMQ"
        layer.on_request(k, "KDMQ", False, now)
        layer.on_server_response(k, 200, b"ok", now)
        layer.on_response(b, "KDMQ", 200, None, now)
    drive(layer, 1000.0)
    assert layer.live_clients == layer.live_servers == 0
    assert layer.next_deadline() is None


# ------------------------------------------------------------------------------------ hypothesis

N_CLIENTS = 3
_resp = st.tuples(
    st.just("resp"),
    st.integers(0, N_CLIENTS - 1),
    st.sampled_from([100, 180, 200, 404, 503]),
    st.booleans(),
)
client_op = st.one_of(
    _resp,
    _resp,  # responses twice as likely as the other events
    st.tuples(st.just("err"), st.integers(0, N_CLIENTS - 1), st.booleans(), st.booleans()),
    st.tuples(
        st.just("tick"),
        # Big jumps land next to Timer F (30 s), where a final races the timeout.
        st.one_of(st.floats(0.0, 8.0), st.sampled_from([0.5, 4.0, 10.0, 26.0, 27.5, 29.0])),
        st.booleans(),
        st.booleans(),
    ),
)


@settings(max_examples=400, deadline=None)
@given(
    reliable=st.lists(st.booleans(), min_size=N_CLIENTS, max_size=N_CLIENTS),
    starts=st.lists(st.floats(0.0, 20.0), min_size=N_CLIENTS, max_size=N_CLIENTS),
    ops=st.lists(client_op, min_size=5, max_size=80),
)
def test_random_interleavings_one_final_and_no_leak(reliable, starts, ops) -> None:
    layer = TransactionLayer()
    branches = [f"z9hG4bKh{i}" for i in range(N_CLIENTS)]
    finals_seen: dict[str, int] = dict.fromkeys(branches, 0)
    done_at: dict[str, float] = {}
    pending = sorted(zip(starts, range(N_CLIENTS), strict=True))
    now = 0.0

    def record(actions: list[Action], t: float) -> None:
        for a in actions:
            if isinstance(a, ClientFinal):
                finals_seen[a.branch] += 1
                done_at.setdefault(a.branch, t)
                if a.status == 408:
                    assert a.response is None
            elif isinstance(a, SendBytes):
                assert a.key not in done_at, "retransmission after the final"
                assert a.dest == a.key

    def advance(to: float) -> None:
        nonlocal now
        while pending and pending[0][0] <= to:
            t, i = pending.pop(0)
            while (d := layer.next_deadline()) is not None and d <= t:
                record(layer.on_timer(d), d)
            now = max(now, t)
            b = branches[i]
            record(layer.start_client(b, "KDMQ", REQ, reliable[i], now, dest=b), now)
        while (d := layer.next_deadline()) is not None and d <= to:
            record(layer.on_timer(d), d)
        now = max(now, to)

    for op in ops:
        if op[0] == "tick":
            advance(now + op[1])
            continue
        b = branches[op[1]]
        started = not any(i == op[1] for _, i in pending)
        if op[0] == "resp":
            _, _, status, right_method = op
            out = layer.on_response(b, "KDMQ" if right_method else "OPTIONS", status, None, now)
            if not started or not right_method:
                assert out == []
        else:
            _, _, immediate, _ = op
            out = layer.on_transport_error(b, now, immediate=immediate)
        record(out, now)

    advance(math.inf)
    assert finals_seen == dict.fromkeys(branches, 1)
    assert layer.live_clients == 0
    assert layer.next_deadline() is None
    assert layer.stats()["heap_size"] == 0 and layer.stats()["timers_pending"] == 0
    # Every 408 that Timer F produced came at exactly start + fr_timer.
    assert all(done_at[b] <= s + 30.0 + 1e-9 for s, b in zip(starts, branches, strict=True))


server_op = st.one_of(
    st.tuples(st.just("req"), st.integers(0, 3), st.booleans()),
    st.tuples(st.just("answer"), st.integers(0, 3), st.sampled_from([100, 200, 486])),
    st.tuples(st.just("tick"), st.floats(0.0, 20.0), st.just(False)),
)


@settings(max_examples=300, deadline=None)
@given(ops=st.lists(server_op, max_size=60), cap=st.integers(1, 4))
def test_server_random_interleavings(ops, cap) -> None:
    layer = TransactionLayer(max_transactions=cap)
    keys = [server_key_from_parts("KDMQ", f"z9hG4bKs{i}", "10.0.0.9", None) for i in range(4)]
    # Model: live key -> (last response or None, final sent?); answered keys, oldest first.
    live: dict[str, tuple[bytes | None, bool]] = {}
    answered: list[str] = []
    now = 0.0
    for n, op in enumerate(ops):
        if op[0] == "tick":
            now += op[1]
            for a in layer.on_timer(now):
                assert isinstance(a, Terminated) and a.server
                del live[a.key]
                if a.key in answered:
                    answered.remove(a.key)
        elif op[0] == "req":
            k = keys[op[1]]
            v = layer.on_request(k, "KDMQ", op[2], now)
            if k in live:
                last, _ = live[k]
                if last is None:
                    assert v.kind is ABSORB  # never handed to the application twice
                else:
                    assert v.kind is VerdictKind.RETRANSMISSION and v.data == last
            elif len(live) - len(answered) >= cap:
                assert v.kind is OVERLOADED  # that many are waiting for their answer
            else:
                assert v.kind is NEW
                if len(live) >= cap:  # the oldest answered one makes room
                    del live[answered.pop(0)]
                live[k] = (None, False)
        else:
            k, status = keys[op[1]], op[2]
            data = f"{status} #{n}".encode()
            out = layer.on_server_response(k, status, data, now)
            if k in live and not live[k][1]:
                live[k] = (data, status >= 200)
                if status >= 200:
                    answered.append(k)
            for a in out:
                assert isinstance(a, Terminated) and a.server
                del live[a.key]
                answered.remove(a.key)
        assert layer.live_servers == len(live) <= cap
    now += 64 * 0.5
    assert all(isinstance(a, Terminated) for a in layer.on_timer(now))
    assert layer.live_servers == 0 and layer.next_deadline() is None
    assert layer.stats()["heap_size"] == 0
