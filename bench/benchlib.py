"""Shared pieces of the benchmarks: start/stop servers, CPU and memory readings, SIP probes.

Everything binds 127.0.0.1 only. Every process started here belongs to its own process group
and is stopped (SIGTERM, then SIGKILL) by :func:`stop_all`, which ``atexit`` and the signal
handlers installed by :func:`install_signal_handlers` also run, so an interrupted benchmark
leaves nothing behind.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support.kamailio import KamailioNode  # noqa: E402
from tests.support.net import free_port  # noqa: E402

__all__ = [
    "CLK_TCK",
    "HTABLE_DEF",
    "ROOT",
    "CpuMeter",
    "KamailioNode",
    "LatencyProbe",
    "PydmqProcess",
    "free_port",
    "install_signal_handlers",
    "machine_info",
    "percentile",
    "proc_cpu_ticks",
    "proc_rss_kb",
    "sip_request",
    "stop_all",
    "system_busy_ticks",
    "wait_for",
    "write_toml",
]

CLK_TCK = os.sysconf("SC_CLK_TCK")
#: The replicated table of every benchmark, on both servers (the test harness's default).
HTABLE_DEF = "t=>size=8;autoexpire=0;dmqreplicate=1;"

_live: list[Any] = []
_live_lock = threading.Lock()


def _register(obj: Any) -> None:
    with _live_lock:
        _live.append(obj)


def _unregister(obj: Any) -> None:
    with _live_lock, contextlib.suppress(ValueError):
        _live.remove(obj)


_temp_dirs: list[Path] = []


def _remove_temp_dirs() -> None:
    for path in _temp_dirs:
        shutil.rmtree(path, ignore_errors=True)


atexit.register(_remove_temp_dirs)  # runs after stop_all (atexit is last-in, first-out)


def stop_all() -> None:
    """Stop every server this process started and has not stopped yet (newest first)."""
    with _live_lock:
        objs = list(reversed(_live))
    for obj in objs:
        with contextlib.suppress(Exception):
            obj.stop()


atexit.register(stop_all)


def install_signal_handlers() -> None:
    """SIGTERM/SIGHUP end the benchmark like Ctrl-C: ``finally`` blocks and atexit run."""

    def handler(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)


def wait_for(
    predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.02
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


# ----------------------------------------------------------------------------------- /proc


def proc_cpu_ticks(pid: int) -> int:
    """utime + stime of ``pid`` in clock ticks (0 if it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    fields = stat[stat.rfind(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])


def system_busy_ticks() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole machine since boot, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields) - idle, sum(fields)


