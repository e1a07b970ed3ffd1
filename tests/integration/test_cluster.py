"""Clusters of real ``pydmq run`` processes talking KDMQ over UDP on 127.0.0.x.

Issue acceptance, end to end and pure pydmq: nodes join without waiting for pings, a node joins
through any member, dead nodes go through the 6.1 status machine as the modparams say, a graceful
stop is announced, and ``multi_notify`` finds the cluster through a real DNS server (dnsmasq).

Every node is a separate process started with ``python -m pydmq.cli run -c FILE --status-file
PATH``. The status file (JSON ``{"nodes": dmq.list_nodes rows, "stats": ...}``) is rewritten by
the node at start and on every membership event, so the tests observe each node by polling that
file with a hard deadline (:func:`wait_until`); there are no fixed sleeps. Every process is
stopped by the test (SIGTERM, a bounded wait, then SIGKILL).

Run with ``-s`` to see the measured times.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support.dns import DnsmasqServer, SrvRecord
from tests.support.net import free_port, wait_until
from tests.support.statusfile import read_status, status_rows
from tests.support.toml import to_toml

#: Polling interval for status files: small, so measured times are accurate to ~10 ms.
POLL = 0.01
#: How long a process may take to listen (interpreter start-up included).
START_TIMEOUT = 10.0
#: The failure-detection clusters: fast pings, short transactions (t1 0.1 s, fr_timer 1 s).
FAST_PING = 1
FAST_TM = {"t1": 0.1, "fr_timer": 1.0}

Row = dict[str, Any]


# ------------------------------------------------------------------------------------ processes


@dataclass
class PydmqProcess:
    """One ``pydmq run`` process and the files it reads and writes."""

    name: str
    host: str
    port: int
    workdir: Path
    dmq: dict[str, Any] = field(default_factory=dict)
    tm: dict[str, Any] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"sip:{self.host}:{self.port}"

    @property
    def hostport(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.workdir / f"{self.name}.toml"

    @property
    def status_path(self) -> Path:
        return self.workdir / f"{self.name}.status.json"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    def spawn(self) -> None:
        tables = {
            "dmq": {"server_address": self.uri, **self.dmq},
            "tm": self.tm,
            "rpc": {"http_address": ""},  # many nodes on one host: no fixed RPC port
            "log": {"level": "INFO"},
        }
        self.config_path.write_text(to_toml({k: v for k, v in tables.items() if v}))
        # Only the file configures the node: no PYDMQ_* variable of the caller leaks in.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYDMQ_")}
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "pydmq.cli",
                    "run",
                    "-c",
                    str(self.config_path),
                    "--status-file",
                    str(self.status_path),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )

    @property
    def exited(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def status(self) -> dict[str, Any] | None:
        """The last status file the node wrote."""
        return read_status(self.status_path)

    def rows(self) -> dict[str, Row]:
        """``host:port`` -> ``dmq.list_nodes`` row, the local node included ({} before start)."""
        return status_rows(self.status_path)

    def row(self, other: PydmqProcess) -> Row | None:
        return self.rows().get(other.hostport)

    def sees(self, others: Sequence[PydmqProcess], status: str = "active") -> bool:
        """The file lists exactly ``others`` (self included), every remote one with ``status``."""
        rows = self.rows()
        if set(rows) != {o.hostport for o in others}:
            return False
        return all(r["local"] == 1 or r["status"] == status for r in rows.values())

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join("    " + line for line in text.splitlines()[-lines:])

    def describe(self) -> str:
        state = "not started"
        if self.proc is not None:
            code = self.proc.poll()
            state = "running" if code is None else f"exited {code}"
        rows = self.rows()
        view = ", ".join(
            f"{hp}={r['status']}{'(local)' if r['local'] else ''}/fc{r['fail_count']}"
            for hp, r in rows.items()
        )
        return f"{self.name} {self.uri} [{state}] sees: {view or '-'}\n{self.log_tail()}"

    def kill9(self) -> float:
        """SIGKILL (no announcement); returns the monotonic time of the kill."""
        assert self.proc is not None
        at = time.monotonic()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=5)
        return at

    def sigterm(self) -> float:
        """SIGTERM (graceful: announces status=disabled); returns the monotonic time sent."""
        assert self.proc is not None
        at = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        return at

    def stop(self, timeout: float = 5.0) -> int | None:
        """terminate -> bounded wait -> kill; returns the exit code."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout)
        return proc.returncode


