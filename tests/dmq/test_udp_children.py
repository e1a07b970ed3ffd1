"""``[sip] udp_children``: receiver processes read the UDP socket (pydmq.sip.prefork).

The receivers are real processes reading the node's real UDP socket on 127.0.0.1. The main
check is differential: a node whose main process reads its socket and a node with receivers get
the same datagrams from the same client socket, and must send the same bytes back (after the
per-node port and To tag are written alike), or stay silent alike.
"""

from __future__ import annotations

import asyncio
import errno
import os
import re
import signal
import socket
import uuid
from collections.abc import AsyncIterator, Callable

import pytest

from pydmq.dmq.node import Node
from pydmq.dmq.peer import PeerResponse
from pydmq.dmq.runtime import DmqNode
from pydmq.sip.message import Request
from tests.support.cluster import Cluster, eventually, wait_joined
from tests.support.net import build_request
from tests.support.spec import wire_dir

pytestmark = pytest.mark.timeout(60)

CHILDREN = {"udp_children": 1}  # one receiver keeps the order, so silence can be proven


def _lab(request: Request, node: Node | None) -> PeerResponse:
    return PeerResponse(200, "OK", body=b"lab:" + request.body, content_type="text/plain")


class Client:
    """One UDP socket on 127.0.0.1 that sends to either node and reads the replies in order."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(3.0)
        self.port = self.sock.getsockname()[1]

    def close(self) -> None:
        self.sock.close()

    def _exchange(self, port: int, data: bytes) -> bytes:
        self.sock.sendto(data, ("127.0.0.1", port))
        reply, _ = self.sock.recvfrom(65536)
        return reply

    async def ask(self, port: int, data: bytes) -> bytes:
        return await asyncio.to_thread(self._exchange, port, data)

    async def silent(self, port: int, data: bytes) -> bool:
        """Send ``data``, then an OPTIONS: True if the first reply is the OPTIONS's."""
        call_id = uuid.uuid4().hex
        probe = build_request(
            "OPTIONS", f"sip:127.0.0.1:{port}", local=("127.0.0.1", self.port), call_id=call_id
        )
        await asyncio.to_thread(self.sock.sendto, data, ("127.0.0.1", port))
        reply = await self.ask(port, probe)
        return call_id.encode() in reply


@pytest.fixture
def client() -> AsyncIterator[Client]:
    c = Client()
    yield c  # type: ignore[misc]
    c.close()


def _normal(reply: bytes, node: DmqNode) -> bytes:
    """The reply with this node's port, its To tag and the client's random branch and From tag
    written as placeholders."""
    port = str(node.local.port).encode()
    text = re.sub(rb"(To:[^\r\n]*;tag=)[^;\r\n]+", rb"\1TAG", reply)
    text = re.sub(rb"(From:[^\r\n]*;tag=)[^;\r\n]+", rb"\1FTAG", text)
    text = re.sub(rb"branch=[^;,\r\n]+", rb"branch=BRANCH", text)
    return text.replace(b":" + port, b":PORT").replace(b"@" + port, b"@PORT")


Build = Callable[[int, int], bytes]


def _req(method: str, user: str | None, **kw: object) -> Build:
    def build(port: int, local_port: int) -> bytes:
        target = f"{user}@" if user is not None else ""
        return build_request(
            method,
            f"sip:{target}127.0.0.1:{port}",
            local=("127.0.0.1", local_port),
            call_id="fixed-" + method + (user or "") + "@127.0.0.1",
            **kw,  # type: ignore[arg-type]
        )

    return build


def _raw(text: str) -> Build:
    def build(port: int, local_port: int) -> bytes:
        return text.format(port=port, local=local_port).replace("\n", "\r\n").encode()

    return build


ANSWERED: dict[str, Build] = {
    "options": _req("OPTIONS", None),
    "options with a user": _req("OPTIONS", "lab"),
    "kdmq unknown channel": _req("KDMQ", "nochannel", body="x"),
    "kdmq registered channel": _req("KDMQ", "lab", body="hello"),
    "kdmq no channel": _req("KDMQ", None),
    "other method": _req("MESSAGE", "lab", body="hi"),
    "bad max-forwards": _req("OPTIONS", None, max_forwards=None, headers=[("Max-Forwards", "x")]),
    "cseq method mismatch": _raw(
        "OPTIONS sip:127.0.0.1:{port} SIP/2.0\n"
        "Via: SIP/2.0/UDP 127.0.0.1:{local};branch=z9hG4bKmm1\n"
        "From: <sip:a@127.0.0.1:{local}>;tag=1\nTo: <sip:127.0.0.1:{port}>\n"
        "Call-ID: mismatch@x\nCSeq: 1 KDMQ\nContent-Length: 0\n\n"
    ),
    "via without rport, other host": _raw(
        "OPTIONS sip:127.0.0.1:{port} SIP/2.0\n"
        "Via: SIP/2.0/UDP example.invalid:{local};branch=z9hG4bKvr1\n"
        "From: <sip:a@127.0.0.1:{local}>;tag=1\nTo: <sip:127.0.0.1:{port}>\n"
        "Call-ID: received@x\nCSeq: 7 OPTIONS\nContent-Length: 0\n\n"
    ),
}

