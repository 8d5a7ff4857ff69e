"""TLS towards the backend (STARTTLS, port 993, verification) and towards clients, and the ways
of logging in (master user, SASL PLAIN to the backend, LOGIN then AUTHENTICATE reuse)."""

from __future__ import annotations

import base64
import contextlib
import imaplib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import gevent
import pytest
import trustme
from gevent import socket as gsocket

from imapproxy import keeper
from pimpstat.app import Monitor
from tests.conftest import MASTER_PASSWORD, MASTER_USER
from tests.support.client import RawClient, imaplib_reused, login
from tests.support.dovecot import DovecotInstance, User, free_port, make_message, running_dovecot
from tests.support.pki import write_pki
from tests.support.polling import wait_until
from tests.support.proxy import ProxyProcess, run_imapproxyd, service_identity, write_config


@pytest.fixture(scope="module")
def pki() -> Iterator[dict[str, Path]]:
    """``write_pki``'s files (the server certificate is not for ::1), and ``dir``."""
    directory = Path(tempfile.mkdtemp(prefix="ipx-pki-"))
    os.chmod(directory, 0o755)
    files = write_pki(directory)
    files["dir"] = directory
    yield files
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def tls_dovecot(pki: dict[str, Path]) -> Iterator[DovecotInstance]:
    """Dovecot with ssl = required: LOGINDISABLED until STARTTLS; port 993-style listener too.

    On 127.0.0.2 (and ::1): Dovecot counts a connection whose two ends have the same address as
    secured and would allow plaintext logins; from 127.0.0.1 to 127.0.0.2 it does not.
    """
    with running_dovecot(
        {"alice": "alice-pw"},
        prefix="ipx-dovecot-tls-",
        listen="127.0.0.2, ::1",
        ssl_cert=pki["server"],
        ssl_key=pki["key"],
        ssl_required=True,
    ) as instance:
        instance.deliver("alice", make_message("alice over TLS"))
        yield instance


def page(
    host: str,
    port: int,
    user: str,
    password: str,
    *,
    tls: ssl.SSLContext | None = None,
    starttls: ssl.SSLContext | None = None,
) -> bool:
    """Log in, select, fetch, log out; True if the session was reused."""
    imap = imaplib.IMAP4_SSL(host, port, ssl_context=tls) if tls else imaplib.IMAP4(host, port)
    if starttls is not None:
        imap.starttls(ssl_context=starttls)
    imap.login(user, password)
    reused = imaplib_reused(imap)
    assert imap.select()[0] == "OK"
    assert imap.fetch("1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")[0] == "OK"
    imap.logout()
    return reused


def verifying(pki: dict[str, Path], **extra: object) -> dict[str, object]:
    """Settings that verify the backend's certificate (chain and name) against our CA."""
    return {"tls_ca_file": pki["ca"], "tls_verify_server": True, **extra}


def test_starttls_to_a_backend_that_says_logindisabled(
    start_proxy: Callable[..., ProxyProcess], tls_dovecot: DovecotInstance, pki: dict[str, Path]
) -> None:
    proxy = start_proxy(("127.0.0.2", tls_dovecot.port), **verifying(pki))
    assert not page(proxy.host, proxy.port, "alice", "alice-pw")
    assert page(proxy.host, proxy.port, "alice", "alice-pw")
    assert (
        ", TLS, session=" in tls_dovecot.log_text().split("Login: user=<alice>")[-1].split("\n")[0]
    )


def test_a_failed_login_over_starttls_closes_its_server_connection_at_once(
    start_proxy: Callable[..., ProxyProcess], tls_dovecot: DovecotInstance, pki: dict[str, Path]
) -> None:
    """A wrong password on a STARTTLS session: the server connection (the TLS socket STARTTLS
    made) is closed when the login fails, not when the client's delayed NO is sent."""
    proxy = start_proxy(("127.0.0.2", tls_dovecot.port), auth_failure_delay=6, **verifying(pki))
    failed = threading.Event()

    def wrong_password() -> None:
        client = imaplib.IMAP4(proxy.host, proxy.port)
        with contextlib.suppress(imaplib.IMAP4.error):
            client.login("alice", "not-alice-pw")
        failed.set()
        client.shutdown()

    before = closed_after_failure(tls_dovecot)
    threading.Thread(target=wrong_password, daemon=True).start()
    assert wait_until(lambda: closed_after_failure(tls_dovecot) > before, timeout=4), (
        tls_dovecot.log_text()[-1500:]
    )
    assert not failed.is_set()  # the client still waits for its NO
    assert failed.wait(10)


