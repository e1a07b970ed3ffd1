"""Who may talk to a cluster, and what a node lets out.

* ``allowed_sources`` on UDP, TCP and TLS: a node that allows only 127.0.0.2/32 answers KDMQ and
  OPTIONS from 127.0.0.1 with ``403`` and leaves its node list alone, and serves 127.0.0.2.
* Mutual TLS (trustme CA; ``[sip] tls_certfile/tls_keyfile/tls_cafile``, ``tls_verify_client``,
  ``server_address sip:127.0.0.1:P;transport=tls``): three nodes form a cluster; a node whose
  certificate comes from another CA cannot join (its handshakes are refused), a raw TLS client
  without a certificate (or with the other CA's) gets no SIP response and cannot inject node-list
  entries, while the same raw client with a cluster certificate is answered (so the refusals are
  the certificate's doing).
* A node listed with a transport or address family it has no socket for (a hostile or broken
  body line) is failed at once: it never stays active, so broadcasts are not cut short at it.
* RPC: ``pydmq run`` with no configuration listens for JSON-RPC on 127.0.0.1 only (its listening
  sockets, read from ``/proc`` inside a private network namespace where port 5080 is free);
  a non-loopback ``http_address`` gives a warning; the unix socket is 0600 whatever the umask.
* No secret in logs: two ``pydmq run`` nodes over mutual TLS at DEBUG level, a refused client,
  RPC calls; neither the logs nor the RPC replies nor the status files contain the private key.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme

from pydmq.config import RpcSettings, settings_from_mapping
from pydmq.dmq.api import load_api
from pydmq.dmq.runtime import DmqNode
from pydmq.rpc.client import call as rpc_call
from pydmq.rpc.server import start_rpc
from tests.support.cluster import Cluster, key_of, wait_joined
from tests.support.net import SipReply, build_request, free_port, parse_reply, wait_until

pytestmark = pytest.mark.timeout(60)

ALLOWED = "127.0.0.2"
NOTIF = "notification_peer"


# ------------------------------------------------------------------------------------ PKI


@dataclass
class Pki:
    ca: Path  # the cluster CA
    nodes: list[tuple[Path, Path]]  # (cert, key) per cluster node, from the cluster CA
    rogue: tuple[Path, Path]  # from another CA
    key_pems: list[bytes]  # every private key written, PEM


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca, other = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(d / "ca.pem")
    keys: list[bytes] = []

    def issue(authority: trustme.CA, name: str) -> tuple[Path, Path]:
        cert = authority.issue_cert("127.0.0.1", f"{name}.cluster.test")
        with (d / f"{name}.crt").open("wb") as fh:
            for pem in cert.cert_chain_pems:
                fh.write(pem.bytes())
        cert.private_key_pem.write_to_path(d / f"{name}.key")
        keys.append(cert.private_key_pem.bytes())
        return d / f"{name}.crt", d / f"{name}.key"

    nodes = [issue(ca, f"node{i}") for i in range(4)]
    return Pki(d / "ca.pem", nodes, issue(other, "rogue"), keys)


def tls_sip(pki: Pki, cert: tuple[Path, Path], **extra: Any) -> dict[str, Any]:
    return {
        "tls_certfile": str(cert[0]),
        "tls_keyfile": str(cert[1]),
        "tls_cafile": str(pki.ca),
        "tls_verify_client": True,
        **extra,
    }


# ------------------------------------------------------------------------------------ clients


def _request(method: str, port: int, local: tuple[str, int], transport: str, body: bytes) -> bytes:
    user = NOTIF if method == "KDMQ" else "ping"
    suffix = "" if transport == "UDP" else f";transport={transport.lower()}"
    headers = [("Content-Type", "text/plain")] if method == "KDMQ" else []
    return build_request(
        method,
        f"sip:{user}@127.0.0.1:{port}{suffix}",
        local=local,
        transport=transport,
        from_uri=f"sip:{user}@{local[0]}:{local[1]}",
        headers=headers,
        body=body,
        max_forwards=1 if method == "KDMQ" else 70,
    )


def _read_reply(sock: socket.socket | ssl.SSLSocket, timeout: float) -> SipReply | None:
    """One SIP reply from a stream, or None when the peer closes (or fails TLS) first."""
    sock.settimeout(timeout)
    buf = b""
    while b"\r\n\r\n" not in buf:
        try:
            chunk = sock.recv(65536)
        except (TimeoutError, ssl.SSLError, OSError):
            return None
        if not chunk:
            return None
        buf += chunk
    return parse_reply(buf)


def sip_exchange(
    transport: str,
    port: int,
    method: str,
    *,
    source: str = "127.0.0.1",
    body: bytes = b"",
    ctx: ssl.SSLContext | None = None,
    timeout: float = 2.0,
) -> SipReply | None:
    """One request from ``source`` over ``transport`` (UDP, TCP or TLS); its reply or None."""
    if transport == "UDP":
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((source, 0))
            sock.sendto(
                _request(method, port, sock.getsockname(), "UDP", body), ("127.0.0.1", port)
            )
            sock.settimeout(timeout)
            try:
                return parse_reply(sock.recv(65535))
            except TimeoutError:
                return None
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    raw.bind((source, 0))
    raw.settimeout(timeout)
    raw.connect(("127.0.0.1", port))
    local = raw.getsockname()  # before wrap_socket, which detaches ``raw``
    sock: socket.socket | ssl.SSLSocket = raw
    try:
        if transport == "TLS":
            assert ctx is not None
            try:
                sock = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
            except (ssl.SSLError, OSError):
                return None  # TLS 1.2: the handshake itself fails
        try:
            sock.sendall(_request(method, port, local, transport, body))
        except (ssl.SSLError, OSError):
            return None
        return _read_reply(sock, timeout)
    finally:
        sock.close()


def client_ctx(pki: Pki, cert: tuple[Path, Path] | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(pki.ca)
    if cert is not None:
        ctx.load_cert_chain(cert[0], cert[1])
    return ctx


def _port(node: DmqNode) -> int:
    return node.endpoint.local_address(node.endpoint.specs[0].proto).port


def _keys(node: DmqNode) -> set[tuple[str, str, str]]:
    return {n.key for n in node.nodes.nodes()}


# ------------------------------------------------------------------------------- allowed_sources


@pytest.mark.parametrize("transport", ["UDP", "TCP", "TLS"])
async def test_allowed_sources_on_every_transport(
    cluster: Cluster, pki: Pki, transport: str
) -> None:
    sip = tls_sip(pki, pki.nodes[0]) if transport == "TLS" else None
    node = await cluster.start(
        transport=None if transport == "UDP" else transport.lower(),
        sip=sip,
        allowed_sources=[f"{ALLOWED}/32"],
    )
    port = _port(node)
    ctx = client_ctx(pki, pki.nodes[1]) if transport == "TLS" else None
    before = _keys(node)
    injected = f"sip:127.0.0.1:{free_port()};status=active\r\n".encode()

    def exchange(method: str, source: str, body: bytes = b"") -> int | None:
        reply = sip_exchange(transport, port, method, source=source, body=body, ctx=ctx)
        return reply.code if reply is not None else None

    async def ask(method: str, source: str, body: bytes = b"") -> int | None:
        return await asyncio.to_thread(exchange, method, source, body)

    # From outside the allowed network: 403 to everything, nothing merged.
    assert await ask("OPTIONS", "127.0.0.1") == 403
    assert await ask("KDMQ", "127.0.0.1", injected) == 403
    assert node.stats.rejected[403] == 2
    assert _keys(node) == before
    # From inside: served.
    assert await ask("OPTIONS", ALLOWED) == 200
    assert await ask("KDMQ", ALLOWED, b"") == 200
    assert node.stats.rejected[403] == 2


# ------------------------------------------------------------------------------------ mutual TLS


async def _tls_cluster(cluster: Cluster, pki: Pki) -> list[DmqNode]:
    a = await cluster.start(transport="tls", sip=tls_sip(pki, pki.nodes[0]))
    b = await cluster.start(transport="tls", sip=tls_sip(pki, pki.nodes[1]), seeds=[a])
    c = await cluster.start(transport="tls", sip=tls_sip(pki, pki.nodes[2]), seeds=[a])
    await wait_joined([a, b, c], timeout=10)
    return [a, b, c]


async def test_mutual_tls_cluster_forms_and_a_foreign_node_cannot_join(
    cluster: Cluster, pki: Pki
) -> None:
    nodes = await _tls_cluster(cluster, pki)
    a = nodes[0]
    lists = [_keys(n) for n in nodes]
    assert all(len(keys) == 3 for keys in lists)
    # The rogue trusts the cluster CA (so it accepts our server certificates) but its own
    # certificate comes from another CA: our servers refuse its handshakes.
    rogue = await cluster.start(transport="tls", sip=tls_sip(pki, pki.rogue), seeds=[a])
    failures = a.endpoint.transport.stats.tls_handshake_failures
    await wait_until_async(
        lambda: a.endpoint.transport.stats.tls_handshake_failures > failures,
        timeout=5, what="a refused handshake",
    )  # fmt: skip
    await asyncio.sleep(2.5)  # several ping rounds (ping_interval 1 s, fr_timer 0.5 s)
    assert [_keys(n) for n in nodes] == lists, "the rogue got into a node list"
    assert key_of(rogue) not in _keys(a)
    assert not rogue.nodes.active_remote(), "the rogue sees the cluster as active"
    # The cluster itself is untouched and still works.
    deliveries = await asyncio.wait_for(load_api(a).bcast_message("sec", b"hi"), 5)
    assert sorted(d.status for d in deliveries) == [404, 404]  # no "sec" channel there


async def test_tls_client_without_a_cluster_certificate_gets_nothing(
    cluster: Cluster, pki: Pki
) -> None:
    nodes = await _tls_cluster(cluster, pki)
    a = nodes[0]
    port = _port(a)
    lists = [_keys(n) for n in nodes]
    tstats = a.endpoint.transport.stats
    accepted, failures = tstats.accepted, tstats.tls_handshake_failures
    injected = (
        f"sip:127.0.0.1:{free_port()};transport=tls;status=active\r\n"
        f"sip:127.0.0.1:{_port(nodes[1])};transport=tls;status=disabled\r\n"
    ).encode()

    def attempt(cert: tuple[Path, Path] | None) -> SipReply | None:
        return sip_exchange("TLS", port, "KDMQ", body=injected, ctx=client_ctx(pki, cert))

    # No certificate, and a certificate from another CA: no SIP response; the connections
    # never got past the handshake, so nothing they sent was read.
    assert await asyncio.to_thread(attempt, None) is None
    assert await asyncio.to_thread(attempt, pki.rogue) is None
    assert (tstats.accepted, tstats.tls_handshake_failures) == (accepted, failures + 2)
    await asyncio.sleep(1.5)
    assert [_keys(n) for n in nodes] == lists, "a node list changed"
    assert all(len(n.nodes.active_remote()) == 2 for n in nodes)
    # Control: the same client with a cluster certificate is answered (an OPTIONS: no change).
    reply = await asyncio.to_thread(
        sip_exchange, "TLS", port, "OPTIONS", ctx=client_ctx(pki, pki.nodes[3])
    )
    assert reply is not None and reply.code == 200


async def wait_until_async(predicate: Callable[[], object], *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


# ----------------------------------------------------------------------------------- unreachable


async def test_unreachable_nodes_from_a_body_never_stay_active(cluster: Cluster) -> None:
    """A UDP-only IPv4 node is told about nodes over TCP, TLS and IPv6: it cannot send to any
    of them, so they must not stay active (every broadcast would stop at them) nor stay
    listed for ever."""
    a = await cluster.start()
    b = await cluster.start(seeds=[a])
    await wait_joined([a, b])
    ghosts = [
        f"sip:127.0.0.1:{free_port()};transport=tcp",
        f"sip:127.0.0.1:{free_port()};transport=tls",
        f"sip:[::1]:{free_port()}",
    ]
    body = "".join(f"{g};status=active\r\n" for g in ghosts).encode()
    reply = await asyncio.to_thread(sip_exchange, "UDP", _port(a), "KDMQ", body=body)
    assert reply is not None and reply.code == 200

    def ghost_statuses() -> list[str]:
        found = [a.nodes.find(key_of(g)) for g in ghosts]
        return [f.status.value if f is not None else "gone" for f in found]

    # Before any broadcast can start, the ghosts are out of the active set ...
    await asyncio.sleep(0)
    assert "active" not in ghost_statuses(), ghost_statuses()
    deliveries = await asyncio.wait_for(load_api(a).bcast_message("x", b"y"), 5)
    assert [d.node.key for d in deliveries] == [key_of(b)]
    # ... and gone after the next ping round.
    await wait_until_async(lambda: ghost_statuses() == ["gone"] * 3, timeout=5, what="removal")


# ------------------------------------------------------------------------------------ RPC


def _listening(pid: int) -> list[tuple[str, int]]:
    """TCP sockets in LISTEN state in ``pid``'s network namespace, as (ip, port)."""
    out = []
    for name in ("tcp", "tcp6"):
        lines = Path(f"/proc/{pid}/net/{name}").read_text().splitlines()[1:]
        for line in lines:
            fields = line.split()
            local, state = fields[1], fields[3]
            if state != "0A":
                continue
            hex_ip, hex_port = local.split(":")
            raw = bytes.fromhex(hex_ip)
            if len(raw) == 4:
                ip = socket.inet_ntop(socket.AF_INET, raw[::-1])
            else:
                words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
                ip = socket.inet_ntop(socket.AF_INET6, words)
            out.append((ip, int(hex_port, 16)))
    return out


