"""The ``in.imapproxyd`` / ``imapproxyd`` command: options, start-up, signals, exit codes.

Options as up-imapproxy's (``-f CONFIG``, ``-p PIDFILE``, ``-h``) plus ``--foreground`` and
``--check-config``. Exit status: 0 after a clean stop, 78 (``EX_CONFIG``) for a configuration
error, 69 (``EX_UNAVAILABLE``) when the IMAP server cannot be reached at start-up after
``connect_retries`` rounds ``connect_delay`` seconds apart, 71 (``EX_OSERR``) when a listening
socket, the statistics file or the trace file cannot be set up.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import gevent
from gevent import socket, ssl
from gevent.event import Event

from imapproxy import (
    __version__,
    backend_check,
    daemon,
    keeper,
    log,
    successor,
    supervisor,
    takeover,
    tls,
)
from imapproxy import config as config_module
from imapproxy.backend import Backend
from imapproxy.backend_login import LoginResult
from imapproxy.config import Config
from imapproxy.credentials import CredentialHasher
from imapproxy.errors import BackendFailure, ConfigError, FailureKind
from imapproxy.health import servers_path
from imapproxy.listeners import (
    ListenError,
    bind_handover_socket,
    bind_listeners,
    bind_metrics_listeners,
)
from imapproxy.protocol import scanner
from imapproxy.route import RouteSource
from imapproxy.router import Router, ServersFile, build_source
from imapproxy.server import Proxy
from imapproxy.session_transfer import ListenerRole, TransferError
from imapproxy.stats import Counters, Totals, create_file, summary, workers_summary
from imapproxy.trace import Tracer
from imapproxy.worker_channel import Inboxes, WorkerChannel

LOGGER = logging.getLogger("imapproxy")

DEFAULT_PIDFILE = "/run/imapproxy.pid"  # Debian's (move-pidfile-to-run.patch)
EX_USAGE = 64
EX_UNAVAILABLE = 69
EX_OSERR = 71


class StartupError(Exception):
    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="in.imapproxyd",
        description="imapproxy: a connection-caching IMAP proxy (drop-in for up-imapproxy)",
    )
    parser.add_argument(
        "-f",
        dest="config",
        default=config_module.DEFAULT_CONFIG_PATH,
        metavar="CONFIG",
        help="configuration file (default: %(default)s)",
    )
    parser.add_argument("-p", dest="pidfile", metavar="PIDFILE", help="write the process id here")
    parser.add_argument(
        "--foreground",
        action="store_true",
        help="stay attached and log to stderr (overrides foreground_mode)",
    )
    parser.add_argument(
        "--check-config",
        action="store_true",
        help="print the effective settings and exit (0, or 78 on an error)",
    )
    parser.add_argument(
        "--connect",
        action="store_true",
        help="with --check-config: also connect to the IMAP server and try TLS as logins would "
        "(handshake and verification); 69 if unreachable, 78 if TLS fails",
    )
    parser.add_argument(
        "--take-over",
        action="store_true",
        help="take the listeners and cached sessions of the running imapproxy (takeover_socket)",
    )
    parser.add_argument("--version", action="version", version=f"imapproxy {__version__}")
    args = parser.parse_args(argv)
    if args.connect and not args.check_config:
        parser.error("--connect goes with --check-config")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = config_module.load(args.config)
    except ConfigError as error:
        print(f"in.imapproxyd: {error}", file=sys.stderr)
        return config_module.EX_CONFIG
    if args.check_config:
        try:
            backend_tls, _ = tls_contexts(config, tls.read_files)  # the files, not only syntax
            check_route_source(config)  # the route map's lines too
        except StartupError as error:
            print(f"in.imapproxyd: {error}", file=sys.stderr)
            return error.status
        sys.stdout.write(config_module.describe(config))
        if args.connect:
            return backend_check.connect_check(config, Backend(config, backend_tls))
        return 0
    foreground = args.foreground or config.foreground_mode
    log.setup(config, foreground=foreground)
    # a mask is inherited across exec: signals the parent blocked would never reach us
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    try:
        return run(
            config, Startup(args.config, args.pidfile, foreground, args.take_over, os.getcwd())
        )
    except StartupError as error:
        LOGGER.error("%s", error)
        if not foreground:  # the log is syslog: say it where the admin is looking, too
            print(f"in.imapproxyd: {error}", file=sys.stderr)
        return error.status


@dataclass(frozen=True)
class Startup:
    """How the program was started (command line), beside what the file configures."""

    config_path: str
    pidfile: str | None
    foreground: bool
    take_over: bool = False  # --take-over: a successor (``takeover``)
    cwd: str = "/"  # where it was started (a successor starts there too)

    @property
    def pidfile_path(self) -> str | None:
        return self.pidfile or (None if self.foreground else DEFAULT_PIDFILE)

    def takeover_path(self, config: Config) -> str:
        return takeover.socket_path(config.takeover_socket, self.pidfile_path, config.stat_filename)


def wait_for_backend(backend: Backend, config: Config) -> LoginResult | None:
    """Start-up: try the server for ``connect_retries`` more rounds, ``connect_delay`` apart.

    None when the server answers but TLS with it fails: the proxy serves all the same."""
    for attempt in range(config.connect_retries + 1):
        try:
            backend.resolve()
            return backend.probe()
        except BackendFailure as error:
            if error.kind is FailureKind.TLS:  # reachable, TLS fails: serve (watch said why)
                return None
            LOGGER.warning(
                "IMAP server %s not usable (attempt %d of %d): %s",
                backend.name,
                attempt + 1,
                config.connect_retries + 1,
                error.detail,
            )
            if attempt < config.connect_retries:
                gevent.sleep(config.connect_delay)
    raise StartupError(f"giving up: IMAP server {backend.name} is unreachable", EX_UNAVAILABLE)


def check_route_source(config: Config) -> None:
    """Build the route source and close it again (``--check-config``)."""
    source = route_source(config)
    if source is not None:
        source.close()


def route_source(config: Config) -> RouteSource | None:
    try:
        return build_source(config)
    except ConfigError as error:
        raise StartupError(str(error), config_module.EX_CONFIG) from None
    except ImportError as error:
        raise StartupError(f"route source: {error}", config_module.EX_CONFIG) from None


def open_counters(
    config: Config, identity: daemon.Identity | None, workers: int = 1, beside: bool = False
) -> Counters:
    """The statistics file (with a block per worker when there are several); without
    ``stat_filename``, memory (shared with the workers: the admin commands read the totals).
    ``beside`` (a successor): a new file moved over the running proxy's, which keeps its own
    (truncating a file another process maps would kill it)."""
    if not config.stat_filename:
        return Counters.in_memory(workers)
    path = config.stat_filename
    created = f"{path}.{os.getpid()}.new" if beside else path
    with _os_errors(f"cannot create stat_filename {path}"):
        counters = create_file(created, workers)
        daemon.hand_over(created, identity)
        if beside:
            os.replace(created, path)
    return counters


def open_servers_file(config: Config, identity: daemon.Identity | None) -> ServersFile | None:
    """The servers' health for pimpstat, beside the statistics file."""
    if not config.stat_filename:
        return None
    path = servers_path(config.stat_filename)
    with _os_errors(f"cannot create {path}"):
        servers_file = ServersFile(path)
        daemon.hand_over(path, identity)
    return servers_file


