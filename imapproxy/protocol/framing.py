"""Framing of the client's byte stream into command lines and literals.

Sans-I/O, in the manner of h11: feed bytes with ``receive_data()`` (``b""`` is EOF), then pull
events with ``next_event()`` until it returns ``NEED_DATA``.

An IMAP command is one or more lines; a line that ends in a literal announcement (``{n}``,
``{n+}``, ``~{n}``; RFC 9051 §4.3, RFC 7888 LITERAL+, RFC 3516 literal8) is followed by n bytes of
literal data and then by the rest of the command, again a line. The framer reports:

* ``Line``: one line, CRLF included, with ``first`` telling whether it starts a new command and
  ``literal`` describing the literal it announces, if any;
* ``LiteralData``: literal bytes as they arrive (never accumulated, so a 50 MB APPEND costs no
  memory here);
* ``AWAIT_CONTINUATION``: a synchronising literal was announced and the server side must decide:
  ``accept_literal()`` once the go-ahead (``+``) is sent, or ``reject_literal()`` when the command
  was refused instead, after which the client starts a new command;
* ``ClientClosed``: EOF, saying whether it cut a command short.

Rules: a line longer than ``max_line_bytes`` raises ``LineTooLong`` (the framer cannot find the
next command boundary after that, so the connection must end). Bare LF is accepted as a line end,
as Dovecot does; what a line contains is the grammar's business, not the framer's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from imapproxy.errors import LimitExceeded

# RFC 9051 §4.3: number = 1*DIGIT representing a number in the range 0..4294967295.
MAX_LITERAL_SIZE: Final = 4_294_967_295

# A literal announcement at the very end of a line: "{5}", "{5+}" (RFC 7888) or "~{5}" (RFC 3516).
_LITERAL_MARKER = re.compile(rb"(~?)\{([0-9]{1,10})(\+?)\}\r?\n\Z")


@dataclass(frozen=True, slots=True)
class LiteralSpec:
    """A literal announced at the end of a line."""

    size: int
    synchronizing: bool  # "{n}": the client waits for "+" before sending the data
    binary: bool  # "~{n}" (literal8)


@dataclass(frozen=True, slots=True)
class Line:
    """One line of a command, CRLF included."""

    data: bytes
    first: bool  # True: starts a new command; False: continues one after a literal
    literal: LiteralSpec | None


@dataclass(frozen=True, slots=True)
class LiteralData:
    """A piece of literal data; ``last`` marks the end of the literal."""

    data: bytes
    last: bool


@dataclass(frozen=True, slots=True)
class ClientClosed:
    """The client closed its side; ``mid_command`` if it did so inside a command."""

    mid_command: bool


class Marker:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


NEED_DATA: Final = Marker("NEED_DATA")
AWAIT_CONTINUATION: Final = Marker("AWAIT_CONTINUATION")

Event = Line | LiteralData | ClientClosed | Marker


class LineTooLong(LimitExceeded):
    """A line exceeded the framer's limit; the stream cannot be resynchronised."""

    def __init__(self, limit: int) -> None:
        super().__init__("Command line too long")
        self.limit = limit


def parse_literal_marker(line: bytes) -> LiteralSpec | None:
    """Return the literal announced at the end of ``line`` (CRLF included), if any."""
    if not line.endswith(b"}\r\n") and not line.endswith(b"}\n"):
        return None  # the common case, decided without the regex
    match = _LITERAL_MARKER.search(line)
    if match is None:
        return None
    size = int(match.group(2))
    if size > MAX_LITERAL_SIZE:
        return None  # not a number the grammar allows; the grammar reports it
    return LiteralSpec(size, synchronizing=not match.group(3), binary=bool(match.group(1)))


_LINE_START: Final = 0  # between commands
_IN_COMMAND: Final = 1  # after a literal, the command goes on with another line
_IN_LITERAL: Final = 2
_AWAITING: Final = 3  # a synchronising literal waits for accept_literal()/reject_literal()


