"""The pieces of IMAP syntax the proxy must understand itself (RFC 9051 §9, formal syntax).

Sans-I/O. A complete command arrives as its lines (CRLF stripped) and the literals announced at
their ends; ``Arguments`` walks them token by token. Everything is ``bytes``.

Only what the proxy answers or inspects is parsed: tags, command names, astrings (LOGIN,
mailbox names), parenthesised string lists (ID), atoms. Errors are ``ClientProtocolError`` with
the tagged ``BAD`` the client gets (RFC 9051 §7.1.3).

The encoders go the other way: they turn decoded values back into safe wire forms for the
backend, never copying the client's raw text (a quoted string, or a literal when a value cannot
be quoted).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from imapproxy.errors import ClientProtocolError

# RFC 9051: atom-specials = "(" / ")" / "{" / SP / CTL / list-wildcards / quoted-specials /
# resp-specials. ASTRING-CHAR adds "]" back; a tag is any ASTRING-CHAR except "+".
_CTL = bytes(range(0x20)) + b"\x7f"
_ATOM_SPECIALS = frozenset(b'(){ %*"\\]' + _CTL)
_ASTRING_SPECIALS = _ATOM_SPECIALS - {ord("]")}
_TAG_SPECIALS = _ASTRING_SPECIALS | {ord("+")}
_QUOTED = re.compile(rb'"((?:[^"\\\x00]|\\["\\])*)"')  # RFC 9051 quoted, NUL excluded
_ESCAPED = re.compile(rb"\\(.)", re.S)
_8BIT = frozenset(range(0x80, 0x100))

# A value sent as a quoted string must be short and free of CR, LF and NUL; longer ones go as
# literals. 1000 keeps a LOGIN line well under any server's line limit (Dovecot: 64 KiB).
MAX_QUOTED_BYTES = 1000


# The characters allowed, for bytes.translate(None, allowed): what is left is not allowed.
_TAG_CHARS = bytes(b for b in range(256) if b not in _TAG_SPECIALS and b not in _8BIT)


_ASTRING_CHARS = bytes(b for b in range(256) if b not in _ASTRING_SPECIALS and b not in _8BIT)
_QUOTED_OR_ATOM = rb'(?:"((?:[^"\\\x00]|\\["\\])*)"|([' + re.escape(_ASTRING_CHARS) + rb"]+))"
_TWO_ASTRINGS = re.compile(_QUOTED_OR_ATOM + b" " + _QUOTED_OR_ATOM + rb"\Z")
_ONE_ASTRING = re.compile(_QUOTED_OR_ATOM + rb"\Z")


def one_astring(text: bytes) -> bytes | None:
    """One astring, quoted or an atom, and nothing else (SELECT's mailbox as clients send
    it), read in one match; None for anything else, which ``Arguments`` reads and judges."""
    match = _ONE_ASTRING.match(text)
    if match is None:
        return None
    quoted, atom = match.groups()
    return _unquoted(quoted) if quoted is not None else atom


def two_astrings(text: bytes) -> tuple[bytes, bytes] | None:
    """Two astrings, quoted or atoms, one SP apart, and nothing else: LOGIN's arguments as
    clients send them, read in one match. None for anything else (a literal, an error):
    ``Arguments`` then reads them token by token and names the fault; what this accepts, it
    reads the same (tests/test_grammar.py)."""
    match = _TWO_ASTRINGS.match(text)
    if match is None:
        return None
    quoted1, atom1, quoted2, atom2 = match.groups()
    return (
        _unquoted(quoted1) if quoted1 is not None else atom1,
        _unquoted(quoted2) if quoted2 is not None else atom2,
    )


def _unquoted(value: bytes) -> bytes:
    return _ESCAPED.sub(rb"\1", value) if b"\\" in value else value


def is_valid_tag(tag: bytes) -> bool:
    return bool(tag) and not tag.translate(None, _TAG_CHARS)


@dataclass(frozen=True, slots=True)
class CommandStart:
    """Tag and command name of a command's first line; ``name`` is upper-cased."""

    tag: bytes
    name: bytes
    rest: bytes  # what follows "tag SP name", without the SP; b"" if nothing


