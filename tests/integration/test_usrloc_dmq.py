"""usrloc over DMQ on real sockets: pydmq nodes among themselves, and mixed with Kamailio 5.6.3.

* pydmq only: a save reaches every node, a removal too, nothing is sent on by the receivers, and
  a late joiner gets every contact through sync (``multi`` batches, bounded in flight), even
  though every node answers its sync request (duplicates are harmless);
* mixed: a REGISTER sent by sipp to Kamailio (``save("location")``) shows in pydmq's
  ``ul.dump`` with the same fields Kamailio's ``ul.dump`` shows, and Kamailio's UPDATE body
  decodes and re-encodes byte for byte; a contact saved through pydmq shows in Kamailio's
  ``ul.dump`` / ``ul.lookup`` field for field and its removal reaches Kamailio; a late-joining
  pydmq node gets Kamailio's contacts via sync; a late-joining Kamailio accepts pydmq's ``multi``
  sync answer; Kamailio logs no dmq/dmq_usrloc complaint about anything pydmq sent.

Needs the Debian packages kamailio and sip-tester (sipp); fails (never skips) without them.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from pydmq.config import UsrlocSettings, settings_from_mapping
from pydmq.consumers.usrloc import UsrlocService
from pydmq.consumers.usrloc_codec import Action, Contact, decode_message, encode_contact
from pydmq.consumers.usrloc_rpc import ul_dump
from pydmq.dmq.node import Node
from pydmq.dmq.runtime import DmqNode
from pydmq.sip.message import Request
from tests.support.cluster import Cluster as PyCluster
from tests.support.cluster import eventually, wait_joined
from tests.support.interop import (
    Cluster,
    dmq_log_problems,
    interop_cluster,  # noqa: F401 - the ``cluster`` fixture
    poll,
)
from tests.support.kamailio import KamailioNode, KamailioRpcError
from tests.support.net import free_port
from tests.support.sipp import sipp_request

pytestmark = [pytest.mark.timeout(90)]

#: Kamailio's own key order, from a captured 5.6.3 UPDATE.
KAMAILIO_KEYS = [
    "action", "aor", "ruid", "c", "received", "path", "callid", "user_agent", "instance",
    "expires", "cseq", "flags", "cflags", "q", "last_modified", "methods", "reg_id", "server_id",
]  # fmt: skip


class RecordingService(UsrlocService):
    """A service that also keeps every request it got: (From URI, body)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.got: list[tuple[str, bytes]] = []

    def handle_message(self, request: Request, node: Node | None) -> Any:
        self.got.append((str(request.from_.uri), request.body))
        return super().handle_message(request, node)


class Services:
    """pydmq nodes with a usrloc service each; :meth:`close` stops them all."""

    def __init__(self) -> None:
        self.items: list[tuple[DmqNode, UsrlocService]] = []

    def attach(self, node: DmqNode, **usrloc: Any) -> RecordingService:
        service = RecordingService(node, UsrlocSettings(**usrloc))
        service.register()
        service.start()
        self.items.append((node, service))
        return service

    async def pydmq(self, seeds: Sequence[str], **usrloc: Any) -> tuple[DmqNode, RecordingService]:
        """A started pydmq node on 127.0.0.1 (UDP) joined through ``seeds``."""
        port = free_port("both")
        settings, _ = settings_from_mapping(
            {
                "dmq": {
                    "server_address": f"sip:127.0.0.1:{port}",
                    "notification_address": list(seeds),
                    "ping_interval": 5,
                },
                "tm": {"fr_timer": 5.0},
            },
            "test",
        )
        node = DmqNode(settings)
        service = self.attach(node, **usrloc)  # before start: the join-time sync must run
        await node.start()
        return node, service

    async def close(self) -> None:
        for node, service in reversed(self.items):
            await service.stop()
            await node.stop(announce=False)


@pytest.fixture
async def services() -> AsyncIterator[Services]:
    s = Services()
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
async def py_cluster() -> AsyncIterator[PyCluster]:
    c = PyCluster()
    try:
        yield c
    finally:
        await c.close()


def by_ruid(service: UsrlocService) -> dict[str, Contact]:
    return {c.ruid: c for c in service.store.contacts()}


# ---- pydmq only ---------------------------------------------------------------------------------


