"""XPROXY_* admin commands, admin_allow, the protocol trace and its redaction."""

from __future__ import annotations

import base64
import contextlib
import re
from collections.abc import Callable

import pytest

from imapproxy import __version__
from tests.support.client import RawClient, login
from tests.support.dovecot import User
from tests.support.proxy import ProxyProcess

ADMIN = [
    b"XPROXY_DUMPICC",
    b"XPROXY_TRACE alice",
    b"XPROXY_NEWLOG",
    b"XPROXY_RESETCOUNTERS",
    b"XPROXY_VERSION",
    b"XPROXY_STATUS",
]


def admin(proxy: ProxyProcess, command: bytes) -> list[bytes]:
    with RawClient(proxy.host, proxy.port) as client:
        return client.command(b"a", command)


@pytest.mark.parametrize(
    "settings", [{}, {"enable_admin_commands": True, "admin_allow": "10.0.0.0/8"}]
)
def test_admin_commands_refused_unless_enabled_and_allowed(
    start_proxy: Callable[..., ProxyProcess], settings: dict[str, object]
) -> None:
    proxy = start_proxy(**settings)
    for command in ADMIN:
        assert admin(proxy, command) == [b"a BAD Unrecognized command\r\n"]


def test_capability_says_ximapproxy(proxy: ProxyProcess) -> None:
    with RawClient(proxy.host, proxy.port) as client:
        assert b" XIMAPPROXY]" in client.greeting
        assert client.command(b"c", b"CAPABILITY")[0].rstrip().endswith(b" XIMAPPROXY")


def test_admin_commands(
    start_proxy: Callable[..., ProxyProcess], make_user: Callable[..., User]
) -> None:
    proxy = start_proxy(enable_admin_commands=True)
    alice, bob = make_user(), make_user()
    active, _ = login(proxy.host, proxy.port, alice.name, alice.password)
    cached, _ = login(proxy.host, proxy.port, bob.name, bob.password)
    cached.command(b"z", b"LOGOUT")
    cached.close()
    proxy.wait_for_log(f"LOGOUT: '{bob.name}'")
    dump = admin(proxy, b"XPROXY_DUMPICC")
    assert dump[-1] == b"a OK Completed\r\n"
    assert sorted(re.sub(rb" \d+ ", b" N ", line) for line in dump[:-1]) == sorted(
        [
            b"* XPROXY_DUMPICC N %s Active\r\n" % alice.name.encode(),
            b"* XPROXY_DUMPICC N %s Cached\r\n" % bob.name.encode(),
        ]
    )
    assert admin(proxy, b"XPROXY_VERSION") == [
        b"* XPROXY_VERSION %s\r\n" % __version__.encode(),
        b"a OK Completed\r\n",
    ]
    # a cleartext backend: TLS was never tried (test_tls.py has the failing and working ones)
    assert admin(proxy, b"XPROXY_STATUS") == [
        b"* XPROXY_STATUS BACKEND %s:%d TLS not tried\r\n"
        % (b"127.0.0.1", proxy.settings["server_port"]),
        b"a OK Completed\r\n",
    ]
    assert admin(proxy, b"xproxy_resetcounters") == [b"a OK Counters reset\r\n"]
    counters = proxy.counters()
    # at the reset: the active client and the admin connection (which may be gone by now)
    assert counters.TotalClientLogins == 0 and counters.PeakClientConnections == 2
    assert admin(proxy, b"XPROXY_NEWLOG") == [b"a OK Logfile cleared\r\n"]
    active.close()


