"""Run a real Kamailio 5.6 (Debian package) as a DMQ peer in tests.

Typical use::

    from tests.support.kamailio import KamailioNode

    with KamailioNode(tmp_path / "k1", custom_channels=["lab"], htable=True) as k1:
        k1.uri                      # "sip:127.0.0.1:<port>", its DMQ server_address
        k1.rpc("dmq.list_nodes")    # the whole JSON-RPC answer as a dict
        k1.list_nodes()             # just the "result" list
        k1.custom_messages("lab")   # KDMQ requests the script answered itself on channel "lab"

The node owns its process group: ``stop()`` / ``kill()`` / leaving the ``with`` block ends
Kamailio's main process and every child it forked. Nodes still running when the interpreter exits
are killed by an ``atexit`` hook.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import errno
import itertools
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .net import SipReply, build_request, free_port, tcp_request, udp_request, wait_until

if TYPE_CHECKING:
    import trustme

__all__ = [
    "KAMAILIO_BIN",
    "KamailioError",
    "KamailioNode",
    "KamailioRpcError",
    "ReceivedMessage",
    "TlsConfig",
    "free_port",
    "make_tls_files",
]

KAMAILIO_BIN = os.environ.get("PYDMQ_KAMAILIO_BIN", "kamailio")

DmqTransport = Literal["udp", "tcp", "tls"]
RpcTransport = Literal["dgram", "fifo"]

# Channel names go into the script as string literals; keep them to a safe, SIP-user-ish set.
_CHANNEL_RE = re.compile(r"^[A-Za-z0-9_.!~*'()%&=+$,;?/-]+$")
_MARKER_RE = re.compile(r"PYDMQ-MSG (.*?) PYDMQ-END")

_ids = itertools.count(1)
_live_nodes: set[KamailioNode] = set()
_live_lock = threading.Lock()


class KamailioError(RuntimeError):
    """Kamailio failed to start, died, or did not answer."""


class KamailioRpcError(KamailioError):
    """A JSON-RPC call returned an ``error`` member."""

    def __init__(self, method: str, error: Any) -> None:
        super().__init__(f"RPC {method} failed: {error!r}")
        self.method = method
        self.error = error


@dataclass(frozen=True)
class TlsConfig:
    """Certificate files for Kamailio's tls module (PEM paths).

    ``certificate``/``private_key`` are used both as server certificate and as client
    certificate (when Kamailio connects out, e.g. DMQ over TLS to a peer that requires one).
    """

    certificate: Path
    private_key: Path
    ca_list: Path
    verify_client: bool = False  # server side: verify_certificate + require_certificate
    verify_server: bool = True  # client side: verify the peer's certificate against ca_list
    method: str = "TLSv1.2+"


def make_tls_files(
    directory: Path, hosts: Sequence[str] = ("127.0.0.1", "localhost"), ca: trustme.CA | None = None
) -> tuple[TlsConfig, trustme.CA]:
    """Create a CA (or use ``ca``) and a leaf certificate for ``hosts`` with trustme.

    Returns the Kamailio :class:`TlsConfig` and the CA, so the other side of the test (pydmq)
    can trust the CA (``ca.configure_trust(ctx)``) or get its own leaf with ``ca.issue_cert``.
    """
    import trustme  # noqa: PLC0415 (only the TLS tests need it)

    directory.mkdir(parents=True, exist_ok=True)
    ca = ca or trustme.CA()
    leaf = ca.issue_cert(*hosts)
    cert = directory / "kamailio-cert.pem"
    key = directory / "kamailio-key.pem"
    ca_file = directory / "ca.pem"
    leaf.private_key_pem.write_to_path(str(key))
    # Kamailio loads the whole chain from the certificate file.
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    ca.cert_pem.write_to_path(str(ca_file))
    return TlsConfig(certificate=cert, private_key=key, ca_list=ca_file), ca


@dataclass(frozen=True)
class ReceivedMessage:
    """A KDMQ request as the Kamailio script logged it (see ``KamailioNode.received``).

    ``kind`` is "custom" (a custom channel the script answered itself), "kdmq" (every KDMQ
    before dispatch, when ``log_kdmq`` is on) or "request" (a request of one of the
    ``record_methods``, on arrival). ``channel`` is the R-URI user part. Absent values are None.
    """

    kind: str
    channel: str
    src: str  # "ip:port"
    proto: str  # "udp", "tcp", "tls"
    max_forwards: str | None
    content_type: str | None
    call_id: str | None
    from_uri: str | None
    body: bytes
    method: str | None = None


def _b64(value: str) -> str | None:
    if value in ("<null>", ""):
        return None if value == "<null>" else ""
    return base64.b64decode(value).decode("utf-8", "replace")


def _parse_marker(fields: str) -> ReceivedMessage:
    kv = dict(item.split("=", 1) for item in fields.split(" ") if "=" in item)
    body = kv.get("body", "")
    return ReceivedMessage(
        kind=kv.get("kind", ""),
        channel=_b64(kv.get("channel", "")) or "",
        src=kv.get("src", ""),
        proto=kv.get("proto", ""),
        max_forwards=_b64(kv.get("mf", "<null>")),
        content_type=_b64(kv.get("ct", "<null>")),
        call_id=_b64(kv.get("callid", "<null>")),
        from_uri=_b64(kv.get("from", "<null>")),
        body=b"" if body in ("", "<null>") else base64.b64decode(body),
        method=kv.get("method"),
    )


def _check_text(what: str, value: str) -> str:
    if any(c in value for c in '"\r\n\0'):
        raise ValueError(f"{what} must not contain quotes or line breaks: {value!r}")
    return value


def _marker(kind: str) -> str:
    # Every variable part is base64 so the log line stays one line and splits on spaces.
    return (
        f"PYDMQ-MSG kind={kind} channel=$(rU{{s.encode.base64}}) src=$si:$sp proto=$pr"
        " mf=$(hdr(Max-Forwards){s.encode.base64}) ct=$(cT{s.encode.base64})"
        " callid=$(ci{s.encode.base64}) from=$(fu{s.encode.base64})"
        " body=$(rb{s.encode.base64}) method=$rm PYDMQ-END\\n"
    )


class KamailioNode:
    """One Kamailio process tree with a generated kamailio.cfg.

    Listens on ``host:port`` for UDP and TCP (and ``host:tls_port`` for TLS when ``tls`` is
    given). Its DMQ ``server_address`` is :attr:`uri`; ``dmq_transport`` picks which of the
    listeners that is. All files live in ``workdir`` (kamailio.cfg, tls.cfg, kamailio.log,
    kamailio.pid); unix sockets live in a short private directory under /tmp (``sun_path`` is
    limited to 108 bytes, pytest's tmp_path is often longer).

    Parameters:
        notification_addresses: DMQ ``notification_address`` values (repeated modparam).
        ping_interval: DMQ ``ping_interval`` in seconds (Kamailio enforces a minimum of 5).
        htable: load htable with table ``t`` (``htable_def``) replicated over DMQ
            (``enable_dmq=1``); ``dmq_init_sync`` toggles the join-time sync.
        usrloc: load usrloc + registrar + dmq_usrloc (``enable=1``); REGISTER -> save().
        custom_channels: KDMQ channels (R-URI user) the script answers itself, before DMQ sees
            them, logging the request (read it back with :meth:`custom_messages`). A sequence
            of names answers 200 OK; a mapping name -> code answers that code.
        log_kdmq: log every incoming KDMQ before dispatch (read with :meth:`received`).
        record_methods: SIP methods (e.g. "REGISTER") logged on arrival, first thing in
            request_route, and answered ``200 OK`` unless ``extra_route`` (or usrloc for
            REGISTER) answers them; read them back with :meth:`requests`.
        dmq_function: "dmq_handle_message" (queued to DMQ workers) or "dmq_process_message".
        extra_global / extra_modules / extra_route: raw cfg text added to the global section,
            after the module section, and at the top of request_route.
        debug: Kamailio ``debug`` level (2 = info; 3 = debug, very verbose).
        tcp_rd_buf_size: core ``tcp_rd_buf_size``. Kamailio's default (16384) drops any SIP
            message bigger than about 16 KB received over TCP/TLS ("buffer overrun") and closes
            the connection; 65536 lifts that. None keeps the default, like production.
        netns: run Kamailio inside this network namespace (``ip netns exec``; see
            :mod:`tests.support.netns`). ``host`` must be an address of that namespace; the
            ports default to 5060/5061 (nothing else listens there), and :meth:`options` /
            UDP :meth:`send_kdmq` send from inside it. RPC works as usual (unix sockets).
    """

    def __init__(
        self,
        workdir: Path | str | None = None,
        *,
        name: str = "kamailio",
        host: str = "127.0.0.1",
        port: int | None = None,
        tls: TlsConfig | None = None,
        tls_port: int | None = None,
        dmq_transport: DmqTransport = "udp",
        server_address: str | None = None,
        notification_addresses: Iterable[str] = (),
        ping_interval: int = 5,
        num_workers: int = 2,
        multi_notify: bool = False,
        htable: bool = False,
        htable_def: str = "t=>size=8;autoexpire=0;dmqreplicate=1;",
        dmq_init_sync: bool = True,
        usrloc: bool = False,
        custom_channels: Iterable[str] | Mapping[str, int] = (),
        log_kdmq: bool = True,
        record_methods: Iterable[str] = (),
        dmq_function: str = "dmq_handle_message",
        extra_global: str = "",
        extra_modules: str = "",
        extra_route: str = "",
        debug: int = 2,
        children: int = 2,
        shm_mb: int = 64,
        tcp_rd_buf_size: int | None = None,
        start_timeout: float = 20.0,
        netns: str | None = None,
    ) -> None:
        if workdir is None:
            self._own_workdir = True
            self.workdir = Path(tempfile.mkdtemp(prefix=f"pydmq-{name}-"))
        else:
            self._own_workdir = False
            self.workdir = Path(workdir)
        self.name = name
        self.host = host
        self.netns = netns
        if port is None:
            port = 5060 if netns is not None else free_port("both", host)
        self.port = port
        self.tls = tls
        self.tls_port: int | None = None
        if tls is not None:
            if tls_port is None:
                tls_port = 5061 if netns is not None else free_port("tcp", host)
            self.tls_port = tls_port
        if dmq_transport == "tls" and tls is None:
            raise ValueError("dmq_transport='tls' needs tls=TlsConfig(...)")
        self.dmq_transport: DmqTransport = dmq_transport
        self._server_address = server_address
        self.notification_addresses = [
            _check_text("notification address", a) for a in notification_addresses
        ]
        if ping_interval < 5:
            raise ValueError("Kamailio's DMQ ping_interval minimum is 5 seconds")
        self.ping_interval = ping_interval
        self.num_workers = num_workers
        self.multi_notify = multi_notify
        self.htable = htable
        self.htable_def = _check_text("htable_def", htable_def)
        self.dmq_init_sync = dmq_init_sync
        self.usrloc = usrloc
        if isinstance(custom_channels, Mapping):
            channels = {str(k): int(v) for k, v in custom_channels.items()}
        else:
            channels = dict.fromkeys(custom_channels, 200)
        for ch, code in channels.items():
            if not _CHANNEL_RE.match(ch):
                raise ValueError(f"unsupported custom channel name {ch!r}")
            if not 100 <= code <= 699:
                raise ValueError(f"bad reply code {code} for channel {ch!r}")
        self.custom_channels: dict[str, int] = channels
        self.log_kdmq = log_kdmq
        self.record_methods = list(record_methods)
        for method in self.record_methods:
            if not re.fullmatch(r"[A-Za-z]+", method) or method in ("KDMQ", "OPTIONS"):
                raise ValueError(f"cannot record method {method!r}")
        if dmq_function not in ("dmq_handle_message", "dmq_process_message"):
            raise ValueError(f"unknown dmq_function {dmq_function!r}")
        self.dmq_function = dmq_function
        self.extra_global = extra_global
        self.extra_modules = extra_modules
        self.extra_route = extra_route
        self.debug = debug
        self.children = children
        self.shm_mb = shm_mb
        self.tcp_rd_buf_size = tcp_rd_buf_size
        self.start_timeout = start_timeout

        self.cfg_path = self.workdir / "kamailio.cfg"
        self.tls_cfg_path = self.workdir / "tls.cfg"
        self.log_path = self.workdir / "kamailio.log"
        self.pid_path = self.workdir / "kamailio.pid"
        self.rundir: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None
        self._rpc_seq = itertools.count(1)

    # ------------------------------------------------------------------ addresses

    @property
    def sip_port(self) -> int:
        """Port of the DMQ listener (``tls_port`` for dmq_transport 'tls', else ``port``)."""
        if self.dmq_transport == "tls":
            assert self.tls_port is not None
            return self.tls_port
        return self.port

    @property
    def uri(self) -> str:
        """The node's DMQ ``server_address``, e.g. ``sip:127.0.0.1:25060``.

        Hand it to peers as their ``notification_address``.
        """
        if self._server_address is not None:
            return self._server_address
        suffix = "" if self.dmq_transport == "udp" else f";transport={self.dmq_transport}"
        return f"sip:{self.host}:{self.sip_port}{suffix}"

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) of the UDP/TCP listener."""
        return (self.host, self.port)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<KamailioNode {self.name} {self.uri} {state}>"

    # ------------------------------------------------------------------ configuration

    def render_cfg(self, rundir: Path) -> str:
        """The kamailio.cfg text (public so a failing test can print it)."""
        g: list[str] = [
            "#!KAMAILIO",
            f"# generated by tests/support/kamailio.py for node {self.name}",
            f"debug={self.debug}",
            "log_stderror=yes",
            "memdbg=5",
            "memlog=5",
            f"children={self.children}",
            f"tcp_children={self.children}",
            "auto_aliases=no",
            "dns=no",
            "rev_dns=no",
            "dns_try_ipv6=no",
            "disable_core_dump=yes",
            "exit_timeout=5",
            f"listen=udp:{self.host}:{self.port}",
            f"listen=tcp:{self.host}:{self.port}",
        ]
        if self.tls is not None:
            g += ["enable_tls=yes", f"listen=tls:{self.host}:{self.tls_port}"]
        if self.tcp_rd_buf_size is not None:
            g.append(f"tcp_rd_buf_size={self.tcp_rd_buf_size}")
        if self.extra_global:
            g.append(self.extra_global)

        m: list[str] = []
        if self.tls is not None:
            # tls first: it must set up OpenSSL before other modules allocate anything
            m.append('loadmodule "tls.so"')
        m += [
            'loadmodule "jsonrpcs.so"',
            'loadmodule "tm.so"',
            'loadmodule "sl.so"',
            'loadmodule "tmx.so"',
            'loadmodule "pv.so"',
            'loadmodule "maxfwd.so"',
            'loadmodule "textops.so"',
            'loadmodule "siputils.so"',
            'loadmodule "xlog.so"',
        ]
        if self.usrloc:
            m += ['loadmodule "usrloc.so"', 'loadmodule "registrar.so"']
        m.append('loadmodule "dmq.so"')
        if self.usrloc:
            m.append('loadmodule "dmq_usrloc.so"')
        if self.htable:
            m.append('loadmodule "htable.so"')
        if self.tls is not None:
            m.append(f'modparam("tls", "config", "{self.tls_cfg_path}")')
        m += [
            # fifo (no size limit) + datagram (concurrent) transports
            'modparam("jsonrpcs", "transport", 6)',
            'modparam("jsonrpcs", "pretty_format", 0)',
            f'modparam("jsonrpcs", "dgram_socket", "{rundir}/rpc.sock")',
            f'modparam("jsonrpcs", "fifo_name", "{rundir}/rpc.fifo")',
            f'modparam("jsonrpcs", "fifo_reply_dir", "{rundir}/")',
            # room for a whole 64 KB SIP body, base64-encoded, in one log line (default 4 KB)
            'modparam("xlog", "buf_size", 262144)',
            f'modparam("dmq", "server_address", "{_check_text("server_address", self.uri)}")',
        ]
        m += [
            f'modparam("dmq", "notification_address", "{addr}")'
            for addr in self.notification_addresses
        ]
        m += [
            f'modparam("dmq", "ping_interval", {self.ping_interval})',
            f'modparam("dmq", "num_workers", {self.num_workers})',
            f'modparam("dmq", "multi_notify", {int(self.multi_notify)})',
        ]
        if self.usrloc:
            m.append('modparam("dmq_usrloc", "enable", 1)')
        if self.htable:
            m += [
                'modparam("htable", "enable_dmq", 1)',
                f'modparam("htable", "dmq_init_sync", {int(self.dmq_init_sync)})',
                f'modparam("htable", "htable", "{self.htable_def}")',
            ]
        if self.extra_modules:
            m.append(self.extra_modules)

        r: list[str] = ["request_route {"]
        recorded = "|".join(self.record_methods)
        if recorded:
            r += [
                f'\tif (is_method("{recorded}")) {{',
                f'\t\txlog("L_NOTICE", "{_marker("request")}");',
                "\t}",
            ]
        if self.extra_route:
            r.append(self.extra_route)
        r.append('\tif (is_method("KDMQ")) {')
        if self.log_kdmq:
            r.append(f'\t\txlog("L_NOTICE", "{_marker("kdmq")}");')
        for ch, code in self.custom_channels.items():
            reason = "OK" if code == 200 else "Custom Reply"
            r += [
                f'\t\tif ($rU == "{ch}") {{',
                f'\t\t\txlog("L_NOTICE", "{_marker("custom")}");',
                f'\t\t\tsl_send_reply("{code}", "{reason}");',
                "\t\t\texit;",
                "\t\t}",
            ]
        r += [
            f"\t\t{self.dmq_function}();",
            "\t\texit;",
            "\t}",
            '\tif (is_method("OPTIONS")) {',
            '\t\tsl_send_reply("200", "OK");',
            "\t\texit;",
            "\t}",
        ]
        if self.usrloc:
            r += [
                '\tif (is_method("REGISTER")) {',
                '\t\tif (!save("location")) { sl_reply_error(); }',
                "\t\texit;",
                "\t}",
            ]
        if recorded:
            r += [
                f'\tif (is_method("{recorded}")) {{',
                '\t\tsl_send_reply("200", "OK");',
                "\t\texit;",
                "\t}",
            ]
        r += ['\tsl_send_reply("404", "Not Here");', "\texit;", "}"]
        return "\n".join(g) + "\n\n" + "\n".join(m) + "\n\n" + "\n".join(r) + "\n"

    def render_tls_cfg(self) -> str:
        assert self.tls is not None
        t = self.tls

        def yn(flag: bool) -> str:
            return "yes" if flag else "no"

        files = (
            f"private_key = {t.private_key}\ncertificate = {t.certificate}\nca_list = {t.ca_list}\n"
        )
        return (
            "[server:default]\n"
            f"method = {t.method}\n"
            f"verify_certificate = {yn(t.verify_client)}\n"
            f"require_certificate = {yn(t.verify_client)}\n" + files + "\n[client:default]\n"
            f"method = {t.method}\n"
            f"verify_certificate = {yn(t.verify_server)}\n"
            f"require_certificate = {yn(t.verify_server)}\n" + files
        )

    # ------------------------------------------------------------------ lifecycle

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        """PID of Kamailio's main process (also its process group id)."""
        return self.proc.pid if self.proc is not None else None

    def start(self, timeout: float | None = None) -> KamailioNode:
        """Write the config, start Kamailio and wait until it answers RPC and SIP OPTIONS.

        Raises :class:`KamailioError` with the tail of the log if it exits or does not get
        ready within ``timeout`` (default ``start_timeout``). Can be called again after
        ``stop()``/``kill()`` to restart on the same ports (the log is appended to).
        """
        if self.running:
            raise KamailioError(f"{self.name} is already running")
        # Debian installs it in /usr/sbin, which is not on every PATH
        binary = shutil.which(KAMAILIO_BIN) or shutil.which(KAMAILIO_BIN, path="/usr/sbin:/sbin")
        if binary is None:
            raise KamailioError(
                f"{KAMAILIO_BIN!r} not found on PATH: install the Debian package 'kamailio' "
                "(scripts/test.sh does)"
            )
        self._close_log()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.rundir = Path(tempfile.mkdtemp(prefix="kam-", dir="/tmp"))
        self.cfg_path.write_text(self.render_cfg(self.rundir))
        if self.tls is not None:
            self.tls_cfg_path.write_text(self.render_tls_cfg())
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 (lives as long as the process)
        self._log_file.write(f"==== pydmq test harness: starting {self.name}\n".encode())
        self._log_file.flush()
        args = [
            binary,
            "-DD",  # stay in the foreground (no daemon), still fork the worker processes
            "-E",  # log to stderr (our log file)
            "-f", str(self.cfg_path),
            "-w", str(self.workdir),
            "-P", str(self.pid_path),
            "-Y", str(self.rundir),
            "-m", str(self.shm_mb),
        ]  # fmt: skip
        if self.netns is not None:
            ip = shutil.which("ip") or shutil.which("ip", path="/usr/sbin:/sbin:/usr/bin:/bin")
            if ip is None:
                raise KamailioError("'ip' (iproute2) not found: needed to run in a namespace")
            # ip execs kamailio: the pid (and the process group below) stays Kamailio's own
            args = [ip, "netns", "exec", self.netns, *args]
        self.proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            start_new_session=True,  # own process group: stop()/kill() take all children
            close_fds=True,
        )
        with _live_lock:
            _live_nodes.add(self)
        try:
            self._wait_ready(self.start_timeout if timeout is None else timeout)
        except BaseException:
            self.kill()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        stages = ["rpc", "sip", "tls"] if self.tls_port is not None else ["rpc", "sip"]
        while stages:
            if not self.running:
                code = self.proc.returncode if self.proc is not None else None
                raise KamailioError(
                    f"{self.name}: kamailio exited with code {code} during startup\n"
                    + self.log_tail()
                )
            if time.monotonic() >= deadline:
                raise KamailioError(
                    f"{self.name}: not ready after {timeout:.1f}s (waiting for {stages[0]})\n"
                    + self.log_tail()
                )
            try:
                if stages[0] == "rpc":
                    self.rpc("core.version", timeout=0.5)
                elif stages[0] == "sip":
                    reply = self.options(timeout=0.5)
                    if reply.code != 200:
                        raise KamailioError(f"OPTIONS got {reply.code}")
                else:
                    assert self.tls_port is not None
                    if self.netns is None:
                        with socket.create_connection((self.host, self.tls_port), timeout=0.5):
                            pass
            except (OSError, KamailioError, ValueError):
                time.sleep(0.05)
                continue
            stages.pop(0)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the process group, SIGKILL whatever is left after ``timeout``; bounded.

        Returns the main process' exit code (None if it never started).
        """
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self._signal_group(signal.SIGCONT)  # in case pause() was used
            self._signal_group(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        return self._reap()

    def kill(self) -> int | None:
        """SIGKILL the whole process group at once (a crash, no shutdown code runs)."""
        if self.proc is None:
            return None
        return self._reap()

    def pause(self) -> None:
        """SIGSTOP every Kamailio process: the node goes silent but keeps its ports."""
        self._signal_group(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        self._signal_group(signal.SIGCONT)

    def _reap(self) -> int | None:
        assert self.proc is not None
        self._signal_group(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        deadline = time.monotonic() + 5
        while self.group_pids() and time.monotonic() < deadline:
            self._signal_group(signal.SIGKILL)
            time.sleep(0.02)
        with _live_lock:
            _live_nodes.discard(self)
        self._close_log()
        if self.rundir is not None:
            shutil.rmtree(self.rundir, ignore_errors=True)
            self.rundir = None
        return self.proc.returncode

    def _signal_group(self, sig: signal.Signals) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def group_pids(self) -> list[int]:
        """Live (non-zombie) processes in the node's process group."""
        if self.proc is None:
            return []
        pgid = self.proc.pid
        pids: list[int] = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rfind(")") + 2 :].split()
            # fields: state ppid pgrp ...
            if len(fields) > 2 and fields[0] not in ("Z", "X") and int(fields[2]) == pgid:
                pids.append(int(entry))
        return pids

    def _close_log(self) -> None:
        if self._log_file is not None:
            with contextlib.suppress(OSError):
                self._log_file.close()
            self._log_file = None

    def cleanup(self) -> None:
        """Stop and remove a workdir the node created itself (workdir=None)."""
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> KamailioNode:
        if not self.running:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ logs

    def log_text(self) -> str:
        """Everything Kamailio wrote so far (stdout + stderr, all processes)."""
        try:
            return self.log_path.read_bytes().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        text = self.log_text().splitlines()[-lines:]
        return f"---- last {len(text)} log lines of {self.name} ({self.log_path}):\n" + "\n".join(
            text
        )

    def wait_for_log(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        """Wait until regex ``pattern`` appears in the log; returns the match."""
        rx = re.compile(pattern)
        return wait_until(
            lambda: rx.search(self.log_text()),
            timeout=timeout,
            interval=0.05,
            what=f"{pattern!r} in the log of {self.name}",
            describe=self.log_tail,
        )

    def received(
        self, kind: str | None = None, channel: str | None = None
    ) -> list[ReceivedMessage]:
        """KDMQ requests logged by the script, oldest first (``kind``: "custom" or "kdmq")."""
        out: list[ReceivedMessage] = []
        for m in _MARKER_RE.finditer(self.log_text()):
            msg = _parse_marker(m.group(1))
            if kind is not None and msg.kind != kind:
                continue
            if channel is not None and msg.channel != channel:
                continue
            out.append(msg)
        return out

    def requests(self, method: str | None = None) -> list[ReceivedMessage]:
        """Requests of the ``record_methods`` as they arrived (``method`` narrows them)."""
        return [m for m in self.received("request") if method is None or m.method == method]

    def custom_messages(self, channel: str | None = None) -> list[ReceivedMessage]:
        """Requests on custom channels that the script answered itself."""
        return self.received("custom", channel)

    def wait_custom_message(
        self, channel: str, count: int = 1, timeout: float = 10.0
    ) -> list[ReceivedMessage]:
        """Wait until at least ``count`` requests arrived on custom ``channel``; returns them."""
        return wait_until(
            lambda: (msgs := self.custom_messages(channel)) and len(msgs) >= count and msgs,
            timeout=timeout,
            interval=0.05,
            what=f"{count} KDMQ on custom channel {channel!r} at {self.name}",
            describe=self.log_tail,
        )

    # ------------------------------------------------------------------ SIP

    def options(self, timeout: float = 2.0) -> SipReply:
        """Send a SIP OPTIONS over UDP and return the reply."""
        uri = f"sip:{self.host}:{self.port}"
        return udp_request(
            self.host,
            self.port,
            lambda local: build_request("OPTIONS", uri, local=local),
            timeout=timeout,
            retransmit=0.2,
            netns=self.netns,
        )

    def send_kdmq(
        self,
        channel: str,
        body: bytes | str = b"",
        *,
        content_type: str | None = "text/plain",
        max_forwards: int | None = 1,
        transport: Literal["udp", "tcp"] = "udp",
        from_uri: str | None = None,
        timeout: float = 5.0,
    ) -> SipReply:
        """Send one KDMQ to this node from a throw-away socket; returns the final reply."""
        uri = f"sip:{channel}@{self.host}:{self.port}"
        if transport == "tcp":
            uri += ";transport=tcp"
        hdrs = [("Content-Type", content_type)] if content_type else []

        def build(local: tuple[str, int]) -> bytes:
            return build_request(
                "KDMQ",
                uri,
                local=local,
                transport=transport,
                from_uri=from_uri or f"sip:{channel}@{local[0]}:{local[1]}",
                headers=hdrs,
                body=body,
                max_forwards=max_forwards,
            )

        if transport == "tcp":
            if self.netns is not None:
                raise KamailioError("send_kdmq over TCP into a namespace is not supported")
            return tcp_request(self.host, self.port, build, timeout=timeout)
        return udp_request(
            self.host, self.port, build, timeout=timeout, retransmit=0.5, netns=self.netns
        )

    # ------------------------------------------------------------------ RPC

    def rpc(
        self,
        method: str,
        *params: Any,
        timeout: float = 5.0,
        transport: RpcTransport = "dgram",
    ) -> dict[str, Any]:
        """Call a JSON-RPC method; returns the whole parsed answer (``result`` or ``error``).

        ``transport="dgram"`` (default) uses jsonrpcs' unix datagram socket. Kamailio cannot
        send an answer bigger than 128 KB that way (it logs "Message too long"); the call then
        notices that in the log and repeats itself over the FIFO, which has no size limit
        (``transport="fifo"`` goes there directly; FIFO requests must stay below 8 KB).
        Careful: a repeated call runs twice on Kamailio's side, harmless for reads like
        ``htable.dump`` / ``ul.dump``.
        """
        if self.rundir is None or not self.running:
            raise KamailioError(f"{self.name} is not running")
        seq = next(self._rpc_seq)
        request: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": seq}
        if params:
            request["params"] = list(params)
        raw = self._rpc_dgram(request, seq, timeout) if transport == "dgram" else None
        if raw is None:  # fifo asked for, or the answer was too big for a datagram
            raw = self._rpc_fifo(request, seq, timeout)
        answer: dict[str, Any] = json.loads(raw.decode("utf-8", "replace"))
        return answer

    def rpc_result(
        self, method: str, *params: Any, timeout: float = 5.0, transport: RpcTransport = "dgram"
    ) -> Any:
        """``rpc(...)["result"]``; raises :class:`KamailioRpcError` on an ``error`` answer."""
        answer = self.rpc(method, *params, timeout=timeout, transport=transport)
        if "error" in answer:
            raise KamailioRpcError(method, answer["error"])
        return answer.get("result")

    def _rpc_dgram(self, request: dict[str, Any], seq: int, timeout: float) -> bytes | None:
        """One datagram call; None when Kamailio logged that the answer was too big for it."""
        assert self.rundir is not None
        client_path = self.rundir / f"c{os.getpid()}-{threading.get_ident() % 100000}-{seq}.sock"
        try:
            log_offset = self.log_path.stat().st_size
        except OSError:
            log_offset = 0
        deadline = time.monotonic() + timeout
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(str(client_path))
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
                try:
                    sock.sendto(json.dumps(request).encode(), str(self.rundir / "rpc.sock"))
                except (FileNotFoundError, ConnectionRefusedError) as exc:
                    raise KamailioError(f"{self.name}: RPC socket not available ({exc!r})") from exc
                while True:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise KamailioError(
                            f"{self.name}: no answer to RPC {request['method']} within {timeout}s"
                        )
                    sock.settimeout(min(remaining, 0.2))
                    try:
                        return sock.recv(1 << 20)
                    except TimeoutError:
                        if self._log_since(log_offset).find("Message too long") >= 0:
                            return None
            finally:
                with contextlib.suppress(OSError):
                    client_path.unlink()

    def _log_since(self, offset: int) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def _rpc_fifo(self, request: dict[str, Any], seq: int, timeout: float) -> bytes:
        assert self.rundir is not None
        # jsonrpcs refuses reply names with '.', '/' or '\\'; it opens them in fifo_reply_dir
        reply_name = f"r{os.getpid()}_{threading.get_ident() % 100000}_{seq}"
        reply_path = self.rundir / reply_name
        request = dict(request, reply_name=reply_name)
        data = json.dumps(request).encode() + b"\n"
        if len(data) > 8000:
            raise ValueError("jsonrpcs FIFO requests are limited to 8 KB")
        os.mkfifo(reply_path, 0o600)
        rfd = os.open(reply_path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            try:
                wfd = os.open(self.rundir / "rpc.fifo", os.O_WRONLY | os.O_NONBLOCK)
            except OSError as exc:  # ENXIO: nobody reads the fifo; ENOENT: not created yet
                raise KamailioError(f"{self.name}: RPC fifo not available ({exc!r})") from exc
            try:
                os.write(wfd, data)
            finally:
                os.close(wfd)
            chunks: list[bytes] = []
            deadline = time.monotonic() + timeout
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise KamailioError(
                        f"{self.name}: no answer to RPC {request['method']} over fifo"
                    )
                ready, _, _ = select.select([rfd], [], [], min(remaining, 0.1))
                if not ready:
                    continue
                try:
                    chunk = os.read(rfd, 1 << 16)
                except OSError as exc:
                    if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                        continue
                    raise
                if chunk:
                    chunks.append(chunk)
                elif chunks:
                    return b"".join(chunks)  # writer closed: complete
                else:
                    time.sleep(0.01)  # the writer has not opened the fifo yet
        finally:
            os.close(rfd)
            with contextlib.suppress(OSError):
                reply_path.unlink()

    # ------------------------------------------------------------------ DMQ helpers

    def list_nodes(self) -> list[dict[str, Any]]:
        """``dmq.list_nodes`` result: dicts with host, port (str), proto, resolved_ip, status,
        last_notification, local (0/1); newest first, the local node usually last."""
        result: list[dict[str, Any]] = self.rpc_result("dmq.list_nodes")
        return result

    def peer_status(self, host: str, port: int | str, *, local: bool = False) -> str | None:
        """Status of the (non-local unless ``local``) node host:port in ``dmq.list_nodes``."""
        for n in self.list_nodes():
            if n["host"] == host and str(n["port"]) == str(port) and bool(n["local"]) == local:
                return str(n["status"])
        return None

    def wait_peer(
        self, host: str, port: int | str, status: str | None = "active", timeout: float = 15.0
    ) -> dict[str, Any]:
        """Poll ``dmq.list_nodes`` until a non-local node host:port is listed (with ``status``
        unless None); returns its entry."""

        def check() -> dict[str, Any] | None:
            for n in self.list_nodes():
                same = n["host"] == host and str(n["port"]) == str(port) and not n["local"]
                if same and (status is None or n["status"] == status):
                    return n
            return None

        return wait_until(
            check,
            timeout=timeout,
            interval=0.1,
            what=f"{host}:{port} {status or 'listed'} in dmq.list_nodes of {self.name}",
            describe=lambda: json.dumps(self.list_nodes(), indent=1),
        )

    def wait_peer_gone(self, host: str, port: int | str, timeout: float = 90.0) -> None:
        """Poll ``dmq.list_nodes`` until no non-local node host:port is listed."""
        wait_until(
            lambda: all(
                not (n["host"] == host and str(n["port"]) == str(port) and not n["local"])
                for n in self.list_nodes()
            ),
            timeout=timeout,
            interval=0.2,
            what=f"{host}:{port} removed from dmq.list_nodes of {self.name}",
            describe=lambda: json.dumps(self.list_nodes(), indent=1),
        )


@atexit.register
def _kill_leftovers() -> None:
    with _live_lock:
        nodes = list(_live_nodes)
    for node in nodes:
        with contextlib.suppress(Exception):
            node.kill()
