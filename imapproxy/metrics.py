"""The Prometheus endpoint: ``/metrics`` on ``metrics_listen``, served from the proxy's own
gevent loop (``gevent.pywsgi``) with ``prometheus_client``, to ``metrics_allow`` only.

What is shown, named by Prometheus conventions (``imapproxy_`` prefix, ``_total`` counters,
seconds and bytes): every counter of the statistics file, read at scrape time (nothing is
counted twice on the relay's path); logins by outcome and failures by kind; the login latency,
split new/reused, and the backend round trip of the reuse check as histograms; bytes on the
client connections each way (the kernel's count, ``TCP_INFO``, taken as a connection ends);
PROXY headers refused; build information. No user name or client address is ever a label: a
label value is one of a few fixed words, or one of the proxy's own IMAP servers.

With routing on (several IMAP servers), each server's addresses up or down and its sessions
by state; with one server those series are left out.

With ``workers N`` any worker may take a scrape; it answers for the whole proxy: it asks every
other worker for its own figures (``worker_channel``, ``METRICS_CALL``) and adds them to its
own (``merged``). Counters, gauges of what a worker holds and histogram buckets are summed;
the peaks and the start and reset times are the whole proxy's (the totals block of the
statistics file); an address is up only if every worker has it up.
"""

from __future__ import annotations

import json
import logging
import platform
import struct
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

from gevent import socket
from gevent.pool import Pool
from gevent.pywsgi import WSGIServer
from prometheus_client import (
    CollectorRegistry,
    Histogram,
    disable_created_metrics,
    make_wsgi_app,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from imapproxy import __version__
from imapproxy.config import in_networks
from imapproxy.errors import FailureKind
from imapproxy.router import is_down
from imapproxy.worker_message import METRICS_CALL, AdminCall

if TYPE_CHECKING:
    from imapproxy.backend import BackendSession
    from imapproxy.cache import ConnectionCache
    from imapproxy.config import Config
    from imapproxy.router import Router
    from imapproxy.stats import Counters
    from imapproxy.worker_channel import WorkerChannel


class MetricsSource(Protocol):
    """What the endpoint reads of the proxy (``server.Proxy`` is one)."""

    config: Config
    counters: Counters  # this process's (a worker's block with ``workers N``)
    totals: Counters  # the whole proxy's (the same as ``counters`` with one process)
    workers: WorkerChannel | None
    cache: ConnectionCache[BackendSession]
    router: Router
    metrics: Metrics | None


LOGGER = logging.getLogger("imapproxy")

# A login is a hash and a cache look-up plus one round trip (reused), or a connect and a whole
# backend login (new): from a fraction of a millisecond to the server's time-outs.
LOGIN_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10)
ROUND_TRIP_BUCKETS_S = (0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 1)
REQUEST_TIMEOUT_S = 10.0  # Prometheus' default scrape_timeout
MAX_SCRAPES_AT_ONCE = 8  # a scrape takes a millisecond; more at once means something is wrong

