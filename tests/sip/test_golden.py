"""Real Kamailio 5.6.3 datagrams: parse, validate, serialise byte-exact, agree with sipmessage,
and rebuild Kamailio's own replies byte-for-byte with make_response."""

from __future__ import annotations

from pathlib import Path

import pytest
import sipmessage

from pydmq.sip.message import (
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
FILES = sorted(GOLDEN.glob("[0-9][0-9]_*.txt"))
REQUESTS = [p for p in FILES if "__reply_" not in p.name]
PAIRS = [(p, r) for p in REQUESTS for r in FILES if r.name.startswith(p.stem + "__reply_")]


def _ids(paths: list[Path]) -> list[str]:
    return [p.stem for p in paths]


def snapshot(msg: SipMessage) -> tuple[object, ...]:
    """What 'the same message' means: start line, header rows, body."""
    if isinstance(msg, Request):
        start: tuple[object, ...] = (msg.method, msg.uri)
    else:
        assert isinstance(msg, Response)
        start = (msg.status, msg.reason)
    return (*start, msg.header_items(), msg.body)


def test_corpus_is_complete() -> None:
    assert len(FILES) == 42
    assert len(PAIRS) == 21


@pytest.mark.parametrize("path", FILES, ids=_ids(FILES))
def test_parses_and_validates(path: Path) -> None:
    data = path.read_bytes()
    msg = parse_message(data)
    if "__reply_" in path.name:
        assert isinstance(msg, Response)
        assert msg.status == int(path.stem.rsplit("_", 1)[1])
        validate_response(msg)
        assert msg.to.tag
    else:
        assert isinstance(msg, Request)
        validate_request(msg)
        assert msg.ruri.user == msg.to.uri.user  # the channel, in R-URI and To
        assert msg.cseq.method == msg.method
        assert msg.to.tag is None
    assert msg.via.transport == "UDP" and msg.via.branch is not None
    assert msg.via.branch.startswith("z9hG4bK")
    assert msg.from_.tag
    assert msg.content_length == len(msg.body)


@pytest.mark.parametrize("path", FILES, ids=_ids(FILES))
def test_serialise_unmodified_is_identity(path: Path) -> None:
    data = path.read_bytes()
    assert parse_message(data).to_bytes() == data


@pytest.mark.parametrize("path", FILES, ids=_ids(FILES))
def test_rebuilt_serialisation_is_identity(path: Path) -> None:
    # Touching the body drops the cached wire bytes: to_bytes() then writes every row again.
    data = path.read_bytes()
    msg = parse_message(data)
    msg.body = bytes(msg.body)
    assert msg._raw is None
    assert msg.to_bytes() == data


@pytest.mark.parametrize("path", FILES, ids=_ids(FILES))
def test_parse_serialise_parse(path: Path) -> None:
    first = parse_message(path.read_bytes())
    again = parse_message(first.to_bytes())
    assert snapshot(again) == snapshot(first)
    modified = parse_message(path.read_bytes())
    modified.add("X-Test", "1")
    modified.remove("X-Test")
    assert snapshot(parse_message(modified.to_bytes())) == snapshot(first)


@pytest.mark.parametrize("path", FILES, ids=_ids(FILES))
def test_agrees_with_sipmessage(path: Path) -> None:
    data = path.read_bytes()
    ours = parse_message(data)
    theirs = sipmessage.Message.parse(data)
    if isinstance(ours, Request):
        assert isinstance(theirs, sipmessage.Request)
        assert (ours.method, ours.uri) == (theirs.method, str(theirs.uri))
        assert ours.ruri.user == theirs.uri.user and ours.ruri.host == theirs.uri.host
        assert ours.ruri.port == theirs.uri.port
    else:
        assert isinstance(theirs, sipmessage.Response)
        assert (ours.status, ours.reason) == (theirs.code, theirs.phrase)
    # every header, in order; sipmessage groups repeated names, none repeat in these files
    assert [n for n, _ in ours.header_items()] == theirs.headers.keys()
    for name, value in ours.header_items():
        assert theirs.headers.getlist(name) == [value]
    assert ours.body == theirs.body
    assert ours.call_id == theirs.call_id
    assert (ours.cseq.seq, ours.cseq.method) == (theirs.cseq.sequence, theirs.cseq.method)
    assert ours.content_length == theirs.content_length
    assert ours.max_forwards == theirs.max_forwards
    assert ours.content_type == (str(theirs.content_type) if theirs.content_type else None)
    assert len(ours.vias) == len(theirs.via)
    for v, w in zip(ours.vias, theirs.via, strict=True):
        assert (v.transport, v.host, v.port) == (w.transport, w.host, w.port)
        assert v.params == dict(w.parameters)
    for a, b in ((ours.from_, theirs.from_address), (ours.to, theirs.to_address)):
        assert (a.display or "") == b.name
        assert (a.uri.user, a.uri.host, a.uri.port) == (b.uri.user, b.uri.host, b.uri.port)
        assert a.params == dict(b.parameters)


@pytest.mark.parametrize("in_place", [False, True], ids=["replace_top_via", "in_place"])
@pytest.mark.parametrize(("req_path", "reply_path"), PAIRS, ids=_ids([p for p, _ in PAIRS]))
def test_make_response_rebuilds_kamailio_reply(
    req_path: Path, reply_path: Path, in_place: bool
) -> None:
    """Same inputs as Kamailio's sl reply (status, reason, its To tag, Server, body) give the
    same bytes: header choice, order, spelling and Content-Length placement all match."""
    req = parse_message(req_path.read_bytes())
    golden = parse_message(reply_path.read_bytes())
    assert isinstance(req, Request) and isinstance(golden, Response)
    via = req.via
    if via.rport == "":  # RFC 3581, as the transport layer stamps it before replying
        via.params["rport"] = str(via.port)
        via.params["received"] = via.host
        if not in_place:
            req.replace_top_via(via)
    server = golden.get("Server")
    assert server is not None
    resp = make_response(
        req,
        golden.status,
        golden.reason,
        to_tag=golden.to.tag,
        extra_headers=[("Server", server)],
        body=golden.body,
        content_type=golden.content_type,
    )
    assert resp.to_bytes() == reply_path.read_bytes()


def test_specific_values() -> None:
    notif = parse_message((GOLDEN / "01_kdmq_notification_peer_maxfwd2.txt").read_bytes())
    assert isinstance(notif, Request)
    assert notif.ruri.user == "notification_peer"
    assert (notif.ruri.host, notif.ruri.port_str) == ("127.0.0.1", "5160")
    assert notif.max_forwards == 2
    assert notif.content_type == "text/plain"
    assert notif.body == b"sip:127.0.0.1:5161;status=active\r\n"
    assert notif.get("User-Agent") == "kamailio (5.6.3 (x86_64/linux))"
    assert notif.from_.uri.hostport() == "127.0.0.1:5161"

    ping = parse_message((GOLDEN / "14_options_ping.txt").read_bytes())
    assert ping.via.rport == "" and ping.via.received is None
    reply = parse_message((GOLDEN / "06_message_htset__reply_200.txt").read_bytes())
    assert reply.via.rport == "53294" and reply.via.received == "127.0.0.1"
    nf = parse_message((GOLDEN / "10_kdmq_nochannel__reply_404.txt").read_bytes())
    assert isinstance(nf, Response) and (nf.status, nf.reason) == (404, "User Not Found")
