"""``python -m bench.tls_cost``: what TLS costs through imapproxy (its transport is gevent.ssl).

Measures, on loopback against a private Dovecot with a trustme certificate on 127.0.0.2:
client handshakes on the proxy's implicit-TLS port (latency, and the proxy's CPU for each);
new backend sessions over implicit TLS 1.3 against cleartext (``cache_expiration_time 0``, so
that every login opens one); a 10 MiB FETCH through the proxy with a cleartext and a TLS
backend. Prints the figures; everything it starts is stopped at the end.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.procstat import process_cpu_s
from tests.support.client import RawClient
from tests.support.dovecot import (
    DovecotInstance,
    free_port,
    make_message,
    running_dovecot,
    wait_for_port,
)
from tests.support.pki import write_pki
from tests.support.proxy import ProxyProcess

BIG_MIB = 10
HANDSHAKES = 300
LOGINS = 100


def proxy_cpu_seconds(proxy: ProxyProcess) -> float:
    assert proxy.process is not None
    return process_cpu_s(proxy.process.pid)


@contextmanager
def started(*proxies: ProxyProcess) -> Iterator[None]:
    try:
        for proxy in proxies:
            proxy.start()
        yield
    finally:
        for proxy in proxies:
            proxy.stop()


def fetch_mib_per_s(
    host: str, port: int, rounds: int = 8, tls: ssl.SSLContext | None = None
) -> float:
    """Median MiB/s of a whole-message FETCH of the big message, read as fast as possible."""
    client = RawClient(host, port, timeout=60, tls=tls)
    client.command(b"l", b"LOGIN u pw")
    client.command(b"s", b"SELECT INBOX")
    view = memoryview(bytearray(1 << 20))
    times = []
    for number in range(rounds):
        tag = b"f%d" % number
        started_at = time.perf_counter()
        client.sock.sendall(tag + b" FETCH 1 BODY.PEEK[]\r\n")
        total, tail = 0, b""
        while b"\r\n" + tag + b" OK" not in tail:
            count = client.sock.recv_into(view)
            total += count
            tail = (tail + bytes(view[max(0, count - 200) : count]))[-200:]
        times.append(time.perf_counter() - started_at)
        assert total > BIG_MIB << 20
    client.close()
    return BIG_MIB / statistics.median(times)


def handshakes(proxy: ProxyProcess, port: int, context: ssl.SSLContext) -> str:
    cpu_before, times, version = proxy_cpu_seconds(proxy), [], ""
    for _ in range(HANDSHAKES):
        sock = socket.create_connection(("127.0.0.1", port))
        started_at = time.perf_counter()
        with context.wrap_socket(sock, server_hostname="localhost") as tls_sock:
            tls_sock.recv(4096)  # the greeting
            times.append(time.perf_counter() - started_at)
            version = tls_sock.version() or ""
    cpu = (proxy_cpu_seconds(proxy) - cpu_before) / HANDSHAKES
    return (
        f"client TLS handshake and greeting ({version}): p50 "
        f"{statistics.median(times) * 1000:.2f} ms, proxy CPU {cpu * 1000:.2f} ms each"
    )


def new_sessions(proxy: ProxyProcess, name: str) -> str:
    cpu_before, times = proxy_cpu_seconds(proxy), []
    for _ in range(LOGINS):
        client = RawClient(proxy.host, proxy.port)
        started_at = time.perf_counter()
        client.command(b"l", b"LOGIN u pw")
        times.append(time.perf_counter() - started_at)
        client.command(b"z", b"LOGOUT")
        client.close()
    cpu = (proxy_cpu_seconds(proxy) - cpu_before) / LOGINS
    return (
        f"new backend session ({name}): login p50 {statistics.median(times) * 1000:.2f} ms, "
        f"proxy CPU {cpu * 1000:.2f} ms per login"
    )


def measure(root: Path) -> None:
    pki = write_pki(root)
    with running_dovecot(
        {"u": "pw"}, listen="127.0.0.2", ssl_cert=pki["server"], ssl_key=pki["key"], fast=True
    ) as dovecot:
        dovecot.deliver("u", make_message("big", size=BIG_MIB << 20))
        measure_proxies(root, dovecot, pki)


def measure_proxies(root: Path, dovecot: DovecotInstance, pki: dict[str, Path]) -> None:
    common = {
        "server_hostname": "127.0.0.2",
        "tls_ca_file": pki["ca"],
        "tls_verify_server": True,
        "cache_size": 50,
    }
    implicit = {"server_port": dovecot.imaps_port, "server_tls": True}
    tls_port = free_port()
    clear = ProxyProcess(root / "clear", ("127.0.0.2", dovecot.port), **common)
    tls = ProxyProcess(
        root / "tls",
        ("127.0.0.2", dovecot.imaps_port),
        **common,
        **implicit,
        client_tls_cert_file=pki["server"],
        client_tls_key_file=pki["key"],
        client_tls_port=tls_port,
    )
    with started(clear, tls):
        wait_for_port("127.0.0.1", tls_port)
        direct_tls = fetch_mib_per_s(
            "127.0.0.2", dovecot.imaps_port, tls=ssl.create_default_context(cafile=str(pki["ca"]))
        )
        print(f"10 MiB FETCH from Dovecot directly over TLS 1.3: {direct_tls:.0f} MiB/s")
        print(
            "10 MiB FETCH through the proxy, cleartext backend: "
            f"{fetch_mib_per_s(clear.host, clear.port):.0f} MiB/s"
        )
        print(
            "10 MiB FETCH through the proxy, TLS 1.3 backend: "
            f"{fetch_mib_per_s(tls.host, tls.port):.0f} MiB/s"
        )
        print(handshakes(tls, tls_port, ssl.create_default_context(cafile=str(pki["ca"]))))
    unshared = dict(common, cache_expiration_time=0)
    clear = ProxyProcess(root / "clear0", ("127.0.0.2", dovecot.port), **unshared)
    tls = ProxyProcess(root / "tls0", ("127.0.0.2", dovecot.imaps_port), **unshared, **implicit)
    with started(clear, tls):
        print(new_sessions(clear, "cleartext"))
        print(new_sessions(tls, "implicit TLS 1.3"))


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="imapproxy-tls-cost-"))
    root.chmod(0o755)
    try:
        measure(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
