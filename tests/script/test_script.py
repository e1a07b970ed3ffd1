"""Routing scripts: ``Msg``, every dmq_* script function with each return value, the loader and
the route adapter, ``pydmq run --script`` and ``pydmq send`` / ``pydmq bcast``.

In-process nodes on 127.0.0.1 talk over real UDP. Requests come from raw sockets bound either to
127.0.0.2 (a SIP client that is no DMQ node) or to 127.0.0.1 (the nodes' IP, so the source counts
as "from a node"). Timers are short (t1 50 ms, fr_timer 0.5 s). Waiting is on replies, futures
and membership events; "nothing else arrived" is checked by sending a marker request afterwards
and asserting that its reply is the next datagram.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from pydmq import cli
from pydmq.dmq.api import load_api
from pydmq.dmq.node import NodeStatus, build_node
from pydmq.dmq.nodelist import RpcFault
from pydmq.dmq.peer import PeerResponse
from pydmq.dmq.runtime import DmqNode
from pydmq.rpc import client as rpc_client
from pydmq.rpc.methods import build_methods
from pydmq.script import (
    Msg,
    ScriptError,
    ScriptRoute,
    bcast_message,
    default_request_route,
    dmq_is_from_node,
    dmq_t_replicate,
    load_route,
    load_script,
    send_message,
)
from pydmq.sip.message import Request, make_response, parse_message
from pydmq.sip.transport import Address
from tests.support.cluster import Cluster, EventRecorder, eventually, uri_of, wait_joined
from tests.support.net import SipReply, build_request, free_port, parse_reply

pytestmark = pytest.mark.timeout(30)

CLIENT_IP = "127.0.0.2"  # a SIP client, not a DMQ node
NODE_IP = "127.0.0.1"  # where the in-process nodes live


# ---------------------------------------------------------------------------------------------
# helpers


class UdpPeer(asyncio.DatagramProtocol):
    """A raw UDP socket in the test loop: sends bytes, queues what it receives."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue()
        self.transport: asyncio.DatagramTransport | None = None

    @classmethod
    async def open(cls, ip: str = CLIENT_IP, port: int = 0) -> UdpPeer:
        loop = asyncio.get_running_loop()
        _transport, peer = await loop.create_datagram_endpoint(cls, local_addr=(ip, port))
        return peer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a DatagramTransport in fact

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.queue.put_nowait((data, addr))

    @property
    def local(self) -> tuple[str, int]:
        assert self.transport is not None
        host, port = self.transport.get_extra_info("sockname")[:2]
        return host, port

    @property
    def uri(self) -> str:
        return f"sip:{self.local[0]}:{self.local[1]}"

    def send(self, data: bytes, port: int, host: str = NODE_IP) -> None:
        assert self.transport is not None
        self.transport.sendto(data, (host, port))

    async def recv(self, timeout: float = 2.0) -> bytes:
        data, _addr = await asyncio.wait_for(self.queue.get(), timeout)
        return data

    async def reply(self, timeout: float = 2.0) -> SipReply:
        """The next final reply (provisional ones are skipped)."""
        while True:
            reply = parse_reply(await self.recv(timeout))
            if reply.code >= 200:
                return reply

    async def request(self, timeout: float = 2.0) -> Request:
        msg = parse_message(await self.recv(timeout))
        assert isinstance(msg, Request), msg
        return msg

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


@pytest.fixture
async def peers() -> AsyncIterator[Callable[..., Any]]:
    """``await peers(ip)`` opens a :class:`UdpPeer`; all are closed at teardown."""
    opened: list[UdpPeer] = []

    async def make(ip: str = CLIENT_IP) -> UdpPeer:
        peer = await UdpPeer.open(ip)
        opened.append(peer)
        return peer

    try:
        yield make
    finally:
        for peer in opened:
            peer.close()


def request_to(
    node: DmqNode,
    client: UdpPeer,
    method: str,
    *,
    user: str | None = None,
    headers: list[tuple[str, str]] | None = None,
    body: bytes | str = b"",
    max_forwards: int | None = 70,
) -> bytes:
    port = node.local.port
    ruri = f"sip:{user}@{NODE_IP}:{port}" if user else f"sip:{NODE_IP}:{port}"
    return build_request(
        method,
        ruri,
        local=client.local,
        headers=headers or [],
        body=body,
        max_forwards=max_forwards,
    )


async def ask(
    node: DmqNode, client: UdpPeer, method: str, **kwargs: Any
) -> SipReply:  # one request, its final reply
    client.send(request_to(node, client, method, **kwargs), node.local.port)
    return await client.reply()


async def nothing_more(node: DmqNode, client: UdpPeer) -> None:
    """Everything sent to ``client`` before now has arrived once an OPTIONS reply arrives after
    it: assert that reply is the next datagram (so nothing else was sent in between)."""
    client.send(request_to(node, client, "OPTIONS", headers=[("X-Marker", "1")]), node.local.port)
    reply = parse_reply(await client.recv())
    assert (reply.code, reply.header("CSeq")) == (200, "1 OPTIONS"), reply


def dmq_basics(msg: Msg) -> bool:
    """What every route here starts with: KDMQ -> dmq_handle_message (membership needs it),
    OPTIONS -> 200. True when the request was taken care of."""
    if msg.method == "KDMQ":
        msg.dmq_handle_message()
        return True
    if msg.method == "OPTIONS":
        msg.reply(200, "OK")
        return True
    return False


# ---------------------------------------------------------------------------------------------
# Msg