class Cluster:
    """Starts ``pydmq run`` processes and stops every one of them at the end."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.nodes: list[PydmqProcess] = []

    def spawn(
        self,
        name: str,
        *,
        host: str = "127.0.0.1",
        via: PydmqProcess | None = None,
        tm: Mapping[str, Any] | None = None,
        **dmq: Any,
    ) -> PydmqProcess:
        """Start a node; ``via`` makes that node its notification address. Does not wait."""
        if via is not None:
            dmq.setdefault("notification_address", via.uri)
        node = PydmqProcess(
            name, host, free_port("udp", host), self.workdir, dict(dmq), dict(tm or {})
        )
        self.nodes.append(node)
        node.spawn()
        return node

    def wait_ready(self, *nodes: PydmqProcess, timeout: float = START_TIMEOUT) -> float:
        """Wait until every node has written its first status file (it listens and has sent its
        request for the node list). Returns a lower bound of the moment the last one got there:
        the time of the last poll at which some file was still missing."""
        last_missing = time.monotonic()

        def ready() -> bool:
            nonlocal last_missing
            now = time.monotonic()
            dead = [n for n in nodes if n.exited]
            if dead:
                return True  # reported below, without waiting for the deadline
            if all(n.status_path.exists() for n in nodes):
                return True
            last_missing = now
            return False

        wait_until(
            ready, timeout=timeout, interval=POLL, what="nodes to start", describe=self.describe
        )
        dead = [n for n in nodes if n.exited]
        if dead:
            pytest.fail("pydmq exited during start-up:\n" + "\n".join(n.describe() for n in dead))
        return last_missing

    def start(self, name: str, **kwargs: Any) -> PydmqProcess:
        node = self.spawn(name, **kwargs)
        self.wait_ready(node)
        return node

    def wait(
        self,
        predicate: Callable[[], bool],
        *,
        timeout: float,
        what: str,
        interval: float = POLL,
    ) -> float:
        """Poll the status files until ``predicate``; returns the monotonic time it held."""
        wait_until(predicate, timeout=timeout, interval=interval, what=what, describe=self.describe)
        return time.monotonic()

    def describe(self) -> str:
        return "\n".join(n.describe() for n in self.nodes)

    def stop_all(self) -> None:
        """SIGTERM to every node at once (each announces its stop, bounded by 1 s), then reap."""
        for node in self.nodes:
            if node.proc is not None and node.proc.poll() is None:
                node.proc.terminate()
        for node in self.nodes:
            node.stop()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.stop_all()


def all_agree(nodes: Sequence[PydmqProcess]) -> Callable[[], bool]:
    return lambda: all(n.sees(nodes) for n in nodes)


# ------------------------------------------------------------------------------- 1, 2, 4: joining


def test_three_nodes_agree_within_one_second_without_pings(cluster: Cluster) -> None:
    """A seed and two nodes that name it: everyone lists everyone as active within 1 s of the
    last process being ready, with ping_interval 60 (joining is not paced by pings)."""
    a = cluster.start("a", ping_interval=60)
    b = cluster.spawn("b", via=a, ping_interval=60)
    c = cluster.spawn("c", via=a, ping_interval=60)
    ready = cluster.wait_ready(b, c)
    agreed = cluster.wait(all_agree([a, b, c]), timeout=5, what="a, b and c to list each other")
    took = agreed - ready
    print(f"\n3-node join: all three lists agree {took * 1000:.0f} ms after the last node is ready")
    assert took <= 1.0
    for node in (a, b, c):
        stats = node.status()["stats"]  # type: ignore[index]
        assert stats["timeouts"] == 0, node.describe()


def test_fourth_node_joins_through_any_member(cluster: Cluster) -> None:
    """D names C (not the seed): C adds it and fans the list out, so A and B list D too."""
    a = cluster.start("a", ping_interval=60)
    b = cluster.spawn("b", via=a, ping_interval=60)
    c = cluster.spawn("c", via=a, ping_interval=60)
    cluster.wait_ready(b, c)
    cluster.wait(all_agree([a, b, c]), timeout=5, what="a, b and c to list each other")
    d = cluster.spawn("d", via=c, ping_interval=60)
    ready = cluster.wait_ready(d)
    agreed = cluster.wait(all_agree([a, b, c, d]), timeout=5, what="everyone to list d")
    print(f"\n4th node through C: every list has it after {(agreed - ready) * 1000:.0f} ms")
    assert agreed - ready <= 1.0


def test_graceful_stop_is_seen_as_disabled_within_one_second(cluster: Cluster) -> None:
    """SIGTERM: the node announces status=disabled to every peer before it exits."""
    a = cluster.start("a", ping_interval=60)
    b = cluster.spawn("b", via=a, ping_interval=60)
    c = cluster.spawn("c", via=a, ping_interval=60)
    d = cluster.spawn("d", via=a, ping_interval=60)
    cluster.wait_ready(b, c, d)
    cluster.wait(all_agree([a, b, c, d]), timeout=5, what="the 4 nodes to list each other")
    sent = b.sigterm()
    peers = [a, c, d]

    def everyone_sees_b_disabled() -> bool:
        return all((r := p.row(b)) is not None and r["status"] == "disabled" for p in peers)

    seen = cluster.wait(everyone_sees_b_disabled, timeout=5, what="every peer to see b disabled")
    took = (seen - sent) * 1000
    print(f"\ngraceful stop: every peer lists b as disabled {took:.0f} ms after SIGTERM")
    assert seen - sent <= 1.0
    assert b.proc is not None
    assert b.proc.wait(timeout=5) == 0  # a clean exit (a second SIGTERM would force one)


# --------------------------------------------------------------------- 3: dead-node detection

REMOVED = "removed"


@dataclass(frozen=True)
class FailureCase:
    """One cluster (a seed and two members, all with the same [dmq] policy); one node is killed
    with SIGKILL.

    ``path`` is what each of the two survivors must show for the dead node, in order, after
    the kill (a final ``removed`` means it leaves the list; otherwise the last status must
    stay). ``fail_counts`` is the node's fail_count a survivor shows when it first reaches each
    status of ``path``: every step is driven by the survivor's own ping timeouts, never by what
    the other survivor still says about the node.
    """

    name: str
    policy: dict[str, int]
    kill_seed: bool
    path: tuple[str, ...]
    fail_counts: tuple[int, ...] | None = None

    @property
    def stays(self) -> bool:
        return self.path[-1] != REMOVED


FAILURE_CASES = [
    # 6.1 defaults: remove_inactive = 1, fail counting off: disabled on the 1st timeout, then
    # deleted by the timeout of the first ping sent while it was disabled.
    FailureCase("defaults", {}, kill_seed=False, path=("disabled", REMOVED)),
    # remove_inactive = 0: not_active, and never deleted.
    FailureCase(
        "remove_inactive_0",
        {"remove_inactive": 0},
        kill_seed=False,
        path=("not_active",),
    ),
    # fail counting with the default thresholds 0/1: 1st timeout -> not_active, 2nd -> disabled,
    # then deleted by the first ping sent while disabled.
    FailureCase(
        "fail_count_0_1",
        {
            "fail_count_enabled": 1,
            "fail_count_threshold_not_active": 0,
            "fail_count_threshold_disabled": 1,
        },
        kill_seed=False,
        path=("not_active", "disabled", REMOVED),
        fail_counts=(1, 2),
    ),
    # not_active threshold 2: two failures stay active, the 3rd -> not_active; disabled
    # threshold 3: the 4th -> disabled; then deleted by the first ping sent while disabled.
    FailureCase(
        "fail_count_2_3",
        {
            "fail_count_enabled": 1,
            "fail_count_threshold_not_active": 2,
            "fail_count_threshold_disabled": 3,
        },
        kill_seed=False,
        path=("not_active", "disabled", REMOVED),
        fail_counts=(3, 4),
    ),
    # The seed is every member's notification address: not_active, never deleted.
    FailureCase("seed_killed", {}, kill_seed=True, path=("not_active",)),
]


@dataclass
class FailureRun:
    """What one case's survivors showed about the dead node, timed from its SIGKILL."""

    case: FailureCase
    nodes: list[PydmqProcess]
    victim: PydmqProcess
    killed_at: float = 0.0
    #: survivor name -> [(seconds after the kill, status or "removed", fail_count)] on change
    history: dict[str, list[tuple[float, str, int]]] = field(default_factory=dict)
    #: for cases that keep the node: a survivor's file rewritten after the others finished
    late_snapshot: tuple[str, Row | None, dict[str, Any]] | None = None

    @property
    def survivors(self) -> list[PydmqProcess]:
        return [n for n in self.nodes if n is not self.victim]

    def record(self) -> None:
        for node in self.survivors:
            if node.exited:
                continue
            rows = node.rows()
            now = time.monotonic() - self.killed_at
            if not rows:
                continue
            row = rows.get(self.victim.hostport)
            state = (REMOVED, -1) if row is None else (row["status"], row["fail_count"])
            seen = self.history.setdefault(node.name, [])
            if not seen or seen[-1][1:] != state:
                seen.append((now, *state))

    def last(self, node: PydmqProcess) -> str | None:
        seen = self.history.get(node.name)
        return seen[-1][1] if seen else None

    def finished(self) -> bool:
        return all(self.last(n) == self.case.path[-1] for n in self.survivors)


