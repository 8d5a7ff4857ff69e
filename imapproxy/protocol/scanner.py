"""Finding tagged completions and continuation requests in the relayed backend stream.

Sans-I/O, and the only parsing on the post-login data plane, so it is built for speed: one
compiled regex finds the two things that matter, and everything else (untagged lines, literal
contents) is skipped in C. Work in Python is per literal and per tagged line, never per byte.

* A literal announcement (``{n}`` / ``{n+}`` / ``~{n}`` ending a line): its n bytes are skipped
  by count, so message content can never be mistaken for protocol (a message containing
  ``\\r\\nA1 OK`` stays data).
* A line that starts with something other than ``*`` (RFC 9051 §2.2.2: ``+`` is a continuation
  request, anything else begins with a tag): reported as an event.
* An untagged ``FLAGS`` or ``OK [PERMANENTFLAGS``: the selected mailbox's flags changed (new
  keywords), which the SELECT cache must know; reported as ``FLAGS_CHANGE``.

The loop is written twice: in C (``_scan.c``, one call per read; a page's FETCH reply is some
fifty literals, and the regex engine walks every byte of the lines between them) and in Python
(``_scan_python``), used where the C module is not built or ``IMAPPROXY_PURE_PYTHON`` is set.
Both give the same events for any stream (``tests/test_scanner.py``).

The caller owns the buffer (``recv_into``): ``scan(buf, end)`` looks at ``buf[:end]``, whose
first ``carry`` bytes were kept from the previous call (already reported and forwarded), and
returns how many trailing bytes to keep in front of the next read, so that a marker split
between two reads is still seen. The very first buffer starts with a fake ``\\r\\n`` carry
(``INITIAL_CARRY``) so that a tagged line at stream start is found like any other.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Final

# scan(buf, end, literal_remaining, events) -> (carry, literal_remaining, at_boundary, broken)
_Native = Callable[[bytearray, int, int, list[tuple[bytes, bytes]]], tuple[int, int, bool, bool]]


def _load_native() -> _Native | None:
    """The C loop (``_scan.c``), unless it is not built or ``IMAPPROXY_PURE_PYTHON`` is set."""
    if os.environ.get("IMAPPROXY_PURE_PYTHON"):
        return None
    try:
        from imapproxy.protocol import _scan
    except ImportError:
        return None
    native: _Native = _scan.scan
    return native


_native = _load_native()
NATIVE: Final = _native is not None  # the C loop is in use

INITIAL_CARRY: Final = b"\r\n"

# The longest marker is "{4294967295+}\r\n" (15 bytes); a "\r\n" + first byte needs 3.
CARRY_BYTES: Final = 32

# A tagged line must show "tag SP word" within this many bytes; longer is not IMAP from a
# server we can follow (tags are bounded by the client framer's line limit anyway).
MAX_TAGGED_PREFIX_BYTES: Final = 1024

_EVENT = re.compile(rb"\{([0-9]{1,10})\+?\}\r\n|\r\n[^*]|\r\n\* (?:FLAGS|OK \[PERMANENTFLAGS)")
_CR, _LF, _PLUS, _SP, _STAR = 13, 10, 43, 32, 42

CONTINUATION: Final = b"+"
FLAGS_CHANGE: Final = b"*"  # an untagged FLAGS or PERMANENTFLAGS: the mailbox's flags changed


class ResponseScanner:
    """Tracks literal boundaries and reports ``(tag, word)`` for tagged and ``+`` lines.

    After each ``scan``, ``events`` holds ``(tag, WORD)`` pairs in stream order: ``(b"+", b"")``
    for a continuation request, ``(b"*", b"FLAGS")`` for ``FLAGS_CHANGE``; the caller clears it.
    ``at_boundary`` is True when the bytes seen so far end exactly at the end of a response
    line. ``broken`` is set, for good, when the stream stops looking like IMAP: such a session
    must never be cached.
    """

    __slots__ = ("events", "literal_remaining", "at_boundary", "broken")

    def __init__(self) -> None:
        self.events: list[tuple[bytes, bytes]] = []
        self.literal_remaining = 0
        self.at_boundary = True
        self.broken = False

    def scan(self, buf: bytearray, end: int) -> int:
        """Scan ``buf[:end]``; return the number of trailing bytes to carry into the next call."""
        if _native is None:
            return self._scan_python(buf, end)
        carry, self.literal_remaining, self.at_boundary, broken = _native(
            buf, end, self.literal_remaining, self.events
        )
        if broken:
            self.broken = True
        return carry

    def _scan_python(self, buf: bytearray, end: int) -> int:
        """``scan`` in Python: what ``_scan.c`` does, where it is not built."""
        pos = resume = 0
        if self.literal_remaining:
            if self.literal_remaining >= end:
                self.literal_remaining -= end
                self.at_boundary = False
                return 0
            pos = resume = self.literal_remaining
            self.literal_remaining = 0
        search = _EVENT.search
        while (match := search(buf, pos, end)) is not None:
            size = match.group(1)
            if size is not None:
                pos = resume = match.end() + int(size)
                if pos > end:
                    self.literal_remaining = pos - end
                    self.at_boundary = False
                    return 0
                continue
            line = match.start() + 2
            if buf[line] == _PLUS:
                self.events.append((CONTINUATION, b""))
                pos = line
                continue
            if buf[line] == _STAR:
                self.events.append((FLAGS_CHANGE, b"FLAGS"))
                pos = line
                continue
            word_end = self._tagged_line(buf, line, end)
            if word_end < 0:  # "tag SP word" not complete yet: keep the line start
                self.at_boundary = False
                return end - match.start()
            pos = word_end
        self.at_boundary = end - 2 >= resume and buf[end - 2] == _CR and buf[end - 1] == _LF
        return min(end - pos, CARRY_BYTES)

    def skipped(self, count: int) -> None:
        """``count`` bytes of the literal under way went past without being scanned (moved by
        the kernel, ``splice``): only its length matters, never its contents."""
        if not 0 <= count <= self.literal_remaining:
            raise ValueError("skipped more than the literal's remaining bytes")
        self.literal_remaining -= count

    def _tagged_line(self, buf: bytearray, line: int, end: int) -> int:
        """Record the tagged line starting at ``line``; return where its word ends, or -1."""
        limit = min(end, line + MAX_TAGGED_PREFIX_BYTES)
        tag_end = buf.find(b" ", line, limit)
        word_end = -1 if tag_end < 0 else _word_end(buf, tag_end + 1, limit)
        if word_end < 0:
            if limit == end:
                return -1
            self.broken = True  # no "tag SP word" where one must be
            return line
        tag = bytes(buf[line:tag_end])
        if not tag or _CR in tag or _LF in tag:
            self.broken = True
            return line
        self.events.append((tag, bytes(buf[tag_end + 1 : word_end]).upper()))
        return word_end


class PythonResponseScanner(ResponseScanner):
    """The scanner without its C loop (``_scan``): the tests hold the two to the same events."""

    __slots__ = ()

    def scan(self, buf: bytearray, end: int) -> int:
        return self._scan_python(buf, end)


def _word_end(buf: bytearray, start: int, limit: int) -> int:
    """End of the word at ``start`` (at SP or CR), or -1 if it may go on past ``limit``."""
    for pos in range(start, limit):
        if buf[pos] in (_SP, _CR):
            return pos
    return -1
