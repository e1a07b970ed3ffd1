"""Glue for tests that put in-process pydmq nodes and real Kamailio processes in one cluster.

pydmq runs in the test's event loop, so nothing here may block that loop: every call into the
(synchronous) Kamailio harness goes through :func:`asyncio.to_thread`, and waiting is done with
:func:`poll` (bounded, runs the check in a thread) or by awaiting pydmq events.

:class:`Cluster` starts nodes of both kinds and stops every one of them at teardown::

    async def test_x(cluster: Cluster) -> None:
        py = await cluster.pydmq(notification_address=[...])
        k1 = await cluster.kamailio("k1", notification_addresses=[py.uri])
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import pytest

from pydmq.config import settings_from_mapping
from pydmq.dmq.api import DmqApi, load_api
from pydmq.dmq.nodelist import MembershipEvent
from pydmq.dmq.peer import PeerResponse
from pydmq.dmq.runtime import DmqNode
from pydmq.sip.message import Request

from .kamailio import KamailioNode, TlsConfig, make_tls_files
from .net import free_port

__all__ = [
    "REPLY_LOG_ROUTE",
    "SCRIPT_SEND_ROUTE",
    "Cluster",
    "LoggedReply",
    "PyNode",
    "TlsFiles",
    "dmq_log_problems",
    "logged_replies",
    "poll",
    "stop_silently",
]

T = TypeVar("T")

#: Goes into ``extra_modules``: log every SIP reply Kamailio receives (replies to its own DMQ
#: requests and to ``tm.t_uac_start`` included; the core runs ``reply_route`` before tm).
REPLY_LOG_ROUTE = (
    "reply_route {\n"
    '\txlog("L_NOTICE", "PYDMQ-REPLY code=$rs reason=$(rr{s.encode.base64})'
    " cseq=$(hdr(CSeq){s.encode.base64}) callid=$(ci{s.encode.base64}) src=$si:$sp proto=$pr"
    " server=$(hdr(Server){s.encode.base64}) ct=$(cT{s.encode.base64})"
    " clen=$(hdr(Content-Length){s.encode.base64}) body=$(rb{s.encode.base64})"
    ' PYDMQ-END\\n");\n'
    "}\n"
)

#: Goes into ``extra_route``: a MESSAGE to user ``dmqsend`` / ``dmqbcast`` makes the script call
#: ``dmq_send_message`` / ``dmq_bcast_message`` with the channel from ``X-Channel``, the node from
#: ``X-Node`` and the MESSAGE body; the reply reason carries the function's return code.
SCRIPT_SEND_ROUTE = r"""
	if (is_method("MESSAGE") && $rU == "dmqsend") {
		dmq_send_message("$hdr(X-Channel)", "$hdr(X-Node)", "$rb", "text/plain");
		$var(rc) = $rc;
		sl_send_reply("200", "rc $var(rc)");
		exit;
	}
	if (is_method("MESSAGE") && $rU == "dmqbcast") {
		dmq_bcast_message("$hdr(X-Channel)", "$rb", "text/plain");
		$var(rc) = $rc;
		sl_send_reply("200", "rc $var(rc)");
		exit;
	}
