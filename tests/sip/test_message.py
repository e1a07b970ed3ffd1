"""Unit tests for pydmq.sip.message: grammar corners, limits, bad input, building messages."""

from __future__ import annotations

import pytest

from pydmq.sip.errors import SipParseError
from pydmq.sip.headers import CSeq, NameAddr, Via, first_element, split_commas
from pydmq.sip.message import (
    BadRequestError,
    Limits,
    Request,
    Response,
    make_response,
    new_branch,
    new_call_id,
    new_tag,
    parse_message,
    validate_request,
    validate_response,
)
from pydmq.sip.uri import SipUri

VIA = "Via: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKabc"
MANDATORY = [
    VIA,
    "From: <sip:htable@10.0.0.1:5060>;tag=f1",
    "To: <sip:htable@10.0.0.2:5060>",
    "Call-ID: c1@10.0.0.1",
    "CSeq: 10 KDMQ",
]


def raw(
    *headers: str,
    body: str = "",
    start: str = "KDMQ sip:htable@10.0.0.2:5060 SIP/2.0",
    cl: bool = True,
    eol: str = "\r\n",
) -> bytes:
    """A message from header lines; Content-Length from the body unless ``cl`` is False."""
    lines = [start, *headers]
    if cl:
        lines.append(f"Content-Length: {len(body.encode())}")
    return (eol.join(lines) + eol + eol + body).encode()


def req(*headers: str, **kw: object) -> Request:
    msg = parse_message(raw(*headers, **kw))  # type: ignore[arg-type]
    assert isinstance(msg, Request)
    return msg


# -- start line -------------------------------------------------------------------------------


def test_request_line() -> None:
    m = req(*MANDATORY)
    assert (m.method, m.uri) == ("KDMQ", "sip:htable@10.0.0.2:5060")
    assert m.ruri.user == "htable" and m.ruri.port == 5060
    assert m.ruri is m.ruri  # cached
    validate_request(m)


@pytest.mark.parametrize(
    ("line", "status", "reason"),
    [
        ("SIP/2.0 200 OK", 200, "OK"),
        ("SIP/2.0 404 User Not Found", 404, "User Not Found"),
        ("SIP/2.0 202 Accepted DMQ", 202, "Accepted DMQ"),
        ("SIP/2.0 180 ", 180, ""),
        ("SIP/2.0 500", 500, ""),
        ("sip/2.0 603 Decline", 603, "Decline"),
    ],
)
def test_status_line(line: str, status: int, reason: str) -> None:
    m = parse_message(raw(*MANDATORY, start=line))
    assert isinstance(m, Response)
    assert (m.status, m.reason) == (status, reason)
    validate_response(m)


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("KDMQ sip:x@y SIP/3.0", "Bad request line"),
        ("KDMQ  sip:x@y SIP/2.0", "Bad request line"),
        ("KDMQ sip:x@y", "Bad request line"),
        ("KDMQ sip:x y SIP/2.0", "Bad request line"),
        ("KD(MQ sip:x@y SIP/2.0", "Bad request line"),
        (" KDMQ sip:x@y SIP/2.0", "Bad request line"),
        ("SIP/2.0 99 Too Low", "Bad status line"),
        ("SIP/2.0 700 Too High", "Bad status line"),
        ("SIP/2.0 20x OK", "Bad status line"),
        ("SIP/2.0 2000 OK", "Bad status line"),
    ],
)
def test_bad_start_line_is_not_answerable(line: str, reason: str) -> None:
    with pytest.raises(SipParseError) as exc:
        parse_message(raw(*MANDATORY, start=line))
    assert exc.value.reason == reason
    assert not exc.value.answerable


# -- header rows ------------------------------------------------------------------------------


def test_header_items_keep_order_and_spelling() -> None:
    m = req("via : SIP/2.0/UDP h;branch=z9hG4bK1", "fROM:<sip:a@b>;tag=1", "X-Odd:   spaced  ")
    assert m.header_items() == [
        ("via", "SIP/2.0/UDP h;branch=z9hG4bK1"),
        ("fROM", "<sip:a@b>;tag=1"),
        ("X-Odd", "spaced"),
        ("Content-Length", "0"),
    ]
    assert m.get("VIA") == "SIP/2.0/UDP h;branch=z9hG4bK1"
    assert m.get("from") == "<sip:a@b>;tag=1"
    assert m.get("x-odd") == "spaced"
    assert m.get("X-Missing") is None and m.get_all("X-Missing") == []
    assert m.get("bad name") is None


