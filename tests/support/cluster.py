"""In-process DMQ clusters for tests: several :class:`DmqNode` in one event loop, real UDP.

Typical use (``cluster`` is the async fixture of ``tests/dmq/test_runtime.py`` and
``tests/dmq/test_api.py``)::

    a = await cluster.start()                          # a seed node on a free port
    b = await cluster.start(seeds=[a])                 # joins through a
    await wait_joined([a, b])
    rec = cluster.recorder(a)                          # membership events of a, from its start
    await rec.wait_for(b, "removed", timeout=4)

Every node started through a :class:`Cluster` is stopped when the cluster closes, whatever the
test did. Waiting is event-driven: :class:`EventRecorder` and :func:`wait_for_condition` re-check
on every membership event, and :func:`eventually` (polling) is only for conditions that no event
announces (a counter reaching a value).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from pydmq.config import settings_from_mapping
from pydmq.dmq.node import Node, NodeStatus, node_key
from pydmq.dmq.nodelist import MembershipEvent
from pydmq.dmq.runtime import DmqNode, RouteFunction

from .net import free_port

__all__ = [
    "Cluster",
    "EventRecorder",
    "eventually",
    "key_of",
    "make_settings",
    "uri_of",
    "wait_for_condition",
    "wait_joined",
]

#: Short timers: a retransmission every 50 ms, a local 408 after 0.5 s, a ping every second.
FAST_TM = {"t1": 0.05, "t2": 0.2, "t4": 0.2, "fr_timer": 0.5}


def make_settings(
    port: int,
    *,
    seeds: Sequence[str] = (),
    transport: str | None = None,
    tm: dict[str, float] | None = None,
    sip: dict[str, Any] | None = None,
    **dmq: Any,
) -> Any:
    """Settings for a node on 127.0.0.1:``port`` (ping every 1 s unless given)."""
    address = f"sip:127.0.0.1:{port}" + (f";transport={transport}" if transport else "")
    table: dict[str, Any] = {"server_address": address, "ping_interval": 1, **dmq}
    if seeds:
        table["notification_address"] = list(seeds)
    data: dict[str, Any] = {"dmq": table, "tm": {**FAST_TM, **(tm or {})}}
    if sip:
        data["sip"] = sip
    settings, _warnings = settings_from_mapping(data, "test")
    return settings


def uri_of(node: DmqNode) -> str:
    return node.local.orig_uri


def key_of(node: DmqNode | Node | str) -> tuple[str, str, str]:
    """Identity of a node as peers store it (udp is never written in bodies: proto ``*``)."""
    if isinstance(node, DmqNode):
        return node.local.key
    if isinstance(node, Node):
        return node.key
    return node_key(node)


class EventRecorder:
    """Every membership event of one node, with waiting on a predicate (no polling)."""

    def __init__(self, node: DmqNode) -> None:
        self.node = node
        self.events: list[MembershipEvent] = []
        self._waiters: list[tuple[Callable[[MembershipEvent], bool], asyncio.Future[Any]]] = []
        self._unsubscribe = node.events.subscribe(self._on_event)

    def _on_event(self, event: MembershipEvent) -> None:
        self.events.append(event)
        for predicate, fut in list(self._waiters):
            if not fut.done() and predicate(event):
                fut.set_result(event)

    def about(self, who: DmqNode | Node | str) -> list[MembershipEvent]:
        key = key_of(who)
        return [e for e in self.events if node_key(e.node_uri) == key]

    def kinds(self, who: DmqNode | Node | str, *, since: int = 0) -> list[str]:
        """Event kinds about ``who`` among the events recorded from index ``since`` on."""
        key = key_of(who)
        return [e.kind for e in self.events[since:] if node_key(e.node_uri) == key]

    def mark(self) -> int:
        """Index to pass as ``since`` later."""
        return len(self.events)

    async def wait_for(
        self,
        who: DmqNode | Node | str,
        kind: str,
        *,
        timeout: float,
        since: int = 0,
    ) -> MembershipEvent:
        """The first event ``kind`` about ``who`` from index ``since`` on, waiting if needed."""
        key = key_of(who)

        def matches(event: MembershipEvent) -> bool:
            return event.kind == kind and node_key(event.node_uri) == key

        for event in self.events[since:]:
            if matches(event):
                return event
        fut: asyncio.Future[MembershipEvent] = asyncio.get_running_loop().create_future()
        entry = (matches, fut)
        self._waiters.append(entry)
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise AssertionError(
                f"no {kind!r} event about {key} within {timeout}s; saw {self.events}\n"
                f"list: {self.node.nodes.rpc_list_nodes()}"
            ) from None
        finally:
            self._waiters.remove(entry)

    def close(self) -> None:
        self._unsubscribe()


async def wait_for_condition(
    nodes: Iterable[DmqNode], predicate: Callable[[], bool], *, timeout: float, what: str
) -> None:
    """Wait until ``predicate()`` holds, re-checking on every membership event of ``nodes``."""
    changed = asyncio.Event()
    unsubscribe = [n.events.subscribe(lambda _e: changed.set()) for n in nodes]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        while not predicate():
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), remaining)
    finally:
        for unsub in unsubscribe:
            unsub()


def _full_view(nodes: Sequence[DmqNode]) -> bool:
    for node in nodes:
        want = {key_of(other) for other in nodes if other is not node}
        have = {n.key for n in node.nodes.active_remote()}
        if not want <= have:
            return False
    return True


async def wait_joined(nodes: Sequence[DmqNode], *, timeout: float = 3.0) -> None:
    """Wait until every node lists every other one as active."""

    def describe() -> str:
        return "; ".join(f"{uri_of(n)}: {n.nodes.rpc_list_nodes()}" for n in nodes)

    try:
        await wait_for_condition(nodes, lambda: _full_view(nodes), timeout=timeout, what="join")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {describe()}") from None


async def eventually(
    predicate: Callable[[], object], *, timeout: float, what: str, interval: float = 0.01
) -> None:
    """Poll ``predicate`` (for conditions no event announces, e.g. a counter)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