async def test_msg_exposes_the_request_and_replies(cluster: Cluster, peers: Any) -> None:
    seen: list[dict[str, Any]] = []

    def route(msg: Msg) -> None:
        if dmq_basics(msg):
            return
        h = msg.headers
        seen.append(
            {
                "method": msg.method,
                "is_method": (msg.is_method("MESSAGE", "KDMQ"), msg.is_method("KDMQ")),
                "ruri": msg.ruri,
                "ruri_user": msg.ruri_parsed.user,
                "ruser": msg.ruser,
                "x": (h.get("X-Test"), h.get_all("x-test"), h["X-TEST"], "X-Test" in h),
                "absent": (h.get("X-None"), h.get("X-None", "dflt"), h.get_all("X-None")),
                "absent_in": "X-None" in h,
                "via": h.get("v"),  # compact form
                "n_headers": len(h) == len(list(h)),
                "body": msg.body,
                "ctype": h.get("Content-Type"),
                "source": (msg.source_ip, msg.source_port, msg.transport),
                "local": msg.local.port,
                "call_id": msg.call_id,
                "before": (msg.replied, msg.dropped, msg.handled),
            }
        )
        assert msg.reply(299, "Script Says Hi", "text body", headers=[("X-Reply", "yes")])
        seen[-1]["after"] = (msg.replied, msg.dropped, msg.handled)
        seen[-1]["again"] = msg.reply(200, "Second")  # ignored: already answered

    a = await cluster.start(route=ScriptRoute(route))
    client = await peers()
    reply = await ask(
        a,
        client,
        "MESSAGE",
        user="alice",
        headers=[("X-Test", "one"), ("X-Test", "two, three"), ("Content-Type", "text/x-in")],
        body=b"hello \x00 body",
    )
    assert (reply.code, reply.reason) == (299, "Script Says Hi")
    assert reply.header("X-Reply") == "yes"
    assert reply.header("Content-Type") == "text/plain"
    assert reply.body == b"text body"
    (s,) = seen
    assert s["method"] == "MESSAGE"
    assert s["is_method"] == (True, False)
    assert s["ruri"] == f"sip:alice@{NODE_IP}:{a.local.port}"
    assert s["ruri_user"] == s["ruser"] == "alice"
    assert s["x"] == ("one", ["one", "two, three"], "one", True)
    assert s["absent"] == (None, "dflt", [])
    assert s["absent_in"] is False
    assert s["via"].startswith(f"SIP/2.0/UDP {CLIENT_IP}:{client.local[1]};branch=z9hG4bK")
    assert s["n_headers"] is True
    assert s["body"] == b"hello \x00 body"
    assert s["ctype"] == "text/x-in"
    assert s["source"] == (CLIENT_IP, client.local[1], "udp")
    assert s["local"] == a.local.port
    assert s["call_id"].endswith("@" + CLIENT_IP)
    assert s["before"] == (False, False, False)
    assert s["after"] == (True, False, True)
    assert s["again"] is False
    await nothing_more(a, client)  # the second reply never went out


async def test_msg_ruser_of_a_uri_without_user_and_bad_reply_codes(
    cluster: Cluster, peers: Any
) -> None:
    seen: list[Any] = []

    def route(msg: Msg) -> None:
        if dmq_basics(msg):
            return
        seen.append(msg.ruser)
        with pytest.raises(ValueError):
            msg.reply(700, "Too Big")
        with pytest.raises(ValueError):
            msg.reply(200, "Bad\r\nReason")
        msg.reply(200, "Fine")

    a = await cluster.start(route=ScriptRoute(route))
    client = await peers()
    reply = await ask(a, client, "MESSAGE")
    assert (reply.code, reply.reason) == (200, "Fine")
    assert seen == [None]


async def test_drop_sends_nothing(cluster: Cluster, peers: Any) -> None:
    after_drop: list[bool] = []

    def route(msg: Msg) -> None:
        if dmq_basics(msg):
            return
        msg.drop()
        after_drop.append(msg.reply(200, "After Drop"))  # ignored
        after_drop.append(msg.handled)

    a = await cluster.start(route=ScriptRoute(route))
    client = await peers()
    client.send(request_to(a, client, "MESSAGE"), a.local.port)
    await nothing_more(a, client)  # the OPTIONS reply is the first and only datagram
    assert after_drop == [False, True]


# ---------------------------------------------------------------------------------------------
# the default route, with and without a script


@pytest.mark.parametrize("scripted", [False, True], ids=["no-script", "default_request_route"])
async def test_default_route(cluster: Cluster, peers: Any, scripted: bool) -> None:
    a = await cluster.start(route=ScriptRoute(default_request_route) if scripted else None)
    load_api(a).register_peer("known", "test", lambda _r, _n: PeerResponse(200, "Known"))
    client = await peers()
    reply = await ask(a, client, "KDMQ", user="known", body="x")
    assert (reply.code, reply.reason) == (200, "Known")
    reply = await ask(a, client, "KDMQ", user="unknown", body="x")
    assert (reply.code, reply.reason) == (404, "User Not Found")
    reply = await ask(a, client, "OPTIONS")
    assert (reply.code, reply.reason) == (200, "OK")
    for method in ("MESSAGE", "REGISTER", "PUBLISH"):
        reply = await ask(a, client, method, user="bob")
        assert (reply.code, reply.reason) == (404, "Not Found"), method


# ---------------------------------------------------------------------------------------------
# dmq_handle_message / dmq_process_message


def kdmq_route(results: list[tuple[str, int, bool]]) -> ScriptRoute:
    """KDMQ -> the function named by X-Fn with X-Continue (if any); records (fn, rc, replied
    right after the call)."""

    def route(msg: Msg) -> None:
        if msg.method == "OPTIONS":
            msg.reply(200, "OK")
            return
        fn = msg.headers.get("X-Fn", "handle")
        cont = msg.headers.get("X-Continue")
        call = msg.dmq_handle_message if fn == "handle" else msg.dmq_process_message
        rc = call() if cont is None else call(int(cont))
        results.append((fn, rc, msg.replied))

    return ScriptRoute(route)


