"""Overlapped checkout: a cached session is handed over at once, its check read afterwards.

The login is answered (``* OK [XPROXYREUSE]`` and the saved login reply) in the same instant as
the liveness check leaves for the server; the check's reply is read before the client's first
command is forwarded. When the check fails, the connection opens a new session with the
credentials it still holds and the client notices nothing. A ``ScriptedBackend`` plays the
session that dies exactly at the check (a race no real server can be made to lose on cue);
Dovecot plays the rest.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from tests.support.client import REUSED, RawClient, assert_in_sync, logged_in, login
from tests.support.dovecot import DovecotInstance, User, make_message
from tests.support.proxy import ProxyProcess
from tests.support.scripted_backend import Conn, ScriptedBackend, serve_imap

SELECT_REPLY_EXISTS = b"* 1 EXISTS\r\n"


def dies_at_check(fault: Callable[[Conn, bytes], None]) -> Callable[[Conn, int], None]:
    """Connection 1 (the first login: 0 is the start-up probe) serves until the proxy's reuse
    check, then meets ``fault``; every other connection is a normal server."""

    def script(conn: Conn, number: int) -> None:
        if number != 1:
            serve_imap(conn)
            return
        line = serve_imap(conn, stop_after=b"NOOP")
        if line is not None:
            fault(conn, line.split(b" ", 1)[0])

    return script


def hang_up(conn: Conn, tag: bytes) -> None:
    conn.reset()


def say_bye(conn: Conn, tag: bytes) -> None:
    conn.send(b"* BYE Shutting down\r\n")


def refuse(conn: Conn, tag: bytes) -> None:
    conn.send(tag + b" NO [SERVERBUG] not now\r\n")


def out_of_sync(conn: Conn, tag: bytes) -> None:
    conn.send(b"ipxnot-ours OK what\r\n")


def scripted(start_proxy: Callable[..., ProxyProcess], backend: ScriptedBackend) -> ProxyProcess:
    return start_proxy((backend.host, backend.port), server_response_timeout=2)


def cache_one(proxy: ProxyProcess) -> None:
    client, _ = logged_in(proxy.host, proxy.port, "alice", "secret")
    assert client.command(b"z", b"LOGOUT")[-1] == b"z OK Completed\r\n"
    client.close()
    proxy.wait_for_log("LOGOUT: 'alice' from server sd")


@pytest.mark.parametrize("fault", [hang_up, say_bye, refuse, out_of_sync])
def test_session_that_fails_its_check_is_replaced_unnoticed(
    start_proxy: Callable[..., ProxyProcess], fault: Callable[[Conn, bytes], None]
) -> None:
    with ScriptedBackend(dies_at_check(fault)) as backend:
        proxy = scripted(start_proxy, backend)
        cache_one(proxy)
        client, replies = login(proxy.host, proxy.port, "alice", "secret")
        assert replies[0].startswith(REUSED) and replies[-1].startswith(b"L1 OK"), replies
        reply = client.command(b"s", b"SELECT INBOX")  # goes to the replacement session
        assert reply[-1] == b"s OK [READ-WRITE] done\r\n" and SELECT_REPLY_EXISTS in reply
        assert client.command(b"n", b"NOOP") == [b"n OK done\r\n"]
        assert client.read_available() == b""
        client.close()
        assert backend.connections == 3  # probe, the cached session, its replacement
        assert "is dead" in proxy.log_text()
        assert proxy.counters().TotalServerConnectionsReused == 0


def test_no_replacement_to_be_had_ends_the_connection_plainly(
    start_proxy: Callable[..., ProxyProcess],
) -> None:
    def script(conn: Conn, number: int) -> None:
        if number in (0, 1):
            dies_at_check(hang_up)(conn, number)
        # later connections: the server is gone (closed at once)

    with ScriptedBackend(script) as backend:
        proxy = scripted(start_proxy, backend)
        cache_one(proxy)
        client, replies = login(proxy.host, proxy.port, "alice", "secret")
        assert replies[0].startswith(REUSED)
        client.send(b"s SELECT INBOX\r\n")
        assert client.read_line() == b"* BYE IMAP server unavailable, try again later\r\n"
        assert client.is_closed()
        client.close()
        assert "no session after a dead cached one" in proxy.log_text()
        counters = proxy.counters()
        assert counters.InUseServerConnections == 0 and counters.RetainedServerConnections == 0


def test_reuse_answers_at_once_and_checks_while_the_client_speaks(
    start_proxy: Callable[..., ProxyProcess], user: User
) -> None:
    """Waits per page: a reused page with the SELECT cache off waits for its SELECT and its
    FETCH only: the SELECT travels right behind the check, one wait for both."""
    proxy = start_proxy()
    client, _ = logged_in(proxy.host, proxy.port, user.name, user.password)
    client.command(b"z", b"LOGOUT")
    client.close()
    proxy.wait_for_log(f"LOGOUT: '{user.name}' from server sd")
    before = proxy.counters().BackendWaits
    client, replies = logged_in(proxy.host, proxy.port, user.name, user.password)
    assert replies[0].startswith(REUSED)
    assert client.command(b"s", b"SELECT INBOX")[-1].startswith(b"s OK [READ-WRITE]")
    assert client.command(b"f", b"FETCH 1 (FLAGS)")[-1].startswith(b"f OK")
    waits = proxy.counters().BackendWaits - before
    assert waits == 2, waits  # SELECT (sent behind the check, one wait for both) and FETCH
    client.close()


def test_select_hit_waits_for_nothing_but_the_check_sent_at_login(
    start_proxy: Callable[..., ProxyProcess], user: User
) -> None:
    """SELECT cache on: the entry's validation leaves with the login answer; the page's SELECT
    is answered from the cache the moment it is back, so the page waits for its FETCH only."""
    proxy = start_proxy(enable_select_cache=True)
    for page in range(2):  # the second SELECT, over a selected mailbox, shows its [CLOSED]
        client, _ = logged_in(proxy.host, proxy.port, user.name, user.password)
        first = client.command(b"s", b"SELECT INBOX")
        client.command(b"z", b"LOGOUT")
        client.close()
        proxy.wait_for_log(f"LOGOUT: '{user.name}' from server sd", count=page + 1)
    before = proxy.counters()
    client, replies = logged_in(proxy.host, proxy.port, user.name, user.password)
    assert replies[0].startswith(REUSED)
    time.sleep(0.2)  # a webmail's own work between the login and the SELECT: the check is back
    again = client.command(b"s", b"SELECT INBOX")
    assert client.command(b"f", b"FETCH 1 (FLAGS)")[-1].startswith(b"f OK")
    after = proxy.counters()
    assert after.SelectCacheHits == before.SelectCacheHits + 1
    assert again[1:-1] == first[1:-1] and again[0].startswith(b"* OK [CLOSED]"), again
    waits = after.BackendWaits - before.BackendWaits
    assert waits == 1, waits  # the FETCH alone: the check came back while the client worked
    client.close()


def test_cached_selected_session_with_news_waiting_is_never_served_stale(
    start_proxy: Callable[..., ProxyProcess], user: User, dovecot: DovecotInstance
) -> None:
    """SELECT cache on: the session stays selected in the cache; mail delivered meanwhile is
    news the server tells at the check, which then fails the entry: the page's SELECT goes to
    the server, and the earlier client's news never reaches the new one."""
    proxy = start_proxy(enable_select_cache=True)
    client, _ = logged_in(proxy.host, proxy.port, user.name, user.password)
    assert b"* 5 EXISTS\r\n" in client.command(b"s", b"SELECT INBOX")
    client.command(b"z", b"LOGOUT")
    client.close()
    proxy.wait_for_log(f"LOGOUT: '{user.name}' from server sd")
    dovecot.deliver(user.name, make_message(f"{user.name} message 6"))
    hits = proxy.counters().SelectCacheHits
    client, replies = logged_in(proxy.host, proxy.port, user.name, user.password)
    assert replies[0].startswith(REUSED)
    reply = client.command(b"s", b"SELECT INBOX")
    assert reply[0].startswith(b"* OK [CLOSED]") or reply[0].startswith(b"* FLAGS"), reply
    assert b"* 6 EXISTS\r\n" in reply and b"* 5 EXISTS\r\n" not in reply, reply
    assert proxy.counters().SelectCacheHits == hits
    client.close()


