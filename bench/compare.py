"""pydmq side by side with Kamailio 5.6.3: the highest clean request rate per scenario.

Run: ``python bench/compare.py [--smoke] [--duration 10] [--out bench/RESULTS.md]``.

Starts a Kamailio 5.6.3 node (``children=2``, dmq ``num_workers=2``, htable ``t`` replicated,
``maxbuffer`` 4 MB; the config generator of ``tests/support/kamailio.py``) and a pydmq node
configured the same (``python -m pydmq run``: ``num_workers=2``, the same htable definition
with the real htable consumer, 4 MB UDP buffers by default), both alone on 127.0.0.1. Then,
scenario by scenario and server by server, sipp drives UDP load and the harness looks for the
highest rate that is *clean* over ``--duration`` seconds: every call answered with the expected
code, zero failed calls and zero retransmissions (sipp retransmits after 500 ms without an
answer).

Scenarios:
  (a) KDMQ ``sip:htable@…`` with a SET_CELL JSON body (1000 keys cycled): through the DMQ worker
      queue and the htable consumer, ``200 OK``;
  (b) KDMQ on an unknown channel: ``404 User Not Found`` straight from the SIP worker;
  (c) OPTIONS answered statelessly, ``200 OK``.

Search, per server and scenario: a ramp of short probes (``--ramp-seconds``, rate x1.5 each
step) finds the first unclean rate, then full-length probes confirm the last clean one and
bisect between the two (geometric mean, until within 10 % or ``--max-full`` probes). Each
search has an equal share of ``--budget`` seconds (time spent waiting for a quiet machine not
counted). A failed probe during which other processes used more than ``--quiet-threshold`` % of
a core is run again once. A clean probe is "sipp-limited" when sipp used a whole core and
offered less than 95 % of the rate; the search then stops climbing and the figure is a lower
bound for that server.

Reported per scenario: both clean rates and the ratio pydmq/Kamailio; p50/p99 latency of each
server at its best clean rate, measured in microseconds by a side probe that sends one request
every 10 ms during the run (sipp only has millisecond resolution); CPU of each server (all of
Kamailio's processes, the pydmq process) and of sipp, in % of one core, over that same run.
``--smoke`` runs one short low-rate probe per scenario and server, only to prove the harness.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import math
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import (
    CLK_TCK,
    HTABLE_DEF,
    ROOT,
    CpuMeter,
    KamailioNode,
    LatencyProbe,
    PydmqProcess,
    free_port,
    install_signal_handlers,
    machine_info,
    sip_request,
    start_kamailio,
    stop_kamailio,
    system_busy_ticks,
    table_cells,
)

KEYS = 1000  # distinct htable keys cycled by scenario (a)
#: pydmq's ``[sip] udp_children``: the counterpart of Kamailio's children=2 (``--udp-children``).
UDP_CHILDREN = 2
KAMAILIO_MAXBUFFER = 4 * 1024 * 1024  # = pydmq.sip.transport.UDP_BUFFER_BYTES


# ------------------------------------------------------------------------------ scenarios


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    method: str
    user: str | None  # R-URI user = DMQ channel; None: sip:host:port
    code: int
    body: str = ""  # sipp template ([field0], [field1] from the inject file)
    content_type: str | None = None
    inject: bool = False

    def xml(self) -> str:
        ruri = (
            f"sip:{self.user}@[remote_ip]:[remote_port]"
            if self.user
            else ("sip:[remote_ip]:[remote_port]")
        )
        lines = [
            f"{self.method} {ruri} SIP/2.0",
            "Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch];rport",
            f"From: <sip:{self.user or 'sipp'}@[local_ip]:[local_port]>"
            ";tag=[pid]SIPpTag00[call_number]",
            f"To: <{ruri}>",
            "Call-ID: [call_id]",
            f"CSeq: {10 if self.method == 'KDMQ' else 1} {self.method}",
            f"Max-Forwards: {1 if self.method == 'KDMQ' else 70}",
        ]
        if self.content_type:
            lines.append(f"Content-Type: {self.content_type}")
        lines.append("Content-Length: [len]")
        message = "\n".join(lines) + "\n\n" + self.body
        return (
            '<?xml version="1.0" encoding="ISO-8859-1" ?>\n'
            f'<scenario name="{self.key}">\n'
            '  <send start_rtd="1" retrans="500">\n'
            f"    <![CDATA[\n{message}\n]]>\n"
            "  </send>\n"
            f'  <recv response="{self.code}" rtd="1"/>\n'
            "</scenario>\n"
        )

    def probe_request(self, port: int) -> Callable[[tuple[str, int], int], bytes]:
        ruri = f"sip:{self.user}@127.0.0.1:{port}" if self.user else f"sip:127.0.0.1:{port}"
        user = self.user or "sipp"

        def build(local: tuple[str, int], seq: int) -> bytes:
            body = self.body.replace("[field0]", f"k{seq % KEYS}").replace(
                "[field1]", f"probe{seq}"
            )
            return sip_request(
                self.method, ruri, local, body.encode(), self.content_type, seq, user=user
            )

        return build


SCENARIOS = [
    Scenario(
        "a",
        "KDMQ htable SET_CELL via the worker queue (200)",
        "KDMQ",
        "htable",
        200,
        body='{"action":2,"htname":"t","cname":"[field0]","type":2,"strval":"[field1]","mode":1}',
        content_type="application/json",
        inject=True,
    ),
    Scenario(
        "b",
        "KDMQ on an unknown channel (404, no worker)",
        "KDMQ",
        "nochannel",
        404,
        body="x",
        content_type="text/plain",
    ),
    Scenario("c", "OPTIONS answered statelessly (200)", "OPTIONS", None, 200),
]


# ------------------------------------------------------------------------------ servers


@dataclass
class Server:
    name: str
    port: int
    pids: Callable[[], list[int]]
    alive: Callable[[], bool]
    cells: Callable[[], int | None] = lambda: None


def kamailio_server(workdir: Path) -> tuple[Server, KamailioNode]:
    node = start_kamailio(
        workdir=workdir / "kamailio",
        name="kamailio-bench",
        children=2,
        num_workers=2,
        htable=True,
        htable_def=HTABLE_DEF,
        ping_interval=60,
        # pydmq asks the kernel for 4 MB UDP socket buffers; Kamailio's maxbuffer (256 KB by
        # default) is raised to the same, or it drops sipp's bursts long before its CPU is busy.
        extra_global=f"maxbuffer={KAMAILIO_MAXBUFFER}",
    )

    cells = partial(table_cells, node.rpc_result)
    server = Server("Kamailio", node.port, node.group_pids, lambda: node.running, cells)
    return server, node


def pydmq_server(udp_children: int = UDP_CHILDREN) -> tuple[Server, PydmqProcess]:
    proc = PydmqProcess(
        dmq={"num_workers": 2, "ping_interval": 60},
        htable={"tables": [HTABLE_DEF], "enable_dmq": True, "dmq_init_sync": True},
        # Kamailio's children=2: two receiver processes beside the main one.
        extra={"sip": {"udp_children": udp_children}},
    ).start()

    cells = partial(table_cells, proc.rpc)
    server = Server("pydmq", proc.port, proc.pids, lambda: proc.running, cells)
    return server, proc


# ------------------------------------------------------------------------------ probes


@dataclass
class Probe:
    server: str
    scenario: str
    rate: int
    seconds: float
    calls: int = 0
    ok: int = 0
    failed: int = 0
    retrans: int = 0
    achieved: float = 0.0
    returncode: int = 0
    p50: float = math.nan
    p99: float = math.nan
    probe_lost: int = 0
    cpu_server: float = 0.0
    cpu_sipp: float = 0.0
    cpu_other: float = 0.0  # everything else on the machine, % of one core
    note: str = ""

    @property
    def clean(self) -> bool:
        return (
            self.returncode == 0
            and self.failed == 0
            and self.retrans == 0
            and self.ok == self.calls
            and self.calls > 0
        )

    @property
    def limited(self) -> bool:
        """sipp itself could not offer the rate: it used (nearly) a whole core."""
        return self.cpu_sipp >= 90.0 and self.achieved < 0.95 * self.rate

    def line(self) -> str:
        verdict = "clean" if self.clean else "FAIL "
        extra = " sipp-limited" if self.clean and self.limited else ""
        return (
            f"  {self.server:9s} ({self.scenario}) {self.rate:>7,}/s x{self.seconds:>4.1f}s:"
            f" {verdict}"
            f" ok={self.ok} failed={self.failed} retrans={self.retrans}"
            f" achieved={self.achieved:,.0f}/s p50={self.p50:,.0f}us p99={self.p99:,.0f}us"
            f" cpu={self.cpu_server:.0f}% sipp={self.cpu_sipp:.0f}%"
            f" other={self.cpu_other:.0f}%{extra}" + (f" [{self.note}]" if self.note else "")
        )


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _sipp_stats(path: Path) -> dict[str, str]:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return {}
    rows = [r for r in csv.reader(text.splitlines(), delimiter=";") if r]
    if len(rows) < 2:
        return {}
    return dict(zip(rows[0], rows[-1], strict=False))


def _int(stats: dict[str, str], key: str) -> int:
    try:
        return int(float(stats.get(key, "0") or 0))
    except ValueError:
        return 0


_quiet_left = [0.0]  # seconds of waiting for a quiet machine still allowed in this run


def wait_quiet(threshold: float, own: Callable[[], list[int]]) -> float:
    """Wait (within the run's allowance) until the machine is idle apart from our servers:
    other jobs on these 2 CPUs would be measured as our slowness. Returns their CPU %."""
    while True:
        meter = CpuMeter(own)
        busy0, _ = system_busy_ticks()
        meter.start()
        time.sleep(0.5)
        ours = meter.stop()
        other = 100.0 * (system_busy_ticks()[0] - busy0) / CLK_TCK / 0.5 - ours
        if other <= threshold or _quiet_left[0] <= 0:
            return other
        print(f"    machine busy ({other:.0f}% of a core used by others); waiting", flush=True)
        time.sleep(2.0)
        _quiet_left[0] -= 2.5


def run_probe(server: Server, scen: Scenario, rate: int, seconds: float, tmp: Path) -> Probe:
    """One sipp run at ``rate`` calls/s for ``seconds``; the server's CPU and latency."""
    result = Probe(server.name, scen.key, rate, seconds)
    calls = max(1, round(rate * seconds))
    scen_file = tmp / f"{scen.key}.xml"
    scen_file.write_text(scen.xml(), encoding="iso-8859-1")
    stat_file = tmp / f"stat-{server.name}-{scen.key}-{rate}-{time.monotonic_ns()}.csv"
    args = [
        shutil.which("sipp") or "sipp",
        f"127.0.0.1:{server.port}",
        "-sf", str(scen_file),
        "-t", "u1",
        "-i", "127.0.0.1",
        "-p", str(free_port("udp")),
        "-r", str(rate), "-rp", "1000",
        "-m", str(calls),
        "-l", str(max(1000, rate * 3)),
        "-recv_timeout", "2000",
        "-timeout", f"{math.ceil(seconds) + 15}s",
        "-buff_size", "4194304",
        "-max_recv_loops", "10000",
        "-nostdin",
        "-trace_stat", "-stf", str(stat_file), "-fd", "1",
    ]  # fmt: skip
    if scen.inject:
        inject = tmp / "keys.csv"
        if not inject.exists():
            rows = "".join(f"k{i};v{i}\n" for i in range(KEYS))
            inject.write_text("SEQUENTIAL\n" + rows)
        args += ["-inf", str(inject)]
    probe = LatencyProbe(("127.0.0.1", server.port), scen.probe_request(server.port))
    meter = CpuMeter(server.pids)
    cpu0 = _children_cpu()
    busy0, _ = system_busy_ticks()
    meter.start()
    t0 = time.monotonic()
    probe.start()
    try:
        proc = subprocess.run(
            args,
            cwd=tmp,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=seconds + 30,
            check=False,
        )
        result.returncode = proc.returncode
        if proc.returncode not in (0, 1):
            result.note = proc.stderr.decode(errors="replace").strip()[-300:]
    except subprocess.TimeoutExpired:
        result.returncode = -1
        result.note = "sipp did not finish"
    finally:
        probe.stop()
        result.cpu_server = meter.stop()
    wall = time.monotonic() - t0
    result.cpu_sipp = 100.0 * (_children_cpu() - cpu0) / max(wall, 1e-9)
    busy = 100.0 * (system_busy_ticks()[0] - busy0) / CLK_TCK / max(wall, 1e-9)
    result.cpu_other = max(0.0, busy - result.cpu_server - result.cpu_sipp)
    stats = _sipp_stats(stat_file)
    result.calls = calls
    result.ok = _int(stats, "SuccessfulCall(C)")
    result.failed = _int(stats, "FailedCall(C)")
    result.retrans = _int(stats, "Retransmissions(C)")
    try:
        result.achieved = float(stats.get("CallRate(C)", "0") or 0)
    except ValueError:
        result.achieved = 0.0
    result.p50, result.p99 = probe.summary()
    result.probe_lost = probe.lost
    if not server.alive():
        result.note = (result.note + " server died").strip()
    return result


# ------------------------------------------------------------------------------ search


@dataclass
class Search:
    server: str
    scenario: str
    best: Probe | None = None
    limited: bool = False
    probes: list[Probe] = field(default_factory=list)
    error: str = ""


def _round(rate: float) -> int:
    return max(100, round(rate / 100.0) * 100)


def search(server: Server, scen: Scenario, args: argparse.Namespace, tmp: Path,
           budget: float) -> Search:  # fmt: skip
    out = Search(server.name, scen.key)
    deadline = time.monotonic() + budget

    def probe(rate: int, seconds: float) -> Probe:
        nonlocal deadline
        if args.quiet_threshold > 0:
            t0 = time.monotonic()
            wait_quiet(args.quiet_threshold, server.pids)
            deadline += time.monotonic() - t0  # waiting for others is not this search's time
        p = run_probe(server, scen, rate, seconds, tmp)
        out.probes.append(p)
        print(p.line(), flush=True)
        if not p.clean and args.quiet_threshold > 0 and p.cpu_other > args.quiet_threshold:
            # Another job took CPU during the probe: inconclusive, run it again once.
            print("    (disturbed by other processes: probing again)", flush=True)
            time.sleep(args.pause)
            t0 = time.monotonic()
            wait_quiet(args.quiet_threshold, server.pids)
            deadline += time.monotonic() - t0
            p = run_probe(server, scen, rate, seconds, tmp)
            out.probes.append(p)
            print(p.line(), flush=True)
        time.sleep(args.pause)
        if not server.alive():
            raise RuntimeError(f"{server.name} died")
        return p

    try:
        if args.smoke:
            p = probe(args.smoke_rate, args.duration)
            out.best = p if p.clean else None
            return out
        # 1. ramp with short probes
        rate = float(args.start_rate)
        lo: int | None = None
        hi: int | None = None
        while rate <= args.max_rate and time.monotonic() < deadline:
            p = probe(_round(rate), args.ramp_seconds)
            if not p.clean:
                hi = p.rate
                break
            lo = p.rate
            if p.limited:
                out.limited = True
                break
            rate *= args.step
        if lo is None:
            lo = _round((hi or args.start_rate) / args.step)
        # 2. full-length probes: confirm lo (stepping down if needed), then bisect
        full = 0
        while full < args.max_full and time.monotonic() < deadline:
            p = probe(lo, args.duration)
            full += 1
            if p.clean:
                out.best = p
                if p.limited:
                    out.limited = True
                break
            hi = lo
            lo = _round(lo / args.step)
        while (
            out.best is not None
            and not out.limited
            and hi is not None
            and hi / out.best.rate > args.precision
            and full < args.max_full
            and time.monotonic() + args.duration < deadline
        ):
            mid = _round(math.sqrt(out.best.rate * hi))
            if mid in (out.best.rate, hi):
                break
            p = probe(mid, args.duration)
            full += 1
            if p.clean:
                out.best = p
                if p.limited:
                    out.limited = True
            else:
                hi = mid
    except RuntimeError as exc:
        out.error = str(exc)
    return out


# ------------------------------------------------------------------------------ report


def _fmt_rate(s: Search) -> str:
    if s.best is None:
        return "none clean" + (f" ({s.error})" if s.error else "")
    return f"{'≥' if s.limited else ''}{s.best.rate:,}/s"


def _fmt_lat(p: Probe | None) -> str:
    if p is None or math.isnan(p.p50):
        return "-"
    return f"{p.p50:,.0f} / {p.p99:,.0f} µs"


def _pct(p: Probe | None, name: str) -> str:
    return "-" if p is None else f"{getattr(p, name):.0f}%"


def _ratio(k: Search, p: Search) -> str:
    if k.best is None or p.best is None:
        return "-"
    return f"{p.best.rate / k.best.rate:.2f}"


def report(results: dict[str, dict[str, Search]], args: argparse.Namespace,
           info: dict[str, str], extra: dict[str, str], elapsed: float) -> str:  # fmt: skip
    mode = "smoke (one short low-rate probe each; not a measurement)" if args.smoke else "full"
    lines = [
        "# pydmq vs Kamailio 5.6.3: clean request rates over UDP",
        "",
        f"Generated by `python bench/compare.py{' --smoke' if args.smoke else ''}"
        f" --duration {args.duration:g}` on {datetime.datetime.now().isoformat(timespec='seconds')}"
        f" ({mode}); run time {elapsed:.0f} s.",
        "",
        f"Machine: {info['cpus']} CPUs ({info['cpu']}), Linux {info['kernel']}, Python "
        f"{info['python']}, uvloop {info['uvloop']}, Kamailio {info['kamailio']}, sipp "
        f"{info['sipp']}. sipp, both servers and the latency probe share these CPUs.",
        "",
        "A rate is *clean* when every one of `rate x duration` calls got the expected final "
        "response with no failed call and no sipp retransmission (sipp retransmits after "
        "500 ms). Latency: a side probe, one request every 10 ms during the best clean run "
        "(microseconds, p50 / p99). CPU: % of one core during that run (Kamailio: all its "
        "processes; pydmq: its one process; sipp: the load generator; other: everything else "
        "on the machine, e.g. other jobs, which skews the figures when it is not ~0).",
        "",
        "| scenario | Kamailio | pydmq | ratio pydmq/Kamailio | latency Kamailio p50/p99"
        " | latency pydmq p50/p99 | CPU Kamailio | CPU pydmq | CPU sipp (K / P)"
        " | CPU of other processes (K / P) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for scen in SCENARIOS:
        if scen.key not in results:
            continue
        k = results[scen.key].get("Kamailio", Search("Kamailio", scen.key))
        p = results[scen.key].get("pydmq", Search("pydmq", scen.key))
        kb, pb = k.best, p.best
        lines.append(
            f"| ({scen.key}) {scen.title} | {_fmt_rate(k)} | {_fmt_rate(p)} | {_ratio(k, p)} | "
            f"{_fmt_lat(kb)} | {_fmt_lat(pb)} | "
            f"{_pct(kb, 'cpu_server')} | {_pct(pb, 'cpu_server')} | "
            f"{_pct(kb, 'cpu_sipp')} / {_pct(pb, 'cpu_sipp')} | "
            f"{_pct(kb, 'cpu_other')} / {_pct(pb, 'cpu_other')} |"
        )
    lines += [
        "",
        "What limits each server, the profile, the optimisations and the other benchmarks"
        " (fan-out, join, failure detection, htable sync, memory): `bench/PERFORMANCE.md`.",
    ]
    lines += ["", "Servers:", ""]
    lines += [f"- {k}: {v}" for k, v in extra.items()]
    lines += ["", "## Every probe", "", "```"]
    for scen in SCENARIOS:
        for s in results.get(scen.key, {}).values():
            lines += [p.line() for p in s.probes]
    lines += ["```", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="one short low-rate probe each (<60 s)")
    ap.add_argument("--duration", type=float, default=None, help="seconds per full probe (10)")
    ap.add_argument(
        "--out", type=Path, default=None, help="default bench/RESULTS.md (RESULTS-smoke.md)"
    )
    ap.add_argument("--scenarios", default="abc", help="subset of a, b, c")
    ap.add_argument("--servers", default="kamailio,pydmq")
    ap.add_argument("--budget", type=float, default=540.0, help="seconds for all searches")
    ap.add_argument("--start-rate", type=int, default=2000)
    ap.add_argument("--max-rate", type=int, default=150_000)
    ap.add_argument("--step", type=float, default=1.5, help="ramp factor")
    ap.add_argument("--ramp-seconds", type=float, default=2.0)
    ap.add_argument("--max-full", type=int, default=4, help="full-length probes per search")
    ap.add_argument("--precision", type=float, default=1.1)
    ap.add_argument("--pause", type=float, default=1.0, help="seconds between probes")
    ap.add_argument("--smoke-rate", type=int, default=300)
    ap.add_argument(
        "--udp-children",
        type=int,
        default=UDP_CHILDREN,
        help="pydmq [sip] udp_children (Kamailio runs children=2)",
    )
    ap.add_argument(
        "--quiet-threshold",
        type=float,
        default=25.0,
        help="before each probe wait until other processes use at most this %% of a core"
        " (0: never wait)",
    )
    ap.add_argument(
        "--quiet-wait", type=float, default=300.0, help="total seconds of such waiting allowed"
    )
    args = ap.parse_args(argv)
    if args.duration is None:
        args.duration = 3.0 if args.smoke else 10.0
    if args.out is None:
        args.out = ROOT / "bench" / ("RESULTS-smoke.md" if args.smoke else "RESULTS.md")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _quiet_left[0] = 0.0 if args.smoke else args.quiet_wait
    install_signal_handlers()
    t_start = time.monotonic()
    info = machine_info()
    scenarios = [s for s in SCENARIOS if s.key in args.scenarios]
    wanted = {s.strip().lower() for s in args.servers.split(",")}
    tmp = Path(tempfile.mkdtemp(prefix="pydmq-compare-"))
    results: dict[str, dict[str, Search]] = {}
    extra: dict[str, str] = {}
    servers: list[Server] = []
    kam: KamailioNode | None = None
    pyd: PydmqProcess | None = None
    try:
        if "kamailio" in wanted:
            kserver, kam = kamailio_server(tmp)
            servers.append(kserver)
            print(f"Kamailio {info['kamailio']} on udp:127.0.0.1:{kam.port}")
        if "pydmq" in wanted:
            pserver, pyd = pydmq_server(args.udp_children)
            servers.append(pserver)
            print(f"pydmq on udp:127.0.0.1:{pyd.port} (pid {pyd.pid})")
        n = max(1, len(servers) * len(scenarios))
        for scen in scenarios:
            print(f"({scen.key}) {scen.title}", flush=True)
            for server in servers:
                budget = args.budget / n
                results.setdefault(scen.key, {})[server.name] = search(
                    server, scen, args, tmp, budget
                )
        for server in servers:
            cells = server.cells()
            if cells is not None:
                extra[f"{server.name} htable t"] = f"{cells} cells after the run"
    finally:
        if kam is not None:
            extra["Kamailio"] = (
                "kamailio.cfg from tests/support/kamailio.py: children=2, dmq num_workers=2,"
                f" maxbuffer={KAMAILIO_MAXBUFFER} (the UDP buffers pydmq asks for),"
                f" htable `{HTABLE_DEF}` (enable_dmq=1), OPTIONS -> sl_send_reply 200,"
                " KDMQ -> dmq_handle_message()"
            )
            stop_kamailio(kam)
        if pyd is not None:
            extra["pydmq"] = (
                "`python -m pydmq run -c node.toml`: num_workers=2, the htable consumer with"
                f" table `{HTABLE_DEF}` (enable_dmq, dmq_init_sync), uvloop, default route"
                " (OPTIONS -> 200, unknown channel -> 404 User Not Found)"
            )
            with contextlib.suppress(Exception):
                tx = pyd.rpc("dmq.stats").get("transactions", {})
                keys = ("servers_live", "overloaded", "evicted", "absorbed_requests")
                extra["pydmq transactions"] = ", ".join(f"{k}={tx.get(k)}" for k in keys)
            pyd.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    elapsed = time.monotonic() - t_start
    text = report(results, args, info, extra, elapsed)
    args.out.write_text(text)
    print()
    print(text.split("## Every probe")[0])
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