async def test_handle_and_process_message_return_values(cluster: Cluster, peers: Any) -> None:
    results: list[tuple[str, int, bool]] = []
    a = await cluster.start(route=kdmq_route(results))
    load_api(a).register_peer("ch", "test", lambda _r, _n: PeerResponse(200, "Done"))
    client = await peers()

    async def kdmq(fn: str, cont: str | None = None, user: str | None = "ch") -> SipReply:
        headers = [("X-Fn", fn)] + ([("X-Continue", cont)] if cont is not None else [])
        return await ask(a, client, "KDMQ", user=user, headers=headers, body="b")

    cases = [
        # fn, continue, channel -> rc, replied when the function returned, final reply
        ("handle", None, "ch", 0, False, (200, "Done")),  # queued: the worker answers later
        ("handle", "1", "ch", 1, False, (200, "Done")),
        ("handle", "5", "ch", 1, False, (200, "Done")),  # above 1: clamped
        ("handle", "-3", "ch", -3, False, (200, "Done")),  # passed through, as Kamailio does
        ("process", None, "ch", 0, True, (200, "Done")),  # inline: answered on return
        ("process", "1", "ch", 1, True, (200, "Done")),
        ("process", "7", "ch", 1, True, (200, "Done")),
        ("handle", None, "nope", 0, True, (404, "User Not Found")),  # continue value
        ("handle", "1", "nope", 1, True, (404, "User Not Found")),
        ("process", "1", "nope", 1, True, (404, "User Not Found")),
        ("handle", "1", None, -1, True, (400, "Missing Channel In R-URI")),  # no user part
        ("process", None, None, -1, True, (400, "Missing Channel In R-URI")),
    ]
    for fn, cont, user, rc, replied, final in cases:
        reply = await kdmq(fn, cont, user)
        assert (reply.code, reply.reason) == final, (fn, cont, user)
        assert results[-1] == (fn, rc, replied), (fn, cont, user)
    assert len(results) == len(cases)


async def test_handle_message_full_queue_is_minus_one_and_503(cluster: Cluster, peers: Any) -> None:
    results: list[tuple[str, int, bool]] = []
    a = await cluster.start(route=kdmq_route(results), num_workers=1, max_queue=1)
    gate = asyncio.Event()
    entered = asyncio.Event()

    async def slow(_request: Request, _node: Any) -> PeerResponse:
        entered.set()
        await gate.wait()
        return PeerResponse(200, "Slow")

    load_api(a).register_peer("slow", "test", slow)
    client = await peers()
    send = lambda: client.send(request_to(a, client, "KDMQ", user="slow"), a.local.port)  # noqa: E731
    send()  # 1: taken by the worker, which now waits for the gate
    await asyncio.wait_for(entered.wait(), 2)
    send()  # 2: waits in the queue (max_queue 1)
    send()  # 3: the queue is full
    reply_3 = await client.reply()
    assert (reply_3.code, reply_3.reason) == (503, "Service Unavailable")
    assert [r[1] for r in results] == [0, 0, -1]
    gate.set()
    assert [(await client.reply()).reason for _ in range(2)] == ["Slow", "Slow"]


async def test_handle_message_without_workers_runs_inline(cluster: Cluster, peers: Any) -> None:
    results: list[tuple[str, int, bool]] = []
    a = await cluster.start(route=kdmq_route(results), num_workers=0)
    load_api(a).register_peer("ch", "test", lambda _r, _n: PeerResponse(200, "Inline"))
    client = await peers()
    reply = await ask(a, client, "KDMQ", user="ch", headers=[("X-Continue", "1")])
    assert reply.reason == "Inline"
    assert results == [("handle", 1, True)]


# ---------------------------------------------------------------------------------------------
# dmq_send_message / dmq_bcast_message


def action_route(results: list[dict[str, Any]]) -> ScriptRoute:
    """MESSAGE with X-Action send|bcast|is_from_node|t_replicate[-skip] calls that function
    (arguments from X-Channel, X-Node, X-Ctype, the body); the reply reason is ``rc <value>``.
    Records the rc and how many datagrams the node sent during the call."""

    def route(msg: Msg) -> None:
        if dmq_basics(msg):
            return
        h = msg.headers
        action = h.get("X-Action", "")
        sent = msg.node.endpoint.stats.sent
        if action == "send":
            rc = msg.dmq_send_message(
                h["X-Channel"], h["X-Node"], msg.body, h.get("X-Ctype", "text/plain")
            )
        elif action == "bcast":
            rc = msg.dmq_bcast_message(h["X-Channel"], msg.body, h.get("X-Ctype", "text/plain"))
        elif action == "is_from_node":
            rc = msg.dmq_is_from_node()
        elif action == "t_replicate":
            rc = msg.dmq_t_replicate()
        elif action == "t_replicate-skip":
            rc = msg.dmq_t_replicate(1)
        else:
            msg.reply(400, "Unknown Action")
            return
        results.append(
            {"action": action, "rc": rc, "sent": msg.node.endpoint.stats.sent - sent, "msg": msg}
        )
        msg.reply(200, f"rc {rc}")

    return ScriptRoute(route)


async def act(dmq: DmqNode, client: UdpPeer, action: str, body: str = "", /, **headers: str) -> int:
    hdrs = [("X-Action", action)] + [(f"X-{k.capitalize()}", v) for k, v in headers.items()]
    reply = await ask(dmq, client, "MESSAGE", headers=hdrs, body=body)
    assert reply.code == 200 and reply.reason.startswith("rc "), reply
    return int(reply.reason[3:])


async def test_send_message_registers_the_channel_which_then_answers_202(
    cluster: Cluster, peers: Any
) -> None:
    results: list[dict[str, Any]] = []
    a = await cluster.start(route=action_route(results))
    b = await cluster.start(seeds=[a])
    await wait_joined([a, b])
    got: asyncio.Queue[Request] = asyncio.Queue()

    def on_known(request: Request, _node: Any) -> PeerResponse:
        got.put_nowait(request)
        return PeerResponse(200, "OK")

    load_api(b).register_peer("known", "test", on_known)
    api_b = load_api(b)
    node_a = api_b.find_node(uri_of(a))
    assert node_a is not None
    client = await peers()

    # B sending on "lab" to A: A does not know the channel yet
    (delivery,) = await api_b.send_message("lab", "x", node_a)
    assert (delivery.status, delivery.response and delivery.response.reason) == (
        404,
        "User Not Found",
    )
    # A's script sends on "lab" (unknown to A and to B): A registers it; B answers 404
    assert "lab" not in a.peers
    rc = await act(a, client, "send", "first", channel="lab", node=uri_of(b))
    assert rc == 1
    assert "lab" in a.peers and "lab" not in b.peers
    # ... and now A answers B's "lab" messages itself: 202 Accepted DMQ, no body
    (delivery,) = await api_b.send_message("lab", "x", node_a)
    assert delivery.status == 202
    assert delivery.response is not None
    assert (delivery.response.reason, delivery.response.body) == ("Accepted DMQ", b"")

    # on a channel B knows: one KDMQ, Max-Forwards 1, the given body and content type
    rc = await act(a, client, "send", "payload", channel="known", node=uri_of(b), ctype="app/x")
    assert rc == 1
    request = await asyncio.wait_for(got.get(), 2)
    assert request.method == "KDMQ"
    assert request.uri == f"sip:known@{NODE_IP}:{b.local.port}"
    assert (request.max_forwards, request.content_type, request.body) == (1, "app/x", b"payload")
    assert request.from_.uri.user == "known"
    assert [r["sent"] for r in results] == [1, 1]
    assert got.empty()


