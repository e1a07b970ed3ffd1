"""htable over DMQ, end to end on 127.0.0.1.

pydmq only (in-process nodes, real UDP):

* every kind of change (string, integer, increment, delete, expiry, regex and prefix removal)
  made on one node shows up on the others, and changes on a receiving node go back;
* a node joining late gets a 100,000-cell table complete (same count, same checksum) in bounded
  groups with a bounded number of requests in flight, and says so in its log.

Mixed with real Kamailio 5.6.3 nodes (``KamailioNode(htable=True)``, changes through its RPC and
script, state read back with ``htable.get`` / ``htable.dump``):

* a pydmq node joining a Kamailio node late receives its table (Kamailio's 60 KB groups);
* a string, an integer, an increment, a delete, an expiry and regex / prefix removals made on
  Kamailio show up on pydmq, and the same made on pydmq show up on Kamailio;
* a Kamailio node joining a pydmq node late receives pydmq's table (pydmq's small groups);
* Kamailio logs no htable or DMQ error about anything pydmq sent.

Waiting is bounded polling (no fixed sleeps). Needs the Debian kamailio package for the mixed
tests; they fail (never skip) without it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import sys
import time
from asyncio.subprocess import PIPE
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import pytest

from pydmq.config import RpcSettings, settings_from_mapping
from pydmq.consumers.htable import HtableService, attach
from pydmq.consumers.htable_rpc import rpc_methods
from pydmq.dmq.runtime import DmqNode
from pydmq.rpc.server import start_rpc
from tests.support.interop import (
    Cluster,
    dmq_log_problems,
    interop_cluster,  # noqa: F401 - the ``cluster`` fixture
    poll,
)
from tests.support.kamailio import KamailioNode
from tests.support.net import build_request, free_port, udp_request

pytestmark = pytest.mark.timeout(60)

T = "t=>size=8;autoexpire=0;dmqreplicate=1"
E = "e=>size=4;autoexpire=60;dmqreplicate=1"
FAST_TM = {"t1": 0.05, "t2": 0.2, "t4": 0.2, "fr_timer": 2.0}
BIG = 100_000

#: MESSAGE sip:ht@kamailio with X-Op (and X-Arg / X-Count): script-level htable operations,
#: the way a Kamailio routing script changes tables (these replicate like $sht assignments).
HT_ROUTE = r"""
	if (is_method("MESSAGE") && $rU == "ht") {
		$var(op) = $hdr(X-Op);
		if ($var(op) == "fill") {
			$var(i) = 0;
			while ($var(i) < $(hdr(X-Count){s.int})) {
				$sht(t=>kam-$var(i)) = "kv-" + $var(i);
				$var(i) = $var(i) + 1;
			}
		} else if ($var(op) == "inc") {
			$var(x) = $shtinc(t=>$hdr(X-Arg));
		} else if ($var(op) == "rmre") {
			sht_rm_name_re("t=>$hdr(X-Arg)");
		} else if ($var(op) == "rmvaluesw") {
			sht_rm_value("t", "sw", "$hdr(X-Arg)");
		}
		sl_send_reply("200", "done $var(op)");
		exit;
	}
"""


class PyCluster:
    """In-process pydmq nodes with htable; :meth:`close` stops them all."""

    def __init__(self) -> None:
        self.nodes: list[tuple[DmqNode, HtableService]] = []

    async def start(
        self,
        *,
        seeds: Iterable[str] = (),
        tables: Iterable[str] = (T, E),
        clock: Callable[[], float] = time.time,
        tm: dict[str, float] | None = None,
        transport: str = "udp",
        **htable: Any,
    ) -> tuple[DmqNode, HtableService]:
        port = free_port("both")
        suffix = "" if transport == "udp" else f";transport={transport}"
        settings, _warnings = settings_from_mapping(
            {
                "dmq": {
                    "server_address": f"sip:127.0.0.1:{port}{suffix}",
                    "notification_address": list(seeds),
                    "ping_interval": 5,
                },
                "tm": tm if tm is not None else FAST_TM,
                "htable": {
                    "tables": list(tables),
                    "enable_dmq": True,
                    "dmq_init_sync": True,
                    **htable,
                },
            },
            "test",
        )
        node = DmqNode(settings)
        service = attach(node, clock=clock)
        self.nodes.append((node, service))
        await node.start()
        return node, service

    async def close(self) -> None:
        for node, service in reversed(self.nodes):
            await service.close()
            await node.stop(announce=False)


@pytest.fixture
async def py() -> AsyncIterator[PyCluster]:
    cluster = PyCluster()
    try:
        yield cluster
    finally:
        await cluster.close()


async def until(check: Callable[[], object], *, timeout: float = 10.0, what: str) -> None:
    """Poll an in-process condition (the event loop runs between checks)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