async def test_pydmq_cluster_replicates_and_syncs_a_late_joiner(
    py_cluster: PyCluster, services: Services
) -> None:
    opts = {"batch_msg_contacts": 4, "sync_in_flight": 2}
    a = py_cluster.create()
    ua = services.attach(a, **opts)
    await a.start()
    nodes = [a]
    users = [ua]
    for _ in range(2):
        n = py_cluster.create(seeds=[a])
        users.append(services.attach(n, **opts))
        await n.start()
        nodes.append(n)
    await wait_joined(nodes)
    ub, uc = users[1:]

    saved = ua.save("alice", "sip:alice@192.0.2.1:5060", expires=600, q=0.7, instance="<x>")
    await eventually(
        lambda: ub.lookup("alice") == [saved] == uc.lookup("alice"), timeout=3, what="alice"
    )
    for i in range(40):
        users[i % 3].save(f"user{i}", f"sip:user{i}@192.0.2.9:{5000 + i}", expires=600)
    await eventually(
        lambda: all(len(u.store) == 41 for u in users), timeout=5, what="41 contacts everywhere"
    )
    assert by_ruid(ua) == by_ruid(ub) == by_ruid(uc)
    # what a node received it applied, and sent on to nobody: only its own saves went out
    assert [u.stats.replicated for u in users] == [15, 13, 13]
    assert all(u.stats.rejected == 0 for u in users)

    # a late joiner: every node answers its sync request (multi batches of 4, at most 2 in
    # flight per peer), so every contact arrives three times over
    # (the first joins' sync requests may have come after the first saves: count from here)
    requests_before = [u.stats.sync_requests for u in users]
    sent_before = [u.stats.sync_messages for u in users]
    d = py_cluster.create(seeds=[nodes[1]])
    ud = services.attach(d, **opts)
    await d.start()
    await eventually(lambda: len(ud.store) == 41, timeout=5, what="the late joiner's sync")
    await eventually(
        lambda: (
            [u.stats.sync_messages - n for u, n in zip(users, sent_before, strict=True)]
            == [11, 11, 11]
        ),
        timeout=5,
        what="every node's sync answer",
    )
    assert by_ruid(ud) == by_ruid(ua)
    assert [u.stats.sync_requests - n for u, n in zip(users, requests_before, strict=True)] == [
        1,
        1,
        1,
    ]
    assert all(0 < u.stats.sync_max_in_flight <= 2 for u in users)

    def multis() -> list[bytes]:
        return [body for _frm, body in ud.got if body.startswith(b'{"multi":')]

    # Counted on sending: the last answers may still be on their way to the joiner.
    await eventually(lambda: len(multis()) >= 3 * 11, timeout=5, what="every sync answer in")
    assert len(multis()) == 3 * 11
    assert ud.stats.replicated == 0 and ud.stats.rejected == 0

    # a removal reaches everyone, the late joiner included
    ua.remove("alice")
    await eventually(
        lambda: all(u.lookup("alice") == [] for u in (ub, uc, ud)), timeout=3, what="RM"
    )
    assert all("alice" not in u.store for u in (ub, uc, ud))


# ---- mixed with Kamailio 5.6.3 ------------------------------------------------------------------


def _k_contacts(k: KamailioNode) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """Kamailio's ``ul.dump``: ``{aor: (Info without Contacts, Contact of its first contact)}``."""
    result = k.rpc_result("ul.dump")
    (domain,) = result["Domains"]
    out = {}
    for entry in domain["Domain"]["AoRs"]:
        info = dict(entry["Info"])
        contacts = info.pop("Contacts")
        out[info["AoR"]] = (info, contacts[0]["Contact"])
    return out


def _py_contacts(service: UsrlocService) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    out = {}
    for entry in ul_dump(service, [])["Domains"][0]["Domain"]["AoRs"]:  # type: ignore[index]
        info = dict(entry["Info"])
        contacts = info.pop("Contacts")
        out[info["AoR"]] = (info, contacts[0]["Contact"])
    return out


def _same_contact(
    theirs: dict[str, Any], ours: dict[str, Any], *, differ: Sequence[str] = ()
) -> None:
    """Every field equal but the remaining time (within 2 s) and the ``differ`` fields."""
    assert list(theirs) == list(ours)  # same fields, same order
    assert abs(theirs["Expires"] - ours["Expires"]) <= 2
    assert abs(theirs["Last-Keepalive"] - ours["Last-Keepalive"]) <= 2
    skip = {"Expires", "Last-Keepalive", *differ}
    assert {k: v for k, v in theirs.items() if k not in skip} == {
        k: v for k, v in ours.items() if k not in skip
    }


async def _register(k: KamailioNode, workdir: Path, user: str, contact: str) -> None:
    headers = [
        ("Contact", contact),
        ("Expires", "600"),
        ("User-Agent", "sipp-pydmq-test"),
    ]
    res = await asyncio.to_thread(
        sipp_request,
        k.host,
        k.port,
        "REGISTER",
        user=user,
        headers=headers,
        expect_code=200,
        workdir=workdir,
    )
    assert res.ok, res.explain()


def _pairs(body: bytes) -> list[str]:
    return [key for key, _v in json.loads(body, object_pairs_hook=list)]


