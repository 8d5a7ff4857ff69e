"""The SELECT cache's rules, without sockets."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from imapproxy.errors import ClientProtocolError
from imapproxy.protocol.framing import NEED_DATA
from imapproxy.protocol.grammar import Arguments
from imapproxy.protocol.response import Response, ResponseReader
from imapproxy.select_cache import (
    SelectEntry,
    check_commands,
    closed_line,
    drops_entry,
    entry_from_reply,
    mailbox_key,
    still_valid,
)
from imapproxy.select_relay import select_mailbox

SELECT_REPLY = (
    b"* OK [CLOSED] Previous mailbox closed.\r\n"
    b"* FLAGS (\\Answered \\Seen)\r\n"
    b"* OK [PERMANENTFLAGS (\\Answered \\Seen \\*)] Flags permitted.\r\n"
    b"* 5 EXISTS\r\n* 2 RECENT\r\n* OK [UNSEEN 3] First unseen.\r\n"
    b"* OK [UIDVALIDITY 77] UIDs valid\r\n* OK [UIDNEXT 9] Predicted next UID\r\n"
)
DONE = b"s OK [READ-WRITE] Select completed (0.001 + 0.000 secs).\r\n"


def parse(data: bytes) -> list[Response]:
    reader = ResponseReader()
    reader.receive_data(data)
    out = []
    while (r := reader.next_response()) is not NEED_DATA:
        assert isinstance(r, Response)
        out.append(r)
    return out


def entry() -> SelectEntry:
    made = entry_from_reply(b"inbox", parse(SELECT_REPLY), parse(DONE)[0])
    assert made is not None
    return made


def test_entry_keeps_the_reply_with_recent_zero_and_without_closed() -> None:
    e = entry()
    assert e.mailbox == b"INBOX"
    assert b"* 0 RECENT\r\n" in e.untagged and b"[CLOSED]" not in e.untagged
    assert e.reply(b"t", b"* OK [CLOSED] x\r\n").startswith(b"* OK [CLOSED] x\r\n* FLAGS")
    assert e.reply(b"t", b"").endswith(
        b"t OK [READ-WRITE] Select completed (0.001 + 0.000 secs).\r\n"
    )
    assert (e.state.exists, e.state.uidnext, e.state.uidvalidity, e.state.first_unseen) == (
        5,
        9,
        77,
        3,
    )
    assert closed_line(parse(SELECT_REPLY)) == b"* OK [CLOSED] Previous mailbox closed.\r\n"


def test_not_cached() -> None:
    read_only = parse(b"s OK [READ-ONLY] done\r\n")[0]
    assert entry_from_reply(b"INBOX", parse(SELECT_REPLY), read_only) is None
    modseq = parse(SELECT_REPLY + b"* OK [HIGHESTMODSEQ 4] Highest\r\n")
    assert entry_from_reply(b"INBOX", modseq, parse(DONE)[0]) is None
    news = parse(b"* 3 EXPUNGE\r\n" + SELECT_REPLY)
    assert entry_from_reply(b"INBOX", news, parse(DONE)[0]) is None


def check(*lines: bytes) -> bool:
    return still_valid(entry(), parse(b"".join(lines)))


STATUS = b"* STATUS INBOX (MESSAGES 5 UIDNEXT 9 UIDVALIDITY 77)\r\n"


def test_still_valid() -> None:
    assert check(STATUS, b'* ESEARCH (TAG "x") MIN 3\r\n')
    assert check(STATUS, b"* SEARCH 3 4 5\r\n")
    assert not check(b"* 6 EXISTS\r\n", STATUS, b"* SEARCH 3\r\n")  # the NOOP brought news
    assert not check(STATUS.replace(b"MESSAGES 5", b"MESSAGES 6"), b"* SEARCH 3\r\n")
    assert not check(STATUS.replace(b"UIDNEXT 9", b"UIDNEXT 10"), b"* SEARCH 3\r\n")
    assert not check(STATUS, b"* SEARCH 2 3\r\n")  # first unseen moved
    assert not check(STATUS, b"* SEARCH\r\n")  # no unseen left


def test_names_and_dropping_commands() -> None:
    assert mailbox_key(b"iNbOx") == b"INBOX" and mailbox_key(b"Sent") == b"Sent"
    assert drops_entry(b"STORE", b"1 +FLAGS (\\Seen)") and drops_entry(b"UID EXPUNGE", b"1")
    assert drops_entry(b"FETCH", b"1:* (FLAGS) (CHANGEDSINCE 5)")
    assert not drops_entry(b"UID FETCH", b"1:50 (UID FLAGS BODY.PEEK[HEADER])")
    assert check_commands(b"INBOX", esearch=True) == (
        b"NOOP",
        b'STATUS "INBOX" (MESSAGES UIDNEXT UIDVALIDITY)',
        b"SEARCH RETURN (MIN) UNSEEN",
    )


_CONDSTORE = re.compile(rb"MODSEQ|CHANGEDSINCE|UNCHANGEDSINCE|CONDSTORE|QRESYNC", re.I)
_WORD_BITS = st.sampled_from(
    [b"modseq", b"ChangedSince", b"UNCHANGEDSINCE", b"condStore", b"QRESYNC", b"SINCE", b"MOD"]
)


@given(st.lists(st.one_of(_WORD_BITS, st.binary(max_size=6)), max_size=8).map(b"".join))
def test_condstore_words_are_found_in_any_case_anywhere(rest: bytes) -> None:
    """The words that make a command drop the entry: as a case-blind search for them finds."""
    assert drops_entry(b"FETCH", rest) == (_CONDSTORE.search(rest) is not None)


@given(st.lists(st.sampled_from(list(b'ab "\\\\ ]{}()%*\x00\x7f\xe9+~')), max_size=16).map(bytes))
def test_select_mailbox_reads_as_the_tokens_read(text: bytes) -> None:
    """The one-match path of ``select_mailbox`` gives what ``Arguments`` alone gives."""
    line = b"s1 SELECT " + text + b"\r\n"
    args = Arguments([line.rstrip(b"\r\n")], [], b"s1")
    try:
        args.space()
        expected: bytes | None = args.astring()
        if not args.at_end():
            expected = None
    except ClientProtocolError:
        expected = None
    assert select_mailbox(b"s1", [line], []) == expected