def uri(node: DmqNode) -> str:
    return node.local.orig_uri


def table_state(service: HtableService, table: str) -> dict[str, Any]:
    return dict(service.items(table))


def checksum(items: Iterable[tuple[str, Any]]) -> str:
    digest = hashlib.sha256()
    for name, value in sorted(items, key=lambda kv: kv[0]):
        digest.update(f"{name}\0{type(value).__name__}\0{value}\n".encode())
    return digest.hexdigest()


# ---- pydmq <-> pydmq ------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


async def test_every_change_replicates_between_pydmq_nodes(py: PyCluster) -> None:
    clock = FakeClock()
    a_node, a = await py.start(clock=clock)
    b_node, b = await py.start(seeds=[uri(a_node)], clock=clock)
    c_node, c = await py.start(seeds=[uri(a_node)], clock=clock)
    nodes = (a_node, b_node, c_node)
    await until(lambda: all(len(n.nodes.active_remote()) == 2 for n in nodes), what="a full mesh")
    peers = (b, c)

    def everywhere(check: Callable[[HtableService], bool]) -> Callable[[], bool]:
        return lambda: all(check(s) for s in peers)

    a.set("t", "str", 'quote " backslash \\ tab \t é')
    a.set("t", "int", 41)
    assert a.incr("t", "int") == 42
    await until(everywhere(lambda s: table_state(s, "t") == table_state(a, "t")), what="set")
    assert table_state(b, "t") == {"str": 'quote " backslash \\ tab \t é', "int": 42}

    a.delete("t", "int")
    await until(everywhere(lambda s: s.get("t", "int") is None), what="delete")

    # expiry: the absolute time travels in SET_CELL_EXPIRE as seconds from now
    a.set("e", "short", "v", expire=30)
    a.set("e", "long", "v")
    expected = int(clock.now) + 30
    await until(
        everywhere(lambda s: (cell := s.get_cell("e", "short")) is not None
                   and cell.expire == expected),
        what="expiry",
    )  # fmt: skip
    clock.now += 31
    for s in (a, *peers):
        assert s.get("e", "short") is None  # expired everywhere, nothing had to be sent
        assert s.sweep() == 1
        assert s.get("e", "long") == "v"

    # removals by regex and by prefix, on names and on values
    for name in ("tmp-1", "TMP-2", "keep", "val-a", "val-b"):
        a.set("t", name, "drop-me" if name.startswith("val") else "x")
    await until(everywhere(lambda s: len(s.items("t")) == 6), what="removal setup")
    assert a.remove("t", "^tmp-", op="re", on="name") == 2
    assert a.remove("t", "drop", op="sw", on="value") == 2
    await until(everywhere(lambda s: set(table_state(s, "t")) == {"str", "keep"}), what="removals")

    # a receiving node's own change goes back to the others; received changes never echo
    sent_before = a.stats.replicated
    b.set("t", "from-b", 7)
    await until(lambda: a.get("t", "from-b") == 7 and c.get("t", "from-b") == 7, what="from b")
    assert a.stats.replicated == sent_before
    assert b.stats.replicated == 1 and c.stats.replicated == 0
    for s in (a, b, c):
        assert s.stats.received_bad == s.stats.received_error == 0