# struct tcp_info (linux/tcp.h): tcpi_bytes_acked and tcpi_bytes_received, u64 at 120 and 128
_TCP_INFO_BYTES = struct.Struct("=QQ")
_TCP_INFO_OFFSET = 120
_TCP_INFO_SIZE = _TCP_INFO_OFFSET + _TCP_INFO_BYTES.size

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class Metrics:
    """The figures the statistics file has not, and the registry that shows them all."""

    def __init__(self, proxy: MetricsSource) -> None:
        disable_created_metrics()  # no *_created series: scrapers see the counter resets anyway
        self.registry = CollectorRegistry(auto_describe=True)
        self.login_seconds = Histogram(
            "imapproxy_login_duration_seconds",
            "Time from a client's login command to its backend session, new or reused.",
            ["session"],
            buckets=LOGIN_BUCKETS_S,
            registry=self.registry,
        )
        self._login_new = self.login_seconds.labels("new")
        self._login_reused = self.login_seconds.labels("reused")
        self.round_trip_seconds = Histogram(
            "imapproxy_backend_round_trip_seconds",
            "Round trip of the liveness check on a cached session before its reuse.",
            buckets=ROUND_TRIP_BUCKETS_S,
            registry=self.registry,
        )
        self.failures = dict.fromkeys(FailureKind, 0)
        self.throttled = 0  # failed logins whose reply waited longer than the base delay
        self.client_bytes_received = 0
        self.client_bytes_sent = 0
        self.proxy_header_refusals = 0
        self.registry.register(_ProxyCollector(proxy, self))

    # -- what the connections report ------------------------------------------------------------

    def logged_in(self, reused: bool, seconds: float) -> None:
        (self._login_reused if reused else self._login_new).observe(seconds)

    def login_failed(self, kind: FailureKind, throttled: bool) -> None:
        self.failures[kind] += 1
        self.throttled += throttled

    def round_trip(self, seconds: float) -> None:
        self.round_trip_seconds.observe(seconds)

    def client_closed(self, sock: socket.socket) -> None:
        """Add what the kernel counted on this client connection (Linux ``TCP_INFO``)."""
        try:
            info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SIZE)
        except (OSError, AttributeError):
            return
        if len(info) >= _TCP_INFO_SIZE:
            sent, received = _TCP_INFO_BYTES.unpack_from(info, _TCP_INFO_OFFSET)
            self.client_bytes_sent += sent
            self.client_bytes_received += received


class _ProxyCollector(Collector):
    """The statistics file's counters and the proxy's own figures, read at scrape time."""

    def __init__(self, proxy: MetricsSource, metrics: Metrics) -> None:
        self.proxy, self.metrics = proxy, metrics

    def collect(self) -> Iterator[Metric]:
        yield from _stats_metrics(self.proxy)
        yield from _login_metrics(self.proxy, self.metrics)
        yield from _byte_metrics(self.metrics)
        if self.proxy.router.routing:
            yield from _server_metrics(self.proxy)
        info = GaugeMetricFamily(
            "imapproxy_build_info", "Version of imapproxy and Python.", labels=["version", "python"]
        )
        info.add_metric([__version__, platform.python_version()], 1)
        yield info


# The statistics file's totals (``stats.Counters``): Prometheus name -> (field, help).
# TotalLoginFailures is imapproxy_login_failures_total, split by kind.
STATS_COUNTERS = {
    "client_connections_accepted": ("TotalClientConnectionsAccepted", "Clients accepted."),
    "client_logins": ("TotalClientLogins", "Client login attempts."),
    "server_sessions_created": ("TotalServerConnectionsCreated", "Backend sessions opened."),
    "server_sessions_reused": ("TotalServerConnectionsReused", "Cached sessions reused."),
    "select_commands": ("TotalSelectCommands", "SELECT commands seen."),
    "select_cache_hits": ("SelectCacheHits", "SELECTs answered from the SELECT cache."),
    "select_cache_misses": ("SelectCacheMisses", "SELECTs the SELECT cache could not answer."),
    "server_sessions_expired": ("TotalServerConnectionsExpired", "Cached sessions expired."),
    "server_sessions_dropped": ("TotalServerConnectionsDropped", "Sessions closed, not cached."),
    "client_aborts_resynced": ("TotalClientAbortsResynced", "Vanished clients, session kept."),
    "capacity_refusals": ("TotalCapacityRefusals", "Logins refused: every slot in use."),
    "backend_waits": ("BackendWaits", "Times a client waited for the IMAP server."),
}


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _by_state(name: str, doc: str, active: int, cached: int) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=["state"])
    family.add_metric(["active"], active)
    family.add_metric(["cached"], cached)
    return family