async def test_send_message_to_an_unknown_or_bad_node_sends_nothing(
    cluster: Cluster, peers: Any
) -> None:
    results: list[dict[str, Any]] = []
    a = await cluster.start(route=action_route(results))
    client = await peers()
    unknown = f"sip:{NODE_IP}:{free_port()}"
    assert await act(a, client, "send", "x", channel="c1", node=unknown) == -1
    # Kamailio registers the channel before it looks the node up
    assert "c1" in a.peers
    assert await act(a, client, "send", "x", channel="c2", node="not a uri") == -1
    assert await act(a, client, "send", "x", channel="c3", node=f"sip:{NODE_IP}") == -1
    assert [r["sent"] for r in results] == [0, 0, 0]
    # the same, without a message
    assert send_message(a, "c4", unknown, "x") == -1
    assert a.endpoint.layer.live_clients == 0


async def test_send_message_ignores_status_and_uses_the_notification_callback(
    cluster: Cluster, peers: Any
) -> None:
    """A disabled node still gets a unicast; its 408 runs the notification response callback,
    which deletes a node that was disabled when the request left (a consumer's callback would
    change nothing)."""
    results: list[dict[str, Any]] = []
    a = await cluster.start(route=action_route(results), ping_interval=60)
    rec: EventRecorder = cluster.recorder(a)
    silent = await peers(NODE_IP)
    node = build_node(silent.uri)
    assert a.nodes.add(node)
    assert a.nodes.set_status(node.key, NodeStatus.DISABLED)
    client = await peers()
    assert await act(a, client, "send", "hi", channel="ch", node=silent.uri) == 1
    request = await silent.request()
    assert (request.method, request.max_forwards, request.body) == ("KDMQ", 1, b"hi")
    await rec.wait_for(silent.uri, "removed", timeout=3)
    assert a.nodes.find(node.key) is None


async def test_send_message_reply_200_marks_the_node_active_and_is_read_as_a_node_list(
    cluster: Cluster, peers: Any
) -> None:
    results: list[dict[str, Any]] = []
    a = await cluster.start(route=action_route(results), ping_interval=60)
    rec = cluster.recorder(a)
    peer = await peers(NODE_IP)  # a node that answers by hand
    node = build_node(peer.uri)
    node.status = NodeStatus.NOT_ACTIVE
    a.nodes.add(node)
    client = await peers()
    assert await act(a, client, "send", "x", channel="ch", node=peer.uri) == 1
    request = await peer.request()
    listed = f"sip:127.0.0.9:{free_port()}"
    body = f"{listed};status=active\r\n".encode()
    response = make_response(request, 200, "OK", body=body, content_type="text/plain")
    peer.send(response.to_bytes(), a.local.port)
    await rec.wait_for(peer.uri, "up", timeout=3)
    found = a.nodes.find(node.key)
    assert found is not None and found.status is NodeStatus.ACTIVE
    assert a.nodes.find(build_node(listed).key) is not None  # merged from the reply body


async def test_bcast_message(cluster: Cluster, peers: Any) -> None:
    results: list[dict[str, Any]] = []
    a = await cluster.start(route=action_route(results))
    client = await peers()
    # alone: nothing to do, still 1
    assert await act(a, client, "bcast", "x", channel="lonely") == 1
    assert "lonely" in a.peers
    b = await cluster.start(seeds=[a])
    c = await cluster.start(seeds=[a])
    await wait_joined([a, b, c])
    queues: dict[str, asyncio.Queue[Request]] = {}
    for name, n in (("b", b), ("c", c)):
        q: asyncio.Queue[Request] = asyncio.Queue()
        queues[name] = q

        def on(request: Request, _node: Any, q: asyncio.Queue[Request] = q) -> PeerResponse:
            q.put_nowait(request)
            return PeerResponse(200, "OK")

        load_api(n).register_peer("bc", "test", on)
    assert await act(a, client, "bcast", "to all", channel="bc", ctype="text/x") == 1
    for q in queues.values():
        request = await asyncio.wait_for(q.get(), 2)
        assert (request.body, request.content_type, request.max_forwards) == (
            b"to all",
            "text/x",
            1,
        )
    assert [r["sent"] for r in results] == [0, 2]
    # without a message, from outside a route
    assert bcast_message(a, "bc", "again") == 1
    for q in queues.values():
        assert (await asyncio.wait_for(q.get(), 2)).body == b"again"


async def test_bcast_message_skips_inactive_nodes_and_stops_at_the_first_error(
    cluster: Cluster, peers: Any
) -> None:
    results: list[dict[str, Any]] = []
    a = await cluster.start(route=action_route(results), ping_interval=60)
    good1, good2, off = [await peers(NODE_IP) for _ in range(3)]
    # nodes are listed newest first: good1, bad (no TLS listener here), good2, off (disabled)
    off_node = build_node(off.uri)
    off_node.status = NodeStatus.DISABLED
    a.nodes.add(off_node)
    a.nodes.add(build_node(good2.uri))
    a.nodes.add(build_node(f"sip:{NODE_IP}:{free_port()};transport=tls"))
    a.nodes.add(build_node(good1.uri))
    client = await peers()
    assert await act(a, client, "bcast", "x", channel="bc") == -1
    assert results[-1]["sent"] == 1
    assert (await good1.request()).body == b"x"
    assert a.endpoint.layer.live_clients == 1  # only good1's transaction
    assert good2.queue.empty() and off.queue.empty()


# ---------------------------------------------------------------------------------------------
# dmq_is_from_node