def test_unselect_reply_still_in_flight_is_read_before_the_next_client(
    start_proxy: Callable[..., ProxyProcess], user: User, dovecot: DovecotInstance
) -> None:
    """SELECT cache off: LOGOUT leaves the mailbox with an UNSELECT sent without waiting; the
    next login comes at once, before its reply: the reply is read, never forwarded."""
    proxy = start_proxy()
    first, _ = logged_in(proxy.host, proxy.port, user.name, user.password)
    assert first.command(b"s", b"SELECT INBOX")[-1].startswith(b"s OK")
    dovecot.deliver(user.name, make_message(f"{user.name} message 6"))
    second = RawClient(proxy.host, proxy.port)
    first.send(b"z LOGOUT\r\n")
    assert first.read_until_tagged(b"z")[-1] == b"z OK Completed\r\n"
    login_line = b'L1 LOGIN "%s" "%s"\r\n' % (user.name.encode(), user.password.encode())
    second.send(login_line + b"s SELECT INBOX\r\n")  # pipelined: no pause for the check
    replies = second.read_until_tagged(b"L1")
    assert replies[0].startswith(REUSED) and replies[-1].startswith(b"L1 OK"), replies
    selected = second.read_until_tagged(b"s")
    assert b"* 6 EXISTS\r\n" in selected and selected[-1].startswith(b"s OK [READ-WRITE]")
    ours = [line for line in replies + selected if line.startswith(b"ipx") or b"Unselect" in line]
    assert ours == [], ours
    assert_in_sync(second, user.name)
    first.close()
    second.close()


def test_a_check_made_at_login_does_not_vouch_for_a_late_select(
    start_proxy: Callable[..., ProxyProcess], user: User, dovecot: DovecotInstance
) -> None:
    """The validation sent with the login answer says how the mailbox was then: a SELECT that
    comes later than ``SELECT_CHECK_FRESH_S`` after it, with mail delivered meanwhile, is
    checked again, never answered with the old figures."""
    proxy = start_proxy(enable_select_cache=True)
    for page in range(2):  # the second SELECT, over a selected mailbox, shows its [CLOSED]
        client, _ = logged_in(proxy.host, proxy.port, user.name, user.password)
        client.command(b"s", b"SELECT INBOX")
        client.command(b"z", b"LOGOUT")
        client.close()
        proxy.wait_for_log(f"LOGOUT: '{user.name}' from server sd", count=page + 1)
    client, replies = logged_in(proxy.host, proxy.port, user.name, user.password)
    assert replies[0].startswith(REUSED)
    time.sleep(0.3)  # the check is back, and says 5 messages
    dovecot.deliver(user.name, make_message(f"{user.name} message 6"))
    time.sleep(1.2)  # past SELECT_CHECK_FRESH_S since the check left
    reply = client.command(b"s", b"SELECT INBOX")
    assert b"* 6 EXISTS\r\n" in reply and b"* 5 EXISTS\r\n" not in reply, reply
    client.close()
