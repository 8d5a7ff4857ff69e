"""Behind a real HAProxy (PROXY protocol v1 and v2), and honest in a real Dovecot's log: the
client's address is the one from the header, or the real peer, or what a trusted webmail said,
in the proxy's log, admin_allow, the throttle, and Dovecot's ``rip=`` (login_trusted_networks).

Loopback has many addresses: test clients connect from 127.0.0.5 and up, HAProxy from
127.0.0.3 (the only address the proxy takes PROXY headers from), the proxy from 127.0.0.1.
"""

from __future__ import annotations

import re
import shutil
import socket
import ssl
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.client import RawClient
from tests.support.dovecot import DovecotInstance, free_port, running_dovecot, wait_for_port
from tests.support.haproxy import SOURCE, Route, running_haproxy
from tests.support.pki import write_pki
from tests.support.polling import wait_until
from tests.support.proxy import ProxyProcess
from tests.test_proxy_header import V2_LOCAL, v2_inet

pytestmark = pytest.mark.skipif(not shutil.which("haproxy"), reason="needs Debian haproxy")

USERS = {f"fwd{n:03d}": f"pw-fwd{n:03d}" for n in range(1, 41)}
_next_user = iter(USERS)


@pytest.fixture(scope="module")
def fwd_dovecot() -> Iterator[DovecotInstance]:
    """A Dovecot that believes the proxy's forwarding fields (the proxy is on 127.0.0.1)."""
    with running_dovecot(
        USERS, prefix="ipx-dovecot-fwd-", login_trusted_networks="127.0.0.1/32"
    ) as instance:
        yield instance


@pytest.fixture(scope="module")
def pki() -> Iterator[dict[str, Path]]:
    directory = Path(tempfile.mkdtemp(prefix="ipx-pki-"))
    directory.chmod(0o755)
    yield write_pki(directory)
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def fwd_proxy(
    start_proxy: Callable[..., ProxyProcess], fwd_dovecot: DovecotInstance
) -> Callable[..., ProxyProcess]:
    def start(**settings: object) -> ProxyProcess:
        settings.setdefault("proxy_protocol_trusted_networks", SOURCE)
        return start_proxy(fwd_dovecot, **settings)

    return start


def new_user() -> tuple[str, str]:
    name = next(_next_user)
    return name, USERS[name]


def login_lines(dovecot: DovecotInstance, user: str) -> list[str]:
    return [line for line in dovecot.log_text().splitlines() if f"Login: user=<{user}>" in line]


def login_line(dovecot: DovecotInstance, user: str) -> str:
    """Dovecot's last ``Login:`` line for ``user`` (it holds rip=, lip= and session=), once its
    log process has written it (a little after the client got its OK)."""
    assert wait_until(lambda: bool(login_lines(dovecot, user))), f"no Dovecot login of {user}"
    return login_lines(dovecot, user)[-1]


def log_in(client: RawClient, user: str, password: str) -> list[bytes]:
    replies = client.command(b"L", b'LOGIN "%s" "%s"' % (user.encode(), password.encode()))
    assert replies[-1].startswith(b"L OK"), replies
    return replies


def page(
    port: int, source: str, user: str, password: str, tls: ssl.SSLContext | None = None
) -> list[bytes]:
    """LOGIN and LOGOUT from ``source``; the LOGIN's replies."""
    with RawClient("127.0.0.1", port, tls=tls, source=source) as client:
        replies = log_in(client, user, password)
        client.command(b"Z", b"LOGOUT")
    return replies


def session_of(proxy_log: str, user: str, where: str) -> str:
    match = re.search(
        rf"LOGIN: '{user}' \({re.escape(where)}:\d+\) on new sd \[\d+\] session=<(\S+)>", proxy_log
    )
    assert match, proxy_log
    return match.group(1)