def test_folding() -> None:
    data = raw(
        "Subject: hello",
        "  wide\tworld",
        "Via: SIP/2.0/UDP 10.0.0.1:5060",
        "\t;branch=z9hG4bKfold",
        *MANDATORY[1:],
        "Content-Length:",
        " 3",
        cl=False,
        body="abc",
    )
    m = parse_message(data)
    assert m.get("Subject") == "hello wide\tworld"
    assert m.via.branch == "z9hG4bKfold"
    assert m.content_length == 3 and m.body == b"abc"
    assert m.to_bytes() == data  # unmodified: the folded bytes as received
    m.add("X-New", "1")
    out = m.to_bytes()
    assert b"Subject: hello\r\n  wide\tworld\r\n" in out  # untouched rows keep their folding
    assert parse_message(out).header_items() == m.header_items()


def test_continuation_before_any_header_is_a_bad_line() -> None:
    m = req(" stray", *MANDATORY)
    assert m.header_items()[0][0] == "Via"
    with pytest.raises(BadRequestError) as exc:
        validate_request(m)
    assert exc.value.reason == "Bad header line"


@pytest.mark.parametrize(
    ("compact", "full", "value"),
    [
        ("v", "Via", "SIP/2.0/UDP h;branch=z9hG4bK1"),
        ("f", "From", "<sip:a@b>;tag=1"),
        ("t", "To", "<sip:c@d>"),
        ("i", "Call-ID", "abc@h"),
        ("c", "Content-Type", "application/json"),
        ("m", "Contact", "<sip:a@b>"),
        ("k", "Supported", "path"),
        ("s", "Subject", "hi"),
        ("e", "Content-Encoding", "gzip"),
    ],
)
def test_compact_names(compact: str, full: str, value: str) -> None:
    m = req(f"{compact}: {value}")
    assert m.get(full) == value
    assert m.get(full.upper()) == value
    assert m.get(compact) == value
    assert m.header_items()[0] == (compact, value)


def test_compact_mandatory_headers_are_usable() -> None:
    m = req(
        "v: SIP/2.0/UDP 10.0.0.1;branch=z9hG4bK1",
        "f: <sip:a@b>;tag=1",
        "t: <sip:htable@c>",
        "i: id1",
        "CSeq: 1 KDMQ",
        "l: 2",
        cl=False,
        body="{}",
    )
    validate_request(m)
    assert (m.call_id, m.from_.tag, m.content_length, m.body) == ("id1", "1", 2, b"{}")
    m.body = b"[1]"
    assert b"\r\nl: 3\r\n" in m.to_bytes()


def test_multi_value_via() -> None:
    m = req(
        "Via: SIP/2.0/UDP a:1;branch=z9hG4bK1, SIP/2.0/TCP b;branch=z9hG4bK2",
        "v: SIP/2.0/TLS [::1]:5061;branch=z9hG4bK3",
    )
    assert [v.host for v in m.vias] == ["a", "b", "[::1]"]
    assert [v.transport for v in m.vias] == ["UDP", "TCP", "TLS"]
    assert m.via.host == "a"
    assert m.get("Via") == "SIP/2.0/UDP a:1;branch=z9hG4bK1"
    assert len(m.get_all("via")) == 3


def test_multi_value_respects_quotes_and_angle_brackets() -> None:
    contact = '"Doe, John" <sip:j@h;x=a,b>;q=0.5, <sip:k@h>, sip:l@h;expires=10'
    m = req(f"Contact: {contact}")
    assert m.get_all("Contact") == [
        '"Doe, John" <sip:j@h;x=a,b>;q=0.5',
        "<sip:k@h>",
        "sip:l@h;expires=10",
    ]
    first = NameAddr.parse(m.get_all("Contact")[0])
    assert first.display == "Doe, John" and first.params == {"q": "0.5"}
    assert first.uri.params == {"x": "a,b"}


def test_non_list_headers_are_not_split() -> None:
    m = req("User-Agent: a, b", "X-Custom: c, d", "Date: Sat, 13 Nov 2010 23:29:00 GMT")
    assert m.get_all("User-Agent") == ["a, b"]
    assert m.get_all("X-Custom") == ["c, d"]
    assert m.get("Date") == "Sat, 13 Nov 2010 23:29:00 GMT"


def test_split_commas_edges() -> None:
    assert split_commas("a,,b, ") == ["a", "b"]
    assert split_commas('"a\\",b", c') == ['"a\\",b"', "c"]
    assert split_commas('"x\\\\", y') == ['"x\\\\"', "y"]  # escaped backslash, then the end
    assert split_commas('a, "open, c') == ["a", '"open, c']
    assert split_commas("a, <sip:x, y") == ["a", "<sip:x, y"]
    assert split_commas("") == []
    assert first_element(" , ,a, b") == "a"
    assert first_element('"x, y" <sip:a>, b') == '"x, y" <sip:a>'
    assert first_element(" , ") is None


# -- Via --------------------------------------------------------------------------------------


