"""Load: thousands of open connections, a burst beyond cache_size, and a soak of mixed webmail
traffic with expiry racing reuse. Figures go to the run's summary."""

from __future__ import annotations

import os
import random
import re
import resource
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.client import RawClient, login
from tests.support.dovecot import DovecotInstance, User, make_message
from tests.support.polling import wait_until
from tests.support.proxy import ProxyProcess

HELD_CONNECTIONS = 5000
SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "120"))
SOAK_WORKERS = 8


def proc_status(pid: int, field_name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise KeyError(field_name)


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def raise_own_file_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, hard), hard))


def webmail_page(proxy: ProxyProcess, user: User) -> bool:
    """One page; every subject must name the user. Returns whether the session was reused."""
    client, replies = login(proxy.host, proxy.port, user.name, user.password)
    try:
        assert replies[-1].startswith(b"L1 OK"), replies
        assert client.command(b"s", b"SELECT INBOX")[-1].startswith(b"s OK")
        fetched = client.command(
            b"f", b"UID FETCH 1:* (UID FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])"
        )
        assert fetched[-1].startswith(b"f OK"), fetched[-1]
        subjects = re.findall(rb"Subject: ([^\r]*)", b"".join(fetched))
        assert subjects and all(s.startswith(user.name.encode()) for s in subjects), subjects
        assert client.command(b"z", b"LOGOUT")[-1] == b"z OK Completed\r\n"
        return replies[0].startswith(b"* OK [XPROXYREUSE]")
    finally:
        client.close()


