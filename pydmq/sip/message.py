"""SIP requests and responses (RFC 3261 §7): lazy parsing, faithful serialisation.

Design, driven by the DMQ hot path (parse a KDMQ request or reply, look at a few headers, answer):

* ``parse_message`` checks the :class:`Limits` first, then does only C-level ``bytes`` work: it
  finds the empty line, counts lines, parses the start line and finds Content-Length. Header rows
  are split and decoded on the first header access, and typed values (``via``, ``from_``...)
  are parsed on their own first access and cached.
* Header text is decoded as UTF-8 with ``errors="surrogateescape"``: valid UTF-8 (display names)
  reads naturally, any other byte survives as a lone surrogate and is written back unchanged, so
  no input byte sequence can make decoding or re-encoding fail.
* ``to_bytes()`` of an unmodified CRLF message whose Content-Length matched its body returns the
  received bytes; otherwise it writes the start line, every row in order (rows that were not
  touched keep their exact text, folding included), Content-Length set to ``len(body)`` (added
  at the end if absent), CRLF everywhere.
* Mandatory headers are *not* checked by ``parse_message`` (that would cost the parse-only path
  four header parses). The receiver calls :func:`validate_request`: after it, a request is either
  usable, or :class:`BadRequestError` (``answerable``; ``exc.request`` feeds ``make_response``),
  or a plain :class:`SipParseError` (drop). ``parse_message`` itself raises
  :class:`BadRequestError` for a request whose head is sound but whose Content-Length is bad or
  whose body is too large.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from dataclasses import dataclass

from pydmq.sip.errors import SipParseError
from pydmq.sip.headers import (
    COMMA_HEADERS,
    NAME_CACHE,
    CSeq,
    NameAddr,
    Via,
    canonical_name,
    first_element,
    is_token,
    split_commas,
)
from pydmq.sip.memo import remember
from pydmq.sip.uri import SipUri

__all__ = [
    "DEFAULT_LIMITS",
    "BadRequestError",
    "CSeq",
    "Limits",
    "NameAddr",
    "Request",
    "Response",
    "SipMessage",
    "Via",
    "make_response",
    "new_branch",
    "new_call_id",
    "new_tag",
    "parse_message",
    "validate_request",
    "validate_response",
]

#: RFC 3261 §8.1.1.7 magic cookie that marks a branch as globally unique.
BRANCH_COOKIE = "z9hG4bK"

_ENCODING = "utf-8"
_ERRORS = "surrogateescape"
_WS = " \t"

# One header row: (lookup key, name as written, unfolded value, original text or None).
# The key is "" for a line that is not a header (no colon, bad name, stray continuation).
_Row = tuple[str, str, str, str | None]

_MANDATORY = ("via", "from", "to", "call-id", "cseq")
_MANDATORY_KEYS = frozenset(_MANDATORY)
_SINGLETONS = {"from": "From", "to": "To", "call-id": "Call-ID", "cseq": "CSeq"}


@dataclass(frozen=True, slots=True)
class Limits:
    """Upper bounds checked before any parsing work, so hostile input costs O(1) to refuse.

    ``max_headers`` counts physical header lines (continuation lines included); ``max_line`` is
    the length of one physical line without its line ending.
    """

    max_size: int = 65535
    max_headers: int = 100
    max_line: int = 8192


DEFAULT_LIMITS = Limits()


class BadRequestError(SipParseError):
    """A request that cannot be used but can be answered with ``400 <reason>``.

    Always ``answerable``; ``request`` holds what was read (its request line, Via, From, To,
    Call-ID and CSeq are sound), ready for ``make_response(exc.request, 400, exc.reason)``.
    """

    def __init__(self, reason: str, request: Request) -> None:
        super().__init__(reason, answerable=True)
        self.request = request


def new_branch() -> str:
    """A fresh RFC 3261 branch: the magic cookie plus 64 random bits."""
    return BRANCH_COOKIE + secrets.token_hex(8)


def new_tag() -> str:
    """A fresh From/To tag (64 random bits, RFC 3261 §19.3 asks for at least 32)."""
    return secrets.token_hex(8)


def new_call_id(host: str) -> str:
    """A fresh Call-ID ``<random>@<host>`` (RFC 3261 §8.1.1.4)."""
    return f"{secrets.token_hex(10)}@{host}"


def _check_value(value: str) -> str:
    """Refuse values that would break the framing when written (header injection)."""
    if "\r" in value or "\n" in value or "\0" in value:
        raise ValueError("header value contains CR, LF or NUL")
    if not value.isascii():
        value.encode(_ENCODING, _ERRORS)  # UnicodeEncodeError (a ValueError): bad surrogates
    return value.strip(_WS)


def _make_row(name: str, value: str) -> _Row:
    key, clean = canonical_name(name)
    if not key or clean != name:
        raise ValueError(f"invalid header name {name!r}")
    return (key, name, _check_value(value), None)


def _split_rows(data: bytes, hs: int, he: int, crlf: bool) -> list[_Row]:
    """Turn the header block ``data[hs:he]`` into rows, joining continuation lines."""
    if hs >= he:
        return []
    text = data[hs:he].decode(_ENCODING, _ERRORS)
    if crlf:
        lines = text.split("\r\n")
    else:
        lines = [ln[:-1] if ln[-1:] == "\r" else ln for ln in text.split("\n")]
    rows: list[_Row] = []
    append = rows.append
    known = NAME_CACHE.get
    for line in lines:
        name, colon, value = line.partition(":")
        hit = known(name)
        if hit is not None and colon:
            # The cache holds only valid names, and a continuation line starts with blanks,
            # so a hit is always a new header row.
            append((hit[0], hit[1], value.strip(_WS), line))
        else:
            _odd_row(rows, line)
    return rows


def _odd_row(rows: list[_Row], line: str) -> None:
    """The rare cases of ``_split_rows``: continuation, first sight of a name, junk."""
    if line[:1] in {" ", "\t"}:
        # RFC 3261 §7.3.1: CRLF + whitespace continues the previous value, as one SP.
        if rows:
            key, name, value, raw = rows[-1]
            more = line.strip(_WS)
            if more:
                value = f"{value} {more}" if value else more
            rows[-1] = (key, name, value, f"{raw}\r\n{line}")
            return
    else:
        colon = line.find(":")
        if colon > 0:
            key, name = canonical_name(line[:colon])
            if key:
                rows.append((key, name, line[colon + 1 :].strip(_WS), line))
                return
    rows.append(("", line, "", line))


class SipMessage:
    """What requests and responses share: header rows, body, typed accessors, serialisation.

    Header names are case-insensitive and compact forms are accepted everywhere a name is. Typed
    accessors are cached: treat what they return as read-only and write changes back with
    :meth:`set` / :meth:`replace_top_via`, which also drop the caches.
    """

    __slots__ = (
        "_body",
        "_cl",
        "_crlf",
        "_cseq",
        "_data",
        "_first",
        "_from",
        "_he",
        "_hs",
        "_raw",
        "_rows",
        "_to",
        "_via",
        "_via0",
        "_vias",
    )

    _data: bytes  # the received bytes (b"" for a built message)
    _hs: int  # offset of the first header line
    _he: int  # offset of the end of the header block (before the empty line)
    _crlf: bool  # every line in the head ended with CRLF
    _rows: list[_Row] | None  # None until the first header access
    _raw: bytes | None  # what to_bytes() returns, while it is known
    _body: bytes
    _cl: int | None  # Content-Length as received
    # Derived from the rows, None until first needed; _changed() drops them all.
    _first: dict[str, str] | None  # key -> first value: one dict lookup per header access
    _via: Via | None
    _via0: tuple[str, str, int | None, dict[str, str | None]] | None  # _via as parsed
    _vias: list[Via] | None
    _from: NameAddr | None
    _to: NameAddr | None
    _cseq: CSeq | None

    def _init_built(self, headers: Iterable[tuple[str, str]], body: bytes) -> None:
        self._data = b""
        self._hs = self._he = 0
        self._crlf = True
        self._rows = [_make_row(n, v) for n, v in headers]
        self._raw = None
        self._body = bytes(body)
        self._cl = None
        self._changed()

    # -- rows ---------------------------------------------------------------------------------

    def _get_rows(self) -> list[_Row]:
        rows = self._rows
        if rows is None:
            rows = self._rows = _split_rows(self._data, self._hs, self._he, self._crlf)
        return rows

    def _changed(self) -> None:
        self._raw = None
        self._first = self._via = self._via0 = self._vias = None
        self._from = self._to = self._cseq = None

    def _first_values(self) -> dict[str, str]:
        """``{key: first value}``, built once: the receive path reads ~8 headers, each of
        which would otherwise scan the rows. Its length tells whether any key repeats."""
        first = self._first
        if first is None:
            first = self._first = {row[0]: row[2] for row in reversed(self._get_rows())}
        return first

    def _first_value(self, key: str) -> str | None:
        first = self._first
        if first is None:
            first = self._first_values()
        return first.get(key)

    def get(self, name: str) -> str | None:
        """First value of ``name``; for comma-list headers the first element (``Via: a, b``
        gives ``a``). ``None`` when absent."""
        key = canonical_name(name)[0]
        if not key:
            return None
        value = self._first_value(key)
        if value is None or key not in COMMA_HEADERS:
            return value
        for k, _, v, _ in self._get_rows():
            if k == key:
                element = first_element(v)
                if element is not None:
                    return element
        return ""

    def get_all(self, name: str) -> list[str]:
        """Every value of ``name`` in order, comma lists split (see ``headers.COMMA_HEADERS``)."""
        key = canonical_name(name)[0]
        if not key:
            return []
        values = [v for k, _, v, _ in self._get_rows() if k == key]
        if key in COMMA_HEADERS:
            return [part for v in values for part in split_commas(v)]
        return values

    def header_items(self) -> list[tuple[str, str]]:
        """``(name as written, unfolded value)`` per header row, in order; non-header lines
        that were tolerated at parse time are left out."""
        return [(n, v) for k, n, v, _ in self._get_rows() if k]

    def add(self, name: str, value: str, *, first: bool = False) -> None:
        """Append a row (after all others), or with ``first=True`` put it before the first row
        of the same name (or at the top): that is how a Via is pushed."""
        row = _make_row(name, value)
        rows = self._get_rows()
        if first:
            key = row[0]
            index = next((i for i, r in enumerate(rows) if r[0] == key), 0)
            rows.insert(index, row)
        else:
            rows.append(row)
        self._changed()

    def set(self, name: str, value: str) -> None:
        """Replace every row of ``name`` by one, at the place (and in the spelling) of the
        first; appended if there is none."""
        row = _make_row(name, value)
        key = row[0]
        rows = self._get_rows()
        out: list[_Row] = []
        placed = False
        for r in rows:
            if r[0] == key:
                if not placed:
                    out.append((key, r[1], row[2], None))  # keep the spelling in place
                    placed = True
            else:
                out.append(r)
        if not placed:
            out.append(row)
        rows[:] = out
        self._changed()

    def remove(self, name: str) -> None:
        """Remove every row of ``name`` (no error when there is none)."""
        key = canonical_name(name)[0]
        if not key:
            return
        rows = self._get_rows()
        rows[:] = [r for r in rows if r[0] != key]
        self._changed()

    def replace_top_via(self, via: Via | str) -> None:
        """Replace only the topmost Via value (e.g. to add ``received``/``rport``, RFC 3581),
        keeping any other value on the same row."""
        text = _check_value(str(via))
        rows = self._get_rows()
        for i, (key, name, value, _) in enumerate(rows):
            if key == "via":
                rest = _after_first_element(value)
                rows[i] = (key, name, f"{text}, {rest}" if rest else text, None)
                self._changed()
                return
        raise SipParseError("Missing Via")

    # -- typed accessors ----------------------------------------------------------------------

    @property
    def via(self) -> Via:
        """The topmost Via."""
        via = self._via
        if via is None:
            value = self._first_value("via")
            if value is None:
                raise SipParseError("Missing Via")
            element = first_element(value)
            if element is None:
                raise SipParseError("Bad Via")
            via = self._via = Via.parse(element)
            # What it was when parsed: make_response compares, to tell whether it was edited
            # in place (the transport stamps received/rport there) without parsing it again.
            self._via0 = (via.transport, via.host, via.port, via.params.copy())
        return via

    @property
    def vias(self) -> list[Via]:
        """Every Via, top first."""
        vias = self._vias
        if vias is None:
            vias = self._vias = [Via.parse(v) for v in self.get_all("via")]
        return vias

    @property
    def from_(self) -> NameAddr:
        addr = self._from
        if addr is None:
            addr = self._from = self._parse_name_addr("from", "From")
        return addr

    @property
    def to(self) -> NameAddr:
        addr = self._to
        if addr is None:
            addr = self._to = self._parse_name_addr("to", "To")
        return addr

    def _parse_name_addr(self, key: str, what: str) -> NameAddr:
        value = self._first_value(key)
        if value is None:
            raise SipParseError(f"Missing {what}")
        return NameAddr.parse(value, what)

    @property
    def call_id(self) -> str:
        value = self._first_value("call-id")
        if value is None:
            raise SipParseError("Missing Call-ID")
        if not value or " " in value or "\t" in value:
            raise SipParseError("Bad Call-ID")
        return value

    @property
    def cseq(self) -> CSeq:
        cseq = self._cseq
        if cseq is None:
            value = self._first_value("cseq")
            if value is None:
                raise SipParseError("Missing CSeq")
            cseq = self._cseq = CSeq.parse(value)
        return cseq

    @property
    def max_forwards(self) -> int | None:
        """Max-Forwards, 0..255 (RFC 3261 §20.22); ``None`` when absent."""
        value = self._first_value("max-forwards")
        if value is None:
            return None
        if not value.isdigit() or not value.isascii() or len(value) > 3 or int(value) > 255:
            raise SipParseError("Bad Max-Forwards")
        return int(value)

    @property
    def content_length(self) -> int | None:
        """The Content-Length header as it stands (``to_bytes`` writes ``len(body)`` anyway)."""
        if self._rows is None:
            return self._cl
        value = self._first_value("content-length")
        if value is None:
            return None
        if not value.isdigit() or not value.isascii() or len(value) > 10:
            raise SipParseError("Bad Content-Length")
        return int(value)

    @property
    def content_type(self) -> str | None:
        return self._first_value("content-type")

    @property
    def body(self) -> bytes:
        return self._body

    @body.setter
    def body(self, value: bytes) -> None:
        self._body = bytes(value)
        self._raw = None

    # -- serialisation ------------------------------------------------------------------------

    def _start_line(self) -> str:
        raise NotImplementedError

    def to_bytes(self) -> bytes:
        """The message on the wire: CRLF line endings, Content-Length equal to ``len(body)``."""
        raw = self._raw
        if raw is not None:
            return raw
        body = self._body
        out = [self._start_line()]
        has_cl = False
        for key, name, value, line in self._get_rows():
            if key == "content-length":
                if not has_cl:
                    has_cl = True
                    out.append(f"{name}: {len(body)}")
            elif line is not None:
                out.append(line)
            else:
                out.append(f"{name}: {value}")
        if not has_cl:
            out.append(f"Content-Length: {len(body)}")
        out.append("\r\n")
        raw = self._raw = "\r\n".join(out).encode(_ENCODING, _ERRORS) + body
        return raw

    __bytes__ = to_bytes


class Request(SipMessage):
    """A SIP request. ``uri`` is the Request-URI text as written; ``ruri`` parses it lazily."""

    __slots__ = ("_method", "_ruri", "_uri")

    _method: str
    _uri: str
    _ruri: SipUri | None

    def __init__(
        self,
        method: str,
        uri: str | SipUri,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
    ) -> None:
        self.method = method
        self.uri = str(uri)
        self._init_built(headers, body)

    @classmethod
    def build(
        cls,
        method: str,
        uri: str | SipUri,
        *,
        via: Via | str,
        from_: NameAddr | str,
        to: NameAddr | str,
        call_id: str,
        cseq: CSeq | int,
        max_forwards: int | None = 70,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
    ) -> Request:
        """A request to originate, headers in Kamailio tm's order: Via, To, From, CSeq, Call-ID,
        Content-Length, Max-Forwards (left out when ``None``), then ``headers`` (e.g.
        User-Agent, Content-Type). An ``int`` cseq takes the request's method."""
        if isinstance(cseq, int):
            cseq = CSeq(cseq, method)
        rows = [
            ("Via", str(via)),
            ("To", str(to)),
            ("From", str(from_)),
            ("CSeq", str(cseq)),
            ("Call-ID", call_id),
            ("Content-Length", str(len(body))),
        ]
        if max_forwards is not None:
            rows.append(("Max-Forwards", str(max_forwards)))
        rows.extend(headers)
        return cls(method, uri, rows, body)

    @property
    def method(self) -> str:
        return self._method

    @method.setter
    def method(self, value: str) -> None:
        if not is_token(value):
            raise ValueError(f"invalid method {value!r}")
        self._method = value
        self._raw = None

    @property
    def uri(self) -> str:
        return self._uri

    @uri.setter
    def uri(self, value: str) -> None:
        if not value or value != value.strip() or any(c in value for c in " \t\r\n\0"):
            raise ValueError(f"invalid Request-URI {value!r}")
        self._uri = value
        self._ruri = None
        self._raw = None

    @property
    def ruri(self) -> SipUri:
        """The parsed Request-URI (cached)."""
        ruri = self._ruri
        if ruri is None:
            try:
                ruri = self._ruri = SipUri.parse(self._uri)
            except SipParseError:
                raise SipParseError("Bad Request-URI") from None
        return ruri

    def _start_line(self) -> str:
        return f"{self._method} {self._uri} SIP/2.0"

    def __repr__(self) -> str:
        return f"<Request {self._method} {self._uri}>"