@pytest.mark.parametrize("send", ["send-proxy", "send-proxy-v2"])
def test_behind_haproxy_the_headers_address_is_the_clients(
    fwd_proxy: Callable[..., ProxyProcess], fwd_dovecot: DovecotInstance, send: str
) -> None:
    proxy = fwd_proxy()
    user, password = new_user()
    with running_haproxy([Route("imap", (proxy.host, proxy.port), send)]) as haproxy:
        page(haproxy.port("imap"), "127.0.0.5", user, password)
        log = proxy.wait_for_log(f"LOGIN: '{user}' (127.0.0.5:")
        session = session_of(log, user, "127.0.0.5")
        line = login_line(fwd_dovecot, user)
        assert "rip=127.0.0.5," in line and f"session=<{session}>" in line, line
        assert "lip=127.0.0.1," in line, line  # where the client connected: HAProxy's frontend
        # the cached session is reused by the next client, whose own address is logged
        assert page(haproxy.port("imap"), "127.0.0.6", user, password)[0].startswith(
            b"* OK [XPROXYREUSE]"
        )
        proxy.wait_for_log(f"LOGIN: '{user}' (127.0.0.6:")
        assert re.search(rf"LOGIN: '{user}' \(127\.0\.0\.6:\d+\) on existing sd", proxy.log_text())
    assert "PROXY header" not in proxy.log_text()


@pytest.mark.parametrize("send", ["send-proxy", "send-proxy-v2"])
def test_an_ipv6_client_behind_haproxy(
    fwd_proxy: Callable[..., ProxyProcess], fwd_dovecot: DovecotInstance, send: str
) -> None:
    proxy = fwd_proxy()
    user, password = new_user()
    route = Route("imap6", (proxy.host, proxy.port), send, bind="::1")
    with running_haproxy([route]) as haproxy, RawClient("::1", haproxy.port("imap6")) as client:
        log_in(client, user, password)  # HAProxy's header: TCP6 ::1
    proxy.wait_for_log(f"LOGIN: '{user}' ([::1]:")
    assert "rip=::1," in login_line(fwd_dovecot, user)


def test_implicit_tls_port_behind_haproxy(
    fwd_proxy: Callable[..., ProxyProcess], fwd_dovecot: DovecotInstance, pki: dict[str, Path]
) -> None:
    tls_port = free_port()
    proxy = fwd_proxy(
        client_tls_cert_file=pki["server"], client_tls_key_file=pki["key"], client_tls_port=tls_port
    )
    wait_for_port("127.0.0.1", tls_port)
    user, password = new_user()
    context = ssl.create_default_context(cafile=str(pki["ca"]))
    context.check_hostname = False  # the certificate names localhost and 127.0.0.2
    with running_haproxy([Route("imaps", (proxy.host, tls_port), "send-proxy-v2")]) as haproxy:
        page(haproxy.port("imaps"), "127.0.0.5", user, password, tls=context)
    assert "rip=127.0.0.5," in login_line(fwd_dovecot, user)


def test_haproxy_health_checks_send_local_and_get_the_greeting(
    fwd_proxy: Callable[..., ProxyProcess],
) -> None:
    proxy = fwd_proxy()
    route = Route("checked", (proxy.host, proxy.port), "send-proxy-v2", checked=True)
    with running_haproxy([route]) as haproxy:
        haproxy.wait_status("checked", "L7OK", field="check_status")  # it got "* OK"
        time.sleep(1)  # a few more checks
        assert haproxy.server_status("checked", "check_status") == "L7OK"
        assert haproxy.server_status("checked") == "UP"
    assert "PROXY header" not in proxy.log_text()


def raw_from(source: str, port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), 10, (source, 0))
    sock.settimeout(10)
    return sock


def closed_without_reply(sock: socket.socket) -> bool:
    """Closed, nothing sent (a reset when what the client sent was left unread)."""
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True


