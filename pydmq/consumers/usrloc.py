"""usrloc over DMQ: a location table replicated like Kamailio's dmq_usrloc (spec §7.2).

:func:`attach` gives a DMQ node a :class:`UsrlocService`: the location table
(:class:`~pydmq.consumers.usrloc_store.LocationStore`), the ``usrloc`` channel and the Python
API::

    service = attach(node)                  # before node.start(), so the join-time sync runs
    await node.start()
    service.save("alice", "sip:alice@10.0.0.9:5060", expires=3600)
    service.lookup("alice")                 # [Contact(...)] still valid now
    service.remove("alice")                 # RM to every active node

Replication, as Kamailio 5.6.3 does it:

* a local save is broadcast as UPDATE, a local removal as RM (unless ``usrloc_delete`` is off);
  expiry is not replicated: every node expires its own copy from the absolute ``expires``;
* a received UPDATE/RM is applied to the table and never sent on, so nothing loops; applying
  the same message twice leaves the table as once (retransmissions, Kamailio's at-least-once
  workers);
* once the node has joined, the init callback broadcasts ``{"action":3}`` (``sync``); a node
  receiving it sends every valid contact back to the requester (to every active node if the
  requester is not in its list) as UPDATEs, in ``multi`` batches when ``batch_msg_contacts``
  > 1. pydmq sends a sync answer with at most ``sync_in_flight`` requests unanswered per peer,
  and a second sync request from a peer whose answer is still going out is served once more
  afterwards instead of starting a parallel stream.

Replies: ``200 OK``; ``400 Bad Request`` for a body Kamailio rejects or would crash on (no or
zero Content-Length, not JSON, ``{}``, unknown action, wrong types, over 64 KiB); ``500 Server
Internal Error`` if applying fails. A bad batch is rejected whole before anything is applied.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import secrets
import time
import uuid
from collections.abc import Callable, Coroutine, Hashable
from dataclasses import dataclass

from pydmq.config import Settings, UsrlocSettings
from pydmq.consumers.usrloc_codec import (
    Q_UNSPECIFIED,
    Action,
    Contact,
    UsrlocDecodeError,
    UsrlocMessage,
    batch_bodies,
    decode_message,
    encode_contact,
    encode_sync_request,
)
from pydmq.consumers.usrloc_store import ApplyResult, LocationStore, Record
from pydmq.dmq.api import Delivery, DmqApi, load_api
from pydmq.dmq.node import Node
from pydmq.dmq.peer import Peer, PeerResponse
from pydmq.dmq.runtime import DmqNode
from pydmq.sip.errors import SipParseError
from pydmq.sip.message import Request

__all__ = [
    "CHANNEL",
    "CONTENT_TYPE",
    "Contact",
    "UsrlocService",
    "UsrlocStats",
    "attach",
]

log = logging.getLogger(__name__)

#: dmq_usrloc's channel (R-URI user part); master makes it configurable, 5.6.3 does not.
CHANNEL = "usrloc"
CONTENT_TYPE = "application/json"
#: What Kamailio's registrar stores when a REGISTER has no User-Agent.
_NO_USER_AGENT = "n/a"


@dataclass(slots=True)
class UsrlocStats:
    """Counters of one service (read them, do not write them)."""

    received: int = 0  # KDMQ requests on the channel
    rejected: int = 0  # ... answered 400 or 500
    applied: int = 0  # UPDATE/RM that changed the table
    skipped: int = 0  # UPDATE/RM skipped: stale, old CSeq, or RM of an unknown contact
    replicated: int = 0  # local changes broadcast
    sync_requests: int = 0  # SYNC received
    sync_messages: int = 0  # sync answer bodies sent
    sync_contacts: int = 0  # contacts in them
    sync_max_in_flight: int = 0  # highest number of sync messages unanswered at once
    send_failures: int = 0  # deliveries of our messages answered with anything but 200
    expired: int = 0  # contacts removed by the expiry timer


class UsrlocService:
    """The location table of one DMQ node, its ``usrloc`` channel and its Python API.

    ``clock`` gives epoch seconds (``time.time``); tests pass a fake one. The table's
    functions that depend on time use it, and so does the expiry timer.
    """

    def __init__(
        self,
        node: DmqNode,
        settings: UsrlocSettings | None = None,
        *,
        clock: Callable[[], float] = time.time,
        api: DmqApi | None = None,
    ) -> None:
        self.node = node
        self.settings = settings if settings is not None else UsrlocSettings()
        self.clock = clock
        self.api = api if api is not None else load_api(node)
        self.store = LocationStore(self.settings.usrloc_domain)
        self.stats = UsrlocStats()
        self.peer: Peer | None = None
        self._ruid_prefix = f"uloc-{int(clock()):x}-{(os.getpid() ^ secrets.randbits(16)):x}"
        self._ruid_counter = itertools.count(1)
        self._sync_tasks: dict[Hashable, asyncio.Task[None]] = {}
        self._sync_again: set[Hashable] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._seen_running = False
        self._closed = False

    @property
    def domain(self) -> str:
        """The usrloc table name (``location``)."""
        return self.store.domain

    # -- lifecycle -------------------------------------------------------------------------
    def register(self) -> Peer:
        """Register the ``usrloc`` channel (and its init callback) on the node, once."""
        if self.peer is None:
            self.peer = self.api.register_peer(
                CHANNEL, "usrloc", self.handle_message, self.request_sync
            )
        return self.peer

    def start(self) -> None:
        """Start the expiry timer (needs a running event loop); a second call does nothing."""
        if self._closed or self._timer is not None:
            return
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.settings.timer_interval, self._on_timer)

    async def stop(self) -> None:
        """Stop the expiry timer and every sync answer still going out (idempotent).

        The channel stays registered (Kamailio cannot unregister a peer either); requests that
        still arrive are answered, but nothing is sent any more.
        """
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def _on_timer(self) -> None:
        self._timer = None
        if self._closed:
            return
        if self.node.running:
            self._seen_running = True
        elif self._seen_running:
            return  # the node has stopped: so does the timer
        try:
            self.expire()
        except Exception:  # one bad run must not stop expiry for good
            log.exception("usrloc: expiry run failed")
        self.start()

    # -- Python API ------------------------------------------------------------------------
    def normalize_aor(self, aor: str) -> str:
        """The AoR as registrar and ``ul.lookup`` key it: lower case, and without ``@domain``
        unless ``use_domain`` is on (a REGISTER for ``Alice@x`` is stored as ``alice``)."""
        if not self.settings.use_domain:
            aor = aor.split("@", 1)[0]
        return aor.lower()

    def new_ruid(self) -> str:
        """A record unique id in Kamailio's style (``uloc-<time>-<id>-<counter>``)."""
        return f"{self._ruid_prefix}-{next(self._ruid_counter)}"

    def save(
        self,
        aor: str,
        uri: str,
        *,
        expires: int | None = 3600,
        q: float | None = None,
        callid: str | None = None,
        cseq: int | None = None,
        path: str = "",
        received: str = "",
        user_agent: str = _NO_USER_AGENT,
        instance: str = "",
        reg_id: int = 0,
        server_id: int = 0,
        flags: int = 0,
        cflags: int = 0,
        methods: int = 0xFFFFFFFF,
        sock: str | None = None,
    ) -> Contact:
        """Add or refresh the contact ``uri`` of ``aor`` and replicate it (UPDATE).

        Like registrar's ``save()``: a contact with the same URI is replaced (it keeps its
        ruid; without ``callid``/``cseq`` it keeps its Call-ID and gets the next CSeq).
        ``expires`` is relative seconds (> 0), ``None`` for a permanent contact; use
        :meth:`remove` to delete. ``q`` is 0.0..1.0, ``None`` unspecified.
        """
        if expires is not None and expires <= 0:
            raise ValueError("expires must be positive seconds, or None for permanent")
        if not uri:
            raise ValueError("a contact needs a URI")
        aor = self.normalize_aor(aor)
        if not aor:
            raise ValueError("an AoR must not be empty")
        now = int(self.clock())
        old = next((c for c in self.store.get(aor) if c.uri == uri), None)
        if callid is None:
            callid = old.callid if old is not None else f"{uuid.uuid4().hex}@pydmq"
        if cseq is None:
            cseq = old.cseq + 1 if old is not None and old.callid == callid else 1
        contact = Contact(
            aor=aor,
            ruid=old.ruid if old is not None else self.new_ruid(),
            uri=uri,
            received=received,
            path=path,
            callid=callid,
            user_agent=user_agent,
            instance=instance,
            expires=0 if expires is None else now + expires,
            cseq=cseq,
            flags=flags,
            cflags=cflags,
            q=Q_UNSPECIFIED if q is None else _double2q(q),
            last_modified=now,
            methods=methods,
            reg_id=reg_id,
            server_id=server_id,
            sock=sock,
        )
        _old, stored = self.store.save(contact)
        self._replicate(Action.UPDATE, stored)
        return stored

    def lookup(self, aor: str) -> list[Contact]:
        """The contacts of ``aor`` valid now (best ``q`` first)."""
        return self.store.lookup(self.normalize_aor(aor), self.clock())

    def remove(self, aor: str, uri: str | None = None) -> list[Contact]:
        """Delete every contact of ``aor``, or only ``uri``; each is replicated as RM."""
        gone = self.store.remove(self.normalize_aor(aor), uri)
        if self.settings.usrloc_delete:
            for contact in gone:
                self._replicate(Action.RM, contact)
        return gone

    def dump(self) -> list[Record]:
        """Every record (copies), in ``ul.dump`` order; expired contacts included."""
        return self.store.records()

    def expire(self, now: float | None = None) -> list[Contact]:
        """Drop the contacts expired at ``now`` (default: the clock); not replicated."""
        gone = self.store.expire(self.clock() if now is None else now)
        if gone:
            self.stats.expired += len(gone)
            log.debug("usrloc: %d contacts expired", len(gone))
        return gone

    # -- receiving -------------------------------------------------------------------------
    def handle_message(self, request: Request, node: Node | None) -> PeerResponse:
        """The ``usrloc`` channel callback (Kamailio's ``usrloc_dmq_handle_msg``)."""
        self.stats.received += 1
        try:
            length = request.content_length
        except SipParseError:
            length = None
        try:
            if not length:
                raise UsrlocDecodeError("no Content-Length" if length is None else "empty body")
            messages = decode_message(request.body, check_sock=self.settings.replicate_socket_info)
        except UsrlocDecodeError as exc:
            self.stats.rejected += 1
            log.warning("usrloc: 400 to %s: %s", _who(request, node), exc.detail)
            return PeerResponse(exc.code, exc.reason)
        try:
            self._apply(messages, node)
        except Exception:
            self.stats.rejected += 1
            log.exception("usrloc: applying a message from %s failed", _who(request, node))
            return PeerResponse(500, "Server Internal Error")
        return PeerResponse(200, "OK")

    def _apply(self, messages: list[UsrlocMessage], node: Node | None) -> None:
        sync = False
        for message in messages:
            contact = message.contact
            if message.action is Action.SYNC:
                sync = True
                continue
            if contact is None:  # NONE
                continue
            if message.action is Action.UPDATE:
                result = self.store.apply_update(contact)
            else:
                result = self.store.apply_remove(contact)
            if result in (ApplyResult.INSERTED, ApplyResult.UPDATED, ApplyResult.REMOVED):
                self.stats.applied += 1
            else:
                self.stats.skipped += 1
                log.debug(
                    "usrloc: %s %s/%s: %s",
                    message.action.name,
                    contact.aor,
                    contact.ruid,
                    result.value,
                )
        if sync:
            self.stats.sync_requests += 1
            self._schedule_sync(node)

    # -- sending ---------------------------------------------------------------------------
    def _replicate(self, action: Action, contact: Contact) -> None:
        if not self.node.running or self._closed:
            return
        body = encode_contact(action, contact, with_sock=self.settings.replicate_socket_info)
        try:
            future = self.api.bcast_message(self.peer or CHANNEL, body, content_type=CONTENT_TYPE)
        except (RuntimeError, ValueError) as exc:  # DmqError, or the endpoint refusing
            log.warning("usrloc: could not replicate %s of %s: %s", action.name, contact.aor, exc)
            return
        self.stats.replicated += 1
        future.add_done_callback(self._settle)

    def request_sync(self) -> None:
        """The init callback: broadcast ``{"action":3}`` when ``sync`` is on."""
        if not self.settings.sync or not self.node.running or self._closed:
            return
        try:
            future = self.api.bcast_message(
                self.peer or CHANNEL, encode_sync_request(), content_type=CONTENT_TYPE
            )
        except (RuntimeError, ValueError) as exc:  # DmqError, or the endpoint refusing
            log.warning("usrloc: could not request a sync: %s", exc)
            return
        future.add_done_callback(self._settle)

    def _schedule_sync(self, node: Node | None) -> None:
        if self._closed:
            return
        target = node.snapshot() if node is not None else None
        key: Hashable = target.key if target is not None else None
        running = self._sync_tasks.get(key)
        if running is not None and not running.done():
            self._sync_again.add(key)  # served once more when the current answer is out
            return
        self._sync_tasks[key] = self._spawn(self._sync_to(target, key))

    def _spawn(self, coro: Coroutine[object, object, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _sync_to(self, node: Node | None, key: Hashable) -> None:
        try:
            while True:
                self._sync_again.discard(key)
                await self.send_all(node)
                if key not in self._sync_again or self._closed:
                    break
        except Exception:  # a bug must not end as an unretrieved task exception
            log.exception("usrloc: sync answer failed")
        finally:
            if self._sync_tasks.get(key) is asyncio.current_task():
                del self._sync_tasks[key]

    def _settle(self, future: asyncio.Future[list[Delivery]]) -> None:
        """Count a send's failed deliveries (and consume its outcome: nothing is left
        unretrieved when a send fails or the node stops)."""
        if future.cancelled():
            return
        exc = future.exception()
        if exc is not None:
            log.warning("usrloc: a send failed: %s", exc)
            return
        for delivery in future.result():
            if delivery.status != 200:
                self.stats.send_failures += 1
                log.info("usrloc: %s answered %d", delivery.node.orig_uri, delivery.status)

    async def send_all(self, node: Node | None) -> int:
        """Send every valid contact to ``node`` (every active node when ``None``) as UPDATEs.

        At most ``sync_in_flight`` messages are unanswered at any time; returns the number of
        messages sent. Stops early if a request cannot even be started (node stopped).
        """
        s = self.settings
        now = self.clock()
        contacts = [c for c in self.store.contacts() if c.is_valid(now)]
        bodies = batch_bodies(
            contacts,
            max_contacts=s.batch_msg_contacts,
            max_size=s.batch_msg_size,
            with_sock=s.replicate_socket_info,
        )
        peer = self.peer or CHANNEL
        slots = asyncio.Semaphore(s.sync_in_flight)
        pending: set[asyncio.Future[list[Delivery]]] = set()
        sent = 0

        def finished(future: asyncio.Future[list[Delivery]]) -> None:
            pending.discard(future)
            slots.release()
            self._settle(future)

        for body in bodies:
            await slots.acquire()
            if self._closed:
                slots.release()
                break
            try:
                if node is None:
                    future = self.api.bcast_message(peer, body, content_type=CONTENT_TYPE)
                else:
                    future = self.api.send_message(peer, body, node, content_type=CONTENT_TYPE)
            except (RuntimeError, ValueError) as exc:  # DmqError, or the endpoint refusing
                slots.release()
                log.warning("usrloc: sync answer stopped: %s", exc)
                break
            sent += 1
            pending.add(future)
            self.stats.sync_max_in_flight = max(self.stats.sync_max_in_flight, len(pending))
            future.add_done_callback(finished)
        self.stats.sync_messages += sent
        self.stats.sync_contacts += len(contacts) if sent else 0
        if pending:
            await asyncio.wait(set(pending))
        log.info(
            "usrloc: sync answer to %s: %d contacts in %d messages",
            node.orig_uri if node is not None else "every active node",
            len(contacts),
            sent,
        )
        return sent


def attach(
    node: DmqNode,
    settings: Settings | UsrlocSettings | None = None,
    *,
    clock: Callable[[], float] = time.time,
) -> UsrlocService:
    """Give ``node`` a replicated location table on the ``usrloc`` channel.

    Call it before ``node.start()``: the init callback (the join-time sync request) only runs
    once, when the node first joins. ``settings`` defaults to ``node.settings.usrloc``. The
    expiry timer starts now if an event loop is running, else call
    :meth:`UsrlocService.start` from the loop; :meth:`UsrlocService.stop` ends it.
    """
    if settings is None:
        settings = node.settings
    usrloc = settings.usrloc if isinstance(settings, Settings) else settings
    service = UsrlocService(node, usrloc, clock=clock)
    service.register()
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # no running loop: the caller starts the timer later
        pass
    else:
        service.start()
    return service


def _double2q(q: float) -> int:
    """Kamailio's ``double2q``: 0.0..1.0 to the integer scale 0..1000."""
    if not 0.0 <= q <= 1.0:
        raise ValueError("q must be between 0.0 and 1.0")
    return round(q * 1000)


def _who(request: Request, node: Node | None) -> str:
    if node is not None:
        return node.orig_uri
    try:
        return str(request.from_.uri)
    except SipParseError:
        return "an unknown sender"