"""

_REPLY_RE = re.compile(r"PYDMQ-REPLY (.*?) PYDMQ-END")


@dataclass(frozen=True)
class LoggedReply:
    """One reply Kamailio received, as :data:`REPLY_LOG_ROUTE` logged it."""

    code: int
    reason: str
    cseq: str
    call_id: str
    src: str
    proto: str
    server: str | None
    content_type: str | None
    content_length: str | None
    body: bytes


def _b64text(value: str) -> str | None:
    if value == "<null>":
        return None
    return base64.b64decode(value).decode("utf-8", "replace") if value else ""


def logged_replies(node: KamailioNode) -> list[LoggedReply]:
    """Every reply :data:`REPLY_LOG_ROUTE` logged so far, oldest first."""
    out: list[LoggedReply] = []
    for match in _REPLY_RE.finditer(node.log_text()):
        kv = dict(item.split("=", 1) for item in match.group(1).split(" ") if "=" in item)
        body = kv.get("body", "")
        out.append(
            LoggedReply(
                code=int(kv["code"]),
                reason=_b64text(kv.get("reason", "")) or "",
                cseq=_b64text(kv.get("cseq", "")) or "",
                call_id=_b64text(kv.get("callid", "")) or "",
                src=kv.get("src", ""),
                proto=kv.get("proto", ""),
                server=_b64text(kv.get("server", "<null>")),
                content_type=_b64text(kv.get("ct", "<null>")),
                content_length=_b64text(kv.get("clen", "<null>")),
                body=b"" if body in ("", "<null>") else base64.b64decode(body),
            )
        )
    return out


_PROBLEM = re.compile(r"\b(ERROR|WARNING|CRITICAL|ALERT|BUG): (dmq|<core> \[core/parser)")
#: dmq complaints that are about membership, not about what a peer sent.
_BENIGN = (
    "because of failed request",  # a dead node is deleted (408 on a disabled node)
    "not deleting notification peer",  # a dead notification address goes pending
    "notification address",  # the list shrank to ourselves and no seed is configured
)


def dmq_log_problems(node: KamailioNode, *, benign: Iterable[str] = _BENIGN) -> list[str]:
    """Kamailio log lines where dmq, or the core SIP parser, reports an error or warning:
    a notification body it could not parse, a missing Content-Length, an unusable From...
    Messages in ``benign`` (membership changes after a node died) are left out."""
    allowed = tuple(benign)
    return [
        line
        for line in node.log_text().splitlines()
        if _PROBLEM.search(line) and not any(text in line for text in allowed)
    ]


async def poll(
    check: Callable[[], T | Literal[False] | None],
    *,
    timeout: float,
    what: str,
    interval: float = 0.1,
    describe: Callable[[], str] | None = None,
) -> T:
    """Run ``check`` in a thread until it returns something truthy; bounded by ``timeout``.

    The event loop (and with it every pydmq node) keeps running between and during checks.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = await asyncio.to_thread(check)
        except Exception as exc:
            last_exc = exc
            value = None
        if value:
            return value
        if loop.time() >= deadline:
            detail = ""
            if describe is not None:
                with contextlib.suppress(Exception):
                    detail = "\n" + await asyncio.to_thread(describe)
            if last_exc is not None:
                detail += f"\nlast error: {last_exc!r}"
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what}{detail}")
        await asyncio.sleep(interval)


async def stop_silently(node: DmqNode) -> None:
    """End ``node`` the way a crash would: no ``status=disabled`` announcement, sockets closed
    (a second stop of the same node does nothing)."""
    await node.stop(announce=False)


@dataclass
class TlsFiles:
    """One CA; Kamailio's cert/key (as :class:`TlsConfig`) and pydmq's ``[sip]`` settings."""

    kamailio: TlsConfig
    pydmq_sip: dict[str, str]

    @classmethod
    def create(cls, directory: Path) -> TlsFiles:
        kam, ca = make_tls_files(directory)
        leaf = ca.issue_cert("127.0.0.1", "localhost")
        cert = directory / "pydmq-cert.pem"
        key = directory / "pydmq-key.pem"
        cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(str(key))
        sip = {"tls_certfile": str(cert), "tls_keyfile": str(key), "tls_cafile": str(kam.ca_list)}
        return cls(kam, sip)


