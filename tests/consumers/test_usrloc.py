"""usrloc over DMQ without a network: codec, location table, replies, sync flow control, RPC.

The golden bodies below were captured from Kamailio 5.6.3 (a REGISTER through sipp, then the
UPDATE, RM, sync request and ``multi`` sync answer it sent to a second Kamailio).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from pydmq.config import UsrlocSettings
from pydmq.consumers.usrloc import UsrlocService, attach
from pydmq.consumers.usrloc_codec import (
    Q_UNSPECIFIED,
    Action,
    Contact,
    UsrlocDecodeError,
    batch_bodies,
    decode_message,
    encode_contact,
    encode_sync_request,
)
from pydmq.consumers.usrloc_rpc import RpcFault, rpc_methods
from pydmq.consumers.usrloc_store import ApplyResult, LocationStore, core_hash
from pydmq.dmq.api import Delivery
from pydmq.dmq.node import build_local_node
from pydmq.dmq.peer import Peer
from pydmq.dmq.runtime import DmqNode
from pydmq.sip.message import Request
from tests.support.cluster import make_settings
from tests.support.net import free_port

# ---- captured from Kamailio 5.6.3 ---------------------------------------------------------------

K_UPDATE = (
    b'{"action":1,"aor":"bob","ruid":"uloc-6b0d7ed6-449e-1",'
    b'"c":"sip:bob@127.0.0.1:5099;transport=udp","received":"","path":"",'
    b'"callid":"1-17591@127.0.0.1","user_agent":"sipp-test","instance":"<urn:uuid:1234>",'
    b'"expires":1796050150,"cseq":1,"flags":0,"cflags":0,"q":-1,"last_modified":1796046550,'
    b'"methods":4294967295,"reg_id":1,"server_id":0}'
)
K_RM = (
    b'{"action":2,"aor":"carol","ruid":"uloc-6b0d7ed6-449f-2","c":"sip:carol@127.0.0.1:5098",'
    b'"received":"","path":"","callid":"1-17626@127.0.0.1","user_agent":"n/a","instance":"",'
    b'"expires":1796046611,"cseq":1,"flags":0,"cflags":0,"q":500,"last_modified":1796046551,'
    b'"methods":4294967295,"reg_id":0,"server_id":0}'
)
K_MULTI = (
    b'{"multi":{"1":{"action":1,"aor":"bob","ruid":"uloc-6b0d7ee1-45a0-1",'
    b'"c":"sip:bob@127.0.0.1:5099;transport=udp","received":"","path":"",'
    b'"callid":"1-17836@127.0.0.1","user_agent":"sipp-test","instance":"<urn:uuid:1234>",'
    b'"expires":1796050162,"cseq":1,"flags":0,"cflags":0,"q":-1,"last_modified":1796046562,'
    b'"methods":4294967295,"reg_id":1,"server_id":0},"2":{"action":1,"aor":"alice",'
    b'"ruid":"uloc-6b0d7ee1-459f-1","c":"sip:alice@127.0.0.1:5099;transport=udp",'
    b'"received":"","path":"","callid":"1-17835@127.0.0.1","user_agent":"sipp-test",'
    b'"instance":"<urn:uuid:1234>","expires":1796050161,"cseq":1,"flags":0,"cflags":0,'
    b'"q":-1,"last_modified":1796046561,"methods":4294967295,"reg_id":1,"server_id":0}}}'
)
#: core_hash values Kamailio 5.6.3 printed as HashID (jürgen: its slot order in ul.dump).
K_HASHES = {"bob": 7222211, "alice": 1834153949, "Alice": 1229805461}

NOW = 1_800_000_000


def contact(aor: str = "alice", n: int = 1, **kw: Any) -> Contact:
    base = Contact(
        aor=aor,
        ruid=f"uloc-x-{aor}-{n}",
        uri=f"sip:{aor}@10.0.0.{n}:5060",
        callid=f"call-{aor}-{n}",
        user_agent="test",
        expires=NOW + 3600,
        cseq=1,
        last_modified=NOW,
        q=Q_UNSPECIFIED,
    )
    return replace(base, **kw)


# ---- codec --------------------------------------------------------------------------------------


def test_kamailio_update_round_trips_byte_for_byte():
    (msg,) = decode_message(K_UPDATE)
    assert msg.action is Action.UPDATE
    c = msg.contact
    assert c is not None
    assert (c.aor, c.ruid, c.uri, c.instance, c.q, c.methods, c.reg_id) == (
        "bob",
        "uloc-6b0d7ed6-449e-1",
        "sip:bob@127.0.0.1:5099;transport=udp",
        "<urn:uuid:1234>",
        -1,
        4294967295,
        1,
    )
    assert (c.expires, c.last_modified) == (1796050150, 1796046550)
    assert encode_contact(Action.UPDATE, c) == K_UPDATE


def test_kamailio_rm_round_trips():
    (msg,) = decode_message(K_RM)
    assert msg.action is Action.RM
    assert msg.contact is not None and msg.contact.q == 500
    assert encode_contact(Action.RM, msg.contact) == K_RM


def test_kamailio_multi_batch():
    msgs = decode_message(K_MULTI)
    assert [(m.action, m.contact and m.contact.aor) for m in msgs] == [
        (Action.UPDATE, "bob"),
        (Action.UPDATE, "alice"),
    ]
    contacts = [m.contact for m in msgs if m.contact]
    assert list(batch_bodies(contacts, max_contacts=3)) == [K_MULTI]


def test_sync_request():
    assert encode_sync_request() == b'{"action":3}'
    (msg,) = decode_message(b'{"action":3}')
    assert msg == type(msg)(Action.SYNC)


def test_sock_only_when_asked():
    c = contact(sock="udp:10.0.0.1:5060")
    assert b"sock" not in encode_contact(Action.UPDATE, c)
    body = encode_contact(Action.UPDATE, c, with_sock=True)
    keys = list(json.loads(body))
    assert keys[4:6] == ["received", "sock"]
    assert decode_message(body, check_sock=True)[0].contact == c


def test_utf8_and_escapes_like_srjson():
    c = contact(aor="jürgen", user_agent='a "b"\\ \t\x01')
    body = encode_contact(Action.UPDATE, c)
    assert "jürgen".encode() in body
    assert rb'"user_agent":"a \"b\"\\ \t\u0001"' in body
    assert decode_message(body)[0].contact == c


def test_lenient_where_kamailio_is():
    body = (
        b'{"action":1,"aor":"a","c":"sip:a@h","xavps":{"x":1},"sockname":"s",'
        b'"cseq":2.0,"cseq":3,"expires":1e3}'
    )
    (msg,) = decode_message(body)
    c = msg.contact
    assert c is not None
    # unknown keys ignored, the last duplicate wins, floats cast, missing keys default to 0
    assert (c.cseq, c.expires, c.q, c.methods, c.ruid) == (3, 1000, 0, 0, "")
    assert decode_message(b'{"aor":"x"}')[0].action is Action.NONE  # no action: NONE
    assert decode_message(b'{"action":2,"aor":"x"}')[0].contact is not None  # RM w/o ruid
    assert decode_message(b'{"multi":{}}') == []
    assert decode_message(b'{"action":0,"multi":{"1":5}}')[0].action is Action.NONE


BAD_BODIES = {
    "not json": b"hello",
    "truncated": K_UPDATE[:-1],
    "empty object": b"{}",
    "array": b"[1,2]",
    "number": b"5",
    "string": b'"x"',
    "unknown action": b'{"action":9,"aor":"a","c":"sip:a@h"}',
    "negative action": b'{"action":-1}',
    "action as string": b'{"action":"1","aor":"a","c":"sip:a@h"}',
    "action true": b'{"action":true}',
    "aor as number": b'{"action":1,"aor":5,"c":"sip:a@h"}',
    "aor null": b'{"action":1,"aor":null,"c":"sip:a@h"}',
    "c as object": b'{"action":1,"aor":"a","c":{}}',
    "expires as string": b'{"action":1,"aor":"a","c":"sip:a@h","expires":"10"}',
    "expires negative": b'{"action":1,"aor":"a","c":"sip:a@h","expires":-5}',
    "cseq too big": b'{"action":1,"aor":"a","c":"sip:a@h","cseq":4294967296}',
    "flags bool": b'{"action":1,"aor":"a","c":"sip:a@h","flags":false}',
    "q array": b'{"action":1,"aor":"a","c":"sip:a@h","q":[1]}',
    "NaN": b'{"action":1,"aor":"a","c":"sip:a@h","q":NaN}',
    "update without aor": b'{"action":1,"c":"sip:a@h"}',
    "update without contact": b'{"action":1,"aor":"a"}',
    "multi not object": b'{"multi":[1]}',
    "multi entry not object": b'{"multi":{"1":5}}',
    "multi bad entry": b'{"multi":{"1":{"action":1,"aor":"a","c":"x"},"2":{"action":7}}}',
    "not utf-8": b'{"action":1,"aor":"\xff","c":"x"}',
    "deep nesting": b'{"action":1,"x":' + b"[" * 5000 + b"]" * 5000 + b"}",
    "empty": b"",
    "1 MB": b'{"action":1,"aor":"a","c":"sip:a@h","path":"' + b"p" * (1 << 20) + b'"}',
}


@pytest.mark.parametrize("body", BAD_BODIES.values(), ids=BAD_BODIES.keys())
def test_bad_bodies_are_400(body: bytes):
    with pytest.raises(UsrlocDecodeError) as info:
        decode_message(body)
    assert (info.value.code, info.value.reason) == (400, "Bad Request")


def test_bad_sock_is_400_only_with_replicate_socket_info():
    body = b'{"action":1,"aor":"a","c":"sip:a@h","sock":"nonsense"}'
    assert decode_message(body)[0].contact is not None
    with pytest.raises(UsrlocDecodeError):
        decode_message(body, check_sock=True)


def test_batches_are_bounded():
    contacts = [contact(f"user{i}", i % 250 + 1, path="<sip:p@h>" * (i % 7)) for i in range(500)]
    bodies = list(batch_bodies(contacts, max_contacts=40, max_size=6000))
    seen: list[Contact] = []
    for body in bodies:
        assert len(body) <= 6000
        root = json.loads(body)
        assert list(root) == ["multi"]
        assert list(root["multi"]) == [str(i) for i in range(1, len(root["multi"]) + 1)]
        assert len(root["multi"]) <= 40
        seen += [m.contact for m in decode_message(body) if m.contact]
    assert seen == contacts
    # one contact per message by default (Kamailio's batch_msg_contacts = 1)
    singles = list(batch_bodies(contacts[:3]))
    assert [decode_message(b)[0].contact for b in singles] == contacts[:3]
    assert all(b.startswith(b'{"action":1,') for b in singles)


def test_batch_with_a_contact_over_the_size_limit():
    big = contact("big", path="x" * 3000)
    bodies = list(batch_bodies([contact("a"), big, contact("b")], max_contacts=10, max_size=1000))
    assert [len(decode_message(b)) for b in bodies] == [1, 1, 1]


# ---- the table ----------------------------------------------------------------------------------


def test_core_hash_matches_kamailio():
    for aor, value in K_HASHES.items():
        assert core_hash(aor) == value
    # signed chars: Kamailio 5.6.3 listed jürgen (slot 650) before carl (788) and alice (989)
    assert [core_hash(a) & 1023 for a in ("jürgen", "carl", "alice")] == [650, 788, 989]


def test_update_insert_then_by_ruid_then_idempotent():
    store = LocationStore()
    c1 = contact()
    assert store.apply_update(c1) is ApplyResult.INSERTED
    newer = replace(c1, uri="sip:alice@10.9.9.9", cseq=2, last_modified=NOW + 5)
    assert store.apply_update(newer) is ApplyResult.UPDATED
    assert store.get("alice") == [newer]
    assert store.apply_update(newer) is ApplyResult.UPDATED  # a retransmission: same state
    assert store.get("alice") == [newer] and len(store) == 1
    assert store.apply_update(c1) is ApplyResult.STALE  # a late duplicate of the older one
    assert store.get("alice") == [newer]


def test_update_matched_by_contact_uri():
    store = LocationStore()
    c1 = contact(ruid="")
    store.apply_update(c1)
    # same contact and Call-ID, CSeq not higher: Kamailio's "Invalid cseq" (skipped)
    assert store.apply_update(replace(c1, user_agent="x")) is ApplyResult.OLD_CSEQ
    moved = replace(c1, ruid="r2", cseq=2, user_agent="x")
    assert store.apply_update(moved) is ApplyResult.UPDATED
    assert store.get("alice") == [moved]
    assert store.by_ruid("r2") == moved


def test_contacts_ordered_by_q():
    store = LocationStore()
    low = contact(n=1, q=100)
    none = contact(n=2)
    high = contact(n=3, q=1000)
    mid = contact(n=4, q=500)
    mid2 = contact(n=5, q=500)
    for c in (low, none, high, mid, mid2):
        store.apply_update(c)
    assert store.get("alice") == [high, mid, mid2, low, none]
    raised = replace(low, q=900, last_modified=NOW + 1)
    store.apply_update(raised)
    assert store.get("alice") == [high, raised, mid, mid2, none]


def test_remove_by_ruid():
    store = LocationStore()
    c1, c2 = contact(n=1), contact(n=2)
    store.apply_update(c1)
    store.apply_update(c2)
    assert store.apply_remove(replace(c1, last_modified=NOW - 1)) is ApplyResult.STALE
    assert store.apply_remove(c1) is ApplyResult.REMOVED
    assert store.apply_remove(c1) is ApplyResult.NOT_FOUND  # a duplicate RM is harmless
    assert store.apply_remove(replace(c2, aor="bob")) is ApplyResult.NOT_FOUND
    assert store.apply_remove(c2) is ApplyResult.REMOVED
    assert "alice" not in store and store.record_count == 0


def test_expiry_is_driven_by_now():
    store = LocationStore()
    short = contact(n=1, expires=NOW + 60)
    permanent = contact(n=2, expires=0)
    store.apply_update(short)
    store.apply_update(permanent)
    assert store.lookup("alice", NOW + 59) == [short, permanent]
    assert store.lookup("alice", NOW + 60) == [permanent]  # usrloc: valid while expires > now
    assert store.get("alice") == [short, permanent]  # still listed until the timer runs
    assert store.expire(NOW + 59) == []
    assert store.expire(NOW + 60) == [short]
    assert store.expire(NOW + 10**9) == []
    assert store.get("alice") == [permanent]
    store.remove("alice")
    assert store.record_count == 0


def test_records_in_kamailio_dump_order():
    store = LocationStore()
    for aor in ("alice", "carl", "jürgen"):
        store.apply_update(contact(aor))
    assert [r.aor for r in store.records()] == ["jürgen", "carl", "alice"]
    assert store.slot_stats() == (3, 1)


def test_a_ruid_is_unique_across_aors():
    store = LocationStore()
    c1 = contact("alice")
    store.apply_update(c1)
    store.apply_update(replace(c1, aor="bob"))
    assert store.get("alice") == [] and store.by_ruid(c1.ruid) is not None
    assert store.record_count == 1


# ---- the service, with a fake DMQ API -----------------------------------------------------------


@dataclass
class Sent:
    kind: str
    body: bytes
    node: Any
    content_type: str
    future: asyncio.Future[list[Delivery]]


@dataclass
class FakeApi:
    sent: list[Sent] = field(default_factory=list)
    peer: Peer | None = None

    def register_peer(self, peer_id, description, callback, init_callback=None):
        self.peer = Peer(peer_id, description, callback, init_callback)
        return self.peer

    def _record(self, kind, body, node, content_type):
        fut = asyncio.get_running_loop().create_future()
        self.sent.append(Sent(kind, body, node, content_type, fut))
        return fut

    def bcast_message(
        self, peer, body, except_node=None, resp_cb=None, max_forwards=1, content_type="text/plain"
    ):
        return self._record("bcast", body, None, content_type)

    def send_message(
        self, peer, body, node, resp_cb=None, max_forwards=1, content_type="text/plain"
    ):
        return self._record("send", body, node, content_type)

    def answer_all(self, status: int = 200) -> None:
        for s in self.sent:
            if not s.future.done():
                s.future.set_result([Delivery(s.node or PEER, status, None)])

    def pending(self) -> int:
        return sum(not s.future.done() for s in self.sent)


PEER = build_local_node("sip:127.0.0.1:5070", lambda _h: None)


class FakeNode:
    running = True


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_service(**settings: Any) -> tuple[UsrlocService, FakeApi, Clock]:
    api = FakeApi()
    clock = Clock()
    service = UsrlocService(
        FakeNode(),
        UsrlocSettings(**settings),
        clock=clock,
        api=api,  # type: ignore[arg-type]
    )
    service.register()
    return service, api, clock


def kdmq(body: bytes, *, content_length: int | None = -1) -> Request:
    headers = [("From", "<sip:usrloc@127.0.0.1:5070>;tag=1")]
    if content_length is not None:
        headers.append(("Content-Length", str(len(body) if content_length < 0 else content_length)))
    return Request("KDMQ", "sip:usrloc@127.0.0.1:5060", headers, body)


def reply(service: UsrlocService, body: bytes, node=PEER, **kw: Any) -> tuple[int, str]:
    r = service.handle_message(kdmq(body, **kw), node)
    assert r.body == b""
    return r.code, r.reason


async def test_received_update_is_applied_and_never_replicated():
    service, api, _ = make_service()
    assert reply(service, K_UPDATE) == (200, "OK")
    assert reply(service, K_UPDATE) == (200, "OK")  # a duplicate: harmless
    assert [c.ruid for c in service.store.get("bob")] == ["uloc-6b0d7ed6-449e-1"]
    assert reply(service, K_MULTI) == (200, "OK")
    assert {r.aor for r in service.dump()} == {"bob", "alice"}
    assert reply(service, K_RM) == (200, "OK")  # RM of a contact we do not have
    # the batch's bob (same contact URI, newer) took over the first one
    (bob,) = service.store.get("bob")
    assert bob.ruid == "uloc-6b0d7ee1-45a0-1"
    stale_rm = K_UPDATE.replace(b'"action":1', b'"action":2').replace(b"449e-1", b"45a0-1")
    assert reply(service, stale_rm) == (200, "OK")  # older than what we have: skipped
    assert service.store.get("bob") == [bob]
    assert reply(service, encode_contact(Action.RM, bob)) == (200, "OK")
    assert [r.aor for r in service.dump()] == ["alice"]
    assert api.sent == []  # nothing received is ever sent on
    assert service.stats.replicated == 0


@pytest.mark.parametrize("body", BAD_BODIES.values(), ids=BAD_BODIES.keys())
async def test_bad_input_is_400_and_changes_nothing(body: bytes):
    service, api, _ = make_service()
    service.handle_message(kdmq(K_MULTI), PEER)
    before = service.dump()
    assert reply(service, body) == (400, "Bad Request")
    assert service.dump() == before
    assert api.sent == []


async def test_a_bad_batch_is_not_half_applied():
    service, _, _ = make_service()
    good = [encode_contact(Action.UPDATE, contact(f"u{i}")).decode() for i in range(3)]
    body = f'{{"multi":{{"1":{good[0]},"2":{good[1]},"3":{{"action":42}},"4":{good[2]}}}}}'
    assert reply(service, body.encode()) == (400, "Bad Request")
    assert service.dump() == []
    fixed = body.replace('{"action":42}', '{"action":0}')
    assert reply(service, fixed.encode()) == (200, "OK")
    assert sorted(r.aor for r in service.dump()) == ["u0", "u1", "u2"]


async def test_content_length_is_required():
    service, _, _ = make_service()
    assert reply(service, K_UPDATE, content_length=None) == (400, "Bad Request")
    assert reply(service, b"", content_length=0) == (400, "Bad Request")
    assert service.dump() == []


async def test_processing_failure_is_500(monkeypatch: pytest.MonkeyPatch):
    service, _, _ = make_service()

    def boom(_c: Contact) -> ApplyResult:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(service.store, "apply_update", boom)
    assert reply(service, K_UPDATE) == (500, "Server Internal Error")


async def test_local_changes_are_replicated():
    service, api, clock = make_service()
    saved = service.save("Alice@example.com", "sip:alice@10.0.0.1", expires=600, q=0.5)
    assert saved.aor == "alice"  # registrar's AoR: lower case, no domain (use_domain = 0)
    assert (saved.expires, saved.last_modified, saved.q, saved.cseq) == (NOW + 600, NOW, 500, 1)
    clock.now += 10
    again = service.save("alice", "sip:alice@10.0.0.1", expires=600)
    assert (again.ruid, again.callid, again.cseq) == (saved.ruid, saved.callid, 2)
    assert service.lookup("ALICE") == [again]
    assert service.remove("alice") == [again]
    assert [(s.kind, s.content_type) for s in api.sent] == [("bcast", "application/json")] * 3
    actions = [decode_message(s.body)[0] for s in api.sent]
    assert [m.action for m in actions] == [Action.UPDATE, Action.UPDATE, Action.RM]
    assert [m.contact for m in actions] == [saved, again, again]
    api.answer_all(404)
    await asyncio.sleep(0)
    assert service.stats.send_failures == 3


async def test_usrloc_delete_off_keeps_removals_local():
    service, api, _ = make_service(usrloc_delete=False)
    service.save("bob", "sip:bob@h")
    service.remove("bob")
    assert [decode_message(s.body)[0].action for s in api.sent] == [Action.UPDATE]


async def test_save_validates():
    service, _, _ = make_service()
    for bad in ({"expires": 0}, {"expires": -1}, {"q": 1.5}):
        with pytest.raises(ValueError):
            service.save("a", "sip:a@h", **bad)
    with pytest.raises(ValueError):
        service.save("", "sip:a@h")
    assert service.save("p", "sip:p@h", expires=None).expires == 0  # permanent


async def test_expiry_with_a_fake_clock_is_not_replicated():
    service, api, clock = make_service()
    service.save("a", "sip:a@h", expires=60)
    service.save("b", "sip:b@h", expires=None)
    api.sent.clear()
    clock.now += 59
    assert service.expire() == []
    clock.now += 1
    assert service.lookup("a") == []
    service._on_timer()  # what the expiry timer runs every timer_interval
    assert [r.aor for r in service.dump()] == ["b"]
    assert service.stats.expired == 1
    assert api.sent == []  # 5.6.3 does not replicate expiry: every node expires its own copy
    await service.stop()


async def test_init_callback_requests_a_sync():
    service, api, _ = make_service()
    service.request_sync()
    assert [(s.kind, s.body) for s in api.sent] == [("bcast", b'{"action":3}')]
    off, api_off, _ = make_service(sync=False)
    off.request_sync()
    assert api_off.sent == []


async def test_sync_answer_is_chunked_and_bounded_in_flight():
    service, api, _ = make_service(batch_msg_contacts=4, sync_in_flight=3)
    for i in range(30):
        service.store.apply_update(contact(f"user{i}"))
    service.store.apply_update(contact("gone", expires=NOW - 1))  # expired: not sent
    assert reply(service, b'{"action":3}') == (200, "OK")
    # the answer goes out in the background, never more than 3 requests unanswered
    for _ in range(20):
        await asyncio.sleep(0)
        assert api.pending() <= 3
        api.answer_all()
    await asyncio.gather(*service._tasks)
    assert all(s.kind == "send" and s.node.key == PEER.key for s in api.sent)
    got = [m.contact.aor for s in api.sent for m in decode_message(s.body) if m.contact]
    assert sorted(got) == sorted(f"user{i}" for i in range(30))
    assert len(api.sent) == 8  # ceil(30 / 4)
    assert service.stats.sync_max_in_flight == 3
    assert (service.stats.sync_messages, service.stats.sync_contacts) == (8, 30)


async def test_sync_from_an_unknown_node_is_broadcast():
    service, api, _ = make_service()
    service.store.apply_update(contact())
    assert reply(service, b'{"action":3}', node=None) == (200, "OK")
    await asyncio.sleep(0)
    api.answer_all()
    await asyncio.gather(*service._tasks)
    assert [s.kind for s in api.sent] == ["bcast"]


async def test_repeated_sync_requests_do_not_stack_up():
    service, api, _ = make_service(sync_in_flight=1)
    for i in range(3):
        service.store.apply_update(contact(f"u{i}"))
    for _ in range(2):  # requests before the answer started: its snapshot covers them
        assert reply(service, b'{"action":3}') == (200, "OK")
    await asyncio.sleep(0)
    assert len(api.sent) == 1
    for _ in range(3):  # e.g. Kamailio's at-least-once delivery of the same request
        assert reply(service, b'{"action":3}') == (200, "OK")
    while service._tasks:
        await asyncio.sleep(0)
        assert api.pending() <= 1
        api.answer_all()
    assert len(api.sent) == 6  # the answer in progress, then once more: not four times


async def test_stop_ends_a_sync_answer():
    service, api, _ = make_service(sync_in_flight=1)
    for i in range(5):
        service.store.apply_update(contact(f"u{i}"))
    reply(service, b'{"action":3}')
    await asyncio.sleep(0)
    assert len(api.sent) == 1
    await service.stop()
    assert not service._tasks
    api.answer_all()
    assert len(api.sent) == 1


async def test_attach_registers_the_channel_and_the_timer():
    node = DmqNode(make_settings(free_port()))
    service = attach(node)
    peer = node.peers.get("usrloc")
    assert peer is not None and peer.init_callback is not None
    assert service._timer is not None
    await service.stop()
    assert service._timer is None


# ---- RPC ----------------------------------------------------------------------------------------


def test_ul_dump_shape():
    service, _, clock = make_service()
    (msg,) = decode_message(K_UPDATE)
    assert msg.contact is not None
    service.store.apply_update(msg.contact)
    clock.now = 1796046551  # one second after Kamailio stored it
    methods = rpc_methods(service)
    dump = methods["ul.dump"]([])
    assert dump == {
        "Domains": [
            {
                "Domain": {
                    "Domain": "location",
                    "Size": 1024,
                    "AoRs": [
                        {
                            "Info": {
                                "AoR": "bob",
                                "HashID": 7222211,
                                "Contacts": [
                                    {
                                        "Contact": {
                                            "Address": "sip:bob@127.0.0.1:5099;transport=udp",
                                            "Expires": 3599,
                                            "Q": -1,
                                            "Call-ID": "1-17591@127.0.0.1",
                                            "CSeq": 1,
                                            "User-Agent": "sipp-test",
                                            "Received": "[not set]",
                                            "Path": "[not set]",
                                            "State": "CS_NEW",
                                            "Flags": 0,
                                            "CFlags": 0,
                                            "Socket": "[not set]",
                                            "Methods": 4294967295,
                                            "Ruid": "uloc-6b0d7ed6-449e-1",
                                            "Instance": "<urn:uuid:1234>",
                                            "Reg-Id": 1,
                                            "Server-Id": 0,
                                            "Tcpconn-Id": -1,
                                            "Keepalive": 0,
                                            "Last-Keepalive": 1796046550,
                                            "KA-Roundtrip": 0,
                                            "Last-Modified": 1796046550,
                                        }
                                    }
                                ],
                            }
                        }
                    ],
                    "Stats": {"Records": 1, "Max-Slots": 1},
                }
            }
        ]
    }
    # Kamailio's key order, as its JSON prints it
    contact_keys = list(dump["Domains"][0]["Domain"]["AoRs"][0]["Info"]["Contacts"][0]["Contact"])
    assert contact_keys[:4] == ["Address", "Expires", "Q", "Call-ID"]
    brief = methods["ul.dump"](["brief"])
    assert brief["Domains"][0]["Domain"]["AoRs"] == [{"AoR": "bob"}]


def test_ul_dump_expires_and_q_words():
    service, _, clock = make_service()
    service.store.apply_update(contact(n=1, expires=0, q=1000))
    service.store.apply_update(contact(n=2, expires=NOW + 10, q=250))
    service.store.apply_update(contact(n=3, expires=NOW - 1, q=0))
    clock.now = NOW
    (info,) = rpc_methods(service)["ul.dump"]([])["Domains"][0]["Domain"]["AoRs"]
    rows = [(c["Contact"]["Expires"], c["Contact"]["Q"]) for c in info["Info"]["Contacts"]]
    assert rows == [("permanent", 1), (10, 0.25), ("expired", 0)]
    assert isinstance(rows[0][1], int)


def test_ul_lookup():
    service, _, _ = make_service()
    service.store.apply_update(contact("alice", 1))
    service.store.apply_update(contact("alice", 2, expires=NOW - 5))
    service.store.apply_update(contact("old", 1, expires=NOW - 5))
    lookup = rpc_methods(service)["ul.lookup"]
    result = lookup(["location", "Alice@example.org"])
    assert result["AoR"] == "alice"
    assert [c["Contact"]["Address"] for c in result["Contacts"]] == ["sip:alice@10.0.0.1:5060"]
    faults = {
        "Not enough parameters (table and AOR to lookup)": ([], ["location"], ["location", 5]),
        "Domain table not found": (["nodomain", "alice"],),
        "AOR not found in location table": (["location", "nobody"],),
        "AOR has no contacts": (["location", "old"],),
    }
    for message, calls in faults.items():
        for params in calls:
            with pytest.raises(RpcFault) as info:
                lookup(list(params))
            assert (info.value.code, info.value.message) == (500, message)


def test_ul_lookup_with_use_domain():
    service, _, _ = make_service(use_domain=True)
    service.store.apply_update(contact("alice@example.org"))
    lookup = rpc_methods(service)["ul.lookup"]
    assert lookup(["location", "ALICE@example.org"])["AoR"] == "alice@example.org"
    with pytest.raises(RpcFault, match="Domain missing in AOR"):
        lookup(["location", "alice"])