async def test_is_from_node(cluster: Cluster, peers: Any) -> None:
    results: list[dict[str, Any]] = []
    a = await cluster.start(route=action_route(results), ping_interval=60)
    outsider = await peers(CLIENT_IP)
    same_ip = await peers(NODE_IP)
    # alone: the local node never counts, though the request comes from its own IP
    assert await act(a, same_ip, "is_from_node") == -1
    b = await cluster.start(seeds=[a], ping_interval=60)
    await wait_joined([a, b])
    assert await act(a, same_ip, "is_from_node") == 1  # B's IP (any port)
    assert await act(a, outsider, "is_from_node") == -1
    # a disabled (and a not_active) node counts too
    third = await peers("127.0.0.3")
    assert await act(a, third, "is_from_node") == -1
    node = build_node(f"sip:127.0.0.3:{free_port()}")
    node.status = NodeStatus.DISABLED
    a.nodes.add(node)
    assert await act(a, third, "is_from_node") == 1
    a.nodes.set_status(node.key, NodeStatus.NOT_ACTIVE)
    assert await act(a, third, "is_from_node") == 1
    assert dmq_is_from_node(results[-1]["msg"]) == 1  # the module function, same answer


# ---------------------------------------------------------------------------------------------
# dmq_t_replicate


def recording_route(
    seen: list[Request], reason: str = "B-OK", replicate: bool = False, rcs: list[Msg] | None = None
) -> ScriptRoute:
    """Anything but KDMQ/OPTIONS -> (``dmq_t_replicate()`` first if ``replicate``; the Msg goes
    to ``rcs``) record the request, answer 200 ``reason``."""

    def route(msg: Msg) -> None:
        if dmq_basics(msg):
            return
        if replicate:
            rc = msg.dmq_t_replicate()
            if rcs is not None:
                rcs.append(msg)
            msg.reply(200, f"{reason} rc {rc}")
        else:
            msg.reply(200, reason)
        seen.append(msg.request)

    return ScriptRoute(route)


async def test_t_replicate_forwards_once_to_every_active_node_and_absorbs_the_replies(
    cluster: Cluster, peers: Any
) -> None:
    results: list[dict[str, Any]] = []

    def route_a(msg: Msg) -> None:
        if msg.method == "REGISTER":
            rc = msg.dmq_t_replicate()
            results.append({"rc": rc, "msg": msg})
            msg.reply(200, f"A rc {rc}")
        else:
            dmq_basics(msg)

    a = await cluster.start(route=ScriptRoute(route_a), ping_interval=60)
    seen_b: list[Request] = []
    seen_c: list[Request] = []
    b = await cluster.start(seeds=[a], route=recording_route(seen_b, "B-OK"), ping_interval=60)
    c = await cluster.start(seeds=[a], route=recording_route(seen_c, "C-OK"), ping_interval=60)
    await wait_joined([a, b, c])
    off = await peers(NODE_IP)  # a disabled node gets nothing
    off_node = build_node(off.uri)
    off_node.status = NodeStatus.DISABLED
    a.nodes.add(off_node)

    client = await peers()
    original = request_to(
        a,
        client,
        "REGISTER",
        user="alice",
        headers=[("Contact", "<sip:alice@192.0.2.9:5060>"), ("Expires", "300")],
        body=b"reg body",
        max_forwards=42,
    )
    client.send(original, a.local.port)
    reply = await client.reply()
    assert (reply.code, reply.reason) == (200, "A rc 0")
    (entry,) = results
    outcomes = await asyncio.wait_for(asyncio.gather(*entry["msg"].replications), 2)
    assert sorted((status, r.reason if r else None) for status, r in outcomes) == [
        (200, "B-OK"),
        (200, "C-OK"),
    ]
    assert len(seen_b) == len(seen_c) == 1
    sent = parse_message(original)
    assert isinstance(sent, Request)
    for fwd in (seen_b[0], seen_c[0]):
        assert fwd.method == "REGISTER"
        assert fwd.uri == sent.uri  # the R-URI is not rewritten
        top, second = fwd.vias[0], fwd.vias[1]
        assert (top.transport, top.host, top.port) == ("UDP", NODE_IP, a.local.port)
        assert top.branch and top.branch.startswith("z9hG4bK")
        assert top.branch != sent.via.branch
        # the client's Via, with what A's transport noted about it (RFC 3581)
        assert second.branch == sent.via.branch
        assert (second.param("received"), second.param("rport")) == (
            CLIENT_IP,
            str(client.local[1]),
        )
        assert len(fwd.vias) == 2
        for name in ("From", "To", "Call-ID", "CSeq", "Contact", "Expires", "Max-Forwards"):
            assert fwd.get(name) == sent.get(name), name
        assert fwd.body == b"reg body"
    assert seen_b[0].via.branch != seen_c[0].via.branch  # one transaction per node
    # B's and C's 200s ended at A: the OPTIONS reply is the next thing the client gets
    await nothing_more(a, client)
    assert off.queue.empty()


async def test_t_replicate_loop_test_and_skip(cluster: Cluster, peers: Any) -> None:
    results: list[dict[str, Any]] = []
    a = await cluster.start(route=action_route(results), ping_interval=60)
    seen_b: list[Request] = []
    b = await cluster.start(seeds=[a], route=recording_route(seen_b), ping_interval=60)
    await wait_joined([a, b])
    from_node_ip = await peers(NODE_IP)  # B's IP
    assert await act(a, from_node_ip, "t_replicate") == -1
    assert results[-1]["sent"] == 0
    assert results[-1]["msg"].replications == []
    # the same request with the loop test skipped goes out
    assert await act(a, from_node_ip, "t_replicate-skip") == 0
    (status, response) = await asyncio.wait_for(results[-1]["msg"].replications[0], 2)
    assert (status, response and response.reason) == (200, "B-OK")
    # a client that is no node: replicated
    outsider = await peers()
    assert await act(a, outsider, "t_replicate") == 0
    await asyncio.wait_for(asyncio.gather(*results[-1]["msg"].replications), 2)
    assert len(seen_b) == 2
    assert [r["rc"] for r in results] == [-1, 0, 0]


async def test_t_replicate_without_active_nodes_is_zero(cluster: Cluster, peers: Any) -> None:
    results: list[dict[str, Any]] = []
    a = await cluster.start(route=action_route(results), ping_interval=60)
    client = await peers()
    assert await act(a, client, "t_replicate") == 0
    assert results[-1]["sent"] == 0


