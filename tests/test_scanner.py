"""The relay's response scanner: tagged lines, continuations and literals found in any chunking."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from imapproxy.protocol import scanner as scanner_module
from imapproxy.protocol.scanner import (
    INITIAL_CARRY,
    MAX_TAGGED_PREFIX_BYTES,
    PythonResponseScanner,
    ResponseScanner,
)
from tests.support.feed import scan_stream, split

FETCH = (
    b"* 1 FETCH (UID 7 BODY[] {28}\r\nSubject: x\r\n\r\nA1 OK fake\r\n)\r\n"
    b"* 2 FETCH (BODY[] ~{3}\r\nabc)\r\n"
    b"+ go ahead\r\n"
    b"A1 OK FETCH done\r\n"
)


@pytest.mark.parametrize("step", [1, 2, 3, 5, 16, 4096])
def test_events_in_any_chunking(step: int) -> None:
    events, scanner = scan_stream(split(FETCH, step))
    assert events == [(b"+", b""), (b"A1", b"OK")]
    assert scanner.at_boundary and not scanner.broken


def test_message_content_is_never_a_completion() -> None:
    events, _ = scan_stream([FETCH[:60]])
    assert events == []


def test_tagged_line_at_stream_start() -> None:
    events, scanner = scan_stream([b"a1 NO [TRYCREATE] no\r\n"])
    assert events == [(b"a1", b"NO")]
    assert scanner.at_boundary


def test_boundary_inside_a_line_and_literal() -> None:
    _, scanner = scan_stream([b"* 1 FETCH (BODY[] {10}\r\n01234"])
    assert not scanner.at_boundary and scanner.literal_remaining == 5
    _, scanner = scan_stream([b"* 1 FETCH (BODY[] {2}\r\n\r\n"])
    assert not scanner.at_boundary  # the literal's own CRLF ends no line
    _, scanner = scan_stream([b"* 1 EXISTS\r\n* 2 EXI"])
    assert not scanner.at_boundary


def test_zero_length_literal_is_mid_line() -> None:
    _, scanner = scan_stream([b"* 1 FETCH (BODY[] {0}\r\n"])
    assert not scanner.at_boundary
    events, scanner = scan_stream([b"* 1 FETCH (BODY[] {0}\r\n)\r\nA2 OK x\r\n"])
    assert events == [(b"A2", b"OK")] and scanner.at_boundary


def test_flags_changes_are_reported() -> None:
    events, _ = scan_stream(
        [
            b"* 1 FETCH (FLAGS (x))\r\n* FLAGS (\\Seen $New)\r\n",
            b"* OK [PERMANENTFLAGS (\\Seen)] ok\r\n* OK [UIDNEXT 3] x\r\n",
        ]
    )
    assert events == [(b"*", b"FLAGS"), (b"*", b"FLAGS")]


def test_garbage_marks_broken() -> None:
    _, scanner = scan_stream([b"\r\n" + b"x" * 2000 + b"\r\n"])
    assert scanner.broken


@given(
    st.lists(
        st.one_of(
            st.sampled_from(
                [
                    b"* 3 EXISTS\r\n",
                    b"+ idling\r\n",
                    b"t1 OK done\r\n",
                    b"t2 NO [X] no\r\n",
                    b"* OK [UIDNEXT 5] next\r\n",
                ]
            ),
            st.binary(max_size=40).map(
                lambda b: b"* 1 FETCH (BODY[] {%d}\r\n" % len(b) + b + b")\r\n"
            ),
        ),
        max_size=30,
    ),
    st.integers(min_value=1, max_value=50),
)
def test_chunking_never_changes_events(responses: list[bytes], step: int) -> None:
    data = b"".join(responses)
    whole, scanner_whole = scan_stream([data] if data else [])
    pieces, scanner_pieces = scan_stream(split(data, step))
    assert pieces == whole
    expected = [
        (b"+", b"") if r[:1] == b"+" else tuple(r.split(b" ")[:2])
        for r in responses
        if r[:1] in (b"t", b"+")
    ]
    assert whole == expected
    assert scanner_pieces.at_boundary and not scanner_pieces.broken


@given(st.binary(max_size=3000), st.integers(min_value=1, max_value=100))
def test_hostile_stream_never_crashes(data: bytes, step: int) -> None:
    scan_stream(split(data, step))


@given(st.integers(min_value=0, max_value=90), st.integers(min_value=1, max_value=40))
def test_skipped_literal_bytes_leave_the_same_events(cut: int, step: int) -> None:
    """Bytes of a literal moved past the scanner (``splice``) change nothing but its count."""
    body = (b"A1 OK inside\r\n" * 8)[:90]
    head = b"* 1 FETCH (BODY[] {90}\r\n"
    tail = b")\r\nA1 OK FETCH done\r\n"
    scanner = ResponseScanner()
    buf = bytearray(INITIAL_CARRY + head + body[:cut] + bytes(MAX_TAGGED_PREFIX_BYTES))
    assert scanner.scan(buf, len(INITIAL_CARRY + head) + cut) == 0
    assert scanner.literal_remaining == 90 - cut and not scanner.events
    scanner.skipped(scanner.literal_remaining)
    events, _ = scan_stream(split(tail, step), scanner, carry=b"")  # the scan kept no carry
    assert events == [(b"A1", b"OK")] and scanner.at_boundary


def test_skipping_more_than_the_literal_is_refused() -> None:
    scanner = ResponseScanner()
    buf = bytearray(INITIAL_CARRY + b"* 1 FETCH (BODY[] {10}\r\n012")
    scanner.scan(buf, len(buf))
    with pytest.raises(ValueError):
        scanner.skipped(8)
    scanner.skipped(7)
    assert scanner.literal_remaining == 0


# -- the C loop (``_scan.c``) against the Python loop -------------------------------------------

needs_native = pytest.mark.skipif(not scanner_module.NATIVE, reason="the C scanner is not built")

# pieces of a server's stream, the awkward ones included: markers that are almost markers,
# lines that break the stream, tags at the start of literals' contents
_PIECES = [
    b"* 3 EXISTS\r\n",
    b"+ idling\r\n",
    b"+\r\n",
    b"t1 OK done\r\n",
    b"t2 no [X] lower-case word\r\n",
    b"* FLAGS (\\Seen)\r\n",
    b"* OK [PERMANENTFLAGS (\\Seen)] ok\r\n",
    b"* FLAGSX\r\n",
    b"* OK [UIDNEXT 5] next\r\n",
    b"{12345678901}\r\n",
    b"{5+}\r\n",
    b"~{3}\r\nabc",
    b"{}\r\n",
    b"{7}\r",
    b"\r\n\r\n",
    b" t3 OK\r\n",
    b"\r\n \r\n",
    b"t\rx OK\r\n",
    b"x" * 1100,
    b"\r\nA9 ",
    b"\r\n*",
]


def lockstep(chunks: list[bytes], skip: int | None = None) -> None:
    """Both loops, fed the same chunks the copier's way, agree after every call: carry, events,
    literal_remaining, at_boundary and broken."""
    native, python = ResponseScanner(), PythonResponseScanner()
    carry = INITIAL_CARRY
    for index, chunk in enumerate(chunks):
        buf = bytearray(carry + chunk + bytes(MAX_TAGGED_PREFIX_BYTES))
        end = len(carry) + len(chunk)
        kept = native.scan(bytearray(buf), end)
        assert kept == python.scan(buf, end)
        assert native.events == python.events
        for attribute in ("literal_remaining", "at_boundary", "broken"):
            assert getattr(native, attribute) == getattr(python, attribute), attribute
        native.events.clear()
        python.events.clear()
        carry = bytes(buf[end - kept : end])
        if skip is not None and index == skip and python.literal_remaining:
            count = python.literal_remaining // 2  # as splice would have moved them
            native.skipped(count)
            python.skipped(count)
            carry = b""


@needs_native
@given(
    st.lists(
        st.one_of(
            st.sampled_from(_PIECES),
            st.binary(max_size=60).map(lambda b: b"* 1 FETCH (BODY[] {%d}\r\n" % len(b) + b),
            st.binary(max_size=20),
        ),
        max_size=40,
    ),
    st.integers(min_value=1, max_value=70),
    st.one_of(st.none(), st.integers(min_value=0, max_value=20)),
)
def test_the_c_loop_is_the_python_loop(pieces: list[bytes], step: int, skip: int | None) -> None:
    lockstep(split(b"".join(pieces), step), skip)


@needs_native
@given(st.binary(max_size=2000), st.integers(min_value=1, max_value=300))
def test_the_c_loop_is_the_python_loop_on_any_bytes(data: bytes, step: int) -> None:
    lockstep(split(data, step))


@needs_native
@pytest.mark.parametrize("step", [1, 7, 16384])
def test_the_c_loop_on_a_webmail_fetch(step: int) -> None:
    header = b"From: a@example.org\r\nSubject: \r\nA1 OK not this\r\n\r\n"
    reply = b"".join(
        b"* %d FETCH (UID %d BODY[HEADER] {%d}\r\n%s)\r\n" % (n, n, len(header), header)
        for n in range(1, 51)
    )
    lockstep(split(reply + b"A1 OK Fetch completed.\r\n", step))


@needs_native
def test_the_c_loop_refuses_what_it_cannot_scan() -> None:
    from imapproxy.protocol import _scan

    with pytest.raises(ValueError):
        _scan.scan(bytearray(4), 5, 0, [])
    with pytest.raises(TypeError):
        _scan.scan(bytearray(4), 4, 0, ())
    with pytest.raises(TypeError):
        _scan.scan(bytearray(4), 4)


def test_pure_python_is_chosen_by_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAPPROXY_PURE_PYTHON", "1")
    assert scanner_module._load_native() is None