@pytest.mark.netns
def test_rpc_listens_on_loopback_only_by_default(tmp_path: Path) -> None:
    """``pydmq run`` without any configuration, in a private namespace (5060/5080 are free)."""
    from tests.support.netns import TestNet  # noqa: PLC0415 (root only)

    env = {k: v for k, v in os.environ.items() if not k.startswith("PYDMQ_")}
    with TestNet(["rpc"]) as net, (tmp_path / "run.log").open("wb") as log:
        proc = net.run_in("rpc", [sys.executable, "-m", "pydmq", "run"], stdout=log, env=env,
                          cwd=os.getcwd())  # fmt: skip
        own_ns = os.readlink("/proc/self/ns/net")

        def started() -> bool:
            # In the namespace (not still "ip netns exec"), with the RPC listener up.
            return (
                proc.poll() is None
                and os.readlink(f"/proc/{proc.pid}/ns/net") != own_ns
                and "JSON-RPC over HTTP" in (tmp_path / "run.log").read_text(errors="replace")
            )

        try:
            wait_until(started, timeout=15, what="the RPC listener",
                       describe=(tmp_path / "run.log").read_text)  # fmt: skip
            listening = _listening(proc.pid)
        finally:
            net.signal(proc, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
    assert listening == [("127.0.0.1", 5080)], listening


def test_non_loopback_rpc_address_gives_a_warning() -> None:
    _settings, warnings = settings_from_mapping({"rpc": {"http_address": "0.0.0.0:5080"}})
    assert any("not a loopback address" in w for w in warnings), warnings
    for quiet in ("127.0.0.1:5080", "[::1]:5080", "localhost:5080", ""):
        _settings, warnings = settings_from_mapping({"rpc": {"http_address": quiet}})
        assert not any("loopback" in w for w in warnings), (quiet, warnings)
    assert RpcSettings().http_address == "127.0.0.1:5080"


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


async def test_rpc_unix_socket_is_0600_whatever_the_umask(cluster: Cluster, tmp_path: Path) -> None:
    node = await cluster.start()
    path = tmp_path / "rpc.sock"
    with _umask(0):
        servers = await start_rpc(node, RpcSettings(http_address=None, unix_socket=str(path)))
    try:
        mode = os.stat(path).st_mode
        assert stat.S_ISSOCK(mode)
        assert stat.S_IMODE(mode) == 0o600
        assert servers.http is None
    finally:
        await servers.close()


# ------------------------------------------------------------------------------------ secrets


def _pem_body(pem: bytes) -> list[bytes]:
    """The base64 lines of a PEM block (what a leaked key would show), long enough to be
    unique."""
    return [ln for ln in pem.splitlines() if ln and not ln.startswith(b"-----") and len(ln) > 16]


def test_no_secret_in_logs_rpc_or_status(pki: Pki, tmp_path: Path) -> None:
    """Two ``pydmq run`` nodes over mutual TLS at DEBUG, a refused client, RPC calls."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYDMQ_")}
    procs: list[subprocess.Popen[bytes]] = []
    names = ("one", "two")
    ports = [free_port("tcp") for _ in names]
    rpc_dir = Path(tempfile.mkdtemp(prefix="pydmq-sec-"))  # short: socket paths <= 107 bytes
    try:
        for i, name in enumerate(names):
            seeds = [f"sip:127.0.0.1:{ports[0]};transport=tls"] if i else []
            cert, key = pki.nodes[i]
            (tmp_path / f"{name}.toml").write_text(
                "[dmq]\n"
                f'server_address = "sip:127.0.0.1:{ports[i]};transport=tls"\n'
                f"notification_address = {json.dumps(seeds)}\n"
                "ping_interval = 1\n"
                "[tm]\nfr_timer = 1.0\n"
                "[sip]\n"
                f'tls_certfile = "{cert}"\ntls_keyfile = "{key}"\ntls_cafile = "{pki.ca}"\n'
                "tls_verify_client = true\n"
                "[rpc]\n"
                f'http_address = ""\nunix_socket = "{rpc_dir}/{name}.sock"\n'
                '[log]\nlevel = "DEBUG"\n'
            )
            with (tmp_path / f"{name}.log").open("wb") as log:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "pydmq", "run", "-c", str(tmp_path / f"{name}.toml"),
                         "--status-file", str(tmp_path / f"{name}.status.json")],
                        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                    )
                )  # fmt: skip

        def rpc(name: str, method: str, *params: str) -> Any:
            return rpc_call(method, list(params), unix=f"{rpc_dir}/{name}.sock", timeout=5)

        def joined() -> bool:
            rows = rpc("one", "dmq.list_nodes")
            return any(r["status"] == "active" and not r["local"] for r in rows)

        wait_until(joined, timeout=20, what="the TLS pair to join")
        # A client without a certificate, refused (logged at WARNING, with the reason).
        assert sip_exchange("TLS", ports[0], "OPTIONS", ctx=client_ctx(pki, None)) is None
        outputs = [
            json.dumps(rpc(name, method))
            for name in names
            for method in ("dmq.list_nodes", "dmq.stats", "core.version", "system.listMethods")
        ]
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        shutil.rmtree(rpc_dir, ignore_errors=True)
    logs = {name: (tmp_path / f"{name}.log").read_bytes() for name in names}
    status = {name: (tmp_path / f"{name}.status.json").read_bytes() for name in names}
    # The run really logged at DEBUG, and the refused client was logged.
    assert all(b" DEBUG " in text for text in logs.values())
    assert re.search(rb"TLS handshake with .* failed", logs["one"]), logs["one"][-3000:]
    secrets = [line for pem in pki.key_pems for line in _pem_body(pem)]
    assert secrets
    places = {**{f"log {k}": v for k, v in logs.items()},
              **{f"status {k}": v for k, v in status.items()},
              "rpc": "\n".join(outputs).encode()}  # fmt: skip
    for where, text in places.items():
        assert b"PRIVATE KEY" not in text, where
        for line in secrets:
            assert line not in text, f"key material in {where}"
    assert [p.returncode for p in procs] == [0, 0]