async def test_two_replicating_nodes_do_not_ping_pong(cluster: Cluster, peers: Any) -> None:
    seen_a: list[Request] = []
    seen_b: list[Request] = []
    msgs_a: list[Msg] = []
    msgs_b: list[Msg] = []
    a = await cluster.start(
        route=recording_route(seen_a, "A", replicate=True, rcs=msgs_a), ping_interval=60
    )
    b = await cluster.start(
        seeds=[a], route=recording_route(seen_b, "B", replicate=True, rcs=msgs_b), ping_interval=60
    )
    await wait_joined([a, b])
    client = await peers()
    reply = await ask(a, client, "REGISTER", user="alice")
    assert reply.reason == "A rc 0"
    (status, response) = await asyncio.wait_for(msgs_a[0].replications[0], 2)
    # B's route ran (it answered A's copy): its dmq_t_replicate() saw A's IP and returned -1
    assert (status, response and response.reason) == (200, "B rc -1")
    assert msgs_b[0].replications == []
    assert (len(seen_a), len(seen_b)) == (1, 1)
    await nothing_more(a, client)


async def test_t_replicate_retransmits_and_ends_in_a_local_408(
    cluster: Cluster, peers: Any
) -> None:
    results: list[dict[str, Any]] = []
    a = await cluster.start(route=action_route(results), ping_interval=60)
    silent = await peers(NODE_IP)
    node = build_node(silent.uri)
    a.nodes.add(node)
    client = await peers()
    assert await act(a, client, "t_replicate", "body") == 0
    (fut,) = results[-1]["msg"].replications
    first = await silent.recv()
    again = await silent.recv()  # a retransmission after t1, byte for byte
    assert first == again
    assert await asyncio.wait_for(fut, 2) == (408, None)
    # a replication timeout is tm's business: the node list is not touched
    found = a.nodes.find(node.key)
    assert found is not None and found.status is NodeStatus.ACTIVE


async def test_t_replicate_error_is_minus_one(cluster: Cluster, peers: Any) -> None:
    results: list[dict[str, Any]] = []
    a = await cluster.start(route=action_route(results), ping_interval=60)
    # an active node over TCP, but this node listens on UDP only
    a.nodes.add(build_node(f"sip:{NODE_IP}:{free_port()};transport=tcp"))
    client = await peers()
    assert await act(a, client, "t_replicate") == -1
    assert results[-1]["sent"] == 0


async def test_t_replicate_from_an_async_route(cluster: Cluster, peers: Any) -> None:
    async def route_a(msg: Msg) -> None:
        if dmq_basics(msg):
            return
        rc = dmq_t_replicate(msg)  # the module function
        outcomes = await asyncio.gather(*msg.replications)
        msg.reply(200, f"rc {rc} " + ",".join(str(status) for status, _ in outcomes))

    a = await cluster.start(route=ScriptRoute(route_a), ping_interval=60)
    seen_b: list[Request] = []
    b = await cluster.start(seeds=[a], route=recording_route(seen_b), ping_interval=60)
    await wait_joined([a, b])
    client = await peers()
    reply = await ask(a, client, "REGISTER", user="alice")
    assert reply.reason == "rc 0 200"
    assert len(seen_b) == 1


# ---------------------------------------------------------------------------------------------
# the route adapter: errors, async routes


async def test_script_errors_answer_500_and_are_logged_once(
    cluster: Cluster, peers: Any, caplog: pytest.LogCaptureFixture
) -> None:
    def route(msg: Msg) -> None:
        if dmq_basics(msg):
            return
        what = msg.headers.get("X-What")
        if what == "reply-then-raise":
            msg.reply(202, "Replied")
        elif what == "drop-then-raise":
            msg.drop()
        raise RuntimeError(f"broken script ({what})")

    script = ScriptRoute(route)
    a = await cluster.start(route=script)
    client = await peers()
    caplog.set_level(logging.DEBUG, logger="pydmq.script")
    for _ in range(3):
        reply = await ask(a, client, "MESSAGE")
        assert (reply.code, reply.reason) == (500, "Server Internal Error")
    reply = await ask(a, client, "MESSAGE", headers=[("X-What", "reply-then-raise")])
    assert (reply.code, reply.reason) == (202, "Replied")
    client.send(
        request_to(a, client, "MESSAGE", headers=[("X-What", "drop-then-raise")]), a.local.port
    )
    await nothing_more(a, client)  # no 202, no 500
    assert script.errors == 5
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1  # one traceback for one place in the script
    assert errors[0].exc_info is not None
    assert "broken script" in str(errors[0].exc_info[1])
    assert sum("failed again" in r.getMessage() for r in caplog.records) == 4
    assert a.running


async def test_async_route(cluster: Cluster, peers: Any) -> None:
    gate = asyncio.Event()

    async def route(msg: Msg) -> None:
        if msg.method == "OPTIONS":
            gate.set()  # the second request is routed while the first still waits
            msg.reply(200, "OK")
            return
        await gate.wait()
        if msg.headers.get("X-Raise"):
            raise ValueError("async failure")
        msg.reply(200, "Async")

    a = await cluster.start(route=ScriptRoute(route))
    client = await peers()
    client.send(request_to(a, client, "MESSAGE"), a.local.port)
    client.send(request_to(a, client, "OPTIONS"), a.local.port)
    replies = [await client.reply() for _ in range(2)]
    assert [(r.code, r.reason) for r in replies] == [(200, "OK"), (200, "Async")]
    reply = await ask(a, client, "MESSAGE", headers=[("X-Raise", "1")])
    assert (reply.code, reply.reason) == (500, "Server Internal Error")


async def test_pending_async_routes_are_cancelled_when_the_node_stops(
    cluster: Cluster, peers: Any
) -> None:
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def route(msg: Msg) -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    a = await cluster.start(route=ScriptRoute(route))
    client = await peers()
    client.send(request_to(a, client, "MESSAGE"), a.local.port)
    await asyncio.wait_for(started.wait(), 2)
    await a.stop(announce=False)
    assert cancelled.is_set()


# ---------------------------------------------------------------------------------------------
# loading scripts


def write_script(tmp_path: Path, text: str, name: str = "route.py") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


