"""``dmq_t_replicate`` across a mixed cluster: pydmq A and B and a real Kamailio 5.6.3 node K.

Each node has its own loopback address, so the loop test (source IP against every non-local
node's resolved IP) can tell a SIP client from a node: sipp sends from 127.0.0.1, A listens on
127.0.0.2, B on 127.0.0.3, K on 127.0.0.4. All three join through K.

* A's script (a file, loaded as ``pydmq run --script`` does) calls ``dmq_t_replicate()`` for a
  REGISTER; B's calls it too and counts. sipp's REGISTER reaches K and B exactly once each, the
  replies are absorbed at A (sipp gets A's own 200), and B's replicate is stopped by the loop
  test: no ping-pong.
* The docs' example: ``if (dmq_is_from_node()) { save } else { dmq_t_replicate("1") }`` on all
  three nodes (Kamailio cfg on K, the same Python on A and B). A REGISTER sent to A, then one
  sent to K, reach every node exactly once, replicated only by the node the client chose.

Needs the Debian packages kamailio and sip-tester (sipp); fails (never skips) without them.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pydmq.config import settings_from_mapping
from pydmq.dmq.node import node_key
from pydmq.dmq.runtime import DmqNode
from pydmq.script import Msg, ScriptRoute, load_route
from tests.support.cluster import eventually, wait_for_condition
from tests.support.interop import dmq_log_problems, poll
from tests.support.kamailio import KamailioNode
from tests.support.net import free_port
from tests.support.sipp import SippResult, sipp_request

pytestmark = [pytest.mark.kamailio, pytest.mark.timeout(60)]

A_IP, B_IP, K_IP = "127.0.0.2", "127.0.0.3", "127.0.0.4"

#: A's routing script: replicate every REGISTER, answer it, remember what was seen.
REPLICATING_SCRIPT = """\
seen = []  # (call-id, source ip, dmq_t_replicate's return value)
msgs = []

def request_route(msg):
    if msg.method == "KDMQ":
        msg.dmq_handle_message()
        return
    if msg.method == "OPTIONS":
        msg.reply(200, "OK")
        return
    if msg.method == "REGISTER":
        rc = msg.dmq_t_replicate()
        seen.append((msg.call_id, msg.source_ip, rc))
        msgs.append(msg)
        msg.reply(200, f"Saved rc {rc}")
        return
    msg.reply(404, "Not Found")
"""

#: The docs' example (kamailio-dmq-module.txt, 4.6) as a pydmq script.
DOCS_EXAMPLE_SCRIPT = """\
seen = []  # (call-id, "from_node" or "from_client")
msgs = []

def request_route(msg):
    if msg.method == "KDMQ":
        msg.dmq_handle_message()
        return
    if msg.method == "OPTIONS":
        msg.reply(200, "OK")
        return
    if msg.method == "REGISTER":
        if msg.dmq_is_from_node() > 0:
            # coming from a DMQ node - already authenticated there: just save
            seen.append((msg.call_id, "from_node"))
        else:
            # coming from an end point - authenticate, save, replicate
            seen.append((msg.call_id, "from_client"))
            msg.dmq_t_replicate(1)  # source address checked: skip the loop test
        msgs.append(msg)
        msg.reply(200, "Saved")
        return
    msg.reply(404, "Not Found")
"""

#: The same example in Kamailio's cfg (goes first in request_route, after the harness's
#: REGISTER marker). Kamailio 5.6.3 cannot run ``dmq_t_replicate("1")`` as documented: the
#: one-argument form is registered with ``fixup_spve_null`` but read with ``get_int_fparam``,
#: which fails ("Unsupported param type for int value", "failed to get parameter value") and
#: returns -1 without replicating, for "1" and 1 alike. So K calls it without the argument; the
#: loop test it then runs is redundant after ``dmq_is_from_node()``, and harmless. And since
#: its 0 ("replicated") ends a native script, the reply (``save()``'s) has to go out first.
DOCS_EXAMPLE_CFG = r"""
	if (is_method("REGISTER")) {
		if (dmq_is_from_node()) {
			xlog("L_NOTICE", "PYDMQ-REG from_node callid=$ci src=$si\n");
			sl_send_reply("200", "Saved");
		} else {
			xlog("L_NOTICE", "PYDMQ-REG from_client callid=$ci src=$si\n");
			sl_send_reply("200", "Saved");
			dmq_t_replicate();
		}
		exit;
	}