def closed_after_failure(dovecot: DovecotInstance) -> int:
    """Dovecot's lines for a login connection closed after a failed authentication."""
    return len(re.findall(r"imap-login: .*Disconnected.*auth failed", dovecot.log_text()))


def test_implicit_tls_backend(
    start_proxy: Callable[..., ProxyProcess], tls_dovecot: DovecotInstance, pki: dict[str, Path]
) -> None:
    proxy = start_proxy(
        ("127.0.0.2", tls_dovecot.imaps_port),
        **verifying(pki, server_tls=True),
    )
    assert not page(proxy.host, proxy.port, "alice", "alice-pw")


@pytest.mark.parametrize(
    ("settings", "reason"),
    [
        ({"tls_ca_file": "other_ca"}, "certificate verify failed"),
        ({"server_hostname": "::1", "force_tls": True}, "IP address mismatch"),
    ],
)
def test_verification_failures_are_clear_errors(
    start_proxy: Callable[..., ProxyProcess],
    tls_dovecot: DovecotInstance,
    pki: dict[str, Path],
    settings: dict[str, object],
    reason: str,
) -> None:
    values = {k: pki.get(v, v) for k, v in settings.items()}  # type: ignore[index]
    proxy = start_proxy(("127.0.0.2", tls_dovecot.port), **verifying(pki, **values))
    client, replies = login(proxy.host, proxy.port, "alice", "alice-pw")
    client.close()
    assert replies == [b"L1 NO [UNAVAILABLE] Secure connection to IMAP server failed\r\n"]
    log = proxy.log_text()
    assert "LOGIN: 'alice' (127.0.0.1:" in log and reason in log


def tls_status(proxy: ProxyProcess) -> bytes:
    with RawClient(proxy.host, proxy.port) as raw:
        reply = raw.command(b"s", b"XPROXY_STATUS")
    assert reply[-1] == b"s OK Completed\r\n" and len(reply) == 2
    return reply[0]


def about_tls(proxy: ProxyProcess) -> str:
    """pimpstat's about view, from the statistics file, as its screen has it."""
    monitor = Monitor(str(proxy.config_path), str(proxy.stat_path), False, view="about")
    monitor.read(0.0)
    return next(row.value for row in monitor.rows() if row.label == "TLS with the IMAP server:")


UNKNOWN_CA = (
    "certificate verify failed: unable to get local issuer certificate "
    "(look at tls_ca_file or tls_ca_path (the CA of the server's certificate))"
)


def test_a_backend_tls_failure_is_said_loudly_once_and_kept_on_show(
    start_proxy: Callable[..., ProxyProcess],
    tls_dovecot: DovecotInstance,
    pki: dict[str, Path],
    user: User,
) -> None:
    """Wrong CA: one error line at start-up, however many logins fail; the reason in
    XPROXY_STATUS and pimpstat; a SIGHUP with the right CA says it works, at once."""
    proxy = start_proxy(
        ("127.0.0.2", tls_dovecot.port),
        **verifying(pki, tls_ca_file=pki["other_ca"], enable_admin_commands=True),
    )
    name = f"127.0.0.2:{tls_dovecot.port}"
    loud = f"TLS with IMAP server {name} fails: certificate verify failed: unable to get local "
    loud += "issuer certificate; look at tls_ca_file or tls_ca_path"
    proxy.wait_for_log(loud)
    for _ in range(3):
        client, replies = login(proxy.host, proxy.port, "alice", "alice-pw")
        client.close()
        assert replies == [b"L1 NO [UNAVAILABLE] Secure connection to IMAP server failed\r\n"]
    assert proxy.log_text().count(loud) == 1
    status = tls_status(proxy)
    assert status.startswith(f"* XPROXY_STATUS BACKEND {name} TLS failing: ".encode())
    assert UNKNOWN_CA.encode() + b" since 20" in status
    assert about_tls(proxy) == "failing: " + UNKNOWN_CA
    assert proxy.counters().backend_tls()[0] == 2

    proxy.settings["tls_ca_file"] = pki["ca"]
    write_config(proxy.config_path, proxy.settings)
    assert proxy.process is not None
    proxy.process.send_signal(signal.SIGHUP)
    proxy.wait_for_log(f"TLS with IMAP server {name} works (certificate and name verified)")
    assert tls_status(proxy).startswith(
        f"* XPROXY_STATUS BACKEND {name} TLS working since ".encode()
    )
    assert about_tls(proxy) == "working"
    assert not page(proxy.host, proxy.port, "alice", "alice-pw")


