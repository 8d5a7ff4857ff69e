"""Whole backend responses for the control plane."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from imapproxy.errors import BackendProtocolError
from imapproxy.protocol.framing import NEED_DATA, parse_literal_marker
from imapproxy.protocol.response import (
    BackendClosed,
    Response,
    ResponseReader,
    parse_first_line,
)

DATA = (
    b"* OK [CAPABILITY IMAP4rev1 IDLE] ready\r\n"
    b"* 1 FETCH (BODY[] {5}\r\nab\r\nc)\r\n"
    b"A1 OK [READ-WRITE] done\r\n"
)


def read_all(reader: ResponseReader) -> list[Response]:
    out = []
    while (response := reader.next_response()) is not NEED_DATA:
        assert isinstance(response, Response)
        out.append(response)
    return out


@pytest.mark.parametrize("step", [1, 3, 1000])
def test_responses_in_any_chunking(step: int) -> None:
    reader = ResponseReader()
    out = []
    for i in range(0, len(DATA), step):
        reader.receive_data(DATA[i : i + step])
        out.extend(read_all(reader))
    assert [r.raw for r in out] == [
        b"* OK [CAPABILITY IMAP4rev1 IDLE] ready\r\n",
        b"* 1 FETCH (BODY[] {5}\r\nab\r\nc)\r\n",
        b"A1 OK [READ-WRITE] done\r\n",
    ]
    greeting, fetch, done = out
    assert greeting.code == b"CAPABILITY IMAP4rev1 IDLE" and greeting.word == b"OK"
    assert fetch.word == b"1" and not fetch.is_tagged
    assert done.is_tagged and done.status_text == b"OK [READ-WRITE] done"


def test_eof_and_limits() -> None:
    reader = ResponseReader(max_response_bytes=10)
    reader.receive_data(b"* 1 FETCH {100}\r\n")
    with pytest.raises(BackendProtocolError):
        reader.next_response()
    reader = ResponseReader()
    reader.receive_data(b"* OK half")
    reader.receive_data(b"")
    with pytest.raises(BackendClosed):
        reader.next_response()


def _reference_responses(data: bytes) -> list[tuple[bytes, bytes, bytes, bytes]]:
    """The reader as it was before its fast path (a copy and the literal regex per line):
    every complete response in ``data`` as (raw, tag, word, text)."""
    out, start = [], 0
    while True:
        pos = start
        while True:
            eol = data.find(b"\n", pos)
            if eol < 0:
                return out
            literal = parse_literal_marker(data[pos : eol + 1])
            if literal is None:
                end = eol + 1
                break
            pos = eol + 1 + literal.size
            if pos > len(data):
                return out
        raw = data[start:end]
        start = end
        tag, word, text = parse_first_line(raw[: raw.find(b"\n") + 1].rstrip(b"\r\n"))
        if not tag:
            return out  # the reader raises here: compared separately
        out.append((raw, tag, word, text))


_PIECES = st.sampled_from(
    [b"* ", b"A1 ", b"ok ", b"OK ", b"}", b"{", b"{3}", b"{0}", b"{2+}", b"~{1}", b"\r", b"\n"]
    + [b"\r\n", b"}\r\n", b"}\n", b"{3}\r\n", b"x", b" ", b"[UIDNEXT 5]", b"\r\r\n"]
)


@given(st.lists(_PIECES, max_size=40).map(b"".join), st.lists(st.integers(1, 9), max_size=20))
def test_the_reader_matches_the_reference_in_any_chunking(data: bytes, cuts: list[int]) -> None:
    expected = _reference_responses(data)
    reader, got, pos = ResponseReader(), [], 0
    try:
        for size in [*cuts, len(data)]:
            if pos >= len(data):
                break
            reader.receive_data(data[pos : pos + size])  # never b"": that is the EOF
            pos += size
            while (r := reader.next_response()) is not NEED_DATA:
                assert isinstance(r, Response)
                got.append((r.raw, r.tag, r.word, r.text))
    except BackendProtocolError as error:  # the reference stops there too
        assert str(error) == "response without a tag"
        assert data[sum(len(r[0]) for r in got) :].startswith((b" ", b"\n", b"\r"))
    assert got == expected
