"""A real DNS server for tests: Debian's dnsmasq on 127.0.0.1, on a free port.

DNS code is tested against a server speaking the wire protocol over UDP (and TCP for truncated
answers), not a mocked resolver, so that record order, NXDOMAIN/NODATA, CNAME chains and
timeouts behave as they do in production. dnsmasq serves everything multi_notify needs from its
command line (SRV, A/AAAA, CNAME) and answers NXDOMAIN for unknown names under its local
domains, so no zone files and no second implementation are needed.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import dns.asyncresolver
import dns.exception
import dns.message
import dns.nameserver
import dns.query

from .net import free_port

__all__ = [
    "DNSMASQ",
    "DnsmasqServer",
    "SrvRecord",
    "dnsmasq_path",
    "resolver_for",
    "silent_udp_server",
]

#: Where Debian's dnsmasq-base installs the binary.
DNSMASQ = "/usr/sbin/dnsmasq"

_START_ATTEMPTS = 3  # a fresh port per attempt: free_port() does not reserve the port


@dataclass(frozen=True, slots=True)
class SrvRecord:
    """One SRV record ``name -> target:port`` (dnsmasq's ``--srv-host``)."""

    name: str
    target: str
    port: int
    priority: int = 0
    weight: int = 0


def dnsmasq_path() -> str | None:
    """The dnsmasq binary, or None when it is not installed.

    The tests then fail: scripts/test.sh installs it.
    """
    if Path(DNSMASQ).is_file():
        return DNSMASQ
    return shutil.which("dnsmasq")


def resolver_for(
    port: int, host: str = "127.0.0.1", *, lifetime: float = 2.0, timeout: float = 1.0
) -> dns.asyncresolver.Resolver:
    """An async resolver that asks only ``host:port``, ignoring ``/etc/resolv.conf``."""
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = [dns.nameserver.Do53Nameserver(host, port)]
    resolver.lifetime = lifetime
    resolver.timeout = timeout
    return resolver


class DnsmasqServer:
    """dnsmasq serving only the given records, in the foreground, until :meth:`stop`.

    ``hosts`` maps a name to its addresses (IPv4 and IPv6 mixed; one A/AAAA record each, in the
    given order). Names under ``local_domains`` that have no record get NXDOMAIN; any other name
    gets REFUSED (there is no upstream). Use as a context manager or call start()/stop().
    """

    def __init__(
        self,
        *,
        hosts: Mapping[str, Sequence[str]] | None = None,
        srv: Sequence[SrvRecord] = (),
        cnames: Mapping[str, str] | None = None,
        local_domains: Sequence[str] = ("test",),
        log_dir: Path | None = None,
        start_timeout: float = 10.0,
    ) -> None:
        self.host = "127.0.0.1"
        self.port = 0
        self._records = _record_args(hosts or {}, srv, cnames or {}, local_domains)
        self._probe_name = f"dnsmasq-ready-probe.{local_domains[0]}" if local_domains else "."
        self._log_dir = log_dir
        self._start_timeout = start_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.log_path: Path | None = None

    def __enter__(self) -> DnsmasqServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def resolver(
        self, *, lifetime: float = 2.0, timeout: float = 1.0
    ) -> dns.asyncresolver.Resolver:
        """An async resolver pointed at this server only."""
        return resolver_for(self.port, self.host, lifetime=lifetime, timeout=timeout)

    def log(self) -> str:
        """dnsmasq's own log (with every query), for failure messages."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def start(self) -> None:
        """Start dnsmasq and return once it answers a query (bounded by ``start_timeout``)."""
        binary = dnsmasq_path()
        if binary is None:
            raise FileNotFoundError(f"dnsmasq is not installed ({DNSMASQ})")
        if self._log_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="dnsmasq-")
            log_dir = Path(self._tmp.name)
        else:
            log_dir = self._log_dir
        failures: list[str] = []
        for attempt in range(_START_ATTEMPTS):
            self.port = free_port("both", self.host)  # dnsmasq binds UDP and TCP
            self.log_path = log_dir / f"dnsmasq-{self.port}.log"
            with self.log_path.open("wb") as log_file:
                self._proc = subprocess.Popen(
                    [binary, *self._base_args(), *self._records],
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                )
            if self._wait_ready(self._proc):
                return
            self._kill()
            failures.append(f"attempt {attempt + 1} (port {self.port}):\n{self.log()}")
        raise RuntimeError("dnsmasq did not start:\n" + "\n".join(failures))

    def stop(self) -> None:
        """Terminate dnsmasq (SIGTERM, then SIGKILL after 5 s) and remove temporary files."""
        self._kill()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def _base_args(self) -> list[str]:
        return [
            "--no-daemon",
            f"--port={self.port}",
            f"--listen-address={self.host}",
            "--bind-interfaces",
            "--no-resolv",
            "--no-hosts",
            "--conf-file=/dev/null",
            "--pid-file",  # no value: write no pid file
            "--log-facility=-",
            "--log-queries",
        ]

    def _wait_ready(self, proc: subprocess.Popen[bytes]) -> bool:
        """Poll with a real query until one is answered; False if dnsmasq exits or times out."""
        query = dns.message.make_query(self._probe_name, "A")
        deadline = time.monotonic() + self._start_timeout
        while time.monotonic() < deadline:
            try:
                dns.query.udp(query, self.host, port=self.port, timeout=0.2)
            except (dns.exception.DNSException, OSError):
                pass  # not listening yet (ICMP refused or no answer)
            else:
                return True
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.05)  # paces the loop and notices an early exit
            if proc.returncode is not None:
                return False
        return False

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@contextlib.contextmanager
def silent_udp_server(host: str = "127.0.0.1") -> Iterator[int]:
    """A bound UDP port that never answers: a hung DNS server. Yields the port."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        yield sock.getsockname()[1]


def _record_args(
    hosts: Mapping[str, Sequence[str]],
    srv: Sequence[SrvRecord],
    cnames: Mapping[str, str],
    local_domains: Sequence[str],
) -> list[str]:
    args = [f"--local=/{domain}/" for domain in local_domains]
    for name, addresses in hosts.items():
        # One address per option: dnsmasq then answers them in this order.
        args.extend(f"--host-record={name},{address}" for address in addresses)
    args.extend(f"--srv-host={r.name},{r.target},{r.port},{r.priority},{r.weight}" for r in srv)
    args.extend(f"--cname={alias},{target}" for alias, target in cnames.items())
    return args
