"""DmqNode end to end: several nodes in one event loop talking KDMQ over real UDP on 127.0.0.1.

Short timers throughout (t1 50 ms, fr_timer 0.5 s, ping every 1 s), so a dead peer is found in
about a second. Tests wait on membership events or futures, bounded by timeouts; the only polls
are for counters that no event announces.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from typing import Any

import pytest

from pydmq.dmq.api import load_api
from pydmq.dmq.node import NodeStatus, build_node
from pydmq.dmq.peer import PeerResponse
from pydmq.dmq.runtime import DmqError, DmqNode, default_route
from pydmq.sip.endpoint import IncomingRequest
from pydmq.sip.message import Request
from tests.support.cluster import (
    Cluster,
    key_of,
    node_status,
    uri_of,
    wait_for_condition,
    wait_joined,
)
from tests.support.net import build_request, free_port, tcp_request, udp_options, udp_request

pytestmark = pytest.mark.timeout(30)

NOTIF = "notification_peer"


def _remote_keys(node: DmqNode) -> set[tuple[str, str, str]]:
    return {n.key for n in node.nodes.remote()}


async def _udp(port: int, data: bytes, *, timeout: float = 2.0):  # -> SipReply
    """Send exact bytes (retransmitted) from a fresh socket in a thread; the final reply."""
    return await asyncio.to_thread(
        udp_request, "127.0.0.1", port, lambda _local: data, timeout=timeout, retransmit=0.2
    )


async def _options(port: int) -> int:
    return await asyncio.to_thread(udp_options, port, timeout=2.0)


def _notification(
    port: int, body: bytes, *, max_forwards: int = 1, content_length: bool = True
) -> bytes:
    """A raw notification KDMQ from a sender that is no node (port 9 never listens)."""
    data = build_request(
        "KDMQ",
        f"sip:{NOTIF}@127.0.0.1:{port}",
        local=("127.0.0.1", 9),
        from_uri=f"sip:{NOTIF}@127.0.0.1:9",
        headers=[("Content-Type", "text/plain")],
        body=body,
        max_forwards=max_forwards,
    )
    if not content_length:
        data = data.replace(f"Content-Length: {len(body)}\r\n".encode(), b"")
    return data


# ----------------------------------------------------------------------------------- join


async def test_two_nodes_join_and_list_each_other_active(cluster: Cluster) -> None:
    a = await cluster.start()
    b = await cluster.start(seeds=[a])
    await wait_joined([a, b])
    assert [n.key for n in a.nodes.active_remote()] == [key_of(b)]
    assert [n.key for n in b.nodes.active_remote()] == [key_of(a)]
    # the seed learned b from b's request (one "up" event), b had a from its config
    assert cluster.recorder(a).kinds(b) == ["up"]
    assert cluster.recorder(b).kinds(a) == ["up"]
    assert a.nodes.find(key_of(a)).local and not a.nodes.find(key_of(b)).local


async def test_third_node_learned_through_rebroadcast_with_mf1(cluster: Cluster) -> None:
    # No pings during the test (60 s): a can only learn c from b's re-broadcast.
    seen_mf: list[tuple[str, int | None]] = []

    def route(dmq: DmqNode, incoming: IncomingRequest) -> None:
        req = incoming.request
        if req.method == "KDMQ":
            seen_mf.append((req.body.decode(), req.max_forwards))
        default_route(dmq, incoming)

    a = await cluster.start(route=route, ping_interval=60)
    b = await cluster.start(seeds=[a], ping_interval=60)
    await wait_joined([a, b])
    sent_by_a = a.stats.snapshot()["messages_out"]
    seen_mf.clear()

    c = await cluster.start(seeds=[b], ping_interval=60)
    await cluster.recorder(a).wait_for(c, "up", timeout=2)
    await wait_joined([a, b, c])
    # a got exactly b's fan-out: MF 2 from c, decremented by b to 1, listing c
    assert len(seen_mf) == 1
    body, mf = seen_mf[0]
    assert mf == 1
    assert f"sip:127.0.0.1:{c.local.port};status=active" in body
    # and a itself sent nothing (no ping, no re-broadcast of its own: mf 0)
    assert a.stats.snapshot()["messages_out"] == sent_by_a


async def test_init_callbacks_run_once_per_node(cluster: Cluster) -> None:
    ran: dict[str, int] = {}
    events: dict[str, asyncio.Event] = {}

    def build(**kw: Any) -> DmqNode:
        node = cluster.create(**kw)
        name = uri_of(node)
        ran[name] = 0
        events[name] = asyncio.Event()

        def init() -> None:
            ran[name] += 1
            events[name].set()

        load_api(node).register_peer("sync", "test", lambda r, n: PeerResponse(200, "OK"), init)
        return node

    a = build(ping_interval=60)
    await a.start()
    assert ran[uri_of(a)] == 0  # a seed alone runs nothing until someone talks to it
    b = build(seeds=[a], ping_interval=60)
    await b.start()
    c = build(seeds=[b], ping_interval=60)
    await c.start()
    await wait_joined([a, b, c])
    for name, event in events.items():
        await asyncio.wait_for(event.wait(), 2)
        assert ran[name] == 1, name
    # more exchanges change nothing: two ping rounds everywhere (requests and 200 replies),
    # then a fourth node whose join makes c re-broadcast to a and b
    for _ in range(2):
        for node in (a, b, c):
            results = await asyncio.gather(*node.ping_now())
            assert [status for status, _ in results] == [200, 200]
    d = build(seeds=[c], ping_interval=60)
    await d.start()
    await wait_joined([a, b, c, d])
    await asyncio.wait_for(events[uri_of(d)].wait(), 2)
    await asyncio.sleep(0)  # init callbacks run in tasks: give any stray one its turn
    assert ran == dict.fromkeys(ran, 1)
    assert len(ran) == 4


# ----------------------------------------------------------------------------- membership


async def test_killed_node_goes_disabled_then_removed(cluster: Cluster) -> None:
    a = await cluster.start()
    b = await cluster.start(seeds=[a])
    await wait_joined([a, b])
    rec = cluster.recorder(a)
    mark = rec.mark()
    await b.stop(announce=False)
    await rec.wait_for(b, "disabled", timeout=3, since=mark)
    assert node_status(a, b) is NodeStatus.DISABLED
    assert a.nodes.active_remote() == []  # broadcasts stop at once
    await rec.wait_for(b, "removed", timeout=3, since=mark)
    assert rec.kinds(b, since=mark) == ["disabled", "removed"]
    assert node_status(a, b) is None
    assert len(a.nodes) == 1
    assert a.stats.snapshot()["timeouts"] >= 2


async def test_killed_node_kept_not_active_without_remove_inactive(cluster: Cluster) -> None:
    a = await cluster.start(remove_inactive=False, ping_interval=60)
    b = await cluster.start(seeds=[a], ping_interval=60)
    await wait_joined([a, b])
    rec = cluster.recorder(a)
    mark = rec.mark()
    await b.stop(announce=False)
    for _ in range(3):  # three ping rounds, each ending in a local 408
        [(status, reply)] = await asyncio.gather(*a.ping_now())
        assert (status, reply) == (408, None)
        assert node_status(a, b) is NodeStatus.NOT_ACTIVE
    assert rec.kinds(b, since=mark) == ["down"]
    assert a.stats.snapshot()["timeouts"] == 3


async def test_killed_node_with_fail_count(cluster: Cluster) -> None:
    a = await cluster.start(
        fail_count_enabled=True,
        fail_count_threshold_not_active=0,
        fail_count_threshold_disabled=1,
    )
    b = await cluster.start(seeds=[a])
    await wait_joined([a, b])
    rec = cluster.recorder(a)
    mark = rec.mark()
    await b.stop(announce=False)
    await rec.wait_for(b, "down", timeout=3, since=mark)
    assert a.nodes.find(key_of(b)).fail_count == 1
    await rec.wait_for(b, "disabled", timeout=3, since=mark)
    assert a.nodes.find(key_of(b)).fail_count == 2
    await rec.wait_for(b, "removed", timeout=3, since=mark)
    assert rec.kinds(b, since=mark) == ["down", "disabled", "removed"]
    assert node_status(a, b) is None


async def test_notification_address_node_is_never_removed(cluster: Cluster) -> None:
    a = await cluster.start()
    b = await cluster.start(seeds=[a])
    await wait_joined([a, b])
    rec = cluster.recorder(b)
    mark = rec.mark()
    await a.stop(announce=False)
    await rec.wait_for(a, "down", timeout=3, since=mark)  # by b's own ping timer
    for _ in range(2):
        results = await asyncio.gather(*b.ping_now())
        assert [s for s, _ in results] == [408]
        assert node_status(b, a) is NodeStatus.NOT_ACTIVE
    assert rec.kinds(a, since=mark) == ["down"]


async def test_graceful_stop_announces_disabled(cluster: Cluster) -> None:
    a = await cluster.start()
    b = await cluster.start(seeds=[a])
    c = await cluster.start(seeds=[a])
    await wait_joined([a, b, c])
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await b.stop()
    stop_took = loop.time() - t0
    for peer in (a, c):
        await cluster.recorder(peer).wait_for(b, "disabled", timeout=1)
    seen_within = loop.time() - t0
    assert stop_took < 1.0  # every peer answered the announcement
    assert seen_within < 1.0
    assert b.nodes.local.status is NodeStatus.DISABLED
    assert not b.running
    # 6.1: the next ping to a node that was disabled at send time deletes it
    await cluster.recorder(a).wait_for(b, "removed", timeout=3)
    with pytest.raises(DmqError):  # a stopped node sends nothing
        load_api(b).send_message("x", b"", a.local)
    await b.stop()  # idempotent


async def test_stopped_node_cannot_restart(cluster: Cluster) -> None:
    a = await cluster.start()
    with pytest.raises(RuntimeError):
        await a.start()
    await a.stop(announce=False)
    with pytest.raises(RuntimeError):
        await a.start()


# ------------------------------------------------------------------------- access control


async def test_allowed_sources_refuses_with_403(cluster: Cluster) -> None:
    ran: list[Request] = []
    a = cluster.create(allowed_sources=["10.0.0.0/8"])
    load_api(a).register_peer("chan", "test", lambda r, n: ran.append(r) or PeerResponse(200, "OK"))
    await a.start()
    b = await cluster.start(seeds=[a])  # tries to join, gets 403
    api_b = load_api(b)
    [delivery] = await api_b.send_message("chan", b"hello", b.nodes.find(key_of(a)))
    assert delivery.status == 403
    assert delivery.response is not None and delivery.response.reason == "Forbidden"
    assert ran == []
    assert [n.key for n in a.nodes] == [key_of(a)]  # nothing learned
    assert cluster.recorder(a).events == []
    snap = a.stats.snapshot()
    assert snap["rejected"]["403"] == 2  # b's join request and the channel message
    assert snap["messages_in"] == {}
    # b ignores the 403 (spec 2.7: any other code): a stays active in its list, no init
    assert node_status(b, a) is NodeStatus.ACTIVE
    assert await _options(a.local.port) == 403  # every method from outside is refused


# ------------------------------------------------------------------------ bad input


GARBAGE = b"".join(
    [
        b"garbage\r\n",
        b"sip:\r\n",
        b"\x00\xff\xfe binary\r\n",
        b"sip:127.0.0.1:1;status=bogus\r\n",  # unknown status word
        b"sip:127.0.0.1:2;status=ACTIVE\r\n",  # status words are case-sensitive
        b"sip:127.0.0.1:3;transport=carrier-pigeon\r\n",
        b"\r\n",
        b"sip:127.0.0.1:4;status=active\r\n",  # the one good line
        b"sip:[::1\r\n",
    ]
)


@pytest.mark.parametrize(
    ("body", "added"),
    [
        pytest.param(GARBAGE, {"4": "active"}, id="garbage-lines"),
        # 5.6.3 status words are understood: both mean not_active in 6.1
        pytest.param(
            b"sip:127.0.0.1:5;status=pending\r\nsip:127.0.0.1:6;status=timeout\r\n",
            {"5": "not_active", "6": "not_active"},
            id="5.6.3-status-words",
        ),
        pytest.param(b"x\r\n" * 10_000, {}, id="10000-lines"),
        pytest.param(
            b"sip:127.0.0.1:6;status=active\r\n" + b"y\r\n" * 9_999,
            {"6": "active"},
            id="10000-lines-1-good",
        ),
        pytest.param(b"z" * 60_000, {}, id="60KB-one-line"),
        pytest.param(b"", {}, id="empty"),
    ],
)
async def test_bad_notification_bodies(
    cluster: Cluster, body: bytes, added: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    a = await cluster.start(ping_interval=60)
    port = a.local.port
    with caplog.at_level(logging.WARNING, logger="pydmq"):
        reply = await _udp(port, _notification(port, body))
    assert reply.code == 200
    assert f"sip:127.0.0.1:{port};status=active".encode() in reply.body
    assert {n.port_str: n.status.value for n in a.nodes.remote()} == added
    if body.strip(b"\r\n") and len(added) != body.count(b"\n"):
        assert "bad line" in caplog.text  # reported, not silently dropped
    assert await _options(port) == 200
    assert a.stats.snapshot()["replies_sent"] == {"200": 1}


async def test_notification_without_content_length(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    a = await cluster.start(ping_interval=60)
    port = a.local.port
    data = _notification(port, b"sip:127.0.0.1:7;status=active\r\n", content_length=False)
    assert b"Content-Length" not in data
    with caplog.at_level(logging.WARNING, logger="pydmq"):
        reply = await _udp(port, data)
    # Kamailio's behaviour: the list is left alone but the request is still answered with it
    assert reply.code == 200
    assert reply.body == f"sip:127.0.0.1:{port};status=active\r\n".encode()
    assert len(a.nodes) == 1
    assert "without Content-Length" in caplog.text
    assert await _options(port) == 200


async def test_channel_kdmq_without_content_length_reaches_callback(cluster: Cluster) -> None:
    got: list[tuple[bytes, int | None]] = []

    def cb(req: Request, node: object) -> PeerResponse:
        got.append((req.body, req.content_length))
        return PeerResponse(200, "OK")

    a = cluster.create(ping_interval=60)
    load_api(a).register_peer("chan", "test", cb)
    await a.start()
    port = a.local.port
    data = build_request(
        "KDMQ", f"sip:chan@127.0.0.1:{port}", local=("127.0.0.1", 9), body=b"payload"
    ).replace(b"Content-Length: 7\r\n", b"")
    reply = await _udp(port, data)
    assert reply.code == 200
    assert got == [(b"payload", None)]  # UDP: the body is the rest of the datagram


async def test_oversize_datagram_is_dropped_and_counted(cluster: Cluster) -> None:
    a = await cluster.start(ping_interval=60, sip={"max_message_size": 16384})
    port = a.local.port
    big = _notification(port, b"sip:127.0.0.1:8;status=active\r\n" + b"w" * 40_000)
    assert 16384 < len(big) < 65507
    await asyncio.to_thread(_send_datagram, port, big)
    # Loopback UDP keeps order: once the OPTIONS is answered the big datagram was handled.
    assert await _options(port) == 200
    snap = a.stats.snapshot()
    assert snap["parse_errors_dropped"] == 1
    assert snap["messages_in"] == {}
    assert len(a.nodes) == 1


def _send_datagram(port: int, data: bytes) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(data, ("127.0.0.1", port))


async def test_one_megabyte_over_tcp_closes_the_connection(cluster: Cluster) -> None:
    a = await cluster.start(ping_interval=60, transport="tcp")
    assert a.local.proto == "tcp"
    port = a.local.port
    body = b"sip:127.0.0.1:9;status=active\r\n" + b"v" * (1024 * 1024)
    data = build_request(
        "KDMQ",
        f"sip:{NOTIF}@127.0.0.1:{port};transport=tcp",
        local=("127.0.0.1", 9),
        transport="TCP",
        body=body,
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    received = b""
    try:
        writer.write(data)
        try:
            await asyncio.wait_for(writer.drain(), 3)
            received = await asyncio.wait_for(reader.read(), 3)  # until the node closes
        except ConnectionError:
            pass  # reset: the node closed with our bytes unread
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    assert not received.startswith(b"SIP/2.0")  # no reply, just a closed connection
    assert len(a.nodes) == 1
    assert a.stats.snapshot()["parse_errors_dropped"] >= 1
    reply = await asyncio.to_thread(
        tcp_request,
        "127.0.0.1",
        port,
        lambda local: build_request(
            "OPTIONS", f"sip:127.0.0.1:{port};transport=tcp", local=local, transport="TCP"
        ),
        timeout=2.0,
    )
    assert reply.code == 200


async def test_unparsable_datagrams_leave_the_node_working(cluster: Cluster) -> None:
    a = await cluster.start(ping_interval=60)
    port = a.local.port
    for junk in (b"\x00" * 100, b"KDMQ\r\n\r\n", b"SIP/2.0 200 OK\r\n\r\n", b"\xff" * 3000):
        await asyncio.to_thread(_send_datagram, port, junk)
    assert await _options(port) == 200
    assert len(a.nodes) == 1


async def test_kdmq_with_bad_ruri_is_answered_400(cluster: Cluster) -> None:
    a = await cluster.start(ping_interval=60)
    port = a.local.port
    reply = await _udp(
        port, build_request("KDMQ", f"sip:127.0.0.1:{port}", local=("127.0.0.1", 9), body=b"x")
    )
    assert reply.code == 400  # no channel in the R-URI (Kamailio: no reply, -1)
    assert len(a.nodes) == 1


# --------------------------------------------------------------------------- stats


async def test_stats_snapshot(cluster: Cluster) -> None:
    a = cluster.create(num_workers=3)
    b = cluster.create(seeds=[a])
    for node in (a, b):
        load_api(node).register_peer("chan", "test", lambda r, n: PeerResponse(200, "OK"))
    await a.start()
    await b.start()
    await wait_joined([a, b])
    api_b = load_api(b)
    base_b = b.stats.snapshot()
    base_a = a.stats.snapshot()
    for _ in range(3):
        await api_b.bcast_message("chan", b"x")
    dead = build_node(f"sip:127.0.0.1:{free_port('udp')}")
    [d] = await api_b.send_message("chan", b"x", dead, resp_cb=lambda *args: None)
    assert d.status == 408
    snap_a, snap_b = a.stats.snapshot(), b.stats.snapshot()
    assert snap_a["messages_in"]["chan"] == 3
    assert snap_b["messages_out"]["chan"] == 4
    assert snap_b["timeouts"] - base_b["timeouts"] == 1
    assert snap_b["replies_received"]["200"] - base_b["replies_received"].get("200", 0) == 3
    assert snap_b["replies_received"]["408"] == 1
    assert snap_a["replies_sent"]["200"] - base_a["replies_sent"].get("200", 0) == 3
    assert snap_b["retransmissions"] > 0  # the dead node's request was resent every t1..t2
    assert snap_a["queue_depth"] == {"total": 0, "per_worker": [0, 0, 0]}
    assert snap_a["rejected"] == {"403": 0, "503": 0}
    json.dumps(snap_a)  # monitoring can ship it as is


async def test_lone_seed_warns_once(cluster: Cluster, caplog: pytest.LogCaptureFixture) -> None:
    a = await cluster.start(ping_interval=60)
    with caplog.at_level(logging.DEBUG, logger="pydmq"):
        for _ in range(3):
            assert a.ping_now() == []
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "only ourselves" in warnings[0].getMessage()


async def test_rejoin_after_losing_every_peer(cluster: Cluster) -> None:
    """Spec 2.8: alone again, a node re-adds its seeds and asks them for the list again."""
    a = await cluster.start()
    b = await cluster.start(seeds=[a], ping_interval=60)
    await wait_joined([a, b])
    b.nodes.remove(key_of(a))  # as if dmq.remove had been used
    assert len(b.nodes) == 1
    [(status, _)] = await asyncio.gather(*b.ping_now())
    assert status == 200
    await wait_for_condition(
        [b], lambda: node_status(b, a) is NodeStatus.ACTIVE, timeout=2, what="rejoin"
    )
    assert _remote_keys(b) == {key_of(a)}


async def test_stop_during_start_waits_for_it(cluster: Cluster) -> None:
    a = cluster.create()
    starting = asyncio.create_task(a.start())
    await asyncio.sleep(0)  # start() is now inside, binding its socket
    await a.stop(announce=False)
    await starting
    assert not a.running
    with pytest.raises(RuntimeError):
        await a.start()


async def test_failed_start_releases_the_port(cluster: Cluster) -> None:
    a = await cluster.start(ping_interval=60)
    clash = cluster.create(port=a.local.port)  # same UDP port: bind fails
    with pytest.raises(OSError):
        await clash.start()
    assert not clash.running
    await clash.stop()  # harmless
    assert await _options(a.local.port) == 200