"""
_REG_RE = re.compile(r"PYDMQ-REG (\w+) callid=(\S+) src=(\S+)")


@dataclass
class Mixed:
    """K, A and B, started in that order; :meth:`close` stops them all."""

    workdir: Path
    kamailio: KamailioNode | None = None
    pydmq: list[DmqNode] = field(default_factory=list)

    async def start_kamailio(self, **kwargs: Any) -> KamailioNode:
        k = KamailioNode(
            self.workdir / "k", name="k", host=K_IP, record_methods=["REGISTER"], **kwargs
        )
        self.kamailio = k
        await asyncio.to_thread(k.start)
        return k

    async def start_pydmq(self, ip: str, route: ScriptRoute) -> DmqNode:
        assert self.kamailio is not None
        settings, _ = settings_from_mapping(
            {
                "dmq": {
                    "server_address": f"sip:{ip}:{free_port('both', ip)}",
                    "notification_address": [self.kamailio.uri],
                    "ping_interval": 60,
                },
                # Kamailio answers within milliseconds: no retransmission reaches it
                "tm": {"fr_timer": 3.0},
            },
            "test",
        )
        node = DmqNode(settings, route=route)
        self.pydmq.append(node)
        await node.start()
        return node

    async def close(self) -> None:
        for node in self.pydmq:
            await node.stop(announce=False)
        if self.kamailio is not None:
            await asyncio.to_thread(self.kamailio.stop)


@pytest.fixture
async def mixed(tmp_path: Path) -> AsyncIterator[Mixed]:
    m = Mixed(tmp_path)
    try:
        yield m
    finally:
        await m.close()


def script(tmp_path: Path, name: str, text: str) -> ScriptRoute:
    path = tmp_path / name
    path.write_text(text)
    return load_route(path)


async def wait_full_mesh(k: KamailioNode, a: DmqNode, b: DmqNode) -> None:
    """K lists A and B active; A and B list each other and K active."""
    uris = {n: n.local.orig_uri for n in (a, b)}

    def active_keys(node: DmqNode) -> set[tuple[str, str, str]]:
        return {n.key for n in node.nodes.active_remote()}

    want_a = {node_key(k.uri), b.local.key}
    want_b = {node_key(k.uri), a.local.key}
    await wait_for_condition(
        [a, b],
        lambda: want_a <= active_keys(a) and want_b <= active_keys(b),
        timeout=10,
        what=f"A and B to see each other and K: {[n.nodes.rpc_list_nodes() for n in (a, b)]}",
    )

    def k_sees_both() -> bool:
        listed = {
            f"sip:{n['host']}:{n['port']}"
            for n in k.list_nodes()
            if not n["local"] and n["status"] == "active"
        }
        return set(uris.values()) <= listed

    await poll(k_sees_both, timeout=10, what="K to list A and B active", describe=k.log_tail)


async def register(tmp_path: Path, ip: str, port: int, expect_reason: str) -> SippResult:
    """One REGISTER from sipp (127.0.0.1) to ip:port; must get 200 ``expect_reason``."""
    res = await asyncio.to_thread(
        sipp_request,
        ip,
        port,
        "REGISTER",
        user="alice",
        headers=[("Contact", "<sip:alice@127.0.0.1:5099>"), ("Expires", "300")],
        expect_code=200,
        expect_reason=expect_reason,
        workdir=tmp_path / "sipp",
    )
    assert res.ok, res.explain()
    assert res.responses == [f"SIP/2.0 200 {expect_reason}"], res.explain()  # nothing relayed
    return res


def call_id_of(res: SippResult) -> str:
    match = re.search(r"^Call-ID:\s*(\S+)", res.messages, re.M | re.I)
    assert match, res.messages
    return match.group(1)


async def replicated(msgs: list[Msg], count: int) -> list[tuple[int, Any]]:
    """The outcomes of every replication the script's messages started (waits for them)."""
    futures = [f for m in msgs for f in m.replications]
    assert len(futures) == count, futures
    return list(await asyncio.wait_for(asyncio.gather(*futures), 5))