def open_tracer(config: Config, identity: daemon.Identity | None) -> Tracer | None:
    if not config.protocol_log_filename:
        return None
    with _os_errors(f"cannot open protocol_log_filename {config.protocol_log_filename}"):
        tracer = Tracer(config.protocol_log_filename)
        daemon.hand_over(config.protocol_log_filename, identity)
    return tracer


def write_pidfile(path: str) -> None:
    """Write the pid atomically (a reader never sees an empty file), as up-imapproxy's "%u\\n"."""
    temporary = f"{path}.{os.getpid()}.tmp"
    with _os_errors(f"cannot write pid file {path}"):
        with open(temporary, "w", encoding="ascii") as file:
            file.write(f"{os.getpid()}\n")
        os.replace(temporary, path)


def run(config: Config, startup: Startup) -> int:
    LOGGER.info(
        "imapproxy %s starting; SELECT caching %s, admin commands %s, response scanner in %s",
        __version__,
        "enabled" if config.enable_select_cache else "disabled",
        "enabled" if config.enable_admin_commands else "disabled",
        "C" if scanner.NATIVE else "Python",
    )
    workers = supervisor.worker_count(config.workers)
    with _daemon_errors():
        identity = daemon.lookup_identity(config.proc_username, config.proc_groupname)
        daemon.raise_file_limit(config.cache_size)
    counters = open_counters(config, identity, workers, beside=startup.take_over)
    tracer = open_tracer(config, identity)
    servers_file = open_servers_file(config, identity)
    backend_tls, client_tls = tls_contexts(config, tls.read_files)
    backend = Backend(config, backend_tls)
    backend_check.watch(backend, counters)
    source = route_source(config)
    if config.server_port == 993 and not config.server_tls:
        LOGGER.warning("server_port is 993 but server_tls is no: port 993 usually wants TLS")
    # without a default server, the first server a login reaches gives the greeting
    first_contact = wait_for_backend(backend, config) if config.server_hostname else None
    inherited = receive_handover(startup.takeover_path(config)) if startup.take_over else None
    with _listen_errors():
        listeners = bind_listeners(config, config.listen_port, inherited)
        tls_listeners = (
            bind_listeners(config, config.client_tls_port, inherited, ListenerRole.IMAP_TLS)
            if config.client_tls_port
            else []
        )
        metrics_listeners = bind_metrics_listeners(config, inherited)
        handover_socket = bind_handover_socket(startup.takeover_path(config), inherited)
    if inherited is not None:
        inherited.close_leftovers()
    if not startup.foreground:
        daemon.detach()
    if startup.pidfile_path:
        write_pidfile(startup.pidfile_path)
    if startup.take_over:  # systemd: this process is the service now (NotifyAccess=all)
        daemon.notify(f"MAINPID={os.getpid()}")
    # one privileged reader per worker (and one for the supervisor, to start a successor)
    readers = [tls_file_reader(config, startup, identity) for _ in range(workers + (workers > 1))]
    with _daemon_errors():
        daemon.drop_privileges(identity, config.chroot_directory)
    shared = Shared(backend, counters, source, tracer, servers_file, client_tls, first_contact)
    listening = Listening(
        listeners, tls_listeners, metrics_listeners, handover_socket, identity is not None
    )
    if workers > 1:
        return run_workers(config, startup, workers, shared, listening, readers, inherited)
    proxy = build_proxy(config, shared)
    if inherited is not None:
        takeover.adopt_all(proxy, inherited)
    return serve(
        proxy,
        listeners,
        tls_listeners,
        startup,
        readers[0],
        metrics_listeners,
        handover=listening.handover(proxy),
        inherited=inherited,
        start_successor=successor.starter(startup.cwd, readers[0]),
    )