@pytest.fixture(scope="module")
def failure_runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, FailureRun]]:
    """Every case at once (one cluster each, killed together), so they share the wall clock:
    the cases that keep the dead node are judged once the slowest removing case has removed it,
    i.e. after at least five ping timeouts."""
    cluster = Cluster(tmp_path_factory.mktemp("failure"))
    try:
        yield _run_failure_cases(cluster)
    finally:
        cluster.stop_all()


def _run_failure_cases(cluster: Cluster) -> dict[str, FailureRun]:
    runs: dict[str, FailureRun] = {}
    common: dict[str, Any] = {"ping_interval": FAST_PING, "tm": FAST_TM}
    seeds = {
        case.name: cluster.spawn(f"{case.name}-seed", **common, **case.policy)
        for case in FAILURE_CASES
    }
    cluster.wait_ready(*seeds.values())
    for case in FAILURE_CASES:
        seed = seeds[case.name]
        members = [
            cluster.spawn(f"{case.name}-m{i}", via=seed, **common, **case.policy) for i in (1, 2)
        ]
        nodes = [seed, *members]
        runs[case.name] = FailureRun(case, nodes, seed if case.kill_seed else members[-1])
    cluster.wait_ready(*cluster.nodes)
    cluster.wait(
        lambda: all(n.sees(r.nodes) for r in runs.values() for n in r.nodes),
        timeout=10,
        what="every failure cluster to be joined",
    )
    for run in runs.values():
        run.killed_at = run.victim.kill9()

    def all_finished() -> bool:
        for run in runs.values():
            run.record()
        return all(run.finished() for run in runs.values())

    # The slowest case (thresholds 2/3) needs 5 timeouts: about 5 pings plus fr_timer.
    cluster.wait(
        all_finished, timeout=20, interval=0.02, what="every survivor to reach its final state"
    )

    # A case that keeps the node emits no more events, so its files stop changing. Stop one
    # survivor gracefully: the other one records that as an event and so rewrites its file now,
    # with the dead node's current status and the current count of local timeouts (pings to the
    # dead node are the only requests that can time out).
    for run in runs.values():
        if not run.case.stays:
            continue
        witness, observer = run.survivors[-1], run.survivors[0]
        witness.sigterm()
        cluster.wait(
            lambda o=observer, w=witness: (r := o.row(w)) is not None and r["status"] == "disabled",
            timeout=5,
            what=f"{observer.name} to see {witness.name} leave",
        )
        status = observer.status()
        assert status is not None
        run.late_snapshot = (observer.name, observer.row(run.victim), status["stats"])
        witness.stop()
    return runs