async def test_register_replicated_to_kamailio_and_pydmq_exactly_once(
    mixed: Mixed, tmp_path: Path
) -> None:
    k = await mixed.start_kamailio()
    a_route = script(tmp_path, "a_route.py", REPLICATING_SCRIPT)
    b_seen: list[tuple[str, str, int]] = []
    b_msgs: list[Msg] = []

    def b_route(msg: Msg) -> None:  # B replicates too: the loop test must stop it
        if msg.method == "KDMQ":
            msg.dmq_handle_message()
        elif msg.method == "REGISTER":
            rc = msg.dmq_t_replicate()
            b_seen.append((msg.call_id, msg.source_ip, rc))
            b_msgs.append(msg)
            msg.reply(200, f"B rc {rc}")
        elif msg.method == "OPTIONS":
            msg.reply(200, "OK")
        else:
            msg.reply(404, "Not Found")

    a = await mixed.start_pydmq(A_IP, a_route)
    b = await mixed.start_pydmq(B_IP, ScriptRoute(b_route))
    await wait_full_mesh(k, a, b)

    res = await register(tmp_path, A_IP, a.local.port or 0, "Saved rc 0")
    call_id = call_id_of(res)
    assert a_route.module is not None
    assert a_route.module.seen == [(call_id, "127.0.0.1", 0)]
    outcomes = await replicated(a_route.module.msgs, 2)
    # both answered A (and only A): K with the harness's 200 OK, B with its own
    assert sorted((status, resp.reason) for status, resp in outcomes) == [
        (200, "B rc -1"),
        (200, "OK"),
    ]
    # exactly once each; B's own dmq_t_replicate() saw A's IP and did nothing
    assert b_seen == [(call_id, A_IP, -1)]
    assert b_msgs[0].replications == []
    regs = k.requests("REGISTER")
    assert [(m.call_id, m.src.split(":")[0], m.channel) for m in regs] == [(call_id, A_IP, "alice")]
    # unchanged on the way: Max-Forwards as sipp sent it (70), the body (none)
    assert (regs[0].max_forwards, regs[0].body) == ("70", b"")
    # and nothing came back to A
    assert len(a_route.module.seen) == 1
    assert dmq_log_problems(k) == []


async def test_docs_example_is_from_node_then_t_replicate_skip(
    mixed: Mixed, tmp_path: Path
) -> None:
    k = await mixed.start_kamailio(extra_route=DOCS_EXAMPLE_CFG)
    a_route = script(tmp_path, "a_route.py", DOCS_EXAMPLE_SCRIPT)
    b_route = script(tmp_path, "b_route.py", DOCS_EXAMPLE_SCRIPT)
    a = await mixed.start_pydmq(A_IP, a_route)
    b = await mixed.start_pydmq(B_IP, b_route)
    await wait_full_mesh(k, a, b)
    assert a_route.module is not None and b_route.module is not None
    a_mod, b_mod = a_route.module, b_route.module

    def k_regs() -> list[tuple[str, str, str]]:
        return _REG_RE.findall(k.log_text())

    # 1. the client registers at A: A replicates (loop test skipped), B and K just save
    res = await register(tmp_path, A_IP, a.local.port or 0, "Saved")
    first = call_id_of(res)
    outcomes = await replicated(a_mod.msgs, 2)
    assert sorted(status for status, _ in outcomes) == [200, 200]
    assert a_mod.seen == [(first, "from_client")]
    assert b_mod.seen == [(first, "from_node")]
    assert k_regs() == [("from_node", first, A_IP)]

    # 2. the client registers at K: K replicates to A and B, which just save
    res = await register(tmp_path, K_IP, k.port, "Saved")
    second = call_id_of(res)
    # nothing announces a script's list: poll it
    await eventually(
        lambda: len(a_mod.seen) == 2 and len(b_mod.seen) == 2,
        timeout=5,
        what=f"A and B saved: {a_mod.seen} {b_mod.seen}\n{k.log_tail(30)}",
    )
    assert a_mod.seen[1] == (second, "from_node")
    assert b_mod.seen[1] == (second, "from_node")
    assert [m.replications for m in (a_mod.msgs[1], b_mod.msgs[0], b_mod.msgs[1])] == [[], [], []]
    assert k_regs() == [("from_node", first, A_IP), ("from_client", second, "127.0.0.1")]
    # every node got each REGISTER exactly once (the harness marker logs every arrival at K)
    assert [m.call_id for m in k.requests("REGISTER")] == [first, second]
    assert [s[0] for s in a_mod.seen] == [first, second]
    assert [s[0] for s in b_mod.seen] == [first, second]
    assert dmq_log_problems(k) == []