@dataclass
class PyNode:
    """A started pydmq node, its API, and queues fed by its events and registered channels."""

    node: DmqNode
    api: DmqApi
    uri: str
    port: int
    events: asyncio.Queue[MembershipEvent]
    received: dict[str, asyncio.Queue[Request]] = field(default_factory=dict)

    def listen(self, channel: str, code: int = 200, reason: str = "OK") -> asyncio.Queue[Request]:
        """Register ``channel``; every request on it is queued and answered ``code`` (no body)."""
        queue: asyncio.Queue[Request] = asyncio.Queue()

        def on_message(request: Request, _node: Any) -> PeerResponse:
            queue.put_nowait(request)
            return PeerResponse(code, reason)

        self.api.register_peer(channel, f"test channel {channel}", on_message)
        self.received[channel] = queue
        return queue

    def status_of(self, uri: str) -> str | None:
        """Status of the remote node ``uri`` in this node's list, None when not listed."""
        found = self.api.find_node(uri)
        return None if found is None or found.local else found.status.value

    async def wait_event(
        self, predicate: Callable[[MembershipEvent], bool], *, timeout: float, what: str
    ) -> MembershipEvent:
        """The next membership event that satisfies ``predicate`` (earlier ones are dropped)."""
        seen: list[MembershipEvent] = []
        try:
            async with asyncio.timeout(timeout):
                while True:
                    event = await self.events.get()
                    seen.append(event)
                    if predicate(event):
                        return event
        except TimeoutError:
            raise AssertionError(
                f"no membership event {what} within {timeout}s; saw {seen};"
                f" list: {self.node.nodes.rpc_list_nodes()}"
            ) from None


class Cluster:
    """Starts pydmq nodes (in this loop) and Kamailio nodes (processes); :meth:`close` ends all."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.py_nodes: list[PyNode] = []
        self.kamailios: list[KamailioNode] = []
        self._tls: TlsFiles | None = None

    @property
    def tls(self) -> TlsFiles:
        if self._tls is None:
            self._tls = TlsFiles.create(self.workdir / "tls")
        return self._tls

    async def pydmq(
        self,
        *,
        transport: str = "udp",
        notification_address: Iterable[str] = (),
        ping_interval: int = 60,
        fr_timer: float = 30.0,
        channels: Mapping[str, int] | None = None,
    ) -> PyNode:
        if transport not in ("udp", "tcp", "tls"):
            raise ValueError(f"unknown transport {transport!r}")
        port = free_port("both")
        uri = f"sip:127.0.0.1:{port}" + ("" if transport == "udp" else f";transport={transport}")
        config: dict[str, dict[str, Any]] = {
            "dmq": {
                "server_address": uri,
                "notification_address": list(notification_address),
                "ping_interval": ping_interval,
            },
            "tm": {"fr_timer": fr_timer},
        }
        if transport == "tls":
            config["sip"] = dict(self.tls.pydmq_sip)
        settings, _warnings = settings_from_mapping(config, "test")
        node = DmqNode(settings)
        events: asyncio.Queue[MembershipEvent] = asyncio.Queue()
        node.events.subscribe(events.put_nowait)
        py = PyNode(node, load_api(node), uri, port, events)
        for channel, code in (channels or {}).items():
            py.listen(channel, code)
        self.py_nodes.append(py)
        await node.start()
        return py

    async def kamailio(self, name: str, **kwargs: Any) -> KamailioNode:
        """Start a Kamailio node (in a thread, so running pydmq nodes keep answering)."""
        if kwargs.get("dmq_transport") == "tls":
            kwargs.setdefault("tls", self.tls.kamailio)
        node = KamailioNode(self.workdir / name, name=name, **kwargs)
        self.kamailios.append(node)
        await asyncio.to_thread(node.start)
        return node

    async def close(self) -> None:
        errors: list[BaseException] = []
        for py in self.py_nodes:
            try:
                await stop_silently(py.node)
            except Exception as exc:
                errors.append(exc)
        for kam in self.kamailios:
            try:
                await asyncio.to_thread(kam.stop)
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]


@pytest.fixture(name="cluster")
async def interop_cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    """The ``cluster`` fixture of the Kamailio interop modules (they import it): pydmq nodes in
    this loop and Kamailio processes, every one stopped at the end."""
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        await c.close()
