"""What the benchmark measures: Dovecot, up-imapproxy, imapproxy and the floor relay, on loopback.

A ``Target`` is an address the load generator talks to and the process whose CPU and memory
we read (None for direct Dovecot). Both proxies get the same ``SHARED_SETTINGS``; each is
started twice, SELECT cache off and on. The floor relay (``bench.floor_relay``) is the least a
gevent relay can do, a reference for the bulk and NOOP workloads. Every process started here
is stopped by the ``ExitStack`` it was registered with, also on Ctrl-C or an exception.

The server over TLS (``direct_tls_target``, ``start_tls_proxies``): Dovecot direct over
implicit TLS (its 993-style listener), up-imapproxy with STARTTLS to Dovecot's cleartext port
(``force_tls yes``: it only uses TLS when told to or when the server advertises LOGINDISABLED,
README.ssl) and imapproxy with implicit TLS (``server_tls yes``) to the TLS port, both proxies
verifying Dovecot's certificate against the bench CA (``tls_verify_server yes``; imapproxy also
checks the name) and both with the SELECT cache on; the clients speak cleartext to the
proxies, as webmail on the same host does.

imapproxy's options (``start_option_proxies``, issues 11 and 12), each with the SELECT cache on
like ``ipx-on``, its reference: ``ipx-map`` routes every bench user by a ``route_map`` file and
``ipx-sql`` by SQLite (``route_sql_url``, ``route_cache_ttl`` at its default), each user by
its full login name to the bench Dovecot and no default server (``server_hostname`` unset),
so that a login the route source did not answer fails; ``ipx-pp`` has ``metrics_listen`` on and
trusts 127.0.0.1 for the PROXY protocol, so the load generator sends a v2 header first;
``ipx-proxy`` and ``ipx-metrics`` have one of the two each.

imapproxy's worker processes (``start_worker_proxies``, issue 13), SELECT cache on like
``ipx-on``: ``ipx-w1`` with ``workers 1`` (one process, as ``ipx-on``) and ``ipx-w2`` with
``workers 2`` (a supervisor and two worker processes on the same listener; a login accepted by
the worker that does not own the user is handed to the other, which its log says). Their CPU is
that of the whole process tree (``procstat.tree_times``), their counters the exact sums of
every worker's block of the statistics file (``stats.Counters.summed``).

Both start as root and drop to ``nobody``. up-imapproxy (``/usr/sbin/imapproxyd``) sets its
own descriptor limit to ``2 * cache_size + 10`` and listens with a backlog of 5.
imapproxy runs as ``python -m imapproxy`` from the repository, its soft descriptor limit raised
to the hard one (it does not raise its own). Without ``CAP_SYS_RESOURCE`` nobody can go past
the hard limit: it bounds the memory workload (``max_sessions``).
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import sqlite3
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bench.mailstore import BenchDovecot, BenchPki
from bench.plan import PROXY_CLIENT_ADDRESS, WORKER_TARGETS
from tests.support.dovecot import free_port, wait_for_port
from tests.support.proxy import write_config

REPO = Path(__file__).resolve().parents[1]
IMAPPROXYD = shutil.which("imapproxyd", path="/usr/sbin:/usr/local/sbin") or "/usr/sbin/imapproxyd"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0

# The settings both proxies share (up-imapproxy's defaults for the cache, INFO logging).
# Both start as root (up-imapproxy must, to set its descriptor limit) and drop to nobody.
SHARED_SETTINGS: dict[str, Any] = {
    "cache_size": 3072,
    "cache_expiration_time": 300,
    "syslog_prioritymask": "LOG_INFO",
    "foreground_mode": True,
    "proc_username": "nobody",
    "proc_groupname": "nogroup",
}


@dataclass(frozen=True)
class Target:
    """One thing to measure. ``key`` is unique; ``product`` is the report's column."""

    key: str
    product: str  # "Dovecot", "limit", "floor relay", "up-imapproxy", "imapproxy"
    host: str
    port: int
    pid: int | None = None  # the proxy process, for CPU and RSS
    select_cache: bool | None = None
    stat_path: Path | None = None  # imapproxy's statistics file (its BackendWaits)
    tls_ca_file: str = ""  # the client speaks implicit TLS to it, verified with this CA
    proxy_source: str = ""  # the client sends a PROXY v2 header naming this address first
    metrics_url: str = ""  # its Prometheus endpoint
    log_path: Path | None = None  # imapproxy's log (stderr): its hand-overs between workers


def start_dovecot(stack: contextlib.ExitStack, dovecot: BenchDovecot) -> BenchDovecot:
    dovecot.start()
    stack.callback(dovecot.stop)
    return dovecot


def dovecot_pid(dovecot: BenchDovecot) -> int:
    assert dovecot.process is not None
    return dovecot.process.pid