class CommandFramer:
    """Splits the client's bytes into ``Line``/``LiteralData`` events."""

    def __init__(self, max_line_bytes: int) -> None:
        self.max_line_bytes = max_line_bytes
        self._buffer = bytearray()
        self._state = _LINE_START
        self._literal_remaining = 0
        self._pending: LiteralSpec | None = None
        self._eof = False

    @property
    def mid_command(self) -> bool:
        """True inside a command: mid-line, mid-literal or awaiting a continuation."""
        return self._state != _LINE_START or bool(self._buffer)

    def peek_line(self) -> bytes | None:
        """The next line if it starts a command and is wholly here; nothing is consumed."""
        if self._state != _LINE_START:
            return None
        end = self._buffer.find(b"\n", 0, self.max_line_bytes)
        return bytes(self._buffer[: end + 1]) if end >= 0 else None

    def buffered(self) -> bytes:
        """The bytes received and not yet taken as events: what a connection passed on to
        another process carries with it."""
        return bytes(self._buffer)

    @property
    def has_input(self) -> bool:
        """True when bytes (or the end of the stream) are waiting to be framed."""
        return bool(self._buffer) or self._eof

    @property
    def in_literal(self) -> bool:
        """True while the client owes literal bytes (announced, possibly not yet accepted)."""
        return self._state in (_IN_LITERAL, _AWAITING)

    @property
    def pending_literal(self) -> LiteralSpec | None:
        """The synchronising literal awaiting ``accept_literal()``/``reject_literal()``."""
        return self._pending

    def receive_data(self, data: bytes) -> None:
        if data:
            self._buffer += data
        else:
            self._eof = True

    def accept_literal(self) -> None:
        """The go-ahead for the pending synchronising literal has been sent."""
        assert self._state == _AWAITING and self._pending is not None
        self._start_literal(self._pending.size)
        self._pending = None

    def reject_literal(self) -> None:
        """The command with the pending literal was refused; a new command follows."""
        assert self._state == _AWAITING
        self._pending = None
        self._state = _LINE_START

    def next_event(self) -> Event:
        if self._state == _AWAITING:
            return AWAIT_CONTINUATION
        if self._state == _IN_LITERAL:
            return self._next_literal_piece()
        return self._next_line()

    def _next_literal_piece(self) -> Event:
        if self._literal_remaining == 0:  # "{0}": still a literal, reported as such
            self._state = _IN_COMMAND
            return LiteralData(b"", last=True)
        if not self._buffer:
            return ClientClosed(mid_command=True) if self._eof else NEED_DATA
        take = min(len(self._buffer), self._literal_remaining)
        data = bytes(self._buffer[:take])
        del self._buffer[:take]
        self._literal_remaining -= take
        if self._literal_remaining == 0:
            self._state = _IN_COMMAND
        return LiteralData(data, last=self._literal_remaining == 0)

    def _next_line(self) -> Event:
        end = self._buffer.find(b"\n", 0, self.max_line_bytes)
        if end < 0:
            if len(self._buffer) >= self.max_line_bytes:
                raise LineTooLong(self.max_line_bytes)
            if self._eof:
                return ClientClosed(mid_command=self.mid_command)
            return NEED_DATA
        data = bytes(self._buffer[: end + 1])
        del self._buffer[: end + 1]
        first = self._state == _LINE_START
        literal = parse_literal_marker(data)
        self._enter_after_line(literal)
        return Line(data, first, literal)

    def _enter_after_line(self, literal: LiteralSpec | None) -> None:
        if literal is None:
            self._state = _LINE_START
        elif literal.synchronizing:
            self._pending = literal
            self._state = _AWAITING
        else:
            self._start_literal(literal.size)

    def _start_literal(self, size: int) -> None:
        self._literal_remaining = size
        self._state = _IN_LITERAL
