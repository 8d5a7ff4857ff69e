"""The SELECT cache: answering a reused session's repeated SELECT without reopening the mailbox.

Sans-I/O. Webmail re-selects the same mailbox on every page; when the backend session it gets
back still has that mailbox selected, the reply it got last time is served again, but only
after checking that a fresh SELECT would say the same now (up-imapproxy serves a 10-second-old
reply blindly, even after an EXAMINE of another mailbox).

What a SELECT reply says that can change (RFC 9051 §6.3.2, RFC 3501): EXISTS, RECENT, the
first unseen message (``[UNSEEN n]``), UIDNEXT, UIDVALIDITY, FLAGS, PERMANENTFLAGS, the
read-write state, and HIGHESTMODSEQ once CONDSTORE is on. The check, one pipelined round trip:

* ``NOOP``: syncs the session; any untagged reply means something changed: a miss;
* ``STATUS box (MESSAGES UIDNEXT UIDVALIDITY)``: on the selected mailbox Dovecot answers from
  the session's view, which includes every change already reported to earlier clients of this
  session, so new or expunged mail since the cached SELECT shows here;
* ``SEARCH RETURN (MIN) UNSEEN`` (RFC 4731; plain ``SEARCH UNSEEN`` without ESEARCH): the first
  unseen message, i.e. ``[UNSEEN n]``.

Not asked with ``STATUS HIGHESTMODSEQ``: that enables CONDSTORE on the session (RFC 7162 §3.1),
changing what the client gets. Sessions with CONDSTORE or QRESYNC on are never served from
the cache; neither are SELECTs with options. FLAGS/PERMANENTFLAGS changes (new keywords) are
seen by the relay's scanner and drop the entry, as do the commands in ``DROPPING_COMMANDS``.
RECENT is per session: a fresh SELECT in the same session says ``* 0 RECENT``, and so do hits.
A SELECT that replaces a selected mailbox starts with ``* OK [CLOSED]`` on servers that say it
(Dovecot always does): hits, always on a selected session, add the line the server uses, once
it has been seen to use one (``ServerTraits``); until then there are no hits.
Mailbox names are compared decoded, ``INBOX`` case-insensitively (RFC 9051 §5.1).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from imapproxy.protocol.grammar import quote
from imapproxy.protocol.response import Response

# Commands after which the cached reply is dropped: they change what is selected, how
# (CONDSTORE, QRESYNC), or the mailbox itself.
DROPPING_COMMANDS = frozenset(
    {
        b"SELECT",
        b"EXAMINE",
        b"CLOSE",
        b"UNSELECT",
        b"RENAME",
        b"DELETE",
        b"ENABLE",
        b"STORE",
        b"UID STORE",
        b"EXPUNGE",
        b"UID EXPUNGE",
        b"MOVE",
        b"UID MOVE",
        b"COPY",
        b"UID COPY",
        b"APPEND",
        b"SETACL",
        b"DELETEACL",
    }
)
# Words that turn CONDSTORE on (RFC 7162 §3.1: CONDSTORE-enabling commands) or use QRESYNC.

# Codes that only come with CONDSTORE/QRESYNC on (RFC 7162): such replies are not cached.
_UNCACHEABLE_CODES = (b"[HIGHESTMODSEQ", b"[NOMODSEQ")
_RECENT = re.compile(rb"^\* [0-9]+ RECENT\r\n", re.M)
_NUMBER_CODE = re.compile(rb"^\[(UIDNEXT|UIDVALIDITY|UNSEEN) ([0-9]+)\]")
_STATUS_ITEM = re.compile(rb"(MESSAGES|UIDNEXT|UIDVALIDITY) ([0-9]+)")
_ESEARCH_MIN = re.compile(rb"\bMIN ([0-9]+)")


@dataclass(frozen=True)
class MailboxState:
    """The figures of a SELECT reply that change with the mailbox."""

    exists: int
    uidnext: int | None
    uidvalidity: int | None
    first_unseen: int | None  # no [UNSEEN n] means no unseen message


@dataclass(frozen=True)
class SelectEntry:
    """A SELECT reply kept on a backend session, and the state it describes."""

    mailbox: bytes  # mailbox_key() of the name
    untagged: bytes  # the untagged responses as sent, RECENT set to 0
    status_text: bytes  # the tagged reply without tag: "OK [READ-WRITE] Select completed"
    state: MailboxState

    def reply(self, tag: bytes, closed_line: bytes) -> bytes:
        """The reply to serve; ``closed_line`` is the server's ``* OK [CLOSED]`` line, which it
        sends first when a SELECT replaces a selected mailbox (b"" if it does not)."""
        return closed_line + self.untagged + tag + b" " + self.status_text + b"\r\n"


def closed_line(untagged: Sequence[Response]) -> bytes | None:
    """The ``* OK [CLOSED] ...`` line of a SELECT reply (RFC 7162 §3.2.11), if any."""
    return next((r.raw for r in untagged if _is_closed(r)), None)


def _is_closed(response: Response) -> bool:
    return response.word == b"OK" and response.text.upper().startswith(b"[CLOSED]")


def mailbox_key(name: bytes) -> bytes:
    """The name a mailbox is known by: ``INBOX`` in any case is ``INBOX`` (RFC 9051 §5.1)."""
    return b"INBOX" if name.upper() == b"INBOX" else name


def drops_entry(name: bytes, rest: bytes) -> bool:
    """Whether a client command makes the cached reply unusable."""
    return name in DROPPING_COMMANDS or enables_condstore(rest)


def enables_condstore(rest: bytes) -> bool:
    """Whether a command's arguments may turn CONDSTORE on for the rest of the connection
    (RFC 7162 §3.1: a SELECT's CONDSTORE, FETCH's MODSEQ or CHANGEDSINCE, STORE's
    UNCHANGEDSINCE, SEARCH's MODSEQ, STATUS's HIGHESTMODSEQ; QRESYNC), in any case, anywhere
    (a mailbox so named too: the cautious side)."""
    upper = rest.upper()
    return (
        b"MODSEQ" in upper
        or b"CHANGEDSINCE" in upper
        or b"CONDSTORE" in upper
        or b"QRESYNC" in upper
    )


def state_of(untagged: Sequence[Response]) -> MailboxState | None:
    """The figures of a SELECT reply; None when it cannot be cached: CONDSTORE on, no EXISTS,
    or a response that is not part of a SELECT reply (news about the previous mailbox)."""
    exists = None
    codes: dict[bytes, int] = {}
    for response in untagged:
        word, text = response.word, response.text.upper()
        if word.isdigit() and text in (b"EXISTS", b"RECENT"):
            exists = int(word) if text == b"EXISTS" else exists
        elif word == b"OK" and not text.startswith(_UNCACHEABLE_CODES):  # [CLOSED] too
            if match := _NUMBER_CODE.match(text):
                codes[match.group(1)] = int(match.group(2))
        elif word not in (b"FLAGS", b"LIST"):
            return None
    if exists is None:
        return None
    return MailboxState(
        exists, codes.get(b"UIDNEXT"), codes.get(b"UIDVALIDITY"), codes.get(b"UNSEEN")
    )


def entry_from_reply(
    mailbox: bytes, untagged: Sequence[Response], done: Response
) -> SelectEntry | None:
    """A cache entry for a successful, plain SELECT reply, or None if it must not be cached."""
    if done.word != b"OK" or not done.text.upper().startswith(b"[READ-WRITE]"):
        return None
    state = state_of(untagged)
    if state is None:
        return None
    raw = b"".join(r.raw for r in untagged if not _is_closed(r))
    return SelectEntry(
        mailbox_key(mailbox), _RECENT.sub(b"* 0 RECENT\r\n", raw), done.status_text, state
    )


def check_commands(mailbox: bytes, *, esearch: bool) -> tuple[bytes, bytes, bytes]:
    """The three commands (without tags) whose answers tell whether an entry still holds."""
    search = b"SEARCH RETURN (MIN) UNSEEN" if esearch else b"SEARCH UNSEEN"
    return b"NOOP", b"STATUS " + quote(mailbox) + b" (MESSAGES UIDNEXT UIDVALIDITY)", search


def still_valid(entry: SelectEntry, untagged: Sequence[Response]) -> bool:
    """Whether the untagged answers to ``check_commands`` match the entry.

    Anything but the STATUS and SEARCH answers came from the NOOP: news about the mailbox.
    """
    status = [r for r in untagged if r.word == b"STATUS"]
    search = [r for r in untagged if r.word in (b"ESEARCH", b"SEARCH")]
    if len(status) + len(search) != len(untagged):
        return False
    figures = _status_figures(status)
    state = entry.state
    if figures != {
        b"MESSAGES": state.exists,
        b"UIDNEXT": state.uidnext,
        b"UIDVALIDITY": state.uidvalidity,
    }:
        return False
    return _first_unseen(search) == state.first_unseen


def _status_figures(responses: Sequence[Response]) -> dict[bytes, int | None]:
    for response in responses:
        if response.word == b"STATUS":
            return {k.upper(): int(v) for k, v in _STATUS_ITEM.findall(response.text.upper())}
    return {}


def _first_unseen(responses: Sequence[Response]) -> int | None:
    """MIN of an ESEARCH reply, or the smallest number of a SEARCH reply; None if no match."""
    for response in responses:
        if response.word == b"ESEARCH":
            match = _ESEARCH_MIN.search(response.text.upper())
            return int(match.group(1)) if match else None
        if response.word == b"SEARCH":
            numbers = [int(n) for n in response.text.split() if n.isdigit()]
            return min(numbers) if numbers else None
    return None