class Cluster:
    """Starts nodes on free ports and stops every one of them in :meth:`close`."""

    def __init__(self) -> None:
        self.nodes: list[DmqNode] = []
        self._recorders: dict[int, EventRecorder] = {}

    def create(
        self,
        *,
        seeds: Sequence[DmqNode | str] = (),
        route: RouteFunction | None = None,
        port: int | None = None,
        **options: Any,
    ) -> DmqNode:
        """Build (not start) a node; its events are recorded from now on."""
        port = port if port is not None else free_port("both")
        seed_uris = [uri_of(s) if isinstance(s, DmqNode) else s for s in seeds]
        node = DmqNode(make_settings(port, seeds=seed_uris, **options), route=route)
        self.nodes.append(node)
        self._recorders[id(node)] = EventRecorder(node)
        return node

    async def start(
        self,
        *,
        seeds: Sequence[DmqNode | str] = (),
        route: RouteFunction | None = None,
        **options: Any,
    ) -> DmqNode:
        node = self.create(seeds=seeds, route=route, **options)
        await node.start()
        return node

    def recorder(self, node: DmqNode) -> EventRecorder:
        return self._recorders[id(node)]

    async def close(self) -> None:
        # Silent stops: the graceful path has its own tests and would cost announce timeouts
        # for nodes whose peers are already gone.
        for node in reversed(self.nodes):
            await node.stop(announce=False)
        for rec in self._recorders.values():
            rec.close()


def node_status(holder: DmqNode, who: DmqNode | Node | str) -> NodeStatus | None:
    """Status of ``who`` in ``holder``'s list, or None when it is not listed."""
    found = holder.nodes.find(key_of(who))
    return found.status if found is not None else None
