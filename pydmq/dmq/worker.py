"""DMQ workers: ``num_workers`` asyncio tasks, each with its own bounded FIFO queue.

Kamailio forks ``num_workers`` "DMQ WORKER" processes and gives each job to the first worker with
an empty queue, else to the one with the shortest queue (dmq-protocol.md §3.2, §3.3). That gives
no ordering across workers (§1.5.3): two messages from one node may be applied out of order.

pydmq instead sends every job of one sender (``sender_key``, e.g. the sender's identity tuple) to
the same worker, chosen by a hash that is stable for the life of the process. Messages from one
node are therefore applied in the order they were received, which consumers such as htable
(set, then delete) rely on in practice. Kamailio peers cannot observe the difference: they never
relied on ordering. The price is that one busy sender cannot spill over to idle workers.

Queues are bounded: :meth:`WorkerPool.submit` returns False instead of growing without limit, and
the caller answers ``503`` (Kamailio would keep queueing in shared memory until it runs out).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from typing import NamedTuple, TypeAlias

__all__ = ["Job", "QueueDepth", "WorkerPool"]

logger = logging.getLogger(__name__)

#: A unit of work: a zero-argument function. If it returns an awaitable (an ``async def``
#: does), the worker awaits it before the next job of its queue; a plain function returning
#: None runs to completion right away, without a coroutine of its own.
Job: TypeAlias = Callable[[], Awaitable[None] | None]

#: A worker runs queued jobs back to back for at most this many jobs / seconds before it lets the
#: event loop read sockets and run the other workers. Yielding after every job capped a worker at
#: one job per loop iteration (the transports hand up to 32 datagrams per iteration), so a busy
#: channel's queue grew until 503; a burst keeps up, and 64 jobs of a few tens of microseconds
#: (or 2 ms) delay the socket reads less than a peer could notice.
BURST_JOBS = 64
BURST_SECONDS = 0.002


class QueueDepth(NamedTuple):
    """Jobs waiting (not yet started): in total and per worker."""

    total: int
    per_worker: tuple[int, ...]


class WorkerPool:
    """Runs jobs on ``num_workers`` tasks, keeping per-sender order.

    ``worker_usleep`` mirrors the Kamailio parameter: 0 (the default there) means a worker sleeps
    on an :class:`asyncio.Event` that :meth:`submit` sets, so an idle worker costs nothing; a value
    above 0 means the worker polls its queue every ``worker_usleep`` microseconds instead, as the
    module docs describe. ``max_queue`` bounds each worker's queue of waiting jobs.

    ``num_workers == 0`` is allowed, as in Kamailio, but then nothing can be queued:
    :meth:`submit` always returns False, like ``dmq_handle_message`` returning -1 (Kamailio sends
    no reply in that case; such a node has to process messages inline).
    """

    def __init__(self, num_workers: int, worker_usleep: int, max_queue: int) -> None:
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, not {num_workers}")
        if worker_usleep < 0:
            raise ValueError(f"worker_usleep must be >= 0, not {worker_usleep}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, not {max_queue}")
        self._num_workers = num_workers
        self._poll_interval = worker_usleep / 1_000_000
        self._max_queue = max_queue
        self._queues: list[deque[Job]] = [deque() for _ in range(num_workers)]
        self._wakeups: list[asyncio.Event] = [asyncio.Event() for _ in range(num_workers)]
        self._tasks: list[asyncio.Task[None]] = []
        self._accepting = False
        self._closing = False
        #: Jobs that finished without raising.
        self.jobs_done = 0
        #: Jobs that raised (logged; the worker carried on).
        self.jobs_failed = 0
        #: Submissions refused: queue full, no workers, or pool not running.
        self.jobs_rejected = 0
        #: Queued jobs thrown away by a stop that did not (or could not) drain.
        self.jobs_dropped = 0

    @property
    def num_workers(self) -> int:
        return self._num_workers

    @property
    def max_queue(self) -> int:
        return self._max_queue

    @property
    def running(self) -> bool:
        """True between :meth:`start` and :meth:`stop`, i.e. while :meth:`submit` can accept."""
        return self._accepting

    def worker_index(self, sender_key: Hashable) -> int:
        """The worker that gets every job of ``sender_key``.

        Uses ``hash()``, so keys that compare equal always map to the same worker (and the result
        is stable within the process, which is all per-sender order needs). A ``repr``-based hash
        would split equal keys with different spellings or keys whose repr changes over time.
        """
        if self._num_workers == 0:
            raise ValueError("the pool has no workers")
        return hash(sender_key) % self._num_workers

    def start(self) -> None:
        """Start the worker tasks; needs a running event loop. A pool starts only once."""
        if self._tasks or self._closing:
            raise RuntimeError("WorkerPool.start() called twice")
        self._tasks = [
            asyncio.get_running_loop().create_task(self._run(i), name=f"dmq-worker-{i}")
            for i in range(self._num_workers)
        ]
        self._accepting = True

    def submit(self, sender_key: Hashable, job: Job) -> bool:
        """Queue ``job`` on the worker of ``sender_key``; False if it cannot be queued.

        False means: that worker's queue already holds ``max_queue`` jobs (answer ``503``), the
        pool has no workers, or it is not running (not started yet, or stopping).
        """
        if not self._accepting or self._num_workers == 0:
            self.jobs_rejected += 1
            return False
        index = hash(sender_key) % self._num_workers  # worker_index(), inlined
        queue = self._queues[index]
        if len(queue) >= self._max_queue:
            self.jobs_rejected += 1
            return False
        queue.append(job)
        self._wakeups[index].set()
        return True

    def depth(self) -> QueueDepth:
        """Jobs waiting to start, in total and per worker (a running job is not counted)."""
        per_worker = tuple(len(q) for q in self._queues)
        return QueueDepth(sum(per_worker), per_worker)

    def counters(self) -> dict[str, int]:
        """The job counters, for stats and RPC."""
        return {
            "jobs_done": self.jobs_done,
            "jobs_failed": self.jobs_failed,
            "jobs_rejected": self.jobs_rejected,
            "jobs_dropped": self.jobs_dropped,
        }

    async def stop(self, drain: bool = True, timeout: float = 5.0) -> None:
        """Stop accepting jobs, then finish the queued ones (``drain``) or cancel everything.

        Draining is bounded by ``timeout`` seconds; whatever is still running then is cancelled
        and the jobs still queued are dropped (counted in ``jobs_dropped`` and logged).
        """
        self._accepting = False
        self._closing = True
        tasks = self._tasks
        if not tasks:
            return
        if drain:
            for event in self._wakeups:
                event.set()
            _, pending = await asyncio.wait(tasks, timeout=timeout)
            if pending:
                logger.warning(
                    "DMQ workers did not drain within %.3gs; cancelling %d of them",
                    timeout,
                    len(pending),
                )
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        dropped = sum(len(q) for q in self._queues)
        if dropped:
            self.jobs_dropped += dropped
            logger.warning("DMQ workers stopped; dropped %d queued jobs", dropped)
        for queue in self._queues:
            queue.clear()

    async def _run(self, index: int) -> None:
        queue = self._queues[index]
        wakeup = self._wakeups[index]
        clock = time.monotonic
        popleft = queue.popleft
        while True:
            if not queue:
                if self._closing:
                    return
                if self._poll_interval > 0:
                    # worker_usleep > 0: poll, as documented for Kamailio's worker_usleep.
                    await asyncio.sleep(self._poll_interval)
                else:
                    # No await between the emptiness check and clear(), so a submit cannot slip
                    # in unnoticed: a job appended later sets the event again.
                    wakeup.clear()
                    await wakeup.wait()
                continue
            # One burst: queued jobs back to back, at most BURST_JOBS of them or BURST_SECONDS.
            burst_end = clock() + BURST_SECONDS
            burst = 0
            while True:
                job = popleft()
                # The job runs here rather than in a helper coroutine: one frame less per job.
                try:
                    pending = job()
                    if pending is not None:
                        await pending
                except asyncio.CancelledError:
                    task = asyncio.current_task()
                    if task is not None and task.cancelling():
                        raise  # The worker itself is being cancelled (stop).
                    self.jobs_failed += 1
                    logger.error("DMQ worker %d: job was cancelled", index)
                except Exception:
                    self.jobs_failed += 1
                    logger.exception("DMQ worker %d: job failed", index)
                else:
                    self.jobs_done += 1
                burst += 1
                if not queue:
                    break  # back to waiting, which lets the loop run
                if burst >= BURST_JOBS or clock() >= burst_end:
                    # Jobs that never suspend would otherwise starve transports and other
                    # workers (Kamailio workers are processes; ours share one event loop).
                    await asyncio.sleep(0)
                    break
