"""Faults: misbehaving backends (ScriptedBackend) and clients that vanish at every point (Dovecot).

Every case checks the client's reply, that the slot is freed (the counters return to zero),
and that another client is served meanwhile.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from imapproxy import stats
from tests.support.client import RawClient, assert_in_sync, logged_in, login
from tests.support.dovecot import DovecotInstance, User, make_message
from tests.support.proxy import ProxyProcess
from tests.support.scripted_backend import Conn, ScriptedBackend, serve_imap


def settle(
    proxy: ProxyProcess, *, active: int = 0, clients: int = 0, timeout: float = 10
) -> stats.Counters:
    """Wait until the gauges say so (the proxy finishes its side after the client's)."""
    deadline = time.monotonic() + timeout
    while True:
        c = proxy.counters()
        if (c.InUseServerConnections, c.CurrentClientConnections) == (active, clients):
            return c
        assert time.monotonic() < deadline, (c.InUseServerConnections, c.CurrentClientConnections)
        time.sleep(0.05)


def first_normal(fault: Callable[[Conn], None]) -> Callable[[Conn, int], None]:
    """Connection 0 is the proxy's start-up probe: answer it, then misbehave."""

    def script(conn: Conn, number: int) -> None:
        if number == 0:
            serve_imap(conn)
        else:
            fault(conn)

    return script


def scripted_proxy(
    start_proxy: Callable[..., ProxyProcess], backend: ScriptedBackend
) -> ProxyProcess:
    return start_proxy(
        (backend.host, backend.port),
        server_response_timeout=2,
        server_connect_timeout=2,
        enable_admin_commands=True,
    )


def bystander_ok(proxy: ProxyProcess) -> None:
    with RawClient(proxy.host, proxy.port) as other:
        assert other.command(b"n", b"NOOP") == [b"n OK Completed\r\n"]


FAULTS: dict[str, tuple[Callable[[Conn], None], bytes]] = {
    "never greets": (lambda c: c.hang(), b"NO [UNAVAILABLE] IMAP server did not respond in time"),
    "hangs mid-login": (
        lambda c: (serve_imap(c, stop_after=b"LOGIN"), c.hang()),
        b"NO [UNAVAILABLE] IMAP server did not respond in time",
    ),
    "half a line, then reset": (
        lambda c: (serve_imap(c, stop_after=b"LOGIN"), c.send(b"A0001 OK [CAPAB"), c.reset()),
        b"NO [UNAVAILABLE] IMAP server unavailable, try again later",
    ),
    "garbage": (
        lambda c: (c.send(b"\x00\xffthis is not IMAP\r\n"), c.hang()),
        b"NO [UNAVAILABLE] IMAP server failed to respond properly",
    ),
    "bye instead of greeting": (
        lambda c: c.send(b"* BYE Too many connections\r\n"),
        b"NO [UNAVAILABLE] IMAP server unavailable, try again later",
    ),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_backend_faults_during_login(start_proxy: Callable[..., ProxyProcess], fault: str) -> None:
    script, reply = FAULTS[fault]
    with ScriptedBackend(first_normal(script)) as backend:
        proxy = scripted_proxy(start_proxy, backend)
        waiting = RawClient(proxy.host, proxy.port)
        started = time.monotonic()
        waiting.send(b"L LOGIN alice secret\r\n")
        bystander_ok(proxy)  # while the login waits on the backend
        assert waiting.read_until_tagged(b"L") == [b"L " + reply + b"\r\n"]
        assert time.monotonic() - started < 8  # bounded by server_response_timeout
        assert waiting.command(b"n", b"NOOP") == [b"n OK Completed\r\n"]  # still served
        waiting.close()
        c = settle(proxy)
        assert (c.InUseServerConnections, c.RetainedServerConnections) == (0, 0)
        assert c.TotalLoginFailures == 1


def test_backend_bye_while_cached_is_invisible(start_proxy: Callable[..., ProxyProcess]) -> None:
    def script(conn: Conn, number: int) -> None:
        serve_imap(conn, stop_after=b"UNSELECT" if number == 1 else None)
        if number == 1:  # cached after the first page: the server logs it out on its own
            conn.send(b"* BYE Autologout; idle for too long\r\n")

    with ScriptedBackend(script) as backend:
        proxy = scripted_proxy(start_proxy, backend)
        client, replies = login(proxy.host, proxy.port, "alice", "secret")
        client.command(b"s", b"SELECT INBOX")
        client.send(b"z LOGOUT\r\n")
        client.close()
        time.sleep(0.5)
        client, replies = login(proxy.host, proxy.port, "alice", "secret")
        assert replies[-1].startswith(b"L1 OK") and not replies[0].startswith(b"* OK [XPROXYREUSE]")
        assert client.command(b"n", b"NOOP")[-1] == b"n OK done\r\n"
        client.close()
        assert backend.connections == 3


@pytest.mark.parametrize(
    ("sent", "client_gets"),
    [
        # at a response's end: the client is told
        (
            b"* 1 FETCH (FLAGS ())\r\n",
            b"* 1 FETCH (FLAGS ())\r\n* BYE IMAP server connection lost\r\n",
        ),
        # in a literal, or a line: a BYE would become the message's last bytes or the line's
        # end, so the client sees only the connection close, and a reply cut short
        (b"* 1 FETCH (BODY[] {5}\r\nab", b"* 1 FETCH (BODY[] {5}\r\nab"),
        (b"* 1 FETCH (FLAGS (\\Se", b"* 1 FETCH (FLAGS (\\Se"),
    ],
)
def test_backend_lost_mid_session_byes_the_client_only_between_responses(
    start_proxy: Callable[..., ProxyProcess], sent: bytes, client_gets: bytes
) -> None:
    def script(conn: Conn, number: int) -> None:
        if serve_imap(conn, stop_after=b"FETCH" if number else None):
            conn.send(sent)
            conn.reset()

    with ScriptedBackend(script) as backend:
        proxy = scripted_proxy(start_proxy, backend)
        client, _ = login(proxy.host, proxy.port, "alice", "secret")
        client.send(b"f FETCH 1 BODY[]\r\n")
        assert client.is_closed()
        assert client.buffer.endswith(client_gets), client.buffer
        client.close()
        c = settle(proxy)
        assert c.RetainedServerConnections == 0 and c.TotalServerConnectionsDropped == 1


def test_session_failure_byes_the_client_without_detail(
    start_proxy: Callable[..., ProxyProcess],
) -> None:
    """The reason a session failed goes to the log; the client gets a fixed text."""

    def script(conn: Conn, number: int) -> None:
        if serve_imap(conn, stop_after=b"FETCH" if number else None):
            conn.send(b"* 1 FETCH (FLAGS ())\r\n")
            conn.hang()  # the completion never comes

    with ScriptedBackend(script) as backend:
        proxy = start_proxy((backend.host, backend.port), client_idle_timeout=2)
        client, _ = login(proxy.host, proxy.port, "alice", "secret")
        client.send(b"f FETCH 1 FLAGS\r\n")
        assert client.is_closed()
        assert client.buffer.endswith(b"\r\n* BYE IMAP session failed\r\n"), client.buffer
        client.close()
        assert "closing session: no reply from the server in time" in proxy.log_text()
        c = settle(proxy)
        assert c.RetainedServerConnections == 0 and c.TotalServerConnectionsDropped == 1


def test_greeting_without_capability_and_literal_login(
    start_proxy: Callable[..., ProxyProcess],
) -> None:
    """A server that needs CAPABILITY asked and synchronising literals (no LITERAL+)."""
    seen: list[bytes] = []

    def script(conn: Conn, number: int) -> None:
        conn.send(b"* OK plain server\r\n")
        while line := conn.read_line():
            seen.append(line)
            tag = line.split(b" ", 1)[0]
            if line.rstrip().endswith(b"}"):
                conn.send(b"+ ok\r\n")
            elif b"CAPABILITY" in line:
                conn.send(b"* CAPABILITY IMAP4rev1\r\n" + tag + b" OK\r\n")
            elif b"LOGOUT" in line:
                conn.send(tag + b" OK\r\n")
                return
            elif line.startswith(b"A0001") or seen[-2:-1] and seen[-2].endswith(b"}\r\n"):
                conn.send(b"A0001 OK in\r\n")
            else:
                conn.send(tag + b" OK\r\n")

    with ScriptedBackend(script) as backend:
        proxy = scripted_proxy(start_proxy, backend)
        with RawClient(proxy.host, proxy.port) as client:  # a literal user name, a quoted password
            client.send(b"L1 LOGIN {5}\r\n")
            assert client.read_line() == b"+ go ahead\r\n"
            client.send(b'alice "pa ss\\"\\\\word"\r\n')
            assert client.read_until_tagged(b"L1") == [b"L1 OK in\r\n"]
    assert b'A0001 LOGIN "alice" "pa ss\\"\\\\word"\r\n' in seen


# -- clients that vanish ----------------------------------------------------------------------------


def next_page_in_sync(proxy: ProxyProcess, user: User) -> None:
    client, _ = logged_in(proxy.host, proxy.port, user.name, user.password)
    assert_in_sync(client, user.name)
    client.command(b"z", b"LOGOUT")
    assert client.read_available() == b""
    client.close()


def vanish_during_login(client: RawClient) -> None:
    pass  # the LOGIN was sent by the caller; the client closes before the reply


def vanish_between_commands(client: RawClient) -> None:
    client.command(b"s", b"SELECT INBOX")


def vanish_mid_append_literal(client: RawClient) -> None:
    client.send(b"a APPEND INBOX {1000}\r\n")
    assert client.read_line().startswith(b"+ ")
    client.send(b"Subject: cut short\r\n")


def vanish_with_commands_in_flight(client: RawClient) -> None:
    client.command(b"s", b"SELECT INBOX")
    client.send(b"f1 FETCH 1:* (BODY.PEEK[])\r\nf2 SEARCH ALL\r\nf3 NOOP\r\n")


def vanish_mid_idle_before_continuation(client: RawClient) -> None:
    client.command(b"s", b"SELECT INBOX")
    client.send(b"i IDLE\r\n")


def vanish_after_done(client: RawClient) -> None:
    client.command(b"s", b"SELECT INBOX")
    client.send(b"i IDLE\r\n")
    assert client.read_line().startswith(b"+ ")
    client.send(b"DONE\r\n")


@pytest.mark.parametrize(
    "vanish",
    [
        vanish_during_login,
        vanish_between_commands,
        vanish_mid_append_literal,
        vanish_with_commands_in_flight,
        vanish_mid_idle_before_continuation,
        vanish_after_done,
    ],
)
def test_client_vanishes(
    proxy: ProxyProcess,
    make_user: Callable[..., User],
    dovecot: DovecotInstance,
    vanish: Callable[[RawClient], None],
) -> None:
    user = make_user()
    dovecot.deliver(user.name, make_message(f"{user.name} large", size=2 * 1024 * 1024))
    client = RawClient(proxy.host, proxy.port)
    client.send(b'L LOGIN %s "%s"\r\n' % (user.name.encode(), user.password.encode()))
    if vanish is not vanish_during_login:
        client.read_until_tagged(b"L")
    vanish(client)
    client.close()
    c = settle(proxy)
    assert c.TotalServerConnectionsDropped + c.RetainedServerConnections == 1
    next_page_in_sync(proxy, user)
    settle(proxy)
