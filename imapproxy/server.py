"""The proxy at run time: listeners, one greenlet per client, the connection cache, expiry.

``Proxy`` holds what all clients share: the configuration, the ``Backend``, the connection
cache and the counters, the greeting and pre-login capabilities (refreshed from every new
backend connection), and the expiry greenlet. Each accepted client is run by a
``connection.ClientConnection`` in a greenlet of its own.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import gevent
import gevent.lock
import gevent.pool
from gevent import socket, ssl
from gevent.event import Event

from imapproxy import admin, affinity, daemon, forwarding, session_transfer, takeover
from imapproxy.accept import ClientGreenlets, ClientListener
from imapproxy.backend import Backend, BackendSession
from imapproxy.backend_login import LoginResult, check_shared_secret
from imapproxy.cache import ConnectionCache, Slot
from imapproxy.config import Config
from imapproxy.connection import ClientConnection, format_address
from imapproxy.credentials import CredentialHasher, Credentials
from imapproxy.errors import BackendFailure, FailureKind, why
from imapproxy.forwarding import ClientOrigin
from imapproxy.protocol import capability
from imapproxy.relay import Outcome, RelaySettings
from imapproxy.router import Router, Target
from imapproxy.send import send_quietly
from imapproxy.session import id_command_args
from imapproxy.session_transfer import SessionRecord
from imapproxy.stats import Counters
from imapproxy.throttle import LoginThrottle
from imapproxy.trace import Tracer
from imapproxy.worker_message import METRICS_CALL, AdminCall, HandedClient

if TYPE_CHECKING:
    from imapproxy.metrics import Metrics
    from imapproxy.worker_channel import WorkerChannel

LOGGER = logging.getLogger("imapproxy")

STOP_MARGIN_S = 10.0  # beyond this process's longest stop (clients, then logouts)
LOGOUT_CONCURRENCY = 64  # expiring/evicted sessions logged out at once, at most
TOO_MANY_BYE = b"* BYE Too many connections, try again later\r\n"
REFUSAL_LOG_INTERVAL_S = 10.0  # a flood of refusals makes one log line per interval


class Closable(Protocol):
    def close(self) -> None: ...


@dataclass
class Snapshot:
    """The backend's greeting text and pre-login capabilities, and what clients see of them:
    one list per connection state (STARTTLS offered or not, login disabled or not)."""

    greeting_text: bytes = b"imapproxy ready."
    backend_capabilities: tuple[bytes, ...] = ()
    _lists: dict[tuple[bool, bool], bytes] = field(default_factory=dict)

    def capabilities(self, starttls: bool = False, login_disabled: bool = False) -> bytes:
        key = (starttls, login_disabled)
        if key not in self._lists:
            caps = capability.for_clients(
                self.backend_capabilities, offer_starttls=starttls, login_disabled=login_disabled
            )
            self._lists[key] = b" ".join(caps)
        return self._lists[key]

    def greeting(self, starttls: bool = False, login_disabled: bool = False) -> bytes:
        caps = self.capabilities(starttls, login_disabled)
        return b"* OK [CAPABILITY %s] %s\r\n" % (caps, self.greeting_text)

    def capability_line(self, starttls: bool = False, login_disabled: bool = False) -> bytes:
        return b"* CAPABILITY " + self.capabilities(starttls, login_disabled)


def bound_address(listener: socket.socket) -> tuple[object, ...] | None:
    """The address every connection to ``listener`` is made to, if it is one address: then no
    connection needs to ask the kernel (``getsockname``); None for a wildcard listener."""
    try:
        address: tuple[object, ...] = listener.getsockname()
        unspecified = ipaddress.ip_address(str(address[0]).split("%", 1)[0]).is_unspecified
    except (OSError, ValueError, IndexError):  # not an IP socket (a test's socket pair)
        return None
    return None if unspecified else address


def set_nodelay(listener: socket.socket) -> bool:
    """``TCP_NODELAY`` on a listener: Linux gives it to every connection accepted there, so no
    connection sets it again (a system call each); False where it could not be set."""
    try:
        listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:  # not TCP (a test's socket pair)
        return False
    return True


def relay_settings(config: Config) -> RelaySettings:
    return RelaySettings(
        response_timeout=config.server_response_timeout,
        idle_timeout=config.client_idle_timeout,
        select_cache=config.enable_select_cache,
        reuse_after_enable=config.reuse_after_enable,
    )


def _now() -> float:
    return time.monotonic()


def _session_note(origin: ClientOrigin | None) -> str:
    """The proxy's session id in the LOGIN lines, as Dovecot's log has it (``x-session-id``)."""
    return f" session=<{origin.session_id}>" if origin is not None else ""


class Proxy:
    """State shared by all client connections."""

    def __init__(
        self,
        config: Config,
        backend: Backend,
        counters: Counters,
        clock: Callable[[], float] = _now,
        router: Router | None = None,
        *,
        tracer: Tracer | None = None,
        client_tls: ssl.SSLContext | None = None,
        first_contact: LoginResult | None = None,
        workers: WorkerChannel | None = None,
        hasher: CredentialHasher | None = None,
    ) -> None:
        self.config = config
        self.relay_settings = relay_settings(config)  # made once per configuration, not per page
        self.backend = backend
        self.router = router or Router(config, backend, clock)
        self.counters = counters
        self.totals = counters  # the whole proxy's: the file's totals block with workers
        self.clock = clock
        self.workers = workers  # with ``workers N``: this worker's way to the others
        self.cache: ConnectionCache[BackendSession] = ConnectionCache(
            self._share(config.cache_size)
        )
        self.hasher = hasher or CredentialHasher()
        self.throttle = LoginThrottle(config.auth_failure_delay, clock)
        self.snapshot = Snapshot()
        if first_contact is not None:  # the start-up probe's greeting and capabilities
            self.refresh(first_contact)
        self.tracer = tracer
        self.metrics: Metrics | None = None  # with metrics_listen (it reads the proxy)
        self.client_tls = client_tls  # STARTTLS and the implicit-TLS port
        self.servers: list[Closable] = []  # the client listeners, and metrics' servers
        self.clients = ClientGreenlets()
        # a spawn never waits (a login evicting a session must not block with its slot
        # ACTIVE); the logouts themselves take turns
        self._logouts = gevent.pool.Group()
        self._logout_turns = gevent.lock.BoundedSemaphore(LOGOUT_CONCURRENCY)
        self._expiry_wakeup = Event()
        self._expiry: gevent.Greenlet | None = None
        self.stopping = False
        self.client_limit = self._client_limit(config)
        self._inbox: gevent.Greenlet | None = None
        self._refused = 0  # client connections refused since the last log line about it
        self._refused_logged_at = float("-inf")
        # after a hand-over (takeover.Handover.ship): sessions checked in go to the successor
        self.ship: Callable[[Slot[BackendSession], float], bool] | None = None

    def _share(self, total: int) -> int:
        """This process's part of a limit that the configuration gives for the whole proxy."""
        if self.workers is None:
            return total
        return affinity.share(total, self.workers.count, self.workers.index)

    def _client_limit(self, config: Config) -> int:
        configured = (
            self._share(config.max_client_connections) if config.max_client_connections else 0
        )
        return daemon.client_limit(configured, self.cache.size)

    # -- capabilities ---------------------------------------------------------------------------

    def refresh(self, result: LoginResult) -> None:
        """Adopt the greeting and pre-login capabilities of a new backend connection."""
        known = (self.snapshot.backend_capabilities, self.snapshot.greeting_text)
        if (result.prelogin_capabilities, result.greeting_text) != known:
            self.snapshot = Snapshot(result.greeting_text, result.prelogin_capabilities)

    # -- sessions -------------------------------------------------------------------------------

    def _update_gauges(self) -> None:
        self.counters.set_server_connections(*self.cache.counts())

    def checkout(
        self,
        credentials: Credentials,
        client_id: tuple[bytes | None, ...] | None,
        where: str,
        origin: ClientOrigin | None = None,
    ) -> tuple[Slot[BackendSession], bool]:
        """A backend session for these credentials: a cached one, else a new one (told the
        client's address, ``origin``; ``reuse_same_client_address``: a cached one only if it
        was opened for the same address).

        A cached session is handed over at once, its liveness check sent now or after the
        client's answer (``start_check``): the caller answers the client, calls
        ``start_check`` again, and calls ``confirm`` before the client's first command goes to
        the server.

        In static-identity mode the shared secret is checked first: before the cache (the
        setting may have changed on SIGHUP) and before a slot is made free for a new session.
        The router then names the server (``Router.target``); its route is part of the cache
        key, so a session is reused only on the server the user is routed to now.
        """
        check_shared_secret(credentials, self.backend.policy)
        digest = self.hasher.digest(credentials)
        target = self.router.target(credentials, digest, where)
        route = target.route
        accept = self._same_address(origin, client_id)
        while (
            slot := self.cache.take_cached(credentials.username, digest, route, accept)
        ) is not None:
            self._update_gauges()
            session = slot.session
            assert session is not None
            try:
                session.read_waiting()
            except (BackendFailure, OSError) as error:
                self._dead(slot, credentials, where, error)
                continue
            self.start_check(slot, client_id, answered=False)
            self.counters.session_reused()
            return slot, True  # logged by ``log_reuse`` once the client has its answer
        return self._new_session(credentials, client_id, digest, where, target, origin), False

    def start_check(
        self,
        slot: Slot[BackendSession],
        client_id: tuple[bytes | None, ...] | None,
        *,
        answered: bool,
    ) -> None:
        """Send a reused session's liveness check, before or after the client's answer
        (``BackendSession.start_check``)."""
        session = slot.session
        assert session is not None
        session.start_check(id_command_args(client_id) if client_id else None, answered=answered)

    def log_reuse(
        self, session: BackendSession, username: str, where: str, origin: ClientOrigin | None
    ) -> None:
        """The line of a reuse, written after the client's answer: not on the page's path."""
        LOGGER.info(
            "LOGIN: '%s' (%s) on existing sd [%d]%s",
            username,
            where,
            session.sd,
            _session_note(origin),
        )

    def _same_address(
        self, origin: ClientOrigin | None, client_id: tuple[bytes | None, ...] | None
    ) -> Callable[[BackendSession], bool] | None:
        if origin is None or not self.config.reuse_same_client_address:
            return None
        address = forwarding.originating_ip(origin, client_id)
        return lambda session: session.origin_ip == address

    def confirm(
        self,
        slot: Slot[BackendSession],
        credentials: Credentials,
        client_id: tuple[bytes | None, ...] | None,
        where: str,
        origin: ClientOrigin | None = None,
        *,
        merged: bool = False,
        replace: bool = True,
    ) -> Slot[BackendSession]:
        """Read a reused session's check: its slot if it passed, else a new session's (with the
        credentials the connection still holds, on the server the login was routed to);
        ``BackendFailure`` if none can be had, or if ``replace`` is off (the client is gone).

        ``merged``: the client's first command went behind the check, and the wait for the
        check is the wait for that command's reply (the relay counts it).
        """
        session = slot.session
        assert session is not None
        sent_at, route = session.check_sent_at, slot.server
        try:
            if session.finish_check() and not merged:
                self.counters.backend_waited()  # the overlap did not hide the check this time
        except (BackendFailure, OSError) as error:
            self.counters.session_reused(-1)
            self._dead(slot, credentials, where, error)
            if not replace:
                raise BackendFailure(FailureKind.LOST, "the client left; no new session") from None
            digest = self.hasher.digest(credentials)
            target = self.router.target_of(route)  # no new look-up: the route of the login
            return self._new_session(credentials, client_id, digest, where, target, origin)
        except BaseException:
            self.discard(slot)  # never left ACTIVE by an error of ours
            raise
        if self.metrics is not None:  # sent with the login answer, read at the next command
            self.metrics.round_trip(time.perf_counter() - sent_at)
        return slot

    def _dead(
        self, slot: Slot[BackendSession], credentials: Credentials, where: str, error: Exception
    ) -> None:
        session = slot.session
        assert session is not None
        LOGGER.info(
            "LOGIN: '%s' (%s) cached sd [%d] is dead (%s): creating a new one",
            credentials.username_text,
            where,
            session.sd,
            why(error),
        )
        self.discard(slot)

    def _new_session(
        self,
        credentials: Credentials,
        client_id: tuple[bytes | None, ...] | None,
        digest: bytes,
        where: str,
        target: Target,
        origin: ClientOrigin | None = None,
    ) -> Slot[BackendSession]:
        slot, evicted = self.cache.acquire()
        if evicted is not None:
            self._logout_later(evicted, "Expiring server sd [%d] to make room")
        if slot is None:
            self.counters.TotalCapacityRefusals += 1
            raise BackendFailure(FailureKind.CAPACITY, f"all {self.cache.size} slots active")
        self._update_gauges()
        try:
            session = target.open_session(credentials, client_id, origin)
        except BaseException:
            self.cache.release(slot)
            self._update_gauges()
            raise
        if self.router.adopt_greeting(target):
            self.refresh(session.login)
        self.cache.assign(slot, credentials.username, digest, session, target.route)
        for stale in self.cache.stale_for(credentials.username, digest):
            self._logout_later(stale, "Expiring server sd [%d]: opened with an older password")
        self._update_gauges()
        self.counters.TotalServerConnectionsCreated += 1
        LOGGER.info(
            "LOGIN: '%s' (%s) on new sd [%d]%s",
            credentials.username_text,
            where,
            session.sd,
            _session_note(origin),
        )
        return slot

    def checkin(
        self, slot: Slot[BackendSession], outcome: Outcome, then: Callable[[], object] | None = None
    ) -> None:
        """The client is done with the session: cache it, or close it. ``then`` (the client's
        LOGOUT reply) runs as soon as the session is cached, so that the next login can reuse
        it, and before the bookkeeping, so that the client does not wait for a log line."""
        session = slot.session
        assert session is not None
        if outcome is Outcome.RESYNCED:
            self.counters.TotalClientAbortsResynced += 1
        if not outcome.reusable:
            self.counters.TotalServerConnectionsDropped += 1
            LOGGER.info("Invalidating server sd [%d]", session.sd)
            self.discard(slot)
        elif self.stopping and self.ship is not None and self.ship(slot, self.clock()):
            pass
        elif self.stopping or self.config.cache_expiration_time == 0:
            self.discard(slot, logout=True)
        else:
            self._cache(slot, session, then)
            return
        if then is not None:
            then()

    def _cache(
        self, slot: Slot[BackendSession], session: BackendSession, then: Callable[[], object] | None
    ) -> None:
        was_empty = self.cache.cached_count == 0
        self.cache.cache(slot, self.clock())
        if was_empty:  # before the client's reply, whose send may wait on a slow client
            self._expiry_wakeup.set()
        if then is not None:
            then()
        LOGGER.info(
            "LOGOUT: '%s' from server sd [%d]",
            session.username.decode("utf-8", "replace"),
            session.sd,
        )
        self._update_gauges()

    def discard(self, slot: Slot[BackendSession], *, logout: bool = False) -> None:
        session = self.cache.release(slot)
        self._update_gauges()
        if session is None:
            return
        if logout:
            self._logout_later(session, "")
        else:
            session.close()

    def _logout_later(self, session: BackendSession, message: str) -> None:
        if message:
            LOGGER.info(message, session.sd)
        self._logouts.spawn(self._logout, session)

    # -- hand-over (takeover) -------------------------------------------------------------------

    def adopt(self, record: SessionRecord, sock: socket.socket) -> bool:
        """Cache a session handed over by the process this one succeeds, as it was there: the
        same user, digest and route, the time it had left; False (logged out) if it cannot be
        kept (expired, the cache off or full, its route unknown). With workers, one of
        another worker's users goes to that worker (``WorkerChannel.pass_session``)."""
        workers = self.workers
        if workers is not None and not workers.owns_record(record):
            encoded = session_transfer.encode(record)
            if workers.pass_session(encoded, record.username, sock):
                sock.close()  # the owner has its own copy now
                return True
        ttl = self.config.cache_expiration_time
        remaining = min(record.remaining_ms / 1000, ttl)
        try:
            traits = self.router.target_of(record.route).backend.traits
        except BackendFailure:
            traits = self.backend.traits
        session = takeover.session_of(record, sock, traits)
        cached_at = self.clock() + remaining - ttl
        if (
            remaining <= 0
            or self.stopping
            or not self.cache.adopt(
                record.username, record.digest, session, record.route, cached_at
            )
        ):
            self._logout_later(session, "hand-over: sd [%d] not adopted (expired or no room)")
            return False
        self.sessions_changed()
        return True

    def sessions_changed(self) -> None:
        """The cache changed outside checkout and checkin (the hand-over)."""
        self._update_gauges()
        self._expiry_wakeup.set()

    def logout_later(self, session: BackendSession) -> None:
        self._logout_later(session, "")

    def _logout(self, session: BackendSession) -> None:
        with self._logout_turns:
            session.logout()

    def _ship_or_drain(self) -> None:
        """Stopping: cached sessions go to a successor when there is one, else are logged out."""
        while self.ship is not None and (slot := self.cache.take_oldest()) is not None:
            if not self.ship(slot, slot.cached_at):
                self.discard(slot, logout=True)
        for session in self.cache.drain():
            self._logouts.spawn(self._logout, session)

    # -- expiry ---------------------------------------------------------------------------------

    def _expire_loop(self) -> None:
        while True:
            ttl = self.config.cache_expiration_time
            deadline = self.cache.next_deadline(ttl)
            timeout = None if deadline is None else max(0.0, deadline - self.clock())
            self._expiry_wakeup.wait(timeout)
            self._expiry_wakeup.clear()
            expired = self.cache.expire(self.clock(), self.config.cache_expiration_time)
            if expired:
                self._update_gauges()
                self.counters.TotalServerConnectionsExpired += len(expired)
            for session in expired:
                self._logout_later(session, "Expiring server sd [%d]")

    def reconfigure(
        self, config: Config, backend_tls: ssl.SSLContext | None, client_tls: ssl.SSLContext | None
    ) -> None:
        """Take settings that can change live (the expiry time wakes the expiry greenlet).

        New connections and logins see them; cached sessions stay.
        """
        self.config = config
        self.relay_settings = relay_settings(config)
        self.client_tls = client_tls
        self.throttle.base_delay = config.auth_failure_delay
        self.client_limit = self._client_limit(config)
        self.backend.reconfigure(config, backend_tls)
        self.router.reconfigure(config, backend_tls)
        self._expiry_wakeup.set()

    # -- listening and stopping -----------------------------------------------------------------

    def start(self, listeners: list[socket.socket], tls_listeners: list[socket.socket]) -> None:
        """Serve: clients on ``listeners`` start in clear, on ``tls_listeners`` with TLS."""
        self.counters.start(int(time.time()))
        self._expiry = gevent.spawn(self._expire_loop)
        self.router.start()
        if self.workers is not None:
            self._inbox = gevent.spawn(
                self.workers.serve, self._handed, self._admin_part, self._handed_session
            )
        for group, implicit_tls in ((listeners, False), (tls_listeners, True)):
            for listener in group:
                handle = functools.partial(
                    self._handle,
                    implicit_tls=implicit_tls,
                    local=bound_address(listener),
                    nodelay=set_nodelay(listener),
                )
                server = ClientListener(listener, handle, self.clients)
                server.start()
                self.servers.append(server)

    def _handle(
        self,
        client: socket.socket,
        address: tuple[object, ...],
        implicit_tls: bool,
        local: tuple[object, ...] | None = None,
        nodelay: bool = False,
    ) -> None:
        if len(self.clients) > self.client_limit:  # this greenlet is one of them
            self._refuse(client, address, implicit_tls)
            return
        ClientConnection(self, client, address, implicit_tls, local, nodelay).run()

    def _handed(self, handed: HandedClient, client: socket.socket) -> None:
        """A client that another worker accepted for a user of ours."""
        self.clients.spawn(self._serve_handed, handed, client)

    def _serve_handed(self, handed: HandedClient, client: socket.socket) -> None:
        with client:
            ClientConnection.handed(self, client, handed).run()

    def _handed_session(self, record: bytes, sock: socket.socket) -> None:
        """A predecessor's late session of one of our users, from the worker that took it."""
        try:
            message = session_transfer.decode(record)
        except session_transfer.TransferError as error:
            LOGGER.error("a handed session refused: %s", error)
            sock.close()
            return
        if isinstance(message, SessionRecord):
            self.adopt(message, sock)
        else:
            sock.close()

    def _admin_part(self, call: AdminCall) -> bytes:
        """Another worker asks for this one's part of an admin command or of a scrape."""
        if self.metrics is not None and call.name == METRICS_CALL:
            from imapproxy.metrics import own_figures  # loaded: there are metrics

            return own_figures(self.metrics.registry)
        return admin.part(self, call.name, call.argument)

    def _refuse(self, client: socket.socket, address: tuple[object, ...], tls: bool) -> None:
        """Over ``max_client_connections``: a BYE in place of the greeting (RFC 9051 §7.1.5).
        On the implicit-TLS port the connection is only closed: a handshake would cost what
        the limit is there to save, and clear text would garble the client's handshake."""
        if not tls:
            send_quietly(client, TOO_MANY_BYE)
        self._refused += 1
        now = self.clock()
        if now - self._refused_logged_at >= REFUSAL_LOG_INTERVAL_S:
            LOGGER.warning(
                "too many client connections (limit %d): refused %d, the latest from %s",
                self.client_limit,
                self._refused,
                format_address(address),
            )
            self._refused, self._refused_logged_at = 0, now

    def stop(self, timeout: float) -> None:
        """Stop accepting, log out cached sessions, give active clients ``timeout`` seconds."""
        self.stopping = True
        for server in self.servers:
            server.close()
        if self.ship is not None and self.workers is not None:  # handed over; the others serve
            # on: the clients they handed here are in the inbox once they answered, and they
            # hand no more (the inbox stays served until the clients below are done)
            self.workers.announce_stopping(2 * timeout + STOP_MARGIN_S)
        self._ship_or_drain()
        self._update_gauges()
        self.clients.join(timeout=timeout)
        self.clients.kill(timeout=1)
        self._logouts.join(timeout=max(1.0, timeout))
        if self._expiry is not None:
            self._expiry.kill()
        if self._inbox is not None:
            self._inbox.kill()
        self.router.stop()
