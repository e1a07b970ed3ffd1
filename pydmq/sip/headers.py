"""Header-value grammar for the SIP message layer (RFC 3261 §7.3, §20, §25).

Everything here works on already decoded, unfolded ``str`` header values and raises only
:class:`SipParseError`. The message layer calls into it lazily, on first access to a header, so
none of this is on the parse+serialise hot path; it still avoids regular expressions because the
accessors (``via``, ``from_``, ``to``, ``cseq``) are on the DMQ receive path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from pydmq.sip.errors import SipParseError
from pydmq.sip.memo import remember
from pydmq.sip.uri import SipUri, split_hostport

__all__ = [
    "COMMA_HEADERS",
    "COMPACT_FORMS",
    "CSeq",
    "NameAddr",
    "Via",
    "canonical_name",
    "first_element",
    "is_token",
    "split_commas",
]

#: RFC 3261 §25.1 ``token`` characters. ``is_token`` uses ``str.strip`` with this set: a string
#: made only of these characters strips to ``""``, anything else leaves a residue.
TOKEN_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.!%*_+`'~"

#: Compact header names (RFC 3261 §7.3.3 plus the IANA registry) -> canonical lower-case name.
COMPACT_FORMS: dict[str, str] = {
    "v": "via",
    "f": "from",
    "t": "to",
    "i": "call-id",
    "l": "content-length",
    "c": "content-type",
    "m": "contact",
    "k": "supported",
    "s": "subject",
    "e": "content-encoding",
    "a": "accept-contact",
    "b": "referred-by",
    "d": "request-disposition",
    "j": "reject-contact",
    "o": "event",
    "r": "refer-to",
    "u": "allow-events",
    "x": "session-expires",
    "y": "identity",
}

#: Headers whose grammar is ``#element`` (RFC 3261 §7.3.1), so ``a, b`` means two values.
#: Headers that merely *contain* commas (Date, the auth headers, User-Agent, ...) are not here.
COMMA_HEADERS = frozenset(
    {
        "via",
        "contact",
        "route",
        "record-route",
        "path",
        "service-route",
        "allow",
        "allow-events",
        "supported",
        "require",
        "proxy-require",
        "unsupported",
        "accept",
        "accept-encoding",
        "accept-language",
        "accept-contact",
        "reject-contact",
        "request-disposition",
        "content-encoding",
        "content-language",
        "in-reply-to",
        "alert-info",
        "call-info",
        "error-info",
        "reason",
        "warning",
        "p-asserted-identity",
        "p-preferred-identity",
        "security-client",
        "security-server",
        "security-verify",
    }
)

_WS = " \t"

# Raw header name (as written, possibly with trailing blanks) -> (canonical key, clean name), for
# valid names only. Names repeat across messages, so after warm-up splitting a header row costs
# one dict lookup. Shared with pydmq.sip.message; bounded so random names cannot grow it.
NAME_CACHE: dict[str, tuple[str, str]] = {}
_NAME_CACHE_MAX = 2048


def is_token(text: str) -> bool:
    """True for a non-empty RFC 3261 ``token``."""
    if text.isalnum():
        return text.isascii()
    return bool(text) and not text.strip(TOKEN_CHARS)


def canonical_name(raw: str) -> tuple[str, str]:
    """Return ``(key, name)`` for a header name as written.

    ``key`` is lower-case with compact forms expanded (the lookup key); ``name`` is the spelling
    to write back. ``key`` is ``""`` when ``raw`` is not a valid header name.
    """
    hit = NAME_CACHE.get(raw)
    if hit is not None:
        return hit
    name = raw.rstrip(_WS)
    if not is_token(name):
        return ("", name)
    low = name.lower()
    result = (COMPACT_FORMS.get(low, low), name)
    if len(raw) <= 64 and len(NAME_CACHE) < _NAME_CACHE_MAX:
        NAME_CACHE[raw] = result
    return result


def _has_any(text: str, chars: str) -> bool:
    """``any(c in text for c in chars)`` at C speed (a generator costs ~0.5 us)."""
    for c in chars:  # noqa: SIM110 - deliberately not any(<generator>)
        if c in text:
            return True
    return False


def _quote_end(text: str, start: int) -> int:
    """Index of the ``"`` closing the quoted-string opened at ``start``; -1 if unterminated.

    Jumps with ``str.find`` (escapes are ``\\x``) instead of walking characters, so a long
    hostile value costs C time, not Python time.
    """
    i = start + 1
    while True:
        q = text.find('"', i)
        if q < 0:
            return -1
        b = text.find("\\", i, q)
        if b < 0:
            return q
        i = b + 2


def _split_outside(text: str, sep: str, angle: bool, maxsplit: int = -1) -> tuple[list[str], bool]:
    """Split on ``sep`` outside quoted strings (and ``<...>`` when ``angle``).

    Returns ``(parts, terminated)``; after an unterminated quote or bracket the rest of the text
    is the last part. Linear: each special character is found once, with ``str.find``.
    """
    parts: list[str] = []
    start = i = 0
    n_sep = text.find(sep)
    n_quote = text.find('"')
    n_angle = text.find("<") if angle else -1
    while True:
        if 0 <= n_sep < i:
            n_sep = text.find(sep, i)
        if 0 <= n_quote < i:
            n_quote = text.find('"', i)
        if 0 <= n_angle < i:
            n_angle = text.find("<", i)
        j = min((p for p in (n_sep, n_quote, n_angle) if p >= 0), default=-1)
        if j < 0:
            break
        if j == n_sep:
            parts.append(text[start:j])
            start = i = j + 1
            if len(parts) == maxsplit:
                break
            continue
        end = _quote_end(text, j) if j == n_quote else text.find(">", j + 1)
        if end < 0:
            parts.append(text[start:])
            return parts, False
        i = end + 1
    parts.append(text[start:])
    return parts, True


def split_commas(value: str) -> list[str]:
    """Split an ``#element`` list on commas outside quoted strings and ``<...>``.

    Empty elements (``a,,b``) are dropped. An unterminated quote or ``<`` keeps the rest of the
    value as one element; the element parser then reports it.
    """
    if '"' not in value and "<" not in value:
        if "," not in value:
            v = value.strip(_WS)
            return [v] if v else []
        parts = value.split(",")
    else:
        parts = _split_outside(value, ",", True)[0]
    out = []
    for part in parts:
        element = part.strip(_WS)
        if element:
            out.append(element)
    return out


def first_element(value: str) -> str | None:
    """The first non-empty element of an ``#element`` list without splitting all of it (a
    64 KB ``Via: a, a, a...`` must not cost more than its first value); ``None`` if empty."""
    rest = value
    while True:
        if '"' in rest or "<" in rest:
            parts = _split_outside(rest, ",", True, 1)[0]
        else:
            parts = rest.split(",", 1)
        element = parts[0].strip(_WS)
        if element:
            return element
        if len(parts) == 1:
            return None
        rest = parts[1]


def _split_semis(text: str) -> list[str]:
    """Split on ``;`` outside quoted strings."""
    if '"' not in text:
        return text.split(";")
    parts, terminated = _split_outside(text, ";", False)
    if not terminated:
        raise SipParseError("unterminated quoted string")
    return parts


def _parse_params(items: list[str], start: int) -> dict[str, str | None]:
    """``generic-param`` list (RFC 3261 §25.1) from ``items[start:]``: ``name`` or
    ``name=value``, SWS around ``=``.

    Values are kept as written (a quoted-string keeps its quotes) so that ``str()`` round-trips.
    """
    params: dict[str, str | None] = {}
    for i in range(start, len(items)):
        name, eq, value = items[i].partition("=")
        name = name.strip(_WS)
        if not is_token(name):
            raise SipParseError("bad parameter")
        if not eq:
            params[name] = None
            continue
        value = value.strip(_WS)
        if not value:
            raise SipParseError("bad parameter")
        if value[0] == '"':
            if _quote_end(value, 0) != len(value) - 1:
                raise SipParseError("bad parameter")
        elif (
            " " in value
            or "\t" in value
            or '"' in value
            or "<" in value
            or ">" in value
            or "," in value
        ):
            raise SipParseError("bad parameter")
        params[name] = value
    return params


def _parse_param_text(text: str) -> dict[str, str | None]:
    """``_parse_params`` of the text after a ``;`` (``tag=x;lr``), same result and errors.

    The common tail has no blank, quote, ``<``, ``>`` or ``,``: then nothing needs stripping or
    quote handling and only the names (tokens) and the non-emptiness of values are left to
    check. Anything else takes the general path.
    """
    if " " in text or "\t" in text or '"' in text or "<" in text or ">" in text or "," in text:
        return _parse_params(_split_semis(text), 0)
    params: dict[str, str | None] = {}
    for item in text.split(";"):
        name, eq, value = item.partition("=")
        if not (name.isalnum() and name.isascii()) and not is_token(name):
            raise SipParseError("bad parameter")
        if value:
            params[name] = value
        elif eq:
            raise SipParseError("bad parameter")
        else:
            params[name] = None
    return params


def _format_params(params: dict[str, str | None]) -> str:
    return "".join([f";{k}" if v is None else f";{k}={v}" for k, v in params.items()])


def _lookup(params: dict[str, str | None], name: str) -> tuple[bool, str | None]:
    """Case-insensitive parameter lookup: ``(present, value)``; exact spelling tried first."""
    if name in params:
        return True, params[name]
    for key, value in params.items():
        if key.lower() == name:
            return True, value
    return False, None


def _parse_via_head(head: str) -> tuple[str, str, int | None]:
    """``SIP/2.0/UDP host:port`` -> (upper transport, host, port)."""
    if head.startswith("SIP/2.0/"):
        rest = head[8:]
    else:
        # sent-protocol allows LWS around the slashes and is case-insensitive.
        parts = head.split("/", 2)
        if len(parts) != 3 or parts[0].strip(_WS).upper() != "SIP" or parts[1].strip(_WS) != "2.0":
            raise SipParseError("bad protocol")
        rest = parts[2].lstrip(_WS)
    sp = rest.find(" ")
    tab = rest.find("\t")
    if sp < 0 or (0 <= tab < sp):
        sp = tab
    if sp <= 0:
        raise SipParseError("no sent-by")
    transport = rest[:sp]
    if not is_token(transport):
        raise SipParseError("bad transport")
    host, port, _ = split_hostport(rest[sp + 1 :].strip(_WS))
    return transport.upper(), host, port


# Via "protocol sent-by" text -> parsed; the branch differs per message, the head does not.
_VIA_HEAD_CACHE: dict[str, tuple[str, str, int | None]] = {}
_VIA_HEAD_CACHE_MAX = 512


@dataclass(slots=True)
class Via:
    """One Via value (RFC 3261 §20.42): ``SIP/2.0/<transport> <host>[:<port>];params``.

    ``transport`` is upper-case; ``host`` is as written (IPv6 keeps ``[]``); ``params`` keeps
    order and spelling, a flag parameter maps to ``None``. The object is a parsed *copy*: edit it
    and write it back with ``SipMessage.replace_top_via`` / ``set``.
    """

    transport: str
    host: str
    port: int | None = None
    params: dict[str, str | None] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> Via:
        """Parse one Via value; raise ``SipParseError("Bad Via")``."""
        s = text.strip(_WS)
        # sent-protocol and sent-by cannot contain ';' or '"', so the first ';' ends them.
        semi = s.find(";")
        head = s if semi < 0 else s[:semi]
        hit = _VIA_HEAD_CACHE.get(head)
        try:
            if hit is None:
                hit = _parse_via_head(head)
                if len(head) <= 128:
                    remember(_VIA_HEAD_CACHE, head, hit, _VIA_HEAD_CACHE_MAX)
            if semi < 0:
                return cls(hit[0], hit[1], hit[2], {})
            params = _parse_param_text(s[semi + 1 :])
            for key, value in params.items():
                if (
                    value is not None
                    and len(key) == 5
                    and key.lower() == "rport"
                    and (not value.isdigit() or not value.isascii() or int(value) > 65535)
                ):
                    raise SipParseError("bad rport")
        except SipParseError:
            raise SipParseError("Bad Via") from None
        return cls(hit[0], hit[1], hit[2], params)

    def param(self, name: str) -> str | None:
        """Value of ``name`` (case-insensitive); ``None`` if absent or a flag."""
        return _lookup(self.params, name.lower())[1]

    def has_param(self, name: str) -> bool:
        return _lookup(self.params, name.lower())[0]

    @property
    def branch(self) -> str | None:
        return _lookup(self.params, "branch")[1]

    @property
    def received(self) -> str | None:
        return _lookup(self.params, "received")[1]

    @property
    def rport(self) -> str | None:
        """RFC 3581: ``None`` when absent, ``""`` for the bare flag, the port text otherwise."""
        present, value = _lookup(self.params, "rport")
        if not present:
            return None
        return "" if value is None else value

    @property
    def sent_by(self) -> str:
        return self.host if self.port is None else f"{self.host}:{self.port}"

    def __str__(self) -> str:
        port = self.port
        host = self.host if port is None else f"{self.host}:{port}"
        params = self.params
        if not params:
            return f"SIP/2.0/{self.transport} {host}"
        return f"SIP/2.0/{self.transport} {host}{_format_params(params)}"


def parse_vias(value: str) -> list[Via]:
    """Every Via in one header value (``a, b``)."""
    return [Via.parse(v) for v in split_commas(value)]


def _unquote(text: str) -> str:
    if "\\" not in text:
        return text
    out = []
    i = 0
    n = len(text)
    while i < n:
        c = text[i]
        if c == "\\" and i + 1 < n:
            i += 1
            c = text[i]
        out.append(c)
        i += 1
    return "".join(out)


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass(slots=True, init=False)
class NameAddr:
    """From/To/Contact value (RFC 3261 §20.10, §20.20, §20.39): name-addr or addr-spec.

    ``display`` is the unquoted display name (``None`` when there is none); ``params`` are the
    header parameters after the URI (``tag``...), ordered, flags as ``None``. ``str()`` always
    writes the name-addr form ``"display" <uri>;params``, which is valid wherever either was.
    Built as ``NameAddr(display, uri, params)`` (the contract's order) or ``NameAddr(uri=...)``.
    """

    display: str | None
    uri: SipUri
    params: dict[str, str | None]

    def __init__(
        self,
        display: str | None = None,
        uri: SipUri | None = None,
        params: dict[str, str | None] | None = None,
    ) -> None:
        if not isinstance(uri, SipUri):
            raise TypeError("NameAddr(display, uri, params) needs uri=<SipUri>")
        self.display = display
        self.uri = uri
        self.params = {} if params is None else params

    @classmethod
    def parse(cls, text: str, what: str = "address") -> NameAddr:
        """Parse one value; errors read ``Bad <what>`` (``Bad From``)."""
        try:
            s = text.strip(_WS)
            if s[:1] == "<":
                # Fast path for the usual ``<uri>`` and ``<uri>;tag=x`` (From/To of DMQ).
                gt = s.find(">")
                if gt > 0:
                    end = gt + 1
                    if end == len(s):
                        params = {}
                    elif s[end] == ";":
                        params = _parse_param_text(s[end + 1 :])
                    else:
                        return cls._parse(s)
                    addr = cls.__new__(cls)  # __init__'s checks are for callers' values
                    addr.display = None
                    addr.uri = SipUri.parse(s[1:gt].strip(_WS))
                    addr.params = params
                    return addr
            return cls._parse(s)
        except SipParseError:
            raise SipParseError(f"Bad {what}") from None

    @classmethod
    def _parse(cls, text: str) -> NameAddr:
        s = text.strip(_WS)
        display: str | None = None
        first = s[:1]
        if first == "<":
            rest = s
        elif first == '"':
            end = _quote_end(s, 0)
            if end < 0:
                raise SipParseError("unterminated display name")
            display = _unquote(s[1:end])
            rest = s[end + 1 :].lstrip(_WS)
            if not rest.startswith("<"):
                raise SipParseError("no <uri>")
        elif not s:
            raise SipParseError("empty")
        else:
            lt = s.find("<")
            if lt < 0:
                # addr-spec: the URI cannot carry parameters, so the first ';' starts the
                # header parameters (RFC 3261 §20.10).
                semi = s.find(";")
                uri_text = s if semi < 0 else s[:semi]
                if _has_any(uri_text, ' \t,?>"'):
                    raise SipParseError("bad addr-spec")
                params = _parse_param_text(s[semi + 1 :]) if semi >= 0 else {}
                return cls(None, SipUri.parse(uri_text), params)
            name = s[:lt].strip(_WS)
            if any(not is_token(w) for w in name.split()):
                raise SipParseError("bad display name")
            display = name
            rest = s[lt:]
        gt = rest.find(">")
        if gt < 0:
            raise SipParseError("unterminated <")
        uri = SipUri.parse(rest[1:gt].strip(_WS))
        tail = rest[gt + 1 :]
        if tail[:1] != ";":  # ";tag=x" needs no strip: s was stripped
            tail = tail.strip(_WS)
            if not tail:
                return cls(display, uri, {})
            if tail[0] != ";":
                raise SipParseError("junk after >")
        return cls(display, uri, _parse_param_text(tail[1:]))

    @property
    def tag(self) -> str | None:
        return _lookup(self.params, "tag")[1]

    def param(self, name: str) -> str | None:
        """Value of ``name`` (case-insensitive); ``None`` if absent or a flag."""
        return _lookup(self.params, name.lower())[1]

    def has_param(self, name: str) -> bool:
        return _lookup(self.params, name.lower())[0]

    def __str__(self) -> str:
        head = f"{_quote(self.display)} " if self.display is not None else ""
        return f"{head}<{self.uri}>{_format_params(self.params)}"


class CSeq(NamedTuple):
    """CSeq (RFC 3261 §20.16): sequence number below 2**31 and a method token.

    A NamedTuple: immutable, hashable (transaction keys) and cheap to build.
    """

    seq: int
    method: str

    @classmethod
    def parse(cls, text: str) -> CSeq:
        hit = _CSEQ_CACHE.get(text)
        if hit is not None:
            return hit
        cseq = cls._parse(text)
        if len(text) <= 64:
            remember(_CSEQ_CACHE, text, cseq, _CSEQ_CACHE_MAX)
        return cseq

    @classmethod
    def _parse(cls, text: str) -> CSeq:
        parts = text.split()
        if len(parts) != 2:
            raise SipParseError("Bad CSeq")
        num, method = parts
        if not num.isdigit() or not num.isascii() or len(num) > 10 or not is_token(method):
            raise SipParseError("Bad CSeq")
        seq = int(num)
        if seq >= 2**31:
            raise SipParseError("Bad CSeq")
        return cls(seq, method)

    def __str__(self) -> str:
        return f"{self.seq} {self.method}"


# CSeq text -> CSeq (immutable, so shared); DMQ sends "10 KDMQ" on every request.
_CSEQ_CACHE: dict[str, CSeq] = {}
_CSEQ_CACHE_MAX = 1024
