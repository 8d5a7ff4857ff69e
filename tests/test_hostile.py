"""Hostile clients: slow, huge, malformed, pipelined, brute-forcing. Each case checks the exact
reply, bounded memory, and that a second client on the same proxy is unaffected."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.client import RawClient, login, page
from tests.support.dovecot import DovecotInstance, User
from tests.support.proxy import ProxyProcess


def rss_kib(proxy: ProxyProcess) -> int:
    assert proxy.process is not None
    status = Path(f"/proc/{proxy.process.pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS")))


def second_client_fine(proxy: ProxyProcess, user: User) -> None:
    page(proxy.host, proxy.port, user.name, user.password)


CASES: list[tuple[str, bytes, list[bytes], bool]] = [
    # name, what the client sends, the replies, whether the proxy closes the connection
    ("huge line", b"a NOOP " + b"x" * 100_000, [b"* BYE Command line too long\r\n"], True),
    ("huge literal", b"a LOGIN {4294967295}\r\n", [b"a BAD Literal too big\r\n"], False),
    (
        "huge non-synchronising literal",
        b"a LOGIN {9000+}\r\n",
        [b"* BYE Literal too big\r\n"],
        True,
    ),
    (
        "too many digits",
        b"a LOGIN {99999999999}\r\n",
        [b"a BAD Invalid characters in atom\r\n"],
        False,
    ),
    ("negative literal", b"a LOGIN {-5}\r\n", [b"a BAD Invalid characters in atom\r\n"], False),
    (
        "NUL in a quoted string",
        b'a LOGIN "al\x00ice" x\r\n',
        [b"a BAD NUL in quoted string\r\n"],
        False,
    ),
    ("NUL in an atom", b"a LOGIN al\x00ice x\r\n", [b"a BAD Expected a space\r\n"], False),
    ("8-bit tag", b"\xe9t\xe9 NOOP\r\n", [b"* BAD Invalid tag\r\n"], False),
    ("bare LF", b"a NOOP\n", [b"a OK Completed\r\n"], False),
    ("empty line", b"\r\n", [b"* BAD Invalid tag\r\n"], False),
    ("unknown command", b"a SELECT INBOX\r\n", [b"a BAD Please login first\r\n"], False),
    (
        "bad base64",
        b"a AUTHENTICATE PLAIN %%%\r\n",
        [b"a BAD Invalid base64 in AUTHENTICATE response\r\n"],
        False,
    ),
]


@pytest.mark.parametrize(
    ("sent", "replies", "closes"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_hostile_input_before_login(
    proxy: ProxyProcess, user: User, sent: bytes, replies: list[bytes], closes: bool
) -> None:
    with RawClient(proxy.host, proxy.port) as client:
        client.send(sent)
        assert [client.read_line() for _ in replies] == replies
        if closes:
            assert client.is_closed()
        else:
            assert client.command(b"n", b"NOOP") == [b"n OK Completed\r\n"]
    second_client_fine(proxy, user)


def test_bad_command_budget_disconnects(proxy: ProxyProcess, user: User) -> None:
    with RawClient(proxy.host, proxy.port) as client:
        client.send(b"a FOO\r\n" * 25)
        time.sleep(0.3)
        data = client.read_available()
        assert data.count(b"a BAD Please login first\r\n") == 20
        assert data.endswith(b"* BYE Too many invalid IMAP commands\r\n")
        assert client.is_closed()
    second_client_fine(proxy, user)


def test_garbage_without_newlines_costs_no_memory(proxy: ProxyProcess, user: User) -> None:
    before = rss_kib(proxy)
    clients = []
    for _ in range(20):
        client = RawClient(proxy.host, proxy.port)
        with contextlib.suppress(OSError):  # the proxy may hang up mid-way: fine
            client.send(b"\xff" * 1_000_000)
        clients.append(client)
    for client in clients:
        assert client.is_closed()
        client.close()
    assert rss_kib(proxy) - before < 8 * 1024  # 20 MB sent; the proxy keeps at most 16 KB each
    second_client_fine(proxy, user)


def test_slow_client_is_dropped_at_the_login_timeout(
    start_proxy: Callable[..., ProxyProcess], user: User
) -> None:
    proxy = start_proxy(client_login_timeout=3)
    with RawClient(proxy.host, proxy.port) as slow:
        started = time.monotonic()
        for byte in b"a LOGIN someone secret\r\n":  # one byte per 0.2 s: 5 s for the line
            try:
                slow.send(bytes([byte]))
            except OSError:
                break
            if time.monotonic() - started > 2:
                second_client_fine(proxy, user)  # others are served meanwhile
            time.sleep(0.2)
        assert slow.read_line() == b"* BYE Login timeout\r\n"
        assert 2.5 < time.monotonic() - started < 6


def test_unterminated_literal_times_out(
    start_proxy: Callable[..., ProxyProcess], user: User
) -> None:
    proxy = start_proxy(client_login_timeout=2)
    with RawClient(proxy.host, proxy.port) as client:
        client.send(b"a LOGIN {10}\r\n")
        assert client.read_line() == b"+ go ahead\r\n"
        client.send(b"abc")
        assert client.read_line() == b"* BYE Login timeout\r\n"
    second_client_fine(proxy, user)


def test_pipelined_commands_in_one_packet(proxy: ProxyProcess, user: User) -> None:
    with RawClient(proxy.host, proxy.port) as client:
        client.send(
            b'a NOOP\r\nb CAPABILITY\r\nc LOGIN %s "%s"\r\nd SELECT INBOX\r\ne NOOP\r\nf LOGOUT\r\n'
            % (user.name.encode(), user.password.encode())
        )
        replies = client.read_until_tagged(b"f")
        tags = [r.split(b" ")[0] for r in replies if not r.startswith(b"*")]
        assert tags == [b"a", b"b", b"c", b"d", b"e", b"f"]
        assert all(b" OK " in r for r in replies if not r.startswith(b"*"))


def test_command_during_pending_literal(proxy: ProxyProcess, user: User) -> None:
    """Data sent before the go-ahead counts as the literal; the session goes on."""
    with RawClient(proxy.host, proxy.port) as client:
        client.send(b"a LOGIN {5}\r\nb NOOP\r\n")
        assert client.read_line() == b"+ go ahead\r\n"
        assert client.read_line().startswith(b"a BAD ")  # "b NOO" was the user name, "P" junk
        assert client.command(b"n", b"NOOP") == [b"n OK Completed\r\n"]
    second_client_fine(proxy, user)


def test_huge_line_after_login(proxy: ProxyProcess, user: User) -> None:
    client, _ = login(proxy.host, proxy.port, user.name, user.password)
    client.send(b"a SEARCH " + b"x" * 70_000 + b"\r\n")
    assert client.read_line() == b"* BYE Command line too long\r\n"
    assert client.is_closed()
    client.close()
    second_client_fine(proxy, user)


def test_failed_logins_are_slowed_but_others_are_not(
    start_proxy: Callable[..., ProxyProcess],
    make_user: Callable[..., User],
    dovecot: DovecotInstance,
) -> None:
    proxy = start_proxy(auth_failure_delay=1)
    victim, other = make_user(), make_user()
    took = []
    for _ in range(2):
        started = time.monotonic()
        client, replies = login(proxy.host, proxy.port, victim.name, "wrong")
        client.close()
        assert replies == [b"L1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"]
        took.append(time.monotonic() - started)
    # at least our delays (1, 2 s); Dovecot adds its own penalty for failures from one address
    assert took[0] >= 1 and took[1] >= 2
    slow = threading.Thread(
        target=lambda: login(proxy.host, proxy.port, victim.name, "wrong")[0].close()
    )
    slow.start()  # the third failure waits 4 s...
    time.sleep(0.3)
    started = time.monotonic()
    second_client_fine(proxy, other)  # ...while another user logs in: nothing added by the proxy
    through_proxy = time.monotonic() - started
    started = time.monotonic()
    direct, replies = login(dovecot.host, dovecot.port, other.name, other.password)
    direct.close()
    direct_took = time.monotonic() - started  # Dovecot's own penalty for the shared address
    assert replies[-1].startswith(b"L1 OK")
    assert through_proxy < direct_took + 0.5
    slow.join(timeout=15)
