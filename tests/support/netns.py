"""A multi-host test bed made of Linux network namespaces, with fault injection.

::

    from tests.support.netns import TestNet

    with TestNet(["a", "b", "c"]) as net:       # root; fails (never skips) without ip netns
        net.addr("a")                            # "10.231.0.1": exists only inside the bed
        p = net.run_in("a", ["python", "-m", "pydmq", "run", ...], stdout=log)
        net.loss("a", 10)                        # 10 % of the packets a receives are dropped
        net.loss("a", 10, direction="both")      # ... and 10 % of those it sends
        net.partition(["a", "b"], ["c"])         # two-way: {a, b} | {c}
        net.partition(["a"], ["b"], one_way=True)  # a's packets to b are dropped, b -> a flows
        net.heal()                               # every partition gone (loss stays)
        net.clear()                              # no rule at all
        net.freeze(p); net.thaw(p)               # SIGSTOP / SIGCONT (the whole process group)
        net.socket("a")                          # a UDP socket created inside a's namespace

Layout. One "switch" namespace holds a Linux bridge; every host is a namespace with ``lo`` and
``eth0``, a veth pair whose other end is a port of the bridge. Hosts get consecutive addresses
of a private subnet (``10.231.0.0/24`` by default) that is configured only inside the host
namespaces: nothing is added to the root namespace (no address, no route, no interface), the
switch has no IP at all and no host has a default route, so test traffic cannot leave the bed.

Faults are nftables rules in the *receiving* host's namespace (table ``inet pydmq_testnet``,
hook input; loopback is never touched):

* ``loss(h, pct, direction="in")``: ``numgen random mod 100 < pct drop`` in ``h``'s input, i.e.
  ``pct`` % on every link into ``h``; applied to every host that is ``pct`` % on every link.
* ``direction="out"``: the same rule, limited to ``ip saddr <h>``, in every *other* host's input.
  Dropping in ``h``'s own output hook would make ``sendto`` fail with EPERM, which no real
  network does; dropped on arrival, the packet just vanishes, as on a lossy wire.
* ``partition``/``block``: ``ip saddr { ... } drop`` in the input of the hosts cut off from those
  sources. One-way partitions are just blocks in one direction.

Every change rewrites a host's whole table in one ``nft -f`` transaction, so a rule set is never
seen half-applied.

Processes. :meth:`run_in` starts ``ip netns exec <ns> argv...`` (``ip`` execs the command, so the
:class:`subprocess.Popen` pid is the program itself) in its own session/process group.
Teardown (leaving the ``with`` block, also when the test failed) SIGCONTs and SIGKILLs every
process group started here, then every process still found inside a bed namespace (``ip netns
pids``: e.g. Kamailio's forked children), and deletes the namespaces, which deletes the veths and
the bridge with them.

Names. Namespaces are ``<prefix><pid>x<random>-<host>`` (``pydmqtn`` by default), unique per bed.
Entering a bed first deletes leftovers of a crashed earlier run: namespaces with the prefix whose
owner pid is no longer running (a live owner, e.g. a parallel pytest worker, keeps its own).

Needs root, ``ip`` (iproute2) and ``nft`` (nftables). Without them the constructor raises
:class:`TestNetError`: tests that need the bed fail instead of silently skipping.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Literal

__all__ = [
    "DEFAULT_PREFIX",
    "DEFAULT_SUBNET",
    "TestNet",
    "TestNetError",
    "cleanup_leftovers",
    "netns_socket",
]

DEFAULT_PREFIX = "pydmqtn"
DEFAULT_SUBNET = "10.231.0.0/24"
NETNS_DIR = Path("/var/run/netns")
TABLE = "pydmq_testnet"
CLONE_NEWNET = 0x40000000
_HOST_RE = re.compile(r"^[a-z][a-z0-9]{0,9}$")

Direction = Literal["in", "out", "both"]


class TestNetError(RuntimeError):
    """The bed cannot be built or a command inside it failed."""

    __test__ = False  # not a pytest test class, despite the name


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")
    if path is None:
        raise TestNetError(f"{name!r} not found: install iproute2 and nftables")
    return path


def _run(argv: Sequence[str], *, stdin: str | None = None, check: bool = True) -> str:
    proc = subprocess.run(
        list(argv), input=stdin, capture_output=True, text=True, timeout=30, check=False
    )
    if check and proc.returncode != 0:
        shown = f"\n--- input:\n{stdin}" if stdin else ""
        raise TestNetError(
            f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}{shown}"
        )
    return proc.stdout


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _list_namespaces() -> list[str]:
    out = _run([_tool("ip"), "netns", "list"], check=False)
    # "name" or "name (id: 3)"
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _kill_pids_in(ns: str) -> None:
    """SIGCONT + SIGKILL every process inside namespace ``ns``; waits (bounded) until none is."""
    ip = _tool("ip")
    deadline = time.monotonic() + 5
    while True:
        pids = [int(p) for p in _run([ip, "netns", "pids", ns], check=False).split() if p]
        pids = [p for p in pids if p != os.getpid()]
        if not pids or time.monotonic() >= deadline:
            return
        for pid in pids:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
        time.sleep(0.05)


def _delete_namespace(ns: str) -> None:
    _kill_pids_in(ns)
    _run([_tool("ip"), "netns", "delete", ns], check=False)


def cleanup_leftovers(prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Delete namespaces named ``<prefix><pid>x...`` whose owner ``pid`` is not running.

    Returns the names deleted. Namespaces of a live owner (another test process) are kept.
    """
    rx = re.compile(rf"^{re.escape(prefix)}(\d+)x[0-9a-f]+-")
    deleted: list[str] = []
    for ns in _list_namespaces():
        m = rx.match(ns)
        if m is None:
            continue
        owner = int(m.group(1))
        if owner == os.getpid() or _pid_alive(owner):
            continue
        _delete_namespace(ns)
        deleted.append(ns)
    return deleted