@pytest.mark.parametrize(
    ("settings", "status", "output"),
    [
        ({}, 0, "greeting read; TLS (STARTTLS) works, certificate and name verified"),
        (
            {"tls_verify_server": False, "tls_ca_file": "other_ca"},
            0,
            "certificate not verified: tls_verify_server is no",
        ),
        ({"tls_ca_file": "other_ca"}, 78, "TLS failing: " + UNKNOWN_CA),
        (
            {"server_hostname": "::1", "force_tls": True},
            78,
            "IP address mismatch, certificate is not valid for '::1'. (look at server_hostname",
        ),
        ({"server_port": "closed"}, 69, "cannot connect to"),
    ],
)
def test_check_config_connect(
    tmp_path: Path,
    tls_dovecot: DovecotInstance,
    pki: dict[str, Path],
    settings: dict[str, object],
    status: int,
    output: str,
) -> None:
    values: dict[str, object] = {"server_hostname": "127.0.0.2", "server_port": tls_dovecot.port}
    values.update(verifying(pki))
    values.update({k: pki.get(v, v) if isinstance(v, str) else v for k, v in settings.items()})  # type: ignore[call-overload]
    if values["server_port"] == "closed":
        values["server_port"] = free_port()
    conf = write_config(tmp_path / "imapproxy.conf", {**values, "connect_retries": 0})
    run = run_imapproxyd("-f", str(conf), "--check-config", "--connect")
    assert run.returncode == status, run.stderr
    assert output in (run.stdout.splitlines()[-1] if status == 0 else run.stderr)


def test_check_config_connect_to_a_cleartext_server(
    tmp_path: Path, dovecot: DovecotInstance
) -> None:
    conf = write_config(
        tmp_path / "c.conf", {"server_hostname": dovecot.host, "server_port": dovecot.port}
    )
    run = run_imapproxyd("-f", str(conf), "--check-config", "--connect")
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-1] == (
        f"connect: {dovecot.host}:{dovecot.port}: greeting read; no TLS: passwords go to the server in clear"
    )
    assert run_imapproxyd("-f", str(conf), "--connect").returncode == 2  # only with --check-config
    forced = write_config(
        tmp_path / "f.conf",
        {"server_hostname": dovecot.host, "server_port": dovecot.port, "force_tls": True},
    )
    run = run_imapproxyd("-f", str(forced), "--check-config", "--connect")
    assert run.returncode == 78
    assert run.stderr.startswith(
        f"in.imapproxyd: {dovecot.host}:{dovecot.port}: TLS failing: TLS is required but "
        "STARTTLS is not possible; refusing to send a password in clear (look at force_tls"
    )


def test_no_verification_accepts_an_unknown_ca(
    start_proxy: Callable[..., ProxyProcess], tls_dovecot: DovecotInstance, pki: dict[str, Path]
) -> None:
    proxy = start_proxy(
        ("127.0.0.2", tls_dovecot.port),
        **verifying(pki, tls_ca_file=pki["other_ca"], tls_verify_server=False),
    )
    assert not page(proxy.host, proxy.port, "alice", "alice-pw")


def test_client_certificate_to_the_backend(
    start_proxy: Callable[..., ProxyProcess], pki: dict[str, Path]
) -> None:
    """Dovecot that takes logins only with a client certificate from our CA."""
    with running_dovecot(
        {"alice": "alice-pw"},
        listen="127.0.0.2",
        ssl_cert=pki["server"],
        ssl_key=pki["key"],
        ssl_client_ca=pki["ca"],
    ) as backend:
        backend.deliver("alice", make_message("alice with a certificate"))
        address = ("127.0.0.2", backend.imaps_port)
        settings = verifying(pki, server_tls=True)
        anonymous = start_proxy(address, **settings)
        imap = imaplib.IMAP4(anonymous.host, anonymous.port)
        try:
            with pytest.raises(imaplib.IMAP4.error, match="present valid SSL certificate"):
                imap.login("alice", "alice-pw")  # Dovecot's own refusal, passed on
        finally:
            imap.shutdown()
        known = start_proxy(
            address, **settings, tls_cert_file=pki["client"], tls_key_file=pki["client_key"]
        )
        assert not page(known.host, known.port, "alice", "alice-pw")


