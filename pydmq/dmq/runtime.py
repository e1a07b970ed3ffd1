"""The DMQ node at run time: asyncio glue around the sans-I/O membership core.

:class:`DmqNode` owns one :class:`~pydmq.sip.endpoint.SipEndpoint`, the :class:`NodeList`, the
notification logic, the channel registry and the worker pool. It turns the notification logic's
commands into KDMQ requests, feeds replies and timeouts back, and runs the ping timer. All state
lives in one event loop, so nothing here needs a lock.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable, Coroutine, Hashable, Iterable, Sequence
from functools import lru_cache

from pydmq.config import Settings
from pydmq.dmq.multinotify import expand_notification_address, resolve_host
from pydmq.dmq.node import Node, NodeError, NodeKey, build_local_node, node_key
from pydmq.dmq.nodelist import MembershipEvent, MembershipPolicy, NodeList
from pydmq.dmq.notification import (
    Command,
    LogWarning,
    NotificationLogic,
    RunInitCallbacks,
    SendNotification,
)
from pydmq.dmq.peer import Peer, PeerRegistry, PeerResponse, run_callback, run_init_callbacks
from pydmq.dmq.stats import DmqStats, EventBus
from pydmq.dmq.worker import WorkerPool
from pydmq.sip.endpoint import IncomingRequest, SipEndpoint
from pydmq.sip.errors import SipParseError
from pydmq.sip.message import Limits, Request, Response
from pydmq.sip.transaction import TimerConfig
from pydmq.sip.transport import Address, ListenSpec, TlsConfig

log = logging.getLogger(__name__)

KDMQ = "KDMQ"
#: Called once per destination with (reply or None for a local 408, status code, node snapshot).
ResponseCallback = Callable[[Response | None, int, Node], None]
FinalFuture = asyncio.Future[tuple[int, Response | None]]
#: A routing function: gets every request that passed the access check.
RouteFunction = Callable[["DmqNode", IncomingRequest], None]

_URI_TRANSPORTS = frozenset({"tcp", "tls", "sctp", "ws"})


class DmqError(RuntimeError):
    """A DMQ request could not even be started (no socket for the node's transport, …)."""


def kdmq_uri(channel: str, node: Node) -> str:
    """``sip:<channel>@<host>[:<port>][;transport=<t>]`` as Kamailio builds R-URI, To and From:
    host and port strings copied as written, transport only for non-UDP protocols."""
    port = f":{node.port_str}" if node.port_str else ""
    transport = f";transport={node.proto}" if node.proto in _URI_TRANSPORTS else ""
    return f"sip:{channel}@{node.host}{port}{transport}"


def node_address(node: Node) -> Address:
    """Where KDMQ requests for ``node`` go."""
    proto = node.proto if node.proto in ("tcp", "tls") else "udp"
    default = 5061 if proto == "tls" else 5060
    return Address(proto, node.resolved_ip, node.port or default)


def default_route(dmq: DmqNode, incoming: IncomingRequest) -> None:
    """The route used without a script: KDMQ → handle_message, OPTIONS → 200, else 404."""
    method = incoming.request.method
    if method == KDMQ:
        dmq.handle_message(incoming)
    elif method == "OPTIONS":
        incoming.reply(200, "OK")
    else:
        incoming.reply(404, "Not Found")


class DmqNode:
    """One DMQ node: membership, channels, workers and the developer API."""

    def __init__(self, settings: Settings, *, route: RouteFunction | None = None) -> None:
        self.settings = settings
        d = settings.dmq
        self.route: RouteFunction = route or default_route
        self.stats = DmqStats()
        self.events: EventBus[MembershipEvent] = EventBus()
        self.peers = PeerRegistry()
        self.channel = d.notification_channel
        self.peers.register(self.channel, "DMQ notification channel", self._notification_callback)
        self.local = build_local_node(d.server_address, resolve_host)
        self._build_membership(d.notification_address)
        self.workers = WorkerPool(d.num_workers, d.worker_usleep, d.max_queue)
        self.stats.queue_depth_source = self.workers.depth
        spec = (
            ListenSpec.parse(d.server_socket)
            if d.server_socket
            else ListenSpec.from_server_address(d.server_address)
        )
        s = settings.sip
        tls = (
            TlsConfig(
                certfile=s.tls_certfile,
                keyfile=s.tls_keyfile or s.tls_certfile,
                cafile=s.tls_cafile,
                verify_client=s.tls_verify_client,
                verify_server=s.tls_cafile is not None,
            )
            if s.tls_certfile
            else None
        )
        tm = settings.tm
        self.endpoint = SipEndpoint(
            [spec],
            self._on_request,
            timers=TimerConfig(t1=tm.t1, t2=tm.t2, t4=tm.t4, fr_timer=tm.fr_timer),
            limits=Limits(s.max_message_size, s.max_headers, s.max_line),
            tls=tls,
            tcp_idle_timeout=s.tcp_idle_timeout,
        )
        self._everyone = _covers_everything(d.allowed_sources)
        self._allowed = lru_cache(maxsize=4096)(self._source_allowed)
        self._ping_handle: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[object]] = set()
        self._started = False

    def _build_membership(self, addresses: Sequence[str]) -> None:
        d = self.settings.dmq
        policy = MembershipPolicy(
            remove_inactive=d.remove_inactive,
            fail_count_enabled=d.fail_count_enabled,
            fail_count_threshold_not_active=d.fail_count_threshold_not_active,
            fail_count_threshold_disabled=d.fail_count_threshold_disabled,
            notification_addresses=tuple(addresses),
        )
        self.nodes = NodeList(self.local, policy)
        self.notification = NotificationLogic(self.nodes, resolve_host, channel=self.channel)

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Listen, start the workers, ask the notification addresses for the node list."""
        d = self.settings.dmq
        await self.endpoint.start()
        self.workers.start()
        self._started = True
        if d.multi_notify and d.notification_address:
            expanded = await expand_notification_address(d.notification_address[0])
            log.info("multi_notify: %s -> %s", d.notification_address[0], ", ".join(expanded))
            # The expansion stands in for the name: those nodes are the seeds (never deleted,
            # used again when the list shrinks to ourselves). Kamailio would not protect them.
            self._build_membership(expanded)
        self._run(self.notification.start())
        self._schedule_ping()
        log.info("dmq node %s listening on %s", self.local.orig_uri, self.endpoint.specs[0])

    async def stop(self, *, announce_timeout: float = 1.0) -> None:
        """Announce ``status=disabled`` to every peer (what Kamailio means to do), then stop."""
        if not self._started:
            return
        self._started = False
        if self._ping_handle is not None:
            self._ping_handle.cancel()
        futures = self._run(self.notification.shutdown())
        if futures:
            await asyncio.wait(futures, timeout=announce_timeout)
        await self.workers.stop(drain=True, timeout=announce_timeout)
        for task in list(self._tasks):
            task.cancel()
        await self.endpoint.close()

    # -- ping ------------------------------------------------------------------------------
    def _schedule_ping(self) -> None:
        loop = asyncio.get_running_loop()
        self._ping_handle = loop.call_later(self.settings.dmq.ping_interval, self._on_ping)

    def _on_ping(self) -> None:
        if not self._started:
            return
        self._run(self.notification.on_ping_timer())
        self._schedule_ping()

    # -- receiving -------------------------------------------------------------------------
    def _source_allowed(self, ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(addr in net for net in self.settings.dmq.allowed_sources)

    def _on_request(self, incoming: IncomingRequest) -> None:
        if not self._everyone and not self._allowed(incoming.source.host):
            self.stats.record_rejected(403)
            incoming.reply(403, "Forbidden")
            return
        self.route(self, incoming)

    def handle_message(self, incoming: IncomingRequest, *, inline: bool = False) -> int:
        """``dmq_handle_message`` (``inline=False``) / ``dmq_process_message`` (``inline=True``).

        Returns 1 when the request was dispatched or answered, -1 when it could not be (Kamailio's
        return values). Unknown channel: ``404 User Not Found``. Full worker queue: ``503``.
        """
        req = incoming.request
        try:
            channel = req.ruri.user
        except SipParseError as exc:
            incoming.reply(400, exc.reason)
            return -1
        if not channel:
            incoming.reply(400, "Missing Channel In R-URI")
            return -1
        peer = self.peers.get(channel)
        if peer is None:
            self.stats.record_rejected(404)
            incoming.reply(404, "User Not Found")
            return 1
        self.stats.record_in(channel)

        async def job() -> None:
            await self._process(peer, incoming)

        if inline or self.workers.num_workers == 0:
            self._spawn(job())
            return 1
        if not self.workers.submit(self._sender_key(incoming), job):
            self.stats.record_rejected(503)
            incoming.reply(503, "Service Unavailable", extra_headers=[("Retry-After", "1")])
            return -1
        return 1

    def _sender_key(self, incoming: IncomingRequest) -> Hashable:
        try:
            return _from_key(incoming.request)
        except (SipParseError, NodeError):
            return (incoming.source.host, incoming.source.port)

    def sender_node(self, request: Request) -> Node | None:
        """The node that sent ``request``, by its From URI (Kamailio's primary identity rule)."""
        try:
            return self.nodes.find(_from_key(request))
        except (SipParseError, NodeError):
            return None

    async def _process(self, peer: Peer, incoming: IncomingRequest) -> None:
        node = self.sender_node(incoming.request)
        response = await run_callback(peer, incoming.request, node)
        if response.is_sendable:
            self.stats.record_reply_sent(response.code)
            incoming.reply(
                response.code,
                response.reason,
                body=response.body,
                content_type=response.content_type if response.body else None,
            )
        else:
            log.warning("channel %s gave no reply code/reason; sender will time out", peer.peer_id)

    def _notification_callback(self, request: Request, node: Node | None) -> PeerResponse:
        sender: Node | str | None = node
        if sender is None:
            try:
                sender = str(request.from_.uri)
            except SipParseError:
                sender = None
        outcome = self.notification.on_request(
            sender, request.body, request.max_forwards, request.content_length is not None
        )
        self._run(outcome.commands)
        return PeerResponse(outcome.status, outcome.reason, outcome.body, outcome.content_type)

    # -- sending ---------------------------------------------------------------------------
    def send_kdmq(
        self,
        node: Node,
        channel: str,
        body: bytes,
        *,
        max_forwards: int = 1,
        content_type: str = "text/plain",
        callback: ResponseCallback | None = None,
    ) -> FinalFuture:
        """One KDMQ on ``channel`` to ``node``; ``callback`` runs once with the final status."""
        dest = node_address(node)
        try:
            self.endpoint.local_address(dest.proto)
        except (KeyError, LookupError, ValueError) as exc:
            raise DmqError(f"no {dest.proto} socket to reach {node.orig_uri}") from exc
        snapshot = node.snapshot()
        self.stats.record_out(channel)

        def on_final(status: int, response: Response | None) -> None:
            self.stats.record_reply_received(status)
            if status == 408 and response is None:
                self.stats.record_timeout()
            if callback is not None:
                callback(response, status, snapshot)

        return self.endpoint.send_request(
            dest,
            KDMQ,
            kdmq_uri(channel, node),
            from_uri=kdmq_uri(channel, self.local),
            headers=[("Max-Forwards", str(max_forwards)), ("Content-Type", content_type)],
            body=body,
            on_final=on_final,
        )

    def notification_response(self, response: Response | None, status: int, node: Node) -> None:
        """The notification response callback (spec 2.7): used by pings and script sends."""
        body = response.body if response is not None and status == 200 else None
        self._run(self.notification.on_reply(node, status, body))

    def consumer_response(self, response: Response | None, status: int, node: Node) -> None:
        """The 6.1 default callback for consumers that pass none: only a 408 counts."""
        if status == 408 and self.settings.dmq.fail_count_enabled:
            self.nodes.on_consumer_timeout(node)
            self._publish_events()

    def _run(self, commands: Iterable[Command]) -> list[FinalFuture]:
        futures: list[FinalFuture] = []
        for cmd in commands:
            if isinstance(cmd, SendNotification):
                try:
                    futures.append(
                        self.send_kdmq(
                            cmd.node,
                            cmd.channel,
                            cmd.body,
                            max_forwards=cmd.max_forwards,
                            content_type=cmd.content_type,
                            callback=self.notification_response,
                        )
                    )
                except DmqError as exc:
                    log.warning("%s", exc)
            elif isinstance(cmd, RunInitCallbacks):
                self._spawn(run_init_callbacks(self.peers))
            elif isinstance(cmd, LogWarning):
                log.warning("%s", cmd.message)
        self._publish_events()
        return futures

    def _publish_events(self) -> None:
        for event in self.nodes.drain_events():
            log.info(
                "node %s %s (%s -> %s)",
                event.node_uri,
                event.kind,
                event.old_status.value if event.old_status else "-",
                event.new_status.value if event.new_status else "-",
            )
            self.events.emit(event)

    def _spawn(self, coro: Coroutine[object, object, object]) -> None:
        task: asyncio.Task[object] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _from_key(request: Request) -> NodeKey:
    uri = request.from_.uri
    transport = f";transport={uri.transport}" if uri.transport else ""
    return node_key(f"sip:{uri.hostport()}{transport}")


def _covers_everything(networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    nets = {str(n) for n in networks}
    return "0.0.0.0/0" in nets and "::/0" in nets


__all__ = ["DmqError", "DmqNode", "default_route", "kdmq_uri", "node_address"]
