"""htable, without a network: the wire codec against Kamailio 5.6.3's bytes, the store's semantics
(fake clock), the peer callback's 200/400/500 answers (nothing half-applied), replication of every
local mutation (and of nothing received), the windowed sync sender, and the RPC answers."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from pydmq.config import HtableSettings, parse_htable_spec
from pydmq.consumers.htable import HtableService
from pydmq.consumers.htable_dmq import (
    CONTENT_TYPE,
    EMPTY_GROUP,
    Action,
    BadRequest,
    Bulk,
    SyncCell,
    decode,
    decode_set_cell,
    encode_del_cell,
    encode_remove,
    encode_set_cell,
    encode_set_expire,
    encode_sync_cell,
    encode_sync_request,
    group_body,
    iter_groups,
)
from pydmq.consumers.htable_rpc import dump_table, rpc_methods
from pydmq.consumers.htable_store import (
    HtablePatternError,
    HtableStore,
    UnknownTableError,
    core_case_hash,
    wrap_int,
)
from pydmq.dmq.api import Delivery
from pydmq.dmq.node import NodeStatus, build_node
from pydmq.dmq.nodelist import RpcFault
from pydmq.dmq.peer import Peer, PeerResponse
from pydmq.sip.message import Limits, Request, parse_message
from tests.support.spec import wire_dir

GOLDEN = wire_dir()

T = "t=>size=8;autoexpire=0;dmqreplicate=1"
E = "e=>size=4;autoexpire=100;dmqreplicate=1"
NOREP = "local=>size=4"
INIT = "c=>size=4;initval=5;dmqreplicate=1"
NOUPD = "n=>size=4;autoexpire=100;updateexpire=0;dmqreplicate=1"


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def golden_request(name: str) -> Request:
    (path,) = (p for p in GOLDEN.glob(f"{name}_*.txt") if "__reply_" not in p.name)
    msg = parse_message(path.read_bytes())
    assert isinstance(msg, Request)
    return msg


def golden_json(name: str) -> Any:
    return json.loads((GOLDEN / name).read_text())


def kdmq(body: bytes | str, *, content_length: bool = True) -> Request:
    """A KDMQ on channel htable as a peer would send it."""
    data = body.encode() if isinstance(body, str) else body
    head = (
        "KDMQ sip:htable@127.0.0.1:5060 SIP/2.0\r\n"
        "Via: SIP/2.0/UDP 127.0.0.1:5061;branch=z9hG4bK1\r\n"
        "To: <sip:htable@127.0.0.1:5060>\r\n"
        "From: <sip:htable@127.0.0.1:5061>;tag=1\r\n"
        "CSeq: 10 KDMQ\r\nCall-ID: c1@127.0.0.1\r\nMax-Forwards: 1\r\n"
        "Content-Type: application/json\r\n"
    )
    if content_length:
        head += f"Content-Length: {len(data)}\r\n"
    msg = parse_message(head.encode() + b"\r\n" + data, Limits(max_size=1 << 22))
    assert isinstance(msg, Request)
    return msg


class Done:
    """An already answered request (no event loop needed)."""

    def __init__(self, node: Any = None, status: int = 200) -> None:
        self._result = [Delivery(node, status, None)] if node is not None else []

    def add_done_callback(self, callback: Any) -> None:
        callback(self)

    def cancelled(self) -> bool:
        return False

    def exception(self) -> None:
        return None

    def result(self) -> list[Delivery]:
        return self._result


class FakeApi:
    """Stands in for DmqApi: records what is sent. Inside an event loop a unicast is answered
    ``delay`` seconds later (status from ``statuses``, default 200); outside, at once."""

    def __init__(self) -> None:
        self.broadcasts: list[bytes] = []
        self.sent: list[bytes] = []
        self.pending: list[bytes] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.statuses: list[int] = []
        self.delay = 0.001

    @property
    def changes(self) -> list[bytes]:
        """Replicated changes (everything unicast except sync groups)."""
        return [b for b in self.sent if not b.startswith(b'{"cells"')]

    def bcast_message(self, peer: Any, body: bytes, **kw: Any) -> Done:
        assert kw["content_type"] == CONTENT_TYPE
        self.broadcasts.append(body)
        return Done()

    def send_message(self, peer: Any, body: bytes, node: Any, **kw: Any) -> Any:
        assert kw["content_type"] == CONTENT_TYPE
        self.sent.append(body)
        status = self.statuses.pop(0) if self.statuses else 200
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return Done(node, status)
        fut: asyncio.Future[list[Delivery]] = loop.create_future()
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self.pending.append(body)

        def answer() -> None:
            self.in_flight -= 1
            self.pending.remove(body)
            fut.set_result([Delivery(node, status, None)])

        loop.call_later(self.delay, answer)
        return fut


PEER = build_node("sip:127.0.0.1:5099", lambda host: host)


class FakeNodes:
    def active_remote(self, except_node: Any = None) -> list[Any]:
        return [PEER]


class FakeNode:
    nodes = FakeNodes()


def service(*tables: str, clock: Clock | None = None, **options: Any) -> HtableService:
    settings = HtableSettings(tables=tables or (T,), **options)
    return HtableService(settings, clock=clock or Clock())


def replicating(
    *tables: str, clock: Clock | None = None, **options: Any
) -> tuple[HtableService, FakeApi]:
    svc = service(*tables, clock=clock, **options)
    api = FakeApi()
    svc.api = api  # type: ignore[assignment]
    svc.peer = Peer("htable", "htable", svc.handle_message)
    svc.node = FakeNode()  # type: ignore[assignment]
    return svc, api


def state(svc: HtableService) -> dict[str, list[tuple[str, Any, int]]]:
    return {
        name: [(c.name, c.value, c.expire) for c in svc.store.ordered(name)]
        for name in svc.tables()
    }


# ---- wire codec against the captures ------------------------------------------------------


@pytest.mark.parametrize(
    ("capture", "body"),
    [
        ("03", encode_sync_request()),
        ("17", encode_sync_request()),
        ("04", EMPTY_GROUP),
        ("18", EMPTY_GROUP),
        ("05", encode_set_cell("t", "k1", "v1")),
        ("19", encode_set_cell("t", "k1", "v1")),
        ("07", encode_del_cell("t", "k3")),
        ("20", encode_del_cell("t", "k3")),
        ("08", encode_set_expire("t", "k2", 3600)),
        (
            "09",
            group_body(
                [
                    encode_sync_cell("t", "n1", 42, 0),
                    encode_sync_cell("t", "k2", "v2", 0),
                    encode_sync_cell("t", "k1", "v1", 0),
                ]
            ),
        ),
    ],
)
def test_encoder_matches_kamailio_bytes(capture: str, body: bytes) -> None:
    request = golden_request(capture)
    assert request.body == body
    assert request.content_type == CONTENT_TYPE
    assert request.max_forwards == 1
    assert request.ruri.user == "htable"


def test_sync_answer_is_kamailios_group_in_kamailios_order() -> None:
    """The cells of capture 09 set in any order come out in Kamailio's slot order."""
    svc, _api = replicating()
    for key, value in (("k1", "v1"), ("k2", "v2"), ("n1", 42)):
        svc.store.set("t", key, value)
    parts = [
        encode_sync_cell("t", c.name, c.value, c.expire)
        for t, n in svc.store.sync_keys()
        if (c := svc.store.sync_cell(t, n)) is not None
    ]
    assert list(iter_groups(parts, 60000)) == [(golden_request("09").body, 3)]