def _timeouts_needed(case: FailureCase) -> list[int]:
    """The most ping timeouts after which each status of ``case.path`` must have been reached.

    A status change needs the timeout whose fail_count crosses the threshold (the first timeout
    without fail counting). Deletion needs the timeout of a ping *sent* while the node was
    disabled; with fr_timer equal to ping_interval the ping due at the instant it became
    disabled may leave just before (it then carries the old status), so allow one more.
    """
    needed: list[int] = []
    for i, status in enumerate(case.path):
        if status == REMOVED:
            needed.append(needed[-1] + 2)
        elif case.fail_counts is not None:
            needed.append(case.fail_counts[i])
        else:
            needed.append(1)
    return needed


@pytest.mark.parametrize("case", FAILURE_CASES, ids=lambda c: c.name)
def test_dead_node_goes_through_the_configured_statuses(
    failure_runs: dict[str, FailureRun], case: FailureCase
) -> None:
    run = failure_runs[case.name]
    report = []
    for node in run.survivors:
        history = run.history[node.name]
        # what the survivor showed after the kill, repeats and the initial "active" dropped
        statuses: list[str] = []
        for _at, status, _fc in history:
            if (statuses or status != "active") and (not statuses or statuses[-1] != status):
                statuses.append(status)
        # Exactly the path: in particular the other survivor, which may not have noticed yet
        # and still lists the node as active, never flips a not_active entry back.
        assert tuple(statuses) == case.path, (node.name, history)
        firsts = {status: (at, fc) for at, status, fc in reversed(history)}
        if case.fail_counts is not None:
            got = tuple(firsts[status][1] for status in case.path if status != REMOVED)
            assert got == case.fail_counts, (node.name, history)
        steps = ", ".join(
            f"{status} after {firsts[status][0]:.2f} s"
            + (f" (fail_count {firsts[status][1]})" if status != REMOVED else "")
            for status in case.path
        )
        report.append(f"  {node.name}: {steps}")
        # Timing: the n-th ping after the kill goes out within n ping intervals and times
        # out fr_timer later (plus 1 s of slack for a loaded machine).
        for status, n in zip(case.path, _timeouts_needed(case), strict=True):
            bound = n * FAST_PING + FAST_TM["fr_timer"] + 1.0
            assert firsts[status][0] <= bound, (node.name, status, bound, history)
    if case.stays:
        assert run.late_snapshot is not None
        observer, row, stats = run.late_snapshot
        assert row is not None, f"{observer} dropped the dead node"
        assert row["status"] == case.path[-1], (observer, row)
        # At least three pings to it timed out: under remove_inactive = 1 the second one
        # would already have deleted it.
        assert stats["timeouts"] >= 3, (observer, stats)
        report.append(
            f"  {observer}: still {row['status']} after {stats['timeouts']} ping timeouts"
        )
    print(f"\n{case.name} (killed {run.victim.name}):\n" + "\n".join(report))