def _server_metrics(proxy: MetricsSource) -> Iterator[Metric]:
    """Per server, when logins are routed: each address up (1) or down (0), and the
    sessions on it by state. Servers are the proxy's own configuration, never a client's."""
    up = GaugeMetricFamily(
        "imapproxy_server_up",
        "Whether an address of an IMAP server is up (1) or marked down (0).",
        labels=["server", "address"],
    )
    for record in proxy.router.health_view():
        up.add_metric([record.server, record.address], 0 if is_down(record) else 1)
    yield up
    sessions = GaugeMetricFamily(
        "imapproxy_server_sessions_by_server",
        "Backend sessions per IMAP server, by state.",
        labels=["server", "state"],
    )
    counts: dict[tuple[str, str], int] = {}
    for slot in proxy.cache.in_use():
        if slot.session is not None:
            key = (slot.session.server, slot.state.value.lower())
            counts[key] = counts.get(key, 0) + 1
    for (server, state), count in sorted(counts.items()):
        sessions.add_metric([server, state], count)
    yield sessions


def _stats_metrics(proxy: MetricsSource) -> Iterator[Metric]:
    """Every field of the statistics file (``stats.Counters``), by its Prometheus name."""
    c, whole = proxy.counters, proxy.totals
    yield _gauge("imapproxy_start_time_seconds", "Start of the proxy (Unix time).", whole.StartTime)
    yield _gauge(
        "imapproxy_counters_reset_time_seconds",
        "Last reset of the totals (start-up or XPROXY_RESETCOUNTERS).",
        whole.CountTime,
    )
    yield _gauge("imapproxy_client_connections", "Clients connected.", c.CurrentClientConnections)
    yield _gauge(
        "imapproxy_client_connections_peak", "Most clients at once.", whole.PeakClientConnections
    )
    yield _by_state(
        "imapproxy_server_sessions",
        "Backend sessions serving a client (active) or waiting for one (cached).",
        c.InUseServerConnections,
        c.RetainedServerConnections,
    )
    yield _by_state(
        "imapproxy_server_sessions_peak",
        "Most backend sessions at once, by state.",
        whole.PeakInUseServerConnections,
        whole.PeakRetainedServerConnections,
    )
    for name, (field, doc) in STATS_COUNTERS.items():
        yield _counter(f"imapproxy_{name}", doc, getattr(c, field))


def _login_metrics(proxy: MetricsSource, metrics: Metrics) -> Iterator[Metric]:
    c = proxy.counters
    rejected = metrics.failures[FailureKind.AUTH_REJECTED]
    outcomes = {
        "new": c.TotalServerConnectionsCreated,
        "reused": c.TotalServerConnectionsReused,
        "failed": rejected - metrics.throttled,  # the server refused the credentials
        "throttled": metrics.throttled,  # ... again: the reply waited longer
        "refused": sum(metrics.failures.values()) - rejected,  # no session could be had
    }
    logins = CounterMetricFamily(
        "imapproxy_logins", "Client logins by outcome.", labels=["outcome"]
    )
    for outcome, value in outcomes.items():
        logins.add_metric([outcome], value)
    yield logins
    failures = CounterMetricFamily(
        "imapproxy_login_failures",
        "Logins that got no session, by kind (Dovecot's login-proxy taxonomy).",
        labels=["kind"],
    )
    for kind, value in metrics.failures.items():
        failures.add_metric([kind.name.lower()], value)
    yield failures
    yield _counter(
        "imapproxy_proxy_header_refusals",
        "Connections from proxy_protocol_trusted_networks without a valid PROXY header.",
        metrics.proxy_header_refusals,
    )


def _byte_metrics(metrics: Metrics) -> Iterator[Metric]:
    yield _counter(
        "imapproxy_client_received_bytes",
        "Bytes received from clients, counted by the kernel, of connections that ended.",
        metrics.client_bytes_received,
    )
    yield _counter(
        "imapproxy_client_sent_bytes",
        "Bytes sent to clients and acknowledged, of connections that ended.",
        metrics.client_bytes_sent,
    )


# -- workers: one answer for the whole proxy ---------------------------------------------------

# the whole proxy's already (the totals block), or the same in every worker: taken from one
WHOLE_PROXY_FAMILIES = frozenset(
    (
        "imapproxy_start_time_seconds",
        "imapproxy_counters_reset_time_seconds",
        "imapproxy_client_connections_peak",
        "imapproxy_server_sessions_peak",
        "imapproxy_build_info",
    )
)
LEAST_FAMILIES = frozenset(("imapproxy_server_up",))  # up only if up in every worker

