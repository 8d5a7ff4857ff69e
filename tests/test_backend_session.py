"""A cached session's reuse check on a real socket pair: sent after the client's answer, read
before the client's first command goes on (``BackendSession.start_check``/``finish_check``)."""

from __future__ import annotations

import pytest
from gevent import socket

from imapproxy.backend import BackendSession
from imapproxy.backend_login import LoginResult
from imapproxy.errors import BackendFailure, FailureKind
from imapproxy.select_cache import MailboxState, SelectEntry

LOGIN = LoginResult(b"ready", (), b"OK Logged in", (), (b"IMAP4rev1",))


def _session(sock: socket.socket) -> BackendSession:
    return BackendSession(sock, ("127.0.0.1", 143), LOGIN)


def test_a_check_answered_passes(socket_pair: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = socket_pair
    session = _session(ours)
    session.start_check(None)
    sent = theirs.recv(1000)
    tag, command = sent.split(b" ", 1)
    assert command == b"NOOP\r\n"
    theirs.sendall(tag + b" OK NOOP completed\r\n")
    session.finish_check()  # no failure
    assert session.check is None and session.pending == {}


def test_a_check_that_could_not_be_sent_fails_when_read(
    socket_pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, _ = socket_pair
    session = _session(ours)
    ours.shutdown(socket.SHUT_WR)  # the session's connection is gone for writing
    session.start_check(None)  # sent after the client's answer: no failure yet
    with pytest.raises(BackendFailure) as failure:
        session.finish_check()
    assert failure.value.kind is FailureKind.LOST  # a logged-in session lost, not CONNECT
    assert session.check is None and session.check_send_error is None


def _nothing_sent(theirs: socket.socket) -> bool:
    theirs.settimeout(0.0)  # gevent: no wait, the kernel's EAGAIN
    try:
        theirs.recv(1000)
    except BlockingIOError:
        return True
    finally:
        theirs.settimeout(None)
    return False


def test_a_bare_noop_goes_after_the_clients_answer(
    socket_pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = socket_pair
    session = _session(ours)
    session.start_check(None, answered=False)  # at checkout: not yet
    assert session.check is None and _nothing_sent(theirs)
    session.start_check(None, answered=True)
    assert theirs.recv(1000).endswith(b" NOOP\r\n")
    session.start_check(None, answered=True)  # once only
    assert _nothing_sent(theirs)


def test_a_select_cache_check_goes_before_the_clients_answer(
    socket_pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = socket_pair
    session = _session(ours)
    session.selected = True
    session.select_entry = SelectEntry(
        b"INBOX", b"* 2 EXISTS\r\n", b"OK [READ-WRITE] done", MailboxState(2, 3, 1, None)
    )
    session.start_check(None, answered=False)
    sent = theirs.recv(1000)
    assert b' STATUS "INBOX" (MESSAGES UIDNEXT UIDVALIDITY)\r\n' in sent and b" SEARCH " in sent
    session.start_check(None, answered=True)  # sent already
    assert _nothing_sent(theirs)
