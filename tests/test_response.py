"""Whole backend responses for the control plane."""

from __future__ import annotations

import pytest

from imapproxy.errors import BackendProtocolError
from imapproxy.protocol.framing import NEED_DATA
from imapproxy.protocol.response import BackendClosed, Response, ResponseReader

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