def line_of(conf: Path, key: str) -> int:
    lines = conf.read_text().splitlines()
    return next(n for n, line in enumerate(lines, start=1) if line.split()[0] == key)


def tls_files_config(directory: Path, **files: object) -> Path:
    return write_config(
        directory / "imapproxy.conf",
        {
            "server_hostname": "127.0.0.1",
            "server_port": free_port(),
            "listen_port": free_port(),
            "stat_filename": directory / "stats",
            "protocol_log_filename": directory / "trace",
            "foreground_mode": True,
            **service_identity(),
            **files,
        },
    )


def test_a_key_that_does_not_match_its_certificate_stops_start_up(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    """The message names the setting's file and line, the key file and its certificate."""
    conf = tls_files_config(tmp_path, tls_cert_file=pki["client"], tls_key_file=pki["key"])
    expected = (
        f"{conf}:{line_of(conf, 'tls_key_file')}: tls_key_file: {pki['key']}: "
        f"the private key does not match the certificate {pki['client']}\n"
    )
    run = run_imapproxyd("-f", str(conf), "--check-config")
    assert (run.returncode, run.stdout, run.stderr) == (78, "", "in.imapproxyd: " + expected)
    run = run_imapproxyd("-f", str(conf))  # the log line at start-up says the same
    assert run.returncode == 78 and run.stderr.endswith("]: " + expected)


@pytest.mark.parametrize(
    ("files", "key", "reason"),
    [
        ({"client_tls_cert_file": "missing"}, "client_tls_cert_file", "No such file or directory"),
        (
            {"client_tls_cert_file": "garbage"},
            "client_tls_cert_file",
            "no valid PEM certificate in it",
        ),
        (
            {"client_tls_cert_file": "server", "client_tls_key_file": "garbage"},
            "client_tls_key_file",
            "no valid PEM private key in it",
        ),
        (
            {"client_tls_cert_file": "server", "client_tls_key_file": "client_key"},
            "client_tls_key_file",
            "the private key does not match the certificate {client_tls_cert_file}",
        ),
        (
            {
                "client_tls_cert_file": "server",
                "client_tls_key_file": "key",
                "client_tls_chain_file": "garbage",
            },
            "client_tls_chain_file",
            "no valid PEM certificate in it",
        ),
        ({"tls_ca_file": "garbage"}, "tls_ca_file", "no valid PEM certificate in it"),
        ({"tls_cert_file": "client"}, "tls_cert_file", "no valid PEM private key in it"),
    ],
)
def test_tls_file_errors_name_file_line_key_and_the_file(
    tmp_path: Path, pki: dict[str, Path], files: dict[str, str], key: str, reason: str
) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not PEM at all\n")
    named = {"missing": tmp_path / "missing.pem", "garbage": garbage}
    paths = {k: named.get(v) or pki[v] for k, v in files.items()}
    conf = tls_files_config(tmp_path, **paths)
    run = run_imapproxyd("-f", str(conf), "--check-config")
    assert run.returncode == 78
    where = f"{conf}:{line_of(conf, key)}: {key}: {paths[key]}: "
    assert run.stderr.rstrip("\n").endswith(where + reason.format(**paths)), run.stderr


def test_ciphers_error_names_file_line_and_key(tmp_path: Path, pki: dict[str, Path]) -> None:
    conf = tls_files_config(tmp_path, tls_ciphers="NONSENSE")
    run = run_imapproxyd("-f", str(conf), "--check-config")
    assert run.returncode == 78
    assert run.stderr == (
        f"in.imapproxyd: {conf}:{line_of(conf, 'tls_ciphers')}: tls_ciphers: "
        "No cipher can be selected.\n"
    )


def test_force_tls_without_starttls_refuses_to_send_the_password(
    start_proxy: Callable[..., ProxyProcess], user: User
) -> None:
    proxy = start_proxy(force_tls=True)  # the plain test Dovecot offers no STARTTLS
    client, replies = login(proxy.host, proxy.port, user.name, user.password)
    client.close()
    assert replies == [b"L1 NO [UNAVAILABLE] Secure connection to IMAP server failed\r\n"]
    assert "refusing to send a password in clear" in proxy.log_text()


# -- towards clients -------------------------------------------------------------------------------


def client_context(pki: dict[str, Path]) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki["ca"]))
    return context


