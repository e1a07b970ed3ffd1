"""A fast, seeded mutation fuzzer for SIP datagrams, built from the Kamailio 5.6.3 captures.

Typical use::

    from tests.support.mutator import Mutator, load_corpus

    mut = Mutator(load_corpus(), seed=1)
    data = mut.mutate()            # one mutated datagram (bytes, at most ``max_size`` long)
    batch = mut.batch(100)         # a list of them

The same seed gives the same sequence of datagrams (``random.Random`` only, no global state), so
a failure is reproduced by re-running with the seed and the index it printed
(:meth:`Mutator.nth`). Each datagram is one golden message (``NN_*.txt``, requests and replies)
with one to four of these mutations stacked:

* bit flips and random byte overwrites, insertions, deletions;
* truncation at a random offset;
* splicing: the head of one golden message and the tail of another (at a line or at any byte);
* header duplication (one line repeated up to a few hundred times), header deletion, shuffling;
* CR, LF, CRLF, bare CR and NUL injection; line endings rewritten to LF-only or CR-only;
* Content-Length: huge, negative, non-numeric, duplicated, folded, or missing;
* giant header values (up to ~60 KB) and giant bodies;
* random methods (tokens and junk) and Request-URIs (long, odd schemes, many parameters, junk);
* random status lines, Via variations (ports, rport/received, branch, many comma-separated Vias),
  Max-Forwards and CSeq oddities;
* DMQ bodies: notification lines with odd hosts/ports/statuses, many lines, broken JSON.

Nothing here depends on pydmq, so the same generator can be aimed at Kamailio too. The
captures come from :mod:`tests.support.spec` (``PYDMQ_SPEC`` overrides their place).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from .spec import WIRE_DIR

__all__ = ["MAX_UDP", "Mutator", "is_keepalive", "load_corpus"]

#: The largest UDP payload over IPv4.
MAX_UDP = 65507

_NAMES = re.compile(r"^\d\d_.*\.txt$")
_BRANCH = re.compile(rb"branch=z9hG4bK[^;,\r\n]*")
_CALL_ID = re.compile(rb"(\r\n(?:Call-ID|i)[ \t]*:[ \t]*)[^\r\n]*", re.IGNORECASE)


def load_corpus(directory: Path | None = None) -> list[bytes]:
    """Every ``NN_*.txt`` capture in ``directory`` (requests and replies), sorted by name."""
    where = directory or WIRE_DIR
    files = sorted(p for p in where.iterdir() if _NAMES.match(p.name))
    if not files:
        raise FileNotFoundError(f"no NN_*.txt golden captures in {where}")
    return [p.read_bytes() for p in files]


def is_keepalive(data: bytes) -> bool:
    """What a SIP UDP transport ignores without counting it: a few bytes of CR/LF/NUL/SP/TAB."""
    return len(data) <= 8 and not data.strip(b"\r\n\x00 \t")


_METHODS = [
    b"KDMQ", b"OPTIONS", b"MESSAGE", b"INVITE", b"ACK", b"BYE", b"CANCEL", b"REGISTER",
    b"SUBSCRIBE", b"NOTIFY", b"PRACK", b"UPDATE", b"INFO", b"REFER", b"PUBLISH",
    b"kdmq", b"KDMQ\x00", b"K DMQ", b"", b"-", b"!%*_+`'~", b"\xff\xfe", b"SIP/2.0",
]  # fmt: skip
_SCHEMES = [b"sip:", b"sips:", b"tel:", b"SIP:", b"http://", b"", b"sip:@", b"urn:x:"]
_USERS = [
    b"notification_peer", b"htable", b"usrloc", b"nochannel", b"lab", b"", b"a" * 300,
    b"%00", b"notification_peer%40x", b"user;param", b"\xc3\xa9",
]  # fmt: skip
_HOSTS = [
    b"127.0.0.1", b"127.0.0.1:5160", b"[::1]:5060", b"[::1", b"127.0.0.1:99999",
    b"127.0.0.1:0", b"127.0.0.1:-1", b"localhost", b"x" * 300, b"127.0.0.256", b":", b"",
    b"127.0.0.1:5060;transport=tcp", b"127.0.0.1;transport=tls", b"127.0.0.1;lr;maddr=1.2",
    b"[fe80::1%25lo]:5060", b"127.1", b"0x7f.1",
]  # fmt: skip
_NUMBERS = [
    b"0", b"1", b"-1", b"4294967295", b"4294967296", b"99999999999999999999", b"65535",
    b"65536", b"2147483648", b"1e9", b"0x10", b" ", b"", b"00000000000000000001", b"+5",
    b"\xd9\xa3",  # an Arabic-Indic digit: isdigit() in str, not in bytes
]  # fmt: skip
_HEADER_NAMES = [
    b"Via", b"v", b"From", b"f", b"To", b"t", b"Call-ID", b"i", b"CSeq", b"Content-Length",
    b"l", b"Content-Type", b"c", b"Max-Forwards", b"User-Agent", b"Route", b"Record-Route",
    b"Contact", b"m", b"X-\xff", b"", b" Via", b"Via ", b"V\x00ia",
]  # fmt: skip
_BODIES = [
    b"sip:127.0.0.1:5161;status=active\r\n",
    b"sip:127.0.0.1:5161;status=disabled\r\nsip:127.0.0.1:5162;status=pending\r\n",
    b"sip:127.0.0.1:;status=active\r\n",
    b"sip:127.0.0.1:5161;status=\r\n",
    b"sip:127.0.0.1:5161;status=active",
    b"sips:[::1]:5061;transport=tls;status=active\r\n",
    b"sip:\r\n\r\n\r\n",
    b'{"action":2,"htname":"t","cname":"k1","type":2,"strval":"v1","mode":1}',
    b'{"cells":[{"htname":"t","cname":"n1","type":0,"intval":42,"expire":0}]}',
    b'{"action":1}',
    b'{"action":' + b"[" * 5000 + b"]" * 5000 + b"}",
    b'{"cells":' + b'[{"htname":"t"},' * 500 + b"{}]}",
    b'{"action":2,"htname":"t","cname":"' + b"k" * 40000 + b'","type":2,"strval":"v"}',
    b"\x00" * 64,
    b"\xff" * 64,
]


def _lines(data: bytes) -> list[bytes]:
    return data.split(b"\r\n")


def _head_body(data: bytes) -> tuple[bytes, bytes]:
    head, _sep, body = data.partition(b"\r\n\r\n")
    return head, body


class Mutator:
    """Seeded mutator over a golden corpus; see the module docstring."""

    def __init__(self, corpus: Sequence[bytes], seed: int = 0, max_size: int = MAX_UDP) -> None:
        if not corpus:
            raise ValueError("empty corpus")
        self.corpus = list(corpus)
        self.requests = [m for m in corpus if not m.startswith(b"SIP/2.0 ")] or self.corpus
        self.responses = [m for m in corpus if m.startswith(b"SIP/2.0 ")] or self.corpus
        self.seed = seed
        self.max_size = max_size
        self.rng = random.Random(seed)
        self.count = 0
        r = self.rng
        # (weight, operation); heavier weights for the cheap structure-aware mutations.
        ops: list[tuple[int, Callable[[bytes], bytes]]] = [
            (8, self.flip_bits),
            (4, self.overwrite_bytes),
            (3, self.insert_bytes),
            (3, self.delete_bytes),
            (4, self.truncate),
            (4, self.splice),
            (4, self.duplicate_header),
            (2, self.delete_header),
            (2, self.shuffle_headers),
            (4, self.inject_control),
            (2, self.line_endings),
            (6, self.content_length),
            (3, self.giant_header),
            (6, self.request_line),
            (2, self.status_line),
            (4, self.via),
            (8, self.small_fields),
            (14, self.body),
            (2, self.repeat_segment),
        ]
        self._ops = [op for _, op in ops]
        self._weights = [w for w, _ in ops]
        self._choices = r.choices
        self._randrange = r.randrange
        self._node_lines = [self._node_line() for _ in range(2048)]

    # -- driving ----------------------------------------------------------------------------
    def mutate(self) -> bytes:
        """The next datagram of this seed's sequence."""
        r = self.rng
        self.count += 1
        data = r.choice(self.requests if r.random() < 0.8 else self.responses)
        if r.random() < 0.7:
            data = self.freshen(data)
        for op in self._choices(self._ops, self._weights, k=r.choice((1, 1, 1, 2, 2, 3, 4))):
            data = op(data)
            if len(data) > self.max_size:
                data = data[: self.max_size]
        return data

    def batch(self, n: int) -> list[bytes]:
        return [self.mutate() for _ in range(n)]

    @classmethod
    def nth(cls, corpus: Sequence[bytes], seed: int, index: int) -> bytes:
        """Datagram number ``index`` (0-based) of ``seed``'s sequence, to reproduce a failure."""
        mut = cls(corpus, seed)
        data = b""
        for _ in range(index + 1):
            data = mut.mutate()
        return data

    def freshen(self, data: bytes) -> bytes:
        """A new branch and Call-ID, so that the node sees a new transaction (the captures
        replayed as they are would mostly be absorbed as retransmissions)."""
        token = b"%x" % self.rng.getrandbits(64)
        data = _BRANCH.sub(b"branch=z9hG4bK" + token, data, count=1)
        return _CALL_ID.sub(lambda m: m.group(1) + token + b"@127.0.0.1", data, count=1)

    # -- byte level -------------------------------------------------------------------------
    def _pos(self, data: bytes) -> int:
        return self._randrange(len(data) + 1)

    def flip_bits(self, data: bytes) -> bytes:
        if not data:
            return data
        buf = bytearray(data)
        for _ in range(self.rng.choice((1, 1, 2, 4, 8))):
            i = self._randrange(len(buf))
            buf[i] ^= 1 << self._randrange(8)
        return bytes(buf)

    def overwrite_bytes(self, data: bytes) -> bytes:
        if not data:
            return data
        buf = bytearray(data)
        for _ in range(self.rng.choice((1, 2, 4))):
            buf[self._randrange(len(buf))] = self._randrange(256)
        return bytes(buf)

    def insert_bytes(self, data: bytes) -> bytes:
        r = self.rng
        i = self._pos(data)
        junk = r.choice((bytes([self._randrange(256)]), r.randbytes(r.randrange(1, 64))))
        return data[:i] + junk + data[i:]

    def delete_bytes(self, data: bytes) -> bytes:
        if not data:
            return data
        i = self._randrange(len(data))
        return data[:i] + data[i + 1 + self._randrange(min(64, len(data) - i)) :]

    def truncate(self, data: bytes) -> bytes:
        return data[: self._pos(data)]

    def splice(self, data: bytes) -> bytes:
        r = self.rng
        other = r.choice(self.corpus)
        if r.random() < 0.5:
            a, b = _lines(data), _lines(other)
            i, j = r.randrange(len(a) + 1), r.randrange(len(b) + 1)
            return b"\r\n".join(a[:i] + b[j:])
        return data[: self._pos(data)] + other[self._pos(other) :]

    def repeat_segment(self, data: bytes) -> bytes:
        if not data:
            return data
        i = self._randrange(len(data))
        seg = data[i : i + 1 + self._randrange(32)]
        times = min(self.rng.choice((2, 10, 100, 1000)), self.max_size // len(seg) + 1)
        return data[:i] + seg * times + data[i:]

    def inject_control(self, data: bytes) -> bytes:
        r = self.rng
        out = data
        for _ in range(r.choice((1, 1, 3))):
            i = r.randrange(len(out) + 1)
            junk = r.choice((b"\r", b"\n", b"\r\n", b"\x00", b"\r\n\r\n", b"\n\n"))
            out = out[:i] + junk + out[i:]
        return out

    def line_endings(self, data: bytes) -> bytes:
        r = self.rng
        head, body = _head_body(data)
        new = r.choice((b"\n", b"\r", b"\n\r", b"\r\r\n"))
        if r.random() < 0.5:
            return head.replace(b"\r\n", new) + new + new + body
        lines = _lines(head)
        i = r.randrange(len(lines))
        return b"\r\n".join(lines[:i]) + new + b"\r\n".join(lines[i:]) + b"\r\n\r\n" + body

    # -- header level -----------------------------------------------------------------------
    def duplicate_header(self, data: bytes) -> bytes:
        r = self.rng
        head, body = _head_body(data)
        lines = _lines(head)
        if len(lines) < 2:
            return data
        i = r.randrange(1, len(lines))
        n = r.choice((1, 1, 2, 3, 20, 50, 99, 100, 101, 500))
        lines[i:i] = [lines[i]] * n
        return b"\r\n".join(lines) + b"\r\n\r\n" + body

    def delete_header(self, data: bytes) -> bytes:
        head, body = _head_body(data)
        lines = _lines(head)
        if len(lines) < 2:
            return data
        del lines[self.rng.randrange(1, len(lines))]
        return b"\r\n".join(lines) + b"\r\n\r\n" + body

    def shuffle_headers(self, data: bytes) -> bytes:
        head, body = _head_body(data)
        lines = _lines(head)
        rest = lines[1:]
        self.rng.shuffle(rest)
        return b"\r\n".join(lines[:1] + rest) + b"\r\n\r\n" + body

    def _set_header(self, data: bytes, names: Sequence[bytes], line: bytes) -> bytes:
        """Replace the first header named one of ``names`` by ``line`` (appended if absent)."""
        head, body = _head_body(data)
        lines = _lines(head)
        low = tuple(n.lower() + b":" for n in names)
        for i, ln in enumerate(lines[1:], 1):
            if ln.lower().replace(b" ", b"").startswith(low):
                lines[i] = line
                break
        else:
            lines.append(line)
        return b"\r\n".join(lines) + b"\r\n\r\n" + body

    def content_length(self, data: bytes) -> bytes:
        r = self.rng
        head, body = _head_body(data)
        choice = r.randrange(7)
        if choice == 0:  # huge / odd number
            value = r.choice([*_NUMBERS, str(r.randrange(10**12)).encode()])
            return self._set_header(data, (b"Content-Length", b"l"), b"Content-Length: " + value)
        if choice == 1:  # off by a little
            value = str(max(0, len(body) + r.randrange(-5, 6))).encode()
            return self._set_header(data, (b"Content-Length", b"l"), b"Content-Length: " + value)
        if choice == 2:  # duplicated, maybe conflicting
            extra = r.choice((str(len(body)).encode(), b"0", b"99999"))
            return head + b"\r\nl: " + extra + b"\r\n\r\n" + body
        if choice == 3:  # folded value
            return self._set_header(
                data, (b"Content-Length", b"l"), b"Content-Length:\r\n " + str(len(body)).encode()
            )
        if choice == 4:  # removed
            lines = [ln for ln in _lines(head) if not ln.lower().startswith(b"content-length")]
            return b"\r\n".join(lines) + b"\r\n\r\n" + body
        if choice == 5:  # body much longer than declared
            return data + r.randbytes(r.randrange(1, 2000))
        return self._set_header(
            data, (b"Content-Length", b"l"), b"Content-Length: " + b"9" * r.randrange(1, 40)
        )

    def giant_header(self, data: bytes) -> bytes:
        r = self.rng
        size = r.choice((300, 8191, 8192, 8193, 16384, 30000, 60000))
        name = r.choice((b"X-Big", b"Via", b"From", b"Call-ID", b"Content-Type", b"Subject"))
        value = r.choice((b"a", b"; ", b",", b"%", b"\xff", b"<")) * size
        head, body = _head_body(data)
        if r.random() < 0.3:  # as one folded header spread over many short lines
            value = b"\r\n ".join([b"x" * 50] * (size // 52))
        return head + b"\r\n" + name + b": " + value[:size] + b"\r\n\r\n" + body

    # -- start line ---------------------------------------------------------------------------
    def request_line(self, data: bytes) -> bytes:
        r = self.rng
        _, _, rest = data.partition(b"\r\n")
        method = r.choice(_METHODS) if r.random() < 0.7 else r.randbytes(r.randrange(1, 12))
        if r.random() < 0.2:
            method = method * r.randrange(2, 200)
        uri = (
            r.choice(_SCHEMES)
            + r.choice(_USERS)
            + r.choice((b"@", b"", b"@@"))
            + r.choice(_HOSTS)
            + (b";x=" + b"y" * r.randrange(0, 200)) * r.choice((0, 0, 1, 30))
        )
        if r.random() < 0.1:
            uri = r.randbytes(r.randrange(0, 100))
        version = r.choice((b"SIP/2.0", b"SIP/2.0", b"sip/2.0", b"SIP/3.0", b"SIP/2.0 ", b""))
        sep = r.choice((b" ", b" ", b" ", b"  ", b"\t"))
        return method + sep + uri + sep + version + b"\r\n" + rest

    def status_line(self, data: bytes) -> bytes:
        r = self.rng
        _, _, rest = data.partition(b"\r\n")
        code = r.choice((b"200", b"100", b"408", b"999", b"099", b"2000", b"20", b"abc", b""))
        reason = r.choice((b"OK", b"", b" ", b"\xff\xfe", b"x" * 5000))
        return b"SIP/2.0 " + code + b" " + reason + b"\r\n" + rest

    def via(self, data: bytes) -> bytes:
        r = self.rng
        port = r.choice((b"", b":5060", b":0", b":65535", b":65536", b":99999999", b":-1", b":x"))
        branch = r.choice(
            (b";branch=z9hG4bK" + r.randbytes(8).hex().encode(), b";branch=", b"", b";branch")
        )
        rport = r.choice(
            (b";rport", b";rport=1", b";rport=abc", b";received=1.2.3.4", b";received=x", b"")
        )
        params = branch + rport
        hosts = (b"127.0.0.1", b"[::1]", b"localhost", b"", b"[", b"127.0.0.1.", b"a" * 300)
        host = r.choice(hosts)
        transport = r.choice((b"UDP", b"TCP", b"TLS", b"SCTP", b"WS", b"udp", b"", b"X" * 40))
        value = b"SIP/2.0/" + transport + b" " + host + port + params
        if r.random() < 0.2:
            value = b", ".join([value] * r.choice((2, 10, 300)))
        if r.random() < 0.1:
            value = r.choice((b"", b",", b" , ,", b"SIP/2.0", b"SIP/2.0/UDP"))
        return self._set_header(data, (b"Via", b"v"), b"Via: " + value)

    def small_fields(self, data: bytes) -> bytes:
        r = self.rng
        what = r.randrange(5)
        if what == 0:
            value = r.choice(_NUMBERS)
            return self._set_header(data, (b"Max-Forwards",), b"Max-Forwards: " + value)
        if what == 1:
            method = r.choice((b"KDMQ", b"OPTIONS", b"INVITE", b"", b"KDMQ KDMQ"))
            value = r.choice(_NUMBERS) + b" " + method
            return self._set_header(data, (b"CSeq",), b"CSeq: " + value)
        if what == 2:
            call_id = r.choice((b"", b"a b", b"x" * 2000, r.randbytes(8).hex().encode()))
            return self._set_header(data, (b"Call-ID", b"i"), b"Call-ID: " + call_id)
        if what == 3:
            uri = r.choice(_SCHEMES) + r.choice(_USERS) + b"@" + r.choice(_HOSTS)
            tag = r.choice((b";tag=x", b";tag=", b"", b";tag"))
            value = r.choice((b"<" + uri + b">" + tag, uri + tag, b'"\xff" <' + uri + b">", b"<"))
            names = r.choice(((b"From", b"f"), (b"To", b"t")))
            return self._set_header(data, names, names[0] + b": " + value)
        name = r.choice(_HEADER_NAMES)
        return self._set_header(data, (name or b"X",), name + b": " + r.randbytes(r.randrange(40)))

    # -- body ---------------------------------------------------------------------------------
    def _node_line(self) -> bytes:
        r = self.rng
        a, b = r.randrange(256), r.randrange(256)
        host = r.choice((b"127.0.0.1", b"127.0.0.2", b"127.0.%d.%d" % (a, b), b"[::1]",
                         b"localhost", b"127.0.0.1x", b"[::ffff:127.0.0.1]"))  # fmt: skip
        port = r.choice((b":5060", b":%d" % r.randrange(70000), b"", b":"))
        status = r.choice((b";status=active", b";status=disabled", b";status=x", b""))
        transport = r.choice((b"", b"", b";transport=tcp", b";transport=tls", b";transport=x"))
        return b"sip:" + host + port + transport + status

    def body(self, data: bytes) -> bytes:
        r = self.rng
        head, _ = _head_body(data)
        choice = r.randrange(4)
        if choice == 0:
            body = r.choice(_BODIES)
        elif choice == 1:  # many notification lines, some odd
            lines = self._choices(self._node_lines, k=r.choice((1, 5, 40, 500, 3000)))
            body = b"\r\n".join(lines) + r.choice((b"\r\n", b"", b"\n"))
        elif choice == 2:
            body = r.randbytes(r.randrange(0, 3000))
        else:
            unit = r.choice(_BODIES)
            body = unit * min(r.choice((2, 50, 1000)), self.max_size // len(unit) + 1)
        body = body[: self.max_size]
        head = self._set_header(
            head + b"\r\n\r\n", (b"Content-Length", b"l"), b"Content-Length: %d" % len(body)
        )
        return head + body