class Response(SipMessage):
    """A SIP response."""

    __slots__ = ("_reason", "_status")

    _status: int
    _reason: str

    def __init__(
        self,
        status: int,
        reason: str,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
    ) -> None:
        self.status = status
        self.reason = reason
        self._init_built(headers, body)

    @property
    def status(self) -> int:
        return self._status

    @status.setter
    def status(self, value: int) -> None:
        if not 100 <= value <= 699:
            raise ValueError(f"invalid status {value!r}")
        self._status = value
        self._raw = None

    @property
    def reason(self) -> str:
        return self._reason

    @reason.setter
    def reason(self, value: str) -> None:
        self._reason = _check_value(value)
        self._raw = None

    def _start_line(self) -> str:
        return f"SIP/2.0 {self._status} {self._reason}"

    def __repr__(self) -> str:
        return f"<Response {self._status} {self._reason}>"


# -- parsing ----------------------------------------------------------------------------------

# Method bytes -> str for methods already seen, so the common ones cost one lookup.
_METHODS: dict[bytes, str] = {
    m.encode(): m
    for m in ("KDMQ", "OPTIONS", "MESSAGE", "INVITE", "ACK", "BYE", "CANCEL", "REGISTER")
}
_METHODS_MAX = 256


def _bad(reason: str) -> SipParseError:
    return SipParseError(reason)