@pytest.fixture
def tls_proxy(
    start_proxy: Callable[..., ProxyProcess], pki: dict[str, Path]
) -> Callable[..., ProxyProcess]:
    def start(**extra: object) -> ProxyProcess:
        tls_port = free_port()
        settings: dict[str, object] = {
            "client_tls_cert_file": pki["server"],
            "client_tls_key_file": pki["key"],
            "client_tls_port": tls_port,
            "client_starttls": True,
        }
        settings.update(extra)
        proxy = start_proxy(**settings)
        proxy.tls_port = tls_port  # type: ignore[attr-defined]
        from tests.support.dovecot import wait_for_port

        wait_for_port("127.0.0.1", tls_port)
        return proxy

    return start


def test_clients_over_implicit_tls_and_starttls(
    tls_proxy: Callable[..., ProxyProcess], pki: dict[str, Path], user: User
) -> None:
    proxy = tls_proxy()
    context = client_context(pki)
    assert not page("localhost", proxy.tls_port, user.name, user.password, tls=context)  # type: ignore[attr-defined]
    assert page("localhost", proxy.port, user.name, user.password, starttls=context)
    with RawClient(proxy.host, proxy.port) as raw:
        assert b" STARTTLS " in raw.greeting and b"LOGINDISABLED" not in raw.greeting
        # pipelined after STARTTLS: must be discarded, not run inside the TLS session
        raw.send(b"a STARTTLS\r\nb NOOP\r\n")
        assert raw.read_line() == b"a OK Begin TLS negotiation now\r\n"
        tls_sock = context.wrap_socket(raw.sock, server_hostname="localhost")
        tls_sock.settimeout(1)
        with pytest.raises(TimeoutError):
            tls_sock.recv(100)  # nothing: "b NOOP" was dropped
        tls_sock.sendall(b"c CAPABILITY\r\n")
        time.sleep(0.2)
        reply = tls_sock.recv(4096)
        assert reply.startswith(b"* CAPABILITY ") and b"STARTTLS" not in reply
        tls_sock.close()


def test_tls_required_before_login(
    tls_proxy: Callable[..., ProxyProcess], pki: dict[str, Path], user: User
) -> None:
    proxy = tls_proxy(client_tls_required=True)
    with RawClient(proxy.host, proxy.port) as raw:
        assert b" LOGINDISABLED " in raw.greeting and b"AUTH=PLAIN" not in raw.greeting
        reply = raw.command(b"a", b"LOGIN %s %s" % (user.name.encode(), user.password.encode()))
        assert reply == [
            b"a NO [PRIVACYREQUIRED] Plaintext authentication disallowed on non-secure connections\r\n"
        ]
    assert not page("localhost", proxy.port, user.name, user.password, starttls=client_context(pki))


def test_tls_required_refuses_authenticate_before_any_continuation(
    tls_proxy: Callable[..., ProxyProcess], pki: dict[str, Path], user: User
) -> None:
    """No "+" that would invite a password onto the cleartext connection, for any mechanism
    or a LOGIN literal; the connection stays usable, and another client is unaffected."""
    proxy = tls_proxy(client_tls_required=True)
    refused = (
        b" NO [PRIVACYREQUIRED] Plaintext authentication disallowed on non-secure connections\r\n"
    )
    with RawClient(proxy.host, proxy.port) as raw:
        for tag, command in (
            (b"a", b"AUTHENTICATE PLAIN"),
            (b"b", b"AUTHENTICATE LOGIN"),
            (b"c", b"AUTHENTICATE XOAUTH2"),
            (b"d", b"LOGIN {%d}" % len(user.name)),
        ):
            raw.send(tag + b" " + command + b"\r\n")
            assert raw.read_line() == tag + refused
        assert raw.command(b"e", b"NOOP") == [b"e OK Completed\r\n"]
        assert not page(
            "localhost", proxy.port, user.name, user.password, starttls=client_context(pki)
        )