def test_via_ipv6_received_rport() -> None:
    v = Via.parse("SIP/2.0/UDP [2001:db8::1]:5060;branch=z9hG4bKx;received=2001:db8::2;rport=5070")
    assert (v.transport, v.host, v.port) == ("UDP", "[2001:db8::1]", 5060)
    assert (v.branch, v.received, v.rport) == ("z9hG4bKx", "2001:db8::2", "5070")
    assert (
        str(v) == "SIP/2.0/UDP [2001:db8::1]:5060;branch=z9hG4bKx;received=2001:db8::2;rport=5070"
    )


def test_via_rport_three_states_and_case() -> None:
    assert Via.parse("SIP/2.0/UDP h;branch=z9hG4bK1").rport is None
    assert Via.parse("SIP/2.0/UDP h;branch=z9hG4bK1;rport").rport == ""
    v = Via.parse("SIP/2.0/UDP h;BRANCH=z9hG4bK1;RPort=1234")
    assert (v.branch, v.rport) == ("z9hG4bK1", "1234")
    assert v.has_param("rport") and not v.has_param("received")


def test_via_lws_and_lower_case_protocol() -> None:
    v = Via.parse("sip / 2.0 / tcp  host.example:5070 ; branch = z9hG4bK9 ; ttl=1")
    assert (v.transport, v.host, v.port) == ("TCP", "host.example", 5070)
    assert v.params == {"branch": "z9hG4bK9", "ttl": "1"}
    assert Via.parse('SIP/2.0/UDP h;x="a;b"').params == {"x": '"a;b"'}


@pytest.mark.parametrize(
    "text",
    [
        "",
        "SIP/2.0/UDP",
        "SIP/2.0/UDP ",
        "SIP/3.0/UDP h",
        "SIP/2.0 h",
        "SIP/2.0/UDP h:99999",
        "SIP/2.0/UDP [::1",
        "SIP/2.0/UDP h;branch=",
        "SIP/2.0/UDP h;;branch=x",
        "SIP/2.0/UDP h;rport=abc",
        "SIP/2.0/UDP h;rport=70000",
        'SIP/2.0/UDP h;x="open',
        "SIP/2.0/U(DP h",
    ],
)
def test_bad_via(text: str) -> None:
    with pytest.raises(SipParseError) as exc:
        Via.parse(text)
    assert exc.value.reason == "Bad Via"


def test_bad_via_in_message_is_dropped() -> None:
    m = req("Via: SIP/2.0/UDP", *MANDATORY[1:])
    with pytest.raises(SipParseError, match="Bad Via") as exc:
        m.via  # noqa: B018
    with pytest.raises(SipParseError) as exc:
        validate_request(m)
    assert exc.value.reason == "Bad Via" and not exc.value.answerable


def test_only_the_top_via_is_validated() -> None:
    # A UAS uses only the top Via; the rest is copied to the reply verbatim.
    m = req(*MANDATORY, "Via: SIP/2.0/UDP")
    validate_request(m)
    with pytest.raises(SipParseError, match="Bad Via"):
        m.vias  # noqa: B018
    assert make_response(m, 200, "OK").get_all("Via")[1] == "SIP/2.0/UDP"


def test_huge_via_list_costs_only_its_first_element() -> None:
    many = ", ".join(["SIP/2.0/UDP h;branch=z9hG4bKx"] * 200)
    m = req(f"Via: SIP/2.0/TCP top:5;branch=z9hG4bKtop, {many}", *MANDATORY[1:])
    validate_request(m)
    assert (m.via.transport, m.via.host, m.get("Via")) == (
        "TCP",
        "top",
        "SIP/2.0/TCP top:5;branch=z9hG4bKtop",
    )
    via = m.via
    via.params["received"] = "192.0.2.1"
    m.replace_top_via(via)
    assert m.get_all("Via")[:2] == [
        "SIP/2.0/TCP top:5;branch=z9hG4bKtop;received=192.0.2.1",
        "SIP/2.0/UDP h;branch=z9hG4bKx",
    ]
    assert len(m.get_all("Via")) == 201


# -- From / To --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "display", "uri", "params"),
    [
        ("<sip:a@b>", None, "sip:a@b", {}),
        ("<sip:a@b>;tag=x1", None, "sip:a@b", {"tag": "x1"}),
        ('"Alice" <sip:a@b>;tag=1', "Alice", "sip:a@b", {"tag": "1"}),
        ('"A \\"q\\" \\\\ b" <sip:a@b>', 'A "q" \\ b', "sip:a@b", {}),
        ('"Dr. <Evil>; x, y" <sip:a@b>', "Dr. <Evil>; x, y", "sip:a@b", {}),
        (
            "Bob Smith <sip:bob@[::1]:5060;transport=tcp>",
            "Bob Smith",
            "sip:bob@[::1]:5060;transport=tcp",
            {},
        ),
        ("sip:a@b;tag=t9", None, "sip:a@b", {"tag": "t9"}),
        ("sip:a@b", None, "sip:a@b", {}),
        ("  <sip:a@b> ; tag = t ; x", None, "sip:a@b", {"tag": "t", "x": None}),
        ('"" <sip:a@b>', "", "sip:a@b", {}),
    ],
)
def test_name_addr(text: str, display: str | None, uri: str, params: dict[str, str | None]) -> None:
    a = NameAddr.parse(text)
    assert (a.display, str(a.uri), a.params) == (display, uri, params)
    assert a.tag == params.get("tag")
    assert NameAddr.parse(str(a)) == a