def split_command_line(line: bytes) -> CommandStart:
    """Take tag and command name from a command's first line (CRLF stripped or not).

    Raises ``ClientProtocolError`` with ``* BAD Invalid tag`` (up-imapproxy's text) or
    ``<tag> BAD Null command``.
    """
    line = line.rstrip(b"\r\n")
    tag, _, after = line.partition(b" ")
    if not is_valid_tag(tag):
        raise ClientProtocolError("Invalid tag")
    name, _, rest = after.partition(b" ")
    if not name:
        raise ClientProtocolError("Null command", tag=tag)
    return CommandStart(tag, name.upper(), rest)


class Arguments:
    """Reads the arguments of one complete command.

    ``lines`` are the command's lines without CRLF; every line but the last ends in a literal
    announcement, and ``literals`` holds those literals in order. Reading starts after the
    command name.
    """

    def __init__(self, lines: Sequence[bytes], literals: Sequence[bytes], tag: bytes) -> None:
        if len(literals) != len(lines) - 1:
            raise ValueError("each line but the last must announce one literal")
        self._lines, self._literals, self.tag = lines, literals, tag
        self._index = 0
        self._line = lines[0]
        self._end = self._line_end(0)
        self._pos = self._after_command_name()

    # -- position -------------------------------------------------------------------------------

    def _line_end(self, index: int) -> int:
        """Where the argument text of line ``index`` ends (before its literal marker)."""
        line = self._lines[index]
        if index == len(self._lines) - 1:
            return len(line)
        brace = line.rindex(b"{")
        return brace - 1 if brace > 0 and line[brace - 1] == ord("~") else brace

    def _after_command_name(self) -> int:
        first_sp = self._line.find(b" ")
        second_sp = self._line.find(b" ", first_sp + 1, self._end)
        return self._end if second_sp < 0 else second_sp

    def _error(self, text: str) -> ClientProtocolError:
        return ClientProtocolError(text, tag=self.tag)

    def at_end(self) -> bool:
        return self._index == len(self._lines) - 1 and self._pos >= self._end

    def _at_literal(self) -> bool:
        return self._pos >= self._end and self._index < len(self._literals)

    def _peek(self) -> int | None:
        return self._line[self._pos] if self._pos < self._end else None

    def space(self) -> None:
        """Consume the single SP that separates arguments."""
        if self._peek() != ord(" "):
            raise self._error("Missing argument" if self.at_end() else "Expected a space")
        self._pos += 1

    def expect_end(self) -> None:
        if not self.at_end():
            raise self._error("Unexpected extra arguments")

    # -- tokens ---------------------------------------------------------------------------------

    def atom(self) -> bytes:
        start = self._pos
        while self._pos < self._end and self._line[self._pos] not in _ATOM_SPECIALS:
            self._pos += 1
        value = self._line[start : self._pos]
        if not value:
            raise self._error("Missing argument" if self.at_end() else "Expected an atom")
        if any(b in _8BIT for b in value):
            raise self._error("8-bit characters are not allowed in atoms")
        return value

    def astring(self) -> bytes:
        """RFC 9051 astring: 1*ASTRING-CHAR / string."""
        if self._at_literal() or self._peek() == ord('"'):
            return self.string()
        start = self._pos
        while self._pos < self._end and self._line[self._pos] not in _ASTRING_SPECIALS:
            self._pos += 1
        value = self._line[start : self._pos]
        if not value:
            raise self._error("Missing argument" if self.at_end() else "Invalid characters in atom")
        if any(b in _8BIT for b in value):
            raise self._error("8-bit characters are not allowed in atoms; quote them")
        return value

    def string(self) -> bytes:
        """RFC 9051 string: quoted / literal."""
        if self._at_literal():
            return self._literal()
        if self._peek() != ord('"'):
            raise self._error("Expected a string")
        return self._quoted()

    def nstring(self) -> bytes | None:
        word = self._line[self._pos : self._pos + 3]
        after = self._line[self._pos + 3 : self._pos + 4]
        if not self._at_literal() and word.upper() == b"NIL" and after in (b"", b" ", b")"):
            self._pos += 3
            return None
        return self.string()

    def _literal(self) -> bytes:
        value = self._literals[self._index]
        self._index += 1
        self._line = self._lines[self._index]
        self._end = self._line_end(self._index)
        self._pos = 0
        return value

    def _quoted(self) -> bytes:
        """RFC 9051 quoted. A well-formed one is matched whole in C; anything else is walked
        byte by byte, which finds the fault to name."""
        match = _QUOTED.match(self._line, self._pos, self._end)
        if match is not None:
            self._pos = match.end()
            return _unquoted(match.group(1))
        return self._quoted_slowly()

    def _quoted_slowly(self) -> bytes:
        out = bytearray()
        pos = self._pos + 1
        while pos < self._end:
            byte = self._line[pos]
            if byte == ord('"'):
                self._pos = pos + 1
                return bytes(out)
            if byte == ord("\\"):
                pos += 1
                if pos >= self._end or self._line[pos] not in b'"\\':
                    raise self._error("Invalid escape in quoted string")
                byte = self._line[pos]
            elif byte == 0:
                raise self._error("NUL in quoted string")
            out.append(byte)
            pos += 1
        raise self._error("Unterminated quoted string")

    def string_list(self) -> list[bytes | None]:
        """A parenthesised list of nstrings separated by SP: "(" nstring *(SP nstring) ")"."""
        if self._peek() != ord("("):
            raise self._error("Expected a list")
        self._pos += 1
        items: list[bytes | None] = []
        while self._peek() != ord(")"):
            if items:
                self.space()
            items.append(self.nstring())
            if self._pos >= self._end and not self._at_literal():
                raise self._error("Unterminated list")
        self._pos += 1
        return items

    def nil_or_string_list(self) -> list[bytes | None] | None:
        """``NIL`` or a parenthesised list of nstrings (as in RFC 2971 ID)."""
        if self._line[self._pos : self._pos + 3].upper() == b"NIL" and not self._at_literal():
            self._pos += 3
            return None
        return self.string_list()

    def rest_of_line(self) -> bytes:
        """The remaining text of the current line (used for free-form arguments)."""
        value = self._line[self._pos : self._end]
        self._pos = self._end
        return value