async def test_late_joiner_gets_100k_cells(
    py: PyCluster, caplog: pytest.LogCaptureFixture, record_property: Callable[[str, object], None]
) -> None:
    caplog.set_level(logging.INFO, logger="pydmq.consumers.htable")
    a_node, a = await py.start()
    for i in range(BIG):
        value: str | int = f"value-{i}-\u00e9" if i % 2 else i
        a.store.set("t", f"key-{i:06d}", value)  # loaded locally, as a DB load would be
    a.set("e", "expiring", "x", expire=40)
    want_count, want_sum = len(a.items("t")), checksum(a.items("t"))

    loop = asyncio.get_running_loop()
    started = loop.time()
    _b_node, b = await py.start(seeds=[uri(a_node)])
    await until(lambda: a.stats.syncs_completed >= 1, timeout=40, what="the sync to finish")
    elapsed = loop.time() - started
    record_property("htable_100k_sync_seconds", round(elapsed, 2))
    print(f"\n100,000-cell sync over UDP took {elapsed:.2f} s")

    (result,) = [r for r in a.sync_results if r.cells_total > 0]
    assert result.ok and result.cells_sent == BIG + 1
    assert 1 < result.max_in_flight <= a.settings.sync_window
    assert len(b.items("t")) == want_count == BIG
    assert checksum(b.items("t")) == want_sum
    assert b.get_cell("e", "expiring").expire == a.get_cell("e", "expiring").expire  # type: ignore[union-attr]
    # bounded groups: every one fits the UDP budget, so the count follows from the size
    assert result.groups_sent > (BIG * 40) // a.settings.sync_group_bytes_udp
    assert b.stats.received_bad == 0
    # progress is visible on both sides
    lines = [r.getMessage() for r in caplog.records]
    assert any("/100001 cells" in line for line in lines)  # sender progress
    assert any("sync from" in line and "complete: 100001 cells" in line for line in lines)


async def test_bad_input_over_the_wire(py: PyCluster) -> None:
    """Kamailio's answers (capture 13: ``400 Bad Request``), nothing applied, node unharmed."""
    node, p = await py.start()
    p.set("t", "keep", "me")
    port = node.local.port
    assert port is not None

    async def send(body: bytes) -> tuple[int, str]:
        def build(local: tuple[str, int]) -> bytes:
            return build_request(
                "KDMQ",
                f"sip:htable@127.0.0.1:{port}",
                local=local,
                from_uri=f"sip:htable@127.0.0.1:{local[1]}",
                headers=[("Content-Type", "application/json")],
                body=body,
                max_forwards=1,
            )

        reply = await asyncio.to_thread(udp_request, "127.0.0.1", port, build, timeout=5.0)
        return reply.code, reply.reason

    cells = ",".join(f'{{"htname":"t","cname":"c{i}","type":0,"intval":{i}}}' for i in range(900))
    for body, answer in [
        (b"not json", (400, "Bad Request")),
        (b"{}", (400, "Bad Request")),
        (b"", (400, "Bad Request")),
        (b'{"action":9,"htname":"t","cname":"keep","mode":0}', (500, "Server Internal Error")),
        (b'{"action":4,"htname":"nosuch","cname":"keep","mode":0}', (500, "Server Internal Error")),
        (b'{"action":4,"htname":["t"],"cname":"keep","mode":0}', (400, "Bad Request")),
        (b'{"action":4,"htname":"t","cname":"keep","mode":0,"x":1}', (400, "Bad Request")),
        # a 40 KB group whose last cell is broken: none of the 900 cells is applied
        (f'{{"cells":[{cells},{{"htname":"t","cname":"bad","type":2}}]}}'.encode(),
         (400, "Bad Request")),
    ]:  # fmt: skip
        assert await send(body) == answer, body[:60]
    assert table_state(p, "t") == {"keep": "me"}
    assert await send(b'{"action":4,"htname":"t","cname":"keep","mode":0}') == (200, "OK")
    assert p.get("t", "keep") is None
    assert (p.stats.received_bad, p.stats.received_error, p.stats.received_ok) == (6, 2, 1)


# ---- mixed with Kamailio 5.6.3 --------------------------------------------------------------


def _kamailio_table(k: KamailioNode, table: str) -> dict[str, Any]:
    slots = k.rpc_result("htable.dump", table, timeout=10.0)
    return {cell["name"]: cell["value"] for slot in slots for cell in slot["slot"]}


def _kamailio_get(k: KamailioNode, table: str, key: str) -> dict[str, Any] | None:
    answer = k.rpc("htable.get", table, key)
    return answer["result"]["item"] if "result" in answer else None