@pytest.mark.parametrize("capture", ["03", "04", "05", "07", "08", "09", "17", "19", "20"])
def test_decoder_reads_every_capture(capture: str) -> None:
    message = decode(golden_request(capture).body)
    if capture == "05":
        assert message == Action(2, "t", "k1", 2, "v1", None, 1)
    elif capture == "08":
        assert message == Action(3, "t", "k2", 0, None, 3600, 0)
    elif capture == "09":
        assert isinstance(message, Bulk)
        assert message.cells == (
            SyncCell("t", "n1", 42, 0),
            SyncCell("t", "k2", "v2", 0),
            SyncCell("t", "k1", "v1", 0),
        )


def test_encoder_other_actions_as_kamailio_sends_them() -> None:
    # captured from a 5.6.3 node: $sht assignments, sht_rm_name_re/value_re, sht_rm_name/value
    assert encode_set_cell("t", "b1", 3) == (
        b'{"action":2,"htname":"t","cname":"b1","type":0,"intval":3,"mode":1}'
    )
    assert encode_set_cell("t", "str", 'x"y\\z\t/é') == (
        b'{"action":2,"htname":"t","cname":"str","type":2,"strval":"x\\"y\\\\z\\t/\xc3\xa9",'
        b'"mode":1}'
    )
    assert encode_remove("t", "^a.*", prefix=False, by_value=False) == (
        b'{"action":5,"htname":"t","type":2,"strval":"^a.*","mode":0}'
    )
    assert encode_remove("t", "^v.*", prefix=False, by_value=True) == (
        b'{"action":5,"htname":"t","type":2,"strval":"^v.*","mode":1}'
    )
    assert encode_remove("t", "b", prefix=True, by_value=False) == (
        b'{"action":6,"htname":"t","type":2,"strval":"b","mode":0}'
    )
    assert encode_remove("t", "w", prefix=True, by_value=True) == (
        b'{"action":6,"htname":"t","type":2,"strval":"w","mode":1}'
    )
    assert encode_sync_request("t") == b'{"action":1,"htname":"t"}'
    # control characters as cJSON escapes them; bytes that are not UTF-8 go back out unchanged
    assert (
        encode_del_cell("t", "a\x01\nb")
        == b'{"action":4,"htname":"t","cname":"a\\u0001\\nb","mode":0}'
    )
    raw = "k\udcff"  # byte 0xff read from a peer
    assert encode_del_cell("t", raw) == b'{"action":4,"htname":"t","cname":"k\xff","mode":0}'
    assert decode(encode_del_cell("t", raw)) == Action(4, "t", raw)


def test_groups_are_bounded_ordered_and_complete() -> None:
    cells = [encode_sync_cell("t", f"key-{i}", "v" * (i % 50), 0) for i in range(500)]
    groups = list(iter_groups(cells, 1000))
    assert all(len(body) <= 1000 for body, _ in groups)
    assert sum(n for _, n in groups) == 500
    rebuilt = [c for body, _ in groups for c in json.loads(body)["cells"]]
    assert rebuilt == [json.loads(c) for c in cells]
    for body, n in groups:
        assert json.loads(body) == {"cells": [json.loads(c) for c in cells[:n]]}
        cells = cells[n:]
    # a cell bigger than the limit travels alone; no cells, no group
    big = encode_sync_cell("t", "big", "x" * 2000, 0)
    assert [n for _, n in iter_groups([b"{}", big, b"{}"], 1000)] == [1, 1, 1]
    assert list(iter_groups([], 1000)) == []


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"{}",
        b"[]",
        b'"str"',
        b"[1,2]",
        b"{",
        b'{"action":2,"htname":"t","cname":"k","type":2,"strval":"v","mode":1,"extra":1}',
        b'{"action":2,"htname":"t","cname":"k","type":2,"strval":"v","mode":1,"last_modified":1}',
        b'{"action":"2","htname":"t","cname":"k","type":0,"intval":1,"mode":1}',
        b'{"action":2,"htname":5,"cname":"k","type":0,"intval":1,"mode":1}',
        b'{"action":2,"htname":"t","cname":null,"type":0,"intval":1,"mode":1}',
        b'{"action":2,"htname":"t","cname":"k","type":0,"intval":"1","mode":1}',
        b'{"action":2,"htname":"t","cname":"k","type":0,"intval":4294967297,"mode":1}',
        b'{"action":2,"htname":"t","cname":"k","type":0,"intval":NaN,"mode":1}',
        b'{"action":true}',
        b'{"cells":"x"}',
        b'{"cells":[1]}',
        b'{"cells":[{"htname":"t","cname":"a","type":2,"intval":1,"expire":0}]}',
        b'{"cells":[{"htname":"t","cname":"a","type":0,"intval":"1","expire":0}]}',
        b"[" * 100000,
    ],
)
def test_decoder_rejects(body: bytes) -> None:
    with pytest.raises(BadRequest):
        decode(body)


