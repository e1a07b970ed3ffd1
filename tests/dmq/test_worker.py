"""Worker pool (per-sender order, bounded queues, wake-up modes, stop) and stats / event bus."""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections import defaultdict
from dataclasses import dataclass

import pytest

from pydmq.dmq.stats import DmqStats, EventBus
from pydmq.dmq.worker import QueueDepth, WorkerPool

WAIT = 5.0  # upper bound for every await on an event; tests finish far sooner


@pytest.fixture
async def make_pool():
    """Build started pools and make sure none outlives its test."""
    pools: list[WorkerPool] = []

    def make(num_workers=2, worker_usleep=0, max_queue=100, start=True):
        pool = WorkerPool(num_workers, worker_usleep, max_queue)
        pools.append(pool)
        if start:
            pool.start()
        return pool

    yield make
    for pool in pools:
        await pool.stop(drain=False)


class Countdown:
    """An event that fires after ``n`` calls to ``tick``."""

    def __init__(self, n):
        self.remaining = n
        self.event = asyncio.Event()
        if n == 0:
            self.event.set()

    def tick(self):
        self.remaining -= 1
        if self.remaining == 0:
            self.event.set()

    async def wait(self):
        await asyncio.wait_for(self.event.wait(), WAIT)


def worker_tasks():
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("dmq-worker-")]


def keys_on_distinct_workers(pool, count):
    """``count`` sender keys that land on pairwise different workers."""
    found: dict[int, str] = {}
    i = 0
    while len(found) < count:
        key = f"node-{i}"
        found.setdefault(pool.worker_index(key), key)
        i += 1
    return list(found.values())


# --- construction -----------------------------------------------------------------------------


@pytest.mark.parametrize(("workers", "usleep", "max_queue"), [(-1, 0, 1), (1, -1, 1), (1, 0, 0)])
def test_invalid_arguments(workers, usleep, max_queue):
    with pytest.raises(ValueError):
        WorkerPool(workers, usleep, max_queue)


async def test_start_twice_is_an_error(make_pool):
    pool = make_pool()
    with pytest.raises(RuntimeError):
        pool.start()


# --- ordering and spreading -------------------------------------------------------------------


async def test_per_sender_fifo_with_interleaved_senders(make_pool):
    pool = make_pool(num_workers=4, max_queue=1000)
    rng = random.Random(1234)
    senders = [("udp", f"10.0.0.{i}", "5060") for i in range(12)]
    per_sender = 40
    done = Countdown(len(senders) * per_sender)
    applied: dict[tuple[str, str, str], list[int]] = defaultdict(list)

    def job(sender, seq, yields):
        async def run():
            for _ in range(yields):
                await asyncio.sleep(0)
            applied[sender].append(seq)
            done.tick()

        return run

    # Interleave senders in a random order; each sender's own sequence stays increasing.
    next_seq = dict.fromkeys(senders, 0)
    while any(n < per_sender for n in next_seq.values()):
        sender = rng.choice([s for s, n in next_seq.items() if n < per_sender])
        assert pool.submit(sender, job(sender, next_seq[sender], rng.randint(0, 5)))
        next_seq[sender] += 1

    await done.wait()
    for sender in senders:
        assert applied[sender] == list(range(per_sender)), sender
    assert pool.jobs_done == len(senders) * per_sender
    assert pool.depth() == QueueDepth(0, (0, 0, 0, 0))


async def test_same_key_same_worker_and_senders_spread(make_pool):
    pool = make_pool(num_workers=4)
    keys = [f"sip:10.0.0.{i}:5060" for i in range(64)]
    done = Countdown(2 * len(keys))
    ran_on: dict[str, set[str]] = defaultdict(set)

    def job(key):
        async def run():
            ran_on[key].add(asyncio.current_task().get_name())
            done.tick()

        return run

    for _ in range(2):
        for key in keys:
            assert pool.submit(key, job(key))
    await done.wait()
    for key in keys:
        assert ran_on[key] == {f"dmq-worker-{pool.worker_index(key)}"}
    assert set().union(*ran_on.values()) == {f"dmq-worker-{i}" for i in range(4)}
    # Equal keys map to the same worker whatever object spells them.
    assert pool.worker_index(("udp", "1.2.3.4", 5060)) == pool.worker_index(
        tuple(["udp", "1.2.3.4", 5060])
    )


