"""Start-up, shutdown, dead backends and what reaches the logs, with real Dovecots."""

from __future__ import annotations

import base64
import contextlib
import imaplib
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from imapproxy.connection import format_address
from tests.support.client import RawClient, login, page
from tests.support.dovecot import DovecotInstance, User, free_port, running_dovecot
from tests.support.polling import wait_until
from tests.support.proxy import REPO, ProxyProcess, run_imapproxyd, service_identity, write_config


@pytest.fixture
def private_dovecot() -> Iterator[Callable[..., DovecotInstance]]:
    """Dovecots of a test's own, for tests that stop or restart them."""
    with contextlib.ExitStack() as stack:

        def start(listen: str = "127.0.0.1") -> DovecotInstance:
            users = {"alice": "alice-pw", "bob": "bob-pw"}
            return stack.enter_context(running_dovecot(users, listen=listen))

        yield start


def test_sigterm_logs_out_cached_sessions_and_exits(
    start_proxy: Callable[..., ProxyProcess], user: User, dovecot: DovecotInstance
) -> None:
    proxy = start_proxy()
    before = dovecot.logouts(user.name)
    page(proxy.host, proxy.port, user.name, user.password)
    proxy.wait_for_log(f"LOGOUT: '{user.name}' from server sd")
    started = time.monotonic()
    assert proxy.stop(signal.SIGTERM) == 0
    assert time.monotonic() - started < 5
    assert wait_until(lambda: dovecot.logouts(user.name) == before + 1)
    assert "shutting down: logging out cached sessions" in proxy.log_text()


def test_sigterm_gives_active_clients_a_bounded_wait(
    start_proxy: Callable[..., ProxyProcess], user: User
) -> None:
    proxy = start_proxy(shutdown_timeout=2)
    client, _ = login(proxy.host, proxy.port, user.name, user.password)
    started = time.monotonic()
    assert proxy.stop(signal.SIGINT) == 0
    assert 2 <= time.monotonic() - started < 6  # shutdown_timeout, then active sessions are cut
    assert client.is_closed(wait=1)
    client.close()


def test_pidfile_and_new_connections_refused_after_stop(
    tmp_path: Path, dovecot: DovecotInstance
) -> None:
    port = free_port()
    conf = write_config(
        tmp_path / "imapproxy.conf",
        {
            "server_hostname": dovecot.host,
            "server_port": dovecot.port,
            "listen_address": "127.0.0.1",
            "listen_port": port,
            "stat_filename": tmp_path / "stats",
            "protocol_log_filename": tmp_path / "trace",
            "foreground_mode": True,
            **service_identity(),
        },
    )
    pidfile = tmp_path / "imapproxy.pid"
    process = subprocess.Popen(
        [sys.executable, "-m", "imapproxy", "-f", str(conf), "-p", str(pidfile)],
        cwd=REPO,
        stderr=subprocess.PIPE,
    )
    try:
        assert wait_until(pidfile.exists)
        assert int(pidfile.read_text()) == process.pid
        with RawClient("127.0.0.1", port) as client:
            assert client.greeting.startswith(b"* OK [CAPABILITY IMAP4rev1 ")
    finally:
        process.terminate()
        assert process.wait(timeout=15) == 0
        assert process.stderr is not None
        process.stderr.close()


def test_backend_down_at_startup_exits_69(tmp_path: Path) -> None:
    conf = write_config(
        tmp_path / "imapproxy.conf",
        {
            "server_hostname": "127.0.0.1",
            "server_port": free_port(),
            "listen_port": free_port(),
            "connect_retries": 1,
            "connect_delay": 1,
            "stat_filename": tmp_path / "stats",
            "protocol_log_filename": tmp_path / "trace",
            "foreground_mode": True,
            **service_identity(),
        },
    )
    started = time.monotonic()
    run = run_imapproxyd("-f", str(conf))
    assert run.returncode == 69
    assert 1 <= time.monotonic() - started < 20
    assert "(attempt 2 of 2)" in run.stderr
    assert "giving up: IMAP server 127.0.0.1:" in run.stderr


def test_backend_up_during_startup_retries(
    tmp_path: Path, private_dovecot: Callable[..., DovecotInstance]
) -> None:
    backend = private_dovecot()
    backend.stop()
    proxy = ProxyProcess(tmp_path / "p", backend, connect_retries=10, connect_delay=1).start(
        wait=False
    )
    try:
        time.sleep(1.5)
        backend.start()
        from tests.support.dovecot import wait_for_port

        wait_for_port(proxy.host, proxy.port, timeout=15)
        page(proxy.host, proxy.port, "alice", "alice-pw")
    finally:
        proxy.stop()


