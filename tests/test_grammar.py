"""Arguments, tags, astrings in every form, and encoders that round-trip."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from imapproxy.errors import ClientProtocolError
from imapproxy.protocol.grammar import (
    Arguments,
    build_command,
    encode_string_list,
    is_valid_tag,
    one_astring,
    quote,
    split_command_line,
    two_astrings,
)


def args(*lines: bytes, literals: tuple[bytes, ...] = ()) -> Arguments:
    start = split_command_line(lines[0])
    return Arguments(list(lines), list(literals), start.tag)


def login_args(*lines: bytes, literals: tuple[bytes, ...] = ()) -> tuple[bytes, bytes]:
    a = args(*lines, literals=literals)
    a.space()
    user = a.astring()
    a.space()
    password = a.astring()
    a.expect_end()
    return user, password


@pytest.mark.parametrize(
    ("lines", "literals", "expected"),
    [
        ((b"a LOGIN alice secret",), (), (b"alice", b"secret")),
        ((b'a LOGIN "alice" "se cr\\"et\\\\"',), (), (b"alice", b'se cr"et\\')),
        ((b"a LOGIN {5}", b" {6}", b""), (b"alice", b"s e\r\n"), (b"alice", b"s e\r\n")),
        ((b"a LOGIN alice ~{3}", b""), (b"x\x00y",), (b"alice", b"x\x00y")),
        ((b"a login al]ce pa]ss",), (), (b"al]ce", b"pa]ss")),
        ((b'a LOGIN "\xc3\xa9l\xc3\xa8ve" ""',), (), ("élève".encode(), b"")),
    ],
)
def test_login_argument_forms(
    lines: tuple[bytes, ...], literals: tuple[bytes, ...], expected: tuple[bytes, bytes]
) -> None:
    assert login_args(*lines, literals=literals) == expected


@pytest.mark.parametrize(
    ("line", "text"),
    [
        (b"a LOGIN", "Missing argument"),
        (b"a LOGIN alice", "Missing argument"),
        (b"a LOGIN alice secret extra", "Unexpected extra arguments"),
        (b'a LOGIN "alice secret', "Unterminated quoted string"),
        (b'a LOGIN "al\\ice" x', "Invalid escape in quoted string"),
        (b"a LOGIN al(ice x", "Expected a space"),
        (b"a LOGIN \xc3\xa9 x", "8-bit characters are not allowed in atoms; quote them"),
        (b'a LOGIN "a\x00b" x', "NUL in quoted string"),
    ],
)
def test_login_errors_are_tagged_bad(line: bytes, text: str) -> None:
    with pytest.raises(ClientProtocolError) as raised:
        login_args(line)
    assert raised.value.response() == b"a BAD " + text.encode() + b"\r\n"


@pytest.mark.parametrize(
    ("line", "response"),
    [
        (b"", b"* BAD Invalid tag\r\n"),
        (b"+ NOOP", b"* BAD Invalid tag\r\n"),
        (b"a{ NOOP", b"* BAD Invalid tag\r\n"),
        (b"\xff NOOP", b"* BAD Invalid tag\r\n"),
        (b"a", b"a BAD Null command\r\n"),
        (b"a ", b"a BAD Null command\r\n"),
    ],
)
def test_split_command_line_errors(line: bytes, response: bytes) -> None:
    with pytest.raises(ClientProtocolError) as raised:
        split_command_line(line)
    assert raised.value.response() == response


def test_split_command_line() -> None:
    start = split_command_line(b"A1 uid fetch 1:* (FLAGS)\r\n")
    assert (start.tag, start.name, start.rest) == (b"A1", b"UID", b"fetch 1:* (FLAGS)")


def test_tags() -> None:
    assert is_valid_tag(b"A0001") and is_valid_tag(b"a]b")
    assert not is_valid_tag(b"a+b") and not is_valid_tag(b"a*") and not is_valid_tag(b"")


def test_id_lists() -> None:
    a = args(b'i ID ("name" "Roundcube" "version" NIL "x" {3})', b")", literals=(b"a b",))
    a.space()
    assert a.nil_or_string_list() == [b"name", b"Roundcube", b"version", None, b"x", b"a b"]
    a.expect_end()
    a = args(b"i ID nil")
    a.space()
    assert a.nil_or_string_list() is None


@given(st.binary(max_size=200), st.binary(max_size=200), st.booleans())
def test_build_command_round_trips(user: bytes, password: bytes, literal_plus: bool) -> None:
    wire = build_command(b"A1", b"LOGIN", (user, password), literal_plus=literal_plus)
    lines = [piece.rstrip(b"\r\n") for piece in wire.pieces]
    assert login_args(*lines, literals=wire.literals) == (user, password)


def test_encoders() -> None:
    assert quote(b'a"b\\c') == b'"a\\"b\\\\c"'
    assert encode_string_list([b"name", None]) == b'("name" NIL)'
    wire = build_command(b"A1", b"LOGIN", (b"u", b"p\r\n"), literal_plus=True)
    assert wire.pieces == (b'A1 LOGIN "u" {3+}\r\n', b"\r\n") and not wire.synchronizing


@given(st.binary(max_size=300))
def test_hostile_arguments_only_raise_our_errors(line: bytes) -> None:
    line = line.replace(b"\n", b"")
    with contextlib.suppress(ClientProtocolError):
        login_args(b"a LOGIN " + line)


def _quoted_outcome(line: bytes, fast: bool) -> tuple[object, ...]:
    args = Arguments([line], [], b"t")
    try:
        value = args._quoted() if fast else args._quoted_slowly()
    except ClientProtocolError as error:
        return ("error", str(error))
    return ("value", value, args._pos)


@given(st.binary(max_size=40).map(lambda tail: b'"' + tail))
def test_quoted_fast_path_says_what_the_byte_walk_says(line: bytes) -> None:
    assert _quoted_outcome(line, fast=True) == _quoted_outcome(line, fast=False)


# -- two_astrings: LOGIN's arguments in one match, read as Arguments reads them -----------------


def read_by_tokens(text: bytes) -> tuple[bytes, bytes] | None:
    """LOGIN's two astrings read by ``Arguments``, token by token; None where it refuses."""
    args = Arguments([b"a LOGIN " + text], [], b"a")
    try:
        args.space()
        first = args.astring()
        args.space()
        second = args.astring()
        args.expect_end()
    except ClientProtocolError:
        return None
    return first, second