def test_slow_tls_handshake_does_not_delay_others(
    tls_proxy: Callable[..., ProxyProcess], pki: dict[str, Path], user: User
) -> None:
    proxy = tls_proxy()
    stalled = [socket.create_connection(("127.0.0.1", proxy.tls_port)) for _ in range(20)]  # type: ignore[attr-defined]
    stalled[0].sendall(b"\x16\x03\x01")  # the start of a ClientHello, then nothing
    try:
        started = time.monotonic()
        page("localhost", proxy.tls_port, user.name, user.password, tls=client_context(pki))  # type: ignore[attr-defined]
        assert time.monotonic() - started < 2
    finally:
        for sock in stalled:
            sock.close()


def peer_certificate(port: int, context: ssl.SSLContext) -> bytes:
    sock = socket.create_connection(("127.0.0.1", port))
    with context.wrap_socket(sock, server_hostname="localhost") as tls_sock:
        der = tls_sock.getpeercert(binary_form=True)
        assert der is not None
        return der


def test_certificate_reload_on_sighup(
    tls_proxy: Callable[..., ProxyProcess], pki: dict[str, Path], user: User
) -> None:
    cert, key = pki["dir"] / "reload.pem", pki["dir"] / "reload.key"
    shutil.copy(pki["server"], cert)
    shutil.copy(pki["key"], key)
    proxy = tls_proxy(client_tls_cert_file=cert, client_tls_key_file=key)
    port = proxy.tls_port  # type: ignore[attr-defined]
    trusting = client_context(pki)
    before = peer_certificate(port, trusting)
    assert not page("localhost", proxy.port, user.name, user.password)
    renewed = trustme.CA().issue_cert("localhost")  # from a CA the test client does not trust
    renewed.cert_chain_pems[0].write_to_path(str(cert))
    renewed.private_key_pem.write_to_path(str(key))
    assert proxy.process is not None
    proxy.process.send_signal(signal.SIGHUP)
    proxy.wait_for_log("reload:")
    with pytest.raises(ssl.SSLCertVerificationError):  # the new certificate is the one served
        peer_certificate(port, trusting)
    unverified = ssl.create_default_context()
    unverified.check_hostname, unverified.verify_mode = False, ssl.CERT_NONE
    assert peer_certificate(port, unverified) != before
    assert page("localhost", proxy.port, user.name, user.password)  # the cached session survived


def children(pid: int) -> list[int]:
    tasks = Path(f"/proc/{pid}/task")
    found: list[int] = []
    for task in tasks.iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found


def uid_of(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])


def renew(live: Path, name: str, data: bytes, generation: int) -> None:
    """As certbot: a new file in archive/, then the live/ link moved to it atomically."""
    archive = live.parent / "archive"
    target = archive / f"{name}{generation}.pem"
    target.write_bytes(data)
    target.chmod(0o600)  # root's alone, as /etc/letsencrypt and /etc/ssl/private keep keys
    link = live / f"{name}.pem"
    temporary = live / f".{name}.tmp"
    temporary.symlink_to(target)
    temporary.replace(link)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (the drop to proc_username)")