@dataclass(frozen=True)
class Shared:
    """What start-up made, as root, for the proxy (or each worker) to build on."""

    backend: Backend
    counters: Counters
    source: RouteSource | None
    tracer: Tracer | None
    servers_file: ServersFile | None
    client_tls: ssl.SSLContext | None
    first_contact: LoginResult | None


@dataclass(frozen=True)
class Listening:
    listeners: list[socket.socket]
    tls_listeners: list[socket.socket]
    metrics_listeners: list[socket.socket]
    handover_socket: socket.socket | None  # where a successor asks (None: hand-overs off)
    root_only: bool  # the proxy dropped root: only root may take over

    def handover(self, proxy: Proxy) -> takeover.Handover | None:
        return takeover.serving(
            proxy,
            self.handover_socket,
            self.listeners,
            self.tls_listeners,
            self.metrics_listeners,
            self.root_only,
        )


def build_proxy(
    config: Config,
    shared: Shared,
    workers: WorkerChannel | None = None,
    hasher: CredentialHasher | None = None,
) -> Proxy:
    counters = shared.counters
    if workers is not None:  # its own block; the start-up's TLS finding to begin with
        counters = shared.counters.worker(workers.index)
        counters.set_backend_tls(*shared.counters.backend_tls())
        backend_check.watch(shared.backend, counters)
    router = Router(config, shared.backend, time.monotonic, shared.source)
    if workers is None or workers.index == 0:  # one writer of the servers' health file
        router.health.file = shared.servers_file
    proxy = Proxy(
        config,
        shared.backend,
        counters,
        router=router,
        tracer=shared.tracer,
        client_tls=shared.client_tls,
        first_contact=shared.first_contact,
        workers=workers,
        hasher=hasher,
    )
    if config.metrics_listen is not None:
        from imapproxy import metrics  # imported before: bind_metrics_listeners

        proxy.metrics = metrics.Metrics(proxy)
    return proxy