def test_decoder_leniency_matches_srjson() -> None:
    assert decode(b' \r\n{"action":1}trailing') == Action(1)
    # numbers are (int)valuedouble; the last duplicate wins; key order is free
    assert decode(b'{"mode":1,"action":2,"htname":"t","cname":"f","type":0,"intval":2.9}') == (
        Action(2, "t", "f", 0, None, 2, 1)
    )
    assert decode(b'{"action":2,"intval":1,"intval":-2}').intval == -2  # type: ignore[union-attr]
    # bulk only when "cells" comes first; other root keys then do not matter
    assert isinstance(decode(b'{"cells":[],"zz":1}'), Bulk)
    with pytest.raises(BadRequest):
        decode(b'{"zz":1,"cells":[]}')
    bulk = decode(
        b'{"cells":[{"htname":"t","cname":"","type":0,"intval":1,"expire":0},'
        b'{"cname":"x","type":0,"intval":1},{"htname":"t","cname":"a","type":0,"intval":1,'
        b'"expire":5,"last_modified":9}]}'
    )
    assert bulk == Bulk(
        (SyncCell("t", "a", 1, 5),), skipped=2, unknown_keys=frozenset({"last_modified"})
    )


# ---- store ----------------------------------------------------------------------------------


def test_core_case_hash_agrees_with_kamailio_slots() -> None:
    # slots of 2**8 observed in htable.dump of a 5.6.3 node
    seen = {
        **{"n1": 6, "k2": 99, "k1": 102, "": 0, "dup": 68, "neg": 93, "k": 102, "c1": 103},
        **{"f": 106, "big": 128, "order": 144, "nv": 199, "n3": 4, "xs": 142, "s2": 102},
    }
    for name, slot in seen.items():
        assert core_case_hash(name.encode()) & 255 == slot, name
    # case-insensitive, and non-ASCII bytes hashed as signed chars (slow path) stay stable
    assert core_case_hash(b"KeyName") == core_case_hash(b"keyname")
    assert core_case_hash("clé-é".encode()) != core_case_hash(b"cle-e")
    assert core_case_hash("ÉÉÉÉ".encode()) == core_case_hash("ÉÉÉÉ".encode())


def test_dump_and_get_have_kamailios_shape() -> None:
    svc = service()
    svc.set("t", "k1", "v1")
    svc.set("t", "k2", "v2")
    svc.set("t", "n1", 42)
    methods = rpc_methods(svc)
    assert methods["htable.dump"](["t"]) == golden_json("jsonrpc_htable.dump_node3.json")["result"]
    assert (
        methods["htable.get"](["t", "k1"]) == golden_json("jsonrpc_htable.get_node2.json")["result"]
    )


def test_values_and_types() -> None:
    svc = service(T, INIT)
    svc.set("t", "a", "x")
    svc.set("t", "a", 7)  # a cell changes type
    assert svc.get("t", "a") == 7
    assert svc.get("t", "missing", "dflt") == "dflt"
    assert svc.incr("t", "a") == 8 and svc.decr("t", "a", 10) == -2
    svc.set("t", "s", "text")
    assert svc.incr("t", "s") is None and svc.get("t", "s") == "text"
    assert svc.incr("t", "nothing") is None and svc.get("t", "nothing") is None
    assert svc.incr("c", "counter") == 6  # initval 5
    svc.set("t", "max", 2**31 - 1)
    assert svc.incr("t", "max") == -(2**31)  # wraps like Kamailio's (int)
    assert wrap_int(2**32 + 5) == 5
    for bad in (2**31, True, 1.5, None, b"x"):
        with pytest.raises(ValueError):
            svc.set("t", "k", bad)  # type: ignore[arg-type]
    with pytest.raises(UnknownTableError):
        svc.set("nosuch", "k", 1)
    with pytest.raises(LookupError):
        svc.get("nosuch", "k")
    assert svc.delete("t", "a") and not svc.delete("t", "a")
    assert svc.items("t") == [("s", "text"), ("max", -(2**31))]


def test_expiry_follows_a_fake_clock() -> None:
    clock = Clock()
    svc = service(T, E, NOUPD, clock=clock)
    now = int(clock.now)
    svc.set("e", "k", "v")
    assert svc.get_cell("e", "k").expire == now + 100  # type: ignore[union-attr]
    svc.set("t", "k", "v")
    assert svc.get_cell("t", "k").expire == 0  # type: ignore[union-attr]
    assert not svc.set_expire("t", "k", 5)  # no autoexpire: ignored
    clock.now += 50
    svc.set("e", "k", "v2")  # updateexpire=1: restarts
    assert svc.get_cell("e", "k").expire == now + 150  # type: ignore[union-attr]
    svc.set("n", "k", "v")
    clock.now += 60
    svc.set("n", "k", "v2")  # updateexpire=0: keeps its expiry
    assert svc.get_cell("n", "k").expire == now + 150  # type: ignore[union-attr]
    svc.set_expire("e", "k", 10)
    assert svc.get_cell("e", "k").expire == int(clock.now) + 10  # type: ignore[union-attr]
    svc.set("e", "x", "v", expire=5)  # sht_setxs
    svc.set("e", "never", "v", expire=0)  # <= 0: never
    assert svc.get_cell("e", "never").expire == 0  # type: ignore[union-attr]
    clock.now += 11
    assert svc.get("e", "k") is None and svc.get("e", "x") is None  # expired, not yet swept
    assert [c.name for c in svc.store.ordered("e")] != []  # dump still lists them
    assert svc.store.sync_cell("e", "k") is None
    assert svc.get("e", "never") == "v"
    assert svc.sweep() == 2
    assert {c.name for c in svc.store.ordered("e")} == {"never"}
    assert svc.stats.expired == 2
    clock.now += 1000
    assert svc.sweep() == 1  # the "n" cell
    assert svc.get("t", "k") == "v"  # tables without autoexpire keep everything


