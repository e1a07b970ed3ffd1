"""Which process reads a UDP datagram: a classic BPF program on a ``SO_REUSEPORT`` group.

With ``[sip] udp_children = N`` the node binds N + 1 UDP sockets to one address, in one
``SO_REUSEPORT`` group: sockets 0..N-1 belong to the receiver processes, socket N to the main
process. The kernel runs :func:`build_program` on each datagram's payload (the SIP message) and
hands it to the socket whose index the program returns:

* a response (``SIP/2.0 ...``) and a ``KDMQ sip:<channel>@`` request for a registered channel go
  straight to the main process, in arrival order, with no extra hop;
* everything else (OPTIONS, KDMQ for unknown channels, other methods, garbage) goes to a
  receiver picked at random, which answers it statelessly or, for what it cannot answer
  (unusual spellings of a KDMQ, say), forwards it to the main process.

The program is only a fast path: a datagram steered to a receiver is still handled right, just
with one hop more. Channels that do not fit in the program are left out for that reason.
"""

from __future__ import annotations

import ctypes
import socket
from collections.abc import Iterable
from typing import Final

__all__ = ["attach", "build_program", "reuseport_supported"]

#: ``SO_ATTACH_REUSEPORT_CBPF`` (Linux 4.5+); not exported by the socket module.
SO_ATTACH_REUSEPORT_CBPF: Final = 51

# Classic BPF opcodes (linux/filter.h).
_LD_W_ABS: Final = 0x00 | 0x00 | 0x20
_LD_H_ABS: Final = 0x00 | 0x08 | 0x20
_LD_B_ABS: Final = 0x00 | 0x10 | 0x20
_JEQ_K: Final = 0x05 | 0x10 | 0x00
_JA: Final = 0x05 | 0x00
_RET_K: Final = 0x06 | 0x00
_RET_A: Final = 0x06 | 0x10
_MOD_K: Final = 0x04 | 0x90 | 0x00
#: ``SKF_AD_OFF + SKF_AD_RANDOM``: loads a random number into A.
_RANDOM: Final = (-0x1000 + 56) & 0xFFFFFFFF
_MAX_INSNS: Final = 4096  # BPF_MAXINSNS
_MAX_CHANNEL: Final = 200  # longer channels take the receivers' path (jumps are 8-bit)

Insn = tuple[int, int, int, int]  # (code, jt, jf, k)

_KDMQ_AT: Final = 9  # len(b"KDMQ sip:")


_LOADS: Final = ((4, _LD_W_ABS), (2, _LD_H_ABS), (1, _LD_B_ABS))


def _compare(offset: int, pattern: bytes) -> list[tuple[int, int, int]]:
    """``(load opcode, offset, expected value)`` triples checking ``pattern`` at ``offset``."""
    out: list[tuple[int, int, int]] = []
    i = 0
    while i < len(pattern):
        size, code = next(load for load in _LOADS if load[0] <= len(pattern) - i)
        out.append((code, offset + i, int.from_bytes(pattern[i : i + size], "big")))
        i += size
    return out


def build_program(channels: Iterable[str], receivers: int) -> list[Insn]:
    """The steering program for ``receivers`` receiver sockets (0..receivers-1) and the main
    process's socket (index ``receivers``)."""
    if receivers < 1:
        raise ValueError("at least one receiver socket")
    main = receivers
    prog: list[Insn] = []

    def guard(offset: int, pattern: bytes) -> None:
        # Each check falls through on a match; a mismatch lands on the "ja to receivers"
        # placed right after it (cBPF jumps only forward, 8 bits at most).
        for code, at, value in _compare(offset, pattern):
            prog.append((code, 0, 0, at))
            prog.append((_JEQ_K, 1, 0, value))
            prog.append((_JA, 0, 0, -1))  # patched below

    prog.append((_LD_W_ABS, 0, 0, 0))
    prog.append((_JEQ_K, 0, 1, int.from_bytes(b"SIP/", "big")))
    prog.append((_RET_K, 0, 0, main))  # a response: the main process matches transactions
    guard(0, b"KDMQ sip:")
    # Shortest first: a load past the end of the datagram ends the program (socket 0, a
    # receiver), and a datagram that matches a channel is long enough for every shorter one.
    for channel in sorted(set(channels), key=lambda c: (len(c.encode()), c)):
        pattern = channel.encode() + b"@"
        if not channel or len(pattern) > _MAX_CHANNEL:
            continue
        checks = _compare(_KDMQ_AT, pattern)
        if len(prog) + 2 * len(checks) + 1 + 4 > _MAX_INSNS:
            break
        block = 2 * len(checks) + 1  # load + compare per check, then the return
        for n, (code, at, value) in enumerate(checks):
            skip = block - 2 * n - 2  # from after this compare to the next block's start
            prog.append((code, 0, 0, at))
            prog.append((_JEQ_K, 0, skip, value))
        prog.append((_RET_K, 0, 0, main))
    receivers_at = len(prog)
    if receivers == 1:
        prog.append((_RET_K, 0, 0, 0))
    else:
        prog.append((_LD_W_ABS, 0, 0, _RANDOM))
        prog.append((_MOD_K, 0, 0, receivers))
        prog.append((_RET_A, 0, 0, 0))
    for pc, (code, jt, jf, k) in enumerate(prog):
        if code == _JA and k == -1:
            prog[pc] = (code, jt, jf, receivers_at - pc - 1)
    return prog


class _SockFilter(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    ]


class _SockFprog(ctypes.Structure):
    _fields_ = [
        ("len", ctypes.c_uint16),
        ("filter", ctypes.POINTER(_SockFilter)),
    ]


def attach(sock: socket.socket, program: list[Insn]) -> None:
    """Install ``program`` on the reuseport group of ``sock`` (replacing any earlier one).

    Raises ``OSError`` where the kernel does not support it.
    """
    filters = (_SockFilter * len(program))(*(_SockFilter(*insn) for insn in program))
    fprog = _SockFprog(len(program), ctypes.cast(filters, ctypes.POINTER(_SockFilter)))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, bytes(fprog))


def reuseport_supported() -> bool:
    return hasattr(socket, "SO_REUSEPORT")
