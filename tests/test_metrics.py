"""The Prometheus endpoint, scraped during a load against a real Dovecot: its values against
the statistics file and what the load did, ``promtool check metrics`` on its output, access."""

from __future__ import annotations

import contextlib
import http.client
import platform
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families

from imapproxy.metrics import STATS_COUNTERS
from tests.support.client import RawClient, login, page
from tests.support.dovecot import User, free_port
from tests.support.polling import wait_until
from tests.support.proxy import ProxyProcess

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape_text(port: int, source: str = "127.0.0.1", path: str = "/metrics") -> tuple[int, str]:
    connection = http.client.HTTPConnection(
        "127.0.0.1", port, timeout=10, source_address=(source, 0)
    )
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def samples(text: str) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(found: Samples, name: str, **labels: str) -> float:
    return found[(name, tuple(sorted(labels.items())))]


@pytest.fixture
def metrics_proxy(
    start_proxy: Callable[..., ProxyProcess],
) -> Callable[..., tuple[ProxyProcess, int]]:
    """A proxy with metrics_listen, and the metrics port."""

    def start(**settings: object) -> tuple[ProxyProcess, int]:
        port = free_port()
        proxy = start_proxy(metrics_listen=f"127.0.0.1:{port}", **settings)
        proxy.wait_for_log("metrics: http://127.0.0.1:")
        return proxy, port

    return start


PAGES_PER_WORKER = 8
WORKERS = 6


def test_scraped_during_a_load_the_values_are_the_stats_files_and_the_loads(
    metrics_proxy: Callable[..., tuple[ProxyProcess, int]], make_user: Callable[..., User]
) -> None:
    proxy, port = metrics_proxy(enable_select_cache=True, auth_failure_delay=1)
    users = [make_user(messages=1) for _ in range(3)]
    errors: list[BaseException] = []

    def work(user: User) -> None:
        try:
            for _ in range(PAGES_PER_WORKER):
                page(proxy.host, proxy.port, user.name, user.password)
        except BaseException as error:  # reported below
            errors.append(error)

    def fail_twice() -> None:  # one failure, then one throttled (its reply waits twice as long)
        for _ in range(2):
            client, replies = login(proxy.host, proxy.port, users[0].name, "wrong")
            client.close()
            assert replies[-1].startswith(b"L1 NO [AUTHENTICATIONFAILED]")

    threads = [threading.Thread(target=work, args=(users[n % 3],)) for n in range(WORKERS)]
    threads.append(threading.Thread(target=fail_twice))
    for thread in threads:
        thread.start()
    scrapes, slowest, previous = 0, 0.0, None
    while any(thread.is_alive() for thread in threads):
        started = time.monotonic()
        status, text = scrape_text(port)
        slowest = max(slowest, time.monotonic() - started)
        assert status == 200
        found = samples(text)
        if previous is not None:  # counters never go back (nothing resets them here)
            for key, number in found.items():
                if key[0].endswith(("_total", "_count", "_bucket", "_sum")):
                    assert number >= previous.get(key, 0), key
        previous, scrapes = found, scrapes + 1
        time.sleep(0.05)
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    assert scrapes >= 3 and slowest < 1.0, (scrapes, slowest)
    assert wait_until(lambda: proxy.counters().CurrentClientConnections == 0)

    status, text = scrape_text(port)
    found, counters = samples(text), proxy.counters()
    for name, (field, _) in STATS_COUNTERS.items():
        assert value(found, f"imapproxy_{name}_total") == getattr(counters, field), name
    assert value(found, "imapproxy_client_connections") == 0
    assert value(found, "imapproxy_server_sessions", state="cached") == (
        counters.RetainedServerConnections
    )
    assert value(found, "imapproxy_server_sessions_peak", state="active") == (
        counters.PeakInUseServerConnections
    )
    assert value(found, "imapproxy_start_time_seconds") == counters.StartTime
    pages = WORKERS * PAGES_PER_WORKER
    new, reused = (value(found, "imapproxy_logins_total", outcome=o) for o in ("new", "reused"))
    assert new + reused == pages and reused >= pages - WORKERS
    assert value(found, "imapproxy_logins_total", outcome="failed") == 1
    assert value(found, "imapproxy_logins_total", outcome="throttled") == 1
    assert value(found, "imapproxy_logins_total", outcome="refused") == 0
    assert value(found, "imapproxy_login_failures_total", kind="auth_rejected") == 2
    kinds = [v for (n, _), v in found.items() if n == "imapproxy_login_failures_total"]
    assert sum(kinds) == counters.TotalLoginFailures == 2
    assert counters.TotalClientLogins == pages + 2
    assert value(found, "imapproxy_login_duration_seconds_count", session="new") == new
    assert value(found, "imapproxy_login_duration_seconds_count", session="reused") == reused
    assert value(found, "imapproxy_backend_round_trip_seconds_count") == reused
    assert counters.TotalSelectCommands == pages
    assert counters.SelectCacheHits + counters.SelectCacheMisses > 0
    # every client sent at least its LOGIN, SELECT and LOGOUT, and got at least the greeting
    assert value(found, "imapproxy_client_received_bytes_total") > pages * 40
    assert value(found, "imapproxy_client_sent_bytes_total") > pages * 100
    assert value(found, "imapproxy_build_info", version="1.0.0", python=_python()) == 1
    # no user name, no address as a label (or anywhere)
    assert not any(user.name in text for user in users) and "127.0.0." not in text
    promtool(text)


def _python() -> str:
    return platform.python_version()


def promtool(text: str) -> None:
    binary = shutil.which("promtool")
    assert binary, "promtool (Debian prometheus) is needed"
    checked = subprocess.run(
        [binary, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert checked.returncode == 0 and not checked.stdout + checked.stderr, checked


def test_only_metrics_allow_may_scrape_and_only_metrics_is_served(
    metrics_proxy: Callable[..., tuple[ProxyProcess, int]], user: User
) -> None:
    proxy, port = metrics_proxy(metrics_allow="127.0.0.5")
    assert scrape_text(port, "127.0.0.1") == (403, "Forbidden\n")
    status, text = scrape_text(port, "127.0.0.5")
    assert status == 200 and "imapproxy_client_connections_accepted_total" in text
    assert scrape_text(port, "127.0.0.5", "/") == (404, "Not Found: try /metrics\n")
    with socket.create_connection(("127.0.0.1", port), 5, ("127.0.0.5", 0)):  # a silent one
        started = time.monotonic()
        assert scrape_text(port, "127.0.0.5")[0] == 200
        assert time.monotonic() - started < 2
    # the IMAP side goes on meanwhile
    page(proxy.host, proxy.port, user.name, user.password)
    with RawClient(proxy.host, proxy.port) as client:
        assert client.command(b"n", b"NOOP") == [b"n OK Completed\r\n"]


def test_a_proxy_header_refusal_is_counted(
    metrics_proxy: Callable[..., tuple[ProxyProcess, int]], user: User
) -> None:
    proxy, port = metrics_proxy(proxy_protocol_trusted_networks="127.0.0.4")
    with socket.create_connection((proxy.host, proxy.port), 5, ("127.0.0.4", 0)) as sock:
        sock.sendall(b"a LOGIN x y\r\n")
        sock.settimeout(5)
        with contextlib.suppress(ConnectionResetError):  # reset: our bytes were left unread
            assert sock.recv(10) == b""
    proxy.wait_for_log("PROXY header from 127.0.0.4:")
    found = samples(scrape_text(port)[1])
    assert value(found, "imapproxy_proxy_header_refusals_total") == 1