async def test_sweeper_task_runs_every_timer_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    svc = service(E, clock=clock, timer_interval=1)
    svc.set("e", "k", "v")
    clock.now += 1000
    sleeps: list[float] = []
    real_sleep = asyncio.sleep

    async def fast_sleep(delay: float) -> None:
        sleeps.append(delay)
        await real_sleep(0)

    monkeypatch.setattr("pydmq.consumers.htable.asyncio.sleep", fast_sleep)
    svc.start()
    for _ in range(5):
        await real_sleep(0)
    await svc.close()
    assert sleeps and set(sleeps) == {1}
    assert svc.get_cell("e", "k") is None and len(svc.store.table("e")) == 0


def test_removal_by_regex_and_prefix() -> None:
    store = HtableStore([parse_htable_spec(T)])
    for name, value in (
        ("Alpha", "v1"),
        ("alpine", 3),
        ("beta", "Value"),
        ("b2", "w"),
        ("x\ny", "z"),
    ):
        store.set("t", name, value)
    assert store.remove_re("t", "^AL", by_value=False) == 2  # case-insensitive, unanchored
    assert store.remove_re("t", "^y", by_value=False) == 1  # REG_NEWLINE: ^ after a newline
    assert store.remove_re("t", "[[:upper:]]alue", by_value=True) == 1  # POSIX class
    assert store.remove_prefix("t", "w", by_value=True) == 1
    assert [c.name for c in store.live_cells("t")] == []
    store.set("t", "n", 5)
    assert store.remove_re("t", ".", by_value=True) == 0  # integers never match by value
    assert store.remove_prefix("t", "n", by_value=False) == 1
    for bad in ("", "(", "[z-a]"):
        with pytest.raises(HtablePatternError):
            store.remove_re("t", bad)
    with pytest.raises(HtablePatternError):
        store.remove_prefix("t", "")


# ---- the peer callback ------------------------------------------------------------------


def _seeded() -> tuple[HtableService, FakeApi]:
    svc, api = replicating(T, E)
    svc.store.set("t", "a", "1")
    svc.store.set("t", "b", 2)
    svc.store.set("e", "c", "3")
    return svc, api


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"not json", 400),
        (b"", 400),
        (b"{}", 400),
        (b"[]", 400),
        (b'{"action":2,"htname":"t","cname":"a","type":2,"strval":"x","mode":1,"extra":1}', 400),
        (b'{"action":2,"htname":"t","cname":"a","type":2,"mode":1}', 400),
        (b'{"action":2,"htname":"t","type":2,"strval":"x","mode":1}', 400),
        (b'{"action":2,"htname":7,"cname":"a","type":2,"strval":"x","mode":1}', 400),
        (b'{"action":5,"htname":"t","type":0,"intval":1,"mode":0}', 400),
        (b'{"action":3,"htname":"e","cname":"c","type":0,"mode":0}', 400),
        (b'{"action":2,"htname":"nosuch","cname":"a","type":2,"strval":"x","mode":1}', 500),
        (b'{"htname":"t","cname":"a","type":0,"intval":1,"mode":1}', 500),  # action 0
        (b'{"action":9,"htname":"t","cname":"a","mode":0}', 500),
        (b'{"action":7,"htname":"t","type":2,"strval":"a","mode":0}', 500),  # 6.0's RM_CELL_EW
        (b'{"action":5,"htname":"t","type":2,"strval":"(","mode":0}', 500),
        (b'{"action":6,"htname":"t","type":2,"strval":"","mode":0}', 500),
        (
            b'{"cells":[{"htname":"t","cname":"a","type":2,"strval":"x","expire":0},{"htname":"t",'
            b'"cname":"b","type":2,"expire":0}]}',
            400,
        ),
        (b'{"cells":[{"htname":"t","cname":"a","type":2,"strval":"x","expire":0},7]}', 400),
    ],
)
def test_bad_input_is_refused_and_changes_nothing(body: bytes, code: int) -> None:
    svc, api = _seeded()
    before = state(svc)
    response = svc.handle_message(kdmq(body), None)
    assert (response.code, response.reason) == (
        (400, "Bad Request") if code == 400 else (500, "Server Internal Error")
    )
    assert response.body == b""
    assert state(svc) == before
    assert api.changes == []


def test_missing_content_length_and_huge_body_are_400() -> None:
    svc, _api = _seeded()
    before = state(svc)
    assert svc.handle_message(kdmq(b'{"action":4,"htname":"t","cname":"a","mode":0}',
                                   content_length=False), None).code == 400  # fmt: skip
    cells = ",".join(
        f'{{"htname":"t","cname":"k{i}","type":0,"intval":{i},"expire":0}}' for i in range(20000)
    )
    huge = f'{{"cells":[{cells}]}}'.encode()
    assert len(huge) > 1_000_000
    assert svc.handle_message(kdmq(huge), None).code == 400
    assert state(svc) == before
    assert svc.stats.received_bad == 2


