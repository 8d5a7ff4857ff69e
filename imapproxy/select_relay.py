"""SELECT on the control plane (``enable_select_cache``, sequential mode): the relay's part.

A ``SELECT mailbox`` that nothing else is waiting behind is read whole by the proxy (its
literals accepted by the proxy itself, up to ``MAX_MAILBOX_LITERAL_BYTES``), then answered
from the session's ``select_cache`` entry when the entry still holds (the reuse check at login
validated it, or one ``STATUS``-style check now), else relayed with the reply kept as the new
entry. What the cache knows is in ``select_cache``; this module only drives the I/O of it
through the relay (``SelectHost``).
"""

from __future__ import annotations

import time
from typing import Protocol

from imapproxy.backend import BackendSession
from imapproxy.errors import ClientProtocolError
from imapproxy.protocol.framing import CommandFramer, Line, LiteralData
from imapproxy.protocol.framing import Event as FramerEvent
from imapproxy.protocol.grammar import Arguments, CommandStart, one_astring
from imapproxy.select_cache import SelectEntry, closed_line, entry_from_reply, mailbox_key
from imapproxy.stats import Counters
from imapproxy.trace import SessionTrace

# A SELECT's mailbox name sent as a literal is read by the proxy itself (Dovecot limits names
# to 255 characters per level).
MAX_MAILBOX_LITERAL_BYTES = 4096
GO_AHEAD = b"+ go ahead\r\n"


class SelectTooBig(Exception):
    """A literal in a SELECT beyond ``MAX_MAILBOX_LITERAL_BYTES`` (the session cannot go on)."""


class SelectHost(Protocol):
    """What the SELECT control plane needs of the relay."""

    session: BackendSession
    framer: CommandFramer
    counters: Counters
    trace: SessionTrace | None

    def send_own(self, data: bytes) -> None: ...

    def next_client_event(self) -> FramerEvent: ...


class SelectRelay:
    def __init__(self, host: SelectHost, response_timeout: float) -> None:
        self.host = host
        self.response_timeout = response_timeout

    def select(self, line: Line, start: CommandStart, outstanding: bool) -> bool:
        """Answer a SELECT from the cache when it still holds, else relay it and keep the reply.

        False when it cannot be done here (other commands in flight, a big literal): the
        caller relays it as any other command.
        """
        host = self.host
        host.counters.TotalSelectCommands += 1
        spec = line.literal
        if outstanding or (spec is not None and spec.size > MAX_MAILBOX_LITERAL_BYTES):
            host.session.select_entry = None
            return False
        lines, literals = self._collect_command(line)
        self._select_now(start.tag, lines, literals)
        return True

    def _collect_command(self, first: Line) -> tuple[list[bytes], list[bytes]]:
        """Read the rest of a command whose literals the proxy accepts itself."""
        host = self.host
        lines, literals = [first.data], []
        spec = first.literal
        while spec is not None:
            if spec.size > MAX_MAILBOX_LITERAL_BYTES:
                raise SelectTooBig("literal too big in SELECT")
            if spec.synchronizing:
                host.next_client_event()  # AWAIT_CONTINUATION
                host.send_own(GO_AHEAD)
                host.framer.accept_literal()
            data = bytearray()
            while isinstance(event := host.next_client_event(), LiteralData):
                data += event.data
                if event.last:
                    break
            literals.append(bytes(data))
            line = event if isinstance(event, Line) else host.next_client_event()
            assert isinstance(line, Line) and not line.first
            if host.trace is not None:
                host.trace.client(bytes(data), line.data)
            lines.append(line.data)
            spec = line.literal
        return lines, literals

    def _select_now(self, tag: bytes, lines: list[bytes], literals: list[bytes]) -> None:
        host = self.host
        session = host.session
        mailbox = select_mailbox(tag, lines, literals)
        entry = session.select_entry
        closed = session.traits.closed_line
        if (
            mailbox is not None
            and entry is not None
            and closed is not None
            and session.selected
            and entry.mailbox == mailbox_key(mailbox)
            and self._entry_holds(entry)
        ):
            host.counters.SelectCacheHits += 1
            if host.trace is not None:
                host.trace.proxy("SELECT answered from the SELECT cache")
            host.send_own(entry.reply(tag, closed))
            return
        host.counters.SelectCacheMisses += 1
        host.counters.backend_waited()
        session.select_entry = None
        pieces = [line if line.endswith(b"\n") else line + b"\r\n" for line in lines]
        untagged, done = session.relay_command(pieces, literals, tag, self.response_timeout)
        host.send_own(b"".join(r.raw for r in untagged) + done.raw)
        if session.selected and done.word == b"OK":  # what the server says over a selected box
            session.traits.closed_line = closed_line(untagged) or b""
        if done.word in (b"OK", b"NO"):
            session.selected = done.word == b"OK"
        if mailbox is not None:
            session.select_entry = entry_from_reply(mailbox, untagged, done)

    def _entry_holds(self, entry: SelectEntry) -> bool:
        """Checked by the reuse check at login (no wait), or else asked now (one wait)."""
        session = self.host.session
        if session.select_checked_just_now(time.monotonic()):
            return True
        self.host.counters.backend_waited()
        return session.select_entry_holds(entry, self.response_timeout)


def select_mailbox(tag: bytes, lines: list[bytes], literals: list[bytes]) -> bytes | None:
    """The mailbox of a plain ``SELECT mailbox``; None with options or bad syntax (relayed
    as they are, for the backend to judge, and never cached)."""
    stripped = [line.rstrip(b"\r\n") for line in lines]
    if not literals:  # the usual "tag SELECT mailbox": one match
        parts = stripped[0].split(b" ", 2)
        if len(parts) == 3 and (mailbox := one_astring(parts[2])) is not None:
            return mailbox
    try:
        args = Arguments(stripped, literals, tag)
        args.space()
        mailbox = args.astring()
    except ClientProtocolError:
        return None
    return mailbox if args.at_end() else None