def proc_rss_kb(pid: int) -> int:
    """Resident set size of ``pid`` in KiB (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class CpuMeter:
    """CPU used by a set of processes between :meth:`start` and :meth:`stop`, in % of a core."""

    def __init__(self, pids: Callable[[], Iterable[int]]) -> None:
        self._pids = pids
        self._start: dict[int, int] = {}
        self._t0 = 0.0

    def start(self) -> None:
        self._start = {pid: proc_cpu_ticks(pid) for pid in self._pids()}
        self._t0 = time.monotonic()

    def stop(self) -> float:
        elapsed = time.monotonic() - self._t0
        used = sum(proc_cpu_ticks(pid) - t0 for pid, t0 in self._start.items())
        return 100.0 * used / CLK_TCK / max(elapsed, 1e-9)


# ----------------------------------------------------------------------------------- pydmq


def write_toml(path: Path, tables: dict[str, dict[str, Any]]) -> Path:
    """A node.toml from ``{table: {key: value}}`` (str, int, bool, float, list of str)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return str(v)
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return "[" + ", ".join(value(x) for x in v) + "]"

    lines: list[str] = []
    for table, items in tables.items():
        lines.append(f"[{table}]")
        lines += [f"{k} = {value(v)}" for k, v in items.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def table_cells(rpc: Callable[[str], Any], table: str = "t") -> int | None:
    """Cells of htable ``table`` in a node's ``htable.stats`` (Kamailio's or pydmq's JSON-RPC
    method, same shape); None when the node does not answer."""
    with contextlib.suppress(Exception):
        for row in rpc("htable.stats"):
            if row.get("name") == table:
                return int(row.get("all", 0))
    return None


@dataclass
class PydmqProcess:
    """One pydmq node as ``python -m pydmq run -c node.toml`` (uvloop, the consumers the config
    enables, JSON-RPC over HTTP on a free loopback port), in its own process group.

    ``dmq`` and ``htable`` go to the TOML file as they are; ``port`` is the UDP port of its
    ``server_address`` (``sip:127.0.0.1:<port>``). Ready when its status file exists and
    ``core.version`` answers.
    """

    port: int = 0
    dmq: dict[str, Any] = field(default_factory=dict)
    htable: dict[str, Any] | None = None
    #: More TOML tables, e.g. ``{"tm": {"fr_timer": 2.0}}``.
    extra: dict[str, dict[str, Any]] = field(default_factory=dict)
    log_level: str = "WARNING"
    workdir: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    rpc_port: int = 0

    def __post_init__(self) -> None:
        if not self.port:
            self.port = free_port("udp")
        if not self.rpc_port:
            self.rpc_port = free_port("tcp")
        self._own = self.workdir is None
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="pydmq-bench-"))
            _temp_dirs.append(self.workdir)  # removed at exit: a node may be restarted
        else:
            self.workdir.mkdir(parents=True, exist_ok=True)

    @property
    def uri(self) -> str:
        return f"sip:127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def pids(self) -> list[int]:
        """The node's process and its UDP receiver processes (``[sip] udp_children``)."""
        if self.proc is None:
            return []
        pids = [self.proc.pid]
        with contextlib.suppress(OSError):
            text = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
            pids += [int(p) for p in text.split()]
        return pids

    @property
    def status_path(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "status.json"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def config(self) -> Path:
        assert self.workdir is not None
        tables: dict[str, dict[str, Any]] = {
            "dmq": {"server_address": self.uri, **self.dmq},
            "rpc": {"http_address": f"127.0.0.1:{self.rpc_port}"},
            "log": {"level": self.log_level},
        }
        if self.htable is not None:
            tables["htable"] = self.htable
        tables.update(self.extra)
        return write_toml(self.workdir / "node.toml", tables)

    def start(self, timeout: float = 15.0) -> PydmqProcess:
        """:meth:`launch` and wait until it is ready."""
        self.launch()
        try:
            wait_for(self._ready, timeout, f"pydmq on {self.port} to start")
        except BaseException:
            tail = self.log_tail()
            self.stop()
            if tail:
                print(tail, file=sys.stderr)
            raise
        return self

    def launch(self) -> PydmqProcess:
        """Start the process and return at once (see :meth:`start`)."""
        assert self.workdir is not None
        cfg = self.config()
        args = [sys.executable, "-m", "pydmq", "run", "-c", str(cfg)]
        args += ["--status-file", str(self.status_path)]
        self._log = open(self.workdir / "node.log", "ab")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,
        )
        _register(self)
        return self

    def _ready(self) -> bool:
        if not self.running:
            raise RuntimeError(f"pydmq on {self.port} exited:\n{self.log_tail()}")
        if not self.status_path.exists():
            return False
        try:
            self.rpc("core.version", timeout=0.5)
        except Exception:  # RpcClientError: the HTTP listener comes up just after the SIP one
            return False
        return True

    def rpc(self, method: str, *params: Any, timeout: float = 10.0) -> Any:
        from pydmq.rpc.client import call  # noqa: PLC0415

        return call(method, list(params), http=f"127.0.0.1:{self.rpc_port}", timeout=timeout)

    def status(self) -> dict[str, Any]:
        import json  # noqa: PLC0415

        try:
            data: dict[str, Any] = json.loads(self.status_path.read_text())
        except (OSError, ValueError):
            return {}
        return data

    def log_tail(self, lines: int = 30) -> str:
        assert self.workdir is not None
        try:
            text = (self.workdir / "node.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def signal(self, sig: signal.Signals) -> None:
        if self.running:
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM (graceful: the node announces status=disabled), SIGKILL after ``timeout``."""
        if self.proc is None:
            return
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        self._finish()

    def kill(self) -> None:
        """SIGKILL the process group: a crash, nothing is announced."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        self._finish()

    def _finish(self) -> None:
        with contextlib.suppress(Exception):
            self._log.close()
        _unregister(self)
        self.proc = None
        with contextlib.suppress(OSError):
            self.status_path.unlink()  # a restart must not look ready before it is

    def __enter__(self) -> PydmqProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _select(fds: Sequence[int], timeout: float) -> tuple[list[int], list[int], list[int]]:
    import select  # noqa: PLC0415

    return select.select(list(fds), [], [], timeout)


def start_kamailio(**kwargs: Any) -> KamailioNode:
    """A :class:`KamailioNode` (the test harness's), registered for :func:`stop_all`."""
    kwargs.setdefault("log_kdmq", False)
    node = KamailioNode(**kwargs)
    _register(node)
    try:
        node.start()
    except BaseException:
        _unregister(node)
        node.stop()
        raise
    return node


def stop_kamailio(node: KamailioNode) -> None:
    node.stop()
    _unregister(node)
    node.cleanup()


# ----------------------------------------------------------------------------------- SIP


def sip_request(method: str, ruri: str, local: tuple[str, int], body: bytes, ctype: str | None,
                seq: int, user: str = "sipp") -> bytes:  # fmt: skip
    """A request shaped like the ones sipp sends in ``compare.py``'s scenarios."""
    host, port = local
    lines = [
        f"{method} {ruri} SIP/2.0",
        f"Via: SIP/2.0/UDP {host}:{port};branch=z9hG4bK-probe-{os.getpid()}-{seq};rport",
        f"From: <sip:{user}@{host}:{port}>;tag=probe{seq}",
        f"To: <{ruri}>",
        f"Call-ID: probe-{seq}-{os.getpid()}@{host}",
        f"CSeq: {10 if method == 'KDMQ' else 1} {method}",
        f"Max-Forwards: {1 if method == 'KDMQ' else 70}",
    ]
    if ctype is not None:
        lines.append(f"Content-Type: {ctype}")
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) by the nearest-rank method; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q * len(ordered) + 0.5)))
    return ordered[rank - 1]


