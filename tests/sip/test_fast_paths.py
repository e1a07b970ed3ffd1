"""The receive path's shortcuts agree with the general code they stand in for.

``make_response`` joins the response bytes while building its rows, ``NameAddr.parse`` and
``Via.parse`` have a fast path for the usual ``<uri>;tag=x`` / ``branch=...`` forms, and header
lookups go through a first-value index: each must give exactly what the general code gives.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pydmq.sip.errors import SipParseError
from pydmq.sip.headers import NameAddr, Via, _parse_param_text, _parse_params, _split_semis
from pydmq.sip.message import Response, make_response, parse_message, validate_request

REQUEST = (
    b"KDMQ sip:htable@10.0.0.2:5060 SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKabc;rport, SIP/2.0/TCP 10.0.0.9\r\n"
    b"f: <sip:htable@10.0.0.1:5060>;tag=f1\r\n"
    b"To: <sip:htable@10.0.0.2:5060>\r\n"
    b"Call-ID: c1@10.0.0.1\r\n"
    b"CSeq: 10 KDMQ\r\n"
    b"Max-Forwards: 1\r\n"
    b"Content-Length: 0\r\n\r\n"
)


def rebuilt(resp: Response) -> bytes:
    """What ``to_bytes`` writes from the rows alone (no bytes joined in advance)."""
    return Response(resp.status, resp.reason, resp.header_items(), resp.body).to_bytes()


@pytest.mark.parametrize("stamp", [False, True])
@pytest.mark.parametrize("status", [100, 200, 404])
def test_make_response_bytes_match_rows(stamp: bool, status: int) -> None:
    req = parse_message(REQUEST)
    validate_request(req)
    if stamp:
        req.via.params["rport"] = "5070"
        req.via.params["received"] = "10.0.0.7"
    resp = make_response(
        req,
        status,
        "Some Reason",
        to_tag="t9",
        extra_headers=[("Server", "pydmq"), ("Retry-After", "1")],
        body=b"hello",
        content_type="text/plain",
    )
    data = resp.to_bytes()
    assert data == rebuilt(resp)
    assert (b";rport=5070;received=10.0.0.7, SIP/2.0/TCP" in data) == stamp
    assert (b"To: <sip:htable@10.0.0.2:5060>;tag=t9\r\n" in data) == (status != 100)


def test_make_response_content_length_in_extra_headers() -> None:
    """A caller's Content-Length takes the place of the written one, as in ``to_bytes``."""
    req = parse_message(REQUEST)
    resp = make_response(req, 200, "OK", extra_headers=[("Content-Length", "99")], body=b"ab")
    data = resp.to_bytes()
    assert data == rebuilt(resp)
    assert data.count(b"Content-Length") == 1
    assert data.endswith(b"Content-Length: 2\r\n\r\nab")


def test_make_response_then_edit() -> None:
    resp = make_response(parse_message(REQUEST), 200, "OK", to_tag="x")
    resp.add("Server", "later")
    resp.body = b"xyz"
    assert resp.to_bytes() == rebuilt(resp)
    assert resp.to_bytes().endswith(b"Content-Length: 3\r\nServer: later\r\n\r\nxyz")


def test_index_follows_edits() -> None:
    req = parse_message(REQUEST)
    assert req.max_forwards == 1
    req.set("Max-Forwards", "7")
    assert req.max_forwards == 7
    req.remove("Max-Forwards")
    assert req.max_forwards is None
    req.add("To", "<sip:b@c>", first=True)
    assert str(req.to.uri) == "sip:b@c"


@pytest.mark.parametrize(
    "text",
    [
        "<sip:a@b>",
        "<sip:a@b>;tag=1",
        "<sip:a@b>;tag=1;lr",
        " <sip:a@b> ;tag=1",
        "<sip:a@b>;tag=",
        "<sip:a@b>;tag",
        "<sip:a@b>;=1",
        "<sip:a@b>;;tag=1",
        "<sip:a@b>;tag=1;",
        '<sip:a@b>;tag="x;y"',
        "<sip:a@b>;tag = 1",
        "<sip:a@b>x",
        "<sip:a@b",
        "< sip:a@b >;TAG=a=b",
        "<sip:a@b>;t\u00e9g=1",
        "<sip:a@b>;tag=<x>",
    ],
)
def test_name_addr_fast_path_agrees(text: str) -> None:
    """Fast path (``<`` first) against the general parser it skips."""
    try:
        fast: object = NameAddr.parse(text)
    except SipParseError as exc:
        fast = exc.reason
    try:
        general: object = NameAddr._parse(text.strip(" \t"))
    except SipParseError:
        general = "Bad address"
    assert fast == general


PARAM_TEXT = st.text(alphabet='ab=;" \t<>,-.\u00e9', max_size=12)


@settings(max_examples=2000, deadline=None)
@given(PARAM_TEXT)
def test_param_text_agrees_with_general(text: str) -> None:
    def general() -> dict[str, str | None]:
        return _parse_params(_split_semis(text), 0)

    try:
        expected: object = general()
    except SipParseError as exc:
        expected = exc.reason
    try:
        got: object = _parse_param_text(text)
    except SipParseError as exc:
        got = exc.reason
    assert got == expected


@settings(max_examples=500, deadline=None)
@given(PARAM_TEXT)
def test_via_params_round_trip(text: str) -> None:
    try:
        via = Via.parse(f"SIP/2.0/UDP h:1;{text}")
    except SipParseError:
        return
    assert Via.parse(str(via)) == via