# -- encoders: decoded values to safe wire forms ---------------------------------------------------


def can_quote(value: bytes) -> bool:
    return len(value) <= MAX_QUOTED_BYTES and not any(b in b"\r\n\x00" for b in value)


def quote(value: bytes) -> bytes:
    """A quoted string (RFC 9051 quoted); the caller checks ``can_quote`` first."""
    return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


@dataclass(frozen=True, slots=True)
class WireCommand:
    """A command as pieces: after each piece but the last, a literal's data follows.

    ``pieces[i]`` ends with a literal announcement when ``i < len(pieces) - 1``; a synchronising
    one means the sender must wait for the server's "+" before sending ``literals[i]``.
    """

    pieces: tuple[bytes, ...]
    literals: tuple[bytes, ...]
    synchronizing: bool


def build_command(
    tag: bytes, name: bytes, args: Sequence[bytes], *, literal_plus: bool
) -> WireCommand:
    """``tag name arg...`` with each argument as an astring that round-trips exactly.

    Arguments that cannot be quoted go as literals: ``{n+}`` when the server has LITERAL+ (RFC
    7888), else synchronising ``{n}``.
    """
    pieces: list[bytes] = []
    literals: list[bytes] = []
    current = bytearray(tag + b" " + name)
    for arg in args:
        current += b" "
        if can_quote(arg):
            current += quote(arg)
            continue
        current += b"{%d%s}\r\n" % (len(arg), b"+" if literal_plus else b"")
        pieces.append(bytes(current))
        literals.append(arg)
        current = bytearray()
    pieces.append(bytes(current) + b"\r\n")
    return WireCommand(tuple(pieces), tuple(literals), synchronizing=not literal_plus)


def encode_string_list(items: Sequence[bytes | None]) -> bytes:
    """``(item ...)`` with quoted strings and NIL, for replaying an ID (RFC 2971)."""
    parts = [b"NIL" if item is None else quote(item) for item in items]
    return b"(" + b" ".join(parts) + b")"