def test_addr_spec_params_are_header_params() -> None:
    # RFC 3261 §20.10: in addr-spec form, ;tag belongs to the header, not the URI.
    a = NameAddr.parse("sip:a@b;tag=1;lr")
    assert a.uri.params == {} and a.params == {"tag": "1", "lr": None}


@pytest.mark.parametrize(
    "text",
    [
        "",
        "<sip:a@b",
        '"open <sip:a@b>',
        "<sip:a@b> junk",
        "<tel:+1>",
        '"A" sip:a@b',
        "A@B <sip:a@b>",
        "<sip:a@b>;tag=",
        "sip:a b@c",
        "<>",
    ],
)
def test_bad_name_addr(text: str) -> None:
    with pytest.raises(SipParseError) as exc:
        NameAddr.parse(text, "From")
    assert exc.value.reason == "Bad From"


def test_name_addr_constructor() -> None:
    u = SipUri.parse("sip:a@b")
    assert str(NameAddr("Al", u, {"tag": "1"})) == '"Al" <sip:a@b>;tag=1'
    assert NameAddr(uri=u) == NameAddr(None, u, {})
    with pytest.raises(TypeError):
        NameAddr(u)  # type: ignore[arg-type]


def test_tags_in_message() -> None:
    m = req(*MANDATORY)
    assert m.from_.tag == "f1" and m.to.tag is None
    assert m.from_ is m.from_  # cached
    m.set("To", "<sip:htable@10.0.0.2:5060>;tag=t2")
    assert m.to.tag == "t2"


# -- CSeq, Call-ID, Max-Forwards ---------------------------------------------------------------


def test_cseq() -> None:
    assert CSeq.parse("10 KDMQ") == CSeq(10, "KDMQ")
    assert CSeq.parse("  4711\t INVITE ") == (4711, "INVITE")
    assert str(CSeq(1, "OPTIONS")) == "1 OPTIONS"
    assert hash(CSeq(1, "A")) == hash(CSeq.parse("1 A"))


@pytest.mark.parametrize(
    "text",
    ["", "10", "KDMQ", "x KDMQ", "-1 KDMQ", "2147483648 KDMQ", "1 2 3", "1 K(DMQ", "\uff11 KDMQ"],
)
def test_bad_cseq(text: str) -> None:
    with pytest.raises(SipParseError, match=r"^Bad CSeq$"):
        CSeq.parse(text)


def test_call_id_and_max_forwards() -> None:
    m = req(*MANDATORY, "Max-Forwards: 2")
    assert m.call_id == "c1@10.0.0.1" and m.max_forwards == 2
    assert req(*MANDATORY).max_forwards is None
    for bad in ("x", "256", "-1", "1 2", ""):
        m = req(*MANDATORY, f"Max-Forwards: {bad}")
        with pytest.raises(SipParseError, match="Bad Max-Forwards"):
            m.max_forwards  # noqa: B018
        with pytest.raises(BadRequestError, match="Bad Max-Forwards"):
            validate_request(m)
    m = req(*MANDATORY[:3], "Call-ID: a b", MANDATORY[4])
    with pytest.raises(SipParseError, match="Bad Call-ID"):
        validate_request(m)


# -- mandatory headers / validate_request -----------------------------------------------------


@pytest.mark.parametrize(
    ("drop", "reason"),
    [
        (0, "Missing Via"),
        (1, "Missing From"),
        (2, "Missing To"),
        (3, "Missing Call-ID"),
        (4, "Missing CSeq"),
    ],
)
def test_missing_mandatory_header(drop: int, reason: str) -> None:
    m = req(*[h for i, h in enumerate(MANDATORY) if i != drop])  # parse itself is lazy: fine
    with pytest.raises(SipParseError) as exc:
        validate_request(m)
    assert exc.value.reason == reason
    assert not exc.value.answerable and not isinstance(exc.value, BadRequestError)


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        ("From: <sip:a@b>;tag=2", "Duplicate From"),
        ("To: <sip:x@y>", "Duplicate To"),
        ("i: other", "Duplicate Call-ID"),
        ("CSeq: 11 KDMQ", "Duplicate CSeq"),
    ],
)
def test_duplicate_singleton_is_dropped(header: str, reason: str) -> None:
    with pytest.raises(SipParseError) as exc:
        validate_request(req(*MANDATORY, header))
    assert exc.value.reason == reason and not exc.value.answerable


