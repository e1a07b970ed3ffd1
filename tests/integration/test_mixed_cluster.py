"""DMQ core acceptance, mixed cluster: pydmq nodes and real Kamailio 5.6.3 nodes in one bus.

* pydmq joins a Kamailio seed, a second Kamailio joins through the pydmq node; every node lists
  every other one ``active`` (Kamailio: RPC ``dmq.list_nodes``; pydmq: its node list);
* custom-channel messages pass both ways (pydmq's broadcast reaches the Kamailio script's ``lab``
  channel; the script's ``dmq_bcast_message`` / ``dmq_send_message`` reach a pydmq channel);
* Kamailio logs no DMQ error caused by anything pydmq sent;
* failure detection both ways: a pydmq node that vanishes without a word goes ``disabled`` and
  is then removed on Kamailio (5.6.3 has no ``not_active``); a killed Kamailio goes
  ``disabled`` and then is removed on pydmq;
* a graceful pydmq stop announces ``status=disabled``, which Kamailio 5.6.3 applies.

Kamailio runs with ``ping_interval`` 5 (its minimum) and tm ``fr_timer`` 2 s so that a dead node
is noticed within seconds instead of the default 30 s per step.

Needs the Debian packages kamailio and kamailio-tls-modules; fails (never skips) without them.
"""

from __future__ import annotations

import asyncio

import pytest

from pydmq.config import RpcSettings
from pydmq.dmq.node import NodeStatus
from pydmq.dmq.runtime import kdmq_uri
from pydmq.rpc.client import call as rpc_call
from pydmq.rpc.server import start_rpc
from tests.support.interop import (
    SCRIPT_SEND_ROUTE,
    Cluster,
    PyNode,
    dmq_log_problems,
    interop_cluster,  # noqa: F401 - the ``cluster`` fixture
    poll,
    stop_silently,
)
from tests.support.kamailio import KamailioNode
from tests.support.net import build_request, udp_request

pytestmark = [pytest.mark.kamailio, pytest.mark.timeout(90)]

#: Kamailio notices a dead peer after fr_timer instead of the default 30 s.
SHORT_FR_TIMER = 'modparam("tm", "fr_timer", 2000)'
PING = 5  # Kamailio's minimum ping_interval


def _statuses(k: KamailioNode) -> dict[str, str]:
    """``{"host:port": status}`` of Kamailio's non-local nodes."""
    return {f"{n['host']}:{n['port']}": n["status"] for n in k.list_nodes() if not n["local"]}


async def _k_sees(k: KamailioNode, expected: dict[str, str], timeout: float = 10.0) -> None:
    """Wait until Kamailio's non-local nodes are exactly ``expected`` (host:port -> status)."""
    await poll(
        lambda: _statuses(k) == expected,
        timeout=timeout,
        what=f"{k.name}'s dmq.list_nodes to be {expected}",
        describe=lambda: repr(k.list_nodes()),
    )


def _py_statuses(py: PyNode) -> dict[str, str]:
    return {
        f"{n['host']}:{n['port']}": str(n["status"])
        for n in py.node.nodes.rpc_list_nodes()
        if not n["local"]
    }