def direct_targets(dovecot: BenchDovecot) -> list[Target]:
    return [
        Target("dovecot", "Dovecot", dovecot.host, dovecot.port),
        Target("limit", "limit", dovecot.host, dovecot.port),
    ]


def direct_tls_target(dovecot: BenchDovecot, pki: BenchPki) -> Target:
    """Dovecot's implicit-TLS listener, to which the load generator speaks TLS itself."""
    return Target(
        "dovecot-tls", "Dovecot", dovecot.host, dovecot.imaps_port, tls_ca_file=str(pki.ca)
    )


def backend_tls_settings(product: str, dovecot: BenchDovecot, pki: BenchPki) -> dict[str, Any]:
    """How each proxy speaks TLS to Dovecot: STARTTLS (up-imapproxy) or implicit TLS."""
    verify = {"tls_ca_file": pki.ca, "tls_verify_server": True}
    if product == "up-imapproxy":  # STARTTLS on the cleartext port: its only way (README.ssl)
        return {**verify, "force_tls": True}
    return {**verify, "server_tls": True, "server_port": dovecot.imaps_port}


def start_tls_proxies(
    stack: contextlib.ExitStack, dovecot: BenchDovecot, pki: BenchPki, workdir: Path
) -> list[tuple[Target, subprocess.Popen[bytes]]]:
    """Both proxies with TLS to Dovecot and the SELECT cache on (keys ``up-tls``, ``ipx-tls``)."""
    started = []
    for product in ("up-imapproxy", "imapproxy"):
        key = f"{'up' if product == 'up-imapproxy' else 'ipx'}-tls"
        settings = backend_tls_settings(product, dovecot, pki)
        started.append(
            start_proxy(stack, product, dovecot, workdir, select_cache=True, key=key, **settings)
        )
    return started


ROUTE_QUERY = "SELECT host, port FROM routes WHERE login = :user"
NO_DEFAULT_SERVER = {"server_hostname": None, "server_port": None}  # every login routed


def write_routes(directory: Path, dovecot: BenchDovecot, users: list[str]) -> tuple[Path, Path]:
    """A route map and a SQLite table, each sending every user to ``dovecot`` by name.

    World-readable in a traversable directory: the proxy reads them as nobody.
    """
    directory.mkdir(parents=True)
    os.chmod(directory, 0o755)
    route_map = directory / "routes"
    server = f"{dovecot.host}:{dovecot.port}"
    route_map.write_text("".join(f"{user} {server}\n" for user in users), encoding="ascii")
    database = directory / "routes.db"
    with contextlib.closing(sqlite3.connect(database)) as db, db:
        db.execute("CREATE TABLE routes (login TEXT PRIMARY KEY, host TEXT, port INTEGER)")
        rows = [(user, dovecot.host, dovecot.port) for user in users]
        db.executemany("INSERT INTO routes VALUES (?, ?, ?)", rows)
    for path in (route_map, database):
        os.chmod(path, 0o644)
    return route_map, database


def start_option_proxies(
    stack: contextlib.ExitStack, dovecot: BenchDovecot, workdir: Path, users: list[str]
) -> list[tuple[Target, subprocess.Popen[bytes]]]:
    """imapproxy, SELECT cache on, routed by a map, by SQLite, with PROXY + metrics, and with
    each of those two alone (``ipx-proxy``, ``ipx-metrics``: which of them costs what)."""
    route_map, database = write_routes(workdir / "routes", dovecot, users)
    sql = {"route_sql_url": f"sqlite:///{database}", "route_sql_query": ROUTE_QUERY}
    started = [
        start_proxy(stack, "imapproxy", dovecot, workdir, select_cache=True, key=key, **settings)
        for key, settings in (
            ("ipx-map", {"route_map": route_map, **NO_DEFAULT_SERVER}),
            ("ipx-sql", {**sql, **NO_DEFAULT_SERVER}),
        )
    ]
    for key, proxy_protocol, metrics in (
        ("ipx-pp", True, True),
        ("ipx-proxy", True, False),
        ("ipx-metrics", False, True),
    ):
        started.append(start_edge_proxy(stack, dovecot, workdir, key, proxy_protocol, metrics))
    return started


def start_edge_proxy(
    stack: contextlib.ExitStack,
    dovecot: BenchDovecot,
    workdir: Path,
    key: str,
    proxy_protocol: bool,
    metrics: bool,
) -> tuple[Target, subprocess.Popen[bytes]]:
    """imapproxy, SELECT cache on, trusting 127.0.0.1 for the PROXY protocol and/or with
    ``metrics_listen`` on (waited for too)."""
    metrics_port = free_port() if metrics else 0
    target, process = start_proxy(
        stack,
        "imapproxy",
        dovecot,
        workdir,
        select_cache=True,
        key=key,
        proxy_protocol_trusted_networks="127.0.0.1" if proxy_protocol else None,
        metrics_listen=f"127.0.0.1:{metrics_port}" if metrics else None,
    )
    if metrics:
        try:
            wait_for_port("127.0.0.1", metrics_port, timeout=START_TIMEOUT_S)
        except TimeoutError:
            raise RuntimeError(f"{key}: metrics_listen {metrics_port} did not listen") from None
    url = f"http://127.0.0.1:{metrics_port}/metrics" if metrics else ""
    source = PROXY_CLIENT_ADDRESS if proxy_protocol else ""
    return replace(target, proxy_source=source, metrics_url=url), process


