"""The steering program, run by the real kernel on a real SO_REUSEPORT group on 127.0.0.1."""

from __future__ import annotations

import select
import socket
from collections.abc import Iterator

import pytest

from pydmq.sip.steering import attach, build_program

RECEIVERS = 3
MAIN = RECEIVERS
CHANNELS = ["notification_peer", "htable", "x", "usrloc"]


@pytest.fixture
def group() -> Iterator[tuple[list[socket.socket], socket.socket, int]]:
    socks: list[socket.socket] = []
    port = 0
    for _ in range(RECEIVERS + 1):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(("127.0.0.1", port))
        port = s.getsockname()[1]
        socks.append(s)
    attach(socks[0], build_program(CHANNELS, RECEIVERS))
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    yield socks, client, port
    for s in [*socks, client]:
        s.close()


def _where(group: tuple[list[socket.socket], socket.socket, int], data: bytes) -> int:
    socks, client, port = group
    client.sendto(data, ("127.0.0.1", port))
    ready, _, _ = select.select(socks, [], [], 2.0)
    assert len(ready) == 1, "the datagram went nowhere (or twice)"
    assert ready[0].recv(65536) == data
    return socks.index(ready[0])


@pytest.mark.parametrize(
    "data",
    [
        b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK1\r\n\r\n",
        b"KDMQ sip:htable@127.0.0.1:5060 SIP/2.0\r\n\r\n",
        b"KDMQ sip:x@a SIP/2.0\r\n\r\n",  # shorter than the other channels' patterns
        b"KDMQ sip:notification_peer@10.0.0.1 SIP/2.0\r\n\r\n",
        b"KDMQ sip:usrloc@[::1]:5060 SIP/2.0\r\n\r\n",
    ],
)
def test_responses_and_registered_channels_go_to_the_main_socket(
    group: tuple[list[socket.socket], socket.socket, int], data: bytes
) -> None:
    assert {_where(group, data) for _ in range(20)} == {MAIN}


@pytest.mark.parametrize(
    "data",
    [
        b"OPTIONS sip:127.0.0.1:5060 SIP/2.0\r\n\r\n",
        b"KDMQ sip:htablex@127.0.0.1 SIP/2.0\r\n\r\n",  # a longer name, same prefix
        b"KDMQ sip:htabl@127.0.0.1 SIP/2.0\r\n\r\n",
        b"KDMQ sip:nochannel@127.0.0.1 SIP/2.0\r\n\r\n",
        b"KDMQ sips:htable@127.0.0.1 SIP/2.0\r\n\r\n",
        b"KDMQ sip:",  # cut short
        b"\x00",
        b"MESSAGE sip:htable@127.0.0.1 SIP/2.0\r\n\r\n",
    ],
)
def test_everything_else_is_spread_over_the_receivers(
    group: tuple[list[socket.socket], socket.socket, int], data: bytes
) -> None:
    seen = {_where(group, data) for _ in range(60)}
    assert MAIN not in seen
    if len(data) > 9:  # a load past the end ends the program at socket 0
        assert len(seen) >= 2  # random spread (3 receivers, 60 tries)


def test_program_fits_many_channels_and_leaves_out_long_ones() -> None:
    many = [f"channel{i}" for i in range(300)] + ["y" * 500]
    prog = build_program(many, 2)
    assert len(prog) <= 4096
    assert all(0 <= jt <= 255 and 0 <= jf <= 255 for _, jt, jf, _ in prog)
    with pytest.raises(ValueError):
        build_program(["a"], 0)