def test_received_changes_apply_without_replicating_and_tolerate_duplicates() -> None:
    clock = Clock()
    svc, api = replicating(T, E, clock=clock)
    now = int(clock.now)
    messages = [
        encode_set_cell("t", "k1", "v1"),
        encode_set_cell("t", "n1", 42),
        encode_set_cell("e", "x", "y"),
        encode_set_expire("e", "x", 30),
        encode_set_cell("t", "gone", 1),
        encode_del_cell("t", "gone"),
        encode_set_cell("t", "tmp-1", "a"),
        encode_set_cell("t", "tmp-2", "b"),
        encode_remove("t", "^TMP-", prefix=False, by_value=False),
        encode_set_cell("t", "p", "drop-me"),
        encode_remove("t", "drop", prefix=True, by_value=True),
    ]
    for body in messages:
        for _duplicate in range(2):  # a retransmission arriving again changes nothing
            assert svc.handle_message(kdmq(body), None) == PeerResponse(200, "OK")
    assert state(svc) == {
        "t": [("n1", 42, 0), ("k1", "v1", 0)],
        "e": [("x", "y", now + 30)],
    }
    assert api.changes == []
    assert svc.stats.received_ok == 2 * len(messages)


def test_bulk_applies_expiry_relative_to_now_and_skips_unknown_tables() -> None:
    clock = Clock()
    svc, api = replicating(T, E, clock=clock)
    now = int(clock.now)
    body = group_body(
        [
            encode_sync_cell("t", "k", "v", 0),
            encode_sync_cell("e", "later", 1, now + 40),
            encode_sync_cell("e", "past", 2, now - 5),  # <= 0 left: the table default
            encode_sync_cell("e", "none", 3, 0),
            encode_sync_cell("nosuch", "z", 1, 0),
        ]
    )
    assert svc.handle_message(kdmq(body), None).code == 200
    assert dict((n, (v, e)) for n, v, e in state(svc)["e"]) == {
        "later": (1, now + 40),
        "past": (2, now + 100),
        "none": (3, now + 100),
    }
    assert svc.get("t", "k") == "v"
    assert svc.stats.cells_received == 4 and svc.stats.groups_received == 1
    assert svc.handle_message(kdmq(EMPTY_GROUP), None).code == 200  # the final group
    assert api.changes == []


def test_every_local_mutation_replicates_exactly_once() -> None:
    svc, api = replicating(T, INIT, NOREP)
    svc.set("t", "k1", "v1")
    svc.set("t", "n", 41)
    svc.incr("t", "n")
    svc.decr("t", "n", 2)
    svc.incr("c", "x")  # from initval
    assert svc.incr("t", "k1") is None  # a string: nothing sent
    svc.set("t", "x", "v", expire=30)
    svc.set_expire("t", "x", 60)
    svc.delete("t", "k1")
    svc.delete("t", "never-existed")
    svc.remove("t", "^a", op="re", on="name")
    svc.remove("t", "v", op="sw", on="value")
    svc.flush("t")
    svc.set("local", "k", "v")  # dmqreplicate=0: local only
    svc.delete("local", "k")
    assert api.changes == [
        encode_set_cell("t", "k1", "v1"),
        encode_set_cell("t", "n", 41),
        encode_set_cell("t", "n", 42),
        encode_set_cell("t", "n", 40),
        encode_set_cell("c", "x", 6),
        encode_set_cell("t", "x", "v"),
        encode_set_expire("t", "x", 30),
        encode_set_expire("t", "x", 60),
        encode_del_cell("t", "k1"),
        encode_del_cell("t", "never-existed"),
        encode_remove("t", "^a", prefix=False, by_value=False),
        encode_remove("t", "v", prefix=True, by_value=True),
        encode_remove("t", ".*", prefix=False, by_value=False),
    ]
    assert svc.stats.replicated == len(api.changes)


def test_refused_local_changes_send_nothing() -> None:
    svc, api = replicating()
    svc.set("t", "a", "1")
    api.sent.clear()
    with pytest.raises(HtablePatternError):
        svc.remove("t", "(")
    with pytest.raises(HtablePatternError):
        svc.remove("t", "", op="sw")
    with pytest.raises(ValueError):
        svc.remove("t", "a", op="ew")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        svc.set("t", "a", 2**40)
    with pytest.raises(ValueError):
        svc.set("t", "a", "x", expire=2**40)
    with pytest.raises(UnknownTableError):
        svc.delete("nosuch", "a")
    assert api.changes == [] and svc.get("t", "a") == "1"


def test_a_peer_that_replicates_to_another_keeps_them_equal() -> None:
    """Every change a node sends, applied on a second node, gives the same table."""
    a, api = replicating(T, E, INIT)
    b, _ = replicating(T, E, INIT)
    a.set("t", "s", "x")
    a.set("t", "i", 1)
    a.incr("t", "i", 5)
    a.set("e", "k", "v", expire=50)
    a.set("t", "tmp1", "1")
    a.set("t", "tmp2", "2")
    a.remove("t", "tmp", op="sw")
    a.incr("c", "n")
    for body in api.changes:
        assert b.handle_message(kdmq(body), None).code == 200
    assert state(a) == state(b)


# ---- the sync sender --------------------------------------------------------------------


async def test_sync_sender_window_sizes_and_final_group() -> None:
    svc, api = replicating(T, E, sync_group_bytes_udp=600, sync_window=3)
    for i in range(300):
        svc.store.set("t", f"key-{i:04d}", f"value-{i}" if i % 3 else i)
    svc.store.set("e", "exp", "x")
    peer = PEER
    result = await svc.sync_to(peer)  # type: ignore[misc]
    assert result.ok and result.cells_sent == 301 == result.cells_total
    bodies = api.sent
    assert bodies[-1] == EMPTY_GROUP
    assert all(len(b) <= 600 for b in bodies)
    cells = [c for b in bodies for c in json.loads(b)["cells"]]
    assert len(cells) == 301 and len({(c["htname"], c["cname"]) for c in cells}) == 301
    assert 1 < api.max_in_flight <= 3
    assert result.groups_sent == len(bodies) == svc.stats.groups_sent
    # the receiver ends up with the same tables
    other, _ = replicating(T, E)
    for body in bodies:
        assert other.handle_message(kdmq(body), None).code == 200
    assert state(other) == state(svc)


