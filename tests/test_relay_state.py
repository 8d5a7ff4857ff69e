"""Playbooks for the relay's decisions (``relay_state``): client lines and server bytes in,
verdicts and states out. No sockets."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from imapproxy.protocol.framing import (
    AWAIT_CONTINUATION,
    NEED_DATA,
    ClientClosed,
    CommandFramer,
    Line,
)
from imapproxy.protocol.scanner import INITIAL_CARRY, MAX_TAGGED_PREFIX_BYTES
from imapproxy.relay_state import CLOSE, Farewell, Kind, RelayState
from imapproxy.select_cache import SelectEntry
from tests.test_select_cache_unit import entry


@dataclass
class FakeMailbox:
    selected: bool = False
    select_entry: SelectEntry | None = None
    select_checked_at: float | None = None


class Play:
    """Drives a ``RelayState`` as the relay would: client lines through a framer, server
    bytes through the scanner (kept carry and all)."""

    def __init__(
        self,
        *,
        select_cache: bool = False,
        mailbox: FakeMailbox | None = None,
        reuse_after_enable: bool = False,
    ) -> None:
        self.mailbox = mailbox or FakeMailbox()
        self.state = RelayState(
            self.mailbox, select_cache=select_cache, reuse_after_enable=reuse_after_enable
        )
        self.framer = CommandFramer(65536)
        self.carry = INITIAL_CARRY

    def client(self, data: bytes, duplex: bool = False) -> list[Kind]:
        self.framer.receive_data(data)
        kinds = []
        while (event := self.framer.next_event()) not in (NEED_DATA, AWAIT_CONTINUATION):
            if isinstance(event, ClientClosed):
                break
            if isinstance(event, Line):
                kinds.append(self.state.client_line(event, duplex=duplex).kind)
        return kinds

    def server(self, data: bytes) -> None:
        scanner = self.state.scanner
        buf = bytearray(self.carry + data + bytes(MAX_TAGGED_PREFIX_BYTES))
        end = len(self.carry) + len(data)
        keep = scanner.scan(buf, end)
        self.carry = bytes(buf[end - keep : end])
        self.state.backend_events(scanner.events)
        scanner.events.clear()


def test_a_command_is_outstanding_until_its_completion() -> None:
    play = Play()
    assert play.client(b"a1 FETCH 1 FLAGS\r\n") == [Kind.COMMAND]
    assert not play.state.idle() and not play.state.replies_done()
    play.server(b"* 1 FETCH (FLAGS (\\Seen))\r\n")
    assert not play.state.replies_done()
    play.server(b"a1 OK done\r\n")
    assert play.state.idle() and play.state.in_sync


def test_pipelined_commands_complete_in_any_order() -> None:
    play = Play()
    assert play.client(b"a NOOP\r\nb CHECK\r\n") == [Kind.COMMAND, Kind.COMMAND]
    play.server(b"b OK\r\n")
    assert not play.state.idle()
    play.server(b"a OK\r\n")
    assert play.state.idle() and play.state.in_sync


def test_message_content_never_completes_a_command() -> None:
    play = Play()
    play.client(b"f FETCH 1 BODY[]\r\n")
    play.server(b"* 1 FETCH (BODY[] {14}\r\nf OK fake\r\n\r\n")
    assert not play.state.idle()
    play.server(b")\r\nf OK real\r\n")
    assert play.state.idle() and play.state.in_sync


def test_completion_for_no_command_or_a_reused_tag_breaks_sync() -> None:
    stray = Play()
    stray.server(b"zz OK what\r\n")
    assert not stray.state.in_sync
    twice = Play()
    twice.client(b"a NOOP\r\na NOOP\r\n")
    assert not twice.state.in_sync


def test_uid_commands_are_named_with_their_verb() -> None:
    play = Play()
    play.client(b"u UID fetch 1 FLAGS\r\n")
    assert play.state.outstanding == {b"u": b"UID FETCH"}


def test_lines_the_proxy_cannot_read_go_to_the_server_unjudged() -> None:
    play = Play()
    assert play.client(b"\r\n   \r\n") == [Kind.UNPARSED, Kind.UNPARSED]
    assert play.state.outstanding == {}


def test_logout_and_compress_are_intercepted() -> None:
    play = Play()
    assert play.client(b"z LOGOUT\r\nc COMPRESS DEFLATE\r\n") == [Kind.LOGOUT, Kind.COMPRESS]
    assert play.state.outstanding == {}
    assert play.client(b"y LOGOUT now\r\n") == [Kind.COMMAND]  # not a LOGOUT we can end


@pytest.mark.parametrize(
    ("select_cache", "duplex", "kind"),
    [(True, False, Kind.SELECT), (False, False, Kind.COMMAND), (True, True, Kind.COMMAND)],
)
def test_select_is_the_caches_only_when_on_and_sequential(
    select_cache: bool, duplex: bool, kind: Kind
) -> None:
    play = Play(select_cache=select_cache)
    assert play.client(b"s SELECT INBOX\r\n", duplex=duplex) == [kind]


def test_select_examine_close_track_the_selected_state() -> None:
    play = Play()
    play.client(b"s SELECT INBOX\r\n")
    play.server(b"* 1 EXISTS\r\ns OK [READ-WRITE] done\r\n")
    assert play.mailbox.selected
    play.client(b"e EXAMINE nosuch\r\n")
    play.server(b"e NO no such mailbox\r\n")  # a failed EXAMINE deselects (RFC 9051 §6.3.1)
    assert not play.mailbox.selected
    play.client(b"s SELECT INBOX\r\nc CLOSE\r\n")
    play.server(b"s OK [READ-WRITE] done\r\nc OK closed\r\n")
    assert not play.mailbox.selected


def test_a_select_refused_as_bad_leaves_the_selection_as_it_was() -> None:
    play = Play()
    play.client(b"s SELECT INBOX\r\n")
    play.server(b"s OK [READ-WRITE] done\r\n")
    play.client(b"t SELECT\r\n")  # no mailbox: a syntax error, nothing closed
    play.server(b"t BAD Missing mailbox name\r\n")
    assert play.mailbox.selected  # so UNSELECT still goes before the session is cached


@pytest.mark.parametrize("command", [b"ENABLE QRESYNC", b"enable CONDSTORE", b"NOTIFY NONE"])
def test_a_command_that_changes_the_connection_keeps_the_session_out_of_the_cache(
    command: bytes,
) -> None:
    play = Play()
    play.client(b"a NOOP\r\nb " + command + b"\r\nc NOOP\r\n")
    assert play.state.changed_by == command.split(b" ")[0].upper()
    assert Play().state.changed_by is None


@pytest.mark.parametrize(
    "command",
    [
        b"SELECT INBOX (CONDSTORE)",
        b"FETCH 1:* (FLAGS) (CHANGEDSINCE 5)",
        b"UID FETCH 1 (MODSEQ)",
        b"STORE 1 (UNCHANGEDSINCE 9) +FLAGS (\\Seen)",
        b"STATUS INBOX (HIGHESTMODSEQ)",
        b"SELECT INBOX (QRESYNC (1 2))",
    ],
)
def test_a_command_that_turns_condstore_on_keeps_the_session_out_of_the_cache(
    command: bytes,
) -> None:
    """RFC 7162 §3.1: these turn CONDSTORE on as ENABLE CONDSTORE does (and with it MODSEQ in
    every later FETCH), unless the site caches ENABLE's sessions anyway."""
    play = Play()
    play.client(b"a " + command + b"\r\n")
    assert play.state.changed_by == b"CONDSTORE"
    keeping = Play(reuse_after_enable=True)
    keeping.client(b"a " + command + b"\r\n")
    assert keeping.state.changed_by is None
    plain = Play()
    plain.client(b"a FETCH 1:* (FLAGS UID)\r\nb SELECT INBOX\r\n")
    assert plain.state.changed_by is None


