"""The check a cached session passes before it serves a new client. Sans-I/O.

Overlapped checkout: the check leaves for the server in the same instant as the client's
login answer, and its replies are read before the client's first command is forwarded, so it
runs during the client's own round trip instead of before it. What is sent, in one write:

* ``ID <args>`` first, when the client sent an ID before its login (replayed, RFC 2971), so the
  server sees each client's identity; its refusal (``NO``) is no failure;
* ``NOOP`` (RFC 9051 §6.1.2): any tagged completion proves the session alive and in sync;
* or, instead of ``NOOP``, with a SELECT cache entry on a selected session, the entry's check
  (``select_cache.check_commands``: ``NOOP``, ``STATUS``, ``SEARCH``): the same proof, and the
  page's ``SELECT`` can then be answered from the cache without another round trip.

With the SELECT cache off, a webmail page's first command after the login is its ``SELECT``:
it may travel right behind the check (``goes_with_the_check``), so that the page waits once
for both. The server completes the check before it starts the SELECT, which changes the
selected state (RFC 9051 §5.5), so the check's replies come first; if the check fails, the
session is dropped with the SELECT's reply and the SELECT goes again to the new session (it
changes no mail).

Untagged replies to a plain ``NOOP`` are news for an earlier client (the mailbox it had
selected): dropped, and with them the SELECT cache entry, which can no longer be trusted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from imapproxy.errors import ClientProtocolError
from imapproxy.protocol.framing import parse_literal_marker
from imapproxy.protocol.grammar import split_command_line
from imapproxy.protocol.response import Response
from imapproxy.select_cache import SelectEntry, check_commands, still_valid


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the check's replies say."""

    alive: bool  # every command completed as it should: the session may serve the client
    entry_holds: bool  # the SELECT cache entry still describes the mailbox
    drop_entry: bool  # the entry must go (news arrived, or the check said it changed)
    reason: str = ""  # why not alive, for the log


class ReuseCheck:
    """The commands of one check and the reading of their replies."""

    __slots__ = ("entry", "with_id", "lines")

    def __init__(
        self, entry: SelectEntry | None, client_id_args: bytes | None, *, esearch: bool
    ) -> None:
        self.entry = entry
        self.with_id = client_id_args is not None
        lines = [b"ID " + client_id_args] if client_id_args is not None else []
        if entry is not None:
            lines += check_commands(entry.mailbox, esearch=esearch)
        else:
            lines.append(b"NOOP")
        self.lines: tuple[bytes, ...] = tuple(lines)  # without tags and CRLF

    def verdict(self, untagged: Sequence[Response], done: Sequence[Response]) -> Verdict:
        """Judge the untagged replies and the completions (in the order of ``lines``)."""
        completions = list(done)
        if self.with_id:
            untagged = [r for r in untagged if r.word != b"ID"]
            if completions.pop(0).word not in (b"OK", b"NO"):  # the ID may be refused
                return Verdict(False, False, True, "ID in the liveness check failed")
        if any(d.word != b"OK" for d in completions):
            return Verdict(False, False, True, "liveness check failed")
        if self.entry is not None:
            holds = still_valid(self.entry, untagged)
            return Verdict(True, holds, not holds)
        return Verdict(True, False, bool(untagged))


PIPELINED_FIRST_COMMANDS = frozenset({b"SELECT", b"EXAMINE"})


def goes_with_the_check(line: bytes) -> bool:
    """Whether a client's first command may be sent before the reuse check is read: a plain
    SELECT or EXAMINE line (no literal: the proxy would have to answer for the server)."""
    if parse_literal_marker(line) is not None:
        return False
    try:
        start = split_command_line(line)
    except ClientProtocolError:
        return False
    return start.name in PIPELINED_FIRST_COMMANDS
