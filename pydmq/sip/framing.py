"""Sans-I/O framing of SIP messages on a byte stream (TCP, TLS).

A stream has no datagram boundaries, so a message ends where its header block (terminated by an
empty line) plus ``Content-Length`` body bytes end (RFC 3261 §18.3; a missing Content-Length on a
stream means an empty body). CR/LF bytes between messages are skipped (RFC 3261 §7.5), and a
double CRLF there is an RFC 5626 keep-alive ping, which the transport answers with one CRLF.

The framer does only the minimal header scan needed to find Content-Length; parsing the message is
``pydmq.sip.message``'s job. Memory is bounded: an unterminated header block is refused once it
exceeds ``max_headers_bytes``, and a declared message larger than ``max_size`` is refused before its
body is read, so a peer can never make the buffer grow beyond ``max_size`` plus one read.
"""

from __future__ import annotations

import re

from pydmq.sip.errors import SipParseError

__all__ = ["DEFAULT_MAX_HEADERS_BYTES", "DEFAULT_MAX_SIZE", "StreamFramer"]

#: Kamailio's default BUF_SIZE: the largest SIP message it accepts.
DEFAULT_MAX_SIZE = 65535
#: Generous for DMQ (its header blocks are a few hundred bytes), small enough to refuse junk early.
DEFAULT_MAX_HEADERS_BYTES = 16384

_HEADER_END = b"\r\n\r\n"
_PING = b"\r\n\r\n"
# `Content-Length` or its compact form `l`, any case, then the value including folded lines.
_CONTENT_LENGTH = re.compile(
    rb"\r\n(?:content-length|l)[ \t]*:((?:[^\r\n]|\r\n[ \t])*)", re.IGNORECASE
)
_MAX_CL_DIGITS = 10


class StreamFramer:
    """Cut complete SIP messages out of a stream, one instance per connection.

    After :meth:`feed` raised :class:`SipParseError` the framing is lost for good (the stream
    position of the next message is unknown), so the framer keeps raising and the connection must
    be closed.
    """

    __slots__ = (
        "_buf",
        "_error",
        "_gap_state",
        "_need",
        "_scanned",
        "max_headers_bytes",
        "max_size",
        "pings",
    )

    def __init__(
        self,
        max_size: int = DEFAULT_MAX_SIZE,
        max_headers_bytes: int = DEFAULT_MAX_HEADERS_BYTES,
    ) -> None:
        if max_size <= 0 or max_headers_bytes <= 0:
            raise ValueError("max_size and max_headers_bytes must be positive")
        self.max_size = max_size
        self.max_headers_bytes = min(max_headers_bytes, max_size)
        #: RFC 5626 double-CRLF pings seen and not yet taken with :meth:`take_pings`.
        self.pings = 0
        self._buf = bytearray()
        self._scanned = 0  # bytes of the pending message already searched for the header end
        self._need = -1  # total length of the pending message once its header block is known
        self._gap_state = 0  # how much of b"\r\n\r\n" the current inter-message gap has matched
        self._error: SipParseError | None = None

    @property
    def buffered(self) -> int:
        """Bytes held back waiting for the rest of a message."""
        return len(self._buf)

    def take_pings(self) -> int:
        """Return how many keep-alive pings arrived since the last call (answer each with CRLF)."""
        n = self.pings
        self.pings = 0
        return n

    def feed(self, data: bytes) -> list[bytes]:
        """Add ``data`` from the stream; return the messages it completed, in order."""
        if self._error is not None:
            raise self._error
        src: bytes | bytearray
        if self._buf:
            self._buf += data
            src = self._buf
        else:
            # Fast path: nothing pending, so messages are sliced straight out of ``data`` (a
            # read holding exactly one message is returned without any copy).
            src = data
        try:
            out, pos = self._cut(src)
        except SipParseError as exc:
            self._error = exc
            self._buf = bytearray()
            raise
        if src is self._buf:
            del self._buf[:pos]
        elif pos < len(data):
            self._buf = bytearray(data[pos:])
        return out

    def _cut(self, src: bytes | bytearray) -> tuple[list[bytes], int]:
        out: list[bytes] = []
        pos = 0
        end = len(src)
        while pos < end:
            if self._need < 0:
                if self._scanned == 0:
                    pos = self._skip_gap(src, pos, end)
                    if pos >= end:
                        break
                idx = src.find(_HEADER_END, pos + self._scanned)
                if idx < 0:
                    avail = end - pos
                    # A terminator found later would end at avail + 1 or beyond.
                    if avail >= self.max_headers_bytes:
                        raise SipParseError("Header block too large")
                    self._scanned = max(0, avail - 3)
                    break
                head_len = idx + 4 - pos
                if head_len > self.max_headers_bytes:
                    raise SipParseError("Header block too large")
                need = head_len + _content_length(src, pos, idx)
                if need > self.max_size:
                    raise SipParseError("Message too large")
                self._need = need
            need = self._need
            if end - pos < need:
                break
            if pos == 0 and need == end and type(src) is bytes:
                out.append(src)
            else:
                out.append(bytes(src[pos : pos + need]))
            pos += need
            self._need = -1
            self._scanned = 0
        return out, pos

    def _skip_gap(self, src: bytes | bytearray, pos: int, end: int) -> int:
        """Skip CR/LF before a message, counting each CRLFCRLF in the gap as a ping."""
        state = self._gap_state
        while pos < end:
            b = src[pos]
            if b not in (13, 10):  # neither CR nor LF
                self._gap_state = 0
                return pos
            if b == _PING[state]:
                state += 1
                if state == 4:
                    self.pings += 1
                    state = 0
            else:
                state = 1 if b == 13 else 0
            pos += 1
        self._gap_state = state
        return pos


def _content_length(src: bytes | bytearray, start: int, header_end: int) -> int:
    """The Content-Length of the header block ``src[start:header_end]`` (0 when absent)."""
    value = -1
    for m in _CONTENT_LENGTH.finditer(src, start, header_end):
        text = bytes(m.group(1)).replace(b"\r\n", b"").strip(b" \t")
        if not text.isdigit() or len(text) > _MAX_CL_DIGITS:
            raise SipParseError("Bad Content-Length")
        n = int(text)
        if value >= 0 and n != value:
            raise SipParseError("Conflicting Content-Length headers")
        value = n
    return max(value, 0)
