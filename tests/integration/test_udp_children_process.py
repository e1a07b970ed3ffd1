"""``pydmq run`` with ``[sip] udp_children``: the receiver processes live and die with the node.

A receiver left behind by a crashed node would keep answering OPTIONS for a node that is gone
(and keep its port), so they ask the kernel to end them with their parent.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.net import free_port, udp_options
from tests.support.statusfile import read_status
from tests.support.toml import to_toml

pytestmark = pytest.mark.timeout(60)


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except FileNotFoundError:
        return []
    return [int(p) for p in text.split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead too (its parent, the test runner's child, was killed without reaping).
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _wait(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int, Path]]:
    port = free_port("udp")
    config = tmp_path / "node.toml"
    config.write_text(
        to_toml(
            {
                "dmq": {"server_address": f"sip:127.0.0.1:{port}"},
                "sip": {"udp_children": 2},
                "rpc": {"http_address": ""},
            }
        )
    )
    status = tmp_path / "status.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYDMQ_")}
    log = (tmp_path / "node.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pydmq.cli", "run", "-c", str(config), "--status-file", str(status)],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        _wait(lambda: read_status(status) is not None or proc.poll() is not None, 20, "start")
        assert proc.poll() is None, (tmp_path / "node.log").read_text()
        yield proc, port, tmp_path
    finally:
        pids = _children(proc.pid)
        if proc.poll() is None:
            proc.terminate()
            proc.wait(10)
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        log.close()


def test_receivers_end_when_the_node_is_killed(
    node: tuple[subprocess.Popen[bytes], int, Path],
) -> None:
    proc, port, _ = node
    receivers = _children(proc.pid)
    assert len(receivers) == 2
    assert udp_options(port) == 200
    proc.kill()
    proc.wait(10)
    _wait(lambda: not any(_alive(p) for p in receivers), 10, "the receivers to exit")


def test_receivers_end_when_the_node_stops(
    node: tuple[subprocess.Popen[bytes], int, Path],
) -> None:
    proc, port, tmp_path = node
    receivers = _children(proc.pid)
    assert len(receivers) == 2
    assert udp_options(port) == 200
    proc.send_signal(signal.SIGINT)  # Ctrl-C reaches only the node: it stops them
    assert proc.wait(10) == 0, (tmp_path / "node.log").read_text()
    _wait(lambda: not any(_alive(p) for p in receivers), 10, "the receivers to exit")
    assert "Traceback" not in (tmp_path / "node.log").read_text()