SampleKey = tuple[str, tuple[tuple[str, str], ...]]


def own_figures(registry: CollectorRegistry) -> bytes:
    """This worker's samples, for the worker that took a scrape: JSON of
    ``{family: [[sample name, labels, value], ...]}``."""
    figures = {
        family.name: [[s.name, s.labels, s.value] for s in family.samples]
        for family in registry.collect()
        if family.name not in WHOLE_PROXY_FAMILIES
    }
    return json.dumps(figures).encode()


def merged(families: list[Metric], others: list[bytes]) -> list[Metric]:
    """``families`` (this worker's) with every other worker's figures added in."""
    totals: dict[str, dict[SampleKey, float]] = {}
    for part in others:
        try:
            figures = json.loads(part) if part else {}
        except ValueError:
            continue  # a worker that did not answer in time: its figures are missing
        for name, samples in figures.items():
            into = totals.setdefault(name, {})
            least = name in LEAST_FAMILIES
            for sample_name, labels, value in samples:
                key = (sample_name, tuple(sorted(labels.items())))
                into[key] = min(into.get(key, value), value) if least else into.get(key, 0) + value
    return [_add(family, totals.get(family.name, {})) for family in families]


def _add(family: Metric, others: dict[SampleKey, float]) -> Metric:
    if family.name in WHOLE_PROXY_FAMILIES or not others:
        return family
    least = family.name in LEAST_FAMILIES
    result = Metric(family.name, family.documentation, family.type, family.unit)
    for sample in family.samples:
        key = (sample.name, tuple(sorted(sample.labels.items())))
        if key in others:
            other = others[key]
            value = min(sample.value, other) if least else sample.value + other
            sample = sample._replace(value=value)
        result.samples.append(sample)
    return result


class _MergedRegistry:
    """The registry a worker's scrape is generated from: its families and the others'."""

    def __init__(self, registry: CollectorRegistry, workers: WorkerChannel) -> None:
        self.registry, self.workers = registry, workers

    def collect(self) -> Iterator[Metric]:
        others = self.workers.call_each_other(AdminCall(METRICS_CALL, None))
        yield from merged(list(self.registry.collect()), others)


# -- the endpoint -------------------------------------------------------------------------------


def restricted(app: WSGIApp, allowed: Callable[[str], bool]) -> WSGIApp:
    """``app`` on ``/metrics`` for addresses ``allowed`` accepts: 403 for others, 404 elsewhere."""

    def serve(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if not allowed(str(environ.get("REMOTE_ADDR", ""))):
            start_response("403 Forbidden", [("Content-Type", "text/plain")])
            return [b"Forbidden\n"]
        if environ.get("PATH_INFO") != "/metrics":
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"Not Found: try /metrics\n"]
        return app(environ, start_response)

    return serve


class _MetricsServer(WSGIServer):
    """pywsgi with a bound on each connection's time and on how many are served at once, so
    that a stuck scraper costs one greenlet for ``REQUEST_TIMEOUT_S`` at most."""

    def handle(self, sock: socket.socket, address: Any) -> None:
        sock.settimeout(REQUEST_TIMEOUT_S)
        super().handle(sock, address)


def start_server(proxy: MetricsSource, listener: socket.socket) -> WSGIServer:
    """Serve ``/metrics`` on ``listener`` in the proxy's gevent loop; ``metrics_allow`` is
    looked up per request, so that a SIGHUP changes it."""
    metrics = proxy.metrics
    assert metrics is not None

    def allowed(address: str) -> bool:
        return in_networks(address, proxy.config.metrics_allow)

    registry: Any = metrics.registry
    if proxy.workers is not None:
        registry = _MergedRegistry(metrics.registry, proxy.workers)
    app = restricted(make_wsgi_app(registry), allowed)
    server = _MetricsServer(
        listener, app, log=None, error_log=LOGGER, spawn=Pool(MAX_SCRAPES_AT_ONCE)
    )
    server.start()
    return server