async def _py_sees(py: PyNode, expected: dict[str, str], timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while _py_statuses(py) != expected:
        if loop.time() >= deadline:
            raise AssertionError(f"pydmq {py.uri} lists {_py_statuses(py)}, wanted {expected}")
        await asyncio.sleep(0.05)


async def _script(k: KamailioNode, user: str, headers: list[tuple[str, str]], body: str) -> str:
    """MESSAGE to the script's ``dmqsend``/``dmqbcast`` trigger; returns the reply reason."""
    uri = f"sip:{user}@{k.host}:{k.port}"

    def build(local: tuple[str, int]) -> bytes:
        hdrs = [*headers, ("Content-Type", "text/plain")]
        return build_request("MESSAGE", uri, local=local, headers=hdrs, body=body)

    reply = await asyncio.to_thread(udp_request, k.host, k.port, build, timeout=5.0)
    assert reply.code == 200, reply
    return reply.reason


async def test_mixed_cluster_membership_and_custom_channels(cluster: Cluster) -> None:
    k1 = await cluster.kamailio(
        "k1", custom_channels=["lab"], extra_route=SCRIPT_SEND_ROUTE, ping_interval=PING
    )
    # pydmq joins the Kamailio seed ...
    py = await cluster.pydmq(notification_address=[k1.uri], ping_interval=PING)
    app = py.listen("pyapp")
    await _k_sees(k1, {f"127.0.0.1:{py.port}": "active"})
    # ... and a second Kamailio joins the bus through the pydmq node
    k2 = await cluster.kamailio(
        "k2",
        notification_addresses=[py.uri],
        custom_channels=["lab", "pyapp"],
        extra_route=SCRIPT_SEND_ROUTE,
        ping_interval=PING,
    )
    k1_at, k2_at, py_at = (f"127.0.0.1:{n.port}" for n in (k1, k2, py))
    await _k_sees(k2, {py_at: "active", k1_at: "active"})  # k1 learnt from pydmq's 200 body
    await _k_sees(k1, {py_at: "active", k2_at: "active"})  # k2 learnt from pydmq's re-broadcast
    await _py_sees(py, {k1_at: "active", k2_at: "active"})
    for k in (k1, k2):
        local = [n for n in await asyncio.to_thread(k.list_nodes) if n["local"]]
        assert [(n["port"], n["status"]) for n in local] == [(str(k.port), "active")]

    # -- pydmq -> Kamailio: broadcast on the script-handled channel "lab" -------------------
    deliveries = await py.api.bcast_message("lab", "from pydmq\r\n")
    assert sorted((d.node.port, d.status) for d in deliveries) == sorted(
        [(k1.port, 200), (k2.port, 200)]
    )
    for k in (k1, k2):
        (msg,) = await asyncio.to_thread(k.wait_custom_message, "lab")
        assert msg.body == b"from pydmq\r\n"
        assert msg.from_uri == kdmq_uri("lab", py.node.local)
        assert (msg.max_forwards, msg.content_type, msg.proto) == ("1", "text/plain", "udp")

    # -- Kamailio -> pydmq: dmq_bcast_message from k1's script ---------------------------
    assert await _script(k1, "dmqbcast", [("X-Channel", "pyapp")], "bcast from k1\r\n") == "rc 1"
    got = await asyncio.wait_for(app.get(), 10)
    assert got.body == b"bcast from k1\r\n"
    assert (got.max_forwards, got.content_type) == (1, "text/plain")
    sender = py.node.sender_node(got)
    assert sender is not None and (sender.host, sender.port) == ("127.0.0.1", k1.port)
    # k2 got the same broadcast (its script answers "pyapp" itself)
    (k2_copy,) = await asyncio.to_thread(k2.wait_custom_message, "pyapp")
    assert k2_copy.body == b"bcast from k1\r\n"

    # -- Kamailio -> pydmq: dmq_send_message from k2's script to the pydmq node -----------
    headers = [("X-Channel", "pyapp"), ("X-Node", py.uri)]
    assert await _script(k2, "dmqsend", headers, "unicast from k2\r\n") == "rc 1"
    got = await asyncio.wait_for(app.get(), 10)
    assert got.body == b"unicast from k2\r\n"
    sender = py.node.sender_node(got)
    assert sender is not None and (sender.host, sender.port) == ("127.0.0.1", k2.port)

    # pydmq's empty-bodied 200s to script sends leave the lists alone, and nobody complained.
    await _k_sees(k1, {py_at: "active", k2_at: "active"})
    await _k_sees(k2, {py_at: "active", k1_at: "active"})
    assert app.empty()
    for k in (k1, k2):
        assert dmq_log_problems(k) == [], k.name


async def test_killed_pydmq_is_disabled_then_removed_by_kamailio(cluster: Cluster) -> None:
    k = await cluster.kamailio("k", ping_interval=PING, extra_modules=SHORT_FR_TIMER)
    py = await cluster.pydmq(notification_address=[k.uri], ping_interval=PING)
    py_at = f"127.0.0.1:{py.port}"
    await _k_sees(k, {py_at: "active"})

    await stop_silently(py.node)  # no status=disabled announcement: like a crash
    loop = asyncio.get_running_loop()
    killed = loop.time()
    # first unanswered ping (within PING s) + fr_timer (2 s) -> disabled
    await _k_sees(k, {py_at: "disabled"}, timeout=PING + 2 + 5)
    disabled = loop.time()
    # the next unanswered ping to the disabled node removes it
    await _k_sees(k, {}, timeout=PING + 2 + 5)
    removed = loop.time()
    assert removed - disabled > 1.5, "removal needs a second ping timeout"
    assert removed - killed < 2 * (PING + 2) + 4
    # nothing pydmq said before it died upset Kamailio's notification parser
    assert dmq_log_problems(k) == []


@pytest.mark.parametrize("transport", ["udp", "tcp", "tls"])
async def test_killed_kamailio_is_disabled_then_removed_by_pydmq(
    cluster: Cluster, transport: str
) -> None:
    py = await cluster.pydmq(transport=transport, ping_interval=1, fr_timer=1.0)
    k = await cluster.kamailio(
        f"k-{transport}", dmq_transport=transport, notification_addresses=[py.uri]
    )
    k_at = f"127.0.0.1:{k.sip_port}"
    await _py_sees(py, {k_at: "active"})
    k_node = py.api.find_node(k.uri)
    assert k_node is not None

    await asyncio.to_thread(k.kill)  # SIGKILL: no shutdown code runs
    down = await py.wait_event(
        lambda e: e.node_uri == k_node.orig_uri and e.kind != "up", timeout=10, what="down"
    )
    assert down.old_status is NodeStatus.ACTIVE
    assert down.new_status in (NodeStatus.NOT_ACTIVE, NodeStatus.DISABLED)
    gone = await py.wait_event(
        lambda e: e.node_uri == k_node.orig_uri and e.new_status is not NodeStatus.NOT_ACTIVE,
        timeout=10,
        what="removed",
    )
    if gone.new_status is NodeStatus.DISABLED:  # not_active -> disabled -> removed
        gone = await py.wait_event(
            lambda e: e.node_uri == k_node.orig_uri, timeout=10, what="removed"
        )
    assert (gone.kind, gone.new_status) == ("removed", None)
    assert _py_statuses(py) == {}


async def test_graceful_pydmq_stop_is_announced_and_kamailio_disables_it(
    cluster: Cluster,
) -> None:
    k = await cluster.kamailio("k", ping_interval=PING)
    py = await cluster.pydmq(notification_address=[k.uri], ping_interval=PING)
    py_at = f"127.0.0.1:{py.port}"
    await _k_sees(k, {py_at: "active"})

    await py.node.stop()  # announces status=disabled and waits for the replies
    # the announcement, not a ping timeout (that would take > fr_timer = 30 s here)
    await _k_sees(k, {py_at: "disabled"}, timeout=3)
    announcements = [
        m
        for m in k.received("kdmq", "notification_peer")
        if f"sip:127.0.0.1:{py.port};status=disabled\r\n".encode() in m.body
    ]
    assert announcements, k.received("kdmq", "notification_peer")
    announcement = announcements[-1]  # UDP retransmissions are logged again
    assert announcement.max_forwards == "1"
    assert announcement.from_uri == f"sip:notification_peer@{py_at}"
    assert announcement.body.endswith(b"\r\n") and b"\r\n\r\n" not in announcement.body
    assert dmq_log_problems(k) == []


async def test_list_nodes_over_rpc_agrees_with_kamailio(cluster: Cluster) -> None:
    """``dmq.list_nodes`` asked over JSON-RPC of a Kamailio node and of a pydmq node in one
    cluster: the same nodes, the same statuses, Kamailio's fields in Kamailio's order (pydmq
    adds 6.1's ``fail_count`` at the end)."""
    k1 = await cluster.kamailio("k1", ping_interval=PING)
    py = await cluster.pydmq(notification_address=[k1.uri], ping_interval=PING)
    await _k_sees(k1, {f"127.0.0.1:{py.port}": "active"})
    servers = await start_rpc(py.node, RpcSettings(http_address="127.0.0.1:0"))
    try:
        assert servers.http is not None
        host, port = servers.http.address[:2]
        ours = await asyncio.to_thread(rpc_call, "dmq.list_nodes", [], http=f"{host}:{port}")
    finally:
        await servers.close()
    theirs = await asyncio.to_thread(k1.list_nodes)
    assert isinstance(ours, list)

    def view(rows: list[dict[str, object]]) -> set[tuple[object, ...]]:
        return {(r["host"], r["port"], r["proto"], r["resolved_ip"], r["status"]) for r in rows}

    assert view(ours) == view(theirs)
    k_keys = list(theirs[0])
    for row in ours:
        assert list(row)[: len(k_keys)] == k_keys
        assert list(row)[len(k_keys) :] == ["fail_count"]