SILENT: dict[str, Build] = {
    "garbage": lambda port, local: b"\x00\x01 not sip at all\r\n\r\n",
    "ack": _req("ACK", "lab"),
    "missing call-id": _raw(
        "OPTIONS sip:127.0.0.1:{port} SIP/2.0\n"
        "Via: SIP/2.0/UDP 127.0.0.1:{local};branch=z9hG4bKnc1\n"
        "From: <sip:a@127.0.0.1:{local}>;tag=1\nTo: <sip:127.0.0.1:{port}>\n"
        "CSeq: 1 OPTIONS\nContent-Length: 0\n\n"
    ),
    "stray response": _raw(
        "SIP/2.0 200 OK\nVia: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bKnobody\n"
        "From: <sip:a@127.0.0.1:{port}>;tag=1\nTo: <sip:b@127.0.0.1:{local}>;tag=2\n"
        "Call-ID: stray@x\nCSeq: 1 KDMQ\nContent-Length: 0\n\n"
    ),
    "oversize": lambda port, local: b"OPTIONS " + b"x" * 70000,
}


async def _pair(cluster: Cluster) -> tuple[DmqNode, DmqNode]:
    plain = await cluster.start()
    forked = await cluster.start(sip=CHILDREN)
    for node in (plain, forked):
        node.peers.register("lab", "test channel", _lab)
    assert plain.receivers is None
    assert forked.receivers is not None and len(forked.receivers.pids()) == 1
    return plain, forked


@pytest.mark.parametrize("case", sorted(ANSWERED))
async def test_receivers_answer_as_the_main_process_does(
    cluster: Cluster, client: Client, case: str
) -> None:
    plain, forked = await _pair(cluster)
    build = ANSWERED[case]
    want = await client.ask(plain.local.port, build(plain.local.port, client.port))
    got = await client.ask(forked.local.port, build(forked.local.port, client.port))
    assert _normal(got, forked) == _normal(want, plain)


@pytest.mark.parametrize("case", sorted(SILENT))
async def test_receivers_stay_silent_where_the_main_process_does(
    cluster: Cluster, client: Client, case: str
) -> None:
    plain, forked = await _pair(cluster)
    build = SILENT[case]
    if len(build(0, 0)) > 65507:
        # Too big for one datagram on loopback: the kernel refuses it for both.
        with pytest.raises(OSError):
            client.sock.sendto(build(0, 0), ("127.0.0.1", forked.local.port))
        return
    assert await client.silent(plain.local.port, build(plain.local.port, client.port))
    assert await client.silent(forked.local.port, build(forked.local.port, client.port))


def _golden_requests() -> list[str]:
    return sorted(
        p.name
        for p in wire_dir().glob("[0-9][0-9]_*.txt")
        if "__reply_" not in p.name and not p.read_bytes().startswith(b"SIP/2.0")
    )


@pytest.mark.parametrize("name", _golden_requests())
async def test_kamailio_captures_get_the_same_replies(
    cluster: Cluster, client: Client, name: str
) -> None:
    """Every request Kamailio 5.6.3 sent in the capture, replayed to both kinds of node."""
    plain, forked = await _pair(cluster)
    # Replies go to the Via's sent-by (no rport in Kamailio's requests): make it the client.
    data = re.sub(
        rb"^(Via: SIP/2.0/UDP )[^;\r\n]+",
        b"\\g<1>127.0.0.1:%d" % client.port,
        (wire_dir() / name).read_bytes(),
        count=1,
        flags=re.M,
    )
    want = await client.ask(plain.local.port, data)
    got = await client.ask(forked.local.port, data)
    assert _normal(got, forked) == _normal(want, plain)


async def test_a_channel_registered_at_run_time_is_delivered_not_404(
    cluster: Cluster, client: Client
) -> None:
    node = await cluster.start(sip={"udp_children": 2})
    ask = _req("KDMQ", "late", body="x")
    assert b" 404 User Not Found" in await client.ask(
        node.local.port, ask(node.local.port, client.port)
    )
    node.peers.register("late", "registered after start", _lab)
    # The receivers see the new channel before register() returns: no window of 404s.
    late = _req("KDMQ", "late", body="y")
    for _ in range(20):
        reply = await client.ask(node.local.port, late(node.local.port, client.port))
        assert reply.startswith(b"SIP/2.0 200 OK") and reply.endswith(b"lab:y")


async def test_nodes_with_receivers_form_a_cluster_and_exchange_messages(
    cluster: Cluster,
) -> None:
    a = await cluster.start(sip={"udp_children": 2})
    b = await cluster.start(seeds=[a], sip={"udp_children": 2})
    c = await cluster.start(seeds=[a])  # no receivers: the two kinds mix
    await wait_joined([a, b, c])
    got: list[bytes] = []
    done = asyncio.get_running_loop().create_future()

    def collect(request: Request, node: Node | None) -> PeerResponse:
        got.append(request.body)
        if len(got) == 100 and not done.done():
            done.set_result(None)
        return PeerResponse(200, "OK")

    b.peers.register("bus", "test", collect)
    a.peers.register_auto("bus")
    target = next(n for n in a.nodes.remote() if n.key == b.local.key)
    finals = [a.send_kdmq(target, "bus", f"m{i}".encode()) for i in range(100)]
    codes = [code for code, _ in await asyncio.gather(*finals)]
    await asyncio.wait_for(done, 5)
    assert codes == [200] * 100
    assert sorted(got) == sorted(f"m{i}".encode() for i in range(100))