def test_a_trusted_sender_must_send_a_header_else_the_connection_ends(
    fwd_proxy: Callable[..., ProxyProcess], fwd_dovecot: DovecotInstance
) -> None:
    proxy = fwd_proxy()
    user, password = new_user()
    with raw_from(SOURCE, proxy.port) as sock:  # an IMAP client on HAProxy's address
        sock.sendall(b"a LOGIN x y\r\n")
        assert closed_without_reply(sock)
    proxy.wait_for_log(f"PROXY header from {SOURCE}:")
    assert "no PROXY protocol header" in proxy.log_text()
    with raw_from(SOURCE, proxy.port) as sock:  # LOCAL, as HAProxy's health checks: served
        sock.sendall(V2_LOCAL)
        assert sock.recv(100).startswith(b"* OK [CAPABILITY ")
    silent = raw_from(SOURCE, proxy.port)  # nothing at all: ends after HEADER_TIMEOUT_S
    started = time.monotonic()
    with RawClient("127.0.0.1", proxy.port, source="127.0.0.6") as other:  # unaffected
        log_in(other, user, password)
    assert closed_without_reply(silent)
    assert 2.5 < time.monotonic() - started < 8
    silent.close()
    proxy.wait_for_log("no whole PROXY header within 3 s")
    assert "rip=127.0.0.6," in login_line(fwd_dovecot, user)


def test_a_header_in_pieces_and_a_command_right_behind_it(
    fwd_proxy: Callable[..., ProxyProcess], fwd_dovecot: DovecotInstance
) -> None:
    proxy = fwd_proxy()
    user, password = new_user()
    header = b"PROXY TCP4 192.0.2.44 127.0.0.1 40001 143\r\n"
    with raw_from(SOURCE, proxy.port) as sock:
        for piece in (header[:3], header[3:20], header[20:]):  # the reader waits for the rest
            sock.sendall(piece)
            time.sleep(0.1)
        assert sock.recv(4096).startswith(b"* OK [CAPABILITY ")
    login = b'L LOGIN "%s" "%s"\r\n' % (user.encode(), password.encode())
    with raw_from(SOURCE, proxy.port) as sock:  # one segment: only the header is taken
        sock.sendall(v2_inet(("192.0.2.45", 40002), ("127.0.0.1", 143)) + login)
        reply = b""
        while b"L OK" not in reply and b"L NO" not in reply:
            chunk = sock.recv(4096)
            assert chunk, reply
            reply += chunk
        assert reply.startswith(b"* OK [CAPABILITY ") and b"L OK" in reply, reply
    assert "rip=192.0.2.45," in login_line(fwd_dovecot, user)
    proxy.wait_for_log(f"LOGIN: '{user}' (192.0.2.45:40002) on new sd")


def test_a_header_from_an_untrusted_address_is_a_protocol_error(
    fwd_proxy: Callable[..., ProxyProcess], fwd_dovecot: DovecotInstance
) -> None:
    proxy = fwd_proxy()
    user, password = new_user()
    with RawClient("127.0.0.1", proxy.port, source="127.0.0.9") as client:
        assert client.greeting.startswith(b"* OK [CAPABILITY ")
        client.send(b"PROXY TCP4 192.0.2.1 192.0.2.2 1000 143\r\n")
        assert client.read_line() == b"PROXY BAD Please login first\r\n"
        client.send(v2_inet(("192.0.2.1", 1000), ("192.0.2.2", 143)) + b"\r\n")
        assert client.read_line() == b"* BAD Invalid tag\r\n"
        log_in(client, user, password)
    assert "rip=127.0.0.9," in login_line(fwd_dovecot, user)


def test_admin_allow_the_trace_and_the_throttle_see_the_headers_address(
    fwd_proxy: Callable[..., ProxyProcess],
) -> None:
    proxy = fwd_proxy(enable_admin_commands=True, admin_allow="127.0.0.5", auth_failure_delay=1)
    user, password = new_user()
    with running_haproxy([Route("imap", (proxy.host, proxy.port), "send-proxy")]) as haproxy:
        port = haproxy.port("imap")
        with RawClient("127.0.0.1", port, source="127.0.0.5") as admin:
            assert admin.command(b"v", b"XPROXY_VERSION")[-1] == b"v OK Completed\r\n"
            trace = admin.command(b"t", b"XPROXY_TRACE " + user.encode())
            assert trace[-1].startswith(b"t OK Tracing enabled")
        with RawClient("127.0.0.1", port, source="127.0.0.6") as other:
            assert other.command(b"v", b"XPROXY_VERSION") == [b"v BAD Unrecognized command\r\n"]
        page(port, "127.0.0.6", user, password)
        assert b"PROXY: LOGIN on new sd [" in proxy.trace_path.read_bytes()
        assert b" for client 127.0.0.6:" in proxy.trace_path.read_bytes()

        def failing_login(source: str, user: str) -> float:
            with RawClient("127.0.0.1", port, source=source) as client:
                started = time.monotonic()
                reply = client.command(b"L", b"LOGIN %s wrong" % user.encode())
                assert reply[-1].startswith(b"L NO [AUTHENTICATIONFAILED]"), reply
                return time.monotonic() - started

        # the delay doubles per failure of the same address (user names differ); another
        # address starts afresh, where HAProxy's own address would have had its third: 4 s
        assert 0.9 < failing_login("127.0.0.7", "nobody1") < 1.9
        assert 1.9 < failing_login("127.0.0.7", "nobody2") < 3.9
        assert 0.9 < failing_login("127.0.0.8", "nobody3") < 3.5