def test_trace_records_and_never_holds_a_password(
    start_proxy: Callable[..., ProxyProcess], make_user: Callable[..., User]
) -> None:
    proxy = start_proxy(enable_admin_commands=True)
    user = make_user(password="Tr4ce-Secret-pw")
    secret = user.password.encode()
    name = user.name.encode()
    assert admin(proxy, b"XPROXY_TRACE " + name) == [
        b"a OK Tracing enabled for user %s.\r\n" % name
    ]
    assert admin(proxy, b"XPROXY_TRACE other") == [
        b"a BAD Tracing already enabled for user %s\r\n" % name
    ]
    plain = base64.b64encode(b"\0" + name + b"\0" + secret)
    logins = [
        b"L LOGIN %s %s\r\n" % (name, secret),
        b'L LOGIN "%s" "%s"\r\n' % (name, secret),
        b"L LOGIN %s {%d+}\r\n%s\r\n" % (name, len(secret), secret),
        b"L AUTHENTICATE PLAIN " + plain + b"\r\n",
    ]
    for number, login_line in enumerate(logins):
        client = RawClient(proxy.host, proxy.port)
        client.send(login_line)
        assert client.read_until_tagged(b"L")[-1].startswith(b"L OK")
        client.command(b"s", b"SELECT INBOX")
        client.command(b"f", b"FETCH 1 (BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        client.command(b"x", b"LOGIN %s %s" % (name, secret))  # refused by the backend
        client.command(b"w", b"AUTHENTICATE PLAIN " + plain)
        client.command(b"z", b"LOGOUT")
        client.close()
        proxy.wait_for_log(f"LOGOUT: '{user.name}' from server sd", count=number + 1)
    client, _ = login(proxy.host, proxy.port, user.name, user.password)
    # Dovecot does not read the literal of an unknown command: it takes the password for a
    # command of its own ("<password> BAD ..."), so the proxy sees a stray tag and drops the
    # session rather than caching it out of sync; the trace still holds no password.
    client.send(b"y LOGIN %s {%d+}\r\n%s\r\n" % (name, len(secret), secret))
    client.read_until_tagged(b"y")
    client.command(b"z", b"LOGOUT")
    client.close()
    proxy.wait_for_log("Invalidating server sd")
    trace = proxy.trace_path.read_bytes()
    assert re.search(rb"\n\n-----> C= \d+ %s CLIENT: sd \[\d+\]\ns SELECT INBOX\r\n" % name, trace)
    assert re.search(rb"\n\n-----> C= \d+ %s SERVER: sd \[\d+\]\n" % name, trace)
    assert b"x LOGIN <redacted>\r\n" in trace and b"w AUTHENTICATE <redacted>\r\n" in trace
    assert b"\ny LOGIN <redacted>\r\n" in trace
    assert b"PROXY: LOGIN on new sd [" in trace and b"PROXY: LOGIN on existing sd [" in trace
    assert b"PROXY: server data no longer traced" in trace
    assert f"{user.name} message 1".encode() in trace
    for form in (secret, plain, base64.b64encode(secret)):
        assert form not in trace
    assert secret.decode() not in proxy.log_text()
    assert admin(proxy, b"XPROXY_TRACE") == [b"a OK Tracing disabled\r\n"]
    assert admin(proxy, b"XPROXY_NEWLOG") == [b"a OK Logfile cleared\r\n"]
    assert proxy.trace_path.read_bytes() == b""


def test_trace_holds_no_password_from_malformed_or_hurried_commands(
    start_proxy: Callable[..., ProxyProcess], make_user: Callable[..., User]
) -> None:
    """After login, LOGIN lines the relay cannot parse and SASL or literal data sent before the
    server's go-ahead: the redactor does not trust the relay's reading of them."""
    proxy = start_proxy(enable_admin_commands=True)
    user = make_user(password="Hurried-Secret-pw")
    secret, name = user.password.encode(), user.name.encode()
    plain = base64.b64encode(b"\0" + name + b"\0" + secret)
    admin(proxy, b"XPROXY_TRACE " + name)
    hostile = [
        b"x+ LOGIN %s %s\r\n" % (name, secret),  # a bad tag
        b"y  LOGIN %s %s\r\n" % (name, secret),  # two spaces
        b"w AUTHENTICATE PLAIN\r\n" + plain + b"\r\n",  # the response before the "+"
        b"r LOGIN %s {%d}\r\n%s\r\n" % (name, len(secret), secret),  # the literal unasked
    ]
    for data in hostile:
        client, _ = login(proxy.host, proxy.port, user.name, user.password)
        client.send(data + b"n NOOP\r\n")
        with contextlib.suppress(ConnectionError, TimeoutError):
            client.read_until_tagged(b"n")
        client.close()
    trace = proxy.trace_path.read_bytes()
    assert trace.count(b"CLIENT: sd [") >= len(hostile)  # the lines were traced, redacted
    for form in (secret, plain):
        assert form not in trace
