"""Property tests: hostile bytes never raise anything but SipParseError, valid messages round-trip
and read the same as with the independent ``sipmessage`` parser."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import sipmessage
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pydmq.sip.errors import SipParseError
from pydmq.sip.headers import COMPACT_FORMS, canonical_name
from pydmq.sip.message import (
    BadRequestError,
    Request,
    Response,
    SipMessage,
    make_response,
    parse_message,
    validate_request,
    validate_response,
)
from tests.support.spec import wire_dir

GOLDEN = wire_dir()
GOLDEN_BYTES = [p.read_bytes() for p in sorted(GOLDEN.glob("[0-9][0-9]_*.txt"))]

# Hostile inputs are cheap to draw: many examples. Valid messages take ~30 draws each: fewer.
HOSTILE = settings(max_examples=1000, deadline=None)
VALID = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def snapshot(msg: SipMessage) -> tuple[object, ...]:
    """Start line, header rows (Content-Length aside: to_bytes adds/rewrites it), body."""
    if isinstance(msg, Request):
        start: tuple[object, ...] = (msg.method, msg.uri)
    else:
        assert isinstance(msg, Response)
        start = (msg.status, msg.reason)
    rows = [(n, v) for n, v in msg.header_items() if canonical_name(n)[0] != "content-length"]
    return (*start, rows, msg.body)


def touch(msg: SipMessage) -> None:
    """Read everything; only SipParseError may come out of an accessor."""
    getters: list[Callable[[], object]] = [
        lambda: msg.via,
        lambda: msg.vias,
        lambda: msg.from_,
        lambda: msg.to,
        lambda: msg.call_id,
        lambda: msg.cseq,
        lambda: msg.max_forwards,
        lambda: msg.content_length,
        lambda: msg.content_type,
    ]
    if isinstance(msg, Request):
        getters.append(lambda: msg.ruri)
    for get in getters:
        with contextlib.suppress(SipParseError):
            get()
    for name, value in msg.header_items():
        assert isinstance(value, str)
        msg.get(name)
        msg.get_all(name)
    for name in ("Via", "Contact", "Subject", "X-Nope"):
        msg.get(name)
        msg.get_all(name)


def exercise(data: bytes) -> None:
    """The full receive path on arbitrary bytes."""
    try:
        msg = parse_message(data)
    except SipParseError as exc:
        assert isinstance(exc.reason, str) and exc.reason
        assert exc.answerable == isinstance(exc, BadRequestError)
        if isinstance(exc, BadRequestError):
            make_response(exc.request, 400, exc.reason).to_bytes()
        return
    touch(msg)
    if isinstance(msg, Request):
        try:
            validate_request(msg)
        except BadRequestError as exc:
            assert exc.request is msg
        except SipParseError as exc:
            assert not exc.answerable
        make_response(msg, 400, "Bad Request").to_bytes()  # never raises, even unvalidated
    else:
        with contextlib.suppress(SipParseError):
            validate_response(msg)
    out = msg.to_bytes()
    again = parse_message(out)  # whatever we accept, we write in a form we accept again
    assert snapshot(again) == snapshot(msg)
    assert again.to_bytes() == out


# -- hostile input ----------------------------------------------------------------------------

FRAGMENTS = [
    b"KDMQ sip:htable@127.0.0.1:5160 SIP/2.0",
    b"SIP/2.0 200 OK",
    b"INVITE",
    b"SIP/2.0",
    b"\r\n",
    b"\n",
    b"\r",
    b"\r\n\r\n",
    b" ",
    b"\t",
    b":",
    b";",
    b",",
    b"<",
    b">",
    b'"',
    b"\\",
    b"\0",
    b"\xff",
    b"\xc3\xa9",
    b"Via",
    b"v",
    b"From",
    b"f",
    b"To",
    b"t",
    b"Call-ID",
    b"i",
    b"CSeq",
    b"Content-Length",
    b"l",
    b"Max-Forwards",
    b"Contact",
    b"SIP/2.0/UDP 127.0.0.1:5160",
    b"[::1]:5060",
    b";branch=z9hG4bK1",
    b";rport",
    b"rport=",
    b"received=",
    b"<sip:a@b>",
    b"sip:x@[::1]",
    b"tag=",
    b"10 KDMQ",
    b"0",
    b"5",
    b"99999999999",
    b"abc",
]


@HOSTILE
@given(st.binary(max_size=700))
def test_random_bytes(data: bytes) -> None:
    exercise(data)


@HOSTILE
@given(st.lists(st.sampled_from(FRAGMENTS), max_size=40).map(b"".join))
def test_sip_like_soup(data: bytes) -> None:
    exercise(data)


INSERTS = [
    b"\r",
    b"\n",
    b"\r\n",
    b"\0",
    b":",
    b"\r\n ",
    b"\n\t",
    b",",
    b";",
    b"<",
    b'"',
    b" ",
    b"\xff",
    b"=",
    b"@",
    b"[",
    b"\r\n\r\n",
]


@st.composite
def mutated_golden(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(GOLDEN_BYTES)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "dup_line"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "truncate":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.sampled_from(INSERTS))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 8))]
        elif op == "dup_line":
            lines = bytes(data).split(b"\r\n")
            head_end = lines.index(b"") if b"" in lines else len(lines)
            if head_end > 1:
                i = draw(st.integers(1, head_end - 1))
                lines.insert(draw(st.integers(1, head_end)), lines[i])
                data = bytearray(b"\r\n".join(lines))
    return bytes(data)


@HOSTILE
@given(mutated_golden())
def test_mutated_golden(data: bytes) -> None:
    exercise(data)


@HOSTILE
@given(st.sampled_from(GOLDEN_BYTES), st.integers(0, 600))
def test_truncated_golden(data: bytes, cut: int) -> None:
    exercise(data[:cut])


# -- valid messages ---------------------------------------------------------------------------

_ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
_token = st.text(_ALNUM + "-._!+~", min_size=1, max_size=10)  # no '%': sipmessage unquotes it
_hostname = st.lists(st.text("abcxyz", min_size=1, max_size=6), min_size=1, max_size=3).map(
    ".".join
)
_ipv4 = st.tuples(*[st.integers(0, 255)] * 4).map(lambda t: ".".join(map(str, t)))
_ipv6 = st.lists(st.integers(0, 0xFFFF), min_size=8, max_size=8).map(
    lambda g: "[" + ":".join(f"{x:x}" for x in g) + "]"
)
_host = st.one_of(_hostname, _ipv4, _ipv6)
_port = st.one_of(st.none(), st.integers(1, 65535))
_hex = st.text("0123456789abcdef", min_size=4, max_size=16)


def _hostport(host: str, port: int | None) -> str:
    return host if port is None else f"{host}:{port}"


@st.composite
def sip_uri(draw: st.DrawFn) -> str:
    user = draw(st.one_of(st.none(), _token))
    params = draw(st.dictionaries(_token, st.one_of(st.none(), _token), max_size=2))
    text = "sip:" + (f"{user}@" if user else "") + _hostport(draw(_host), draw(_port))
    return text + "".join(f";{k}" if v is None else f";{k}={v}" for k, v in params.items())


@st.composite
def via_value(draw: st.DrawFn) -> str:
    transport = draw(st.sampled_from(["UDP", "TCP", "TLS", "SCTP", "WS"]))
    text = f"SIP/2.0/{transport} {_hostport(draw(_host), draw(_port))};branch=z9hG4bK{draw(_hex)}"
    rport = draw(st.sampled_from(["", ";rport", ";rport=5060"]))
    received = draw(st.sampled_from(["", f";received={draw(_ipv4)}"]))
    return text + rport + received


@st.composite
def name_addr(draw: st.DrawFn, tag: bool) -> str:
    words = draw(st.lists(st.text(_ALNUM, min_size=1, max_size=6), max_size=3))
    display = " ".join(words)
    quoted = draw(st.booleans())
    head = (f'"{display}" ' if quoted else f"{display} ") if display else ""
    text = f"{head}<{draw(sip_uri())}>"
    return text + (f";tag={draw(_hex)}" if tag else "")


_RESERVED = {"via", "from", "to", "call-id", "cseq", "content-length", "max-forwards"}
_extra_name = st.text(_ALNUM + "-", min_size=1, max_size=12).filter(
    lambda n: canonical_name(n)[0] not in _RESERVED and n.lower() not in COMPACT_FORMS
)
_extra_value = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30).map(
    str.strip
)


@st.composite
def valid_message(draw: st.DrawFn) -> tuple[bytes, dict[str, object]]:
    """Message bytes written by hand (not by our serialiser) plus what they contain."""
    is_request = draw(st.booleans())
    method = draw(st.sampled_from(["KDMQ", "OPTIONS", "MESSAGE", "INVITE"]))
    if is_request:
        start = f"{method} {draw(sip_uri())} SIP/2.0"
    else:
        start = f"SIP/2.0 {draw(st.integers(100, 699))} {draw(_extra_value)}"
    compact = draw(st.booleans())

    def name(full: str, short: str) -> str:
        return short if compact else full

    vias = draw(st.lists(via_value(), min_size=1, max_size=3))
    rows: list[tuple[str, str]] = [(name("Via", "v"), v) for v in vias]
    rows += [
        (name("From", "f"), draw(name_addr(tag=True))),
        (name("To", "t"), draw(name_addr(tag=not is_request))),
        (name("Call-ID", "i"), f"{draw(_hex)}@{draw(_hostname)}"),
        ("CSeq", f"{draw(st.integers(0, 2**31 - 1))} {method}"),
    ]
    if draw(st.booleans()):
        rows.append(("Max-Forwards", str(draw(st.integers(0, 255)))))
    rows += draw(st.lists(st.tuples(_extra_name, _extra_value), max_size=4))
    rows = draw(st.permutations(rows))
    body = draw(st.binary(max_size=100))
    rows.append((name("Content-Length", "l"), str(len(body))))
    head = "\r\n".join([start] + [f"{n}: {v}" for n, v in rows])
    return (head + "\r\n\r\n").encode() + body, {"rows": rows, "body": body, "vias": vias}


@VALID
@given(valid_message())
def test_valid_messages_parse_and_round_trip(case: tuple[bytes, dict[str, object]]) -> None:
    data, expected = case
    msg = parse_message(data)
    assert msg.header_items() == expected["rows"]
    assert msg.body == expected["body"]
    assert len(msg.vias) == len(expected["vias"])  # type: ignore[arg-type]
    if isinstance(msg, Request):
        validate_request(msg)
        assert msg.cseq.method == msg.method
    else:
        validate_response(msg)
    assert msg.to_bytes() == data  # unmodified: the received bytes
    msg.body = msg.body
    assert msg.to_bytes() == data  # rebuilt from the rows: the same bytes
    assert snapshot(parse_message(msg.to_bytes())) == snapshot(msg)
    exercise(data)


@VALID
@given(valid_message())
def test_valid_messages_agree_with_sipmessage(case: tuple[bytes, dict[str, object]]) -> None:
    data, _ = case
    ours = parse_message(data)
    theirs = sipmessage.Message.parse(data)
    if isinstance(ours, Request):
        assert isinstance(theirs, sipmessage.Request)
        assert ours.method == theirs.method
        r, u = ours.ruri, theirs.uri
        assert (r.user, r.host, r.port, r.params) == (u.user, u.host, u.port, dict(u.parameters))
    else:
        assert isinstance(ours, Response) and isinstance(theirs, sipmessage.Response)
        assert (ours.status, ours.reason) == (theirs.code, theirs.phrase)
    # sipmessage groups rows by name (compact forms expanded), values stripped
    for key in {canonical_name(n)[0] for n, _ in ours.header_items()}:
        ours_rows = [v for n, v in ours.header_items() if canonical_name(n)[0] == key]
        assert theirs.headers.getlist(key) == ours_rows, key
    assert ours.body == theirs.body
    assert (ours.cseq.seq, ours.cseq.method) == (theirs.cseq.sequence, theirs.cseq.method)
    assert ours.call_id == theirs.call_id
    assert ours.max_forwards == theirs.max_forwards
    assert ours.content_length == theirs.content_length
    assert len(ours.vias) == len(theirs.via)
    for v, w in zip(ours.vias, theirs.via, strict=True):
        assert (v.transport, v.host, v.port, v.params) == (
            w.transport,
            w.host,
            w.port,
            dict(w.parameters),
        )
    for a, b in ((ours.from_, theirs.from_address), (ours.to, theirs.to_address)):
        assert (a.display or "") == b.name
        assert (a.uri.user, a.uri.host, a.uri.port) == (b.uri.user, b.uri.host, b.uri.port)
        assert a.uri.params == dict(b.uri.parameters)
        assert a.params == dict(b.parameters)


@VALID
@given(valid_message(), st.sampled_from(["\n", "fold", "leading"]))
def test_lenient_variants_read_the_same(case: tuple[bytes, dict[str, object]], how: str) -> None:
    """LF-only endings, folded values and leading CRLFs (which sipmessage does not accept)
    read as the canonical message; writing gives the canonical CRLF bytes."""
    data, expected = case
    head, _, body = data.partition(b"\r\n\r\n")
    if how == "\n":
        variant = head.replace(b"\r\n", b"\n") + b"\n\n" + body
    elif how == "fold":
        variant = head.replace(b": ", b":\r\n  ") + b"\r\n\r\n" + body
    else:
        variant = b"\r\n\r\n" + data
    msg = parse_message(variant)
    assert msg.header_items() == expected["rows"]
    assert msg.body == expected["body"]
    assert snapshot(parse_message(msg.to_bytes())) == snapshot(msg)
    if how != "fold":
        msg.body = msg.body
        assert msg.to_bytes() == data


@VALID
@given(
    st.sampled_from(["KDMQ", "OPTIONS"]),
    sip_uri(),
    via_value(),
    name_addr(tag=True),
    name_addr(tag=False),
    st.integers(0, 2**31 - 1),
    st.binary(max_size=64),
)
def test_built_requests_and_responses_round_trip(
    method: str, uri: str, via: str, from_: str, to: str, seq: int, body: bytes
) -> None:
    req = Request.build(
        method,
        uri,
        via=via,
        from_=from_,
        to=to,
        call_id="c@h",
        cseq=seq,
        max_forwards=1,
        headers=[("Content-Type", "text/plain")],
        body=body,
    )
    back = parse_message(req.to_bytes())
    assert isinstance(back, Request)
    validate_request(back)
    assert snapshot(back) == snapshot(req)
    assert back.to_bytes() == req.to_bytes()
    resp = make_response(back, 200, "OK", body=body, content_type="text/plain")
    rback = parse_message(resp.to_bytes())
    assert isinstance(rback, Response)
    validate_response(rback)
    assert snapshot(rback) == snapshot(resp)
    assert rback.to.tag and rback.via.branch == back.via.branch
    assert rback.get_all("Via") == back.get_all("Via")