async def test_counters_show_in_stats(cluster: Cluster, client: Client) -> None:
    node = await cluster.start(sip=CHILDREN)
    port = node.local.port
    await client.ask(port, _req("OPTIONS", None)(port, client.port))
    await client.ask(port, _req("KDMQ", "nochannel")(port, client.port))
    assert await client.silent(port, b"junk\r\n\r\n")
    stats = node.receiver_stats()
    assert stats is not None

    def counted() -> bool:
        s = node.receiver_stats() or {}
        return s.get("options", 0) >= 2 and s.get("dropped_unparsable", 0) >= 1

    await eventually(counted, timeout=3, what="receiver counters")
    s = node.receiver_stats() or {}
    assert s["processes"] == 1 and s["unknown_user"] == 1 and s["received"] >= 4
    assert node.stats.snapshot()["parse_errors_dropped"] >= 1


async def test_a_killed_receiver_is_restarted(cluster: Cluster, client: Client) -> None:
    node = await cluster.start(sip=CHILDREN)
    assert node.receivers is not None
    (pid,) = node.receivers.pids()
    os.kill(pid, signal.SIGKILL)
    sup = node.receivers
    await eventually(lambda: sup.restarts == 1, timeout=5, what="the restart")
    await eventually(lambda: sup.pids() not in ([], [pid]), timeout=5, what="a new receiver")
    port = node.local.port
    reply = await client.ask(port, _req("OPTIONS", None)(port, client.port))
    assert reply.startswith(b"SIP/2.0 200 OK")


async def test_stop_ends_every_receiver(cluster: Cluster) -> None:
    node = await cluster.start(sip={"udp_children": 3})
    assert node.receivers is not None
    pids = node.receivers.pids()
    assert len(pids) == 3
    await node.stop(announce=False)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


async def test_registered_channels_skip_the_receivers(cluster: Cluster, client: Client) -> None:
    """The kernel hands KDMQ for a registered channel to the main process's own socket; an
    unusual spelling of the same R-URI goes through a receiver and is still delivered."""
    node = await cluster.start(sip={"udp_children": 2})
    node.peers.register("lab", "test channel", _lab)
    sup = node.receivers
    assert sup is not None
    port = node.local.port
    for i in range(20):
        reply = await client.ask(port, _req("KDMQ", "lab", body=f"d{i}")(port, client.port))
        assert reply.endswith(f"lab:d{i}".encode())
    odd = _req("KDMQ", "lab", body="odd")(port, client.port).replace(b"KDMQ sip:", b"KDMQ SIP:", 1)
    assert (await client.ask(port, odd)).endswith(b"lab:odd")
    await eventually(
        lambda: sup.counters()["forwarded"] == 1, timeout=3, what="the forwarded count"
    )
    assert sup.counters()["received"] == 1  # only the odd one


async def test_messages_of_one_sender_stay_in_order(cluster: Cluster) -> None:
    a = await cluster.start()
    b = await cluster.start(seeds=[a], sip={"udp_children": 2})
    await wait_joined([a, b])
    got: list[bytes] = []

    def collect(request: Request, node: Node | None) -> PeerResponse:
        got.append(request.body)
        return PeerResponse(200, "OK")

    b.peers.register("bus", "test", collect)
    a.peers.register_auto("bus")
    target = next(n for n in a.nodes.remote() if n.key == b.local.key)
    sent = [f"m{i}".encode() for i in range(500)]
    finals = [a.send_kdmq(target, "bus", body) for body in sent]
    assert [code for code, _ in await asyncio.gather(*finals)] == [200] * len(sent)
    assert got == sent


async def test_a_second_node_on_the_same_port_fails_to_start(cluster: Cluster) -> None:
    """SO_REUSEPORT must not let a second node silently share the first one's traffic."""
    first = await cluster.start(sip={"udp_children": 2})
    port = first.local.port
    for sip in ({"udp_children": 2}, None):
        second = cluster.create(port=port, sip=sip)
        with pytest.raises(OSError) as info:
            await second.start()
        assert info.value.errno == errno.EADDRINUSE
    plain = await cluster.start()
    third = cluster.create(port=plain.local.port, sip={"udp_children": 1})
    with pytest.raises(OSError):
        await third.start()


async def test_stopping_the_receivers_twice_is_harmless(cluster: Cluster) -> None:
    node = await cluster.start(sip={"udp_children": 1})
    sup = node.receivers
    assert sup is not None
    await sup.stop()
    await sup.stop()
    await node.stop(announce=False)  # stops them a third time