async def test_blocked_sender_does_not_block_other_workers(make_pool):
    pool = make_pool(num_workers=2)
    slow_key, fast_key = keys_on_distinct_workers(pool, 2)
    release = asyncio.Event()
    fast_done = asyncio.Event()

    async def slow():
        await release.wait()

    async def fast():
        fast_done.set()

    assert pool.submit(slow_key, slow)
    assert pool.submit(fast_key, fast)
    await asyncio.wait_for(fast_done.wait(), WAIT)
    release.set()


# --- bounded queues ---------------------------------------------------------------------------


async def test_full_queue_rejects_and_depth_stays_bounded(make_pool):
    pool = make_pool(num_workers=2, max_queue=3)
    busy_key, other_key = keys_on_distinct_workers(pool, 2)
    busy_index = pool.worker_index(busy_key)
    started, release = asyncio.Event(), asyncio.Event()
    done = Countdown(4)

    async def blocker():
        started.set()
        await release.wait()
        done.tick()

    async def quick():
        done.tick()

    assert pool.submit(busy_key, blocker)
    await asyncio.wait_for(started.wait(), WAIT)  # the blocker left the queue and runs
    for _ in range(3):
        assert pool.submit(busy_key, quick)
    for _ in range(10):
        assert pool.submit(busy_key, quick) is False
    depth = pool.depth()
    assert depth.total == 3
    assert depth.per_worker[busy_index] == 3
    assert pool.jobs_rejected == 10

    # The other worker's queue is independent.
    other_done = asyncio.Event()

    async def other():
        other_done.set()

    assert pool.submit(other_key, other)
    await asyncio.wait_for(other_done.wait(), WAIT)

    release.set()
    await done.wait()
    assert pool.depth().total == 0
    assert pool.submit(busy_key, quick)  # room again


# --- wake-up modes ----------------------------------------------------------------------------


async def test_worker_usleep_polling_processes_jobs(make_pool):
    pool = make_pool(num_workers=2, worker_usleep=1000)
    first = Countdown(10)
    for i in range(10):

        async def job():
            first.tick()

        assert pool.submit(i, job)
    await first.wait()

    # A job submitted while the workers are idle is still picked up by polling.
    late = asyncio.Event()

    async def late_job():
        late.set()

    assert pool.submit("late", late_job)
    await asyncio.wait_for(late.wait(), WAIT)
    assert pool.jobs_done == 11


async def idle_worker_awaits(pool):
    """What the (single) idle worker coroutine is suspended in, e.g. ``Event.wait``."""
    for _ in range(5):
        await asyncio.sleep(0)  # let the worker reach its idle wait
    (task,) = worker_tasks()
    return task.get_coro().cr_await.__qualname__


async def test_event_mode_idle_worker_waits_on_event_not_polling(make_pool):
    pool = make_pool(num_workers=1, worker_usleep=0)
    assert await idle_worker_awaits(pool) == "Event.wait"
    done = asyncio.Event()

    async def job():
        done.set()

    assert pool.submit("k", job)
    await asyncio.wait_for(done.wait(), WAIT)
    assert await idle_worker_awaits(pool) == "Event.wait"


async def test_usleep_mode_idle_worker_polls(make_pool):
    pool = make_pool(num_workers=1, worker_usleep=500)
    assert await idle_worker_awaits(pool) == "sleep"


# --- no workers, not running ------------------------------------------------------------------


async def test_zero_workers_rejects_everything(make_pool):
    pool = make_pool(num_workers=0)

    async def job():
        raise AssertionError("must not run")

    assert pool.submit("node", job) is False
    assert pool.jobs_rejected == 1
    assert pool.depth() == QueueDepth(0, ())
    with pytest.raises(ValueError):
        pool.worker_index("node")
    await pool.stop()