async def test_load_route_sync_and_async(cluster: Cluster, peers: Any, tmp_path: Path) -> None:
    path = write_script(
        tmp_path,
        "import dataclasses\n"
        "COUNT = 0\n"
        "@dataclasses.dataclass\n"  # needs the module in sys.modules
        "class Seen:\n"
        "    method: str\n"
        "def request_route(msg):\n"
        "    global COUNT\n"
        "    COUNT += 1\n"
        "    msg.reply(200, f'sync {Seen(msg.method).method} {COUNT}')\n",
    )
    route = load_route(path)
    other = load_route(path)  # a fresh module each time: no shared state
    assert route.module is not None and other.module is not route.module
    a = await cluster.start(route=route)
    client = await peers()
    assert (await ask(a, client, "MESSAGE")).reason == "sync MESSAGE 1"
    assert (await ask(a, client, "PUBLISH")).reason == "sync PUBLISH 2"
    assert (route.module.COUNT, other.module.COUNT) == (2, 0)

    path = write_script(
        tmp_path,
        "import asyncio\n"
        "async def request_route(msg):\n"
        "    await asyncio.sleep(0)\n"
        "    msg.reply(200, 'async ' + msg.method)\n",
        "async_route.py",
    )
    b = await cluster.start(route=load_route(path))
    assert (await ask(b, client, "MESSAGE")).reason == "async MESSAGE"


@pytest.mark.parametrize(
    ("text", "words"),
    [
        (None, ["no such file"]),
        ("def request_route(msg)\n    pass\n", ["SyntaxError", "line 1"]),
        ("import not_a_module_at_all\n", ["ModuleNotFoundError", "not_a_module_at_all"]),
        ("x = 1\nraise RuntimeError('at import')\n", ["RuntimeError", "at import", "line 2"]),
        ("import sys\nsys.exit(3)\n", ["SystemExit"]),
        ("def route(msg):\n    pass\n", ["no request_route"]),
        ("request_route = 5\n", ["no request_route"]),
    ],
    ids=["missing", "syntax", "import", "raises", "exit", "no-route", "not-callable"],
)
def test_load_script_errors(tmp_path: Path, text: str | None, words: list[str]) -> None:
    path = tmp_path / "bad.py"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ScriptError) as info:
        load_script(path)
    message = str(info.value)
    assert str(path) in message
    assert all(w in message for w in words), message
    assert not [m for m in sys.modules if m.startswith("pydmq_script_") and m.endswith("_bad")]


def test_script_route_needs_a_callable() -> None:
    with pytest.raises(TypeError):
        ScriptRoute(5)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# pydmq run --script, pydmq send, pydmq bcast


ROUTE_PY = """\
SEEN = []

def request_route(msg):
    if msg.method == "KDMQ":
        msg.dmq_handle_message()
        return
    if msg.method == "OPTIONS":
        msg.reply(200, "From Script")
        return
    msg.reply(404, "Script Says No")
"""


def _rpc_ready(address: str) -> bool:
    try:
        rpc_client.request("core.version", http=address, timeout=0.5)
    except rpc_client.RpcClientError:
        return False
    return True


async def test_cli_run_with_script_and_send_bcast(
    cluster: Cluster, peers: Any, tmp_path: Path
) -> None:
    script = write_script(tmp_path, ROUTE_PY)
    port = free_port()
    rpc = f"127.0.0.1:{free_port('tcp')}"
    config = tmp_path / "node.toml"
    # a script that cannot be loaded stops "run" before anything listens (exit 2)
    broken = write_script(tmp_path, "def request_route(msg)\n", "broken.py")
    config.write_text(f'[script]\npath = "{tmp_path / "missing.py"}"\n')
    for args, words in [
        (["--script", str(broken)], ["script error", "broken.py", "SyntaxError"]),
        (["-c", str(config)], ["configuration error", "script.path", "missing.py"]),
    ]:
        bad = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "pydmq", "run", "--duration", "5", *args],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
        assert bad.returncode == 2, bad.stderr
        assert all(w in bad.stderr for w in words), bad.stderr
    config.write_text(f'[script]\npath = "{tmp_path / "other.py"}"\n')
    write_script(tmp_path, "def request_route(msg):\n    msg.reply(500, 'Wrong')\n", "other.py")
    argv = [
        sys.executable, "-m", "pydmq", "run", "-c", str(config),
        "--server-address", f"sip:{NODE_IP}:{port}",
        "--script", str(script),  # beats [script] path
        "--set", f"rpc.http_address={rpc}",
        "--set", "tm.fr_timer=1", "--set", "log.level=warning",
        "--duration", "25",
    ]  # fmt: skip
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        # ready once the JSON-RPC listener answers (it starts after the SIP sockets)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15
        while not await asyncio.to_thread(_rpc_ready, rpc):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert loop.time() < deadline, "pydmq run did not start its JSON-RPC listener"
            await asyncio.sleep(0.05)  # poll interval: nothing announces the listener
        client = await peers()
        reply = await ask_port(port, client, "OPTIONS")
        assert (reply.code, reply.reason) == (200, "From Script")
        reply = await ask_port(port, client, "MESSAGE")
        assert (reply.code, reply.reason) == (404, "Script Says No")

        # an in-process node joins the subprocess node through the script's KDMQ handling
        got: asyncio.Queue[Request] = asyncio.Queue()
        b = cluster.create(seeds=[f"sip:{NODE_IP}:{port}"], ping_interval=60)

        def on_lab(request: Request, _node: Any) -> PeerResponse:
            got.put_nowait(request)
            return PeerResponse(200, "OK")

        load_api(b).register_peer("lab", "test", on_lab)
        await b.start()
        rec = cluster.recorder(b)
        await rec.wait_for(f"sip:{NODE_IP}:{port}", "up", timeout=5)

        def pydmq(*argv: str) -> int:
            return cli.main([*argv, "--http", rpc])

        code = await asyncio.to_thread(
            pydmq, "send", "lab", uri_of(b), "one", "--content-type", "text/x"
        )
        assert code == 0
        request = await asyncio.wait_for(got.get(), 5)
        assert (request.body, request.content_type, request.max_forwards) == (b"one", "text/x", 1)
        assert await asyncio.to_thread(pydmq, "bcast", "lab", "two") == 0
        assert (await asyncio.wait_for(got.get(), 5)).body == b"two"
        # -1 becomes a JSON-RPC fault and exit status 1
        missing = f"sip:{NODE_IP}:{free_port()}"
        assert await asyncio.to_thread(pydmq, "send", "lab", missing, "x") == 1
        assert await asyncio.to_thread(pydmq, "send", "lab", "bad uri", "x") == 1
        assert got.empty()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            await asyncio.to_thread(proc.wait, 10)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
            if proc.stderr is not None:
                proc.stderr.close()


