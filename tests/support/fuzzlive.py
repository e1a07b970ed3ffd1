"""Fuzz a live ``pydmq run`` process over UDP while checking that it keeps answering.

Shared by ``bench/fuzz_live.py`` (a million datagrams, on demand) and
``tests/integration/test_fuzz_live.py`` (the CI-sized run)::

    with FuzzBed(workdir) as bed:               # a network namespace with only loopback in it
        target, peer = bed.start_pair()         # two nodes that know each other
        report = bed.fuzz(count=20_000, seed=1) # mutated datagrams + pings + RSS samples
        report.check(rss_factor=2.0, rss_slack_kb=50 * 1024)
        print(report.render())

Where the datagrams go. The nodes and every socket of the run live in a fresh network namespace
(:class:`~tests.support.netns.TestNet` with one host) that has loopback and an isolated bridge
port, no default route and no DNS server it can reach: a mutated notification body can make the
target add nodes on any address or host name, and the pings it then sends (or the name lookups)
fail at once instead of leaving the machine. Without root, ``FuzzBed(netns=False)`` runs on the
host's 127.0.0.1 and gives both nodes a private notification channel, so no mutated datagram can
name it and inject nodes (the rest of the stack is fuzzed the same way).

Pacing. The fuzzer sends a batch, then an OPTIONS *marker* with ``rport`` from the same socket,
and lets at most a few markers be unanswered: the node reads its socket in order, so a marker's
200 means everything before it was read. That keeps the node busy without letting the kernel
drop most of the load. What the node really received is counted by the node itself
(``dmq.stats`` over the unix RPC socket: SIP messages handed up plus oversize datagrams
dropped), minus the markers, pings and everything the peer sent (a lower bound: some of the
peer's sends go to injected nodes, not to the target); in the namespace, the kernel's UDP
``RcvbufErrors`` counter says exactly how many datagrams were dropped before any socket read
them.

Liveness. A second socket sends an OPTIONS every ``ping_interval`` (no retransmission) and each
must be answered within ``ping_timeout``; misses, the longest run of misses and the slowest
answer are reported. VmRSS of the target is sampled from ``/proc`` throughout.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from socket import socket as Socket
from types import TracebackType
from typing import Any

from pydmq.rpc.client import call as rpc_call
from tests.support.toml import to_toml

from .mutator import Mutator, is_keepalive, load_corpus
from .net import free_port, wait_until

__all__ = ["FuzzBed", "FuzzReport", "LiveNode", "Pinger", "rss_kb"]

#: The tables the nodes replicate, so the htable and usrloc decoders get fuzzed too.
HTABLE_TABLES = ["t=>size=8;autoexpire=0;dmqreplicate=1;"]


def rss_kb(pid: int) -> int:
    """VmRSS of ``pid`` in KiB (0 when it is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def options(local: tuple[str, int], dest_port: int, call_id: str) -> bytes:
    """A minimal OPTIONS with ``rport`` (so the answer comes back to ``local``)."""
    host, port = local
    return (
        f"OPTIONS sip:ping@127.0.0.1:{dest_port} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {host}:{port};branch=z9hG4bK{secrets.token_hex(8)};rport\r\n"
        f"From: <sip:fuzz@{host}:{port}>;tag={secrets.token_hex(4)}\r\n"
        f"To: <sip:ping@127.0.0.1:{dest_port}>\r\n"
        f"Call-ID: {call_id}\r\n"
        "CSeq: 1 OPTIONS\r\n"
        "Max-Forwards: 70\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


def _call_id_of(data: bytes) -> bytes | None:
    i = data.find(b"\r\nCall-ID: ")
    if i < 0:
        return None
    j = data.find(b"\r\n", i + 11)
    return data[i + 11 : j if j >= 0 else len(data)]


def _status_of(data: bytes) -> int:
    if data.startswith(b"SIP/2.0 ") and data[8:11].isdigit():
        return int(data[8:11])
    return 0


# ------------------------------------------------------------------------------------ processes


@dataclass
class LiveNode:
    """One ``pydmq run`` process, configured by a TOML file, observed over its unix RPC."""

    name: str
    port: int
    workdir: Path
    tables: dict[str, dict[str, Any]]
    launcher: Callable[[list[str], Any], subprocess.Popen[bytes]]
    rundir: Path  # short: a unix socket path is at most 107 bytes
    proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"sip:127.0.0.1:{self.port}"

    @property
    def rpc_path(self) -> str:
        return str(self.rundir / f"{self.name}.sock")

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    @property
    def status_path(self) -> Path:
        return self.workdir / f"{self.name}.status.json"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def spawn(self) -> None:
        tables = {k: dict(v) for k, v in self.tables.items()}
        tables.setdefault("rpc", {}).update({"http_address": "", "unix_socket": self.rpc_path})
        config = self.workdir / f"{self.name}.toml"
        config.write_text(to_toml(tables))
        argv = [sys.executable, "-m", "pydmq", "run", "-c", str(config),
                "--status-file", str(self.status_path)]  # fmt: skip
        with self.log_path.open("ab") as log:
            self.proc = self.launcher(argv, log)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def rpc(self, method: str, *params: object, timeout: float = 5.0) -> Any:
        return rpc_call(method, list(params), unix=self.rpc_path, timeout=timeout)

    def list_nodes(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = self.rpc("dmq.list_nodes")
        return rows

    def active_remote(self) -> set[str]:
        return {
            f"{r['host']}:{r['port']}"
            for r in self.list_nodes()
            if not r["local"] and r["status"] == "active"
        }

    def wait_listening(self, timeout: float = 15.0) -> None:
        def up() -> bool:
            if not self.alive:
                raise AssertionError(f"{self.name} exited:\n{self.log_tail()}")
            return self.status_path.exists() and Path(self.rpc_path).exists()

        wait_until(up, timeout=timeout, interval=0.05, what=f"{self.name} listening",
                   describe=self.log_tail)  # fmt: skip

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; the exit status (None if it had to be
        killed)."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                return proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
                return None
        return proc.returncode


# ------------------------------------------------------------------------------------ pinger


class Pinger(threading.Thread):
    """An OPTIONS every ``interval`` seconds; each must be answered within ``timeout``.

    Also samples the VmRSS of ``pid`` every ``rss_interval`` seconds (into ``rss``).
    """

    def __init__(
        self,
        sock: Socket,
        dest_port: int,
        *,
        pid: int,
        interval: float = 0.1,
        timeout: float = 1.0,
        rss_interval: float = 0.5,
    ) -> None:
        super().__init__(daemon=True, name="fuzz-pinger")
        self.sock = sock
        self.dest_port = dest_port
        self.pid = pid
        self.interval = interval
        self.timeout = timeout
        self.rss_interval = rss_interval
        self.sent = 0
        self.answered = 0
        self.missed = 0
        self.late = 0
        self.codes: dict[int, int] = {}
        self.max_latency = 0.0
        self.worst_miss_run = 0
        self.rss: list[tuple[float, int]] = []
        self._run_misses = 0
        self._outstanding: dict[bytes, float] = {}
        self._stopping = threading.Event()
        self._prefix = f"ping-{secrets.token_hex(4)}-"

    def stop(self) -> None:
        """Stop sending, wait out the last pings' timeout, and end the thread."""
        self._stopping.set()
        self.join(self.timeout + 5)

    def run(self) -> None:
        sock = self.sock
        local = sock.getsockname()
        dest = ("127.0.0.1", self.dest_port)
        next_ping = next_rss = time.monotonic()
        n = 0
        while True:
            now = time.monotonic()
            stopping = self._stopping.is_set()
            if stopping and not self._outstanding:
                break
            if not stopping and now >= next_ping:
                n += 1
                call_id = f"{self._prefix}{n}".encode()
                with contextlib.suppress(OSError):
                    sock.sendto(options(local, self.dest_port, call_id.decode()), dest)
                self._outstanding[call_id] = now
                self.sent += 1
                next_ping += self.interval
                if next_ping < now:  # the thread was starved: do not burst to catch up
                    next_ping = now + self.interval
            if now >= next_rss:
                self.rss.append((now, rss_kb(self.pid)))
                next_rss = now + self.rss_interval
            self._expire(now)
            wait = max(0.0, min(next_ping, next_rss) - time.monotonic())
            ready, _, _ = select.select([sock], [], [], min(wait, 0.05))
            if ready:
                self._read(sock)

    def _read(self, sock: Socket) -> None:
        while True:
            try:
                data = sock.recv(65535, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            call_id = _call_id_of(data)
            if call_id is None or not call_id.startswith(self._prefix.encode()):
                continue
            sent_at = self._outstanding.pop(call_id, None)
            code = _status_of(data)
            if sent_at is None:
                self.late += 1  # already counted as missed
                continue
            self.codes[code] = self.codes.get(code, 0) + 1
            self.answered += 1
            self._run_misses = 0
            self.max_latency = max(self.max_latency, time.monotonic() - sent_at)

    def _expire(self, now: float) -> None:
        for call_id, sent_at in list(self._outstanding.items()):
            if now - sent_at > self.timeout:
                del self._outstanding[call_id]
                self.missed += 1
                self._run_misses += 1
                self.worst_miss_run = max(self.worst_miss_run, self._run_misses)


# ------------------------------------------------------------------------------------ report


@dataclass
class FuzzReport:
    seed: int
    generated: int = 0
    sent: int = 0
    sent_bytes: int = 0
    keepalives_skipped: int = 0
    send_errors: int = 0
    markers_sent: int = 0
    markers_lost: int = 0
    replies_to_fuzzer: int = 0
    node_received: int = 0  # fuzz datagrams the target counted (estimate, see module doc)
    kernel_drops: int | None = None  # UDP RcvbufErrors in the namespace (None: not known)
    elapsed: float = 0.0
    pings_sent: int = 0
    pings_answered: int = 0
    pings_missed: int = 0
    pings_late: int = 0
    ping_codes: dict[int, int] = field(default_factory=dict)
    worst_miss_run: int = 0
    max_ping_latency: float = 0.0
    rss_start_kb: int = 0
    rss_peak_kb: int = 0
    rss_end_kb: int = 0
    alive: bool = False
    membership_ok: bool = False
    membership: str = ""
    extra_nodes_end: int = 0
    stats_before: dict[str, Any] = field(default_factory=dict)
    stats_after: dict[str, Any] = field(default_factory=dict)
    tracebacks: list[str] = field(default_factory=list)
    exit_code: int | None = None

    @property
    def received_pct(self) -> float:
        return 100.0 * self.node_received / max(1, self.sent)

    def delta(self, section: str, key: str) -> int:
        after = self.stats_after.get(section, {}).get(key, 0)
        before = self.stats_before.get(section, {}).get(key, 0)
        return int(after) - int(before)

    def render(self) -> str:
        mb = 1024.0
        rate = self.sent / max(self.elapsed, 1e-9)
        sip = {k: self.delta("sip", k) for k in self.stats_after.get("sip", {})}
        transport = {k: self.delta("transport", k) for k in self.stats_after.get("transport", {})}
        lines = [
            f"seed {self.seed}: {self.sent} datagrams sent ({self.sent_bytes / 1e6:.1f} MB) in "
            f"{self.elapsed:.1f} s = {rate:.0f}/s; {self.keepalives_skipped} keep-alive-only"
            f" mutants skipped, {self.send_errors} send errors",
            f"received by the node: {self.node_received} ({self.received_pct:.2f} %, its counters"
            " minus the peer's sends: a lower bound);"
            f" markers {self.markers_sent} sent / {self.markers_lost} unanswered;"
            f" {self.replies_to_fuzzer} replies came back to the fuzzer; kernel receive-buffer"
            f" drops {'n/a' if self.kernel_drops is None else self.kernel_drops}",
            f"pings: {self.pings_sent} sent, {self.pings_answered} answered, {self.pings_missed}"
            f" missed ({self.pings_late} answered late), longest miss run {self.worst_miss_run},"
            f" slowest answer {self.max_ping_latency * 1000:.0f} ms, codes {self.ping_codes}",
            f"RSS: start {self.rss_start_kb / mb:.1f} MB, peak {self.rss_peak_kb / mb:.1f} MB,"
            f" end {self.rss_end_kb / mb:.1f} MB",
            f"node alive: {self.alive}; membership ok: {self.membership_ok} ({self.membership});"
            f" extra nodes listed at the end: {self.extra_nodes_end}; exit code {self.exit_code}",
            f"sip counters: {sip}",
            f"transport counters: {transport}",
            f"tracebacks in the node log: {len(self.tracebacks)}",
        ]
        return "\n".join(lines)

    def check(self, *, rss_factor: float, rss_slack_kb: int, max_missed: int) -> None:
        """The acceptance: alive, answering, bounded memory, membership intact, no traceback."""
        problems = []
        if not self.alive:
            problems.append("the node died")
        if self.pings_answered == 0 or self.pings_missed > max_missed:
            problems.append(f"{self.pings_missed} pings missed (max {max_missed})")
        bound = rss_factor * self.rss_start_kb + rss_slack_kb
        if self.rss_peak_kb > bound:
            problems.append(f"RSS peak {self.rss_peak_kb} KiB over {bound:.0f} KiB")
        if not self.membership_ok:
            problems.append(f"membership harmed: {self.membership}")
        if self.tracebacks:
            problems.append("traceback in the node log:\n" + self.tracebacks[0])
        if self.node_received < self.sent // 2:
            problems.append(f"the node received only {self.node_received} of {self.sent}")
        if problems:
            raise AssertionError("; ".join(problems) + "\n" + self.render())


def _tracebacks(log: str) -> list[str]:
    out = []
    lines = log.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("Traceback (most recent call last)"):
            out.append("\n".join(lines[max(0, i - 2) : i + 25]))
    return out


# ------------------------------------------------------------------------------------ the bed


class FuzzBed:
    """Two nodes (``target`` fuzzed, ``peer`` its cluster) in an isolated network namespace."""

    def __init__(self, workdir: Path, *, netns: bool = True, log_level: str = "INFO") -> None:
        self.workdir = workdir
        self.netns = netns
        self.log_level = log_level
        self.net: Any = None
        self.nodes: list[LiveNode] = []
        self.channel = "notification_peer" if netns else f"fz{secrets.token_hex(6)}"
        self._sockets: list[socket.socket] = []
        self.rundir = Path(tempfile.mkdtemp(prefix="pydmq-fz-"))

    def __enter__(self) -> FuzzBed:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.netns:
            from .netns import TestNet  # noqa: PLC0415 (root only)

            self.net = TestNet(["fuzz"])
            self.net.up()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:  # fmt: skip
        self.close()

    def close(self) -> None:
        for node in self.nodes:
            node.stop(timeout=5)
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()
        if self.net is not None:
            self.net.down()
            self.net = None
        shutil.rmtree(self.rundir, ignore_errors=True)

    # -- processes and sockets -----------------------------------------------------------
    def _launch(self, argv: list[str], log: Any) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYDMQ_")}
        env["PYTHONPATH"] = os.pathsep.join([str(Path.cwd()), env.get("PYTHONPATH", "")])
        if self.net is not None:
            proc: subprocess.Popen[bytes] = self.net.run_in(
                "fuzz", argv, stdout=log, stderr=subprocess.STDOUT, env=env
            )
            return proc
        return subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
            start_new_session=True,
        )  # fmt: skip

    def socket(self, rcvbuf: int = 4 * 1024 * 1024) -> Socket:
        """A UDP socket on 127.0.0.1 inside the bed, bound to an ephemeral port."""
        sock = (
            self.net.socket("fuzz")
            if self.net is not None
            else socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        )
        self._sockets.append(sock)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, rcvbuf)
        sock.bind(("127.0.0.1", 0))
        return sock

    def udp_rcvbuf_errors(self) -> int | None:
        """UDP datagrams the kernel dropped for a full receive buffer, in the namespace (on
        the host the counter is shared with everything else: None)."""
        if self.net is None:
            return None
        lines = [ln.split() for ln in self.net.exec("fuzz", ["cat", "/proc/net/snmp"]).splitlines()]
        udp = [ln for ln in lines if ln and ln[0] == "Udp:"]
        if len(udp) < 2 or "RcvbufErrors" not in udp[0]:
            return None
        return int(udp[1][udp[0].index("RcvbufErrors")])

    def _port(self) -> int:
        # In the namespace every port is free; on the host take one nobody holds.
        return free_port("both")

    def node(self, name: str, *, seeds: Sequence[LiveNode] = (), **dmq: Any) -> LiveNode:
        port = self._port()
        tables: dict[str, dict[str, Any]] = {
            "dmq": {
                "server_address": f"sip:127.0.0.1:{port}",
                "notification_channel": self.channel,
                "ping_interval": 2,
                **({"notification_address": [s.uri for s in seeds]} if seeds else {}),
                **dmq,
            },
            "tm": {"fr_timer": 2.0},
            "htable": {"tables": HTABLE_TABLES, "enable_dmq": True, "dmq_init_sync": True},
            "usrloc": {"enable": True},
            "log": {"level": self.log_level},
        }
        node = LiveNode(name, port, self.workdir, tables, self._launch, self.rundir)
        self.nodes.append(node)
        return node

    def start_pair(self, timeout: float = 20.0) -> tuple[LiveNode, LiveNode]:
        """The fuzz target and a peer that joined it; both list each other as active."""
        peer = self.node("peer")
        target = self.node("target", seeds=[peer])
        peer.spawn()
        target.spawn()
        peer.wait_listening()
        target.wait_listening()
        wait_until(
            lambda: target.active_remote() == {f"127.0.0.1:{peer.port}"}
            and peer.active_remote() == {f"127.0.0.1:{target.port}"},
            timeout=timeout, interval=0.1, what="the pair to join",
            describe=lambda: f"target: {target.log_tail(10)}\npeer: {peer.log_tail(10)}",
        )  # fmt: skip
        return target, peer

    # -- the run ---------------------------------------------------------------------------
    def fuzz(
        self,
        target: LiveNode,
        peer: LiveNode,
        *,
        count: int,
        seed: int,
        batch: int = 64,
        window: int = 4,
        marker_timeout: float = 2.0,
        ping_interval: float = 0.1,
        ping_timeout: float = 1.0,
        progress: Callable[[str], None] | None = None,
        progress_every: float = 10.0,
    ) -> FuzzReport:
        report = FuzzReport(seed=seed)
        mut = Mutator(load_corpus(), seed)
        fuzz_sock = self.socket()
        ping_sock = self.socket(rcvbuf=256 * 1024)
        fuzz_sock.settimeout(1.0)
        local = fuzz_sock.getsockname()
        dest = ("127.0.0.1", target.port)
        # Let the startup sync traffic settle, then take the baseline.
        time.sleep(0.5)
        report.stats_before = target.rpc("dmq.stats")
        peer_before = peer.rpc("dmq.stats")
        drops_before = self.udp_rcvbuf_errors()
        report.rss_start_kb = rss_kb(target.pid)
        pinger = Pinger(ping_sock, target.port, pid=target.pid, interval=ping_interval,
                        timeout=ping_timeout)  # fmt: skip
        pinger.start()
        markers: deque[tuple[bytes, float]] = deque()
        marker_prefix = f"mark-{secrets.token_hex(4)}-".encode()
        t0 = time.monotonic()
        last_progress = t0
        try:
            while report.generated < count:
                n = min(batch, count - report.generated)
                for data in mut.batch(n):
                    report.generated += 1
                    if is_keepalive(data):
                        report.keepalives_skipped += 1
                        continue
                    try:
                        fuzz_sock.sendto(data, dest)
                    except OSError:
                        report.send_errors += 1
                        continue
                    report.sent += 1
                    report.sent_bytes += len(data)
                report.markers_sent += 1
                call_id = marker_prefix + str(report.markers_sent).encode()
                fuzz_sock.sendto(options(local, target.port, call_id.decode()), dest)
                markers.append((call_id, time.monotonic()))
                while len(markers) > window:
                    self._await_marker(fuzz_sock, markers, marker_prefix, marker_timeout, report)
                if not target.alive:
                    break
                now = time.monotonic()
                if progress is not None and now - last_progress >= progress_every:
                    last_progress = now
                    progress(
                        f"{report.generated}/{count} generated, {report.sent} sent,"
                        f" {report.sent / (now - t0):.0f}/s, pings {pinger.answered}/"
                        f"{pinger.sent} (missed {pinger.missed}),"
                        f" RSS {rss_kb(target.pid) / 1024:.1f} MB"
                    )
            while markers and target.alive:
                self._await_marker(fuzz_sock, markers, marker_prefix, marker_timeout, report)
            report.elapsed = time.monotonic() - t0
        finally:
            pinger.stop()
        report.pings_sent = pinger.sent
        report.pings_answered = pinger.answered
        report.pings_missed = pinger.missed
        report.pings_late = pinger.late
        report.ping_codes = dict(pinger.codes)
        report.worst_miss_run = pinger.worst_miss_run
        report.max_ping_latency = pinger.max_latency
        samples = [kb for _, kb in pinger.rss if kb]
        report.alive = target.alive
        if not report.alive:
            report.tracebacks = _tracebacks(target.log_text())
            return report
        report.rss_end_kb = rss_kb(target.pid)
        report.rss_peak_kb = max([report.rss_start_kb, report.rss_end_kb, *samples])
        report.stats_after = target.rpc("dmq.stats")
        peer_after = peer.rpc("dmq.stats")
        total = report.delta("sip", "received") + report.delta("transport", "udp_dropped")
        peer_sent = int(peer_after["sip"]["sent"]) - int(peer_before["sip"]["sent"])
        report.node_received = max(0, total - peer_sent - report.pings_sent - report.markers_sent)
        drops_after = self.udp_rcvbuf_errors()
        if drops_before is not None and drops_after is not None:
            report.kernel_drops = drops_after - drops_before
        self._check_membership(target, peer, report)
        return report

    def _await_marker(
        self,
        sock: Socket,
        markers: deque[tuple[bytes, float]],
        prefix: bytes,
        timeout: float,
        report: FuzzReport,
    ) -> None:
        """Read replies until the oldest marker is answered (or times out)."""
        _, sent_at = markers[0]
        while True:
            remaining = sent_at + timeout - time.monotonic()
            if remaining <= 0:
                markers.popleft()
                report.markers_lost += 1
                return
            sock.settimeout(remaining)
            try:
                data = sock.recv(65535)
            except TimeoutError:
                continue
            except OSError:
                continue
            report.replies_to_fuzzer += 1
            call_id = _call_id_of(data)
            if call_id is None or not call_id.startswith(prefix):
                continue
            report.replies_to_fuzzer -= 1
            # In-order reading: this marker's answer means the older ones were read too.
            while markers:
                cid, _ = markers.popleft()
                if cid == call_id:
                    return
            return

    def _check_membership(self, target: LiveNode, peer: LiveNode, report: FuzzReport) -> None:
        """The peer is still active on both sides and the target's own entry is intact."""
        peer_hp = f"127.0.0.1:{peer.port}"
        target_hp = f"127.0.0.1:{target.port}"

        def ok() -> bool:
            rows = target.list_nodes()
            local = [r for r in rows if r["local"]]
            mine = {f"{r['host']}:{r['port']}": r for r in rows}
            return (
                len(local) == 1
                and f"{local[0]['host']}:{local[0]['port']}" == target_hp
                and mine.get(peer_hp, {}).get("status") == "active"
                and target_hp in peer.active_remote()
            )

        try:
            wait_until(ok, timeout=10, interval=0.2, what="membership")
            report.membership_ok = True
        except TimeoutError:
            report.membership_ok = False
        rows = target.list_nodes()
        report.extra_nodes_end = sum(
            1 for r in rows if f"{r['host']}:{r['port']}" not in (peer_hp, target_hp)
        )
        report.membership = ", ".join(
            f"{r['host']}:{r['port']}={r['status']}{'(local)' if r['local'] else ''}"
            for r in rows[:6]
        ) + (f" ... ({len(rows)} rows)" if len(rows) > 6 else "")

    def finish(self, target: LiveNode, report: FuzzReport) -> None:
        """Stop the target gracefully; record its exit code and any traceback it logged."""
        report.exit_code = target.stop(timeout=10)
        report.tracebacks = _tracebacks(target.log_text())
