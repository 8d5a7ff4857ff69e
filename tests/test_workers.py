"""``workers N`` against Dovecot: user affinity, the totals, a dead worker, TLS clients, admin."""

from __future__ import annotations

import contextlib
import imaplib
import os
import signal
import ssl
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import gevent
import pytest
from gevent import socket as gsocket

from imapproxy import affinity, supervisor, worker_channel
from tests.support.client import RawClient, imaplib_reused
from tests.support.dovecot import User, free_port, wait_for_port
from tests.support.pki import write_pki
from tests.support.polling import wait_until
from tests.support.proxy import ProxyProcess

WORKERS = 2


def page(host: str, port: int, user: User, *, tls: ssl.SSLContext | None = None) -> bool:
    """Log in, select, fetch the user's own first message, log out; True if reused."""
    if tls is None:
        imap = imaplib.IMAP4(host, port, timeout=10)
    else:
        imap = imaplib.IMAP4_SSL(host, port, ssl_context=tls, timeout=10)
    imap.login(user.name, user.password)
    reused = imaplib_reused(imap)
    assert imap.select()[0] == "OK"
    status, data = imap.fetch("1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert status == "OK" and f"{user.name} message 1".encode() in data[0][1]  # type: ignore[index]
    imap.logout()
    return reused


@pytest.fixture
def users(make_user: Callable[..., User]) -> list[User]:
    """Users of both workers: whichever worker accepts a login, some are handed over."""
    found: list[User] = []
    owners: set[int] = set()
    for _ in range(40):
        user = make_user(messages=1)
        if len(found) < 6 or affinity.owner(user.name.encode(), WORKERS) not in owners:
            found.append(user)
            owners.add(affinity.owner(user.name.encode(), WORKERS))
        if len(found) >= 6 and owners == set(range(WORKERS)):
            return found
    raise AssertionError("no users for both workers")


def worker_pids(proxy: ProxyProcess) -> dict[int, int]:
    """Worker index -> pid, as the supervisor's log said last."""
    pids: dict[int, int] = {}
    for line in proxy.log_text().splitlines():
        if "supervisor: worker " in line and " started, pid " in line:
            words = line.split("supervisor: worker ", 1)[1].split()
            pids[int(words[0])] = int(words[3])
    return pids


def start_workers(start_proxy: Callable[..., ProxyProcess], **settings: object) -> ProxyProcess:
    proxy = start_proxy(workers=WORKERS, **settings)
    proxy.wait_for_log("normal server startup", timeout=20, count=WORKERS)
    return proxy


def test_a_users_second_page_is_a_reuse_whichever_worker_accepted_it(
    start_proxy: Callable[..., ProxyProcess], users: list[User]
) -> None:
    proxy = start_workers(start_proxy)
    assert len(worker_pids(proxy)) == WORKERS
    time.sleep(3 * supervisor.SAMPLE_INTERVAL_S)
    probes = proxy.counters().TotalClientConnectionsAccepted  # start-up's port check
    for round_number in range(3):
        for user in users:
            assert page(proxy.host, proxy.port, user) == (round_number > 0), user.name
    log = proxy.log_text()
    assert "handed to worker" in log  # some logins crossed: one owner was not the acceptor
    logins = 3 * len(users)

    def totals() -> tuple[int, ...]:
        c = proxy.counters()
        return (
            c.TotalClientLogins,
            c.TotalServerConnectionsCreated,
            c.TotalServerConnectionsReused,
            c.TotalClientConnectionsAccepted,
            c.CurrentClientConnections,
            c.RetainedServerConnections,
        )

    expected = (logins, len(users), logins - len(users), logins + probes, 0, len(users))
    assert wait_until(lambda: totals() == expected, timeout=5), totals()
    # Debian's pimpstat reads the totals (the file's first 72 bytes) as it reads up-imapproxy's
    shown = subprocess.run(
        ["/usr/sbin/pimpstat", "-c", "-f", str(proxy.config_path)],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout
    reused = logins - len(users)
    assert f" {logins} Total Client Logins\n {reused} Total Reused Connections\n" in shown
    per_worker = [proxy.counters().worker(i).TotalClientLogins for i in range(WORKERS)]
    assert sum(per_worker) == logins


def test_a_killed_worker_is_replaced_and_its_users_get_new_sessions(
    start_proxy: Callable[..., ProxyProcess], users: list[User]
) -> None:
    proxy = start_workers(start_proxy)
    for user in users:
        assert not page(proxy.host, proxy.port, user)
    victim = 1
    old = worker_pids(proxy)
    os.kill(old[victim], signal.SIGKILL)
    proxy.wait_for_log(f"worker {victim} (pid {old[victim]}) was killed by signal 9", timeout=10)
    assert wait_until(lambda: worker_pids(proxy)[victim] != old[victim], timeout=10)
    proxy.wait_for_log("normal server startup", timeout=20, count=WORKERS + 1)
    for user in users:
        owned_by_victim = affinity.owner(user.name.encode(), WORKERS) == victim
        assert page(proxy.host, proxy.port, user) == (not owned_by_victim), user.name
    assert wait_until(lambda: proxy.counters().WorkerRestarts == 1, timeout=5)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("pki")
    directory.chmod(0o755)
    return write_pki(directory)


def test_tls_clients_are_relayed_to_their_owner(
    start_proxy: Callable[..., ProxyProcess], users: list[User], pki: dict[str, Path]
) -> None:
    tls_port = free_port()
    proxy = start_workers(
        start_proxy,
        client_tls_cert_file=pki["server"],
        client_tls_key_file=pki["key"],
        client_tls_port=tls_port,
        client_starttls=True,
    )
    wait_for_port(proxy.host, tls_port)
    context = ssl.create_default_context(cafile=str(pki["ca"]))
    for round_number in range(2):
        for user in users:
            assert page("localhost", tls_port, user, tls=context) == (round_number > 0)
    # STARTTLS on the clear port, then a login owned by either worker
    for user in users:
        imap = imaplib.IMAP4("localhost", proxy.port, timeout=10)
        imap.starttls(ssl_context=context)
        imap.login(user.name, user.password)
        assert imaplib_reused(imap)
        assert imap.select()[0] == "OK"
        imap.logout()
    assert "handed to worker" in proxy.log_text()


def test_admin_commands_answer_for_every_worker(
    start_proxy: Callable[..., ProxyProcess], users: list[User]
) -> None:
    proxy = start_workers(start_proxy, enable_admin_commands=True)
    for user in users:
        page(proxy.host, proxy.port, user)
    with RawClient(proxy.host, proxy.port) as admin:
        replies = admin.command(b"a", b"XPROXY_DUMPICC")
    assert replies[-1] == b"a OK Completed\r\n"
    listed = {line.split()[3].decode() for line in replies[:-1]}
    assert listed == {user.name for user in users}
    with RawClient(proxy.host, proxy.port) as admin:
        assert admin.command(b"b", b"XPROXY_RESETCOUNTERS") == [b"b OK Counters reset\r\n"]
    assert wait_until(
        lambda: all(proxy.counters().worker(i).TotalClientLogins == 0 for i in range(WORKERS)),
        timeout=5,
    )


def test_sighup_reloads_and_sigterm_stops_every_worker(
    start_proxy: Callable[..., ProxyProcess], users: list[User]
) -> None:
    proxy = start_workers(start_proxy)
    pids = worker_pids(proxy)
    assert proxy.process is not None
    proxy.process.send_signal(signal.SIGHUP)
    proxy.wait_for_log("reload: nothing changed", timeout=10, count=WORKERS)
    assert page(proxy.host, proxy.port, users[0]) is False
    proxy.process.send_signal(signal.SIGUSR1)
    proxy.wait_for_log("workers restarted 0; worker 0 pid", timeout=10)
    assert page(proxy.host, proxy.port, users[0]) is True
    assert proxy.stop() == 0
    log = proxy.log_text()
    assert log.count("shutting down: logging out cached sessions") == WORKERS
    for pid in pids.values():
        assert (
            not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
        )


def test_any_worker_answers_a_scrape_for_the_whole_proxy(
    start_proxy: Callable[..., ProxyProcess], users: list[User]
) -> None:
    from tests.test_metrics import promtool, samples, scrape_text, value

    metrics_port = free_port()
    proxy = start_workers(start_proxy, metrics_listen=f"127.0.0.1:{metrics_port}")
    wait_for_port(proxy.host, metrics_port)
    for _ in range(2):
        for user in users:
            page(proxy.host, proxy.port, user)
    logins = 2 * len(users)
    for _ in range(6):  # whichever worker takes it
        status, text = scrape_text(metrics_port)
        assert status == 200
        found = samples(text)
        assert value(found, "imapproxy_client_logins_total") == logins
        assert value(found, "imapproxy_logins_total", outcome="reused") == len(users)
        assert value(found, "imapproxy_login_duration_seconds_count", session="new") == len(users)
        assert value(found, "imapproxy_server_sessions", state="cached") == len(users)
    promtool(text)


def test_trace_and_dumpicc_reach_every_worker_without_a_statistics_file(
    start_proxy: Callable[..., ProxyProcess], users: list[User]
) -> None:
    proxy = start_workers(start_proxy, enable_admin_commands=True, stat_filename=None)
    by_owner = {affinity.owner(user.name.encode(), WORKERS): user for user in users}
    for user in by_owner.values():
        with RawClient(proxy.host, proxy.port) as admin:
            enabled = admin.command(b"t", b"XPROXY_TRACE " + user.name.encode())
            assert enabled == [b"t OK Tracing enabled for user %s.\r\n" % user.name.encode()]
        page(proxy.host, proxy.port, user)
        with RawClient(proxy.host, proxy.port) as admin:
            assert admin.command(b"u", b"XPROXY_TRACE") == [b"u OK Tracing disabled\r\n"]
    trace = proxy.trace_path.read_text(errors="replace")
    for user in by_owner.values():  # each traced by its owner, whichever worker took the command
        assert f"{user.name} message 1" in trace
    with RawClient(proxy.host, proxy.port) as admin:
        replies = admin.command(b"a", b"XPROXY_DUMPICC")
    assert {line.split()[3].decode() for line in replies[:-1]} == {
        user.name for user in by_owner.values()
    }


def test_the_tls_relay_lets_go_of_a_client_that_reads_nothing() -> None:
    """A TLS client handed to its owner is carried by ``relay_tls_client``: one that neither
    sends nor reads what the owner sends holds the relay (its greenlet, its descriptors) only
    for the time limit of a send to it, not for as long as it stays connected."""
    client, client_end = gsocket.socketpair()  # the client's end never reads
    local, owner = gsocket.socketpair()

    def owner_sends() -> None:
        with contextlib.suppress(OSError):
            for _ in range(10_000):
                owner.sendall(b"x" * 65536)

    sending = gevent.spawn(owner_sends)
    started = time.monotonic()
    try:
        with gevent.Timeout(10, AssertionError("the relay waited on the client beyond its limit")):
            worker_channel.relay_tls_client(client, local, timeout=0.5)
        assert time.monotonic() - started < 5
    finally:
        sending.kill()
        for sock in (client, client_end, local, owner):
            sock.close()