async def test_submit_before_start_and_after_stop_is_rejected(make_pool):
    pool = make_pool(start=False)

    async def job():
        pass

    assert pool.submit("k", job) is False
    pool.start()
    assert pool.running
    await pool.stop()
    assert not pool.running
    assert pool.submit("k", job) is False
    assert pool.jobs_rejected == 2
    with pytest.raises(RuntimeError):
        pool.start()


# --- stop -------------------------------------------------------------------------------------


async def test_stop_drains_queued_jobs(make_pool):
    pool = make_pool(num_workers=2)
    tasks = worker_tasks()
    finished = []
    for i in range(30):

        async def job(i=i):
            for _ in range(3):
                await asyncio.sleep(0)
            finished.append(i)

        assert pool.submit(i % 5, job)
    await asyncio.wait_for(pool.stop(drain=True, timeout=WAIT), WAIT + 1)
    assert sorted(finished) == list(range(30))
    assert pool.jobs_done == 30
    assert pool.jobs_dropped == 0
    assert len(tasks) == 2
    assert all(task.done() for task in tasks)


async def test_stop_without_drain_cancels_and_drops(make_pool):
    pool = make_pool(num_workers=1)
    started = asyncio.Event()
    cancelled = []

    async def blocker():
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    async def never():
        raise AssertionError("dropped job ran")

    assert pool.submit("k", blocker)
    await asyncio.wait_for(started.wait(), WAIT)
    for _ in range(3):
        assert pool.submit("k", never)
    await asyncio.wait_for(pool.stop(drain=False), WAIT)
    assert cancelled == [True]
    assert pool.jobs_dropped == 3
    assert pool.jobs_done == 0
    assert pool.depth().total == 0


async def test_stop_drain_timeout_cancels_stuck_job(make_pool, caplog):
    pool = make_pool(num_workers=1)
    started = asyncio.Event()

    async def stuck():
        started.set()
        await asyncio.Event().wait()

    async def queued():
        pass

    tasks = worker_tasks()
    assert pool.submit("k", stuck)
    await asyncio.wait_for(started.wait(), WAIT)
    assert pool.submit("k", queued)
    with caplog.at_level(logging.WARNING, logger="pydmq"):
        await asyncio.wait_for(pool.stop(drain=True, timeout=0.05), WAIT)
    assert all(task.done() for task in tasks)
    assert pool.jobs_dropped == 1
    assert any("did not drain" in r.getMessage() for r in caplog.records)


# --- failing jobs -----------------------------------------------------------------------------


async def test_job_exception_is_logged_and_worker_continues(make_pool, caplog):
    pool = make_pool(num_workers=1)
    done = asyncio.Event()

    async def bad():
        raise ValueError("bad htable JSON")

    def bad_sync():  # raises when called, before any awaitable exists
        raise RuntimeError("boom")

    async def good():
        done.set()

    with caplog.at_level(logging.ERROR, logger="pydmq"):
        assert pool.submit("k", bad)
        assert pool.submit("k", bad_sync)
        assert pool.submit("k", good)
        await asyncio.wait_for(done.wait(), WAIT)
    assert pool.jobs_failed == 2
    assert pool.jobs_done == 1
    failures = [r for r in caplog.records if "job failed" in r.getMessage()]
    assert len(failures) == 2
    assert not worker_tasks()[0].done()


async def test_cancelled_error_inside_job_does_not_kill_worker(make_pool):
    pool = make_pool(num_workers=1)
    done = asyncio.Event()

    async def awaits_cancelled_future():
        fut = asyncio.get_running_loop().create_future()
        fut.cancel()
        await fut

    async def good():
        done.set()

    assert pool.submit("k", awaits_cancelled_future)
    assert pool.submit("k", good)
    await asyncio.wait_for(done.wait(), WAIT)
    assert (pool.jobs_failed, pool.jobs_done) == (1, 1)


# --- stats ------------------------------------------------------------------------------------


