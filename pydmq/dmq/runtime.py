"""The DMQ node at run time: asyncio glue around the sans-I/O membership core.

:class:`DmqNode` owns one :class:`~pydmq.sip.endpoint.SipEndpoint`, the :class:`NodeList`, the
notification logic, the channel registry and the worker pool. It turns the notification logic's
commands into KDMQ requests, feeds replies and timeouts back, and runs the ping timer. All state
lives in one event loop, so nothing here needs a lock.

Lifecycle: :meth:`DmqNode.start` once, :meth:`DmqNode.stop` once (a stopped node cannot be
started again: build a new one). ``stop()`` announces ``status=disabled`` to every peer first
(spec 2.9, which Kamailio only intends); ``stop(announce=False)`` leaves silently, as a crashed or
killed Kamailio does, so peers only find out through their ping timeouts (spec 2.7).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import socket
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from functools import lru_cache, partial

from pydmq.config import Settings
from pydmq.dmq.multinotify import (
    expand_notification_address,
    resolve_host,
    resolver_for_server,
)
from pydmq.dmq.node import Node, NodeError, NodeKey, build_local_node, node_key
from pydmq.dmq.nodelist import MembershipEvent, MembershipPolicy, NodeList
from pydmq.dmq.notification import (
    Command,
    LogWarning,
    NotificationLogic,
    RunInitCallbacks,
    SendNotification,
)
from pydmq.dmq.peer import (
    Peer,
    PeerRegistry,
    PeerResponse,
    call_callback,
    finish_callback,
    run_init_callbacks,
)
from pydmq.dmq.stats import DmqStats, EventBus
from pydmq.dmq.worker import WorkerPool
from pydmq.sip.access import SourceFilter
from pydmq.sip.endpoint import IncomingRequest, SipEndpoint
from pydmq.sip.errors import SipParseError
from pydmq.sip.message import Limits, Request, Response
from pydmq.sip.prefork import PreforkSupervisor, StatelessRules
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


class NodeStats(DmqStats):
    """:class:`DmqStats` whose :meth:`snapshot` first pulls the counters kept below DMQ.

    ``parse_errors`` (input dropped unparsed: oversize or garbage datagrams, broken streams) and
    ``retransmissions`` (requests seen again before their reply went out, plus our own resends)
    are counted by the SIP endpoint and transports, which know nothing of DMQ stats.
    """

    __slots__ = ("_refresh",)

    def __init__(self, refresh: Callable[[DmqStats], None] | None = None) -> None:
        super().__init__()
        self._refresh = refresh

    def snapshot(self) -> dict[str, object]:
        if self._refresh is not None:
            try:
                self._refresh(self)
            except Exception:  # a stats read must never fail
                log.exception("DMQ stats: refreshing the SIP counters failed")
        return super().snapshot()


class DmqNode:
    """One DMQ node: membership, channels, workers and the developer API."""

    def __init__(self, settings: Settings, *, route: RouteFunction | None = None) -> None:
        self.settings = settings
        d = settings.dmq
        self.route: RouteFunction = route or default_route
        self.stats: DmqStats = NodeStats(self._refresh_stats)
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
            tcp_read_timeout=s.tcp_msg_read_timeout,
            max_connections=s.tcp_max_connections,
            udp_children=s.udp_children,
        )
        self.receivers: PreforkSupervisor | None = None
        self._sources = SourceFilter(d.allowed_sources)
        self._ping_handle: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[object]] = set()
        self._state = "new"  # new -> starting -> running -> stopping -> stopped
        self._start_done: asyncio.Future[None] | None = None
        self._last_warning: str | None = None

    def _build_membership(self, addresses: Sequence[str]) -> None:
        d = self.settings.dmq
        policy = MembershipPolicy(
            remove_inactive=d.remove_inactive,
            fail_count_enabled=d.fail_count_enabled,
            fail_count_threshold_not_active=d.fail_count_threshold_not_active,
            fail_count_threshold_disabled=d.fail_count_threshold_disabled,
            notification_addresses=tuple(addresses),
            # Long enough for every peer to notice the death (its first ping timeout), so a
            # stale list cannot bring a dead node back as active (see nodelist's notes).
            rejoin_holdoff=2.0 * (d.ping_interval + self.settings.tm.fr_timer),
        )
        self.nodes = NodeList(self.local, policy)
        self.notification = NotificationLogic(self.nodes, resolve_host, channel=self.channel)

    # -- lifecycle -------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        """True between :meth:`start` and :meth:`stop`."""
        return self._state == "running"

    async def start(self) -> None:
        """Listen, start the workers, ask the notification addresses for the node list.

        Raises :class:`RuntimeError` when called twice or after :meth:`stop`; if anything fails
        half-way the sockets opened so far are closed again.
        """
        if self._state != "new":
            raise RuntimeError(f"DmqNode.start() on a node that is {self._state}")
        self._state = "starting"
        self._start_done = asyncio.get_running_loop().create_future()
        try:
            await self._start()
        finally:
            self._start_done.set_result(None)

    async def _start(self) -> None:
        d = self.settings.dmq
        try:
            await self.endpoint.start()
            if self.settings.sip.udp_children > 0:
                await self._start_receivers()
            self.workers.start()
            if d.multi_notify and d.notification_address:
                expanded = await expand_notification_address(
                    d.notification_address[0], resolver=resolver_for_server(d.dns_server)
                )
                log.info("multi_notify: %s -> %s", d.notification_address[0], ", ".join(expanded))
                # The expansion stands in for the name: those nodes are the seeds (never
                # deleted, used again when the list shrinks to ourselves). Kamailio would not
                # protect them.
                self._build_membership(expanded)
        except BaseException:
            self._state = "stopped"
            await self.workers.stop(drain=False, timeout=0)
            await self._stop_receivers()
            await self.endpoint.close()
            raise
        self._state = "running"
        self._run(self.notification.start())
        self._schedule_ping()
        log.info("dmq node %s listening on %s", self.local.orig_uri, self.endpoint.specs[0])

    async def _start_receivers(self) -> None:
        """Hand the UDP sockets to ``udp_children`` receiver processes (pydmq.sip.prefork)."""
        d, s, ep = self.settings.dmq, self.settings.sip, self.endpoint
        rules = StatelessRules(
            forward_all=self.route is not default_route,
            allowed_sources=tuple(str(net) for net in d.allowed_sources),
            user_agent=ep.user_agent,
            to_tag=ep.to_tag,
            max_size=s.max_message_size,
            max_headers=s.max_headers,
            max_line=s.max_line,
        )
        supervisor = PreforkSupervisor(
            ep.transport.receiver_sockets(),
            rules,
            ep.on_checked_message,
            log_level=self.settings.log.level,
        )
        supervisor.publish_users(self.peers.ids())
        self.peers.on_change = lambda: supervisor.publish_users(self.peers.ids())
        self.receivers = supervisor
        await supervisor.start()
        log.info("UDP read by %d receiver processes: %s", s.udp_children, supervisor.pids())

    def receiver_stats(self) -> dict[str, int] | None:
        """The UDP receiver processes' counters added up (``None`` without receivers)."""
        if self.receivers is None:
            return None
        return {
            "processes": len(self.receivers.pids()),
            "restarts": self.receivers.restarts,
            **self.receivers.counters(),
        }

    async def _stop_receivers(self) -> None:
        supervisor, self.receivers = self.receivers, None
        if supervisor is not None:
            self.peers.on_change = None
            await supervisor.stop()

    async def stop(self, *, announce: bool = True, announce_timeout: float = 1.0) -> None:
        """Leave the bus and release everything; a second call returns at once.

        ``announce`` (default): send ``status=disabled`` to every peer (what Kamailio means to
        do, spec 2.9), wait up to ``announce_timeout`` seconds for their replies and let the
        queued jobs finish (also bounded by ``announce_timeout``). ``announce=False``: stop as
        if killed; nothing is sent, queued jobs are dropped and peers notice only when their
        pings time out. Either way, sends still in flight are abandoned: their response
        callbacks do not run and their futures are cancelled.
        """
        if self._state == "starting" and self._start_done is not None:
            await asyncio.shield(self._start_done)  # a stop during start: let start finish
        if self._state != "running":
            return  # never started (a no-op), failed to start, or stopping/stopped already
        self._state = "stopping"
        if self._ping_handle is not None:
            self._ping_handle.cancel()
            self._ping_handle = None
        if announce:
            futures = self._run(self.notification.shutdown())
            if futures:
                await asyncio.wait(futures, timeout=announce_timeout)
            await self.workers.stop(drain=True, timeout=announce_timeout)
        else:
            self.notification.stopped = True  # no init callbacks, broadcasts nor pings
            await self.workers.stop(drain=False, timeout=0)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        await self._stop_receivers()
        await self.endpoint.close()
        self._state = "stopped"

    # -- ping ------------------------------------------------------------------------------
    def _schedule_ping(self) -> None:
        loop = asyncio.get_running_loop()
        self._ping_handle = loop.call_later(self.settings.dmq.ping_interval, self._on_ping)

    def _on_ping(self) -> None:
        self._ping_handle = None
        if not self.running:
            return
        try:
            self.ping_now()
        except Exception:  # a bug in one round must not stop the pings for good
            log.exception("DMQ ping round failed")
        finally:
            if self.running:
                self._schedule_ping()

    def ping_now(self) -> list[FinalFuture]:
        """Run one ping round now (spec 2.8), as the timer does; the timer is not shifted.

        Returns the futures of the requests sent (one per non-local node, or the request-node-
        list of a rejoin); they complete after the replies (or local 408s) have been applied.
        """
        if not self.running:
            return []
        return self._run(self.notification.on_ping_timer())

    # -- receiving -------------------------------------------------------------------------
    def _on_request(self, incoming: IncomingRequest) -> None:
        if not self._sources.allows(incoming.source.host):
            self.stats.record_rejected(403)
            log.debug(
                "403 to %s %s from %s: not in allowed_sources",
                incoming.request.method,
                incoming.request.uri,
                incoming.source,
            )
            incoming.reply(403, "Forbidden")
            return
        self.route(self, incoming)

    def handle_message(self, incoming: IncomingRequest, *, inline: bool = False) -> int:
        """``dmq_handle_message`` (``inline=False``) / ``dmq_process_message`` (``inline=True``).

        Returns 1 when the request was dispatched or answered, -1 when it could not be (Kamailio's
        return values). Unknown channel: ``404 User Not Found``. Full worker queue: ``503``.

        ``inline`` (and ``num_workers = 0``) runs the channel callback right here, before this
        returns, as Kamailio's ``dmq_process_message`` does in the SIP worker; a coroutine
        callback is finished in a task. Otherwise the job is queued on the sender's worker, which
        keeps the messages of one sender in order (see :mod:`pydmq.dmq.worker`).
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
        if inline or self.workers.num_workers == 0:
            self.stats.record_in(channel)
            self._process_inline(peer, incoming)
            return 1

        # The From identity is parsed once: it picks the worker (per-sender order) and, in the
        # job, finds the sender node (looked up then, as the list may change meanwhile).
        sender = _sender_key(req)
        queue_key = sender if sender is not None else (incoming.source.host, incoming.source.port)
        if not self.workers.submit(queue_key, partial(self._process, peer, incoming, sender)):
            self.stats.record_rejected(503)
            incoming.reply(503, "Service Unavailable", extra_headers=[("Retry-After", "1")])
            return -1
        self.stats.record_in(channel)
        return 1

    def sender_node(self, request: Request) -> Node | None:
        """The node that sent ``request``, by its From URI (Kamailio's primary identity rule)."""
        key = _sender_key(request)
        return None if key is None else self.nodes.find(key)

    def _process(
        self, peer: Peer, incoming: IncomingRequest, sender: NodeKey | None
    ) -> Awaitable[None] | None:
        """The worker job of :meth:`handle_message`: a synchronous callback runs and is answered
        right here; a coroutine's result comes back for the worker to await (in order)."""
        node = None if sender is None else self.nodes.find(sender)
        result = call_callback(peer, incoming.request, node)
        if type(result) is not PeerResponse and inspect.isawaitable(result):
            return self._finish_inline(peer, incoming, result)
        self._answer(peer, incoming, result)
        return None

    def _process_inline(self, peer: Peer, incoming: IncomingRequest) -> None:
        """Run a synchronous callback and answer before returning; a coroutine goes to a task."""
        result = call_callback(peer, incoming.request, self.sender_node(incoming.request))
        if inspect.isawaitable(result):
            self._spawn(self._finish_inline(peer, incoming, result))
            return
        self._answer(peer, incoming, result)

    async def _finish_inline(
        self, peer: Peer, incoming: IncomingRequest, pending: Awaitable[object]
    ) -> None:
        self._answer(peer, incoming, await finish_callback(peer, pending))

    def _answer(self, peer: Peer, incoming: IncomingRequest, response: object) -> None:
        if not isinstance(response, PeerResponse):
            log.error(
                "DMQ peer %r: callback returned %s, not PeerResponse",
                peer.peer_id,
                type(response).__name__,
            )
            response = PeerResponse(500, "Server Internal Error")
        if not response.is_sendable:
            log.warning("channel %s gave no reply code/reason; sender will time out", peer.peer_id)
            return
        self.stats.record_reply_sent(response.code)
        incoming.reply(
            response.code,
            response.reason,
            body=response.body,
            content_type=response.content_type if response.body else None,
        )

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
        """One KDMQ on ``channel`` to ``node``; ``callback`` runs once with the final status.

        Raises :class:`DmqError` when the request cannot be started: the node is not running
        (not started, stopping or stopped) or has no socket for the node's transport.
        """
        if self._state not in ("running", "stopping"):
            raise DmqError(f"DMQ node is {self._state}: cannot send to {node.orig_uri}")
        dest = node_address(node)
        snapshot = node.snapshot()

        def on_final(status: int, response: Response | None) -> None:
            self.stats.record_reply_received(status)
            if status == 408 and response is None:
                self.stats.record_timeout()
            if callback is not None:
                callback(response, status, snapshot)

        try:
            future = self.endpoint.send_request(
                dest,
                KDMQ,
                kdmq_uri(channel, node),
                from_uri=kdmq_uri(channel, self.local),
                headers=[("Max-Forwards", str(max_forwards)), ("Content-Type", content_type)],
                body=body,
                on_final=on_final,
            )
        except (LookupError, ValueError) as exc:
            # No socket for the node's transport/family, or an unusable address: Kamailio's
            # "cannot set up the transaction" case, reported at once and without a callback.
            raise DmqError(f"cannot send to {node.orig_uri}: {exc}") from exc
        self.stats.record_out(channel)
        return future

    def notification_response(self, response: Response | None, status: int, node: Node) -> None:
        """The notification response callback (spec 2.7): used by pings and script sends."""
        body = response.body if response is not None and status == 200 else None
        self._run(self.notification.on_reply(node, status, body))

    def consumer_response(self, response: Response | None, status: int, node: Node) -> None:
        """The 6.1 default callback for consumers that pass none: only a 408 counts."""
        if status == 408 and self.settings.dmq.fail_count_enabled:
            self.nodes.on_consumer_timeout(node)
            self.publish_events()

    def _run(self, commands: Iterable[Command]) -> list[FinalFuture]:
        futures: list[FinalFuture] = []
        unreachable: list[Node] = []
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
                    unreachable.append(cmd.node)
            elif isinstance(cmd, RunInitCallbacks):
                self._spawn(run_init_callbacks(self.peers))
            elif isinstance(cmd, LogWarning):
                self._warn(cmd.message)
        self.publish_events()
        self._fail_unreachable(unreachable)
        return futures

    def _fail_unreachable(self, unreachable: list[Node]) -> None:
        """Give nodes we have no socket for (a transport or address family we do not listen
        on) the local 408 of a node that never answers, on the next loop iteration.

        Such a node comes from a body line (a misconfigured peer, or anyone allowed to send us
        KDMQ) or from ``dmq.add``, and no request to it can ever start: left ``active`` it would
        make every broadcast stop at it (Kamailio's rule: a request that cannot start ends the
        loop) and it would stay listed forever, since only replies and timeouts change a status.
        With the 408 it goes through the failure rules like a dead node (disabled, then deleted
        at its next ping, unless it is a notification address). ``publish_events`` sends the
        ones that just became active here, before any broadcast can reach them.
        """
        if not unreachable or not self.running:
            return
        loop = asyncio.get_running_loop()
        for node in unreachable:
            loop.call_soon(self.notification_response, None, 408, node)

    def _can_send(self, node: Node) -> bool:
        dest = node_address(node)
        family = socket.AF_INET6 if ":" in dest.host else socket.AF_INET
        try:
            self.endpoint.local_address(dest.proto, family)
        except LookupError:
            return False
        return True

    def _warn(self, message: str) -> None:
        # The same warning every ping interval (a lone seed node, say) is logged once, then
        # only at debug level until something else is worth a warning.
        if message == self._last_warning:
            log.debug("%s", message)
            return
        self._last_warning = message
        log.warning("%s", message)

    def publish_events(self) -> None:
        """Log the node list's pending membership events and hand them to ``events``
        subscribers; call it after changing ``nodes`` directly (RPC does)."""
        unreachable: list[Node] = []
        for event in self.nodes.drain_events():
            log.info(
                "node %s %s (%s -> %s)",
                event.node_uri,
                event.kind,
                event.old_status.value if event.old_status else "-",
                event.new_status.value if event.new_status else "-",
            )
            self.events.emit(event)
            if event.kind == "up":
                node = self._find_unsendable(event.node_uri)
                if node is not None:
                    unreachable.append(node)
        self._fail_unreachable(unreachable)

    def _find_unsendable(self, uri: str) -> Node | None:
        """The listed node ``uri`` if no request to it could start (see _fail_unreachable)."""
        try:
            node = self.nodes.find(uri)
        except NodeError:
            return None
        if node is None or node.local or self._can_send(node):
            return None
        log.info("node %s: no socket of ours reaches %s; it counts as not answering", uri,
                 node_address(node))  # fmt: skip
        return node

    def _spawn(self, coro: Coroutine[object, object, object]) -> None:
        if self._state == "stopped":
            coro.close()
            return
        task: asyncio.Task[object] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _refresh_stats(self, stats: DmqStats) -> None:
        ep = self.endpoint
        transport = ep.transport.stats
        stats.parse_errors = (
            transport.udp_dropped + transport.parse_errors + ep.stats.dropped_unparsable
        )
        if self.receivers is not None:
            counts = self.receivers.counters()
            stats.parse_errors += counts["dropped_unparsable"] + counts["oversize"]
        stats.retransmissions = ep.stats.absorbed_retransmissions + ep.layer.retransmissions


def _sender_key(request: Request) -> NodeKey | None:
    """The identity (host, port, transport) of the From URI; None when it cannot be read."""
    try:
        uri = request.from_.uri
        transport = uri.transport
        hostport = uri.hostport()
        return _node_key(
            f"sip:{hostport};transport={transport}" if transport else f"sip:{hostport}"
        )
    except (SipParseError, NodeError):
        return None


#: A node's identity by URI text: the same few peers send every message. A NodeError is not
#: cached (lru_cache keeps only returned values), so a bad URI costs a parse each time.
_node_key = lru_cache(maxsize=1024)(node_key)


__all__ = ["DmqError", "DmqNode", "NodeStats", "default_route", "kdmq_uri", "node_address"]
