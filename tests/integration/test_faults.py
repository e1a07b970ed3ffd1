"""Fault injection on a multi-host test bed: every node in its own network namespace.

Real ``pydmq run`` processes (and a real Kamailio 5.6.3 in the mixed scenario), one per host of a
:class:`~tests.support.netns.TestNet` (a bridge, veth pairs, addresses in 10.231.0.0/24 that exist
only inside the namespaces). Faults are nftables rules inside the namespaces (random loss with
``numgen``, one-way and two-way partitions) and signals (SIGKILL, SIGSTOP/SIGCONT).

Scenarios (run with ``-s`` to see the numbers each one prints):

* the bed itself: isolation from the root namespace, loss and partition rules doing what they
  say, leftovers of a crashed run removed;
* 10 % loss on every link: 1,000 htable writes on one node all arrive on every other node, and
  no node is ever declared dead (no ``down``/``disabled``/``removed`` event anywhere);
* partition {A,B} | {C} until both sides have dropped each other, then heal: every list holds
  every node, active, within ping_interval + fr_timer + 2 s, and the writes made on either side
  during the partition reach the other side (re-sync on re-join; a key written on both sides
  ends with the same value everywhere: the larger one);
* one node killed (SIGKILL) and restarted 20 times, each incarnation on a new port, while another
  node takes writes: the lists end with exactly the live nodes (no dead incarnation comes back
  from a stale list) and the last incarnation ends with the full table;
* a node frozen (SIGSTOP) for 2 x fr_timer, then SIGCONT: it and its peers recover unaided, and
  it gets the writes it missed;
* Kamailio 5.6.3 behind 10 % loss (both directions) in a pydmq cluster keeps its membership and
  its data: writes made on it reach the pydmq nodes and writes made on pydmq reach it.

Every node replicates the htable table ``t`` (``dmqreplicate=1``, ``dmq_init_sync=1``); writes go
through the ``htable.sets`` RPC and tables are read back with ``htable.dump``.

Observation: each node writes its list to a status file (``--status-file``) on every membership
change and logs every change (``node <uri> <up|down|disabled|removed> (<old> -> <new>)``), which
the tests parse to see transient changes a status-file poll could miss; counters come from the
``dmq.stats`` JSON-RPC method over the node's unix socket (reachable across namespaces).

Timers are short (ping_interval 1 s, t1 50 ms, fr_timer 1-2 s) to keep the file within a few
minutes. Needs root, iproute2 and nftables (and the kamailio package for the mixed scenario): the
tests fail, never skip, without them.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pydmq.rpc.client import call as rpc_call
from tests.support.kamailio import KamailioNode
from tests.support.net import wait_until
from tests.support.netns import TestNet, cleanup_leftovers
from tests.support.statusfile import read_status, status_rows
from tests.support.toml import to_toml

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]

PORT = 5060
PING = 1
#: Fast transactions: requests are resent after 50 ms, doubling up to 400 ms.
TM = {"t1": 0.05, "t2": 0.4, "t4": 0.5, "fr_timer": 1.0}
#: Under loss: 2 s of retransmissions (8 sends) before a 408.
TM_LOSSY = {**TM, "fr_timer": 2.0}
POLL = 0.02
START_TIMEOUT = 10.0
BAD_KINDS = ("down", "disabled", "removed")
TABLE = "t"
HTABLE = f"{TABLE}=>size=8;autoexpire=0;dmqreplicate=1"

EVENT_RE = re.compile(
    r"^(\S+ \S+) INFO pydmq\.dmq\.runtime: node (\S+) (up|down|disabled|removed) "
    r"\((\S+) -> (\S+)\)$",
    re.MULTILINE,
)

Row = dict[str, Any]


# ------------------------------------------------------------------------------------ harness


@dataclass(frozen=True)
class Event:
    """One membership change a node logged."""

    at: str  # the log's asctime
    uri: str
    kind: str
    old: str
    new: str


@dataclass
class NetNode:
    """One ``pydmq run`` process inside a bed host."""

    bed: Bed
    name: str
    host: str
    port: int
    dmq: dict[str, Any]
    tm: dict[str, Any]
    proc: subprocess.Popen[bytes] | None = None

    @property
    def addr(self) -> str:
        return self.bed.net.addr(self.host)

    @property
    def uri(self) -> str:
        return f"sip:{self.addr}:{self.port}"

    @property
    def hostport(self) -> str:
        return f"{self.addr}:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.bed.workdir / f"{self.name}.toml"

    @property
    def status_path(self) -> Path:
        return self.bed.workdir / f"{self.name}.status.json"

    @property
    def log_path(self) -> Path:
        return self.bed.workdir / f"{self.name}.log"

    @property
    def rpc_path(self) -> str:
        return os.path.join(self.bed.rundir, f"{self.name}.sock")

    def spawn(self) -> None:
        tables = {
            "dmq": {"server_address": self.uri, **self.dmq},
            "tm": self.tm,
            "rpc": {"http_address": "", "unix_socket": self.rpc_path},
            "htable": {"tables": [HTABLE], "enable_dmq": True, "dmq_init_sync": True},
            "log": {"level": "INFO"},
        }
        self.config_path.write_text(to_toml(tables))
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYDMQ_")}
        argv = [sys.executable, "-m", "pydmq.cli", "run", "-c", str(self.config_path),
                "--status-file", str(self.status_path)]  # fmt: skip
        with self.log_path.open("ab") as log:
            self.proc = self.bed.net.run_in(
                self.host, argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=os.getcwd()
            )

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- observation -------------------------------------------------------------------------
    def status(self) -> dict[str, Any] | None:
        return read_status(self.status_path)

    def rows(self) -> dict[str, Row]:
        return status_rows(self.status_path)

    def sees(self, others: Sequence[NetNode]) -> bool:
        """Lists exactly ``others`` (itself included), every remote one active."""
        rows = self.rows()
        if set(rows) != {o.hostport for o in others}:
            return False
        return all(r["local"] == 1 or r["status"] == "active" for r in rows.values())

    def active_remote(self) -> set[str]:
        return {hp for hp, r in self.rows().items() if not r["local"] and r["status"] == "active"}

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def events(self) -> list[Event]:
        """Every membership change logged so far, URIs without parameters (``;status=``)."""
        return [
            Event(at, uri.split(";", 1)[0], kind, old, new)
            for at, uri, kind, old, new in EVENT_RE.findall(self.log_text())
        ]

    def bad_events(self) -> list[Event]:
        """Membership changes that declare some node dead (or gone)."""
        return [e for e in self.events() if e.kind in BAD_KINDS]

    def rpc(self, method: str, *params: object, timeout: float = 5.0) -> Any:
        return rpc_call(method, list(params), unix=self.rpc_path, timeout=timeout)

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = self.rpc("dmq.stats")
        return result

    def write(self, key: str, value: str) -> None:
        self.rpc("htable.sets", TABLE, key, value)

    def table(self) -> dict[str, Any]:
        """``{key: value}`` of table ``t`` (``htable.dump``)."""
        return _cells(self.rpc("htable.dump", TABLE))

    def describe(self) -> str:
        state = "not started"
        if self.proc is not None:
            code = self.proc.poll()
            state = "running" if code is None else f"exited {code}"
        view = ", ".join(
            f"{hp}={r['status']}{'(local)' if r['local'] else ''}" for hp, r in self.rows().items()
        )
        tail = "\n".join("    " + line for line in self.log_text().splitlines()[-12:])
        return f"{self.name} {self.uri} [{state}] sees: {view or '-'}\n{tail}"

    # -- faults --------------------------------------------------------------------------------
    def kill(self) -> None:
        assert self.proc is not None
        self.bed.net.kill(self.proc)

    def freeze(self) -> None:
        assert self.proc is not None
        self.bed.net.freeze(self.proc)

    def thaw(self) -> None:
        assert self.proc is not None
        self.bed.net.thaw(self.proc)


class Bed:
    """A :class:`TestNet` plus the pydmq (and Kamailio) nodes running in it."""

    def __init__(self, hosts: Sequence[str], workdir: Path) -> None:
        self.net = TestNet(hosts)
        self.workdir = workdir
        # unix sockets: sun_path is limited to 108 bytes, pytest's tmp_path can be longer
        self.rundir = tempfile.mkdtemp(prefix="pydmq-faults-", dir="/tmp")
        self.nodes: list[NetNode] = []
        self.kamailios: list[KamailioNode] = []

    def __enter__(self) -> Bed:
        self.net.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            for k in self.kamailios:
                k.kill()
        finally:
            self.net.down()  # kills every process started inside, deletes the namespaces
            shutil.rmtree(self.rundir, ignore_errors=True)

    def spawn(
        self,
        name: str,
        host: str | None = None,
        *,
        port: int = PORT,
        seed: NetNode | str | None = None,
        tm: Mapping[str, Any] = TM,
        **dmq: Any,
    ) -> NetNode:
        dmq.setdefault("ping_interval", PING)
        if seed is not None:
            dmq.setdefault("notification_address", seed if isinstance(seed, str) else seed.uri)
        node = NetNode(self, name, host or name, port, dmq, dict(tm))
        self.nodes.append(node)
        node.spawn()
        return node

    def wait_ready(self, *nodes: NetNode, timeout: float = START_TIMEOUT) -> None:
        def ready() -> bool:
            if any(not n.running for n in nodes):
                return True
            return all(n.status_path.exists() and os.path.exists(n.rpc_path) for n in nodes)

        self.wait(ready, timeout=timeout, what="nodes to start")
        dead = [n for n in nodes if not n.running]
        if dead:
            pytest.fail("pydmq exited during start-up:\n" + "\n".join(n.describe() for n in dead))

    def start(self, name: str, host: str | None = None, **kwargs: Any) -> NetNode:
        node = self.spawn(name, host, **kwargs)
        self.wait_ready(node)
        return node

    def wait(
        self,
        predicate: Callable[[], object],
        *,
        timeout: float,
        what: str,
        interval: float = POLL,
        detail: Callable[[], str] | None = None,
    ) -> float:
        """Poll until ``predicate``; the monotonic time it held. On timeout the message shows
        the bed (and ``detail()``)."""

        def describe() -> str:
            return (detail() + "\n" if detail is not None else "") + self.describe()

        wait_until(predicate, timeout=timeout, interval=interval, what=what, describe=describe)
        return time.monotonic()

    def wait_tables(
        self,
        nodes: Sequence[NetNode],
        expected: Mapping[str, Any],
        *,
        timeout: float,
        what: str,
        interval: float = POLL,
        check: Callable[[], None] | None = None,
        extra: Callable[[dict[str, dict[str, Any]]], str] | None = None,
    ) -> tuple[float, dict[str, dict[str, Any]]]:
        """Poll until every one of ``nodes`` holds ``expected`` (``check()`` first each time):
        the monotonic time it held and the tables last read. On timeout the message says how
        many keys each node lacks (then ``extra(tables)``)."""
        tables: dict[str, dict[str, Any]] = {}

        def holds() -> bool:
            if check is not None:
                check()
            tables.update({n.name: n.table() for n in nodes})
            return not any(_missing(tables, expected).values())

        def detail() -> str:
            text = f"missing: {_missing(tables, expected)}"
            return text if extra is None else f"{text}; {extra(tables)}"

        when = self.wait(holds, timeout=timeout, what=what, interval=interval, detail=detail)
        return when, tables

    def agree(self, nodes: Sequence[NetNode]) -> Callable[[], bool]:
        return lambda: all(n.sees(nodes) for n in nodes)

    def describe(self) -> str:
        parts = [self.net.describe()]
        parts += [n.describe() for n in self.nodes if n.proc is not None]
        for k in self.kamailios:
            try:
                view = json.dumps(k.list_nodes())
            except Exception as exc:
                view = repr(exc)
            parts.append(f"{k.name} {k.uri}: {view}")
        return "\n".join(parts)


@pytest.fixture
def bed_factory(tmp_path: Path) -> Iterator[Callable[[Sequence[str]], Bed]]:
    """``bed_factory(["a", "b"])`` -> a running :class:`Bed`, torn down after the test."""
    beds: list[Bed] = []

    def make(hosts: Sequence[str]) -> Bed:
        bed = Bed(hosts, tmp_path)
        beds.append(bed)
        bed.net.up()
        return bed

    try:
        yield make
    finally:
        for bed in beds:
            bed.close()


def _start_cluster(bed: Bed, names: Sequence[str], *, tm: Mapping[str, Any] = TM) -> list[NetNode]:
    """The first name is the seed (every other node's notification_address); waits for agreement."""
    seed = bed.start(names[0], tm=tm)
    others = [bed.spawn(n, seed=seed, tm=tm) for n in names[1:]]
    bed.wait_ready(*others)
    nodes = [seed, *others]
    bed.wait(bed.agree(nodes), timeout=10, what="the cluster to form")
    return nodes


def _cells(dump: list[dict[str, Any]]) -> dict[str, Any]:
    """``htable.dump`` (pydmq's or Kamailio's) as ``{key: value}``."""
    return {c["name"]: c["value"] for entry in dump for c in entry.get("slot", [])}


def _missing(
    tables: Mapping[str, Mapping[str, Any]], expected: Mapping[str, Any]
) -> dict[str, int]:
    """Per node: how many of ``expected`` it lacks or holds with another value."""
    return {
        name: sum(1 for k, v in expected.items() if table.get(k) != v)
        for name, table in tables.items()
    }


def _epoch(asctime: str) -> float:
    """A log line's ``%(asctime)s`` (local time, ``2026-11-30 14:13:22,947``) as epoch seconds."""
    stamp, _, millis = asctime.partition(",")
    return time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S")) + int(millis or 0) / 1000


def _sh(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=30).stdout


def _timeouts(nodes: Sequence[NetNode]) -> dict[str, int]:
    return {n.name: int(n.stats()["dmq"]["timeouts"]) for n in nodes}


# ------------------------------------------------------------------------------------ the bed


def test_bed_is_isolated_applies_faults_and_cleans_up(tmp_path: Path) -> None:
    """The bed's addresses exist only inside it; loss and partitions do what they say; a bed
    whose owner died (SIGKILL, no teardown) is removed by the next one; teardown removes all."""
    # A crashed run: a child process builds a bed and is killed before it can tear it down.
    code = (
        "import os, signal, time\n"
        "from tests.support.netns import TestNet\n"
        "net = TestNet(['x']); net.up()\n"
        "net.run_in('x', ['sleep', '60'])\n"
        "print(net.run_id, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    crashed = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=os.getcwd(),
        check=False,
    )
    stale_id = crashed.stdout.strip()
    assert stale_id, crashed.stderr
    listed = _sh("ip", "netns", "list")
    assert stale_id in listed

    with TestNet(["a", "b", "c"]) as net:
        listed = _sh("ip", "netns", "list")
        assert stale_id not in listed, "the crashed run's namespaces were not cleaned up"
        # Nothing of the bed in the root namespace: no address, no route to its subnet.
        root = _sh("ip", "-o", "addr")
        routes = _sh("ip", "route")
        assert "10.231." not in root and "10.231." not in routes
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s, pytest.raises(OSError):
            s.bind((net.addr("a"), 0))  # not an address of the root namespace

        def delivered(src: str, dst: str, count: int = 1000) -> int:
            with net.socket(dst) as rx, net.socket(src) as tx:
                rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
                rx.bind((net.addr(dst), 9999))
                for i in range(count):
                    tx.sendto(b"x", (net.addr(dst), 9999))
                    if i % 50 == 49:
                        time.sleep(0.001)  # stay below the receive buffer
                rx.settimeout(0.3)
                got = 0
                try:
                    while True:
                        rx.recv(16)
                        got += 1
                except TimeoutError:
                    return got

        clean = delivered("a", "b")
        net.loss_everywhere(10)
        lossy = delivered("a", "b", 3000)
        net.clear()
        net.partition(["a", "b"], ["c"])
        cut = (delivered("a", "b", 50), delivered("a", "c", 50), delivered("c", "b", 50))
        net.heal()
        net.partition(["a"], ["b"], one_way=True)
        one_way = (delivered("a", "b", 50), delivered("b", "a", 50))
        net.clear()
        sleeper = net.run_in("c", ["sleep", "60"])
        namespaces = net.namespaces()
    print(
        f"\nbed: clean {clean}/1000; 10 % loss {lossy}/3000 ({100 - lossy / 30:.1f} % lost);"
        f" {{a,b}}|{{c}}: a->b {cut[0]}/50, a->c {cut[1]}/50, c->b {cut[2]}/50;"
        f" one-way a-/->b: a->b {one_way[0]}/50, b->a {one_way[1]}/50"
    )
    assert clean == 1000
    assert 2550 <= lossy <= 2850  # 10 % +- 5 standard deviations
    assert cut == (50, 0, 0)
    assert one_way == (0, 50)
    assert sleeper.poll() is not None, "teardown left a process running"
    listed = _sh("ip", "netns", "list")
    assert not any(ns in listed for ns in namespaces), listed
    assert cleanup_leftovers() == []


# ------------------------------------------------------------------------------------- loss


class DeathWatch:
    """Asserts, each time :meth:`check` runs, that no node has logged any node going down,
    disabled or removed; counts the polls at which some list was incomplete."""

    def __init__(self, nodes: Sequence[NetNode], bed: Bed) -> None:
        self.nodes = list(nodes)
        self.bed = bed
        self.polls = 0
        self.incomplete = 0

    def check(self) -> None:
        self.polls += 1
        if not all(n.sees(self.nodes) for n in self.nodes):
            self.incomplete += 1
        bad = {n.name: n.bad_events() for n in self.nodes if n.bad_events()}
        assert not bad, f"declared dead: {bad}\n{self.bed.describe()}"


WRITES = 1000
#: Membership is watched under loss for at least this long (the writes may finish sooner).
LOSS_WINDOW = 15.0


def test_ten_percent_loss_on_every_link(bed_factory: Callable[[Sequence[str]], Bed]) -> None:
    """4 nodes, 10 % of the packets on every link dropped at random: 1,000 htable writes on a
    all arrive on b, c and d, and no node ever logs a node going down, disabled or removed
    (watched for the whole run, at least LOSS_WINDOW seconds)."""
    bed = bed_factory(["a", "b", "c", "d"])
    nodes = _start_cluster(bed, ["a", "b", "c", "d"], tm=TM_LOSSY)
    a, others = nodes[0], nodes[1:]
    before = {n.name: n.stats()["dmq"] for n in nodes}
    bed.net.loss_everywhere(10)
    started = time.monotonic()
    watch = DeathWatch(nodes, bed)
    expected = {f"loss-{i:04d}": f"value-{i}" for i in range(WRITES)}
    for i, (key, value) in enumerate(expected.items()):
        a.write(key, value)
        if i % 100 == 99:
            watch.check()
    written = time.monotonic()
    arrived, tables = bed.wait_tables(
        others,
        expected,
        timeout=60,
        what="every write on every node",
        interval=0.25,
        check=watch.check,
    )
    while time.monotonic() - started < LOSS_WINDOW:
        watch.check()
        time.sleep(0.2)
    watch.check()
    after = {n.name: n.stats()["dmq"] for n in nodes}
    bed.net.clear()

    def total(field: str) -> int:
        def count(v: Any) -> int:
            return sum(v.values()) if isinstance(v, dict) else int(v)

        return sum(count(after[n][field]) - count(before[n][field]) for n in after)

    delivered = {name: WRITES - m for name, m in _missing(tables, expected).items()}
    print(
        f"\n10 % loss on every link, {time.monotonic() - started:.0f} s:"
        f" {WRITES} writes on a in {written - started:.2f} s; delivered"
        f" {', '.join(f'{n} {d}/{WRITES}' for n, d in delivered.items())},"
        f" all {arrived - started:.2f} s after the first write;"
        f" {total('messages_out')} KDMQ requests, {total('retransmissions')} retransmissions,"
        f" {total('timeouts')} timeouts; nodes declared dead: 0"
        f" (lists complete at {watch.polls - watch.incomplete}/{watch.polls} polls)"
    )
    assert watch.incomplete == 0


# -------------------------------------------------------------------------------- partition


def test_partition_heal_converges_and_resyncs(bed_factory: Callable[[Sequence[str]], Bed]) -> None:
    """{A,B} | {C} until A and B have removed C and C has given up on both (B removed, the seed
    A not_active: a notification address is never removed). Writes on both sides, before and
    after they gave up on each other, plus one key written on both sides. Heal: every list
    holds every node, active, within ping_interval + fr_timer + 2 s; then every node has every
    write, and the key written on both sides has the same value everywhere (the larger one)."""
    bed = bed_factory(["a", "b", "c"])
    a, b, c = _start_cluster(bed, ["a", "b", "c"])
    ab_writes = {f"ab-{i:02d}": f"from-a-{i}" for i in range(50)}
    c_writes = {f"c-{i:02d}": f"from-c-{i}" for i in range(50)}
    cut = time.monotonic()
    bed.net.partition(["a", "b"], ["c"])
    # half while both sides still think the other one is there (the sends are lost) ...
    for (ka, va), (kc, vc) in list(zip(ab_writes.items(), c_writes.items(), strict=True))[:25]:
        a.write(ka, va)
        c.write(kc, vc)

    def dropped() -> bool:
        return (
            c.hostport not in a.rows()
            and c.hostport not in b.rows()
            and b.hostport not in c.rows()
            and not c.active_remote()
        )

    separated = bed.wait(dropped, timeout=15, what="both sides to drop each other")
    c_view = {hp: r["status"] for hp, r in c.rows().items() if not r["local"]}
    # ... and half once they have given up on each other (nothing is even sent)
    for (ka, va), (kc, vc) in list(zip(ab_writes.items(), c_writes.items(), strict=True))[25:]:
        a.write(ka, va)
        c.write(kc, vc)
    a.write("both", "ab-side")
    c.write("both", "c-side")
    assert not set(c_writes) & set(a.table()) and not set(ab_writes) & set(c.table())
    healed = time.monotonic()
    bed.net.heal()
    converged = bed.wait(bed.agree([a, b, c]), timeout=15, what="the lists to converge")
    expected = {**ab_writes, **c_writes, "both": "c-side"}
    synced, _ = bed.wait_tables(
        [a, b, c],
        expected,
        timeout=15,
        what="the writes of both sides everywhere",
        interval=0.1,
        extra=lambda tables: f"both={[t.get('both') for t in tables.values()]}",
    )
    took = converged - healed
    bound = PING + TM["fr_timer"] + 2
    print(
        f"\npartition {{a,b}}|{{c}}: both sides dropped each other after"
        f" {separated - cut:.2f} s (c keeps seed a as {c_view.get(a.hostport)});"
        f" after heal every list is complete and active in {took:.2f} s (bound {bound:.1f} s);"
        f" all {len(expected)} keys (50 + 50 written apart, 1 on both sides) on a, b and c"
        f" {synced - healed:.2f} s after heal; the conflicting key is 'c-side' everywhere"
        f" (the larger value wins)"
    )
    assert took <= bound


def test_one_way_partition_heals(bed_factory: Callable[[Sequence[str]], Bed]) -> None:
    """One-way cut: nothing from a or b reaches c, c still reaches both (its requests arrive,
    the replies are lost). Kept up for two detection rounds; writes on a and on c meanwhile.
    Heal: every list complete and active within ping_interval + fr_timer + 2 s, and every write
    everywhere."""
    bed = bed_factory(["a", "b", "c"])
    a, b, c = _start_cluster(bed, ["a", "b", "c"])
    cut = time.monotonic()
    bed.net.partition(["a", "b"], ["c"], one_way=True)
    expected: dict[str, str] = {}
    hold = 2 * (PING + TM["fr_timer"]) + 1
    i = 0
    while time.monotonic() - cut < hold:
        for node in (a, c):
            key = f"{node.name}-{i:03d}"
            expected[key] = f"v{i}"
            node.write(key, f"v{i}")
        i += 1
        time.sleep(0.1)
    c_view = {hp: r["status"] for hp, r in c.rows().items() if not r["local"]}
    flaps = {n.name: sum(1 for e in n.events() if e.uri == c.uri) - 1 for n in (a, b)}
    healed = time.monotonic()
    bed.net.heal()
    converged = bed.wait(bed.agree([a, b, c]), timeout=15, what="the lists to converge")
    synced, _ = bed.wait_tables(
        [a, b, c], expected, timeout=15, what="every write everywhere", interval=0.1
    )
    took = converged - healed
    bound = PING + TM["fr_timer"] + 2
    print(
        f"\none-way partition {{a,b}} -/-> {{c}} for {hold:.0f} s: c ended with {c_view};"
        f" membership changes about c meanwhile: {flaps}; after heal every list is complete"
        f" and active in {took:.2f} s (bound {bound:.1f} s); all {len(expected)} writes"
        f" everywhere {synced - healed:.2f} s after heal"
    )
    assert took <= bound


# ----------------------------------------------------------------------------- kill/restart


RESTARTS = 20


def _joined(node: NetNode, peers: Sequence[NetNode]) -> bool:
    """``node`` and every one of ``peers`` list each other as active."""
    return {p.hostport for p in peers} <= node.active_remote() and all(
        node.hostport in p.active_remote() for p in peers
    )


def test_kill_and_restart_twenty_times_under_write_load(
    bed_factory: Callable[[Sequence[str]], Bed],
) -> None:
    """Host d runs a node that is SIGKILLed and restarted 20 times, each incarnation on a new
    port (a new identity, like a restarted container), while a takes a write every few
    milliseconds: every list ends with exactly a, b, c and the last incarnation, and stays so
    (no removed incarnation ever comes back); the last incarnation ends with the full table."""
    bed = bed_factory(["a", "b", "c", "d"])
    a, b, c = _start_cluster(bed, ["a", "b", "c"])
    stable = [a, b, c]
    written: dict[str, str] = {}
    errors: list[BaseException] = []
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set():
            key, value = f"load-{i:05d}", f"v{i}"
            try:
                a.write(key, value)
            except Exception as exc:
                errors.append(exc)
                return
            written[key] = value
            i += 1
            time.sleep(0.005)

    thread = threading.Thread(target=writer, name="writer", daemon=True)
    incarnations: list[NetNode] = []
    killed_at: dict[str, float] = {}  # incarnation URI -> wall-clock time of its SIGKILL
    join_times: list[float] = []
    thread.start()
    try:
        for i in range(RESTARTS + 1):
            d = bed.spawn(f"d{i}", "d", port=PORT + i, seed=a)
            bed.wait_ready(d)
            t0 = time.monotonic()
            bed.wait(
                functools.partial(_joined, d, stable), timeout=10, what=f"incarnation {i} to join"
            )
            join_times.append(time.monotonic() - t0)
            incarnations.append(d)
            if i < RESTARTS:
                time.sleep(0.3 * (i % 4))  # lifetimes of 0 to 0.9 s after joining
                d.kill()
                killed_at[d.uri] = time.time()
    finally:
        stop.set()
        thread.join(timeout=10)
    assert not errors, errors
    last = incarnations[-1]
    live = [*stable, last]
    restarted = time.monotonic()
    converged = bed.wait(bed.agree(live), timeout=30, what="only live nodes in every list")
    complete, tables = bed.wait_tables(
        live, written, timeout=20, what="the full table on every live node", interval=0.2
    )
    # Stay exact for a while: nothing brings a dead incarnation back later.
    hold_until = time.monotonic() + 3 * PING + TM["fr_timer"]
    while time.monotonic() < hold_until:
        assert all(n.sees(live) for n in live), bed.describe()
        time.sleep(0.1)
    # A ghost: a dead incarnation that some node had removed and then lists as active again.
    resurrections = 0
    for n in live:
        removed: set[str] = set()
        for e in n.events():
            died = killed_at.get(e.uri)
            if died is None or _epoch(e.at) < died:
                continue
            if e.kind == "removed":
                removed.add(e.uri)
            elif e.kind == "up" and e.uri in removed:
                resurrections += 1
    print(
        f"\nkill/restart x{RESTARTS} under {len(written)} writes: joins took"
        f" {min(join_times):.2f}-{max(join_times):.2f} s; after the last restart every list"
        f" holds exactly the 4 live nodes in {converged - restarted:.2f} s; dead incarnations"
        f" active again after removal: {resurrections}; the last incarnation has"
        f" {len(written) - _missing(tables, written)[last.name]}/{len(written)} keys"
        f" {complete - restarted:.2f} s after the last restart"
    )
    assert resurrections == 0
    assert tables[last.name] == tables[a.name]


# ----------------------------------------------------------------------------------- freeze


def test_frozen_node_recovers_after_sigcont(bed_factory: Callable[[Sequence[str]], Bed]) -> None:
    """SIGSTOP b for 2 x fr_timer while a takes writes, SIGCONT: within ping_interval + fr_timer
    + 2 s every list is complete again, b has the writes it missed, and the process was never
    restarted. fr_timer is 1.5 s here, so that the freeze (3 s) surely outlasts a ping timeout
    (at most ping_interval + fr_timer = 2.5 s after the freeze): its peers do notice it."""
    tm = {**TM, "fr_timer": 1.5}
    bed = bed_factory(["a", "b", "c"])
    a, b, c = _start_cluster(bed, ["a", "b", "c"], tm=tm)
    assert b.proc is not None
    pid = b.proc.pid
    frozen_for = 2 * tm["fr_timer"]
    expected: dict[str, str] = {}
    b.freeze()
    frozen = time.monotonic()
    i = 0
    while time.monotonic() - frozen < frozen_for:
        expected[f"frozen-{i:03d}"] = f"v{i}"
        a.write(f"frozen-{i:03d}", f"v{i}")
        i += 1
        time.sleep(0.1)
    seen_during = {n.name: [e.kind for e in n.bad_events() if e.uri == b.uri] for n in (a, c)}
    b.thaw()
    thawed = time.monotonic()
    converged = bed.wait(bed.agree([a, b, c]), timeout=15, what="recovery after SIGCONT")
    synced, _ = bed.wait_tables(
        [b, c], expected, timeout=15, what="b to get the writes it missed", interval=0.1
    )
    took = converged - thawed
    bound = PING + tm["fr_timer"] + 2
    b_saw = b.bad_events()  # b declared a peer dead (its own pings timed out while frozen)
    print(
        f"\nSIGSTOP b for {frozen_for:.1f} s: during it a and c logged b {seen_during};"
        f" after SIGCONT every list is complete and active in {took:.2f} s (bound {bound:.1f} s);"
        f" b has the {len(expected)} writes it missed {synced - thawed:.2f} s after SIGCONT;"
        f" b itself logged {len(b_saw)} peer(s) down after waking up"
    )
    assert b.running and b.proc.pid == pid
    assert all(seen_during.values()), "the freeze was too short to be noticed"
    assert took <= bound


# ------------------------------------------------------------------------------------ mixed


MIXED_WINDOW = 25.0
MIXED_WRITES = 100


@pytest.mark.kamailio
def test_kamailio_behind_ten_percent_loss_keeps_membership_and_data(
    bed_factory: Callable[[Sequence[str]], Bed],
) -> None:
    """pydmq a (seed) and b, Kamailio 5.6.3 k (htable t replicated, dmq_init_sync) behind 10 %
    loss in both directions for MIXED_WINDOW seconds (five Kamailio ping rounds): k always lists
    a and b as active, neither pydmq node ever declares anyone dead, 100 writes on k reach a and
    b and 100 writes on a reach k."""
    bed = bed_factory(["a", "b", "k"])
    a, b = _start_cluster(bed, ["a", "b"], tm=TM_LOSSY)
    k = KamailioNode(
        bed.workdir / "k",
        name="k",
        host=bed.net.addr("k"),
        netns=bed.net.ns("k"),
        notification_addresses=[a.uri],
        ping_interval=5,
        htable=True,
        htable_def=HTABLE + ";",
    )
    bed.kamailios.append(k)
    k.start()
    k_hostport = f"{k.host}:{k.port}"

    def k_sees() -> set[str]:
        return {
            f"{n['host']}:{n['port']}"
            for n in k.list_nodes()
            if not n["local"] and n["status"] == "active"
        }

    def joined() -> bool:
        return k_sees() == {a.hostport, b.hostport} and all(
            k_hostport in n.active_remote() for n in (a, b)
        )

    bed.wait(joined, timeout=15, what="Kamailio to join", interval=0.1)
    bed.net.loss("k", 10, direction="both")
    started = time.monotonic()
    from_k = {f"kam-{i:03d}": f"k{i}" for i in range(MIXED_WRITES)}
    from_a = {f"py-{i:03d}": f"a{i}" for i in range(MIXED_WRITES)}
    for (kk, kv), (ak, av) in zip(from_k.items(), from_a.items(), strict=True):
        k.rpc_result("htable.sets", TABLE, kk, kv)
        a.write(ak, av)
    tables: dict[str, dict[str, Any]] = {}
    arrived: float | None = None
    k_gaps = 0
    polls = 0
    while time.monotonic() - started < MIXED_WINDOW or arrived is None:
        polls += 1
        if k_sees() != {a.hostport, b.hostport}:
            k_gaps += 1
        bad = {n.name: n.bad_events() for n in (a, b) if n.bad_events()}
        assert not bad, f"declared dead: {bad}\n{bed.describe()}"
        if arrived is None:
            tables.update({"a": a.table(), "b": b.table()})
            tables["k"] = _cells(k.rpc_result("htable.dump", TABLE))
            missing = {
                "a": _missing({"a": tables["a"]}, from_k)["a"],
                "b": _missing({"b": tables["b"]}, {**from_k, **from_a})["b"],
                "k": _missing({"k": tables["k"]}, from_a)["k"],
            }
            if not any(missing.values()):
                arrived = time.monotonic()
            assert time.monotonic() - started < 60, f"missing {missing}\n{bed.describe()}"
        time.sleep(0.25)
    bed.net.clear()
    timeouts = _timeouts([a, b])
    assert arrived is not None
    print(
        f"\nKamailio behind 10 % loss for {time.monotonic() - started:.0f} s: k listed a and b"
        f" active at {polls - k_gaps}/{polls} polls; pydmq timeouts {timeouts}; nodes declared"
        f" dead: 0; {MIXED_WRITES} writes on k reached a and b and {MIXED_WRITES} writes on a"
        f" reached k, all {arrived - started:.2f} s after the first write"
    )
    assert k_gaps == 0
    errors = [line for line in k.log_text().splitlines() if " ERROR: " in line]
    assert not errors, "\n".join(errors[:20])