async def test_sync_sender_retries_timeouts_and_gives_up() -> None:
    svc, api = replicating(T, sync_group_bytes_udp=1024, sync_retries=2)
    for i in range(10):
        svc.store.set("t", f"k{i}", i)
    peer = PEER
    api.statuses = [408, 503]  # the first group times out twice, then passes
    result = await svc.sync_to(peer)  # type: ignore[misc]
    assert result.ok and result.cells_sent == 10
    api.statuses = [408, 408, 408]
    result = await svc.sync_to(peer)  # type: ignore[misc]
    assert not result.ok and "408" in (result.error or "")
    assert svc.stats.syncs_failed == 1 and svc.stats.syncs_completed == 1


async def test_sync_request_is_answered_once_per_node() -> None:
    svc, api = replicating(T, sync_window=1)
    svc.store.set("t", "k", "v")
    peer = PEER
    for _ in range(3):  # the request and two retransmissions
        assert svc.handle_message(kdmq(encode_sync_request()), peer).code == 200
    await asyncio.gather(*svc._syncs.values())
    assert api.sent == [
        group_body([encode_sync_cell("t", "k", "v", 0)]),
        EMPTY_GROUP,
    ]
    # a 5.8-style request for one table; a table we do not have gives only the final group
    api.sent.clear()
    svc.handle_message(kdmq(encode_sync_request("other")), peer)
    await asyncio.gather(*svc._syncs.values())
    assert api.sent == [EMPTY_GROUP]


def test_group_limit_depends_on_transport() -> None:
    svc = service(sync_group_bytes=15000, sync_group_bytes_udp=1000)
    assert svc.group_limit(build_node("sip:127.0.0.1:5060", lambda h: h)) == 1000
    assert svc.group_limit(build_node("sip:127.0.0.1:5060;transport=tcp", lambda h: h)) == 15000
    assert svc.group_limit(build_node("sip:127.0.0.1:5061;transport=tls", lambda h: h)) == 15000


# ---- RPC ----------------------------------------------------------------------------------


def test_rpc_results_and_faults_as_kamailio() -> None:
    clock = Clock()
    svc, api = replicating(T, E, clock=clock)
    rpc = rpc_methods(svc)
    ok = "Ok. Key set to new value."
    assert rpc["htable.sets"](["t", "k1", "v1"]) == ok
    assert rpc["htable.sets"](["t", "s2", 7]) == ok  # a number as text
    assert rpc["htable.seti"](["t", "n1", 42]) == ok
    assert rpc["htable.seti"](["t", "fl", 2.7]) == ok
    assert rpc["htable.get"](["t", "s2"]) == {
        "item": {"name": "s2", "value": "7", "flags": 2, "expire": "NEVER"}
    }
    assert rpc["htable.get"](["t", "fl"])["item"]["value"] == 2  # type: ignore[index]
    assert rpc["htable.delete"](["t", "fl"]) == "Ok. Key deleted."
    assert rpc["htable.sets"](["e", "ek", "ev"]) == ok
    assert rpc["htable.setex"](["e", "ek", 50]) == "Ok"
    expire = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(int(clock.now) + 50))
    assert rpc["htable.get"](["e", "ek"])["item"]["expire"] == expire  # type: ignore[index]
    assert rpc["htable.setxs"](["e", "xs", "v", 30]) == ok
    assert rpc["htable.setxi"](["e", "xi", 5, 30]) == ok
    assert rpc["htable.listTables"]([]) == [
        {"name": "e", "dbtable": "", "dbmode": 0, "expire": 100, "updateexpire": 1,
         "size": 16, "dmqreplicate": 1},
        {"name": "t", "dbtable": "", "dbmode": 0, "expire": 0, "updateexpire": 1,
         "size": 256, "dmqreplicate": 1},
    ]  # fmt: skip
    assert rpc["htable.stats"]([]) == [
        {"name": "e", "slots": 16, "all": 3, "min": 0, "max": 1},
        {"name": "t", "slots": 256, "all": 3, "min": 0, "max": 2},  # k1 and s2 share slot 102
    ]
    faults = [
        ("htable.sets", ["nosuch", "k", "v"], 500, "No such htable"),
        ("htable.sets", ["t", "k"], 500, "Not enough parameters (htable name, key name and value)"),
        ("htable.get", ["t", "missing"], 500, "Key name doesn't exist in htable."),
        ("htable.get", ["nosuch", "x"], 500, "No such htable"),
        ("htable.get", ["t"], 500, "Not enough parameters (htable name and key name)"),
        ("htable.delete", ["t", "fl"], 404, "Key not found in htable."),
        ("htable.delete", ["t"], 500, "Not enough parameters (htable name & key name"),
        ("htable.setex", ["e", "k"], 500,
         "Not enough parameters (htable name, item name and expire)"),
        ("htable.setex", ["nosuch", "k", 5], 500, "No such htable"),
        ("htable.setxs", ["e", "k", "v"], 500,
         "Not enough parameters (htable name, key name, value and expire)"),
        ("htable.setxs", ["nosuch", "k", "v", 5], 500, "Failed to set the item"),
        ("htable.setxi", ["nosuch", "k", 1, 5], 500, "Failed to set the item"),
        ("htable.seti", ["t", "k", 2**32], 500, "Invalid parameter value"),
        ("htable.seti", ["t", "k", "abc"], 500, "Invalid parameter value"),
        ("htable.dump", [], 500, "No htable name given"),
        ("htable.dump", ["nosuch"], 500, "No such htable"),
        ("htable.flush", [], 500, "No htable name given"),
        ("htable.flush", ["nosuch"], 500, "No such htable"),
        ("htable.reload", ["t"], 500, "No htable db_url"),
        ("htable.store", ["t"], 500, "No htable db_url"),
    ]  # fmt: skip
    for method, params, code, message in faults:
        with pytest.raises(RpcFault) as info:
            rpc[method](params)
        assert (info.value.code, info.value.message) == (code, message), method
    assert rpc["htable.dump"](["e"]) == dump_table(svc.store, "e")
    assert rpc["htable.flush"](["e"]) == "Ok. Htable flushed."
    assert rpc["htable.dump"](["e"]) == []
    # every RPC write went out as Kamailio's RPC sends it
    assert api.changes[:2] == [encode_set_cell("t", "k1", "v1"), encode_set_cell("t", "s2", "7")]
    assert encode_set_cell("e", "xi", 5) in api.changes
    assert encode_set_expire("e", "xi", 30) in api.changes


