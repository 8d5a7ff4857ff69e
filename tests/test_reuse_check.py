"""The reuse check's commands and verdicts, without sockets."""

from __future__ import annotations

import pytest

from imapproxy.reuse_check import ReuseCheck, Verdict, goes_with_the_check
from tests.test_select_cache_unit import entry, parse

STATUS = b"* STATUS INBOX (MESSAGES 5 UIDNEXT 9 UIDVALIDITY 77)\r\n"
ESEARCH = b'* ESEARCH (TAG "t") MIN 3\r\n'


def test_plain_check_is_one_noop() -> None:
    assert ReuseCheck(None, None, esearch=True).lines == (b"NOOP",)


def test_client_id_goes_first() -> None:
    check = ReuseCheck(None, b'("name" "webmail")', esearch=False)
    assert check.lines == (b'ID ("name" "webmail")', b"NOOP")


def test_entry_check_replaces_the_noop() -> None:
    check = ReuseCheck(entry(), None, esearch=True)
    assert check.lines == (
        b"NOOP",
        b'STATUS "INBOX" (MESSAGES UIDNEXT UIDVALIDITY)',
        b"SEARCH RETURN (MIN) UNSEEN",
    )


def test_quiet_noop_is_alive() -> None:
    verdict = ReuseCheck(None, None, esearch=True).verdict([], parse(b"a OK NOOP done\r\n"))
    assert verdict == Verdict(alive=True, entry_holds=False, drop_entry=False)


def test_news_for_an_earlier_client_drops_the_entry() -> None:
    verdict = ReuseCheck(None, None, esearch=True).verdict(
        parse(b"* 6 EXISTS\r\n"), parse(b"a OK done\r\n")
    )
    assert verdict.alive and verdict.drop_entry


@pytest.mark.parametrize("word", [b"NO", b"BAD"])
def test_a_refused_noop_is_dead(word: bytes) -> None:
    verdict = ReuseCheck(None, None, esearch=True).verdict([], parse(b"a " + word + b" x\r\n"))
    assert not verdict.alive and verdict.drop_entry and verdict.reason


def test_a_refused_id_is_no_failure_but_a_bad_one_is() -> None:
    check = ReuseCheck(None, b"NIL", esearch=True)
    ok = parse(b"b OK done\r\n")
    assert check.verdict(parse(b"* ID NIL\r\n"), parse(b"a NO no ID\r\n") + ok).alive
    assert not check.verdict([], parse(b"a BAD what\r\n") + ok).alive


def test_entry_that_still_holds() -> None:
    check = ReuseCheck(entry(), None, esearch=True)
    done = parse(b"a OK\r\nb OK\r\nc OK\r\n")
    verdict = check.verdict(parse(STATUS + ESEARCH), done)
    assert verdict == Verdict(alive=True, entry_holds=True, drop_entry=False)


def test_entry_with_news_or_other_figures_is_dropped() -> None:
    check = ReuseCheck(entry(), None, esearch=True)
    done = parse(b"a OK\r\nb OK\r\nc OK\r\n")
    with_news = check.verdict(parse(b"* 6 EXISTS\r\n" + STATUS + ESEARCH), done)
    other = check.verdict(parse(STATUS.replace(b"MESSAGES 5", b"MESSAGES 4") + ESEARCH), done)
    for verdict in (with_news, other):
        assert verdict.alive and not verdict.entry_holds and verdict.drop_entry


@pytest.mark.parametrize(
    ("line", "goes"),
    [
        (b"s SELECT INBOX\r\n", True),
        (b's examine "Sent Items"\r\n', True),
        (b"s SELECT {5}\r\n", False),  # a literal: the proxy would answer for the server
        (b"s SELECT {5+}\r\n", False),
        (b"f FETCH 1 FLAGS\r\n", False),
        (b"s STORE 1 +FLAGS (\\Deleted)\r\n", False),
        (b"\r\n", False),
        (b"* SELECT INBOX\r\n", False),  # no valid tag
    ],
)
def test_only_a_plain_select_travels_with_the_check(line: bytes, goes: bool) -> None:
    assert goes_with_the_check(line) is goes
