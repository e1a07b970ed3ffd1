"""The developer API (``load_api``) between real nodes: channels, callbacks, workers, timeouts.

Every node runs in this test's event loop on its own UDP port on 127.0.0.1, with short timers
(t1 50 ms, fr_timer 0.5 s). Tests await futures and events, bounded by timeouts.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import Any

import pytest

from pydmq.dmq.api import Delivery, DmqApi, load_api
from pydmq.dmq.node import Node, NodeStatus, build_node
from pydmq.dmq.peer import PeerError, PeerResponse
from pydmq.dmq.runtime import DmqError, DmqNode, default_route
from pydmq.sip.endpoint import IncomingRequest
from pydmq.sip.message import Request, Response
from tests.support.cluster import Cluster, key_of, node_status, uri_of, wait_joined
from tests.support.net import free_port

pytestmark = pytest.mark.timeout(30)


class Inbox:
    """A channel callback that records (body, sender node, current task) per call."""

    def __init__(self, response: PeerResponse | None = None) -> None:
        self.calls: list[tuple[bytes, Node | None, asyncio.Task[object] | None]] = []
        self.response = response or PeerResponse(200, "OK")
        self.arrived = asyncio.Event()

    def __call__(self, request: Request, node: Node | None) -> PeerResponse:
        self.calls.append((request.body, node, asyncio.current_task()))
        self.arrived.set()
        return self.response

    @property
    def bodies(self) -> list[bytes]:
        return [body for body, _, _ in self.calls]


class Replies:
    """A response callback recording (status, reason, node key) per call."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, str | None, tuple[str, str, str]]] = []

    def __call__(self, response: Response | None, status: int, node: Node) -> None:
        self.calls.append((status, response.reason if response else None, node.key))


async def _joined(
    cluster: Cluster, count: int, channel: str = "chan", **options: Any
) -> tuple[list[DmqNode], list[Inbox], list[DmqApi]]:
    """``count`` nodes (the first is the seed), each with ``channel`` registered, all joined."""
    nodes: list[DmqNode] = []
    inboxes: list[Inbox] = []
    apis: list[DmqApi] = []
    for i in range(count):
        node = cluster.create(seeds=nodes[:1], **options)
        inbox = Inbox()
        api = load_api(node)
        api.register_peer(channel, f"test channel on node {i}", inbox)
        await node.start()
        nodes.append(node)
        inboxes.append(inbox)
        apis.append(api)
    await wait_joined(nodes)
    return nodes, inboxes, apis


# ------------------------------------------------------------------------------ channels


async def test_bcast_reaches_every_active_remote_node_once(cluster: Cluster) -> None:
    nodes, inboxes, apis = await _joined(cluster, 4, ping_interval=60)
    a = nodes[0]
    replies = Replies()
    deliveries = await asyncio.wait_for(apis[0].bcast_message("chan", b"hello", None, replies), 3)
    assert inboxes[0].calls == []  # never to ourselves
    for inbox in inboxes[1:]:
        assert inbox.bodies == [b"hello"]
    assert sorted(replies.calls) == sorted((200, "OK", key_of(n)) for n in nodes[1:])
    assert all(isinstance(d, Delivery) for d in deliveries)
    assert sorted((d.node.key, d.status) for d in deliveries) == sorted(
        (key_of(n), 200) for n in nodes[1:]
    )
    assert all(d.response is not None and d.response.status == 200 for d in deliveries)
    assert a.stats.snapshot()["messages_out"]["chan"] == 3


async def test_bcast_honours_except_node_and_skips_inactive(cluster: Cluster) -> None:
    nodes, inboxes, apis = await _joined(cluster, 4, ping_interval=60)
    a, b, c, d = nodes
    # except_node is matched by identity: a snapshot from find_node works
    except_b = apis[0].find_node(uri_of(b))
    assert except_b is not None and except_b.key == key_of(b)
    deliveries = await apis[0].bcast_message("chan", "text body", except_b)
    assert sorted(x.node.key for x in deliveries) == sorted([key_of(c), key_of(d)])
    assert inboxes[1].calls == []
    assert inboxes[2].bodies == inboxes[3].bodies == [b"text body"]
    # broadcasts go only to active nodes (spec 2.11); unicast ignores the status
    assert a.nodes.set_status(key_of(c), NodeStatus.NOT_ACTIVE)
    assert a.nodes.set_status(key_of(d), NodeStatus.DISABLED)
    deliveries = await apis[0].bcast_message("chan", b"2nd")
    assert [x.node.key for x in deliveries] == [key_of(b)]
    [only] = await apis[0].send_message("chan", b"unicast", a.nodes.find(key_of(d)))
    assert only.status == 200 and inboxes[3].bodies == [b"text body", b"unicast"]
    assert await apis[0].bcast_message("chan", b"nobody", except_b) == []  # no target: []