async def _until(check: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    await eventually(check, timeout=timeout, what=what, interval=0.02)


@pytest.mark.kamailio
async def test_mixed_cluster_with_kamailio(
    cluster: Cluster, services: Services, tmp_path: Path
) -> None:
    k1 = await cluster.kamailio("k1", usrloc=True)
    py, upy = await services.pydmq([k1.uri], batch_msg_contacts=5)
    await poll(
        lambda: any(
            n["port"] == str(py.local.port) and n["status"] == "active" for n in k1.list_nodes()
        ),
        timeout=10,
        what="k1 to list pydmq as active",
    )

    # -- REGISTER to Kamailio -> pydmq's ul.dump -------------------------------------------
    contact = '<sip:alice@192.0.2.10:5070;transport=udp>;+sip.instance="<urn:uuid:a1>";reg-id=1'
    await _register(k1, tmp_path / "sipp", "Alice", contact)
    await _until(lambda: upy.lookup("alice"), "Kamailio's contact in pydmq")
    k_info, k_alice = (await asyncio.to_thread(_k_contacts, k1))["alice"]
    p_info, p_alice = _py_contacts(upy)["alice"]
    assert p_info == k_info  # AoR, HashID
    _same_contact(k_alice, p_alice, differ=["Socket"])
    assert p_alice["Socket"] == "[not set]"  # Kamailio does not replicate it by default
    assert (p_alice["Instance"], p_alice["Reg-Id"], p_alice["User-Agent"]) == (
        "<urn:uuid:a1>",
        1,
        "sipp-pydmq-test",
    )
    # what Kamailio sent: its keys in its order, and pydmq writes the very same bytes
    sent = next(body for _frm, body in upy.got if b'"aor":"alice"' in body)
    assert _pairs(sent) == KAMAILIO_KEYS
    (msg,) = decode_message(sent)
    assert msg.contact is not None
    assert encode_contact(Action.UPDATE, msg.contact) == sent

    # -- a contact saved through pydmq -> Kamailio's ul.dump -------------------------------
    bob = upy.save(
        "bob",
        "sip:bob@192.0.2.7:5062;transport=tcp",
        expires=600,
        q=0.5,
        path="<sip:edge@192.0.2.1;lr>",
        received="sip:198.51.100.7:40000",
        user_agent="pydmq-test",
        instance="<urn:uuid:b0b>",
        reg_id=2,
        cflags=4,
        methods=0x1F,
    )
    k_bob = await poll(
        lambda: _k_contacts(k1).get("bob"), timeout=10, what="pydmq's contact in Kamailio"
    )
    k_info, k_contact = k_bob
    p_info, p_contact = _py_contacts(upy)["bob"]
    assert p_info == k_info
    _same_contact(k_contact, p_contact)
    assert (k_contact["Q"], k_contact["Ruid"], k_contact["Path"]) == (
        0.5,
        bob.ruid,
        "<sip:edge@192.0.2.1;lr>",
    )
    lookup = await asyncio.to_thread(k1.rpc_result, "ul.lookup", "location", "bob")
    assert lookup["AoR"] == "bob"
    assert [c["Contact"]["Address"] for c in lookup["Contacts"]] == [bob.uri]
    ours = next(m for m in k1.received("kdmq", "usrloc") if b'"aor":"bob"' in m.body)
    assert _pairs(ours.body) == KAMAILIO_KEYS
    assert (ours.content_type, ours.max_forwards) == ("application/json", "1")

    # -- removal through pydmq reaches Kamailio ---------------------------------------------
    upy.remove("bob")

    def bob_gone() -> bool:
        try:
            k1.rpc_result("ul.lookup", "location", "bob")
        except KamailioRpcError as exc:
            return bool(exc.error["message"] == "AOR not found in location table")
        return False

    await poll(bob_gone, timeout=10, what="bob removed from Kamailio")

    # -- a late-joining pydmq node gets Kamailio's contacts through sync --------------------
    _py2, u2 = await services.pydmq([k1.uri])
    await _until(lambda: u2.lookup("alice"), "alice synced to the late pydmq node")
    (alice,) = u2.lookup("alice")
    assert alice == upy.lookup("alice")[0]
    k1_from = f"sip:usrloc@127.0.0.1:{k1.port}"
    assert any(frm == k1_from and b'"aor":"alice"' in body for frm, body in u2.got)

    # -- a late-joining Kamailio takes pydmq's multi sync answer ----------------------------
    for i in range(7):
        upy.save(f"carol{i}", f"sip:carol{i}@192.0.2.20:{6000 + i}", expires=600)
    await poll(lambda: len(_k_contacts(k1)) == 8, timeout=10, what="k1 to hold alice and 7 carols")
    k2 = await cluster.kamailio("k2", usrloc=True, notification_addresses=[py.local.orig_uri])
    await poll(lambda: len(_k_contacts(k2)) == 8, timeout=15, what="k2 to hold alice and 7 carols")
    py_from = f"sip:usrloc@127.0.0.1:{py.local.port}"

    def multis_from_py() -> set[bytes]:
        # a set: a UDP retransmission is logged again
        return {
            m.body
            for m in k2.received("kdmq", "usrloc")
            if m.from_uri == py_from and m.body.startswith(b'{"multi":{"1":{"action":1,')
        }

    await poll(lambda: len(multis_from_py()) >= 2, timeout=10, what="pydmq's answer at k2")
    multis = multis_from_py()
    assert sorted(len(decode_message(b)) for b in multis) == [3, 5]  # 8 contacts by 5
    await _until(lambda: upy.stats.sync_requests >= 2, "k2's sync request at pydmq")
    assert upy.stats.send_failures == 0  # every KDMQ pydmq sent was answered 200
    assert upy.stats.rejected == 0 and u2.stats.rejected == 0
    for k in (k1, k2):
        assert dmq_log_problems(k) == [], k.name
