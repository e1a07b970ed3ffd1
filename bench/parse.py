"""Throughput of pydmq.sip.message on the golden Kamailio 5.6.3 KDMQ messages (one core).

Run: ``python bench/parse.py [--seconds S] [--spec DIR]``. Prints messages/s for parse only,
parse+serialise, and parse+access(via, from, to, cseq, call_id, ruri)+serialise. The corpus is
every KDMQ request and its reply (``NN_*kdmq*.txt``); the timed loop cycles over all of them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pydmq.sip.message import Request, parse_message

DEFAULT_SPEC = Path(__file__).resolve().parents[2] / "shared" / "spec" / "wire-kamailio-5.6.3"


def load(spec: Path) -> list[bytes]:
    files = sorted(p for p in spec.glob("[0-9][0-9]_*kdmq*.txt"))
    if not files:
        raise SystemExit(f"no golden KDMQ files in {spec}")
    return [p.read_bytes() for p in files]


def parse_only(msgs: list[bytes]) -> None:
    for d in msgs:
        parse_message(d)


def parse_serialise(msgs: list[bytes]) -> None:
    for d in msgs:
        parse_message(d).to_bytes()


def parse_access_serialise(msgs: list[bytes]) -> None:
    for d in msgs:
        m = parse_message(d)
        m.via  # noqa: B018
        m.from_  # noqa: B018
        m.to  # noqa: B018
        m.cseq  # noqa: B018
        m.call_id  # noqa: B018
        if isinstance(m, Request):
            m.ruri  # noqa: B018
        m.to_bytes()


def rate(fn: Callable[[list[bytes]], None], msgs: list[bytes], seconds: float) -> float:
    """Best of several ~0.2 s rounds: the steady-state rate, not scheduler noise."""
    batch = msgs * max(1, 2000 // len(msgs))
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        rounds = 0
        while True:
            fn(batch)
            rounds += 1
            elapsed = time.perf_counter() - t0
            if elapsed >= 0.2:
                break
        best = max(best, rounds * len(batch) / elapsed)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=2.0, help="time per scenario")
    ap.add_argument("--spec", type=Path, default=Path(os.environ.get("PYDMQ_SPEC", DEFAULT_SPEC)))
    args = ap.parse_args()
    msgs = load(args.spec)
    for d in msgs:  # sanity: the benchmark must measure a correct parser
        assert parse_message(d).to_bytes() == d
    print(
        f"{len(msgs)} golden KDMQ messages, avg {sum(map(len, msgs)) // len(msgs)} bytes, "
        f"Python {sys.version.split()[0]}"
    )
    for name, fn in (
        ("parse only", parse_only),
        ("parse + serialise", parse_serialise),
        ("parse + access(via,from,to,cseq,call_id,ruri) + serialise", parse_access_serialise),
    ):
        print(f"{name:60s} {rate(fn, msgs, args.seconds):>10,.0f} msg/s")


if __name__ == "__main__":
    main()