def run_workers(
    config: Config,
    startup: Startup,
    count: int,
    shared: Shared,
    listening: Listening,
    readers: list[TLSFileReader],
    inherited: takeover.Received | None = None,
) -> int:
    """``workers N``: the supervisor (``supervisor``) and its workers, each a whole proxy on
    the shared listeners with its share of the cache and one key for the credentials' hashes
    (the same in every worker: a session moved on restart keeps its key).

    A successor (``inherited``) gives each worker, at its first start, the sessions of the
    users it owns; worker 0 tells the old processes it accepts, and takes what they ship
    late for every worker."""
    inboxes = Inboxes.create(count)
    hasher = CredentialHasher(inherited.key if inherited is not None else None)
    first = [inherited]  # the hand-over is for the first start of each worker only

    def worker_main(index: int) -> int:
        channel = WorkerChannel(index, inboxes)
        proxy = build_proxy(config, shared, channel, hasher)
        proxy.totals = shared.counters  # the whole proxy's, summed by the supervisor
        received = first[0]
        if received is not None:
            takeover.adopt_all(proxy, received, owned=channel.owns_record)
        return serve(
            proxy,
            listening.listeners,
            listening.tls_listeners,
            startup,
            readers[index],
            listening.metrics_listeners,
            supervised=True,
            handover=listening.handover(proxy),
            inherited=received if index == 0 else None,
        )

    counters = shared.counters
    totals = Totals(counters)
    totals.start(int(time.time()))

    def exited(index: int, restarting: bool) -> None:
        totals.worker_exited(index)  # its counters kept in the totals, its block cleared
        if restarting:
            counters.count_worker_restart(index)

    def all_started() -> None:  # the supervisor's copies of what the workers took
        if first[0] is not None:
            first[0].close_sessions()
            first[0].close_channels()
            first[0] = None

    boss = supervisor.Supervisor(
        count,
        worker_main,
        config.shutdown_timeout,
        sample=totals.update,
        started=counters.set_worker_pid,
        exited=exited,
        summary=lambda: f"{summary(counters)}; {workers_summary(counters)}",
        all_started=all_started,
        start_successor=successor.starter(startup.cwd, readers[count], in_loop=False),
    )
    status = boss.run()
    if startup.pidfile_path:
        _remove_own_pidfile(startup.pidfile_path)
    LOGGER.info("stopped" if not boss.handed_over else "handed over: every worker has finished")
    return status


def receive_handover(path: str) -> takeover.Received:
    """A successor: take the running proxy's listeners and cached sessions (before binding),
    from each of its processes when it runs workers."""
    if not path:
        raise StartupError("--take-over: no takeover_socket (and no pid or stat file)", EX_USAGE)
    try:
        received = takeover.receive_all(path)
    except TransferError as error:
        raise StartupError(f"--take-over: {error}", EX_UNAVAILABLE) from None
    LOGGER.info(
        "hand-over: pid %d sent %d listeners and %d sessions",
        received.pid,
        len(received.listeners),
        received.session_count(),
    )
    return received


