"""The proxy in front of a real Dovecot, driven by imaplib, imapclient and a raw client."""

from __future__ import annotations

import imaplib
import time
from collections.abc import Callable

import pytest
from imapclient import IMAPClient

from tests.support.client import REUSED, RawClient, assert_in_sync, imaplib_reused, logged_in, login
from tests.support.dovecot import DovecotInstance, User, make_message
from tests.support.polling import wait_until
from tests.support.proxy import ProxyProcess


def webmail_page(proxy: ProxyProcess, user: User) -> tuple[imaplib.IMAP4, bool]:
    """LOGIN, SELECT, FETCH as webmail does; return the connection and whether it was a reuse."""
    imap = imaplib.IMAP4(proxy.host, proxy.port)
    imap.login(user.name, user.password)
    was_reused = imaplib_reused(imap)
    status, data = imap.select("INBOX")
    assert status == "OK"
    status, fetched = imap.fetch("1:*", "(UID FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert status == "OK"
    subjects = [part[1] for part in fetched if isinstance(part, tuple)]
    assert subjects and all(user.name.encode() in s for s in subjects)  # never another's mail
    return imap, was_reused


def test_login_again_reuses_the_same_backend_session(
    proxy: ProxyProcess, user: User, dovecot: DovecotInstance
) -> None:
    before = dovecot.logins(user.name)
    imap, was_reused = webmail_page(proxy, user)
    assert not was_reused
    imap.logout()
    imap, was_reused = webmail_page(proxy, user)
    assert was_reused
    imap.logout()
    assert dovecot.logins(user.name) == before + 1  # one backend login for two pages
    log = proxy.wait_for_log("on existing sd")
    assert f"LOGIN: '{user.name}' (127.0.0.1:" in log and "on new sd [" in log
    assert f"LOGOUT: '{user.name}' from server sd [" in log


def test_simultaneous_logins_of_one_user_get_two_sessions(
    proxy: ProxyProcess, user: User, dovecot: DovecotInstance
) -> None:
    before = dovecot.logins(user.name)
    first, first_reused = webmail_page(proxy, user)
    second, second_reused = webmail_page(proxy, user)  # while the first is still logged in
    assert not first_reused and not second_reused
    assert dovecot.logins(user.name) == before + 2
    first.logout()
    second.logout()
    pages = [webmail_page(proxy, user) for _ in range(2)]  # both cached: both reused at once
    assert all(was_reused for _, was_reused in pages)
    for imap, _ in pages:
        imap.logout()
    assert dovecot.logins(user.name) == before + 2


def test_reuse_reply_is_one_write_with_post_login_capabilities(
    proxy: ProxyProcess, user: User
) -> None:
    client, _ = login(proxy.host, proxy.port, user.name, user.password)
    client.command(b"Z", b"LOGOUT")
    client.close()
    client = RawClient(proxy.host, proxy.port)
    client.send(b'a LOGIN %s "%s"\r\n' % (user.name.encode(), user.password.encode()))
    time.sleep(0.3)
    data = client.read_available()
    assert data.startswith(
        b"* OK [XPROXYREUSE] IMAP connection reused by imapproxy\r\na OK [CAPABILITY "
    )
    assert b" UNSELECT " in data and data.endswith(b"] Logged in\r\n")
    client.close()


def test_wrong_password_never_gets_the_cached_session(
    proxy: ProxyProcess, user: User, dovecot: DovecotInstance
) -> None:
    imap, _ = webmail_page(proxy, user)
    imap.logout()
    wrong = imaplib.IMAP4(proxy.host, proxy.port)
    with pytest.raises(
        imaplib.IMAP4.error, match=r"\[AUTHENTICATIONFAILED\] Authentication failed"
    ):
        wrong.login(user.name, user.password + "x")
    wrong.shutdown()
    imap, was_reused = webmail_page(proxy, user)  # the right password still gets the cached one
    assert was_reused
    imap.logout()


def test_users_never_share_sessions(
    start_proxy: Callable[..., ProxyProcess], make_user: Callable[..., User]
) -> None:
    proxy = start_proxy(cache_size=4)
    alice, bob = make_user(password="same-password"), make_user(password="same-password")
    for _ in range(3):
        for user in (alice, bob):
            imap, _ = webmail_page(proxy, user)
            imap.logout()


def test_expiry_logs_the_session_out(
    start_proxy: Callable[..., ProxyProcess], user: User, dovecot: DovecotInstance
) -> None:
    proxy = start_proxy(cache_expiration_time=1)
    before = dovecot.logouts(user.name)
    imap, _ = webmail_page(proxy, user)
    imap.logout()
    proxy.wait_for_log("Expiring server sd [", timeout=5)
    assert wait_until(lambda: dovecot.logouts(user.name) == before + 1, timeout=5)
    imap, was_reused = webmail_page(proxy, user)  # and the next login makes a new one
    assert not was_reused
    imap.logout()


def test_login_with_literals_and_authenticate(proxy: ProxyProcess, user: User) -> None:
    client = RawClient(proxy.host, proxy.port)
    client.send(b"a LOGIN {%d}\r\n" % len(user.name))
    assert client.read_line() == b"+ go ahead\r\n"
    client.send(
        user.name.encode() + b" {%d+}\r\n%s\r\n" % (len(user.password), user.password.encode())
    )
    assert client.read_until_tagged(b"a")[-1].startswith(b"a OK ")
    client.command(b"b", b"LOGOUT")
    client.close()
    imap = imaplib.IMAP4(proxy.host, proxy.port)
    imap.authenticate("PLAIN", lambda _: f"\0{user.name}\0{user.password}".encode())
    assert imap.select()[0] == "OK"
    imap.logout()
    imap = imaplib.IMAP4(proxy.host, proxy.port)
    answers = iter([user.name.encode(), user.password.encode()])
    imap.authenticate("LOGIN", lambda _: next(answers))
    assert imap.select()[0] == "OK"
    imap.logout()


def test_imapclient_idle_append_and_big_fetch(
    proxy: ProxyProcess, user: User, dovecot: DovecotInstance
) -> None:
    big = make_message(f"{user.name} big", size=5 * 1024 * 1024)
    with IMAPClient(proxy.host, port=proxy.port, ssl=False, timeout=30) as client:
        client.login(user.name, user.password)
        client.select_folder("INBOX")
        client.idle()
        dovecot.deliver(user.name, make_message(f"{user.name} during idle"))
        responses = client.idle_check(timeout=10)
        client.idle_done()
        assert any(r[1] == b"EXISTS" for r in responses)
        client.append("INBOX", big)
        uids = client.search(["SUBJECT", f"{user.name} big"])
        fetched = client.fetch(uids, ["BODY.PEEK[]"])
        assert fetched[uids[0]][b"BODY[]"] == big
        client.logout()


def test_client_killed_mid_fetch_then_next_login_is_in_sync(
    proxy: ProxyProcess, user: User, dovecot: DovecotInstance
) -> None:
    dovecot.deliver(user.name, make_message(f"{user.name} large", size=3 * 1024 * 1024))
    client, _ = login(proxy.host, proxy.port, user.name, user.password)
    client.command(b"s", b"SELECT INBOX")
    client.send(b"f FETCH 1:* (BODY.PEEK[])\r\n")
    client.read_exact(1000)
    client.close()  # vanish mid-FETCH
    proxy.wait_for_log(f"LOGOUT: '{user.name}' from server sd")  # drained, resynced, cached
    client, replies = logged_in(proxy.host, proxy.port, user.name, user.password)
    assert replies[0].startswith(REUSED)
    assert_in_sync(client, user.name)
    client.close()


def test_client_killed_mid_idle_then_next_login_is_in_sync(proxy: ProxyProcess, user: User) -> None:
    client, _ = login(proxy.host, proxy.port, user.name, user.password)
    client.command(b"s", b"SELECT INBOX")
    client.send(b"i IDLE\r\n")
    assert client.read_line().startswith(b"+ ")
    client.close()
    proxy.wait_for_log(f"LOGOUT: '{user.name}' from server sd")
    client, replies = logged_in(proxy.host, proxy.port, user.name, user.password)
    assert replies[0].startswith(REUSED)
    assert_in_sync(client, user.name)
    client.close()


def test_cache_full(
    start_proxy: Callable[..., ProxyProcess], make_user: Callable[..., User]
) -> None:
    proxy = start_proxy(cache_size=2)
    users = [make_user() for _ in range(3)]
    first, _ = login(proxy.host, proxy.port, users[0].name, users[0].password)
    second, _ = login(proxy.host, proxy.port, users[1].name, users[1].password)
    third, replies = login(proxy.host, proxy.port, users[2].name, users[2].password)
    assert replies[-1].startswith(b"L1 NO [UNAVAILABLE] ")
    assert second.command(b"n", b"NOOP")[-1].startswith(b"n OK")  # others go on
    first.command(b"z", b"LOGOUT")  # a slot becomes cached: it is evicted for the next login
    assert third.command(
        b"L2", b'LOGIN %s "%s"' % (users[2].name.encode(), users[2].password.encode())
    )[-1].startswith(b"L2 OK")
    for client in (first, second, third):
        client.close()


def test_misbehaving_client_does_not_affect_another(proxy: ProxyProcess, user: User) -> None:
    good, _ = login(proxy.host, proxy.port, user.name, user.password)
    bad = RawClient(proxy.host, proxy.port)
    bad.send(b"\x00\xff garbage\r\n" * 5 + b"a LOGIN {99999999}\r\n" + b"x" * 20000)
    assert good.command(b"s", b"SELECT INBOX")[-1].startswith(b"s OK")
    assert bad.is_closed()
    assert good.command(b"n", b"NOOP")[-1].startswith(b"n OK")
    good.close()
    bad.close()