class LatencyProbe(threading.Thread):
    """Sends one request every ``interval`` seconds and times the reply (microseconds).

    Runs beside sipp's load, from its own socket, so the figures are the latency a request sees
    on the loaded server. sipp itself only reports whole milliseconds.
    """

    def __init__(self, server: tuple[str, int], build: Callable[[tuple[str, int], int], bytes],
                 interval: float = 0.01, timeout: float = 0.5) -> None:  # fmt: skip
        super().__init__(daemon=True)
        self.server = server
        self.build = build
        self.interval = interval
        self.timeout = timeout
        self.samples: list[float] = []
        self.lost = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("127.0.0.1", 0))
            local = sock.getsockname()
            seq = 0
            next_at = time.monotonic()
            while not self._stop_event.is_set():
                seq += 1
                data = self.build(local, seq)
                tag = f"probe-{seq}-".encode()
                t0 = time.perf_counter_ns()
                sock.sendto(data, self.server)
                if self._await(sock, tag, t0):
                    self.samples.append((time.perf_counter_ns() - t0) / 1000.0)
                else:
                    self.lost += 1
                next_at += self.interval
                delay = next_at - time.monotonic()
                if delay > 0:
                    self._stop_event.wait(delay)
                else:
                    next_at = time.monotonic()

    def _await(self, sock: socket.socket, tag: bytes, t0: int) -> bool:
        deadline = t0 + int(self.timeout * 1e9)
        while True:
            left = (deadline - time.perf_counter_ns()) / 1e9
            if left <= 0:
                return False
            sock.settimeout(left)
            try:
                reply = sock.recv(65535)
            except TimeoutError:
                return False
            if tag in reply and not reply.startswith(b"SIP/2.0 1"):
                return True

    def stop(self) -> None:
        self._stop_event.set()
        self.join(2)

    def summary(self) -> tuple[float, float]:
        """(p50, p99) in microseconds."""
        return percentile(self.samples, 0.5), percentile(self.samples, 0.99)


# ----------------------------------------------------------------------------------- machine


def _version(args: list[str], pattern: str) -> str:
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    m = re.search(pattern, out.stdout + out.stderr)
    return m.group(1) if m else "?"


def machine_info() -> dict[str, str]:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        import uvloop  # noqa: PLC0415

        uv = uvloop.__version__
    except ImportError:
        uv = "not installed"
    kam = shutil.which("kamailio") or shutil.which("kamailio", path="/usr/sbin:/sbin") or "kamailio"
    return {
        "cpus": str(os.cpu_count()),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "uvloop": uv,
        "kamailio": _version([kam, "-v"], r"version: kamailio (\S+)"),
        "sipp": _version(["sipp", "-v"], r"SIPp (v[\d.]+)"),
    }
