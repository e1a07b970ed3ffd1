"""JSON-RPC: a real DmqNode with its HTTP and unix-socket listeners, called with urllib, curl, raw
sockets and the ``pydmq rpc`` command; replies compared with Kamailio 5.6.3's (golden files).

Every node, server and process a test starts is stopped by its fixture or the test itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import glob
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pydmq.config import RpcSettings, settings_from_mapping
from pydmq.dmq.node import NodeStatus
from pydmq.dmq.nodelist import RpcFault
from pydmq.dmq.runtime import DmqNode
from pydmq.rpc import client
from pydmq.rpc.command import render
from pydmq.rpc.protocol import Dispatcher, format_json
from pydmq.rpc.server import HttpRpcServer, RpcServers, split_hostport, start_rpc
from tests.support.cluster import (
    FAST_TM,
    Cluster,
    EventRecorder,
    node_status,
    uri_of,
    wait_joined,
)
from tests.support.net import free_port, wait_until
from tests.support.spec import wire_dir

pytestmark = pytest.mark.timeout(30)

GOLDEN_DIR = wire_dir()
GOLDEN_HTTP = GOLDEN_DIR / "jsonrpc_http_dmq.list_nodes_node1.json"
CURL = shutil.which("curl")


# ---------------------------------------------------------------------------------------------
# fixtures and helpers


@dataclass
class Rig:
    a: DmqNode  # serves RPC
    b: DmqNode  # its peer
    servers: RpcServers
    events: EventRecorder
    unix: str

    @property
    def http(self) -> str:
        assert self.servers.http is not None
        host, port = self.servers.http.address
        return f"{host}:{port}"

    @property
    def url(self) -> str:
        return f"http://{self.http}/RPC"


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    sockdir = tempfile.mkdtemp(prefix="pydmq-rpct-")  # short: AF_UNIX paths are <= 107 bytes
    cluster = Cluster()
    servers: RpcServers | None = None
    recorder: EventRecorder | None = None
    try:
        # ping_interval 60: nothing re-adds a node removed by RPC while a test looks at the list
        b = await cluster.start(ping_interval=60)
        port = free_port("both")
        node_settings, _ = settings_from_mapping(
            {
                "dmq": {
                    "server_address": f"sip:127.0.0.1:{port}",
                    "notification_address": [uri_of(b)],
                    "ping_interval": 60,
                },
                "tm": FAST_TM,
                "rpc": {"http_address": "127.0.0.1:0", "unix_socket": f"{sockdir}/rpc.sock"},
            },
            "test",
        )
        a = DmqNode(node_settings)
        cluster.nodes.append(a)  # stopped by cluster.close()
        recorder = EventRecorder(a)
        await a.start()
        servers = await start_rpc(a)
        await wait_joined([a, b])
        yield Rig(a, b, servers, recorder, f"{sockdir}/rpc.sock")
    finally:
        if servers is not None:
            await servers.close()
        if recorder is not None:
            recorder.close()
        await cluster.close()
        shutil.rmtree(sockdir, ignore_errors=True)


@dataclass
class HttpReply:
    status: int
    reason: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def _urllib(url: str, body: bytes | None, method: str = "POST") -> HttpReply:
    req = urllib.request.Request(
        url, data=body, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return HttpReply(
                resp.status,
                resp.reason,
                {k.lower(): v for k, v in resp.headers.items()},
                resp.read(),
            )
    except urllib.error.HTTPError as exc:
        with exc:
            return HttpReply(
                exc.code, exc.reason, {k.lower(): v for k, v in exc.headers.items()}, exc.read()
            )


async def post(url: str, body: bytes | dict[str, Any] | None, method: str = "POST") -> HttpReply:
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    return await asyncio.to_thread(_urllib, url, data, method)


def rpc_body(method: str, params: Any = None, request_id: Any = 1) -> dict[str, Any]:
    body: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": request_id}
    if params is not None:
        body["params"] = params
    return body


async def result_of(rig: Rig, method: str, params: Any = None) -> Any:
    reply = await post(rig.url, rpc_body(method, params))
    data = reply.json()
    assert reply.status == 200 and "error" not in data, (reply.status, data)
    return data["result"]


async def fault_of(rig: Rig, method: str, params: Any = None) -> tuple[int, str]:
    """The fault, checked to be sent as Kamailio does: HTTP status/reason = code/message."""
    reply = await post(rig.url, rpc_body(method, params))
    data = reply.json()
    assert list(data) == ["jsonrpc", "error", "id"], data
    err = data["error"]
    assert list(err) == ["code", "message"]
    assert (reply.status, reply.reason) == (err["code"], err["message"])
    return err["code"], err["message"]


def _raw_http(address: str, data: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes, read until the server closes."""
    host, port = split_hostport(address)
    chunks: list[bytes] = []
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(data)
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def _status_line(raw: bytes) -> str:
    return raw.split(b"\r\n", 1)[0].decode()


