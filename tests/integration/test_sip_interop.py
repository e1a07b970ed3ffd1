"""Foundation acceptance: pydmq and a real Kamailio 5.6.3 exchange requests and replies over UDP,
TCP and TLS, and each side accepts what the other puts on the wire.

Per transport, one pydmq node (in this event loop) is the seed of one Kamailio node:

* Kamailio's join request (KDMQ ``notification_peer``, Max-Forwards 2) gets pydmq's ``200 OK``
  with a node list. Kamailio 5.6.3 keeps a notification address ``pending`` until a 200 from it
  arrives and merges the reply body, so pydmq showing up ``active`` proves both;
* pydmq's KDMQ to a channel Kamailio does not know gets Kamailio's ``404 User Not Found``;
* Kamailio-originated OPTIONS and KDMQ (``tm.t_uac_start`` over RPC) and a script-level
  ``dmq_send_message`` reach pydmq, and pydmq's replies reach Kamailio. Kamailio logs every reply
  it receives (a ``reply_route`` in the generated config), so the test reads code, reason,
  transport and headers as Kamailio parsed them.

Needs the Debian packages kamailio and kamailio-tls-modules; fails (never skips) without them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from tests.support.interop import (
    REPLY_LOG_ROUTE,
    SCRIPT_SEND_ROUTE,
    Cluster,
    LoggedReply,
    dmq_log_problems,
    interop_cluster,  # noqa: F401 - the ``cluster`` fixture
    logged_replies,
    poll,
)
from tests.support.kamailio import KamailioNode
from tests.support.net import build_request, udp_request

pytestmark = [pytest.mark.kamailio, pytest.mark.timeout(60)]

TRANSPORTS = ["udp", "tcp", "tls"]


def _suffix(transport: str) -> str:
    return "" if transport == "udp" else f";transport={transport}"


async def _reply(
    k: KamailioNode, what: str, match: Callable[[LoggedReply], object], *, timeout: float = 10.0
) -> LoggedReply:
    """The first reply Kamailio logged for which ``match(reply)`` is true."""

    def find() -> LoggedReply | None:
        for reply in logged_replies(k):
            if match(reply):
                return reply
        return None

    return await poll(
        find,
        timeout=timeout,
        what=f"Kamailio to receive {what}",
        describe=lambda: "\n".join(map(repr, logged_replies(k))) + "\n" + k.log_tail(20),
    )


async def _script_send(
    k: KamailioNode, user: str, headers: list[tuple[str, str]], body: str
) -> str:
    """Make Kamailio's script run dmq_send_message/dmq_bcast_message; returns its reply reason."""
    uri = f"sip:{user}@{k.host}:{k.port}"

    def build(local: tuple[str, int]) -> bytes:
        hdrs = [*headers, ("Content-Type", "text/plain")]
        return build_request("MESSAGE", uri, local=local, headers=hdrs, body=body)

    reply = await poll(
        lambda: udp_request(k.host, k.port, build, timeout=3.0),
        timeout=5.0,
        what=f"a reply to MESSAGE {uri}",
    )
    assert reply.code == 200, reply
    return reply.reason


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_requests_and_replies_both_ways(cluster: Cluster, transport: str) -> None:
    suffix = _suffix(transport)
    py = await cluster.pydmq(transport=transport)
    app = py.listen("pyapp")
    k = await cluster.kamailio(
        f"k-{transport}",
        dmq_transport=transport,
        notification_addresses=[py.uri],
        extra_modules=REPLY_LOG_ROUTE,
        extra_route=SCRIPT_SEND_ROUTE,
    )
    k_line = f"sip:127.0.0.1:{k.sip_port}{suffix};status=active"
    py_line = f"sip:127.0.0.1:{py.port}{suffix};status=active"

    # -- Kamailio joins the pydmq seed: its notification KDMQ gets pydmq's 200 + node list ----
    await poll(
        lambda: k.peer_status("127.0.0.1", py.port) == "active",
        timeout=10,
        what=f"pydmq {py.uri} active in Kamailio's dmq.list_nodes",
        describe=lambda: repr(k.list_nodes()),
    )
    entry = next(n for n in await asyncio.to_thread(k.list_nodes) if not n["local"])
    assert (entry["host"], entry["port"], entry["proto"]) == (
        "127.0.0.1",
        str(py.port),
        transport if transport != "udp" else "*",
    )
    join = await _reply(
        k,
        "pydmq's 200 to its notification request",
        lambda r: r.cseq == "10 KDMQ" and r.code == 200 and r.body,
    )
    assert join.reason == "OK"
    assert join.proto == transport
    assert join.src == f"127.0.0.1:{py.port}"
    assert join.server == "pydmq"
    assert join.content_type == "text/plain"
    assert join.content_length == str(len(join.body))
    assert join.body.endswith(b"\r\n")
    lines = join.body.decode().split("\r\n")
    assert lines[-1] == ""  # every line, the last one included, ends in CRLF
    assert sorted(lines[:-1]) == sorted([k_line, py_line])
    # pydmq learnt Kamailio from the request body ...
    assert py.status_of(k.uri) == "active"
    # ... and, since that was news and Max-Forwards was 2, re-broadcast its list with MF 1
    # (to the sender too); Kamailio took the request as coming from the node pydmq advertises.
    fanout = (
        await poll(
            lambda: k.received("kdmq", "notification_peer"),
            timeout=5,
            what="pydmq's re-broadcast to reach Kamailio",
        )
    )[0]
    assert fanout.proto == transport
    assert fanout.from_uri == f"sip:notification_peer@127.0.0.1:{py.port}{suffix}"
    assert (fanout.max_forwards, fanout.content_type) == ("1", "text/plain")
    assert fanout.body == join.body

    # -- pydmq -> Kamailio: KDMQ on a channel Kamailio does not know ------------------------
    k_node = py.api.find_node(k.uri)
    assert k_node is not None
    (delivery,) = await py.api.send_message("nochannel", "hello\r\n", k_node)
    assert delivery.status == 404
    assert delivery.response is not None
    assert delivery.response.reason == "User Not Found"
    assert (delivery.response.get("Server") or "").startswith("kamailio (5.6")
    seen = k.received("kdmq", "nochannel")[0]
    assert seen.proto == transport
    assert seen.from_uri == f"sip:nochannel@127.0.0.1:{py.port}{suffix}"
    assert (seen.max_forwards, seen.content_type, seen.body) == ("1", "text/plain", b"hello\r\n")

    # -- Kamailio -> pydmq: OPTIONS and KDMQ originated by Kamailio's tm ---------------------
    target = f"127.0.0.1:{py.port}{suffix}"
    headers = f"From: <sip:kamailio@127.0.0.1:{k.sip_port}>;tag=interop\r\n"
    await asyncio.to_thread(
        k.rpc_result, "tm.t_uac_start", "OPTIONS", f"sip:{target}", ".", ".",
        headers + f"To: <sip:{target}>\r\n",
    )  # fmt: skip
    options = await _reply(k, "pydmq's reply to OPTIONS", lambda r: r.cseq.endswith(" OPTIONS"))
    assert (options.code, options.reason, options.proto) == (200, "OK", transport)
    assert options.server == "pydmq"
    assert (options.content_length, options.body) == ("0", b"")

    await asyncio.to_thread(
        k.rpc_result, "tm.t_uac_start", "KDMQ", f"sip:nochannel@{target}", ".", ".",
        headers + f"To: <sip:nochannel@{target}>\r\nMax-Forwards: 1\r\n",
    )  # fmt: skip
    unknown = await _reply(k, "pydmq's 404 to KDMQ nochannel", lambda r: r.code == 404)
    assert (unknown.reason, unknown.proto, unknown.cseq) == ("User Not Found", transport, "10 KDMQ")
    assert (unknown.content_length, unknown.body) == ("0", b"")

    # -- Kamailio's script: dmq_send_message to pydmq's channel -----------------------------
    reason = await _script_send(
        k, "dmqsend", [("X-Channel", "pyapp"), ("X-Node", py.uri)], f"over {transport}\r\n"
    )
    assert reason == "rc 1"
    request = await asyncio.wait_for(app.get(), 10)
    assert request.body == f"over {transport}\r\n".encode()
    assert request.max_forwards == 1
    assert request.content_type == "text/plain"
    assert str(request.from_.uri) == f"sip:pyapp@127.0.0.1:{k.sip_port}{suffix}"
    assert py.node.sender_node(request) is not None  # identified by its From URI
    answer = await _reply(
        k, "pydmq's 200 to the script's KDMQ", lambda r: r.call_id == request.call_id
    )
    # a reply to a script-level send must carry no body: Kamailio parses any 200 body as a list
    assert (answer.code, answer.reason, answer.proto) == (200, "OK", transport)
    assert (answer.content_length, answer.body) == ("0", b"")

    # The node stays active on both sides, and Kamailio's dmq module had nothing to complain about.
    assert await asyncio.to_thread(k.peer_status, "127.0.0.1", py.port) == "active"
    assert py.status_of(k.uri) == "active"
    assert dmq_log_problems(k) == []
