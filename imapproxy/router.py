"""Routing at run time: which server a login goes to, one ``Backend`` per server, their health.

The gevent edge of ``route`` and ``health``. ``Router.target`` answers, for one login, the
``Target``: its route (the connection cache's key for the session, with user and password
digest) and the ``Backend`` that reaches it, made on first use and kept per server. Without a
route source every login goes to the default server (``server_hostname``/``server_port``),
as always.

With a source (``route_map``, LDAP, SQL, an HTTP auth service): the source is asked, under
``route_lookup_timeout``; a source that blocks (every one but the map) is asked in a thread of a
pool of the router's own, so that a slow lookup delays only its own login. (The drivers wait in
the standard library's ``socket``/``select``, which the proxy does not monkey-patch: psycopg's
wait functions and ldap3's sockets would block the hub. In a thread they do not, and the
standard ``sqlite3`` and ``urllib`` need no special support either. The pool is the router's own
so that lookups never queue behind gevent's DNS resolver, which uses the hub's.) Answers, a
route or "none", are kept ``route_cache_ttl`` seconds. No route: the default server, or without
one ``NO [AUTHENTICATIONFAILED]``. A source that fails or times out: ``NO [UNAVAILABLE]`` and a
log line, never another server. Names that are not UTF-8 or hold control characters are never
sent to a source (no server knows them): they have no route.

``ServerHealth`` keeps a ``health.HealthBook`` for every address of every server: the
``Backend`` skips addresses that are down and fails fast when all are; a probe greenlet brings
them back. State changes are logged once.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import gevent
from gevent import ssl
from gevent.event import Event
from gevent.pool import Group
from gevent.threadpool import ThreadPool

from imapproxy import config as config_module
from imapproxy import route_map
from imapproxy.backend import Address, Backend, BackendSession
from imapproxy.config import Config
from imapproxy.credentials import Credentials
from imapproxy.errors import NO_ROUTE_REPLY, BackendFailure, FailureKind, why
from imapproxy.forwarding import ClientOrigin
from imapproxy.health import HealthBook, Record, State, format_servers
from imapproxy.route import (
    Route,
    RouteCache,
    RouteDenied,
    RouteRequest,
    RouteSource,
    RouteUnavailable,
    TLSMode,
)

LOGGER = logging.getLogger("imapproxy")

LOOKUP_THREADS = 16  # lookups in flight at once; more wait for a thread (answers are cached)
PROBE_CONCURRENCY = 16
# Settings whose change on SIGHUP makes a new source (route_map is re-read on every SIGHUP).
SOURCE_KEYS = tuple(f.name for f in config_module.SETTINGS.values() if f.name.startswith("route_"))


def build_source(config: Config) -> RouteSource | None:
    """The configured source, or None (``ConfigError`` if the route map is unusable)."""
    timeout = float(config.route_lookup_timeout)
    if config.route_map:
        return route_map.MapSource(config.route_map)
    if config.route_sql_url and config.route_sql_query:
        from imapproxy import route_sql

        if config.route_sql_url.startswith("sqlite:"):
            return route_sql.SqliteSource(config.route_sql_url, config.route_sql_query, timeout)
        return route_sql.PostgresSource(config.route_sql_url, config.route_sql_query, timeout)
    if config.route_http_url:
        from imapproxy import route_http

        return route_http.HttpSource(
            config.route_http_url, config.route_http_send_password, timeout
        )
    if config.route_ldap_uri and config.route_ldap_base:
        from imapproxy import route_ldap

        return route_ldap.LdapSource(config, timeout)
    return None


def backend_config(config: Config, route: Route) -> Config:
    """The settings of the default server, with this route's server, TLS and time-out."""
    changes: dict[str, object] = {"server_hostname": route.host, "server_port": route.port}
    if route.tls is not None:
        changes["server_tls"] = route.tls is TLSMode.IMPLICIT
        changes["force_tls"] = route.tls is TLSMode.STARTTLS
    if route.connect_timeout is not None:
        changes["server_connect_timeout"] = route.connect_timeout
    return config.replace(**changes)


def client_ip(where: str) -> str:
    """The address part of ``connection.format_address``'s "host:port" ("[v6]:port")."""
    host = where.rsplit(":", 1)[0] if ":" in where else where
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def lookup_name(username: bytes) -> str | None:
    """The name to look up, or None: not UTF-8, or with a control character in it."""
    try:
        text = username.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return None if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text) else text


@dataclass(frozen=True)
class Target:
    """Where one login goes: its route and the backend for it."""

    route: Route
    backend: Backend

    def open_session(
        self,
        credentials: Credentials,
        client_id: tuple[bytes | None, ...] | None,
        origin: ClientOrigin | None = None,
    ) -> BackendSession:
        """A new session, logged in as ``destuser`` when the route gives one; the session
        keeps the client's name (the cache, the trace and the log know the client by it)."""
        login = credentials
        if self.route.destuser is not None:
            login = Credentials(self.route.destuser, credentials.password, credentials.mechanism)
        session = self.backend.open_session(login, client_id, origin)
        session.username = credentials.username
        return session