def test_unauthenticate_keeps_the_session_out_of_the_cache_even_with_reuse_after_enable() -> None:
    play = Play(reuse_after_enable=True)
    play.client(b"a ENABLE QRESYNC\r\n")
    assert play.state.changed_by is None  # the site's one webmail enables it on every login
    play.client(b"b UNAUTHENTICATE\r\n")
    assert play.state.changed_by == b"UNAUTHENTICATE"


def test_the_select_cache_entry_goes_with_flag_changes_and_dropping_commands() -> None:
    for command, reply in [
        (b"n NOOP\r\n", b"* FLAGS (\\Seen $New)\r\nn OK\r\n"),
        (b"n NOOP\r\n", b"* OK [PERMANENTFLAGS (\\Seen $New \\*)] x\r\nn OK\r\n"),
        (b"n UID STORE 1 +FLAGS (\\Seen)\r\n", b"n OK\r\n"),
        (b"n FETCH 1 (FLAGS) (CHANGEDSINCE 1)\r\n", b"n OK\r\n"),
    ]:
        play = Play(select_cache=True, mailbox=FakeMailbox(True, entry(), 1.0))
        play.client(command)
        assert play.mailbox.select_checked_at is None  # any command voids the login check
        play.server(reply)
        assert play.mailbox.select_entry is None, command
    kept = Play(select_cache=True, mailbox=FakeMailbox(True, entry(), 1.0))
    kept.client(b"f FETCH 1:5 (FLAGS)\r\n")
    kept.server(b"* 1 FETCH (FLAGS (\\Seen))\r\nf OK\r\n")
    assert kept.mailbox.select_entry is not None