async def _script(k: KamailioNode, op: str, **headers: str) -> None:
    hdrs = [("X-Op", op), *((f"X-{name.title()}", value) for name, value in headers.items())]

    def build(local: tuple[str, int]) -> bytes:
        return build_request("MESSAGE", f"sip:ht@{k.host}:{k.port}", local=local, headers=hdrs)

    # no retransmission: Kamailio's script is stateless and would run the operation twice
    reply = await asyncio.to_thread(
        udp_request, k.host, k.port, build, timeout=10.0, retransmit=None
    )
    assert (reply.code, reply.reason) == (200, f"done {op}"), reply


def _htable_problems(k: KamailioNode) -> list[str]:
    return [
        line
        for line in k.log_text().splitlines()
        if ("ERROR" in line or "WARNING" in line) and "htable" in line
    ] + dmq_log_problems(k)


def _epoch(text: str) -> int:
    return int(time.mktime(time.strptime(text, "%Y-%m-%d %H:%M:%S")))


@pytest.mark.kamailio
async def test_kamailio_and_pydmq_replicate_both_ways(cluster: Cluster, py: PyCluster) -> None:
    k = await cluster.kamailio(
        "k1",
        htable=True,
        htable_def=T + ";",
        extra_modules=f'modparam("htable", "htable", "{E};")',
        extra_route=HT_ROUTE,
        extra_global="max_while_loops=10000",
    )
    # Kamailio's table before pydmq exists: 1500 cells (two 60 KB groups) and awkward strings
    await _script(k, "fill", count="1500")
    for key, value in (("quote", 'a "b" \\c/é'), ("ctl", "tab\tnl")):
        await asyncio.to_thread(k.rpc_result, "htable.sets", "t", key, value)
    await asyncio.to_thread(k.rpc_result, "htable.seti", "t", "num", -7)
    await asyncio.to_thread(k.rpc_result, "htable.setxs", "e", "pre", "v", 40)
    pre_at = time.time()
    want = await asyncio.to_thread(_kamailio_table, k, "t")
    assert len(want) == 1503

    # -- a pydmq node joining late receives Kamailio's table --------------------------------
    node, p = await py.start(seeds=[k.uri], tm={})
    await until(lambda: table_state(p, "t") == want, timeout=15, what="Kamailio's table on pydmq")
    assert p.stats.received_bad == p.stats.received_error == 0
    # the absolute expiry epoch travels in the sync group
    assert abs(p.get_cell("e", "pre").expire - (pre_at + 40)) <= 2  # type: ignore[union-attr]

    # -- Kamailio -> pydmq ---------------------------------------------------------------------
    await asyncio.to_thread(k.rpc_result, "htable.sets", "t", "ks", "from kamailio")
    await asyncio.to_thread(k.rpc_result, "htable.seti", "t", "ki", 10)
    await _script(k, "inc", arg="ki")
    await asyncio.to_thread(k.rpc_result, "htable.delete", "t", "kam-0")
    await asyncio.to_thread(k.rpc_result, "htable.sets", "e", "kexp", "soon")
    await asyncio.to_thread(k.rpc_result, "htable.setex", "e", "kexp", 30)
    set_at = time.time()
    await until(
        lambda: (
            p.get("t", "ks") == "from kamailio"
            and p.get("t", "ki") == 11
            and p.get("t", "kam-0") is None
            and (cell := p.get_cell("e", "kexp")) is not None
            and abs(cell.expire - (set_at + 30)) <= 2  # the setex, not autoexpire's 60 s
        ),
        what="Kamailio's changes on pydmq",
    )
    await _script(k, "rmre", arg="^kam-1")  # kam-1, kam-10.., kam-100.., kam-1000..
    await _script(k, "rmvaluesw", arg="kv-2")
    await until(
        lambda: not any(n.startswith(("kam-1", "kam-2")) for n in table_state(p, "t")),
        what="Kamailio's removals on pydmq",
    )
    assert table_state(p, "t") == await asyncio.to_thread(_kamailio_table, k, "t")

    # -- pydmq -> Kamailio ---------------------------------------------------------------------
    p.set("t", "ps", 'from "pydmq" é')
    p.set("t", "pi", 41)
    p.incr("t", "pi")
    p.delete("t", "ks")
    p.set("e", "pexp", "later", expire=45)
    set_at = time.time()
    p.remove("t", "^kam-3", op="re", on="name")
    p.remove("t", "kv-4", op="sw", on="value")

    def kamailio_caught_up() -> bool:
        table = _kamailio_table(k, "t")
        return (
            table.get("ps") == 'from "pydmq" é'
            and table.get("pi") == 42
            and "ks" not in table
            and not any(n.startswith(("kam-3", "kam-4")) for n in table)
        )

    await poll(kamailio_caught_up, timeout=10, what="pydmq's changes on Kamailio")
    item = await asyncio.to_thread(_kamailio_get, k, "e", "pexp")
    assert item is not None and item["value"] == "later"
    assert abs(_epoch(item["expire"]) - (set_at + 45)) <= 2
    assert table_state(p, "t") == await asyncio.to_thread(_kamailio_table, k, "t")

    # an expiry set on pydmq for a cell Kamailio made, then the cell expiring on both sides
    p.set_expire("e", "kexp", 1)
    await poll(
        lambda: _kamailio_get(k, "e", "kexp") is None and p.get("e", "kexp") is None,
        timeout=6,
        what="kexp to expire on both sides",
    )
    assert p.stats.received_bad == p.stats.received_error == 0
    assert await asyncio.to_thread(_htable_problems, k) == []
    assert node.running