def test_a_root_only_key_is_reloaded_after_the_privilege_drop(
    tls_proxy: Callable[..., ProxyProcess], pki: dict[str, Path], user: User
) -> None:
    """The relay runs as nobody and cannot read the key; SIGHUP loads the renewed pair all
    the same, through the privileged reader, which exits with the proxy."""
    base = Path(tempfile.mkdtemp(prefix="ipx-letsencrypt-"))
    try:
        base.chmod(0o755)
        live, archive = base / "live", base / "archive"
        live.mkdir()
        archive.mkdir(mode=0o700)  # as certbot's: only root gets in
        renew(live, "cert", pki["server"].read_bytes(), 1)
        renew(live, "key", pki["key"].read_bytes(), 1)
        proxy = tls_proxy(
            client_tls_cert_file=live / "cert.pem", client_tls_key_file=live / "key.pem"
        )
        assert proxy.process is not None
        relay = proxy.process.pid
        port = proxy.tls_port  # type: ignore[attr-defined]
        before = peer_certificate(port, client_context(pki))
        renewed = trustme.CA().issue_cert("localhost")
        renew(live, "cert", renewed.cert_chain_pems[0].bytes(), 2)
        renew(live, "key", renewed.private_key_pem.bytes(), 2)
        proxy.process.send_signal(signal.SIGHUP)
        log = proxy.wait_for_log("reload:")
        assert "TLS contexts kept" not in log and "Permission denied" not in log
        unverified = ssl.create_default_context()
        unverified.check_hostname, unverified.verify_mode = False, ssl.CERT_NONE
        assert (
            peer_certificate(port, unverified)
            == ssl.PEM_cert_to_DER_cert(renewed.cert_chain_pems[0].bytes().decode())
            != before
        )
        readers = [
            pid
            for pid in children(relay)
            if Path(f"/proc/{pid}/comm").read_text() == "imapproxy-files\n"
        ]
        assert uid_of(relay) == 65534 and [uid_of(pid) for pid in readers] == [0]
        assert not page("localhost", proxy.port, user.name, user.password)  # others unaffected
        proxy.stop()
        assert wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in readers))
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chroot)")
def test_a_chroot_without_proc_is_said_at_start_up_and_on_reload(
    tls_proxy: Callable[..., ProxyProcess], pki: dict[str, Path], user: User
) -> None:
    """Inside a chroot the relay loads certificates through /proc/self/fd: without /proc
    there, start-up warns, and a SIGHUP keeps the running contexts saying why."""
    chroot = Path(tempfile.mkdtemp(prefix="ipx-chroot-"))
    try:
        chroot.chmod(0o755)
        proxy = tls_proxy(chroot_directory=chroot)
        proxy.wait_for_log(
            f"chroot_directory {chroot} has no /proc/self/fd (no /proc mounted there): "
            "certificates and keys cannot be loaded again on SIGHUP; a restart loads renewed ones"
        )
        inside = chroot / str(proxy.config_path).lstrip("/")
        inside.parent.mkdir(parents=True)
        shutil.copy(proxy.config_path, inside)
        assert proxy.process is not None
        proxy.wait_for_log("normal server startup")  # SIGHUP is handled from then on
        proxy.process.send_signal(signal.SIGHUP)
        conf = proxy.config_path
        log = proxy.wait_for_log("TLS contexts kept")
        assert (
            f"reload: {conf}:{line_of(conf, 'client_tls_key_file')}: client_tls_key_file: "
            f"{pki['key']}: /proc/self/fd is missing (a chroot_directory without /proc?); "
            "TLS contexts kept"
        ) in log
        assert not page(
            "localhost", proxy.tls_port, user.name, user.password, tls=client_context(pki)
        )  # type: ignore[attr-defined]
    finally:
        shutil.rmtree(chroot, ignore_errors=True)