def parse_message(data: bytes, limits: Limits = DEFAULT_LIMITS) -> Request | Response:
    """Parse one SIP message (a datagram, or one message cut from a stream).

    Raises only :class:`SipParseError`; see the module docstring for what is checked here and
    what is left to first access / :func:`validate_request`. CRLFs before the start line are
    skipped, LF-only line endings are accepted; bytes after Content-Length are ignored.
    """
    if type(data) is not bytes:
        data = bytes(data)
    if len(data) > limits.max_size:
        raise _too_large(data, limits)
    return _parse(data, limits, False)


def _too_large(data: bytes, limits: Limits) -> SipParseError:
    """Still answer a request whose *head* fits in the limit (RFC 3261 §21.5.14 spirit)."""
    try:
        msg = _parse(data[: limits.max_size], limits, True)
    except SipParseError:
        return SipParseError("Message too large")
    return _failure("Message too large", msg)


def _failure(reason: str, msg: Request | Response) -> SipParseError:
    if isinstance(msg, Request) and _mandatory_error(msg) is None:
        return BadRequestError(reason, msg)
    return SipParseError(reason)


def _find_head(data: bytes) -> tuple[int, int, int, bool]:
    """General head finder: ``(head end, body start, LF count, all-CRLF)``.

    The head ends at the first empty line, whether written CRLF or bare LF. A CR that is not
    part of a CRLF is refused: it would be a line break to some parsers and not to others.
    """
    n = len(data)
    i = data.find(b"\n\r\n")
    j = data.find(b"\n\n", 0, n if i < 0 else i + 1)
    if j >= 0:
        he, bs = j, j + 2
    elif i >= 0:
        he, bs = i, i + 3
    else:
        raise _bad("Empty message" if not n else "Missing empty line")
    if data[he - 1] == 13:
        he -= 1
    nl = data.count(b"\n", 0, he)
    ncrlf = data.count(b"\r\n", 0, he)
    if data.count(b"\r", 0, he) != ncrlf:
        raise _bad("Bad line ending")
    return he, bs, nl, ncrlf == nl