def test_rpc_dmqsync() -> None:
    local = service()
    with pytest.raises(RpcFault):
        rpc_methods(local)["htable.dmqsync"]([])
    svc, api = replicating()
    rpc = rpc_methods(svc)
    assert rpc["htable.dmqsync"]([]) == "Ok. Sync requested."
    assert rpc["htable.dmqsync"](["t"]) == "Ok. Sync requested."
    with pytest.raises(RpcFault) as info:
        rpc["htable.dmqsync"](["nosuch"])
    assert info.value.message == "No such htable"
    assert api.broadcasts == [encode_sync_request(), encode_sync_request("t")]


# ---- replication order ----------------------------------------------------------------------


def _touches(body: bytes) -> tuple[str | None, str | None]:
    message = decode(body)
    assert isinstance(message, Action)
    return message.htname, message.cname


async def test_changes_of_one_key_are_never_in_flight_together() -> None:
    """Kamailio applies concurrent requests in any order: a key's next change waits for the
    reply to its previous one, a table-wide removal for everything in that table."""
    svc, api = replicating(T, E)
    api.delay = 0.002
    conflicts: list[tuple[bytes, bytes]] = []
    send = api.send_message

    def watching(peer: Any, body: bytes, node: Any, **kw: Any) -> Any:
        table, key = _touches(body)
        for other in api.pending:
            t, k = _touches(other)
            if t == table and (k is None or key is None or k == key):
                conflicts.append((other, body))
        return send(peer, body, node, **kw)

    api.send_message = watching  # type: ignore[method-assign]
    svc.set("t", "k", 41)
    svc.incr("t", "k")
    for i in range(40):
        svc.set("t", f"o{i}", i)
    svc.set("e", "x", "y", expire=5)
    svc.remove("t", "^o1", op="re")
    svc.set("t", "k", "last")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while len(api.sent) < 46 or api.in_flight:
        assert loop.time() < deadline, api.sent
        await asyncio.sleep(0.005)
    assert conflicts == []
    assert [b for b in api.sent if _touches(b) == ("t", "k")] == [
        encode_set_cell("t", "k", 41),
        encode_set_cell("t", "k", 42),
        encode_set_cell("t", "k", "last"),
    ]
    removal = api.sent.index(encode_remove("t", "^o1", prefix=False, by_value=False))
    assert all(encode_set_cell("t", f"o{i}", i) in api.sent[:removal] for i in range(40))
    assert 4 < api.max_in_flight <= 32
    assert svc.stats.replicated == 46 and svc.stats.replication_dropped == 0


async def test_a_silent_node_holds_a_bounded_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("pydmq.consumers.htable.REPLICATION_QUEUE", 5)
    svc, api = replicating()
    api.delay = 3600  # never answers within the test
    for i in range(50):
        svc.set("t", "same", i)  # one key: one in flight, the rest queued
    assert api.sent == [encode_set_cell("t", "same", 0)]
    assert svc.stats.replication_dropped == 44
    await svc.close()


async def test_rpc_through_the_dispatcher_is_byte_exact() -> None:
    """pydmq's JSON-RPC layer prints htable results exactly as jsonrpcs does."""
    from pydmq.rpc.protocol import Dispatcher, MethodTable  # noqa: PLC0415 (another layer)

    svc = service()
    for key, value in (("k1", "v1"), ("k2", "v2"), ("n1", 42)):
        svc.set("t", key, value)
    table = MethodTable().update(rpc_methods(svc))
    assert table.get("htable.get").doc == "Get one key from a hash table."  # type: ignore[union-attr]
    dispatcher = Dispatcher(table)
    for request, golden in [
        (b'{"jsonrpc":"2.0","method":"htable.dump","params":["t"],"id":17068}',
         "jsonrpc_htable.dump_node3.json"),
        (b'{"jsonrpc":"2.0","method":"htable.get","params":["t","k1"],"id":16964}',
         "jsonrpc_htable.get_node2.json"),
    ]:  # fmt: skip
        reply = await dispatcher.handle(request)
        assert reply.body == (GOLDEN / golden).read_bytes().rstrip(b"\n")
    reply = await dispatcher.handle(
        b'{"jsonrpc":"2.0","method":"htable.get","params":["t"],"id":1}'
    )
    assert json.loads(reply.body)["error"] == {
        "code": 500,
        "message": "Not enough parameters (htable name and key name)",
    }


# ---- re-join (pydmq): conflicts resolve the same everywhere, a known node coming back is pushed