def test_dead_cached_session_is_replaced_invisibly(
    start_proxy: Callable[..., ProxyProcess], user: User, dovecot: DovecotInstance
) -> None:
    proxy = start_proxy()
    page(proxy.host, proxy.port, user.name, user.password)
    proxy.wait_for_log(f"LOGOUT: '{user.name}' from server sd")
    dovecot.doveadm("kick", user.name)  # the backend drops the cached session
    logins = dovecot.logins(user.name)
    replies = page(proxy.host, proxy.port, user.name, user.password)
    assert not replies[0].startswith(b"* OK [XPROXYREUSE]")
    # Dovecot's log process writes the login line a moment after the login
    assert wait_until(lambda: dovecot.logins(user.name) == logins + 1, timeout=5)
    assert "is dead" in proxy.log_text()


@pytest.mark.parametrize("reuse_after_enable", [False, True])
def test_a_session_with_enable_is_not_handed_to_the_next_client(
    start_proxy: Callable[..., ProxyProcess],
    user: User,
    dovecot: DovecotInstance,
    reuse_after_enable: bool,
) -> None:
    """ENABLE CONDSTORE cannot be undone: the next client of the session would get MODSEQ in
    its FETCH replies unasked. So the session is logged out, not cached; unless the site says
    that its one webmail enables the same on every login (``reuse_after_enable``)."""
    proxy = start_proxy(reuse_after_enable=reuse_after_enable)
    client = imaplib.IMAP4(proxy.host, proxy.port)
    client.login(user.name, user.password)
    assert client.enable("CONDSTORE")[0] == "OK"
    client.logout()
    logins = dovecot.logins(user.name)
    replies = page(proxy.host, proxy.port, user.name, user.password)
    assert replies[0].startswith(b"* OK [XPROXYREUSE]") == reuse_after_enable
    assert wait_until(lambda: dovecot.logins(user.name) == logins + (not reuse_after_enable))
    if not reuse_after_enable:
        assert "ENABLE changed the connection for good" in proxy.log_text()
        assert page(proxy.host, proxy.port, user.name, user.password)[0].startswith(
            b"* OK [XPROXYREUSE]"  # the new session, without ENABLE, is cached
        )


def test_backend_restart_byes_active_clients_and_serves_new_ones(
    tmp_path: Path, private_dovecot: Callable[..., DovecotInstance]
) -> None:
    backend = private_dovecot()
    proxy = ProxyProcess(tmp_path / "p", backend).start()
    try:
        page(proxy.host, proxy.port, "bob", "bob-pw")  # cached
        active, _ = login(proxy.host, proxy.port, "alice", "alice-pw")
        backend.restart()
        assert active.is_closed()
        assert active.buffer.endswith(b"* BYE IMAP server connection lost\r\n")
        active.close()
        replies = page(
            proxy.host, proxy.port, "bob", "bob-pw"
        )  # the dead cached one is replaced, no error
        assert replies[-1].startswith(b"L1 OK")
        page(proxy.host, proxy.port, "alice", "alice-pw")
    finally:
        proxy.stop()


def test_client_id_is_replayed_on_new_and_reused_sessions(
    proxy: ProxyProcess, user: User, dovecot: DovecotInstance
) -> None:
    for round_ in range(2):
        client = RawClient(proxy.host, proxy.port)
        assert client.command(b"i", b'ID ("name" "test-webmail" "round" "%d")' % round_) == [
            b'* ID ("name" "imapproxy")\r\n',
            b"i OK Completed\r\n",
        ]
        reply = client.command(
            b"L", b'LOGIN %s "%s"' % (user.name.encode(), user.password.encode())
        )
        assert reply[-1].startswith(b"L OK")
        assert reply[0].startswith(b"* OK [XPROXYREUSE]") == bool(round_)
        client.command(b"z", b"LOGOUT")
        client.close()
        proxy.wait_for_log(f"LOGOUT: '{user.name}' from server sd")
    # before login on the new session (imap-login logs it), after login on the reused one
    assert wait_until(lambda: "ID sent: name=test-webmail, round=1" in dovecot.log_text())
    log = dovecot.log_text()
    # the new session's ID: the proxy's forwarding fields (forward_client_address), then the
    # client's own
    assert re.search(
        r"imap-login: Info: ID sent: x-originating-ip=127\.0\.0\.1, .*name=test-webmail, round=0",
        log,
    ), log
    # where the client connected: the listener's address, known without asking the kernel
    assert f"x-connected-ip=127.0.0.1, x-connected-port={proxy.port}," in log, log
    before_replay = log.split("ID sent: name=test-webmail, round=1")[0]
    assert f"imap({user.name})" in before_replay.rsplit("\n", 1)[-1]