# ----------------------------------------------------------------------- 5: multi_notify + DNS


def test_multi_notify_finds_the_cluster_through_dns(cluster: Cluster) -> None:
    """SRV records name two running nodes (different addresses and ports); a node whose only
    notification address is ``sip:<srv name>`` with multi_notify = 1 finds and joins both."""
    n1 = cluster.spawn("n1", host="127.0.0.2", ping_interval=60)
    n2 = cluster.spawn("n2", host="127.0.0.3", ping_interval=60)
    cluster.wait_ready(n1, n2)
    srv_name = "_dmq._udp.cluster.test"
    with DnsmasqServer(
        hosts={"n1.cluster.test": [n1.host], "n2.cluster.test": [n2.host]},
        srv=[
            SrvRecord(srv_name, "n1.cluster.test", n1.port, priority=10),
            SrvRecord(srv_name, "n2.cluster.test", n2.port, priority=20),
        ],
    ) as dns:
        m = cluster.spawn(
            "m",
            host="127.0.0.4",
            ping_interval=60,
            multi_notify=1,
            notification_address=f"sip:{srv_name}",
            dns_server=f"{dns.host}:{dns.port}",
        )
        ready = cluster.wait_ready(m)
        try:
            agreed = cluster.wait(
                all_agree([n1, n2, m]), timeout=5, what="n1, n2 and m to list each other"
            )
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\ndnsmasq log:\n{dns.log()}") from None
        queries = dns.log()
    print(
        f"\nmulti_notify: the three lists agree {(agreed - ready) * 1000:.0f} ms after m is ready"
    )
    assert f"query[SRV] {srv_name}" in queries, queries