def test_thousands_of_open_connections(
    start_proxy: Callable[..., ProxyProcess],
    make_user: Callable[..., User],
    report_figure: Callable[[str], None],
) -> None:
    raise_own_file_limit(HELD_CONNECTIONS + 500)
    proxy = start_proxy(client_login_timeout=300)
    assert proxy.process is not None
    pid = proxy.process.pid
    users = [make_user() for _ in range(4)]
    for user in users:  # their sessions are cached before and after: same descriptors
        webmail_page(proxy, user)
    rss_before, fds_before = proc_status(pid, "VmRSS"), open_fds(pid)
    held: list[socket.socket] = []
    try:
        for number in range(HELD_CONNECTIONS):
            sock = socket.create_connection((proxy.host, proxy.port), timeout=30)
            held.append(sock)
            if number % 500 == 0:  # webmail keeps working meanwhile
                webmail_page(proxy, users[number // 500 % len(users)])
        for sock in held:  # every one of them was served its greeting
            assert sock.recv(4096).startswith(b"* OK [CAPABILITY ")
        rss_held = proc_status(pid, "VmRSS")
        per_connection = (rss_held - rss_before) / HELD_CONNECTIONS
        report_figure(
            f"{HELD_CONNECTIONS} open client connections: proxy RSS {rss_before} -> {rss_held} KiB, "
            f"{per_connection:.1f} KiB per connection"
        )
        assert per_connection < 32  # the bound for an open client connection
        for user in users:
            webmail_page(proxy, user)
    finally:
        for sock in held:
            sock.close()
    assert wait_until(lambda: open_fds(pid) <= fds_before + 2, timeout=30)  # no fd leaked
    # the last page's connection may still be finishing its side
    assert wait_until(lambda: proxy.counters().CurrentClientConnections == 0, timeout=10)


def test_burst_beyond_cache_size(
    start_proxy: Callable[..., ProxyProcess], make_user: Callable[..., User]
) -> None:
    proxy = start_proxy(cache_size=5)
    users = [make_user() for _ in range(20)]
    results: dict[str, tuple[RawClient, list[bytes]]] = {}

    def log_in(user: User) -> None:
        results[user.name] = login(proxy.host, proxy.port, user.name, user.password)

    threads = [threading.Thread(target=log_in, args=(user,)) for user in users]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    replies = [r[1][-1] for r in results.values()]
    assert sum(r.startswith(b"L1 OK") for r in replies) == 5
    refused = [r for r in replies if not r.startswith(b"L1 OK")]
    assert (
        refused == [b"L1 NO [UNAVAILABLE] Proxy connection limit reached, try again later\r\n"] * 15
    )
    for client, reply in results.values():  # the five in session go on, then leave
        if reply[-1].startswith(b"L1 OK"):
            assert client.command(b"n", b"NOOP")[-1].startswith(b"n OK")
            client.command(b"z", b"LOGOUT")
        client.close()
    for user in users[:10]:  # service resumes: cached ones make room
        webmail_page(proxy, user)
    assert proxy.counters().TotalCapacityRefusals == 15


def test_client_connections_beyond_the_limit_get_a_polite_bye(
    start_proxy: Callable[..., ProxyProcess], user: User
) -> None:
    proxy = start_proxy(max_client_connections=3)
    held = [RawClient(proxy.host, proxy.port) for _ in range(3)]
    assert all(client.greeting.startswith(b"* OK") for client in held)
    refused = RawClient(proxy.host, proxy.port)
    assert refused.greeting == b"* BYE Too many connections, try again later\r\n"
    assert refused.is_closed()
    refused.close()
    assert held[0].command(b"n", b"NOOP") == [b"n OK Completed\r\n"]  # the others go on
    held.pop().close()
    assert wait_until(lambda: proxy.counters().CurrentClientConnections == 2, timeout=10)
    webmail_page(proxy, user)  # room again
    for client in held:
        client.close()
    assert "too many client connections (limit 3): refused 1" in proxy.log_text()


@dataclass
class SoakTally:
    pages: int = 0
    reused: int = 0
    aborted: int = 0
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def soak_page(proxy: ProxyProcess, user: User, rng: random.Random, tally: SoakTally) -> None:
    """A webmail page with some variety: flags, IDLE, or a client that vanishes mid-FETCH."""
    client, replies = login(proxy.host, proxy.port, user.name, user.password)
    try:
        assert replies[-1].startswith(b"L1 OK"), replies
        assert client.command(b"s", b"SELECT INBOX")[-1].startswith(b"s OK")
        if rng.random() < 0.1:  # the user closes the tab mid-FETCH
            client.send(b"f FETCH 1:* (BODY.PEEK[])\r\n")
            client.read_line()
            with tally.lock:
                tally.aborted += 1
            return
        fetched = client.command(
            b"f", b"UID FETCH 1:* (UID FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])"
        )
        assert fetched[-1].startswith(b"f OK"), fetched[-1]
        subjects = re.findall(rb"Subject: ([^\r]*)", b"".join(fetched))
        assert subjects and all(s.startswith(user.name.encode()) for s in subjects), "CROSS-USER"
        roll = rng.random()
        if roll < 0.2:
            assert client.command(b"st", b"STORE 1 FLAGS (\\Seen)")[-1].startswith(b"st OK")
        elif roll < 0.3:
            client.send(b"i IDLE\r\n")
            assert client.read_line().startswith(b"+ ")
            client.send(b"DONE\r\n")
            assert client.read_until_tagged(b"i")[-1].startswith(b"i OK")
        assert client.command(b"z", b"LOGOUT")[-1] == b"z OK Completed\r\n"
        with tally.lock:
            tally.pages += 1
            tally.reused += replies[0].startswith(b"* OK [XPROXYREUSE]")
    finally:
        client.close()


@pytest.mark.timeout(SOAK_SECONDS + 240)
def test_soak_expiry_racing_reuse(
    start_proxy: Callable[..., ProxyProcess],
    make_user: Callable[..., User],
    dovecot: DovecotInstance,
    report_figure: Callable[[str], None],
) -> None:
    proxy = start_proxy(enable_select_cache=True, cache_expiration_time=1, cache_size=48)
    users = [make_user(messages=3) for _ in range(30)]
    tally = SoakTally()
    deadline = time.monotonic() + SOAK_SECONDS

    # a few busy users and a long tail: the busy ones are reused, the tail's sessions expire
    # (cache_expiration_time 1) about when their next page comes, so expiry races reuse
    weights = [1 / (rank + 1) ** 1.5 for rank in range(len(users))]

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < deadline:
            user = rng.choices(users, weights)[0]
            try:
                soak_page(proxy, user, rng, tally)
            except Exception as error:  # collected: the test fails with all of them
                with tally.lock:
                    tally.errors.append(f"{user.name}: {error!r}")
            if rng.random() < 0.02:
                dovecot.deliver(user.name, make_message(f"{user.name} new mail"))

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(SOAK_WORKERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=SOAK_SECONDS + 120)
    counters = proxy.counters()
    report_figure(
        f"soak {SOAK_SECONDS:.0f} s: {tally.pages} pages, {tally.reused} reused, "
        f"{tally.aborted} aborted mid-FETCH, expired {counters.TotalServerConnectionsExpired}, "
        f"resynced {counters.TotalClientAbortsResynced}, dropped {counters.TotalServerConnectionsDropped}, "
        f"SELECT hits {counters.SelectCacheHits} of {counters.TotalSelectCommands}"
    )
    assert tally.errors == []
    assert tally.pages > 100 and tally.reused > 0 and counters.TotalServerConnectionsExpired > 0