def _unix_raw(path: str, data: bytes, timeout: float = 3.0) -> bytes:
    with (
        tempfile.TemporaryDirectory(prefix="pydmq-c-") as tmp,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock,
    ):
        sock.bind(os.path.join(tmp, "c.sock"))
        sock.settimeout(timeout)
        sock.sendto(data, path)
        return sock.recv(1 << 20)


def _cli(*args: str, timeout: float = 15.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pydmq", "rpc", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _curl(*args: str, data: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    assert CURL is not None, "curl missing: scripts/test.sh installs it"
    return subprocess.run(
        [CURL, "-sS", "--max-time", "5", *args],
        input=data,
        capture_output=True,
        timeout=10,
        check=False,
    )


def _golden() -> dict[str, Any]:
    return json.loads(GOLDEN_HTTP.read_text(encoding="utf-8"))


def _assert_kamailio_shape(reply: dict[str, Any], request_id: Any) -> None:
    """Same envelope, same keys in the same order and same types as Kamailio's list_nodes, plus
    fail_count (6.1)."""
    golden = _golden()
    assert list(reply) == list(golden) == ["jsonrpc", "result", "id"]
    assert reply["jsonrpc"] == "2.0" and reply["id"] == request_id
    golden_row = golden["result"][0]
    assert isinstance(reply["result"], list) and reply["result"]
    for row in reply["result"]:
        assert list(row) == [*golden_row, "fail_count"]
        for key, value in golden_row.items():
            assert type(row[key]) is type(value), (key, row[key], value)
        assert type(row["fail_count"]) is int


# ---------------------------------------------------------------------------------------------
# reply format


def test_json_layout_reproduces_every_golden_file_byte_for_byte() -> None:
    files = sorted(glob.glob(str(GOLDEN_DIR / "jsonrpc_*.json")))
    assert len(files) >= 6
    for name in files:
        raw = Path(name).read_text(encoding="utf-8")
        # the datagram/fifo captures end with a newline the capture added; HTTP's has none
        assert format_json(json.loads(raw)) == raw.rstrip("\n"), name


def test_json_layout_edge_cases() -> None:
    assert format_json({}) == "{\n}"
    assert format_json({"a": {}}) == '{\n\t"a":\t{\n\t}\n}'
    assert format_json([]) == "[]"
    assert format_json({"a": [1, "x", None, True]}) == '{\n\t"a":\t[1, "x", null, true]\n}'
    assert format_json('é\u0001"\\/') == '"é\\u0001\\"\\\\/"'
    assert format_json("\ud800") == '"\\ud800"'  # a lone surrogate cannot be UTF-8
    with pytest.raises(TypeError):
        format_json({"a": object()})
    with pytest.raises(ValueError):
        format_json(float("nan"))


async def test_list_nodes_over_urllib_has_kamailios_shape_and_layout(rig: Rig) -> None:
    reply = await post(rig.url, rpc_body("dmq.list_nodes", request_id=16935))
    assert (reply.status, reply.reason) == (200, "OK")
    assert reply.headers["content-type"] == "application/json"
    data = reply.json()
    _assert_kamailio_shape(data, 16935)
    assert reply.body.decode() == format_json(data)  # jsonrpcs' tab layout
    rows = data["result"]
    assert rows[-1]["local"] == 1 and rows[-1]["port"] == str(rig.a.local.port)
    remote = [r for r in rows if r["local"] == 0]
    assert [(r["host"], r["port"], r["status"]) for r in remote] == [
        ("127.0.0.1", str(rig.b.local.port), "active")
    ]
    assert rows == rig.a.nodes.rpc_list_nodes()


async def test_list_nodes_over_curl(rig: Rig) -> None:
    body = json.dumps(rpc_body("dmq.list_nodes", request_id="c1")).encode()
    proc = await asyncio.to_thread(
        _curl,
        "-H",
        "Content-Type: application/json",
        "--data-binary",
        "@-",
        "-w",
        "\n%{http_code}",
        rig.url,
        data=body,
    )
    assert proc.returncode == 0, proc.stderr
    text, _, code = proc.stdout.decode().rpartition("\n")
    assert code == "200"
    _assert_kamailio_shape(json.loads(text), "c1")


# ---------------------------------------------------------------------------------------------
# methods


async def test_remove_replies_and_faults_as_kamailio(rig: Rig) -> None:
    b_uri = uri_of(rig.b)
    assert await result_of(rig, "dmq.remove", [b_uri]) == "Ok. DMQ node removed."
    assert node_status(rig.a, rig.b) is None
    assert "removed" in rig.events.kinds(rig.b)  # published at once, not at the next ping
    # no match, the local node (refused), extra parameters (ignored): the same text
    assert await result_of(rig, "dmq.remove", [b_uri]) == "Ok. DMQ node removed."
    assert await result_of(rig, "dmq.remove", [uri_of(rig.a), "x"]) == "Ok. DMQ node removed."
    assert any(r["local"] == 1 for r in await result_of(rig, "dmq.list_nodes"))
    # named parameters
    assert await result_of(rig, "dmq.remove", {"uri": b_uri}) == "Ok. DMQ node removed."

    for params in (None, [], [None], [["sip:127.0.0.1:5060"]], [True], {"url": b_uri}):
        assert await fault_of(rig, "dmq.remove", params) == (500, "Invalid Parameters"), params
    for params in (["sip:[bad"], ["not a uri"], [5]):
        assert await fault_of(rig, "dmq.remove", params) == (500, "Failure"), params


async def test_add_and_change_status(rig: Rig) -> None:
    uri = f"sip:127.0.0.1:{free_port('udp')}"  # nobody listens: its pings time out, harmless
    assert await result_of(rig, "dmq.add", [uri]) == "Ok. DMQ node added."
    assert node_status(rig.a, uri) is NodeStatus.ACTIVE
    assert await fault_of(rig, "dmq.add", [uri]) == (500, "Node is already added")
    assert await fault_of(rig, "dmq.add", []) == (500, "Invalid Parameters")
    assert await fault_of(rig, "dmq.add", ["sip:[bad"]) == (500, "Failure")
    # a host name is resolved without blocking the loop (localhost: /etc/hosts, no DNS needed)
    named = f"sip:localhost:{free_port('udp')}"
    assert await result_of(rig, "dmq.add", [named]) == "Ok. DMQ node added."
    assert next(r for r in await result_of(rig, "dmq.list_nodes") if r["host"] == "localhost")[
        "resolved_ip"
    ] in ("127.0.0.1", "::1")

    b = uri_of(rig.b)
    changed = "Ok. DMQ node status changed."
    assert await result_of(rig, "dmq.change_status", [b, "disabled"]) == changed
    assert node_status(rig.a, rig.b) is NodeStatus.DISABLED
    assert "disabled" in rig.events.kinds(rig.b)
    assert await result_of(rig, "dmq.change_status", {"uri": b, "status": "disabled"}) == (
        "Ok. DMQ node status is already disabled."
    )
    assert await result_of(rig, "dmq.change_status", [b, "active"]) == changed
    assert await fault_of(rig, "dmq.change_status", [b]) == (500, "Invalid Parameters")
    assert await fault_of(rig, "dmq.change_status", [b, "up"]) == (
        500,
        "Invalid Status - use: active, not_active, disabled",
    )
    assert await fault_of(rig, "dmq.change_status", ["sip:127.0.0.9:9", "active"]) == (
        500,
        "Node Not Found",
    )
    assert await fault_of(rig, "dmq.change_status", [uri_of(rig.a), "disabled"]) == (
        500,
        "Node is local",
    )


async def test_core_system_and_stats(rig: Rig) -> None:
    version = await result_of(rig, "core.version")
    assert re.fullmatch(r"pydmq \d+\.\d+\.\d+\S* \(\S+/\S+\) \S+", version), version

    uptime = await result_of(rig, "core.uptime")
    assert list(uptime) == ["now", "up_since", "uptime"]
    ctime = r"\w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4}"
    assert re.fullmatch(ctime, uptime["now"]) and re.fullmatch(ctime, uptime["up_since"])
    assert isinstance(uptime["uptime"], int) and uptime["uptime"] >= 0

    names = await result_of(rig, "system.listMethods")
    assert names == sorted(names)
    assert {
        "dmq.list_nodes",
        "dmq.remove",
        "dmq.add",
        "dmq.change_status",
        "dmq.stats",
        "core.version",
        "core.uptime",
        "system.listMethods",
        "system.methodHelp",
    } <= set(names)
    assert await result_of(rig, "system.methodHelp", ["dmq.remove"]) == "Remove a DMQ node"
    assert await fault_of(rig, "system.methodHelp", ["nope"]) == (400, "command not found")

    stats = await result_of(rig, "dmq.stats")
    assert list(stats) == ["dmq", "workers", "sip", "transport", "transactions", "udp_receivers"]
    assert stats["dmq"]["messages_out"].get(rig.a.channel, 0) >= 1  # the join notification
    assert stats["sip"]["sent"] >= 1 and stats["sip"]["received"] >= 1
    assert "clients_live" in stats["transactions"]
    assert stats["udp_receivers"] is None  # the main process reads UDP (udp_children = 0)


# ---------------------------------------------------------------------------------------------
# bad input


async def test_bad_requests_get_json_rpc_errors_and_the_server_keeps_answering(rig: Rig) -> None:
    async def error(body: bytes | dict[str, Any]) -> tuple[int, dict[str, Any]]:
        reply = await post(rig.url, body)
        data = reply.json()
        assert list(data) == ["jsonrpc", "error", "id"], data
        return reply.status, data

    cases: list[tuple[bytes | dict[str, Any], int, int, Any]] = [
        (b"not json", 400, -32700, None),
        (b"", 400, -32700, None),
        (b"\xff\xfe{", 400, -32700, None),
        (b"[" * 100_00 + b"]" * 100_00, 400, -32700, None),  # too deep for the parser
        (b'[{"jsonrpc":"2.0","method":"core.version","id":1}]', 400, -32600, None),  # batch
        (b'"just a string"', 400, -32600, None),
        ({"method": "core.version", "id": 7}, 400, -32600, 7),  # no "jsonrpc"
        ({"jsonrpc": "1.0", "method": "core.version", "id": 7}, 400, -32600, 7),
        ({"jsonrpc": "2.0", "method": 5, "id": 7}, 400, -32600, 7),
        ({"jsonrpc": "2.0", "id": 7}, 400, -32600, 7),
        ({"jsonrpc": "2.0", "method": "dmq.remove", "params": "sip:x", "id": 7}, 400, -32600, 7),
        ({"jsonrpc": "2.0", "method": "core.version", "id": {"a": 1}}, 400, -32600, None),
        ({"jsonrpc": "2.0", "method": "core.version", "id": True}, 400, -32600, None),
        (b'{"jsonrpc":"2.0","method":"core.version","id":1e400}', 400, -32600, None),
        ({"jsonrpc": "2.0", "method": "core.version", "id": 1.5}, 200, 0, 1.5),
        (rpc_body("no.such.method", request_id="m"), 500, 500, "m"),
    ]
    for body, status, code, request_id in cases:
        if status == 200:
            reply = await post(rig.url, body)
            assert (reply.status, reply.json()["id"]) == (200, request_id)
            continue
        got_status, data = await error(body)
        assert (got_status, data["error"]["code"], data["id"]) == (status, code, request_id), body
    _status, data = await error(rpc_body("no.such.method"))
    assert data["error"]["message"] == "Method Not Found"  # Kamailio's text and code (500)

    # a notification (no id) is answered, without "id", as jsonrpcs does
    reply = await post(rig.url, {"jsonrpc": "2.0", "method": "core.version"})
    assert list(reply.json()) == ["jsonrpc", "result"]

    # HTTP level: wrong method, wrong path, a 1 MB body
    reply = await post(rig.url, None, method="GET")
    assert (reply.status, reply.headers.get("allow")) == (405, "POST")
    assert reply.json()["error"] == {"code": 405, "message": "Method Not Allowed"}
    reply = await post(f"http://{rig.http}/other", rpc_body("core.version"))
    assert reply.status == 404 and reply.json()["error"]["code"] == 404
    reply = await post(rig.url, b"x" * 1_000_000)
    assert reply.status == 413 and reply.json()["error"] == {
        "code": 413,
        "message": "Payload Too Large",
    }
    # a body of exactly the limit is read (and is not JSON)
    reply = await post(rig.url, b" " * (64 * 1024))
    assert reply.status == 400 and reply.json()["error"]["code"] == -32700

    # raw HTTP: broken request line, chunked body, oversized header block
    for raw, expect in (
        (b"GARBAGE\r\n\r\n", "HTTP/1.1 400 Bad Request"),
        (b"POST /RPC HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n", "HTTP/1.1 400 Bad Request"),
        (b"POST /RPC HTTP/1.1\r\nContent-Length: abc\r\n\r\n", "HTTP/1.1 400 Bad Request"),
        (
            b"POST /RPC HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            "HTTP/1.1 411 Length Required",
        ),
        (
            b"POST /RPC HTTP/1.1\r\nX-Big: " + b"a" * 10_000 + b"\r\n\r\n",
            "HTTP/1.1 431 Request Header Fields Too Large",
        ),
    ):
        answer = await asyncio.to_thread(_raw_http, rig.http, raw)
        assert _status_line(answer) == expect, raw[:60]
        assert b'"error":' in answer

    # still serving
    assert await result_of(rig, "core.version")


async def test_curl_bad_input(rig: Rig, tmp_path: Path) -> None:
    big = tmp_path / "big.json"
    big.write_bytes(b"x" * 1_000_000)
    runs = await asyncio.gather(
        asyncio.to_thread(_curl, "--data-binary", f"@{big}", "-w", "\n%{http_code}", rig.url),
        asyncio.to_thread(_curl, "-w", "\n%{http_code}", rig.url),  # a GET
        asyncio.to_thread(_curl, "--data-binary", "{oops", "-w", "\n%{http_code}", rig.url),
    )
    codes = []
    for proc in runs:
        assert proc.returncode == 0, proc.stderr
        text, _, code = proc.stdout.decode().rpartition("\n")
        codes.append((int(code), json.loads(text)["error"]["code"]))
    assert codes == [(413, 413), (405, 405), (400, -32700)]
    proc = await asyncio.to_thread(
        _curl, "--data-binary", json.dumps(rpc_body("core.version")), rig.url
    )
    assert json.loads(proc.stdout)["result"].startswith("pydmq ")


async def test_keep_alive_and_connection_close(rig: Rig) -> None:
    host, port = split_hostport(rig.http)

    def two_on_one_connection() -> list[bytes]:
        import http.client  # noqa: PLC0415

        conn = http.client.HTTPConnection(host, port, timeout=5)
        try:
            out = []
            for i in (1, 2):
                conn.request("POST", "/jsonrpc", body=json.dumps(rpc_body("core.version", None, i)))
                resp = conn.getresponse()
                assert resp.status == 200 and resp.getheader("Connection") is None
                out.append(resp.read())
            return out
        finally:
            conn.close()

    bodies = await asyncio.to_thread(two_on_one_connection)
    assert [json.loads(b)["id"] for b in bodies] == [1, 2]

    body = json.dumps(rpc_body("core.version")).encode()
    head = f"POST /RPC HTTP/1.0\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    answer = await asyncio.to_thread(_raw_http, rig.http, head + body)  # server closes: 1.0
    assert _status_line(answer) == "HTTP/1.1 200 OK"
    assert b"Connection: close" in answer


async def test_http_timeouts_drop_idle_and_slow_clients() -> None:
    server = HttpRpcServer(Dispatcher(_table()), "127.0.0.1", 0, timeout=0.3)
    await server.start()
    try:
        address = "{}:{}".format(*server.address)
        started = time.monotonic()
        partial = b"POST /RPC HTTP/1.1\r\nContent-Length: 100\r\n\r\n{"
        for raw in (b"", b"POST /RPC HTTP/1.1\r\n", partial):
            answer = await asyncio.to_thread(_raw_http, address, raw)
            assert answer == b""  # closed without a reply
        assert time.monotonic() - started < 3
    finally:
        await server.close()


def _table() -> Any:
    from pydmq.rpc.protocol import MethodTable  # noqa: PLC0415

    return MethodTable().add("t.echo", lambda params: params, "echo")


# ---------------------------------------------------------------------------------------------
# unix datagram socket


async def test_unix_socket_mode_calls_and_garbage(rig: Rig) -> None:
    st = os.stat(rig.unix)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600

    nodes = await asyncio.to_thread(client.call, "dmq.list_nodes", unix=rig.unix)
    assert nodes == rig.a.nodes.rpc_list_nodes()
    raw = await asyncio.to_thread(
        _unix_raw, rig.unix, json.dumps(rpc_body("dmq.list_nodes", request_id=9)).encode()
    )
    data = json.loads(raw)
    _assert_kamailio_shape(data, 9)
    assert raw.decode() == format_json(data)  # same bytes as HTTP's body, no newline

    with pytest.raises(RpcFault) as info:
        await asyncio.to_thread(client.call, "dmq.remove", [], unix=rig.unix)
    assert (info.value.code, info.value.message) == (500, "Invalid Parameters")

    for garbage, code in (
        (b"\x00\xffgarbage", -32700),
        (b"{}", -32600),
        (b"x" * 100_000, 413),  # longer than 64 KiB
    ):
        answer = json.loads(await asyncio.to_thread(_unix_raw, rig.unix, garbage))
        assert answer["error"]["code"] == code and answer["id"] is None

    # an unbound sender cannot get a reply; the server must not mind
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as anon:
        anon.sendto(json.dumps(rpc_body("core.version")).encode(), rig.unix)
    assert (await asyncio.to_thread(client.call, "core.version", unix=rig.unix)).startswith("pydmq")


async def test_unix_socket_refuses_live_or_foreign_files(rig: Rig, tmp_path: Path) -> None:
    dispatcher = rig.servers.dispatcher
    with pytest.raises(OSError):  # in use by the running server
        await RpcServers(RpcSettings(http_address=None, unix_socket=rig.unix), dispatcher).start()
    assert os.path.exists(rig.unix)
    regular = tmp_path / "file"
    regular.write_text("keep me")
    with pytest.raises(FileExistsError):
        await RpcServers(
            RpcSettings(http_address=None, unix_socket=str(regular)), dispatcher
        ).start()
    assert regular.read_text() == "keep me"
    # a stale socket file (nobody bound) is replaced, and removed again at close
    stale = tempfile.mkdtemp(prefix="pydmq-st-") + "/s.sock"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as dead:
            dead.bind(stale)
        servers = RpcServers(RpcSettings(http_address="", unix_socket=stale), dispatcher)
        await servers.start()
        assert servers.http is None  # "" disables HTTP
        assert stat.S_IMODE(os.stat(stale).st_mode) == 0o600
        await servers.close()
        assert not os.path.exists(stale)
    finally:
        shutil.rmtree(os.path.dirname(stale), ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# loopback by default


async def test_binds_loopback_by_default(rig: Rig) -> None:
    defaults, _ = settings_from_mapping({}, "test")
    assert defaults.rpc.unix_socket is None
    host, port = split_hostport(defaults.rpc.http_address or "")
    assert ipaddress.ip_address(host).is_loopback and port == 5080
    servers = RpcServers(
        dataclasses.replace(defaults.rpc, http_address=f"{host}:0"), rig.servers.dispatcher
    )
    await servers.start()
    try:
        assert servers.http is not None
        assert ipaddress.ip_address(servers.http.address[0]).is_loopback
    finally:
        await servers.close()
    assert ipaddress.ip_address(split_hostport(rig.http)[0]).is_loopback


# ---------------------------------------------------------------------------------------------
# the command line


async def test_pydmq_rpc_command(rig: Rig) -> None:
    idle = f"127.0.0.1:{free_port('tcp')}"
    table, raw, fault, nothing = await asyncio.gather(
        asyncio.to_thread(_cli, "--http", rig.http, "dmq.list_nodes"),
        asyncio.to_thread(_cli, "--json", "--http", rig.http, "dmq.list_nodes"),
        asyncio.to_thread(_cli, "--http", rig.http, "dmq.remove"),
        asyncio.to_thread(_cli, "--http", idle, "--timeout", "2", "core.version"),
    )
    unix = await asyncio.to_thread(_cli, "--unix", rig.unix, "dmq.remove", uri_of(rig.b))
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == [
        "host",
        "port",
        "proto",
        "resolved_ip",
        "status",
        "last_notification",
        "local",
        "fail_count",
    ]
    assert len(lines) == 1 + 2  # a header and a row per node
    local_row = ["127.0.0.1", str(rig.a.local.port), "*", "127.0.0.1", "active", "0", "1", "0"]
    assert lines[-1].split() == local_row

    assert raw.returncode == 0, raw.stderr
    _assert_kamailio_shape(json.loads(raw.stdout), 1)
    assert raw.stdout.startswith('{\n\t"jsonrpc":\t"2.0",\n')  # as the server sent it

    assert fault.returncode == 1 and fault.stdout == ""
    assert "500 Invalid Parameters" in fault.stderr

    assert unix.returncode == 0, unix.stderr
    assert unix.stdout.strip() == "Ok. DMQ node removed."
    assert node_status(rig.a, rig.b) is None

    assert nothing.returncode == 3 and "no reply" in nothing.stderr


def test_render_for_people() -> None:
    assert render("Ok. DMQ node removed.") == "Ok. DMQ node removed."
    assert render(["a", "b"]) == "a\nb"
    assert render({"now": "x", "n": {"a": 1, "b": [1, 2]}, "e": {}, "z": None}) == (
        "now: x\nn:\n  a: 1\n  b: 1, 2\ne: {}\nz: -"
    )
    assert render([{"host": "h", "port": ""}, {"host": "hh", "port": "1"}]) == (
        "host  port\nh     -\nhh    1"
    )


async def test_pydmq_run_serves_rpc_and_cleans_up(tmp_path: Path) -> None:
    sockdir = tempfile.mkdtemp(prefix="pydmq-run-")
    sock_path = f"{sockdir}/rpc.sock"
    http = f"127.0.0.1:{free_port('tcp')}"
    sip = free_port("both")
    cmd: Sequence[str] = [
        sys.executable,
        "-m",
        "pydmq",
        "run",
        "--server-address",
        f"sip:127.0.0.1:{sip}",
        "--set",
        f"rpc.http_address={http}",
        "--set",
        f"rpc.unix_socket={sock_path}",
        "--set",
        "log.level=WARNING",
        "--duration",
        "20",
    ]
    log_path = tmp_path / "run.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file)
    try:

        def answers() -> Any:
            return client.call("core.version", unix=sock_path, timeout=0.5)

        await asyncio.to_thread(
            wait_until, answers, timeout=10, what="pydmq run's RPC", describe=log_path.read_text
        )
        assert stat.S_IMODE(os.stat(sock_path).st_mode) == 0o600
        rows = await asyncio.to_thread(client.call, "dmq.list_nodes", http=http)
        assert [(r["port"], r["local"]) for r in rows] == [(str(sip), 1)]
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 10) == 0, log_path.read_text()
        assert not os.path.exists(sock_path)
        with pytest.raises(client.RpcClientError):
            client.call("core.version", http=http, timeout=1)
    finally:
        if proc.poll() is None:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        shutil.rmtree(sockdir, ignore_errors=True)


async def test_dispatcher_with_consumer_handlers() -> None:
    async def slow(params: list[object]) -> object:
        """Echo, later."""
        await asyncio.sleep(0)
        return {"got": params}

    def fails(_params: list[object]) -> object:
        raise RpcFault(500, "AOR not found in location table")

    def buggy(_params: list[object]) -> object:
        raise ValueError("bug")

    def unserializable(_params: list[object]) -> object:
        return {"x": object()}

    table = _table().update({"t.slow": slow, "t.fails": fails, "t.buggy": buggy})
    table.update({"t.bad": unserializable})
    method = table.get("t.slow")
    assert method is not None and method.doc == "Echo, later."
    dispatcher = Dispatcher(table)

    async def call(method: str, params: Any = None) -> dict[str, Any]:
        reply = await dispatcher.handle(json.dumps(rpc_body(method, params)).encode())
        data: dict[str, Any] = json.loads(reply.body)
        assert reply.ok == ("result" in data)
        return data

    assert (await call("t.slow", ["a", 1]))["result"] == {"got": ["a", 1]}
    assert (await call("t.fails"))["error"] == {
        "code": 500,
        "message": "AOR not found in location table",
    }
    assert (await call("t.buggy"))["error"] == {"code": -32603, "message": "Internal Error"}
    assert (await call("t.bad"))["error"]["code"] == -32603
    with pytest.raises(ValueError):
        table.add("t.slow", slow, "twice")


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
_requests = st.fixed_dictionaries(
    {},
    optional={
        "jsonrpc": st.sampled_from(["2.0", "1.0"]) | _json_values,
        "method": st.sampled_from(["t.echo", "nope"]) | _json_values,
        "params": _json_values,
        "id": _json_values,
    },
)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200) | _requests.map(lambda r: json.dumps(r).encode()))
def test_dispatcher_always_answers_with_a_json_rpc_reply(data: bytes) -> None:
    reply = asyncio.run(Dispatcher(_table()).handle(data))
    answer = json.loads(reply.body)
    assert answer["jsonrpc"] == "2.0"
    assert ("result" in answer) == reply.ok != ("error" in answer)