TLSFileReader = Callable[[Config], dict[str, bytes]]


def tls_contexts(
    config: Config, read_files: TLSFileReader
) -> tuple[ssl.SSLContext, ssl.SSLContext | None]:
    """The backend and client TLS contexts; a bad file or key is a configuration error."""
    try:
        return tls.contexts(config, read_files(config))
    except ConfigError as error:
        raise StartupError(str(error), config_module.EX_CONFIG) from None


def tls_file_reader(
    config: Config, startup: Startup, identity: daemon.Identity | None
) -> TLSFileReader:
    """How SIGHUP will read certificates and keys: through the privileged reader when the
    proxy is about to drop root (``keeper``), else directly (it never had more rights).
    The reader also starts the successor on SIGUSR2 (``successor.starter``)."""
    if identity is None:
        return tls.read_files
    if config.chroot_directory and tls.file_paths(config):
        memory_files = os.path.join(config.chroot_directory, tls.MEMORY_FILES.lstrip("/"))
        if not os.path.isdir(memory_files):
            LOGGER.warning(
                "chroot_directory %s has no %s (no /proc mounted there): certificates and keys "
                "cannot be loaded again on SIGHUP; a restart loads renewed ones",
                config.chroot_directory,
                tls.MEMORY_FILES,
            )
    successor_line = keeper.Successor(successor.command(), startup.cwd)
    return keeper.start(os.path.abspath(startup.config_path), successor_line).read_files


def serve(
    proxy: Proxy,
    listeners: list[socket.socket],
    tls_listeners: list[socket.socket],
    startup: Startup,
    read_tls_files: TLSFileReader = tls.read_files,
    metrics_listeners: Sequence[socket.socket] = (),
    *,
    supervised: bool = False,
    handover: takeover.Handover | None = None,
    inherited: takeover.Received | None = None,
    start_successor: Callable[[], tuple[int, successor.StatusOf]] | None = None,
) -> int:
    """Run until SIGTERM/SIGINT, or until a successor took over (``takeover``); SIGHUP
    reloads the configuration, SIGUSR1 logs the counters, SIGUSR2 starts a successor.

    ``supervised``: a worker of ``workers N``; the supervisor owns the pid file and starts
    successors, the worker hands over (its status then says so: ``HANDED_OVER``)."""
    stop = Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(signum, stop.set)
    if handover is not None:
        gevent.spawn(lambda: (handover.done.wait(), stop.set()))
    if handover is not None and start_successor is not None:
        watch = successor.SuccessorWatch(handover, start_successor)
        gevent.signal_handler(signal.SIGUSR2, watch.start)
    else:  # its default action would end the proxy
        gevent.signal_handler(
            signal.SIGUSR2,
            lambda: LOGGER.warning(
                "SIGUSR2 ignored: %s",
                "send it to the supervisor" if supervised else "hand-overs are off",
            ),
        )
    gevent.signal_handler(
        signal.SIGHUP, lambda: gevent.spawn(reload, proxy, startup, read_tls_files)
    )
    gevent.signal_handler(
        signal.SIGUSR1, lambda: LOGGER.info("counters: %s", summary(proxy.counters))
    )
    signal.pthread_sigmask(signal.SIG_UNBLOCK, supervisor.HELD_UNTIL_SERVING)  # since a fork
    proxy.start(listeners, tls_listeners)
    names = ", ".join(
        f"{s.getsockname()[0]} port {s.getsockname()[1]}{' (TLS)' if s in tls_listeners else ''}"
        for s in listeners + tls_listeners
    )
    LOGGER.info(
        "normal server startup: listening on %s, proxying to %s", names, proxy.router.describe()
    )
    serve_metrics(proxy, metrics_listeners)
    if inherited is not None:  # accepting now: the running proxy may stop
        takeover.serve_late(proxy, inherited)
    if handover is not None:
        handover.start()
    daemon.notify("READY=1")
    stop.wait()
    handed_over = handover is not None and handover.done.is_set()
    if handed_over:  # the service goes on in the successor: nothing is stopping
        LOGGER.info("handed over: finishing active clients, their sessions go to the successor")
    else:
        daemon.notify("STOPPING=1")
        LOGGER.info("shutting down: logging out cached sessions")
    proxy.stop(proxy.config.shutdown_timeout)
    if handover is not None:
        if handed_over:
            handover.finish()
        elif not supervised:
            handover.close(remove=True)
    if supervised:
        return supervisor.HANDED_OVER if handed_over else 0
    if startup.pidfile_path:
        _remove_own_pidfile(startup.pidfile_path)
    LOGGER.info("stopped")
    return 0


