"""The client command framer, without sockets: whole, byte by byte, with trailing data."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from imapproxy.errors import ProxyError
from imapproxy.protocol.framing import (
    AWAIT_CONTINUATION,
    NEED_DATA,
    ClientClosed,
    CommandFramer,
    Line,
    LineTooLong,
    LiteralData,
    LiteralSpec,
    parse_literal_marker,
)
from tests.support.feed import framer_events, split


def feed(data: bytes, *, step: int | None = None, accept: bool = True) -> list[object]:
    framer = CommandFramer(1024)
    out: list[object] = []
    chunks = [data] if step is None else split(data, step)
    for chunk in filter(None, chunks):  # b"" would mean EOF
        framer.receive_data(chunk)
        out.extend(framer_events(framer, accept))
    return merge_literals(out)


def merge_literals(out: list[object]) -> list[object]:
    merged: list[object] = []
    for event in out:
        if (
            isinstance(event, LiteralData)
            and merged
            and isinstance(merged[-1], LiteralData)
            and not merged[-1].last
        ):
            merged[-1] = LiteralData(merged[-1].data + event.data, event.last)
        else:
            merged.append(event)
    return merged


LOGIN_WITH_LITERALS = b"a LOGIN {5}\r\nalice {6+}\r\nsecret\r\nb NOOP\r\n"
EXPECTED = [
    Line(b"a LOGIN {5}\r\n", True, LiteralSpec(5, True, False)),
    AWAIT_CONTINUATION,
    LiteralData(b"alice", True),
    Line(b" {6+}\r\n", False, LiteralSpec(6, False, False)),
    LiteralData(b"secret", True),
    Line(b"\r\n", False, None),
    Line(b"b NOOP\r\n", True, None),
]


@pytest.mark.parametrize("step", [None, 1, 2, 3, 7])
def test_literals_whole_and_byte_by_byte(step: int | None) -> None:
    assert feed(LOGIN_WITH_LITERALS, step=step) == EXPECTED


def test_trailing_partial_line_waits() -> None:
    framer = CommandFramer(1024)
    framer.receive_data(b"a NOOP\r\nb CAPA")
    assert framer.next_event() == Line(b"a NOOP\r\n", True, None)
    assert framer.next_event() is NEED_DATA
    assert framer.mid_command
    framer.receive_data(b"BILITY\r\n")
    assert framer.next_event() == Line(b"b CAPABILITY\r\n", True, None)
    assert not framer.mid_command


def test_rejected_literal_starts_a_new_command() -> None:
    out = feed(b"a APPEND INBOX {99}\r\nb NOOP\r\n", accept=False)
    assert out == [
        Line(b"a APPEND INBOX {99}\r\n", True, LiteralSpec(99, True, False)),
        AWAIT_CONTINUATION,
        Line(b"b NOOP\r\n", True, None),
    ]


def test_literal8_and_zero_length() -> None:
    out = feed(b"a APPEND INBOX ~{0}\r\n\r\n")
    assert out == [
        Line(b"a APPEND INBOX ~{0}\r\n", True, LiteralSpec(0, True, True)),
        AWAIT_CONTINUATION,
        LiteralData(b"", True),  # every literal is reported, even an empty one
        Line(b"\r\n", False, None),
    ]


def test_literal_with_bytes_that_look_like_commands() -> None:
    out = feed(b"a APPEND INBOX {12+}\r\n\r\nb LOGOUT\r\n\r\nc NOOP\r\n")
    assert LiteralData(b"\r\nb LOGOUT\r\n", True) in out
    assert out[-1] == Line(b"c NOOP\r\n", True, None)


def test_line_too_long() -> None:
    framer = CommandFramer(16)
    framer.receive_data(b"a" * 17)
    with pytest.raises(LineTooLong) as raised:
        framer.next_event()
    assert raised.value.response() == b"* BYE Command line too long\r\n"


def test_line_exactly_at_limit_is_fine() -> None:
    framer = CommandFramer(8)
    framer.receive_data(b"a NOOP\r\n")
    assert framer.next_event() == Line(b"a NOOP\r\n", True, None)


@pytest.mark.parametrize(
    ("data", "mid"), [(b"", False), (b"a NO", True), (b"a X {3+}\r\nab", True)]
)
def test_eof(data: bytes, mid: bool) -> None:
    framer = CommandFramer(1024)
    framer.receive_data(data)
    framer.receive_data(b"")
    assert framer_events(framer)[-1] == ClientClosed(mid_command=mid)


@pytest.mark.parametrize("line", [b"a {5}\r\n", b"a {5+}\r\n", b"a ~{5}\r\n", b"x {5}\n"])
def test_literal_markers(line: bytes) -> None:
    assert parse_literal_marker(line) is not None


@pytest.mark.parametrize(
    "line",
    [
        b"a {-5}\r\n",
        b"a {5}x\r\n",
        b"a {}\r\n",
        b"a {99999999999}\r\n",
        b"a {4294967296}\r\n",
        b"a NOOP\r\n",
    ],
)
def test_not_literal_markers(line: bytes) -> None:
    assert parse_literal_marker(line) is None


@given(st.binary(max_size=2048), st.integers(min_value=1, max_value=64))
def test_hostile_bytes_only_raise_our_errors(data: bytes, step: int) -> None:
    framer = CommandFramer(256)
    consumed = 0
    try:
        for chunk in split(data, step):
            framer.receive_data(chunk)
            for event in framer_events(framer):
                if isinstance(event, (Line, LiteralData)):
                    consumed += len(event.data)
    except ProxyError:
        return
    assert consumed <= len(data)


@given(
    st.lists(
        st.one_of(
            st.binary(min_size=0, max_size=40)
            .filter(lambda b: b"\n" not in b)
            .map(lambda b: b + b"\r\n"),
            st.binary(max_size=30).map(lambda b: b"x {%d+}\r\n" % len(b) + b),
        ),
        max_size=20,
    ),
    st.integers(min_value=1, max_value=9),
)
def test_chunking_never_changes_the_events(parts: list[bytes], step: int) -> None:
    data = b"".join(parts)
    assert feed(data, step=step) == feed(data)


def test_peek_line_shows_a_whole_first_line_and_consumes_nothing() -> None:
    framer = CommandFramer(1024)
    framer.receive_data(b"s SELECT IN")
    assert framer.peek_line() is None  # not whole yet
    framer.receive_data(b"BOX\r\nf FETCH 1 FLAGS\r\n")
    assert framer.peek_line() == b"s SELECT INBOX\r\n"
    assert framer.peek_line() == b"s SELECT INBOX\r\n"
    assert framer_events(framer)[0] == Line(b"s SELECT INBOX\r\n", True, None)


def test_peek_line_is_none_inside_a_command() -> None:
    framer = CommandFramer(1024)
    framer.receive_data(b"a APPEND INBOX {3+}\r\nabc\r\n")
    framer.next_event()  # the line announcing the literal
    assert framer.peek_line() is None  # literal bytes, not a command's first line