async def ask_port(port: int, client: UdpPeer, method: str) -> SipReply:
    client.send(build_request(method, f"sip:x@{NODE_IP}:{port}", local=client.local), port)
    return await client.reply()


# ---------------------------------------------------------------------------------------------
# the JSON-RPC methods behind pydmq send / bcast


async def test_rpc_send_and_bcast_methods(cluster: Cluster) -> None:
    a = await cluster.start(ping_interval=60)
    table = build_methods(a)

    def call(name: str, *params: object) -> object:
        method = table.get(name)
        assert method is not None
        return method.handler(list(params))

    def fault(name: str, *params: object) -> tuple[int, str]:
        with pytest.raises(RpcFault) as info:
            call(name, *params)
        return info.value.code, info.value.message

    assert call("dmq.bcast_message", "ch", "body") == {"rc": 1, "sent": 0}
    assert fault("dmq.bcast_message", "ch") == (500, "Invalid Parameters")
    assert fault("dmq.bcast_message", "", "x")[1].startswith("Invalid Channel")
    assert fault("dmq.send_message", "ch", "sip:127.0.0.1") == (500, "Invalid Parameters")
    missing = f"sip:{NODE_IP}:{free_port()}"
    assert fault("dmq.send_message", "ch", missing, "x") == (500, f"Node Not Found: {missing}")
    assert fault("dmq.send_message", "ch", "nope", "x")[1].startswith("Invalid Node URI")
    b = await cluster.start(seeds=[a], ping_interval=60)
    await wait_joined([a, b])
    got: asyncio.Queue[Request] = asyncio.Queue()

    def on(request: Request, _node: Any) -> PeerResponse:
        got.put_nowait(request)
        return PeerResponse(200, "OK")

    load_api(b).register_peer("ch", "test", on)
    assert call("dmq.send_message", "ch", uri_of(b), "one", "app/one") == {"rc": 1, "sent": 1}
    request = await asyncio.wait_for(got.get(), 2)
    assert (request.body, request.content_type) == (b"one", "app/one")
    assert call("dmq.bcast_message", "ch", "two") == {"rc": 1, "sent": 1}
    request = await asyncio.wait_for(got.get(), 2)
    assert (request.body, request.content_type) == (b"two", "text/plain")


# ---------------------------------------------------------------------------------------------
# SipEndpoint.forward_request (what dmq_t_replicate stands on)


async def test_forward_request_leaves_the_original_alone_and_refuses_what_it_cannot_do(
    cluster: Cluster, peers: Any
) -> None:
    kept: list[Msg] = []

    def route(msg: Msg) -> None:
        if dmq_basics(msg):
            return
        kept.append(msg)
        msg.reply(200, "Kept")

    a = await cluster.start(route=ScriptRoute(route), ping_interval=60)
    client = await peers()
    target = await peers(NODE_IP)
    await ask(a, client, "PUBLISH", user="bob", body="state")
    request = kept[0].request
    before = request.to_bytes()
    dest = Address("udp", NODE_IP, target.local[1])
    fut = a.endpoint.forward_request(request, dest)
    copy = await target.request()
    assert request.to_bytes() == before  # the original is not modified
    assert copy.vias[1].param("received") == CLIENT_IP
    response = make_response(copy, 202, "Fine")
    target.send(response.to_bytes(), a.local.port)
    status, resp = await asyncio.wait_for(fut, 2)
    assert (status, resp and resp.reason) == (202, "Fine")
    # two forwards of the same request: two transactions, two branches
    f1 = a.endpoint.forward_request(request, dest, lambda status, _r: None)
    f2 = a.endpoint.forward_request(request, dest)
    b1, b2 = (await target.request()).via.branch, (await target.request()).via.branch
    assert b1 != b2
    for fut in (f1, f2):
        fut.cancel()
    for method in ("INVITE", "ACK"):
        request.method = method
        with pytest.raises(ValueError, match="non-INVITE"):
            a.endpoint.forward_request(request, dest)
    request.method = "PUBLISH"
    with pytest.raises(ValueError, match="not an IP"):
        a.endpoint.forward_request(request, Address("udp", "example.com", 5060))
    with pytest.raises(ValueError, match="transport"):
        a.endpoint.forward_request(request, Address("sctp", NODE_IP, 5060))
    with pytest.raises(LookupError):
        a.endpoint.forward_request(request, Address("tcp", NODE_IP, 5060))
    await a.stop(announce=False)
    with pytest.raises(RuntimeError):
        a.endpoint.forward_request(request, dest)


# ---------------------------------------------------------------------------------------------
# examples/route.py


async def test_example_route(cluster: Cluster, peers: Any) -> None:
    example = Path(__file__).resolve().parents[2] / "examples" / "route.py"
    ra, rb = load_route(example), load_route(example)
    a = await cluster.start(route=ra, ping_interval=60)
    b = await cluster.start(seeds=[a], route=rb, ping_interval=60)
    await wait_joined([a, b])
    client = await peers()
    contact = "<sip:alice@192.0.2.7:5060>"
    reply = await ask(a, client, "REGISTER", user="alice", headers=[("Contact", contact)])
    assert (reply.code, reply.header("Contact")) == (200, contact)
    assert ra.module is not None and rb.module is not None
    assert ra.module.location == {"alice": contact}
    await eventually(lambda: rb.module.location, timeout=2, what="B saved the contact")
    assert rb.module.location == {"alice": contact}
    reply = await ask(a, client, "MESSAGE", user="announce", body="news")
    assert (reply.code, reply.reason) == (200, "Announced")
    reply = await ask(a, client, "KDMQ", user="lab", body="direct")
    assert (reply.code, reply.reason) == (200, "OK")
    reply = await ask(a, client, "SUBSCRIBE", user="x")
    assert (reply.code, reply.reason) == (404, "Not Found")