def test_sync_conflicts_keep_the_larger_value_in_any_order() -> None:
    """Two sides of a partition pushed each other their tables: whatever order the groups come
    in, every node keeps the larger value (ints before strings); equal values just apply."""
    cells = [
        encode_sync_cell("t", "s", "ab-side", 0),
        encode_sync_cell("t", "s", "c-side", 0),
        encode_sync_cell("t", "n", 7, 0),
        encode_sync_cell("t", "n", 41, 0),
        encode_sync_cell("t", "mixed", 99, 0),
        encode_sync_cell("t", "mixed", "text", 0),
    ]
    results = []
    for order in (cells, cells[::-1], cells[1::2] + cells[::2]):
        svc, _api = replicating(T)
        for cell in order:
            assert svc.handle_message(kdmq(group_body([cell])), None).code == 200
        results.append(svc.items("t"))
        # the larger value first: the smaller one that follows is not applied
        assert svc.stats.sync_cells_kept_local == (3 if order is not cells else 0)
    assert all(sorted(r) == [("mixed", "text"), ("n", 41), ("s", "c-side")] for r in results)


def test_live_changes_still_apply_as_they_come() -> None:
    svc, _api = replicating(T)
    svc.handle_message(kdmq(group_body([encode_sync_cell("t", "k", 9, 0)])), None)
    assert svc.handle_message(kdmq(encode_set_cell("t", "k", 1)), None).code == 200
    assert svc.get("t", "k") == 1


async def test_a_known_node_coming_back_gets_our_tables() -> None:
    """In-process nodes a and b: b misses a change of a's (made without replication), then goes
    not_active on a and comes back with a ping's 200: a pushes its tables to b. A brand-new node
    is not pushed to (it asks for a sync itself)."""
    from pydmq.config import settings_from_mapping  # noqa: PLC0415
    from pydmq.consumers.htable import attach  # noqa: PLC0415
    from pydmq.dmq.runtime import DmqNode  # noqa: PLC0415
    from tests.support.net import free_port  # noqa: PLC0415

    def make(seed: str | None) -> tuple[DmqNode, HtableService]:
        port = free_port("udp")
        settings, _ = settings_from_mapping(
            {
                "dmq": {
                    "server_address": f"sip:127.0.0.1:{port}",
                    "notification_address": [seed] if seed else [],
                    "ping_interval": 60,
                },
                "tm": {"t1": 0.05, "fr_timer": 1.0},
                "htable": {"tables": [T], "enable_dmq": True, "dmq_init_sync": True},
            },
            "test",
        )
        node = DmqNode(settings)
        return node, attach(node)

    a, ha = make(None)
    await a.start()
    b, hb = make(a.local.orig_uri)
    await b.start()
    try:
        for _ in range(200):
            if a.nodes.find(b.local.key) is not None and ha.sync_results:
                break
            await asyncio.sleep(0.01)
        assert ha.stats.rejoin_syncs == 0  # b was new: it asked for a sync, nobody pushed
        ha.store.set("t", "missed", "by-b")  # not replicated: b does not have it
        assert hb.get("t", "missed") is None
        a.nodes.set_status(b.local.key, NodeStatus.NOT_ACTIVE)
        a.publish_events()
        await asyncio.gather(*a.ping_now())
        for _ in range(200):
            if hb.get("t", "missed") == "by-b":
                break
            await asyncio.sleep(0.01)
        assert hb.get("t", "missed") == "by-b"
        assert ha.stats.rejoin_syncs == 1
    finally:
        for node, svc in ((b, hb), (a, ha)):
            await svc.close()
            await node.stop(announce=False)


# ---- the SET_CELL fast path -------------------------------------------------------------------

_TEXT = st.one_of(
    st.text(max_size=8),
    st.binary(max_size=8).map(lambda b: b.decode("utf-8", "surrogateescape")),
    st.sampled_from(["", "t", 'a"b', "a\\b", "\x01", "é", "\udcff", "\\u0041"]),
)
_NUMBER = st.one_of(
    st.integers(-(2**40), 2**40).map(str),
    st.sampled_from(["-0", "0123", "1.5", "1e3", "2147483648", "-2147483649", "999999999"]),
)


def _json_text(text: str, raw: bool) -> bytes:
    """``text`` as a JSON string: escaped as pydmq writes it, or its bytes unescaped."""
    if raw:
        return b'"' + text.encode("utf-8", "surrogateescape") + b'"'
    return encode_set_cell(text, "x", 0).split(b'"htname":', 1)[1].split(b',"cname"', 1)[0]


@given(
    htname=_TEXT,
    cname=_TEXT,
    strval=_TEXT,
    intval=_NUMBER,
    mode=_NUMBER,
    kind=st.sampled_from([0, 2]),
    raw=st.booleans(),
    tail=st.sampled_from([b"", b" ", b"junk", b"}", b',"x":1}']),
)
@hypothesis_settings(max_examples=400, deadline=None)
def test_set_cell_fast_path_agrees_with_decode(
    htname: str,
    cname: str,
    strval: str,
    intval: str,
    mode: str,
    kind: int,
    raw: bool,
    tail: bytes,
) -> None:
    value = b'"strval":' + _json_text(strval, raw) if kind == 2 else b'"intval":' + intval.encode()
    names = b'"htname":%s,"cname":%s' % (_json_text(htname, raw), _json_text(cname, raw))
    body = b'{"action":2,%s,"type":%d,%s,"mode":%s}%s' % (names, kind, value, mode.encode(), tail)
    fast = decode_set_cell(body)
    if fast is None:
        return
    message = decode(body)  # must accept what the fast path accepts
    assert isinstance(message, Action) and message.action == 2
    assert fast == (message.htname, message.cname, message.value())


def test_set_cell_fast_path_takes_what_peers_send() -> None:
    assert decode_set_cell(golden_request("05").body) == ("t", "k1", "v1")
    assert decode_set_cell(encode_set_cell("t", "n\xe9", -42)) == ("t", "n\xe9", -42)
    assert decode_set_cell(encode_set_cell("t", "k", 'x"y')) is None  # an escape: decode() reads it
    assert decode_set_cell(encode_set_expire("t", "k", 5)) is None