@pytest.mark.kamailio
@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_kamailio_joining_late_gets_pydmqs_table(
    cluster: Cluster, py: PyCluster, transport: str
) -> None:
    """Over TCP the groups stay below Kamailio's default 16 KB TCP read buffer."""
    node, p = await py.start(tm={}, transport=transport)
    for i in range(3000):
        p.store.set("t", f"py-{i}", f'v"{i}"\\é' if i % 3 else i)
    p.store.set("e", "x", "y")
    k = await cluster.kamailio(
        f"late-{transport}",
        dmq_transport=transport,  # type: ignore[arg-type]
        notification_addresses=[uri(node)],
        htable=True,
        htable_def=T + ";",
        extra_modules=f'modparam("htable", "htable", "{E};")',
    )
    want = table_state(p, "t")
    await poll(
        lambda: _kamailio_table(k, "t") == want,
        timeout=20,
        what="pydmq's table on the late Kamailio node",
    )
    item = _kamailio_get(k, "e", "x")
    assert item is not None and item["value"] == "y"
    assert abs(_epoch(item["expire"]) - p.get_cell("e", "x").expire) <= 1  # type: ignore[union-attr]
    (result,) = p.sync_results
    assert result.ok and result.cells_sent == 3001
    assert result.max_in_flight <= p.settings.sync_window
    limit = p.settings.sync_group_bytes_udp if transport == "udp" else p.settings.sync_group_bytes
    assert result.groups_sent > 3001 * 40 // limit
    got = [m for m in k.received("kdmq", "htable") if m.body.startswith(b'{"cells"')]
    assert len(got) >= result.groups_sent and {m.proto for m in got} == {transport}
    assert max(len(m.body) for m in got) <= limit
    assert await asyncio.to_thread(_htable_problems, k) == []


async def test_dmqsync_from_the_cli_shows_progress(py: PyCluster) -> None:
    """``pydmq rpc htable.dmqsync`` on a node asks its peers for their tables and draws a
    progress bar until every asked node's answer has ended."""
    a_node, a = await py.start()
    for i in range(5000):
        a.store.set("t", f"k{i:05d}", i)
    b_node, b = await py.start(seeds=[uri(a_node)], dmq_init_sync=False)
    await until(b_node.nodes.active_remote, what="b to join")
    assert b.items("t") == []  # no sync at join: dmq_init_sync is off
    servers = await start_rpc(b_node, RpcSettings(http_address="127.0.0.1:0"), extra=rpc_methods(b))
    try:
        assert servers.http is not None
        host, port = servers.http.address[:2]
        argv = [sys.executable, "-m", "pydmq", "rpc", "--http", f"{host}:{port}"]
        proc = await asyncio.create_subprocess_exec(
            *argv, "htable.dmqsync", stdout=PIPE, stderr=PIPE
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        await servers.close()
    assert proc.returncode == 0, err
    assert b"Ok. Sync requested." in out
    final = err.decode().rsplit("\r", 1)[-1]
    assert "1/1 nodes done, 5,000 cells" in final, err
    assert final.startswith("[" + "#" * 30 + "]")
    assert len(b.items("t")) == 5000