def test_preauth_command(
    start_proxy: Callable[..., ProxyProcess], user: User, dovecot: DovecotInstance
) -> None:
    # Dovecot logs only a connection's first ID: with forward_client_address (the default)
    # that is the proxy's forwarding ID, and an ID in preauth_command is answered, not logged
    proxy = start_proxy(
        preauth_command=f'ID ("GUID" "preauth-{user.name}")', forward_client_address=False
    )
    page(proxy.host, proxy.port, user.name, user.password)
    assert wait_until(lambda: f"ID sent: GUID=preauth-{user.name}" in dovecot.log_text())
    forwarding = start_proxy(preauth_command='ID ("GUID" "preauth-forwarding")')
    page(forwarding.host, forwarding.port, user.name, user.password)  # the preauth ID got OK
    log = forwarding.wait_for_log(f"LOGIN: '{user.name}'")
    session = re.search(r"on new sd \[\d+\] session=<(\S+)>", log)
    assert session, log
    assert wait_until(lambda: f"x-session-id={session.group(1)}" in dovecot.log_text())


def test_no_password_reaches_the_log(
    start_proxy: Callable[..., ProxyProcess], make_user: Callable[..., User]
) -> None:
    proxy = start_proxy(syslog_prioritymask="LOG_DEBUG")
    user = make_user(password="Pa55-w0rd-Unique")
    secret = user.password.encode()
    client = RawClient(proxy.host, proxy.port)
    client.command(b"a", b"LOGIN %s %s" % (user.name.encode(), secret))  # atom
    client.command(b"b", b"LOGOUT")
    client.close()
    client = RawClient(proxy.host, proxy.port)
    client.send(
        b"a LOGIN " + user.name.encode() + b" {%d+}\r\n" % len(secret) + secret + b"x\r\n"
    )  # wrong, literal
    client.read_until_tagged(b"a")
    plain = base64.b64encode(b"\0" + user.name.encode() + b"\0" + secret)
    assert client.command(b"c", b"AUTHENTICATE PLAIN " + plain)[-1].startswith(b"c OK")
    client.command(b"d", b"LOGIN x " + secret)  # after login: goes to the backend
    client.close()
    log = proxy.log_text()
    assert f"LOGIN: '{user.name}'" in log
    for form in (secret, secret + b"x", plain, base64.b64encode(secret)):
        assert form.decode() not in log


def test_prelogin_timeout(start_proxy: Callable[..., ProxyProcess]) -> None:
    proxy = start_proxy(client_login_timeout=1)
    with RawClient(proxy.host, proxy.port) as client:
        started = time.monotonic()
        assert client.read_line() == b"* BYE Login timeout\r\n"
        assert 0.8 < time.monotonic() - started < 5
        assert client.is_closed()


def test_ipv6_listener_and_backend(
    tmp_path: Path, private_dovecot: Callable[..., DovecotInstance]
) -> None:
    backend = private_dovecot(listen="::1")
    proxy = ProxyProcess(tmp_path / "p", ("::1", backend.port), listen_address="::1")
    proxy.host = "::1"
    proxy.start()
    try:
        page(proxy.host, proxy.port, "alice", "alice-pw")
        replies = page(proxy.host, proxy.port, "alice", "alice-pw")
        assert replies[0].startswith(b"* OK [XPROXYREUSE]")
    finally:
        proxy.stop()
    log = proxy.log_text()  # IPv6 in brackets (RFC 3986 §3.2.2), in client and server names
    assert "LOGIN: 'alice' ([::1]:" in log and f"proxying to [::1]:{backend.port}" in log
    assert "(::1:" not in log


def test_addresses_in_logs() -> None:
    """IPv4 as up-imapproxy writes it; IPv6 bracketed; a dual-stack listener's IPv4 client
    (an IPv4-mapped IPv6 address) as IPv4."""
    assert format_address(("127.0.0.1", 45412)) == "127.0.0.1:45412"
    assert format_address(("::1", 45412, 0, 0)) == "[::1]:45412"
    assert format_address(("fe80::1%eth0", 143, 0, 2)) == "[fe80::1%eth0]:143"
    assert format_address(("::ffff:192.0.2.7", 5000, 0, 0)) == "192.0.2.7:5000"