def netns_socket(
    ns: str, family: int = socket.AF_INET, kind: int = socket.SOCK_DGRAM
) -> socket.socket:
    """A socket created inside network namespace ``ns`` (it stays there for its lifetime).

    ``setns`` moves only the calling thread, so a short-lived helper thread enters the
    namespace, creates the socket and ends; the rest of the process stays where it was.
    """
    result: dict[str, Any] = {}

    def enter_and_create() -> None:
        try:
            fd = os.open(NETNS_DIR / ns, os.O_RDONLY)
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({ns}): {os.strerror(err)}")
            finally:
                os.close(fd)
            result["sock"] = socket.socket(family, kind)
        except BaseException as exc:
            result["error"] = exc

    thread = threading.Thread(target=enter_and_create, name=f"netns-{ns}")
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    sock: socket.socket = result["sock"]
    return sock


class TestNet:
    """A bridge and one namespace per host; faults; processes; guaranteed teardown."""

    __test__ = False  # not a pytest test class, despite the name

    def __init__(
        self,
        hosts: Sequence[str],
        *,
        subnet: str = DEFAULT_SUBNET,
        prefix: str = DEFAULT_PREFIX,
    ) -> None:
        if os.geteuid() != 0:
            raise TestNetError("the network-namespace test bed needs root (ip netns, nft)")
        self._ip = _tool("ip")
        self._nft = _tool("nft")
        names = list(hosts)
        if not names or len(set(names)) != len(names):
            raise ValueError(f"hosts must be distinct and not empty: {names!r}")
        for name in names:
            if not _HOST_RE.match(name):
                raise ValueError(f"host name {name!r}: 1-10 of [a-z0-9], starting with a letter")
        net = ipaddress.ip_network(subnet)
        if not isinstance(net, ipaddress.IPv4Network) or not net.is_private:
            raise ValueError(f"subnet {subnet!r} must be a private IPv4 network")
        hosts_iter = net.hosts()
        addresses = [str(next(hosts_iter)) for _ in names]
        self.hosts: tuple[str, ...] = tuple(names)
        self.subnet = net
        self.prefix = prefix
        self.run_id = f"{prefix}{os.getpid()}x{secrets.token_hex(3)}"
        self._addr = dict(zip(names, addresses, strict=True))
        self._procs: list[subprocess.Popen[bytes]] = []
        self._created: list[str] = []
        self._loss_in: dict[str, int] = {}
        self._loss_out: dict[str, int] = {}
        self._blocked: set[tuple[str, str]] = set()  # (src, dst): src's packets to dst dropped
        self._up = False

    # ------------------------------------------------------------------ names and addresses

    @property
    def switch(self) -> str:
        """The namespace holding the bridge."""
        return f"{self.run_id}-sw"

    def ns(self, host: str) -> str:
        """The namespace of ``host``."""
        self._check(host)
        return f"{self.run_id}-{host}"

    def addr(self, host: str) -> str:
        """``host``'s IPv4 address (only reachable from inside the bed)."""
        self._check(host)
        return self._addr[host]

    def namespaces(self) -> list[str]:
        """Every namespace of this bed (switch first)."""
        return [self.switch, *(self.ns(h) for h in self.hosts)]

    def _check(self, host: str) -> None:
        if host not in self._addr:
            raise KeyError(f"unknown host {host!r}; the bed has {', '.join(self.hosts)}")

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> TestNet:
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def up(self) -> None:
        """Create the bed (deleting leftovers of dead runs with the same prefix first)."""
        if self._up:
            return
        cleanup_leftovers(self.prefix)
        self._up = True
        try:
            self._build()
        except BaseException:
            self.down()
            raise

    def _build(self) -> None:
        ip = self._ip
        sw = self.switch
        self._add_namespace(sw)
        _run([ip, "-n", sw, "link", "set", "lo", "up"])
        _run([ip, "-n", sw, "link", "add", "br0", "type", "bridge"])
        _run([ip, "-n", sw, "link", "set", "br0", "up"])
        plen = self.subnet.prefixlen
        for i, host in enumerate(self.hosts):
            ns = self.ns(host)
            port = f"p{i}-{host}"[:15]
            self._add_namespace(ns)
            # Both ends are created inside the bed's namespaces: no interface ever appears in
            # the root namespace, not even for a moment.
            _run([ip, "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", port,
                  "netns", sw])  # fmt: skip
            _run([ip, "-n", sw, "link", "set", port, "master", "br0"])
            _run([ip, "-n", sw, "link", "set", port, "up"])
            _run([ip, "-n", ns, "addr", "add", f"{self._addr[host]}/{plen}", "dev", "eth0"])
            _run([ip, "-n", ns, "link", "set", "lo", "up"])
            _run([ip, "-n", ns, "link", "set", "eth0", "up"])
            self._apply(host)
        self._wait_links()

    def _add_namespace(self, ns: str) -> None:
        _run([self._ip, "netns", "add", ns])
        self._created.append(ns)

    def _wait_links(self, timeout: float = 5.0) -> None:
        """Wait until every host's eth0 is up and its address usable (no tentative state)."""
        deadline = time.monotonic() + timeout
        for host in self.hosts:
            while True:
                ns = self.ns(host)
                out = _run([self._ip, "-n", ns, "-o", "-4", "addr", "show", "dev", "eth0"])
                state = _run([self._ip, "-n", ns, "-o", "link", "show", "dev", "eth0"])
                if self._addr[host] in out and "tentative" not in out and "state UP" in state:
                    break
                if time.monotonic() >= deadline:
                    raise TestNetError(f"{host}: eth0 not up after {timeout}s:\n{state}\n{out}")
                time.sleep(0.02)

    def down(self) -> None:
        """Kill every process started here and everything inside the namespaces, delete them.

        Never raises for what is already gone; safe to call twice.
        """
        for proc in self._procs:
            self._kill_group(proc)
        self._procs.clear()
        for ns in reversed(self._created):
            _delete_namespace(ns)
        self._created.clear()
        self._up = False

    # ------------------------------------------------------------------ processes

    def command(self, host: str, argv: Sequence[str]) -> list[str]:
        """``argv`` wrapped to run inside ``host``'s namespace."""
        return [self._ip, "netns", "exec", self.ns(host), *argv]

    def run_in(
        self,
        host: str,
        argv: Sequence[str],
        *,
        stdout: IO[Any] | int | None = subprocess.DEVNULL,
        stderr: IO[Any] | int | None = subprocess.STDOUT,
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside ``host``'s namespace, in a new session; killed at teardown."""
        if not self._up:
            raise TestNetError("the bed is not up")
        proc = subprocess.Popen(
            self.command(host, argv),
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
            close_fds=True,
        )
        self._procs.append(proc)
        return proc

    def adopt(self, proc: subprocess.Popen[bytes]) -> None:
        """Kill this process (and its group) at teardown too."""
        self._procs.append(proc)

    def exec(self, host: str, argv: Sequence[str], *, check: bool = True) -> str:
        """Run a short command inside ``host``'s namespace; its stdout."""
        return _run(self.command(host, argv), check=check)

    @staticmethod
    def signal(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
        """Send ``sig`` to ``proc``'s whole process group (it leads one: see :meth:`run_in`)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL (a crash: nothing of the program's shutdown runs); reaps it."""
        self._kill_group(proc)

    def freeze(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGSTOP: the program keeps its sockets but runs no code until :meth:`thaw`."""
        self.signal(proc, signal.SIGSTOP)

    def thaw(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGCONT after :meth:`freeze`."""
        self.signal(proc, signal.SIGCONT)

    def _kill_group(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.returncode is None:
            self.signal(proc, signal.SIGCONT)
            self.signal(proc, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)

    def socket(
        self, host: str, family: int = socket.AF_INET, kind: int = socket.SOCK_DGRAM
    ) -> socket.socket:
        """A socket created inside ``host``'s namespace (close it yourself)."""
        return netns_socket(self.ns(host), family, kind)

    # ------------------------------------------------------------------ faults

    def loss(self, host: str, percent: int, direction: Direction = "in") -> None:
        """Drop ``percent`` % of ``host``'s packets at random (0 removes the loss).

        ``in``: packets arriving at ``host``; ``out``: packets ``host`` sends (dropped on arrival
        at the other hosts); ``both``.
        """
        self._check(host)
        if not 0 <= percent <= 100:
            raise ValueError(f"percent must be 0..100, not {percent}")
        touched = {host}
        if direction in ("in", "both"):
            self._loss_in[host] = percent
        if direction in ("out", "both"):
            self._loss_out[host] = percent
            touched.update(self.hosts)
        self._apply(*touched)

    def loss_everywhere(self, percent: int) -> None:
        """``percent`` % on every link (each packet crosses exactly one lossy input)."""
        for host in self.hosts:
            self._loss_in[host] = percent
        self._apply(*self.hosts)

    def block(self, sources: Iterable[str], destinations: Iterable[str]) -> None:
        """Drop every packet from any of ``sources`` to any of ``destinations`` (one way)."""
        src, dst = list(sources), list(destinations)
        for host in (*src, *dst):
            self._check(host)
        self._blocked.update((s, d) for s in src for d in dst if s != d)
        self._apply(*dst)

    def partition(self, *groups: Iterable[str], one_way: bool = False) -> None:
        """Cut the groups off from each other; hosts not named keep every link.

        Two-way by default. ``one_way=True`` only blocks traffic from each group to the groups
        *after* it: ``partition(["a"], ["b", "c"], one_way=True)`` drops a -> b and a -> c while
        b and c still reach a.
        """
        lists = [list(g) for g in groups]
        if len(lists) < 2:
            raise ValueError("a partition needs at least two groups")
        seen: set[str] = set()
        for group in lists:
            for host in group:
                self._check(host)
                if host in seen:
                    raise ValueError(f"{host} is in two groups")
                seen.add(host)
        for i, group in enumerate(lists):
            for j, other in enumerate(lists):
                if j > i or (j < i and not one_way):
                    self.block(group, other)

    def heal(self) -> None:
        """Remove every partition/block (loss settings stay)."""
        self._blocked.clear()
        self._apply(*self.hosts)

    def clear(self) -> None:
        """Remove every fault."""
        self._blocked.clear()
        self._loss_in.clear()
        self._loss_out.clear()
        self._apply(*self.hosts)

    def blocked(self) -> set[tuple[str, str]]:
        """The (source, destination) pairs currently dropped."""
        return set(self._blocked)

    def ruleset(self, host: str) -> str:
        """``nft list ruleset`` inside ``host`` (for failure messages)."""
        return self.exec(host, [self._nft, "list", "ruleset"], check=False)

    def render_rules(self, host: str) -> str:
        """The nft script that gives ``host`` its current rules (public for debugging)."""
        rules = ['iif "lo" accept']
        sources = sorted(self.addr(s) for s, d in self._blocked if d == host)
        if sources:
            rules.append(f"ip saddr {{ {', '.join(sources)} }} drop")
        for other in self.hosts:
            pct = self._loss_out.get(other, 0)
            if other != host and pct > 0:
                rules.append(f"ip saddr {self.addr(other)} numgen random mod 100 < {pct} drop")
        pct_in = self._loss_in.get(host, 0)
        if pct_in > 0:
            rules.append(f"numgen random mod 100 < {pct_in} drop")
        body = "\n".join(f"\t\t{r}" for r in rules)
        # Create-then-delete makes the delete valid on the first run; the new table follows in
        # the same transaction, so the change is atomic.
        return (
            f"table inet {TABLE} {{}}\n"
            f"delete table inet {TABLE}\n"
            f"table inet {TABLE} {{\n"
            "\tchain input {\n"
            "\t\ttype filter hook input priority -10; policy accept;\n"
            f"{body}\n"
            "\t}\n"
            "}\n"
        )

    def _apply(self, *hosts: str) -> None:
        for host in dict.fromkeys(hosts):
            _run(self.command(host, [self._nft, "-f", "-"]), stdin=self.render_rules(host))

    def describe(self) -> str:
        """Addresses and active faults, one line each (for failure messages)."""
        lines = [f"{h}={self.addr(h)} ns={self.ns(h)}" for h in self.hosts]
        if self._loss_in or self._loss_out:
            lines.append(f"loss in={self._loss_in} out={self._loss_out}")
        if self._blocked:
            lines.append("blocked " + ", ".join(f"{s}->{d}" for s, d in sorted(self._blocked)))
        return "\n".join(lines)