def test_the_privileged_reader_serves_only_files_its_configuration_names(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    conf = write_config(
        tmp_path / "imapproxy.conf",
        {
            "server_hostname": "localhost",
            "client_tls_cert_file": pki["server"],
            "client_tls_key_file": pki["key"],
        },
    )
    request = {
        "files": {
            "client_tls_key_file": str(pki["key"]),
            "client_tls_cert_file": "/etc/shadow",
            "proc_username": "/etc/passwd",
        }
    }
    reply = json.loads(keeper.answer(json.dumps(request).encode(), str(conf)))
    assert base64.b64decode(reply["client_tls_key_file"]["data"]) == pki["key"].read_bytes()
    assert reply["client_tls_cert_file"] == {"error": f"not the client_tls_cert_file of {conf}"}
    assert set(reply) == {"client_tls_key_file", "client_tls_cert_file"}
    assert json.loads(keeper.answer(b"nonsense", str(conf)))["error"].startswith(
        "malformed request"
    )


# -- ways of logging in ---------------------------------------------------------------------------


def test_login_then_authenticate_plain_reuse_one_session(proxy: ProxyProcess, user: User) -> None:
    assert not page(proxy.host, proxy.port, user.name, user.password)
    imap = imaplib.IMAP4(proxy.host, proxy.port)
    imap.authenticate("PLAIN", lambda _: f"\0{user.name}\0{user.password}".encode())
    assert imaplib_reused(imap)
    imap.logout()


def test_sasl_plain_to_the_backend(start_proxy: Callable[..., ProxyProcess], user: User) -> None:
    proxy = start_proxy(auth_sasl_mech="plain")
    assert not page(proxy.host, proxy.port, user.name, user.password)
    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
        imap = imaplib.IMAP4(proxy.host, proxy.port)
        try:
            imap.login(user.name, "wrong")
        finally:
            imap.shutdown()


def test_master_user_and_shared_secret(
    start_proxy: Callable[..., ProxyProcess], user: User, dovecot: DovecotInstance
) -> None:
    proxy = start_proxy(
        auth_sasl_plain_username=MASTER_USER,
        auth_sasl_plain_password=MASTER_PASSWORD,
        auth_shared_secret="Shared-S3cret",
        auth_failure_delay=0,
    )
    assert not page(proxy.host, proxy.port, user.name, "Shared-S3cret")
    assert f"Login: user=<{user.name}>, method=PLAIN" in dovecot.log_text()
    client, replies = login(proxy.host, proxy.port, user.name, user.password)  # the real password
    client.close()
    assert replies == [b"L1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"]
    assert "shared secret was wrong" in proxy.log_text()
    assert (
        "Shared-S3cret" not in proxy.log_text()
        and base64.b64encode(b"Shared-S3cret").decode() not in proxy.log_text()
    )

    # a new secret on SIGHUP: the old one no longer opens the session cached with it
    proxy.settings["auth_shared_secret"] = "New-S3cret"
    write_config(proxy.config_path, proxy.settings)
    assert proxy.process is not None
    proxy.process.send_signal(signal.SIGHUP)
    proxy.wait_for_log("reload: auth_shared_secret changed")
    client, replies = login(proxy.host, proxy.port, user.name, "Shared-S3cret")
    client.close()
    assert replies == [b"L1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"]
    assert not page(proxy.host, proxy.port, user.name, "New-S3cret")


def test_a_tls_session_to_the_server_is_logged_out_not_handed_over(
    start_proxy: Callable[..., ProxyProcess], tls_dovecot: DovecotInstance, pki: dict[str, Path]
) -> None:
    """Its keys live in the old process: it cannot move. The log says so; the successor opens
    a new session for the user's next login."""
    proxy = start_proxy(("127.0.0.2", tls_dovecot.port), **verifying(pki, force_tls=True))
    before = tls_dovecot.logouts("alice")
    assert not page(proxy.host, proxy.port, "alice", "alice-pw")
    proxy.wait_for_log("LOGOUT: 'alice' from server sd")
    successor = proxy.successor().start()
    try:
        assert proxy.process is not None and proxy.process.wait(timeout=30) == 0
        log = proxy.log_text()
        assert (
            "of 'alice' is on TLS to the server (its keys live in this process): logged out" in log
        )
        assert "is serving with 0 sessions from here" in log
        assert wait_until(lambda: tls_dovecot.logouts("alice") == before + 1)  # a clean LOGOUT
        assert not page(proxy.host, proxy.port, "alice", "alice-pw")
    finally:
        assert successor.stop() == 0


def test_a_late_answer_of_the_privileged_reader_never_answers_the_next_question(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The reader answered the first question after its time limit, in two parts: that answer
    is dropped when the second question reads, and the second gets its own."""
    monkeypatch.setattr(keeper, "REPLY_TIMEOUT_S", 0.3)
    ours, reader = gsocket.socketpair()
    asker = keeper.Keeper(ours, pid=4242)

    def reply(status: int) -> bytes:
        request = json.loads(keeper._receive(reader.recv, keeper.MAX_REQUEST_BYTES) or b"{}")
        body = json.dumps({"status": status, "id": request["id"]}).encode()
        return len(body).to_bytes(4, "big") + body

    with pytest.raises(keeper.KeeperError, match="did not answer"):
        asker.successor_status(1)
    late = reply(78)
    reader.sendall(late[:5])  # cut by the time limit: the rest comes with the next question
    answering = gevent.spawn(lambda: reader.sendall(late[5:] + reply(0)))
    assert asker.successor_status(2) == 0
    answering.join(timeout=5)
    reader.close()
    ours.close()
