"""A million mutated datagrams against a live ``pydmq run`` node, which must keep answering.

Run (as root, for the network namespace; see below)::

    python bench/fuzz_live.py                       # 1,000,000 datagrams, seed 1
    python bench/fuzz_live.py --count 50000 --seed 7
    python bench/fuzz_live.py --replay 7:12345      # print datagram 12345 of seed 7 (repr)

What it does (``tests/support/fuzzlive.py`` has the details, ``tests/support/mutator.py`` the
mutations): two ``pydmq run`` nodes that know each other (htable and usrloc on, so their JSON
decoders are fuzzed too), then ``--count`` datagrams mutated from the Kamailio 5.6.3 captures
(``../shared/spec/wire-kamailio-5.6.3/NN_*.txt``) sent over UDP to the target, paced by OPTIONS
markers so that the kernel does not just drop the load. Meanwhile a second socket sends an
OPTIONS every 100 ms and each must be answered within 1 s, and the target's VmRSS is sampled.

Printed: datagrams generated/sent/received by the node (its own ``dmq.stats`` counters), pings
sent/answered/missed, the slowest answer, RSS start/peak/end, whether the node is alive with its
membership intact (the peer active on both sides, its own entry local), the SIP counters, and
whether it logged a traceback or failed to stop cleanly. Exit status 0 when the acceptance holds
(alive, at most ``--max-missed`` pings missed, RSS peak under ``--rss-factor`` x start +
``--rss-slack-mb``, membership intact, no traceback, clean exit), else 1.

Isolation: everything runs in a fresh network namespace that has loopback and no route out, so
nodes a mutated notification body injects (any address, host names) cannot make the target send
anything off the machine. ``--no-netns`` (non-root) runs on 127.0.0.1 instead and gives the
nodes a private notification channel that no mutant can name.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support.fuzzlive import FuzzBed  # noqa: E402
from tests.support.mutator import Mutator, load_corpus  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--count", type=int, default=1_000_000, help="datagrams to generate")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--batch", type=int, default=64, help="datagrams between two markers")
    parser.add_argument("--window", type=int, default=4, help="markers unanswered at most")
    parser.add_argument("--max-missed", type=int, default=10, help="pings allowed to miss")
    parser.add_argument("--rss-factor", type=float, default=2.0)
    parser.add_argument("--rss-slack-mb", type=float, default=100.0)
    parser.add_argument("--log-level", default="INFO", help="the nodes' [log] level")
    parser.add_argument("--no-netns", action="store_true", help="run on the host's 127.0.0.1")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    parser.add_argument("--replay", metavar="SEED:INDEX", help="print one datagram and exit")
    args = parser.parse_args(argv)

    if args.replay:
        seed, index = (int(x) for x in args.replay.split(":"))
        print(repr(Mutator.nth(load_corpus(), seed, index)))
        return 0
    if not args.no_netns and os.geteuid() != 0:
        parser.error("the network namespace needs root; use --no-netns to run on 127.0.0.1")

    workdir = Path(tempfile.mkdtemp(prefix="pydmq-fuzz-"))
    print(f"work directory {workdir} (node logs)", flush=True)
    started = time.monotonic()
    with FuzzBed(workdir, netns=not args.no_netns, log_level=args.log_level) as bed:
        target, peer = bed.start_pair()
        print(f"target pid {target.pid} on udp 127.0.0.1:{target.port}, peer on {peer.port}")
        report = bed.fuzz(
            target, peer, count=args.count, seed=args.seed, batch=args.batch,
            window=args.window, progress=lambda line: print(line, flush=True),
        )  # fmt: skip
        bed.finish(target, report)
    print()
    print(report.render())
    print(f"clean exit: {report.exit_code == 0} (exit status {report.exit_code});"
          f" total {time.monotonic() - started:.0f} s")  # fmt: skip
    ok = True
    try:
        report.check(
            rss_factor=args.rss_factor,
            rss_slack_kb=int(args.rss_slack_mb * 1024),
            max_missed=args.max_missed,
        )
    except AssertionError as exc:
        ok = False
        print(f"FAILED: {str(exc).splitlines()[0]}")
    if report.exit_code != 0:
        ok = False
        print("FAILED: the node did not stop cleanly")
    if not args.keep and ok:
        import shutil  # noqa: PLC0415

        shutil.rmtree(workdir, ignore_errors=True)
    print("PASS" if ok else f"FAIL (logs in {workdir})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