class ServersFile:
    """``health.servers_path(stat_filename)``, opened before the privilege drop and rewritten
    in place on every change (pimpstat's ``servers`` view reads it)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)

    def write(self, data: bytes) -> None:
        try:
            os.pwrite(self.fd, data, 0)
            os.ftruncate(self.fd, len(data))
        except OSError as error:  # a full disk must not fail a login
            LOGGER.warning("cannot write %s: %s", self.path, error.strerror)

    def close(self) -> None:
        os.close(self.fd)


class ServerHealth:
    """The health records of all servers, the probe greenlet, the log of state changes."""

    def __init__(self, config: Config, clock: Callable[[], float]) -> None:
        self.book = HealthBook(config.server_down_after, float(config.server_down_max_backoff))
        self.clock = clock
        self.file: ServersFile | None = None
        self._backends: dict[Hashable, Backend] = {}  # who probes each address
        self._wakeup = Event()
        self._probes = Group()
        self._loop: gevent.Greenlet | None = None

    def usable(self, address: Address) -> bool:
        return self.book.usable(address)

    def failed(self, backend: Backend, address: Address, reason: str) -> None:
        self._backends[address] = backend
        change = self.book.failed(
            address, backend.name, _address_text(address), reason, self.clock()
        )
        self._publish()
        if change is not None:
            LOGGER.warning(
                "IMAP server %s (%s) is down after %d failures in a row: %s; logins to it "
                "fail at once until it answers again",
                backend.name,
                change.record.address,
                change.record.failures,
                reason,
            )
            self._wakeup.set()

    def succeeded(self, backend: Backend, address: Address) -> None:
        first = address not in self._backends
        if first:  # first contact: listed from now on (XPROXY_SERVERS, the servers file)
            self._backends[address] = backend
            self.book.record(address, backend.name, _address_text(address))
        change = self.book.succeeded(address, self.clock())
        if first or change is not None:
            self._publish()
        if change is not None:
            LOGGER.warning(
                "IMAP server %s (%s) is up again", change.record.server, change.record.address
            )

    def records(self) -> list[Record]:
        return list(self.book.records())

    def _publish(self) -> None:
        if self.file is not None:
            self.file.write(format_servers(self.book.records(), time.time(), self.clock()))

    def reconfigure(self, config: Config) -> None:
        self.book.reconfigure(config.server_down_after, float(config.server_down_max_backoff))

    def start(self) -> None:
        self._loop = gevent.spawn(self._probe_loop)

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.kill()
        self._probes.kill(block=False)

    def _probe_loop(self) -> None:
        probing: set[Hashable] = set()  # a probe's end sets the wake-up
        while True:
            deadline = self.book.next_deadline(skip=probing)
            timeout = None if deadline is None else max(0.0, deadline - self.clock())
            self._wakeup.wait(timeout)
            self._wakeup.clear()
            for key in self.book.due(self.clock()):
                if key not in probing and len(probing) < PROBE_CONCURRENCY:
                    probing.add(key)
                    self._probes.spawn(self._probe, key, probing)

    def _probe(self, key: Hashable, probing: set[Hashable]) -> None:
        try:
            self._backends[key].probe(key)  # type: ignore[arg-type]
        except (BackendFailure, OSError) as error:
            self.book.probe_failed(key, why(error), self.clock())
            self._publish()
        else:
            self.succeeded(self._backends[key], key)  # type: ignore[arg-type]
        finally:
            probing.discard(key)
            self._wakeup.set()


def _address_text(address: Address) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


class Router:
    """Routes, their cache, one backend per server and the servers' health."""

    def __init__(
        self,
        config: Config,
        default_backend: Backend,
        clock: Callable[[], float],
        source: RouteSource | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.default_backend = default_backend
        self.health = ServerHealth(config, clock)
        default_backend.health = self.health
        self.source = source
        self.cache = RouteCache(config.route_cache_ttl)
        self.backends: dict[Route, Backend] = {}
        self.pool: ThreadPool | None = None
        self._greeting_taken = False
        # server_hostname and server_port need a restart: the default route never changes
        host = config.server_hostname
        self.default_route = Route(host, config.server_port) if host else None
        self.default_target = (
            Target(self.default_route, self.default_backend) if self.default_route else None
        )

    @property
    def routing(self) -> bool:
        """Whether logins may go to other servers than the default one."""
        return self.source is not None

    # -- one login ------------------------------------------------------------------------------

    def target(self, credentials: Credentials, digest: bytes, where: str) -> Target:
        """Where this login goes; ``BackendFailure`` if nowhere (see the module's rules)."""
        route = self._route(credentials, digest, where) if self.source else None
        if route is None:  # no source, or it knows no route: the default server's, made once
            if self.default_target is None:
                raise BackendFailure(
                    FailureKind.AUTH_REJECTED, "no route and no default server", NO_ROUTE_REPLY
                )
            return self.default_target
        return Target(route, self._backend(route))

    def target_of(self, route: object) -> Target:
        """The target of a route already looked up (a session's ``Slot.server``)."""
        if not isinstance(route, Route) or route == self.default_route:
            if self.default_target is None:
                raise BackendFailure(
                    FailureKind.AUTH_REJECTED, "no route and no default server", NO_ROUTE_REPLY
                )
            return self.default_target
        return Target(route, self._backend(route))

    def _route(self, credentials: Credentials, digest: bytes, where: str) -> Route | None:
        name = lookup_name(credentials.username)
        if name is None:
            return None
        request = RouteRequest(name, credentials.password, credentials.mechanism, client_ip(where))
        assert self.source is not None
        if not self.source.blocking:  # the map: a dictionary look-up needs no cache
            return self._ask(request)
        key = (credentials.username, digest)  # an HTTP service may answer by password too
        found, route = self.cache.get(key, self.clock())
        if found:
            return route
        route = self._ask(request)
        self.cache.put(key, route, self.clock())
        return route

    def _ask(self, request: RouteRequest) -> Route | None:
        source = self.source
        assert source is not None
        try:
            return self._call(source, request)
        except RouteDenied as denied:
            gevent.sleep(denied.wait_s)  # Auth-Wait: the service asks for a pause before NO
            raise BackendFailure(
                FailureKind.AUTH_REJECTED,
                f"{source.name} refused the login: {denied.text}",
                b"NO [AUTHENTICATIONFAILED] " + denied.text.encode("ascii"),
            ) from None
        except RouteUnavailable as error:
            LOGGER.warning("route lookup for '%s' failed: %s", request.username, error)
            raise BackendFailure(FailureKind.ROUTE, str(error)) from None
        except Exception as error:  # a driver's own surprise: still only this login fails
            detail = f"{source.name}: {type(error).__name__}: {error}"
            LOGGER.warning("route lookup for '%s' failed: %s", request.username, detail)
            raise BackendFailure(FailureKind.ROUTE, detail) from None

    def _call(self, source: RouteSource, request: RouteRequest) -> Route | None:
        timeout = self.config.route_lookup_timeout
        if not source.blocking:
            return source.lookup(request)
        if self.pool is None:
            self.pool = ThreadPool(LOOKUP_THREADS)
        result = self.pool.spawn(source.lookup, request)
        try:
            return result.get(timeout=timeout)
        except gevent.Timeout:
            raise RouteUnavailable(f"{source.name}: no answer in {timeout} s") from None

    def _backend(self, route: Route) -> Backend:
        target = route.target
        if target == self.default_route:
            return self.default_backend
        backend = self.backends.get(target)
        if backend is None:
            default = self.default_backend
            backend = Backend(backend_config(self.config, target), default.tls_context)
            backend.health = self.health
            self.backends[target] = backend
        return backend

    def adopt_greeting(self, target: Target) -> bool:
        """Whether a new session on ``target`` gives clients the pre-login greeting and
        capabilities: the default server's do; without one, the first server's to answer."""
        if self.default_route is not None:
            return target.route.target == self.default_route
        taken, self._greeting_taken = self._greeting_taken, True
        return not taken

    # -- life cycle -----------------------------------------------------------------------------

    def reconfigure(self, config: Config, backend_tls: ssl.SSLContext | None) -> None:
        """SIGHUP: new settings for every backend; a new source when its settings changed
        (the route map is re-read in any case); answers cached so far are forgotten.

        A source that cannot be built (the map has an error) keeps the running one."""
        old = self.config
        self.config = config
        self.health.reconfigure(config)
        for route, backend in self.backends.items():
            backend.reconfigure(backend_config(config, route), backend_tls)
        changed = any(getattr(old, key) != getattr(config, key) for key in SOURCE_KEYS)
        if changed or config.route_map:
            try:
                source = build_source(config)
            except Exception as error:  # ConfigError from the map; a driver's own error
                LOGGER.error("reload: route source kept as it was: %s", error)
                return
            self._replace_source(source)
        self.cache = RouteCache(config.route_cache_ttl)

    def _replace_source(self, source: RouteSource | None) -> None:
        old, self.source = self.source, source
        if old is not None and self.pool is not None:
            self.pool.spawn(old.close)  # in a thread: a driver's close may block
        elif old is not None:
            old.close()
        if source is not None:
            LOGGER.info("routes from %s", source.name)

    def start(self) -> None:
        self.health.start()

    def stop(self) -> None:
        self.health.stop()
        if self.source is not None:
            self.source.close()
        if self.pool is not None:
            self.pool.kill()

    def describe(self) -> str:
        default = self.default_route.name if self.default_route else "no default server"
        return f"{default}, routes from {self.source.name}" if self.source else default

    def health_view(self) -> list[Record]:
        return self.health.records()


def is_down(record: Record) -> bool:
    return record.state is State.DOWN