def _remove_own_pidfile(path: str) -> None:
    """Remove the pid file unless a successor wrote its own there."""
    with contextlib.suppress(OSError, ValueError), open(path, encoding="ascii") as file:
        if int(file.read().strip()) != os.getpid():
            return
    _remove(path)


def serve_metrics(proxy: Proxy, listeners: Sequence[socket.socket]) -> None:
    """``/metrics`` on each listener; ``proxy.stop`` closes them with the IMAP listeners."""
    if not listeners:
        return
    from imapproxy import metrics

    for listener in listeners:
        proxy.servers.append(metrics.start_server(proxy, listener))
        host, port = listener.getsockname()[:2]
        LOGGER.info("metrics: http://%s:%d/metrics", f"[{host}]" if ":" in host else host, port)


def reload(proxy: Proxy, startup: Startup, read_tls_files: TLSFileReader) -> None:
    """SIGHUP: re-read the file; apply what can change live, report what needs a restart.

    Inside ``chroot_directory`` the file is read at the same path within the chroot; the TLS
    files are read by ``read_tls_files`` (as root, by the privileged reader, after the drop).
    """
    try:
        new = config_module.load(startup.config_path)
    except ConfigError as error:
        where = (
            f" (inside chroot {proxy.config.chroot_directory})"
            if proxy.config.chroot_directory
            else ""
        )
        LOGGER.error("reload failed, running settings kept: %s%s", error, where)
        return
    result = config_module.reload(proxy.config, new)
    try:  # certificates are re-read even when their paths did not change: renewed in place
        backend_tls, client_tls = tls.contexts(result.config, read_tls_files(result.config))
    except (ConfigError, keeper.KeeperError) as error:
        LOGGER.error("reload: %s; TLS contexts kept", error)
        backend_tls, client_tls = proxy.backend.tls_context, proxy.client_tls
    proxy.reconfigure(result.config, backend_tls, client_tls)
    if backend_check.recheck_needed(proxy.backend, result.applied):
        gevent.spawn(backend_check.recheck, proxy.backend)
    log.set_mask(result.config)
    LOGGER.info(
        "reload: %s",
        ", ".join(result.applied) + " changed" if result.applied else "nothing changed",
    )
    if result.needs_restart:
        LOGGER.warning(
            "reload: %s changed in the file; this needs a restart", ", ".join(result.needs_restart)
        )


@contextlib.contextmanager
def _os_errors(what: str) -> Iterator[None]:
    """An ``OSError`` becomes ``StartupError("<what>: <reason>", EX_OSERR)``."""
    try:
        yield
    except OSError as error:
        raise StartupError(f"{what}: {error.strerror}", EX_OSERR) from None


@contextlib.contextmanager
def _listen_errors() -> Iterator[None]:
    try:
        yield
    except ListenError as error:
        raise StartupError(str(error), EX_OSERR) from None


@contextlib.contextmanager
def _daemon_errors() -> Iterator[None]:
    try:
        yield
    except daemon.DaemonError as error:
        raise StartupError(str(error), EX_OSERR) from None


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