def test_idle_enters_duplex_on_its_continuation_and_done_ends_it() -> None:
    play = Play()
    play.client(b"i IDLE\r\n")
    assert not play.state.goes_duplex()
    play.server(b"+ idling\r\n")
    assert play.state.replies_done() and play.state.goes_duplex() and play.state.stays_duplex()
    play.server(b"* 2 EXISTS\r\n")
    assert play.client(b"DONE\r\n", duplex=True) == [Kind.ANSWER]
    assert play.state.idle_tag is None and not play.state.stays_duplex()
    play.server(b"i OK idle done\r\n")
    assert play.state.idle()


def test_notify_keeps_duplex_for_good() -> None:
    play = Play()
    play.client(b"n NOTIFY SET (selected MessageNew)\r\n")
    play.server(b"n OK\r\n")
    assert play.state.goes_duplex() and play.state.stays_duplex()


def test_synchronising_literal_waits_for_the_go_ahead_or_the_refusal() -> None:
    play = Play()
    play.client(b"a APPEND INBOX {5}\r\n")
    tag = play.state.last_tag()
    assert tag == b"a" and not play.state.literal_answered(tag)
    play.server(b"+ OK\r\n")
    assert play.state.literal_answered(tag) and play.state.take_continuation()
    assert not play.state.take_continuation()
    refused = Play()
    refused.client(b"a APPEND INBOX {99999999}\r\n")
    refused.server(b"a NO [LIMIT] too big\r\n")
    assert refused.state.literal_answered(b"a") and not refused.state.take_continuation()


def test_the_rest_of_a_command_after_a_literal_is_a_part() -> None:
    play = Play()
    play.client(b"a LOGIN {5+}\r\n")
    assert play.client(b"alice pw\r\n") == [Kind.PART]  # literal bytes, then the rest
    assert play.state.outstanding == {b"a": b"LOGIN"}


def test_sasl_lines_answer_the_servers_requests() -> None:
    play = Play()
    play.client(b"a AUTHENTICATE PLAIN\r\n")
    play.server(b"+ \r\n")
    assert play.client(b"AGFsaWNlAHB3\r\n") == [Kind.ANSWER]
    assert play.state.outstanding == {b"a": b"AUTHENTICATE"}


@pytest.mark.parametrize(
    ("client", "server", "in_literal", "farewell"),
    [
        (b"a APPEND INBOX {5}\r\n", b"+ OK\r\n", True, CLOSE),
        (b"i IDLE\r\n", b"+ idling\r\n", False, Farewell(True, b"DONE\r\n")),
        (b"a AUTHENTICATE PLAIN\r\n", b"+ \r\n", False, Farewell(True, b"*\r\n")),
        (b"f FETCH 1:* BODY[]\r\n", b"* 1 FETCH (BODY[] {9}\r\nabc", False, Farewell(True)),
        (b"n NOOP\r\n", b"n OK\r\n", False, Farewell(True)),
    ],
)
def test_client_gone_at_every_point(
    client: bytes, server: bytes, in_literal: bool, farewell: Farewell
) -> None:
    play = Play()
    play.client(client)
    play.server(server)
    assert play.state.client_gone(in_literal=in_literal) == farewell


def test_mailbox_left_at_the_end_only_with_the_select_cache_off() -> None:
    assert Play(mailbox=FakeMailbox(selected=True)).state.leaves_mailbox()
    assert not Play(select_cache=True, mailbox=FakeMailbox(selected=True)).state.leaves_mailbox()
    assert not Play(mailbox=FakeMailbox(selected=False)).state.leaves_mailbox()


@given(st.binary(max_size=400), st.binary(max_size=400))
def test_hostile_bytes_either_way_give_only_verdicts(client: bytes, server: bytes) -> None:
    play = Play(select_cache=True, mailbox=FakeMailbox(True, entry(), 1.0))
    try:
        play.client(client)
    except Exception as error:  # the framer's own limit errors are the only ones allowed
        assert type(error).__name__ == "LineTooLong"
    play.server(server)
    play.state.client_gone(in_literal=play.framer.in_literal)
    assert isinstance(play.state.idle(), bool)