@pytest.mark.parametrize(
    ("start", "extra", "reason"),
    [
        ("KDMQ tel:+123 SIP/2.0", (), "Bad Request-URI"),
        ("OPTIONS sip:htable@10.0.0.2 SIP/2.0", (), "CSeq method mismatch"),
        ("KDMQ sip:htable@10.0.0.2 SIP/2.0", ("garbage line",), "Bad header line"),
        ("KDMQ sip:htable@10.0.0.2 SIP/2.0", ("Bad Name: x",), "Bad header line"),
    ],
)
def test_answerable_problems(start: str, extra: tuple[str, ...], reason: str) -> None:
    m = req(*MANDATORY, *extra, start=start)
    with pytest.raises(BadRequestError) as exc:
        validate_request(m)
    err = exc.value
    assert (err.reason, err.answerable, err.request) == (reason, True, m)
    resp = make_response(err.request, 400, err.reason)
    assert resp.to_bytes().startswith(f"SIP/2.0 400 {reason}\r\n".encode())
    assert parse_message(resp.to_bytes()).get("Call-ID") == "c1@10.0.0.1"


def test_validate_response() -> None:
    r = parse_message(raw(*MANDATORY[1:], start="SIP/2.0 200 OK"))
    assert isinstance(r, Response)
    with pytest.raises(SipParseError, match="Missing Via"):
        validate_response(r)


# -- Content-Length ---------------------------------------------------------------------------


def test_content_length_shorter_than_body_cuts_it() -> None:
    data = raw(*MANDATORY, "Content-Length: 3", cl=False, body="abcdef")
    m = parse_message(data)
    assert m.body == b"abc" and m.content_length == 3
    assert m.to_bytes() == data[:-3]


def test_content_length_longer_than_body_is_answerable() -> None:
    with pytest.raises(BadRequestError) as exc:
        parse_message(raw(*MANDATORY, "Content-Length: 10", cl=False, body="abc"))
    assert exc.value.reason == "Bad Content-Length" and exc.value.answerable
    assert exc.value.request.call_id == "c1@10.0.0.1"
    assert make_response(exc.value.request, 400, exc.value.reason).status == 400


def test_content_length_longer_without_mandatory_is_dropped() -> None:
    with pytest.raises(SipParseError) as exc:
        parse_message(raw(*MANDATORY[1:], "Content-Length: 10", cl=False, body="abc"))
    assert exc.value.reason == "Bad Content-Length" and not exc.value.answerable


@pytest.mark.parametrize(
    "headers",
    [
        ("Content-Length: x",),
        ("Content-Length: -1",),
        ("Content-Length: 1 2",),
        ("Content-Length: 99999999999",),
        ("Content-Length: 0", "Content-Length: 0"),
        ("Content-Length: 0", "l: 0"),
        ("content-LENGTH : 0", "L:0"),
    ],
)
def test_bad_content_length(headers: tuple[str, ...]) -> None:
    with pytest.raises(BadRequestError, match=r"^Bad Content-Length$"):
        parse_message(raw(*MANDATORY, *headers, cl=False))


def test_content_length_name_variants() -> None:
    for line in ("l: 2", "L :2", "content-length:\t2", "CONTENT-LENGTH :  2  "):
        m = parse_message(raw(*MANDATORY, line, cl=False, body="xyz"))
        assert m.body == b"xy", line
    # a header that merely starts with the name is not Content-Length
    m = parse_message(raw(*MANDATORY, "Content-Length-X: 1", "Lx: 1", cl=False, body="xyz"))
    assert m.body == b"xyz" and m.content_length is None


def test_missing_content_length_takes_the_rest_and_is_added() -> None:
    m = parse_message(raw(*MANDATORY, cl=False, body="hello"))
    assert m.body == b"hello" and m.content_length is None
    out = m.to_bytes()
    assert out.endswith(b"CSeq: 10 KDMQ\r\nContent-Length: 5\r\n\r\nhello")


def test_body_change_rewrites_content_length_in_place() -> None:
    m = req(*MANDATORY, "Content-Length: 1", "Content-Type: text/plain", body="a", cl=False)
    m.body = b"longer body"
    out = m.to_bytes()
    assert b"\r\nContent-Length: 11\r\nContent-Type: text/plain\r\n\r\nlonger body" in out
    assert parse_message(out).body == b"longer body"


# -- limits -----------------------------------------------------------------------------------


def test_message_too_large_answerable_when_head_is_sound() -> None:
    data = raw(*MANDATORY, body="x" * 2000)
    with pytest.raises(BadRequestError) as exc:
        parse_message(data, Limits(max_size=1000))
    assert exc.value.reason == "Message too large"
    assert exc.value.request.cseq == CSeq(10, "KDMQ")


