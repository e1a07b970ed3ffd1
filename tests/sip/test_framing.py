"""StreamFramer: Content-Length framing, keep-alives, limits, and chunking independence."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pydmq.sip.errors import SipParseError
from pydmq.sip.framing import StreamFramer

# A real Kamailio 5.6.3 notification request (header order and spelling as tm writes them).
NOTIFY = (
    b"KDMQ sip:notification_peer@127.0.0.1:5160 SIP/2.0\r\n"
    b"Via: SIP/2.0/TCP 127.0.0.1:5161;branch=z9hG4bK801.bcbdaf67000000000000000000000000.0\r\n"
    b"To: <sip:notification_peer@127.0.0.1:5160>\r\n"
    b"From: <sip:notification_peer@127.0.0.1:5161>"
    b";tag=eade77f532d07538ed9b886c064ac746-15ce8358\r\n"
    b"CSeq: 10 KDMQ\r\n"
    b"Call-ID: 7d6e14f93a56a9f3-16862@127.0.0.1\r\n"
    b"Content-Length: 34\r\n"
    b"User-Agent: kamailio (5.6.3 (x86_64/linux))\r\n"
    b"Max-Forwards: 2\r\n"
    b"Content-Type: text/plain\r\n"
    b"\r\n"
    b"sip:127.0.0.1:5161;status=active\r\n"
)
REPLY = (
    b"SIP/2.0 200 OK\r\n"
    b"Via: SIP/2.0/TCP 127.0.0.1:5161;branch=z9hG4bK801.0\r\n"
    b"To: <sip:notification_peer@127.0.0.1:5160>;tag=1\r\n"
    b"From: <sip:notification_peer@127.0.0.1:5161>;tag=2\r\n"
    b"CSeq: 10 KDMQ\r\n"
    b"Call-ID: 7d6e14f93a56a9f3-16862@127.0.0.1\r\n"
    b"Content-Length: 0\r\n"
    b"\r\n"
)


def msg(
    body: bytes = b"", cl_header: bytes | None = b"Content-Length", extra: bytes = b""
) -> bytes:
    head = b"KDMQ sip:htable@10.0.0.1 SIP/2.0\r\nCall-ID: x\r\n" + extra
    if cl_header is not None:
        head += cl_header + b": " + str(len(body)).encode() + b"\r\n"
    return head + b"\r\n" + body


def feed_all(framer: StreamFramer, chunks: list[bytes]) -> list[bytes]:
    out: list[bytes] = []
    for chunk in chunks:
        out.extend(framer.feed(chunk))
    return out


class TestFraming:
    def test_single_message(self) -> None:
        f = StreamFramer()
        assert f.feed(NOTIFY) == [NOTIFY]
        assert f.buffered == 0

    def test_whole_read_is_returned_without_copy(self) -> None:
        f = StreamFramer()
        [out] = f.feed(NOTIFY)
        assert out is NOTIFY

    @pytest.mark.parametrize(
        "name", [b"Content-Length", b"content-length", b"CONTENT-LENGTH", b"l", b"L"]
    )
    def test_content_length_spellings(self, name: bytes) -> None:
        m = msg(b'{"a":1}\r\n\r\nx', cl_header=name)
        assert StreamFramer().feed(m + NOTIFY) == [m, NOTIFY]

    def test_whitespace_around_value_and_before_colon(self) -> None:
        m = b"KDMQ sip:a@b SIP/2.0\r\nContent-Length \t:  \t3 \t\r\n\r\nabc"
        assert StreamFramer().feed(m) == [m]

    def test_folded_content_length(self) -> None:
        m = b"KDMQ sip:a@b SIP/2.0\r\nContent-Length:\r\n 3\r\n\r\nabc"
        assert StreamFramer().feed(m) == [m]

    def test_missing_content_length_means_empty_body(self) -> None:
        m = msg(cl_header=None)
        assert StreamFramer().feed(m + REPLY) == [m, REPLY]

    def test_similar_header_names_are_not_content_length(self) -> None:
        m = msg(b"abc", extra=b"Content-Lengthy: 99\r\nlx: 5\r\nX-l: 7\r\n")
        assert StreamFramer().feed(m) == [m]

    def test_body_containing_blank_lines_and_sip_text(self) -> None:
        body = REPLY + b"\r\n\r\n" + NOTIFY
        m = msg(body)
        assert StreamFramer().feed(m + REPLY) == [m, REPLY]

    def test_several_messages_in_one_read(self) -> None:
        data = NOTIFY + REPLY + msg(b"xyz") + NOTIFY
        assert StreamFramer().feed(data) == [NOTIFY, REPLY, msg(b"xyz"), NOTIFY]

    def test_every_split_point(self) -> None:
        data = NOTIFY + REPLY
        for i in range(len(data) + 1):
            f = StreamFramer()
            assert feed_all(f, [data[:i], data[i:]]) == [NOTIFY, REPLY], i
            assert f.buffered == 0

    def test_byte_by_byte(self) -> None:
        data = b"\r\n\r\n" + NOTIFY + b"\r\n" + REPLY + b"\r\n\r\n"
        f = StreamFramer()
        assert feed_all(f, [data[i : i + 1] for i in range(len(data))]) == [NOTIFY, REPLY]
        assert f.take_pings() == 2

    def test_partial_message_is_buffered(self) -> None:
        f = StreamFramer()
        assert f.feed(NOTIFY[:-5]) == []
        assert f.buffered == len(NOTIFY) - 5
        assert f.feed(NOTIFY[-5:]) == [NOTIFY]
        assert f.buffered == 0

    def test_empty_feed(self) -> None:
        f = StreamFramer()
        assert f.feed(b"") == []
        assert f.feed(NOTIFY[:10]) == []
        assert f.feed(b"") == []
        assert f.feed(NOTIFY[10:]) == [NOTIFY]

    def test_bytearray_input(self) -> None:
        assert StreamFramer().feed(bytearray(NOTIFY)) == [NOTIFY]  # type: ignore[arg-type]


class TestKeepAlive:
    def test_crlf_between_messages_is_skipped(self) -> None:
        f = StreamFramer()
        assert f.feed(b"\r\n" + NOTIFY + b"\r\n" + REPLY + b"\n\r\n") == [NOTIFY, REPLY]
        assert f.take_pings() == 0

    def test_double_crlf_is_a_ping(self) -> None:
        f = StreamFramer()
        assert f.feed(b"\r\n\r\n") == []
        assert f.pings == 1
        assert f.take_pings() == 1
        assert f.take_pings() == 0
        assert f.buffered == 0

    def test_ping_split_across_reads(self) -> None:
        f = StreamFramer()
        for part in (b"\r", b"\n\r", b"\n"):
            assert f.feed(part) == []
        assert f.take_pings() == 1

    def test_pings_counted_individually(self) -> None:
        f = StreamFramer()
        f.feed(b"\r\n\r\n\r\n\r\n" + NOTIFY + b"\r\n\r\n")
        assert f.take_pings() == 3

    def test_lone_crlf_is_not_a_ping(self) -> None:
        f = StreamFramer()
        f.feed(b"\r\n")
        f.feed(NOTIFY)
        f.feed(b"\r\n")
        assert f.take_pings() == 0

    def test_crlfs_inside_a_message_are_not_pings(self) -> None:
        f = StreamFramer()
        f.feed(msg(b"\r\n\r\n\r\n\r\n"))
        assert f.take_pings() == 0


class TestLimits:
    def test_unterminated_header_block_over_limit(self) -> None:
        f = StreamFramer(max_headers_bytes=100)
        assert f.feed(b"K" * 99) == []
        with pytest.raises(SipParseError, match="Header block too large"):
            f.feed(b"K")

    def test_header_block_exactly_at_limit(self) -> None:
        m = msg(b"ab")
        head_len = m.index(b"\r\n\r\n") + 4
        assert StreamFramer(max_headers_bytes=head_len).feed(m) == [m]
        with pytest.raises(SipParseError):
            StreamFramer(max_headers_bytes=head_len - 1).feed(m)

    def test_header_block_limit_checked_across_reads(self) -> None:
        m = msg()
        f = StreamFramer(max_headers_bytes=len(m) - 1)
        with pytest.raises(SipParseError):
            feed_all(f, [m[i : i + 1] for i in range(len(m))])

    def test_body_over_limit_refused_before_it_arrives(self) -> None:
        f = StreamFramer(max_size=1000)
        head = b"KDMQ sip:a@b SIP/2.0\r\nContent-Length: 100000\r\n\r\n"
        with pytest.raises(SipParseError, match="too large"):
            f.feed(head)

    def test_message_exactly_max_size(self) -> None:
        head_len = len(msg(b"x" * 100)) - 100
        m = msg(b"x" * (500 - head_len))
        assert len(m) == 500
        assert StreamFramer(max_size=500).feed(m) == [m]
        with pytest.raises(SipParseError):
            StreamFramer(max_size=499).feed(m)

    @pytest.mark.parametrize(
        "value", [b"abc", b"-1", b"", b"1 2", b"0x10", b"12345678901", b"\xd9\xa3"]
    )
    def test_bad_content_length(self, value: bytes) -> None:
        m = b"KDMQ sip:a@b SIP/2.0\r\nContent-Length: " + value + b"\r\n\r\n"
        with pytest.raises(SipParseError, match="Content-Length"):
            StreamFramer().feed(m)

    def test_conflicting_content_lengths(self) -> None:
        m = b"KDMQ sip:a@b SIP/2.0\r\nContent-Length: 1\r\nl: 2\r\n\r\nab"
        with pytest.raises(SipParseError, match="Conflicting"):
            StreamFramer().feed(m)

    def test_repeated_equal_content_length_is_fine(self) -> None:
        m = b"KDMQ sip:a@b SIP/2.0\r\nContent-Length: 2\r\nl: 2\r\n\r\nab"
        assert StreamFramer().feed(m) == [m]

    def test_error_is_sticky(self) -> None:
        f = StreamFramer(max_headers_bytes=10)
        with pytest.raises(SipParseError):
            f.feed(b"x" * 20)
        with pytest.raises(SipParseError):
            f.feed(NOTIFY)
        assert f.buffered == 0

    def test_error_is_not_answerable(self) -> None:
        with pytest.raises(SipParseError) as info:
            StreamFramer(max_headers_bytes=10).feed(b"x" * 20)
        assert info.value.answerable is False

    def test_buffer_stays_bounded_under_junk(self) -> None:
        f = StreamFramer(max_size=2000, max_headers_bytes=1000)
        with pytest.raises(SipParseError):
            for _ in range(100):
                f.feed(b"y" * 64)
                assert f.buffered < 1000

    def test_headers_limit_capped_by_max_size(self) -> None:
        assert StreamFramer(max_size=100, max_headers_bytes=1000).max_headers_bytes == 100

    @pytest.mark.parametrize(("size", "headers"), [(0, 10), (10, 0), (-1, 10)])
    def test_bad_limits(self, size: int, headers: int) -> None:
        with pytest.raises(ValueError, match="positive"):
            StreamFramer(size, headers)


# ---- property: framing does not depend on how the stream is cut into reads ----------------

_with_cl = st.builds(
    msg, st.binary(max_size=300), st.sampled_from([b"Content-Length", b"l", b"content-length"])
)
_message = st.one_of(_with_cl, st.just(msg(cl_header=None)))
_gap = st.sampled_from([b"", b"", b"\r\n", b"\r\n\r\n", b"\n", b"\r\n\r\n\r\n\r\n"])


@st.composite
def _stream_and_cuts(draw: st.DrawFn) -> tuple[list[bytes], bytes, int, list[int]]:
    messages = draw(st.lists(_message, min_size=1, max_size=6))
    stream = b"".join(draw(_gap) + m for m in messages) + draw(_gap)
    tail = draw(st.integers(0, 40))  # a trailing partial message
    stream += (messages[0] * 2)[:tail]
    cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=20)))
    return messages, stream, tail, cuts


@settings(max_examples=300, deadline=None)
@given(_stream_and_cuts())
def test_any_chunking_yields_the_same_messages(
    case: tuple[list[bytes], bytes, int, list[int]],
) -> None:
    messages, stream, tail, cuts = case
    whole = StreamFramer()
    reference = whole.feed(stream)
    pings = whole.take_pings()
    if tail == 0:
        assert reference == messages
        assert whole.buffered == 0
    else:
        assert reference[: len(messages)] == messages
    bounds = [0, *cuts, len(stream)]
    chunks = [stream[a:b] for a, b in itertools.pairwise(bounds)]
    f = StreamFramer()
    assert feed_all(f, chunks) == reference
    assert f.take_pings() == pings
    assert f.buffered == whole.buffered
