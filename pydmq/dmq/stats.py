"""Counters for a DMQ node and a small event bus for membership changes.

Both are plain Python on purpose: the counters are bumped on hot paths and read by RPC, and the
bus lets consumers and RPC follow node-list changes without the node list knowing about them.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeAlias, TypeVar

__all__ = ["DepthSource", "DmqStats", "EventBus", "Listener"]

logger = logging.getLogger(__name__)

#: Returns ``(total, per_worker)`` queue depths; ``WorkerPool.depth`` fits.
DepthSource: TypeAlias = Callable[[], tuple[int, Sequence[int]]]

#: The codes pydmq answers itself when it refuses a request (``403`` unknown sender, ``503``
#: queue full); always present in the snapshot so monitoring sees a stable shape.
REJECT_CODES = (403, 503)


@dataclass(slots=True)
class DmqStats:
    """What a node has sent, received and refused.

    ``messages_in`` / ``messages_out`` count KDMQ requests per channel; ``replies_sent`` /
    ``replies_received`` count final replies per status code; ``timeouts`` counts local 408s
    (requests that got no final reply by ``fr_timer``); ``retransmissions`` counts requests
    seen again before their reply went out (§1.5.2) plus our own resent requests; ``rejected``
    counts requests refused per code; ``parse_errors`` counts input dropped unparsed.
    """

    messages_in: dict[str, int] = field(default_factory=dict)
    messages_out: dict[str, int] = field(default_factory=dict)
    replies_sent: dict[int, int] = field(default_factory=dict)
    replies_received: dict[int, int] = field(default_factory=dict)
    rejected: dict[int, int] = field(default_factory=lambda: dict.fromkeys(REJECT_CODES, 0))
    retransmissions: int = 0
    timeouts: int = 0
    parse_errors: int = 0
    #: Set by whoever owns the worker pool, e.g. ``stats.queue_depth_source = pool.depth``.
    queue_depth_source: DepthSource | None = None

    # The counters are bumped inline (no helper call): record_in and record_reply_sent run for
    # every request.
    def record_in(self, channel: str) -> None:
        counter = self.messages_in
        counter[channel] = counter.get(channel, 0) + 1

    def record_out(self, channel: str) -> None:
        counter = self.messages_out
        counter[channel] = counter.get(channel, 0) + 1

    def record_reply_sent(self, code: int) -> None:
        counter = self.replies_sent
        counter[code] = counter.get(code, 0) + 1

    def record_reply_received(self, code: int) -> None:
        counter = self.replies_received
        counter[code] = counter.get(code, 0) + 1

    def record_rejected(self, code: int) -> None:
        counter = self.rejected
        counter[code] = counter.get(code, 0) + 1

    def record_retransmission(self) -> None:
        self.retransmissions += 1

    def record_timeout(self) -> None:
        self.timeouts += 1

    def record_parse_error(self) -> None:
        self.parse_errors += 1

    def snapshot(self) -> dict[str, object]:
        """A copy that ``json.dumps`` accepts: string keys, plain ints, lists.

        ``queue_depth`` is None without a source, or if the source fails (logged): a stats read
        must never fail because of a component being torn down.
        """
        depth: dict[str, object] | None = None
        if self.queue_depth_source is not None:
            try:
                total, per_worker = self.queue_depth_source()
                depth = {"total": int(total), "per_worker": [int(d) for d in per_worker]}
            except Exception:
                logger.exception("DMQ stats: queue depth source failed")
        return {
            "messages_in": dict(self.messages_in),
            "messages_out": dict(self.messages_out),
            "replies_sent": {str(k): v for k, v in sorted(self.replies_sent.items())},
            "replies_received": {str(k): v for k, v in sorted(self.replies_received.items())},
            "rejected": {str(k): v for k, v in sorted(self.rejected.items())},
            "retransmissions": self.retransmissions,
            "timeouts": self.timeouts,
            "parse_errors_dropped": self.parse_errors,
            "queue_depth": depth,
        }


E = TypeVar("E")

#: A subscriber: a plain function, or one returning an awaitable (e.g. an ``async def``).
Listener: TypeAlias = Callable[[E], "Awaitable[None] | None"]


class EventBus(Generic[E]):
    """Fan-out of events (e.g. node joined / status changed / removed) to subscribers.

    :meth:`emit` is synchronous so the sans-I/O node-list code can call it: plain callbacks run
    inline, asynchronous ones are scheduled as tasks on the running loop. A failing subscriber is
    logged and never disturbs the emitter or the other subscribers.
    """

    def __init__(self) -> None:
        self._listeners: list[Listener[E]] = []
        self._pending: set[asyncio.Future[None]] = set()

    def subscribe(self, callback: Listener[E]) -> Callable[[], None]:
        """Add ``callback``; return a function that removes it again."""
        self._listeners.append(callback)

        def unsubscribe() -> None:
            if callback in self._listeners:
                self._listeners.remove(callback)

        return unsubscribe

    def __len__(self) -> int:
        return len(self._listeners)

    def emit(self, event: E) -> None:
        """Deliver ``event`` to every subscriber, in subscription order."""
        for callback in list(self._listeners):
            try:
                result = callback(event)
            except Exception:
                logger.exception("DMQ event subscriber %r failed on %r", callback, event)
                continue
            if inspect.isawaitable(result):
                self._schedule(result, callback, event)

    async def join(self) -> None:
        """Wait until every asynchronous delivery scheduled so far has finished."""
        while self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)

    def _schedule(self, awaitable: Awaitable[None], callback: Listener[E], event: E) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            logger.error(
                "DMQ event subscriber %r is async but no event loop runs; %r not delivered",
                callback,
                event,
            )
            if inspect.iscoroutine(awaitable):
                awaitable.close()  # Avoid "coroutine was never awaited".
            return
        future = asyncio.ensure_future(awaitable, loop=loop)
        self._pending.add(future)

        def done(fut: asyncio.Future[None]) -> None:
            self._pending.discard(fut)
            if not fut.cancelled() and (exc := fut.exception()) is not None:
                logger.error("DMQ event subscriber %r failed on %r", callback, event, exc_info=exc)

        future.add_done_callback(done)