async def test_send_message_to_one_node(cluster: Cluster) -> None:
    nodes, inboxes, apis = await _joined(cluster, 3, ping_interval=60)
    c = nodes[2]
    replies = Replies()
    target = apis[0].find_node(uri_of(c))
    assert target is not None
    [delivery] = await apis[0].send_message("chan", b"just c", target, replies)
    assert (delivery.status, delivery.node.key) == (200, key_of(c))
    assert replies.calls == [(200, "OK", key_of(c))]
    assert inboxes[2].bodies == [b"just c"] and inboxes[1].calls == []
    assert apis[0].find_node("sip:127.0.0.1:1") is None
    assert apis[0].find_node("not a uri") is None


async def test_reply_codes_reasons_and_bodies_reach_the_sender(cluster: Cluster) -> None:
    a = cluster.create(ping_interval=60)
    b = cluster.create(seeds=[a], ping_interval=60)
    api_a = load_api(a)

    def fails(request: Request, node: Node | None) -> PeerResponse:
        return PeerResponse(500, "Server Internal Error")

    def raises(request: Request, node: Node | None) -> PeerResponse:
        raise RuntimeError("consumer bug")

    async def async_echo(request: Request, node: Node | None) -> PeerResponse:
        await asyncio.sleep(0.01)
        return PeerResponse(200, "OK", b"async:" + request.body, "text/x-test")

    def sync_echo(request: Request, node: Node | None) -> PeerResponse:
        return PeerResponse(200, "OK", b"sync:" + request.body, "text/x-test")

    def silent(request: Request, node: Node | None) -> PeerResponse:
        return PeerResponse(0, "")  # Kamailio sends nothing: the sender sees its 408

    for name, cb in [
        ("fails", fails),
        ("raises", raises),
        ("async", async_echo),
        ("sync", sync_echo),
        ("silent", silent),
    ]:
        api_a.register_peer(name, "test", cb)
    with pytest.raises(PeerError):
        api_a.register_peer("sync", "twice", sync_echo)
    await a.start()
    await b.start()
    await wait_joined([a, b])
    api_b = load_api(b)
    target = api_b.find_node(uri_of(a))
    assert target is not None

    async def send(channel: str) -> tuple[list[tuple[int, str | None, object]], Delivery]:
        replies = Replies()
        [delivery] = await asyncio.wait_for(api_b.send_message(channel, b"x", target, replies), 3)
        return replies.calls, delivery

    calls, d = await send("fails")
    assert calls == [(500, "Server Internal Error", key_of(a))] and d.status == 500
    calls, d = await send("raises")
    assert calls == [(500, "Server Internal Error", key_of(a))]
    calls, d = await send("nochannel")
    assert calls == [(404, "User Not Found", key_of(a))]
    for channel in ("async", "sync"):
        calls, d = await send(channel)
        assert calls == [(200, "OK", key_of(a))]
        assert d.response is not None
        assert d.response.body == f"{channel}:x".encode()
        assert d.response.content_type == "text/x-test"
    calls, d = await send("silent")
    assert calls == [(408, None, key_of(a))] and d.response is None
    snap = a.stats.snapshot()
    assert snap["rejected"]["404"] == 1
    assert snap["messages_in"] == {"fails": 1, "raises": 1, "async": 1, "sync": 1, "silent": 1} | {
        "notification_peer": snap["messages_in"]["notification_peer"]
    }


async def test_callback_gets_sender_node_or_none(cluster: Cluster) -> None:
    nodes, inboxes, apis = await _joined(cluster, 2, ping_interval=60)
    a, b = nodes
    await apis[1].send_message("chan", b"from b", apis[1].find_node(uri_of(a)))
    [(_, sender, _)] = inboxes[0].calls
    assert sender is not None and sender.key == key_of(b)
    assert sender.status is NodeStatus.ACTIVE and not sender.local
    # a node that never joined: looked up by its From URI, not found -> None
    stranger = await cluster.start(ping_interval=60)
    [d] = await load_api(stranger).send_message(
        "chan", b"from nobody", build_node(f"sip:127.0.0.1:{a.local.port}")
    )
    assert d.status == 200
    assert inboxes[0].calls[1][:2] == (b"from nobody", None)
    assert node_status(a, stranger) is None  # channel traffic teaches nobody membership