def _parse(data: bytes, limits: Limits, head_only: bool) -> Request | Response:
    if data and (data[0] == 13 or data[0] == 10):
        data = data.lstrip(b"\r\n")
    n = len(data)
    # Fast path: the first CRLFCRLF ends a head whose every LF is part of a CRLF. (With no bare
    # LF before it, no earlier "\n\n" or "\n\r\n" empty line can exist.)
    he = data.find(b"\r\n\r\n")
    if he > 0:
        nl = data.count(b"\n", 0, he)
        if nl > limits.max_headers:
            raise _bad("Too many headers")
        if data.count(b"\r\n", 0, he) == nl:
            if data.count(b"\r", 0, he) != nl:
                raise _bad("Bad line ending")
            bs = he + 4
            crlf = True
        else:
            he, bs, nl, crlf = _find_head(data)
    else:
        he, bs, nl, crlf = _find_head(data)
    if nl > limits.max_headers:
        raise _bad("Too many headers")
    if he > limits.max_line:
        if crlf:
            longest = max(map(len, data[:he].split(b"\r\n")))
        else:
            longest = max(len(ln) - (ln[-1:] == b"\r") for ln in data[:he].split(b"\n"))
        if longest > limits.max_line:
            raise _bad("Line too long")
    if data.find(b"\0", 0, he) >= 0:
        raise _bad("Bad character in header")

    sl = data.find(b"\n", 0, he)
    if sl < 0:
        first = data[:he]
        hs = he
    else:
        first = data[: sl - 1] if data[sl - 1] == 13 else data[:sl]
        hs = sl + 1

    msg: Request | Response
    if first.startswith(b"SIP/2.0 ") or first[:8].upper() == b"SIP/2.0 ":
        code = first[8:11]
        if (
            len(code) != 3
            or not code.isdigit()
            or code[0] not in b"123456"
            or (len(first) > 11 and first[11] != 32)
        ):
            raise _bad("Bad status line")
        msg = Response.__new__(Response)
        msg._status = int(code)
        msg._reason = first[12:].decode(_ENCODING, _ERRORS)
    else:
        sp1 = first.find(b" ")
        sp2 = first.find(b" ", sp1 + 1)
        if sp1 <= 0 or sp2 <= sp1 + 1:
            raise _bad("Bad request line")
        version = first[sp2 + 1 :]
        if version != b"SIP/2.0" and version.upper() != b"SIP/2.0":
            raise _bad("Bad request line")
        mb = first[:sp1]
        method = _METHODS.get(mb)
        if method is None:
            method = mb.decode("latin-1")
            if not is_token(method):
                raise _bad("Bad request line")
            if len(mb) <= 32 and len(_METHODS) < _METHODS_MAX:
                _METHODS[mb] = method
        msg = Request.__new__(Request)
        msg._method = method
        msg._uri = first[sp1 + 1 : sp2].decode(_ENCODING, _ERRORS)
        msg._ruri = None

    msg._data = data
    msg._hs = hs
    msg._he = he
    msg._crlf = crlf
    msg._raw = None
    msg._body = b""
    msg._cl = None
    msg._rows = None
    msg._first = msg._via = msg._via0 = msg._vias = msg._from = msg._to = msg._cseq = None
    if head_only:
        return msg

    # Content-Length: a case-insensitive search of the head for a line starting with the long
    # or the compact name, instead of splitting rows. Every occurrence is looked at: two
    # Content-Length headers are refused (request smuggling). A folded value uses the rows.
    low = data[:he].lower()
    cl_text: bytes | None = None
    dup = folded = False
    for pat in (b"\ncontent-length", b"\nl"):
        p = low.find(pat)
        while p >= 0:
            q = p + len(pat)
            while q < he and (low[q] == 32 or low[q] == 9):
                q += 1
            if q < he and low[q] == 58:  # ":"
                eol = low.find(b"\n", q)
                if eol < 0:
                    eol = he
                elif eol + 1 < he and (low[eol + 1] == 32 or low[eol + 1] == 9):
                    folded = True
                dup = cl_text is not None
                cl_text = low[q + 1 : eol].strip(b" \t\r")
            p = low.find(pat, q)
    if folded:
        values = [v for k, _, v, _ in msg._get_rows() if k == "content-length"]
        cl_text = values[0].encode(_ENCODING, _ERRORS)
        dup = len(values) > 1

    avail = n - bs
    if cl_text is None:
        msg._body = data[bs:]
        return msg  # _raw stays None: to_bytes() must add a Content-Length
    if dup or not cl_text.isdigit() or len(cl_text) > 10 or int(cl_text) > avail:
        raise _failure("Bad Content-Length", msg)
    cl = msg._cl = int(cl_text)
    if cl == avail:
        msg._body = data[bs:] if cl else b""
        if crlf:
            msg._raw = data
    else:
        msg._body = data[bs : bs + cl]
        if crlf:
            msg._raw = data[: bs + cl]
    return msg