_LOGIN_BYTES = st.sampled_from(list(b'ab "\\\\ ]{}()%*\x00\x01\x7f\xe9+~\r'))


@given(st.lists(_LOGIN_BYTES, max_size=24).map(bytes))
def test_two_astrings_reads_what_the_tokens_read(text: bytes) -> None:
    fast = two_astrings(text)
    if fast is not None:  # what the match takes is read the same, never more leniently
        assert read_by_tokens(text) == fast


@given(st.binary(max_size=30), st.binary(max_size=30))
def test_two_astrings_takes_every_quoted_pair(user: bytes, password: bytes) -> None:
    """Any two values the proxy would quote (no NUL, CR or LF) are taken, and exactly."""
    values = (user.replace(b"\x00", b""), password.replace(b"\x00", b""))
    values = tuple(v.replace(b"\r", b"").replace(b"\n", b"") for v in values)
    text = b" ".join(b'"' + v.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"' for v in values)
    assert two_astrings(text) == values == read_by_tokens(text)


@pytest.mark.parametrize(
    "text",
    [b"alice secret", b'"alice" "se cret"', b'alice "p\\"w"', b"a] b", b'"" ""'],
)
def test_two_astrings_on_the_usual_forms(text: bytes) -> None:
    assert two_astrings(text) is not None
    assert two_astrings(text) == read_by_tokens(text)


@pytest.mark.parametrize(
    "text", [b"alice", b"a  b", b"a b c", b'"a" ', b"\xe9 x", b"a{ b", b'"a\\x" b', b"{5}"]
)
def test_two_astrings_leaves_the_rest_to_the_tokens(text: bytes) -> None:
    assert two_astrings(text) is None


# -- one_astring: SELECT's mailbox in one match, read as Arguments reads it -----------------------


def read_one_by_tokens(text: bytes) -> bytes | None:
    args = Arguments([b"a SELECT " + text], [], b"a")
    try:
        args.space()
        value = args.astring()
        args.expect_end()
    except ClientProtocolError:
        return None
    return value


@given(st.lists(_LOGIN_BYTES, max_size=16).map(bytes))
def test_one_astring_reads_what_the_tokens_read(text: bytes) -> None:
    fast = one_astring(text)
    if fast is not None:
        assert read_one_by_tokens(text) == fast


@given(st.binary(max_size=30))
def test_one_astring_takes_every_quoted_value(value: bytes) -> None:
    value = value.replace(b"\x00", b"").replace(b"\r", b"").replace(b"\n", b"")
    text = b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    assert one_astring(text) == value == read_one_by_tokens(text)


@pytest.mark.parametrize("text", [b"INBOX", b'"INBOX"', b'"Sent Items"', b"INBOX.Drafts", b'""'])
def test_one_astring_on_the_usual_forms(text: bytes) -> None:
    assert one_astring(text) is not None and one_astring(text) == read_one_by_tokens(text)


@pytest.mark.parametrize("text", [b"INBOX (CONDSTORE)", b" INBOX", b"{5}", b'"a', b"\xe9"])
def test_one_astring_leaves_the_rest_to_the_tokens(text: bytes) -> None:
    assert one_astring(text) is None