def test_message_too_large_dropped_when_head_is_not_readable() -> None:
    with pytest.raises(SipParseError) as exc:
        parse_message(b"x" * 70000)
    assert exc.value.reason == "Message too large" and not exc.value.answerable
    with pytest.raises(SipParseError) as exc:
        parse_message(raw(*MANDATORY, "X: " + "y" * 2000), Limits(max_size=1000))
    assert exc.value.reason == "Message too large" and not exc.value.answerable


def test_size_limit_is_inclusive() -> None:
    data = raw(*MANDATORY)
    parse_message(data, Limits(max_size=len(data)))
    with pytest.raises(SipParseError, match="Message too large"):
        parse_message(data, Limits(max_size=len(data) - 1))


def test_too_many_headers() -> None:
    headers = [*MANDATORY, *(f"X-{i}: {i}" for i in range(94))]
    parse_message(raw(*headers))  # 99 + Content-Length = 100 header lines: the limit
    with pytest.raises(SipParseError) as exc:
        parse_message(raw(*headers, "X-Last: 1"))
    assert exc.value.reason == "Too many headers" and not exc.value.answerable
    parse_message(raw(*headers[:3]), Limits(max_headers=4))
    with pytest.raises(SipParseError, match="Too many headers"):
        parse_message(raw(*headers[:4]), Limits(max_headers=4))
    with pytest.raises(SipParseError, match="Too many headers"):  # LF-only counts the same
        parse_message(raw(*headers[:4], eol="\n"), Limits(max_headers=4))


def test_line_too_long() -> None:
    ok = "X-Long: " + "a" * (8192 - 8)
    parse_message(raw(*MANDATORY, ok))
    with pytest.raises(SipParseError) as exc:
        parse_message(raw(*MANDATORY, ok + "a"))
    assert exc.value.reason == "Line too long"
    with pytest.raises(SipParseError, match="Line too long"):
        parse_message(raw(*MANDATORY, ok + "a", eol="\n"))
    with pytest.raises(SipParseError, match="Line too long"):
        parse_message(raw(*MANDATORY, "X: " + "b" * 60), Limits(max_line=50))


def test_limits_checked_before_anything_else() -> None:
    # An oversized datagram is refused on its length alone, even if it is not SIP at all.
    with pytest.raises(SipParseError, match="Message too large"):
        parse_message(b"\0" * 65536)


# -- line endings and odd bytes ---------------------------------------------------------------


def test_lf_only_input_is_written_with_crlf() -> None:
    data = raw(*MANDATORY, body="b\nody", eol="\n")
    m = parse_message(data)
    validate_request(m)  # type: ignore[arg-type]
    assert m.body == b"b\nody"
    out = m.to_bytes()
    assert out == raw(*MANDATORY, body="b\nody")
    assert b"\n" not in out.replace(b"\r\n", b"")[: -len(b"b\nody")]


def test_mixed_line_endings() -> None:
    data = b"KDMQ sip:a@b SIP/2.0\r\n" + "\n".join(MANDATORY).encode() + b"\r\nl: 1\n\r\nxy"
    m = parse_message(data)
    assert m.get("Call-ID") == "c1@10.0.0.1" and m.body == b"x"
    assert m.to_bytes() == raw(*MANDATORY, "l: 1", start="KDMQ sip:a@b SIP/2.0", cl=False, body="x")


def test_first_empty_line_ends_the_head() -> None:
    # the body may contain CRLFCRLF; an earlier bare-LF empty line must win
    m = parse_message(b"KDMQ sip:a@b SIP/2.0\nCall-ID: 1\n\nbody\r\n\r\nmore")
    assert m.body == b"body\r\n\r\nmore" and m.call_id == "1"


def test_leading_crlf_is_skipped() -> None:
    m = parse_message(b"\r\n\r\n" + raw(*MANDATORY))
    assert m.to_bytes() == raw(*MANDATORY)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "Empty message"),
        (b"\r\n\r\n", "Empty message"),
        (b"KDMQ sip:a@b SIP/2.0\r\nCall-ID: 1\r\n", "Missing empty line"),
        (b"KDMQ sip:a@b SIP/2.0\r\nCall-ID: 1\rX: 2\r\n\r\n", "Bad line ending"),
        (b"KDMQ sip:a@b SIP/2.0\r\nCall-ID: \x001\r\n\r\n", "Bad character in header"),
    ],
)
def test_malformed_framing(data: bytes, reason: str) -> None:
    with pytest.raises(SipParseError) as exc:
        parse_message(data)
    assert exc.value.reason == reason and not exc.value.answerable


def test_non_utf8_bytes_survive() -> None:
    data = raw(*MANDATORY, "X-Bin: caf\xe9".replace("\xe9", "")).replace(
        b"X-Bin: caf", b"X-Bin: caf\xe9\xff"
    )
    m = parse_message(data)
    value = m.get("X-Bin")
    assert value is not None and value.startswith("caf")
    m.add("X-More", "ü")
    out = m.to_bytes()
    assert b"X-Bin: caf\xe9\xff\r\n" in out and "X-More: ü".encode() in out
    assert parse_message(out).get("X-Bin") == value