async def test_stats_snapshot_is_json_serialisable(make_pool):
    pool = make_pool(num_workers=3)
    stats = DmqStats(queue_depth_source=pool.depth)
    stats.record_in("notification_peer")
    stats.record_in("notification_peer")
    stats.record_in("htable")
    stats.record_out("htable")
    stats.record_reply_sent(200)
    stats.record_reply_sent(404)
    stats.record_reply_received(200)
    stats.record_reply_received(408)
    stats.record_rejected(503)
    stats.record_retransmission()
    stats.record_timeout()
    stats.record_parse_error()

    snapshot = stats.snapshot()
    assert json.loads(json.dumps(snapshot)) == snapshot
    assert snapshot == {
        "messages_in": {"notification_peer": 2, "htable": 1},
        "messages_out": {"htable": 1},
        "replies_sent": {"200": 1, "404": 1},
        "replies_received": {"200": 1, "408": 1},
        "rejected": {"403": 0, "503": 1},
        "retransmissions": 1,
        "timeouts": 1,
        "parse_errors_dropped": 1,
        "queue_depth": {"total": 0, "per_worker": [0, 0, 0]},
    }
    # A snapshot is a copy.
    stats.record_in("htable")
    assert snapshot["messages_in"] == {"notification_peer": 2, "htable": 1}


def test_stats_without_or_with_failing_depth_source(caplog):
    stats = DmqStats()
    assert stats.snapshot()["queue_depth"] is None

    def broken():
        raise RuntimeError("pool gone")

    stats.queue_depth_source = broken
    with caplog.at_level(logging.ERROR, logger="pydmq"):
        snapshot = stats.snapshot()
    assert snapshot["queue_depth"] is None
    json.dumps(snapshot)
    assert len(caplog.records) == 1


# --- event bus --------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeEvent:
    kind: str
    uri: str


async def test_event_bus_sync_and_async_subscribers():
    bus: EventBus[NodeEvent] = EventBus()
    sync_seen, async_seen = [], []
    delivered = asyncio.Event()

    async def async_sub(event):
        await asyncio.sleep(0)
        async_seen.append(event)
        delivered.set()

    bus.subscribe(sync_seen.append)
    bus.subscribe(async_sub)
    event = NodeEvent("joined", "sip:10.0.0.2:5060")
    bus.emit(event)
    assert sync_seen == [event]  # inline
    assert async_seen == []  # scheduled, not yet run
    await asyncio.wait_for(delivered.wait(), WAIT)
    assert async_seen == [event]
    await asyncio.wait_for(bus.join(), WAIT)


async def test_event_bus_failures_are_logged_not_raised(caplog):
    bus: EventBus[NodeEvent] = EventBus()
    seen = []

    def bad_sync(event):
        raise RuntimeError("sync subscriber broke")

    async def bad_async(event):
        raise RuntimeError("async subscriber broke")

    bus.subscribe(bad_sync)
    bus.subscribe(bad_async)
    bus.subscribe(seen.append)
    with caplog.at_level(logging.ERROR, logger="pydmq"):
        bus.emit(NodeEvent("removed", "sip:10.0.0.3:5060"))
        await asyncio.wait_for(bus.join(), WAIT)
    assert len(seen) == 1
    messages = [r.exc_info[1].args[0] for r in caplog.records if r.exc_info]
    assert sorted(messages) == ["async subscriber broke", "sync subscriber broke"]


async def test_event_bus_unsubscribe():
    bus: EventBus[str] = EventBus()
    seen = []
    unsubscribe = bus.subscribe(seen.append)
    bus.emit("a")
    unsubscribe()
    unsubscribe()  # harmless twice
    bus.emit("b")
    assert seen == ["a"]
    assert len(bus) == 0


def test_event_bus_async_subscriber_without_loop_is_logged(caplog, recwarn):
    bus: EventBus[str] = EventBus()

    async def async_sub(event):
        raise AssertionError("must not run")

    bus.subscribe(async_sub)
    with caplog.at_level(logging.ERROR, logger="pydmq"):
        bus.emit("x")
    assert len(caplog.records) == 1
    assert not [w for w in recwarn if "never awaited" in str(w.message)]