def test_the_real_peer_is_forwarded_without_a_header(
    fwd_proxy: Callable[..., ProxyProcess], fwd_dovecot: DovecotInstance
) -> None:
    proxy = fwd_proxy()
    user, password = new_user()
    page(proxy.port, "127.0.0.6", user, password)
    session = session_of(proxy.wait_for_log(f"LOGIN: '{user}'"), user, "127.0.0.6")
    line = login_line(fwd_dovecot, user)
    assert "rip=127.0.0.6," in line and f"session=<{session}>" in line, line


def id_then_login(port: int, source: str, user: str, password: str, fields: bytes) -> None:
    with RawClient("127.0.0.1", port, source=source) as client:
        assert client.command(b"i", b"ID " + fields)[-1] == b"i OK Completed\r\n"
        log_in(client, user, password)


def test_a_trusted_webmail_gives_its_users_address_an_untrusted_one_cannot(
    fwd_proxy: Callable[..., ProxyProcess], fwd_dovecot: DovecotInstance
) -> None:
    proxy = fwd_proxy(forward_trusted_networks="127.0.0.7")
    webmail, forger = new_user(), new_user()
    roundcube = b'("name" "Roundcube" "x-originating-ip" "203.0.113.9")'
    id_then_login(proxy.port, "127.0.0.7", *webmail, roundcube)
    assert "rip=203.0.113.9," in login_line(fwd_dovecot, webmail[0])
    forged = b'("name" "evil" "X-Originating-IP" "203.0.113.66" "x-session-id" "forged1")'
    id_then_login(proxy.port, "127.0.0.8", *forger, forged)
    assert "rip=127.0.0.8," in login_line(fwd_dovecot, forger[0])
    log = fwd_dovecot.log_text()
    assert "203.0.113.66" not in log and "forged1" not in log
    assert "name=evil" in log  # the rest of its ID did reach Dovecot (imap_id_log)


def test_forwarding_off_dovecot_sees_the_proxy(
    fwd_proxy: Callable[..., ProxyProcess], fwd_dovecot: DovecotInstance
) -> None:
    proxy = fwd_proxy(forward_client_address=False)
    user, password = new_user()
    page(proxy.port, "127.0.0.6", user, password)
    assert "rip=127.0.0.1," in login_line(fwd_dovecot, user)


def test_reuse_same_client_address(
    fwd_proxy: Callable[..., ProxyProcess], fwd_dovecot: DovecotInstance
) -> None:
    proxy = fwd_proxy(reuse_same_client_address=True)
    user, password = new_user()
    reused = b"* OK [XPROXYREUSE]"
    assert not page(proxy.port, "127.0.0.6", user, password)[0].startswith(reused)
    assert not page(proxy.port, "127.0.0.7", user, password)[0].startswith(reused)
    assert page(proxy.port, "127.0.0.6", user, password)[0].startswith(reused)
    assert page(proxy.port, "127.0.0.7", user, password)[0].startswith(reused)
    assert wait_until(lambda: len(login_lines(fwd_dovecot, user)) == 2)
    rips = [re.findall(r"rip=([0-9.]+),", line) for line in login_lines(fwd_dovecot, user)]
    assert rips == [["127.0.0.6"], ["127.0.0.7"]]