def nofile_hard_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


def max_sessions(wanted: int) -> int:
    """How many client connections a proxy can hold open, each with its backend session."""
    return min(wanted, (nofile_hard_limit() - 200) // 2)


def raise_soft_nofile() -> None:
    hard = nofile_hard_limit()
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def start_process(
    stack: contextlib.ExitStack, argv: list[str], log: Path
) -> subprocess.Popen[bytes]:
    """Start ``argv`` with its output in ``log``; registered to be stopped with the stack."""
    with open(log, "ab") as out:
        process = subprocess.Popen(
            argv, cwd=REPO, stdout=out, stderr=out, preexec_fn=raise_soft_nofile, env=proxy_env()
        )
    stack.callback(stop_process, process)
    return process


def proxy_env() -> dict[str, str]:
    return dict(os.environ, PYTHONUNBUFFERED="1")


def stop_process(process: subprocess.Popen[bytes], timeout_s: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM, then SIGKILL after ``timeout_s``."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def start_proxy(
    stack: contextlib.ExitStack,
    product: str,
    dovecot: BenchDovecot,
    workdir: Path,
    *,
    select_cache: bool,
    name: str = "",
    key: str = "",
    **overrides: Any,
) -> tuple[Target, subprocess.Popen[bytes]]:
    """Start up-imapproxy or imapproxy in front of ``dovecot``; wait until it listens.

    ``key`` defaults to ``up-off``, ``ipx-on`` and so on, from the product and the cache.
    """
    cache = "on" if select_cache else "off"
    key = key or f"{'up' if product == 'up-imapproxy' else 'ipx'}-{cache}"
    port = free_port()
    directory = workdir / f"{name or 'pages'}-{key}-{port}"
    directory.mkdir(parents=True)
    os.chmod(directory, 0o755)
    settings = dict(SHARED_SETTINGS)
    settings.update(
        server_hostname=dovecot.host,
        server_port=dovecot.port,
        listen_address="127.0.0.1",
        listen_port=port,
        enable_select_cache=select_cache,
        stat_filename=directory / "pimpstats",
        protocol_log_filename=directory / "protocol.log",
    )
    settings.update(overrides)
    config = write_config(directory / "imapproxy.conf", settings)
    if product == "up-imapproxy":
        argv = [IMAPPROXYD, "-f", str(config)]
    else:
        argv = [sys.executable, "-m", "imapproxy", "-f", str(config), "--foreground"]
    process = start_process(stack, argv, directory / "output.log")
    wait_listening(process, port, product, directory / "output.log")
    ours = product == "imapproxy"
    stat_path = directory / "pimpstats" if ours else None
    target = Target(key, product, "127.0.0.1", port, process.pid, select_cache, stat_path)
    return replace(target, log_path=directory / "output.log" if ours else None), process


def start_worker_proxies(
    stack: contextlib.ExitStack, dovecot: BenchDovecot, workdir: Path
) -> list[tuple[Target, subprocess.Popen[bytes]]]:
    """imapproxy, SELECT cache on, ``workers 1`` and ``workers 2`` (``plan.WORKER_TARGETS``)."""
    return [
        start_proxy(stack, "imapproxy", dovecot, workdir, select_cache=True, key=key, workers=count)
        for key, count in WORKER_TARGETS.items()
    ]


def start_floor_relay(
    stack: contextlib.ExitStack, dovecot: BenchDovecot, workdir: Path
) -> tuple[Target, subprocess.Popen[bytes]]:
    """Start the floor relay in front of ``dovecot``; wait until it listens."""
    port = free_port()
    directory = workdir / f"floor-{port}"
    directory.mkdir(parents=True)
    backend = f"{dovecot.host}:{dovecot.port}"
    argv = [sys.executable, "-m", "bench.floor_relay", "--listen", str(port), "--backend", backend]
    process = start_process(stack, argv, directory / "output.log")
    wait_listening(process, port, "floor relay", directory / "output.log")
    return Target("floor", "floor relay", "127.0.0.1", port, process.pid), process


def wait_listening(process: subprocess.Popen[bytes], port: int, product: str, log: Path) -> None:
    """Wait until ``process`` listens on ``port``; stop it and raise with its output if not."""
    try:
        wait_for_port("127.0.0.1", port, timeout=START_TIMEOUT_S)
    except TimeoutError:
        stop_process(process)
        output = log.read_text(errors="replace")
        raise RuntimeError(f"{product} did not start:\n{output}") from None