# -- validation -------------------------------------------------------------------------------


def _mandatory_error(msg: SipMessage) -> str | None:
    """Reason why Via/From/To/Call-ID/CSeq cannot be read, or None. Never raises."""
    rows = msg._get_rows()
    if len(msg._first_values()) < len(rows):  # some key repeats: count the singletons
        counts = dict.fromkeys(_MANDATORY, 0)
        for row in rows:
            key = row[0]
            if key in counts:
                counts[key] += 1
        for key, name in _SINGLETONS.items():
            if counts[key] > 1:
                return f"Duplicate {name}"
    try:
        msg.via  # noqa: B018 - parse, raising if malformed
        msg.from_  # noqa: B018
        msg.to  # noqa: B018
        msg.call_id  # noqa: B018
        msg.cseq  # noqa: B018
    except SipParseError as exc:
        return exc.reason
    return None


def validate_request(req: Request) -> None:
    """Decide whether a parsed request is usable (returns), answerable (raises
    :class:`BadRequestError`) or to be dropped (raises a plain :class:`SipParseError`).

    Drop: a Via, From, To, Call-ID or CSeq that is missing, malformed or (From/To/Call-ID/CSeq)
    repeated, since no valid reply could be built or routed. Answerable: a stray non-header line,
    a bad Request-URI or Max-Forwards, or a CSeq method that is not the request's. Only the top
    Via is parsed (all a UAS uses, RFC 3261 §8.2.6): the others are copied to a reply verbatim,
    and parsing thousands of them would let one datagram buy milliseconds of CPU.
    """
    reason = _mandatory_error(req)
    if reason is not None:
        raise SipParseError(reason)
    reason = _secondary_error(req)
    if reason is not None:
        raise BadRequestError(reason, req)