async def test_per_sender_order_with_four_workers(cluster: Cluster) -> None:
    received: list[int] = []
    workers: set[str] = set()
    rng = random.Random(7)

    async def slow(request: Request, node: Node | None) -> PeerResponse:
        received.append(int(request.body))
        task = asyncio.current_task()
        workers.add(task.get_name() if task else "-")
        await asyncio.sleep(rng.random() * 0.002)  # let other jobs run if they were allowed to
        return PeerResponse(200, "OK")

    a = cluster.create(ping_interval=60, num_workers=4)
    load_api(a).register_peer("seq", "ordered", slow)
    await a.start()
    b = await cluster.start(seeds=[a], ping_interval=60, tm={"fr_timer": 2.0})
    await wait_joined([a, b])
    api_b = load_api(b)
    target = api_b.find_node(uri_of(a))
    assert target is not None
    futures = [api_b.send_message("seq", str(i).encode(), target) for i in range(100)]
    results = await asyncio.wait_for(asyncio.gather(*futures), 10)
    assert [d.status for [d] in results] == [200] * 100
    assert received == list(range(100))
    assert len(workers) == 1 and next(iter(workers)).startswith("dmq-worker-")


async def test_handle_versus_process_paths(cluster: Cluster) -> None:
    returned: list[str] = []

    def route(dmq: DmqNode, incoming: IncomingRequest) -> None:
        req = incoming.request
        if req.method == "KDMQ" and req.ruri.user in ("process", "aprocess"):
            assert dmq.handle_message(incoming, inline=True) == 1
            returned.append("process")
        elif req.method == "KDMQ" and req.ruri.user == "handle":
            assert dmq.handle_message(incoming) == 1
            returned.append("handle")
        else:
            default_route(dmq, incoming)

    seen: list[tuple[str, str | None, int]] = []

    def record(path: str) -> Callable[[Request, Node | None], PeerResponse]:
        def cb(request: Request, node: Node | None) -> PeerResponse:
            task = asyncio.current_task()
            seen.append((path, task.get_name() if task else None, len(returned)))
            return PeerResponse(200, "OK")

        return cb

    async def async_cb(request: Request, node: Node | None) -> PeerResponse:
        await asyncio.sleep(0)
        return PeerResponse(202, "Accepted")

    a = cluster.create(route=route, ping_interval=60)
    api_a = load_api(a)
    api_a.register_peer("handle", "queued", record("handle"))
    api_a.register_peer("process", "inline", record("process"))
    api_a.register_peer("aprocess", "inline, async", async_cb)
    await a.start()
    b = await cluster.start(seeds=[a], ping_interval=60)
    await wait_joined([a, b])
    api_b = load_api(b)
    target = api_b.find_node(uri_of(a))
    assert target is not None
    [d1] = await api_b.send_message("process", b"", target)
    [d2] = await api_b.send_message("handle", b"", target)
    [d3] = await api_b.send_message("aprocess", b"", target)
    assert (d1.status, d2.status, d3.status) == (200, 200, 202)
    (p_path, p_task, p_returned), (h_path, h_task, h_returned) = seen
    # process: run by the receive path itself, before handle_message returned
    assert (p_path, p_task, p_returned) == ("process", None, 0)
    # handle: queued for a worker task, run after handle_message had returned
    assert h_path == "handle" and h_task is not None and h_task.startswith("dmq-worker-")
    assert h_returned == 2


async def test_full_queue_answers_503(cluster: Cluster) -> None:
    started = asyncio.Event()
    release = asyncio.Event()
    done: list[bytes] = []

    async def blocked(request: Request, node: Node | None) -> PeerResponse:
        started.set()
        await release.wait()
        done.append(request.body)
        return PeerResponse(200, "OK")

    a = cluster.create(ping_interval=60, num_workers=1, max_queue=1)
    load_api(a).register_peer("slow", "blocks", blocked)
    await a.start()
    b = await cluster.start(seeds=[a], ping_interval=60, tm={"fr_timer": 3.0})
    await wait_joined([a, b])
    api_b = load_api(b)
    target = api_b.find_node(uri_of(a))
    assert target is not None
    first = api_b.send_message("slow", b"1", target)
    await asyncio.wait_for(started.wait(), 2)  # the only worker is busy with "1"
    second = api_b.send_message("slow", b"2", target)  # waits in the queue (1 of 1)
    replies = Replies()
    [third] = await asyncio.wait_for(api_b.send_message("slow", b"3", target, replies), 2)
    assert third.status == 503 and replies.calls == [(503, "Service Unavailable", key_of(a))]
    assert third.response is not None and third.response.get("Retry-After") == "1"
    snap = a.stats.snapshot()
    assert snap["queue_depth"] == {"total": 1, "per_worker": [1]}
    assert snap["rejected"]["503"] == 1
    assert snap["messages_in"]["slow"] == 2  # only what was accepted
    release.set()
    [[d1], [d2]] = await asyncio.wait_for(asyncio.gather(first, second), 3)
    assert (d1.status, d2.status) == (200, 200)
    assert done == [b"1", b"2"]
    assert a.stats.snapshot()["queue_depth"]["total"] == 0