def test_utf8_display_name() -> None:
    m = req(*MANDATORY[:1], 'From: "Jürgen" <sip:j@h>;tag=1', *MANDATORY[2:])
    assert m.from_.display == "Jürgen"


def test_bytes_like_input() -> None:
    data = raw(*MANDATORY)
    assert parse_message(bytearray(data)).to_bytes() == data  # type: ignore[arg-type]
    assert parse_message(memoryview(data)).to_bytes() == data  # type: ignore[arg-type]


# -- editing ----------------------------------------------------------------------------------


def test_add_set_remove_keep_order() -> None:
    m = req(*MANDATORY, "X-A: 1", "X-B: 2", "X-A: 3")
    m.set("x-a", "new")
    m.add("X-C", "4")
    m.remove("X-B")
    m.add("Via", "SIP/2.0/TCP proxy;branch=z9hG4bKtop", first=True)
    names = [n for n, _ in m.header_items()]
    assert names == ["Via", "Via", "From", "To", "Call-ID", "CSeq", "X-A", "Content-Length", "X-C"]
    assert m.get_all("X-A") == ["new"]
    assert m.via.host == "proxy"  # caches dropped on edit
    again = parse_message(m.to_bytes())
    assert again.header_items() == m.header_items()
    m.remove("Nope")
    m.remove("bad name")


def test_add_rejects_injection() -> None:
    m = req(*MANDATORY)
    for name, value in (
        ("X", "a\r\nInjected: 1"),
        ("X", "a\nb"),
        ("X", "nul\0"),
        ("Bad Name", "v"),
        ("X:", "v"),
        ("X", "\ud800"),
    ):
        with pytest.raises(ValueError):
            m.add(name, value)
    with pytest.raises(ValueError):
        Request("KD MQ", "sip:a@b")
    with pytest.raises(ValueError):
        Request("KDMQ", "sip:a b")
    with pytest.raises(ValueError):
        Response(99, "x")
    with pytest.raises(ValueError):
        Response(200, "O\r\nK")


def test_replace_top_via_keeps_other_values() -> None:
    m = req(
        "Via: SIP/2.0/UDP a:1;rport;branch=z9hG4bK1, SIP/2.0/UDP b;branch=z9hG4bK2", *MANDATORY[1:]
    )
    via = m.via
    via.params["rport"] = "5555"
    via.params["received"] = "192.0.2.1"
    m.replace_top_via(via)
    assert m.get_all("Via") == [
        "SIP/2.0/UDP a:1;rport=5555;branch=z9hG4bK1;received=192.0.2.1",
        "SIP/2.0/UDP b;branch=z9hG4bK2",
    ]
    assert m.via.rport == "5555" and m.via.received == "192.0.2.1"
    with pytest.raises(SipParseError, match="Missing Via"):
        req(*MANDATORY[1:]).replace_top_via(via)


def test_start_line_edits_are_serialised() -> None:
    m = req(*MANDATORY)
    m.uri = "sip:usrloc@10.0.0.9"
    assert m.ruri.user == "usrloc"
    assert m.to_bytes().startswith(b"KDMQ sip:usrloc@10.0.0.9 SIP/2.0\r\n")
    r = parse_message(raw(*MANDATORY, start="SIP/2.0 200 OK"))
    assert isinstance(r, Response)
    r.status, r.reason = 480, "Temporarily Unavailable"
    assert r.to_bytes().startswith(b"SIP/2.0 480 Temporarily Unavailable\r\n")


# -- building ---------------------------------------------------------------------------------


def test_request_build_kamailio_layout() -> None:
    body = b"sip:10.0.0.1:5060;status=active\r\n"
    r = Request.build(
        "KDMQ",
        SipUri.parse("sip:notification_peer@10.0.0.2:5060"),
        via=Via("UDP", "10.0.0.1", 5060, {"branch": "z9hG4bKa1"}),
        from_=NameAddr(None, SipUri.parse("sip:notification_peer@10.0.0.1:5060"), {"tag": "t"}),
        to=NameAddr(uri=SipUri.parse("sip:notification_peer@10.0.0.2:5060")),
        call_id="cid@10.0.0.1",
        cseq=10,
        max_forwards=2,
        headers=[("User-Agent", "pydmq"), ("Content-Type", "text/plain")],
        body=body,
    )
    assert r.to_bytes() == (
        b"KDMQ sip:notification_peer@10.0.0.2:5060 SIP/2.0\r\n"
        b"Via: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKa1\r\n"
        b"To: <sip:notification_peer@10.0.0.2:5060>\r\n"
        b"From: <sip:notification_peer@10.0.0.1:5060>;tag=t\r\n"
        b"CSeq: 10 KDMQ\r\n"
        b"Call-ID: cid@10.0.0.1\r\n"
        b"Content-Length: 33\r\n"
        b"Max-Forwards: 2\r\n"
        b"User-Agent: pydmq\r\n"
        b"Content-Type: text/plain\r\n"
        b"\r\n" + body
    )
    back = parse_message(r.to_bytes())
    assert isinstance(back, Request)
    validate_request(back)
    assert back.max_forwards == 2 and back.cseq == CSeq(10, "KDMQ")
    no_mf = Request.build(
        "OPTIONS",
        "sip:a@b",
        via="SIP/2.0/TCP h;branch=z9hG4bK1",
        from_="<sip:x@y>;tag=1",
        to="<sip:a@b>",
        call_id="c",
        cseq=CSeq(7, "OPTIONS"),
        max_forwards=None,
    )
    assert no_mf.max_forwards is None and no_mf.content_length == 0