def _secondary_error(req: Request) -> str | None:
    if "" in req._first_values():  # the key of a line that is not a header
        return "Bad header line"
    try:
        req.ruri  # noqa: B018
        req.max_forwards  # noqa: B018
    except SipParseError as exc:
        return exc.reason
    if req.cseq.method != req.method:
        return "CSeq method mismatch"
    return None


def validate_response(resp: Response) -> None:
    """Raise :class:`SipParseError` unless Via, From, To, Call-ID and CSeq are readable, which
    response matching (RFC 3261 §17.1.3) and §18.1.2 need. Responses are never answered."""
    reason = _mandatory_error(resp)
    if reason is not None:
        raise SipParseError(reason)


# -- responses --------------------------------------------------------------------------------


def make_response(
    request: Request,
    status: int,
    reason: str,
    *,
    to_tag: str | None = None,
    extra_headers: Iterable[tuple[str, str]] = (),
    body: bytes = b"",
    content_type: str | None = None,
) -> Response:
    """Build a response per RFC 3261 §8.2.6.

    Via (every row), From, To, Call-ID and CSeq are copied in the request's order and spelling.
    If the cached ``request.via`` was changed in place (the transport stamps ``received`` and
    ``rport`` there, RFC 3581 / §18.2.1), the top Via is written as it now stands.
    The To gets ``;tag=`` (``to_tag`` or a fresh one) when it has none, except on 100 Trying.
    Then Content-Type (when given), ``extra_headers`` in order (e.g. Server), Content-Length:
    the layout of Kamailio's sl replies. Never raises for a malformed request (a bad To is
    copied without a tag).

    A response is built to be sent: its bytes are joined here, in the same pass as its rows,
    rather than by a second walk in ``to_bytes``.
    """
    if not 100 <= status <= 699:
        raise ValueError(f"invalid status {status!r}")
    reason = _check_constant(reason)
    if type(body) is not bytes:
        body = bytes(body)
    rows: list[_Row] = []
    lines = [f"SIP/2.0 {status} {reason}"]
    tag_to = status != 100
    top_via = _edited_top_via(request)
    mandatory = _MANDATORY_KEYS
    for old in request._get_rows():
        key = old[0]
        if key not in mandatory:
            continue
        row = old
        if key == "via":
            if top_via is not None:
                rest = _after_first_element(old[2])
                row = _text_row(key, old[1], f"{top_via}, {rest}" if rest else top_via)
                top_via = None
        elif key == "to" and tag_to:
            tag_to = False  # only the first To (a second one makes the request unusable anyway)
            try:
                to = request.to
            except SipParseError:
                has_tag = True
            else:
                has_tag = "tag" in to.params or to.has_param("tag")
            if not has_tag:
                tag = _check_constant(to_tag) if to_tag else new_tag()
                row = _text_row(key, old[1], f"{old[2]};tag={tag}")
        rows.append(row)
        line = row[3]
        lines.append(f"{row[1]}: {row[2]}" if line is None else line)
    eager = True  # False if a caller's header is a Content-Length: to_bytes() rewrites it
    if content_type is not None:
        row = _constant_row("Content-Type", content_type)
        rows.append(row)
        lines.append(row[3] or "")
    for name, value in extra_headers:
        row = _constant_row(name, value)
        rows.append(row)
        lines.append(row[3] or "")
        if row[0] == "content-length":
            eager = False
    length = str(len(body))
    rows.append(("content-length", "Content-Length", length, None))
    resp = Response.__new__(Response)
    resp._status = status
    resp._reason = reason
    resp._data = b""
    resp._hs = resp._he = 0
    resp._crlf = True
    resp._body = body
    resp._cl = None
    resp._rows = rows
    resp._first = resp._via = resp._via0 = resp._vias = resp._from = resp._to = None
    resp._cseq = None
    if eager:
        lines.append(f"Content-Length: {length}\r\n\r\n")
        resp._raw = "\r\n".join(lines).encode(_ENCODING, _ERRORS) + body
    else:
        resp._raw = None
    return resp