async def test_no_workers_runs_callbacks_inline(cluster: Cluster) -> None:
    nodes, inboxes, apis = await _joined(cluster, 2, ping_interval=60, num_workers=0)
    a, b = nodes
    [d] = await apis[1].send_message("chan", b"inline", apis[1].find_node(uri_of(a)))
    assert d.status == 200
    [(body, sender, task)] = inboxes[0].calls
    assert (body, task) == (b"inline", None)  # no worker task: run on the receive path
    assert sender is not None and sender.key == key_of(b)
    assert a.stats.snapshot()["queue_depth"] == {"total": 0, "per_worker": []}


# ------------------------------------------------------------------------------ timeouts


async def test_send_to_dead_port_times_out_once(cluster: Cluster) -> None:
    a = await cluster.start(ping_interval=60)
    dead = build_node(f"sip:127.0.0.1:{free_port('udp')}")
    replies = Replies()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    [d] = await asyncio.wait_for(load_api(a).send_message("chan", b"x", dead, replies), 3)
    elapsed = loop.time() - t0
    assert (d.status, d.response) == (408, None)
    assert replies.calls == [(408, None, dead.key)]
    assert 0.45 <= elapsed < 1.5  # fr_timer is 0.5 s
    # the transaction is gone: nothing can call back a second time
    assert a.endpoint.layer.live_clients == 0
    assert replies.calls == [(408, None, dead.key)]
    snap = a.stats.snapshot()
    assert snap["timeouts"] == 1 and snap["replies_received"] == {"408": 1}
    # the default (6.1) callback leaves nodes alone without fail counting
    assert len(a.nodes) == 1


@pytest.mark.parametrize("fail_count", [True, False], ids=["fail-count", "no-fail-count"])
async def test_consumer_timeout_moves_active_node_only_to_not_active(
    cluster: Cluster, fail_count: bool
) -> None:
    nodes, _, apis = await _joined(cluster, 2, ping_interval=60, fail_count_enabled=fail_count)
    a, b = nodes
    rec = cluster.recorder(a)
    mark = rec.mark()
    await b.stop(announce=False)
    # no resp_cb: the 6.1 default callback
    [d] = await asyncio.wait_for(apis[0].bcast_message("chan", b"x"), 3)
    assert d.status == 408
    if not fail_count:
        assert node_status(a, b) is NodeStatus.ACTIVE
        assert rec.kinds(b, since=mark) == []
        return
    assert node_status(a, b) is NodeStatus.NOT_ACTIVE
    assert a.nodes.find(key_of(b)).fail_count == 1
    assert await apis[0].bcast_message("chan", b"y") == []  # no longer a broadcast target
    for _ in range(2):  # unicast still reaches for it; consumer timeouts count only while active
        [d] = await asyncio.wait_for(apis[0].send_message("chan", b"z", a.nodes.find(key_of(b))), 3)
        assert d.status == 408
    assert node_status(a, b) is NodeStatus.NOT_ACTIVE
    assert a.nodes.find(key_of(b)).fail_count == 1
    assert rec.kinds(b, since=mark) == ["down"]


async def test_pending_sends_are_cancelled_when_the_node_stops(cluster: Cluster) -> None:
    a = await cluster.start(ping_interval=60, tm={"fr_timer": 5.0})
    dead = build_node(f"sip:127.0.0.1:{free_port('udp')}")
    replies = Replies()
    pending = load_api(a).send_message("chan", b"x", dead, replies)
    await a.stop(announce=False)
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(pending, 1)
    assert replies.calls == []
    with pytest.raises(DmqError):
        load_api(a).send_message("chan", b"x", dead)
    with pytest.raises(DmqError):
        load_api(a).send_message("", b"x", dead)