def test_make_response_rfc3261() -> None:
    m = req(
        "Via: SIP/2.0/UDP p;branch=z9hG4bKp",
        "v: SIP/2.0/UDP a;branch=z9hG4bKa",
        *MANDATORY[1:],
        "Max-Forwards: 70",
        "X-Ignored: 1",
        body="hi",
    )
    r = make_response(
        m,
        200,
        "OK",
        to_tag="tt",
        extra_headers=[("Server", "pydmq")],
        body=b"data",
        content_type="text/plain",
    )
    assert r.to_bytes() == (
        b"SIP/2.0 200 OK\r\n"
        b"Via: SIP/2.0/UDP p;branch=z9hG4bKp\r\n"
        b"v: SIP/2.0/UDP a;branch=z9hG4bKa\r\n"
        b"From: <sip:htable@10.0.0.1:5060>;tag=f1\r\n"
        b"To: <sip:htable@10.0.0.2:5060>;tag=tt\r\n"
        b"Call-ID: c1@10.0.0.1\r\n"
        b"CSeq: 10 KDMQ\r\n"
        b"Content-Type: text/plain\r\n"
        b"Server: pydmq\r\n"
        b"Content-Length: 4\r\n"
        b"\r\ndata"
    )
    fresh = make_response(m, 404, "User Not Found")
    tag = fresh.to.tag
    assert tag and len(tag) == 16 and fresh.body == b"" and fresh.content_length == 0
    trying = make_response(m, 100, "Trying")
    assert trying.to.tag is None


def test_make_response_uses_top_via_edited_in_place() -> None:
    m = req(
        "Via: SIP/2.0/UDP a:1;branch=z9hG4bK1;rport, SIP/2.0/UDP b;branch=z9hG4bK2",
        "Via: SIP/2.0/UDP c;branch=z9hG4bK3",
        *MANDATORY[1:],
    )
    untouched = make_response(m, 200, "OK")
    assert untouched.get_all("Via") == m.get_all("Via")
    m.via.params.update(rport="4000", received="192.0.2.7")
    r = make_response(m, 200, "OK")
    assert r.get_all("Via") == [
        "SIP/2.0/UDP a:1;branch=z9hG4bK1;rport=4000;received=192.0.2.7",
        "SIP/2.0/UDP b;branch=z9hG4bK2",
        "SIP/2.0/UDP c;branch=z9hG4bK3",
    ]
    assert m.get("Via") == "SIP/2.0/UDP a:1;branch=z9hG4bK1;rport"  # request rows unchanged


def test_make_response_keeps_existing_to_tag() -> None:
    m = req(*MANDATORY[:2], "To: <sip:a@b>;tag=orig", *MANDATORY[3:])
    assert make_response(m, 200, "OK", to_tag="other").to.tag == "orig"
    flag = req(*MANDATORY[:2], "To: <sip:a@b>;tag", *MANDATORY[3:])
    assert "tag=" not in (make_response(flag, 200, "OK").get("To") or "")


def test_make_response_never_raises_on_bad_request() -> None:
    m = req("To: <broken", "CSeq: what")
    r = make_response(m, 400, "Bad Request")
    assert r.get_all("To") == ["<broken"]
    assert parse_message(r.to_bytes()).get("CSeq") == "what"


def test_helpers() -> None:
    b = new_branch()
    assert b.startswith("z9hG4bK") and int(b[7:], 16) >= 0 and len(b) == 23
    assert new_branch() != b
    assert new_tag() != new_tag() and len(new_tag()) == 16
    cid = new_call_id("10.0.0.1")
    assert cid.endswith("@10.0.0.1") and new_call_id("h") != new_call_id("h")


def test_repr() -> None:
    assert repr(req(*MANDATORY)) == "<Request KDMQ sip:htable@10.0.0.2:5060>"
    assert repr(Response(200, "OK")) == "<Response 200 OK>"
    assert bytes(Response(200, "OK")) == b"SIP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n"