def _text_row(key: str, name: str, value: str) -> _Row:
    """A row whose text is known: ``to_bytes`` writes the same ``name: value`` it would build."""
    return (key, name, value, f"{name}: {value}")


# (name, value) -> checked row, for the few headers every response repeats (Server, ...).
_ROW_CACHE: dict[tuple[str, str], _Row] = {}
_ROW_CACHE_MAX = 256


def _constant_row(name: str, value: str) -> _Row:
    """``_make_row`` with a cache: rows are immutable tuples, so they can be shared."""
    key = (name, value)
    row = _ROW_CACHE.get(key)
    if row is None:
        key_, name_, value_, _ = _make_row(name, value)
        row = _text_row(key_, name_, value_)
        if len(name) + len(value) <= 256:
            remember(_ROW_CACHE, key, row, _ROW_CACHE_MAX)
    return row


# Value -> _check_value(value), for the reasons and To tags that every response repeats.
_CHECKED: dict[str, str] = {}
_CHECKED_MAX = 256


def _check_constant(value: str) -> str:
    """``_check_value`` with a cache (it raises before anything is stored)."""
    checked = _CHECKED.get(value)
    if checked is None:
        checked = _check_value(value)
        if len(value) <= 128:
            remember(_CHECKED, value, checked, _CHECKED_MAX)
    return checked


def _edited_top_via(request: Request) -> str | None:
    """``str(request.via)`` if that cached object no longer matches the wire text, else None."""
    cached = request._via
    if cached is None or request._via0 == (
        cached.transport,
        cached.host,
        cached.port,
        cached.params,
    ):
        return None
    return _check_value(str(cached))


def _after_first_element(value: str) -> str:
    """What follows the first element of a comma list, as written (``""`` if nothing)."""
    if "," not in value:
        return ""
    first = first_element(value)
    if first is None:
        return ""
    rest = value[value.index(first) + len(first) :].lstrip(" \t")
    return rest[1:].strip(" \t") if rest.startswith(",") else rest.strip(" \t")
