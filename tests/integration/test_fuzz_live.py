"""Hostile UDP input against a live ``pydmq run`` node: the CI-sized ``bench/fuzz_live.py``.

About 20,000 datagrams mutated from the Kamailio 5.6.3 captures (bit flips, truncation,
splicing, duplicated headers, CR/LF/NUL injection, huge Content-Length, giant header values,
random methods and URIs, odd notification and JSON bodies; ``tests/support/mutator.py``) go to a
node that has a peer, while an OPTIONS ping every 100 ms must be answered within a second.

Asserted: the node received nearly everything (its own ``dmq.stats`` counters), it never stopped
answering (at most 3 pings of ~40 missed), its peak RSS stays under 2 x start + 50 MB, it is
alive with its membership intact (the peer active on both sides), it logged no traceback, and
it stops cleanly (exit status 0). The run lives in a network namespace with only loopback
(``tests/support/fuzzlive.py``), because a mutated notification body makes the node add and ping
nodes at arbitrary addresses: needs root, like the other netns tests.

The datagram sequence is fixed by the seed; ``python bench/fuzz_live.py --replay SEED:INDEX``
prints one datagram to reproduce a failure outside the test.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.fuzzlive import FuzzBed

pytestmark = [pytest.mark.netns, pytest.mark.timeout(90)]

COUNT = 20_000
SEED = 20261130


def test_live_node_survives_mutated_datagrams(tmp_path: Path) -> None:
    with FuzzBed(tmp_path / "fuzz") as bed:
        target, peer = bed.start_pair()
        report = bed.fuzz(target, peer, count=COUNT, seed=SEED)
        bed.finish(target, report)
    print("\n" + report.render())
    report.check(rss_factor=2.0, rss_slack_kb=50 * 1024, max_missed=3)
    assert report.node_received >= 0.95 * report.sent, report.render()
    assert report.pings_sent >= 10, report.render()
    assert report.exit_code == 0, f"the node did not stop cleanly\n{target.log_tail()}"
    # The mutants really went deep: answered 400s, notification bodies merged, htable JSON.
    assert report.delta("sip", "bad_requests") > 100, report.render()
    assert report.delta("sip", "dropped_unparsable") > 1000, report.render()
