"""Failure detection: how long until a crashed node stops being listed as active.

Run: ``python bench/failure.py [--rounds 3] [--ping-interval 5] [--fr-timer 2]``.

A three-node cluster: a Kamailio 5.6.3 observer (the seed), a pydmq observer and a pydmq victim,
all with the same ``ping_interval`` and tm ``fr_timer``. Each round the victim is killed with
SIGKILL (nothing is announced, as in a crash) at a random moment of the ping cycle, and both
observers are polled (pydmq: its status file, rewritten on every membership change; Kamailio:
``dmq.list_nodes`` every 50 ms) until the victim is no longer ``active``. Then the victim is
restarted on the same port and rejoins. Both observers detect it the same way (spec 2.7/2.8:
a ping times out after ``fr_timer``, the node becomes ``not_active``), so the expected time is
between ``fr_timer`` and ``ping_interval + fr_timer``.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import (
    KamailioNode,
    PydmqProcess,
    install_signal_handlers,
    start_kamailio,
    stop_all,
    stop_kamailio,
)


def _pydmq_status(observer: PydmqProcess, port: int) -> str | None:
    for n in observer.status().get("nodes", []):
        if str(n.get("port")) == str(port) and not n.get("local"):
            return str(n.get("status"))
    return None


def _kamailio_status(observer: KamailioNode, port: int) -> str | None:
    try:
        return observer.peer_status("127.0.0.1", port)
    except Exception:
        return "?"


def _wait_all_active(kam: KamailioNode, obs: PydmqProcess, victim: PydmqProcess) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if (
            _kamailio_status(kam, victim.port) == "active"
            and _kamailio_status(kam, obs.port) == "active"
            and _pydmq_status(obs, victim.port) == "active"
        ):
            return
        time.sleep(0.1)
    raise RuntimeError("the cluster did not form")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ping-interval", type=int, default=5, help="seconds (Kamailio: >= 5)")
    ap.add_argument("--fr-timer", type=float, default=2.0, help="tm fr_timer, seconds")
    args = ap.parse_args()
    install_signal_handlers()
    rng = random.Random(7)
    found: dict[str, list[float]] = {"pydmq": [], "Kamailio": []}
    kam = start_kamailio(
        name="failure-k",
        ping_interval=args.ping_interval,
        extra_modules=f'modparam("tm", "fr_timer", {int(args.fr_timer * 1000)})',
    )
    dmq = {"ping_interval": args.ping_interval, "notification_address": [kam.uri]}
    tm = {"fr_timer": args.fr_timer}
    obs = PydmqProcess(dmq=dmq, extra={"tm": tm}).start()
    victim = PydmqProcess(dmq=dmq, extra={"tm": tm}).start()
    try:
        for r in range(args.rounds):
            _wait_all_active(kam, obs, victim)
            time.sleep(rng.uniform(0, args.ping_interval))
            victim.kill()
            t0 = time.monotonic()
            pending = {"pydmq", "Kamailio"}
            while pending and time.monotonic() - t0 < 4 * (args.ping_interval + args.fr_timer):
                now = time.monotonic() - t0
                if "pydmq" in pending and _pydmq_status(obs, victim.port) != "active":
                    found["pydmq"].append(now)
                    pending.discard("pydmq")
                if "Kamailio" in pending and _kamailio_status(kam, victim.port) != "active":
                    found["Kamailio"].append(now)
                    pending.discard("Kamailio")
                time.sleep(0.05)
            shown = {
                who: "not detected" if who in pending else f"{found[who][-1]:.2f} s"
                for who in found
            }
            print(
                f"round {r + 1}: pydmq observer {shown['pydmq']},"
                f" Kamailio observer {shown['Kamailio']}",
                flush=True,
            )
            victim.start()  # same port: it rejoins through the seed
    finally:
        victim.kill()
        obs.stop()
        stop_kamailio(kam)
        stop_all()
    print(
        f"ping_interval {args.ping_interval} s, fr_timer {args.fr_timer:g} s: expected"
        f" {args.fr_timer:g}..{args.ping_interval + args.fr_timer:g} s"
    )
    for who, times in found.items():
        if times:
            print(
                f"{who:9s} observer: mean {statistics.mean(times):5.2f} s,"
                f" min {min(times):5.2f} s, max {max(times):5.2f} s ({len(times)} rounds)"
            )
    if found["pydmq"] and found["Kamailio"]:
        ratio = statistics.mean(found["pydmq"]) / statistics.mean(found["Kamailio"])
        print(f"ratio pydmq/Kamailio (mean detection time; lower is faster): {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
