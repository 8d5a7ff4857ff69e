"""The relay's decisions, without sockets: sans-I/O.

``relay.Relay`` carries bytes; this module decides what they mean. Events in: a framed client
line (``client_line``), the tagged completions, ``+`` requests and flag changes that the
``ResponseScanner`` finds in the backend's bytes (``backend_events``), the client gone
(``client_gone``). Answers out: what a client line is and what to do with it (``Verdict``),
whether replies are still due (``idle``, ``replies_done``), when to enter and leave duplex mode
(IDLE, NOTIFY), whether a literal was accepted, and how to bring the session back in sync
when the client leaves (``Farewell``).

Rules it keeps:

* Every client command's tag is outstanding until its tagged completion (RFC 9051 §2.2.2); a
  completion for no outstanding tag, or a tag used twice at once, makes completions ambiguous:
  the session is ``broken`` and is never cached.
* A ``+`` from the server is answered by the client's next line (a literal's go-ahead is taken
  by ``take_continuation``; an IDLE's ``DONE``, a SASL line otherwise).
* The mailbox state (``Mailbox``: selected or not, the SELECT cache entry) belongs to the
  backend session and outlives the client; it changes here only: a SELECT or EXAMINE that
  fails deselects (RFC 9051 §6.3.1), CLOSE and UNSELECT deselect, flag changes and the
  ``select_cache.DROPPING_COMMANDS`` drop the entry, any command voids a check made at login.
* A command that changes the connection for good (``CONNECTION_CHANGING``) keeps the session
  out of the cache (``changed_by``).
* A client that leaves mid-command leaves the session to be resynced: IDLE gets ``DONE``,
  AUTHENTICATE ``*`` (RFC 9051 §6.2.2), a literal the server waits for cannot be finished
  without inventing data, so that session is closed.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from imapproxy.errors import ClientProtocolError
from imapproxy.protocol.framing import Line
from imapproxy.protocol.grammar import CommandStart, split_command_line
from imapproxy.protocol.scanner import CONTINUATION, FLAGS_CHANGE, ResponseScanner
from imapproxy.select_cache import DROPPING_COMMANDS, SelectEntry, enables_condstore

DUPLEX_COMMANDS = frozenset({b"NOTIFY"})  # RFC 5465: the server may speak at any time after
# Commands after which the session is not the one a new login gets, and nothing undoes that:
# the next client would see the server answer another way (ENABLE, RFC 5161: QRESYNC's
# VANISHED for EXPUNGE, CONDSTORE's MODSEQ, UTF8=ACCEPT's names), speak unprompted (NOTIFY,
# RFC 5465) or as no one, or another user (UNAUTHENTICATE, RFC 8437). Such a session is not
# cached; nor one that a command's CONDSTORE words (``enables_condstore``) may have turned
# CONDSTORE on for. ``reuse_after_enable`` lets ENABLE's (and those) be cached for sites whose
# one webmail enables the same extensions on every login.
CONNECTION_CHANGING = frozenset({b"ENABLE", b"NOTIFY", b"UNAUTHENTICATE"})
_CHANGING_BUT_ENABLE = CONNECTION_CHANGING - {b"ENABLE"}
IDLE_DONE = b"DONE\r\n"  # RFC 2177
SASL_CANCEL = b"*\r\n"  # RFC 9051 §6.2.2


class Mailbox(Protocol):
    """What the backend session remembers of its mailbox from one client to the next."""

    selected: bool
    select_entry: SelectEntry | None
    select_checked_at: float | None


class Kind(enum.Enum):
    """What a client line is."""

    PART = "part"  # the rest of a command after a literal: forwarded
    ANSWER = "answer"  # the answer to a "+" (IDLE's DONE, a SASL line): forwarded
    UNPARSED = "unparsed"  # not a command the proxy can read: forwarded, the server judges it
    COMMAND = "command"  # a command, now outstanding: forwarded
    LOGOUT = "logout"  # intercepted: the proxy keeps the session
    COMPRESS = "compress"  # refused: the proxy must see the client's commands
    SELECT = "select"  # the SELECT cache's to answer (``relay_select`` if it cannot)


@dataclass(frozen=True, slots=True)
class Verdict:
    kind: Kind
    start: CommandStart | None = None


PART = Verdict(Kind.PART)
ANSWER = Verdict(Kind.ANSWER)
UNPARSED = Verdict(Kind.UNPARSED)


@dataclass(frozen=True, slots=True)
class Farewell:
    """How to leave a session whose client went: send ``send`` to the server, then resync;
    or close it (``resync`` false)."""

    resync: bool
    send: bytes = b""


CLOSE = Farewell(resync=False)


class RelayState:
    """One client's logged-in session, as far as the proxy must follow it."""

    __slots__ = (
        "mailbox",
        "select_cache",
        "scanner",
        "outstanding",
        "continuations",
        "idle_tag",
        "duplex_for_good",
        "changing",
        "changed_by",
    )

    def __init__(
        self, mailbox: Mailbox, *, select_cache: bool, reuse_after_enable: bool = False
    ) -> None:
        self.mailbox = mailbox
        self.select_cache = select_cache
        self.changing = _CHANGING_BUT_ENABLE if reuse_after_enable else CONNECTION_CHANGING
        self.changed_by: bytes | None = None  # the first such command the client sent
        self.scanner = ResponseScanner()
        self.outstanding: dict[bytes, bytes] = {}  # tag -> command name, awaiting completion
        self.continuations = 0  # "+" lines from the backend not yet answered
        self.idle_tag: bytes | None = None  # an IDLE awaiting the client's DONE
        self.duplex_for_good = False  # NOTIFY: the server may speak from now on

    # -- the client's lines ---------------------------------------------------------------------

    def client_line(self, line: Line, *, duplex: bool = False) -> Verdict:
        """Classify a framed client line; a plain command is outstanding from now on."""
        if not line.first:
            return PART
        if self.continuations:  # the client answers a "+": not a command
            self.continuations -= 1
            self.idle_tag = None  # if it was IDLE's DONE, a vanishing client owes no other
            return ANSWER
        try:
            start = split_command_line(line.data)
        except ClientProtocolError:
            return UNPARSED  # the backend answers it (untagged BAD, or BAD under its tag)
        name = start.name
        if name == b"LOGOUT" and not start.rest:
            return Verdict(Kind.LOGOUT, start)
        if name == b"COMPRESS":
            return Verdict(Kind.COMPRESS, start)
        if name == b"SELECT" and self.select_cache and not duplex:
            return Verdict(Kind.SELECT, start)
        self.command_started(start)
        return Verdict(Kind.COMMAND, start)

    def command_started(self, start: CommandStart) -> None:
        """A command goes to the server: its tag is outstanding."""
        tag, name, rest = start.tag, start.name, start.rest
        if tag in self.outstanding:  # completions would be ambiguous from now on
            self.scanner.broken = True
        if name == b"UID":
            name = b"UID " + rest.split(b" ", 1)[0].upper()
        self.outstanding[tag] = name
        if name == b"IDLE":
            self.idle_tag = tag
        elif name in DUPLEX_COMMANDS:
            self.duplex_for_good = True
        condstore = enables_condstore(rest)
        if self.changed_by is None:
            if name in self.changing:
                self.changed_by = name
            elif condstore and b"ENABLE" in self.changing:  # as ENABLE CONDSTORE would
                self.changed_by = b"CONDSTORE"
        mailbox = self.mailbox
        mailbox.select_checked_at = None  # any command voids a check made at login
        if condstore or name in DROPPING_COMMANDS:
            mailbox.select_entry = None

    # -- what the scanner found in the server's replies -----------------------------------------

    def backend_events(self, events: Iterable[tuple[bytes, bytes]]) -> None:
        for tag, word in events:
            if tag == CONTINUATION:
                self.continuations += 1
            elif tag == FLAGS_CHANGE:
                self.mailbox.select_entry = None  # the mailbox's flags or keywords changed
            else:
                self._completed(tag, word)

    def _completed(self, tag: bytes, word: bytes) -> None:
        name = self.outstanding.pop(tag, None)
        if name is None:
            self.scanner.broken = True  # a completion for no command of the client's
        elif name in (b"SELECT", b"EXAMINE"):
            if word != b"BAD":  # NO deselects (RFC 9051 §6.3.1); BAD may leave it as it was
                self.mailbox.selected = word == b"OK"
        elif name in (b"CLOSE", b"UNSELECT") and word == b"OK":
            self.mailbox.selected = False
        if tag == self.idle_tag:
            self.idle_tag = None

    # -- what is due ----------------------------------------------------------------------------

    def idle(self) -> bool:
        """Every outstanding command complete, at a response boundary: the session may be
        cached, or the client's next command read."""
        scanner = self.scanner
        return not self.outstanding and scanner.at_boundary and not scanner.literal_remaining

    def replies_done(self) -> bool:
        """Sequential mode: the client may be read again (a "+" asks it for more)."""
        return self.continuations > 0 or self.idle()

    @property
    def in_sync(self) -> bool:
        """The server's completions matched the client's commands throughout."""
        return not self.scanner.broken

    def goes_duplex(self) -> bool:
        """After the replies: IDLE is on (its "+" came) or NOTIFY was sent."""
        return (self.idle_tag is not None and self.continuations > 0) or self.duplex_for_good

    def stays_duplex(self) -> bool:
        """Duplex mode may end once the session is idle: not during an IDLE or after NOTIFY."""
        return self.idle_tag is not None or self.duplex_for_good

    def last_tag(self) -> bytes | None:
        """The tag of the latest command: a synchronising literal belongs to it."""
        return next(reversed(self.outstanding), None)

    def literal_answered(self, tag: bytes | None) -> bool:
        """The server said "+" to the literal of ``tag``'s command, or completed it (refused)."""
        return self.continuations > 0 or tag not in self.outstanding

    def take_continuation(self) -> bool:
        """Whether the server said "+" (the literal may come), using it up; else it refused."""
        if self.continuations > 0:
            self.continuations -= 1
            return True
        return False

    # -- endings --------------------------------------------------------------------------------

    def client_gone(self, *, in_literal: bool) -> Farewell:
        """What to send the server so that it finishes what the client left unfinished."""
        if in_literal:
            return CLOSE  # the backend waits for literal bytes nobody will send
        if self.idle_tag is not None:
            return Farewell(True, IDLE_DONE)
        if b"AUTHENTICATE" in self.outstanding.values():
            return Farewell(True, SASL_CANCEL)
        return Farewell(True)

    def leaves_mailbox(self) -> bool:
        """At the end, with the SELECT cache off, the session goes back to the authenticated
        state before it is cached (the cache keeps the mailbox selected for its hits)."""
        return self.mailbox.selected and not self.select_cache
