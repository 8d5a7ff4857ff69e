"""The proxy at run time: listeners, one greenlet per client, the connection cache, expiry.

``Proxy`` holds what all clients share: the configuration, the ``Backend``, the connection
cache and the counters, the greeting and pre-login capabilities (refreshed from every new
backend connection), and the expiry greenlet. ``ClientConnection`` runs one client from
greeting to close: the pre-login dialogue (``session.PreLoginSession``), the login (reuse of a
cached session or a new one), the relay, and what becomes of the backend session afterwards.

One triage point per connection (``ClientConnection.run``): a known error sends its response,
anything else is logged with a traceback (which never holds a password: ``Credentials`` masks
it) and the client gets ``* BYE Internal proxy error``. Nothing escapes to the hub.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import gevent
from gevent import socket
from gevent.event import Event
from gevent.pool import Group
from gevent.server import StreamServer

from imapproxy import admin
from imapproxy.backend import Backend, BackendSession
from imapproxy.backend_login import LoginResult
from imapproxy.cache import ConnectionCache, Slot
from imapproxy.config import Config
from imapproxy.credentials import CredentialHasher, Credentials
from imapproxy.errors import BackendFailure, ClientProtocolError, FailureKind
from imapproxy.protocol import capability
from imapproxy.relay import Outcome, Relay, RelaySettings
from imapproxy.session import (
    AdminRequested,
    Closed,
    LoginRequested,
    PreLoginPolicy,
    PreLoginSession,
    Reply,
    id_command_args,
)
from imapproxy.stats import Counters
from imapproxy.trace import Tracer

LOGGER = logging.getLogger("imapproxy")

REUSE_NOTICE = b"* OK [XPROXYREUSE] IMAP connection reused by imapproxy\r\n"  # Debian's text
INTERNAL_ERROR_BYE = b"* BYE Internal proxy error\r\n"
SHUTDOWN_BYE = b"* BYE imapproxy shutting down\r\n"
PRELOGIN_RECV_BYTES = 16384
LOGOUT_CONCURRENCY = 64  # expiring/evicted sessions logged out at once, at most


@dataclass
class Snapshot:
    """The backend's greeting text and the pre-login capability list clients see."""

    greeting_text: bytes = b"imapproxy ready."
    capabilities: tuple[bytes, ...] = ()

    def greeting(self) -> bytes:
        return b"* OK [CAPABILITY %s] %s\r\n" % (b" ".join(self.capabilities), self.greeting_text)

    def capability_line(self) -> bytes:
        return b"* CAPABILITY " + b" ".join(self.capabilities)


def _now() -> float:
    return time.monotonic()


class Proxy:
    """State shared by all client connections."""

    def __init__(
        self,
        config: Config,
        backend: Backend,
        counters: Counters,
        clock: Callable[[], float] = _now,
    ) -> None:
        self.config = config
        self.backend = backend
        self.counters = counters
        self.clock = clock
        self.cache: ConnectionCache[BackendSession] = ConnectionCache(config.cache_size)
        self.hasher = CredentialHasher()
        self.snapshot = Snapshot()
        self.tracer: Tracer | None = None
        self.servers: list[StreamServer] = []
        self.clients: Group = Group()
        self._logouts = gevent.pool.Pool(LOGOUT_CONCURRENCY)
        self._expiry_wakeup = Event()
        self._expiry: gevent.Greenlet | None = None
        self.stopping = False

    # -- capabilities ---------------------------------------------------------------------------

    def refresh(self, result: LoginResult) -> None:
        """Adopt the greeting and pre-login capabilities of a new backend connection."""
        caps = capability.for_clients(result.prelogin_capabilities)
        if (
            caps != self.snapshot.capabilities
            or result.greeting_text != self.snapshot.greeting_text
        ):
            self.snapshot = Snapshot(result.greeting_text, caps)

    # -- sessions -------------------------------------------------------------------------------

    def _update_gauges(self) -> None:
        self.counters.set_server_connections(self.cache.active_count, self.cache.cached_count)

    def checkout(
        self, credentials: Credentials, client_id: tuple[bytes | None, ...] | None, where: str
    ) -> tuple[Slot[BackendSession], bool]:
        """A backend session for these credentials: a cached one if alive, else a new one."""
        digest = self.hasher.digest(credentials)
        while (slot := self.cache.take_cached(credentials.username, digest)) is not None:
            self._update_gauges()
            session = slot.session
            assert session is not None
            try:
                session.check_alive(id_command_args(client_id) if client_id else None)
            except (BackendFailure, OSError) as error:
                LOGGER.info(
                    "LOGIN: '%s' (%s) cached sd [%d] is dead (%s): creating a new one",
                    credentials.username_text,
                    where,
                    session.sd,
                    _why(error),
                )
                self.discard(slot)
                continue
            self.counters.TotalServerConnectionsReused += 1
            LOGGER.info(
                "LOGIN: '%s' (%s) on existing sd [%d]", credentials.username_text, where, session.sd
            )
            return slot, True
        return self._new_session(credentials, client_id, digest, where), False

    def _new_session(
        self,
        credentials: Credentials,
        client_id: tuple[bytes | None, ...] | None,
        digest: bytes,
        where: str,
    ) -> Slot[BackendSession]:
        slot, evicted = self.cache.acquire()
        if evicted is not None:
            self._logout_later(evicted, "Expiring server sd [%d] to make room")
        if slot is None:
            self.counters.TotalCapacityRefusals += 1
            raise BackendFailure(FailureKind.CAPACITY, f"all {self.cache.size} slots active")
        self._update_gauges()
        try:
            session = self.backend.open_session(credentials, client_id)
        except BaseException:
            self.cache.release(slot)
            self._update_gauges()
            raise
        self.refresh(session.login)
        self.cache.assign(slot, credentials.username, digest, session)
        for stale in self.cache.stale_for(credentials.username, digest):
            self._logout_later(stale, "Expiring server sd [%d]: opened with an older password")
        self._update_gauges()
        self.counters.TotalServerConnectionsCreated += 1
        LOGGER.info("LOGIN: '%s' (%s) on new sd [%d]", credentials.username_text, where, session.sd)
        return slot

    def checkin(self, slot: Slot[BackendSession], outcome: Outcome) -> None:
        """The client is done with the session: cache it, or close it."""
        session = slot.session
        assert session is not None
        if outcome is Outcome.RESYNCED:
            self.counters.TotalClientAbortsResynced += 1
        if not outcome.reusable:
            self.counters.TotalServerConnectionsDropped += 1
            LOGGER.info("Invalidating server sd [%d]", session.sd)
            self.discard(slot)
            return
        if self.stopping or self.config.cache_expiration_time == 0:
            self.discard(slot, logout=True)
            return
        LOGGER.info(
            "LOGOUT: '%s' from server sd [%d]",
            session.username.decode("utf-8", "replace"),
            session.sd,
        )
        was_empty = self.cache.cached_count == 0
        self.cache.cache(slot, self.clock())
        self._update_gauges()
        if was_empty:
            self._expiry_wakeup.set()

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
        self._logouts.spawn(session.logout)

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

    def reconfigure(self, config: Config) -> None:
        """Take settings that can change live (the expiry time wakes the expiry greenlet).

        New connections and logins see them; cached sessions stay.
        """
        self.config = config
        self.backend.reconfigure(config)
        self._expiry_wakeup.set()

    # -- listening and stopping -----------------------------------------------------------------

    def start(self, listeners: list[socket.socket]) -> None:
        self.counters.start(int(time.time()))
        self._expiry = gevent.spawn(self._expire_loop)
        for listener in listeners:
            server = StreamServer(listener, self._handle, spawn=self.clients.spawn)
            server.start()
            self.servers.append(server)

    def _handle(self, client: socket.socket, address: tuple[object, ...]) -> None:
        ClientConnection(self, client, address).run()

    def stop(self, timeout: float) -> None:
        """Stop accepting, log out cached sessions, give active clients ``timeout`` seconds."""
        self.stopping = True
        for server in self.servers:
            server.close()
        for session in self.cache.drain():
            self._logouts.spawn(session.logout)
        self._update_gauges()
        self.clients.join(timeout=timeout)
        self.clients.kill(block=True, timeout=1)
        self._logouts.join(timeout=max(1.0, timeout))
        if self._expiry is not None:
            self._expiry.kill()


def _why(error: BaseException) -> str:
    return error.detail if isinstance(error, BackendFailure) else str(error) or type(error).__name__


def format_address(address: tuple[object, ...]) -> str:
    return f"{address[0]}:{address[1]}" if len(address) >= 2 else str(address)


class ClientConnection:
    """One client, from greeting to close."""

    def __init__(self, proxy: Proxy, sock: socket.socket, address: tuple[object, ...]) -> None:
        self.proxy = proxy
        self.sock = sock
        self.address = address
        self.where = format_address(address)
        self.session = PreLoginSession(
            PreLoginPolicy(
                capabilities=lambda: proxy.snapshot.capability_line(),
                admin_enabled=lambda: admin.allowed(proxy.config, address),
            )
        )

    def run(self) -> None:
        counters = self.proxy.counters
        counters.client_connected()
        try:
            self._serve()
        except ClientProtocolError as error:
            self._send(error.response())
        except Exception:
            LOGGER.exception("internal error serving client %s", self.where)
            self._send(INTERNAL_ERROR_BYE)
        finally:
            counters.client_disconnected()

    def _send(self, data: bytes) -> bool:
        try:
            self.sock.sendall(data)
        except OSError:
            return False
        return True

    def _serve(self) -> None:
        sock = self.sock
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.proxy.stopping:
            self._send(SHUTDOWN_BYE)
            return
        if not self._send(self.proxy.snapshot.greeting()):
            return
        deadline = gevent.Timeout(self.proxy.config.client_login_timeout)
        deadline.start()
        try:
            login = self._prelogin()
        except gevent.Timeout as timeout:
            if timeout is not deadline:
                raise
            self._send(b"* BYE Login timeout\r\n")
            return
        finally:
            deadline.close()
        if login is not None:
            self._logged_in(*login)

    def _prelogin(self) -> tuple[Slot[BackendSession], bool, bytes] | None:
        """Answer the client until it logs in; return the slot, whether reused, and the tag."""
        session = self.session
        while True:
            action = session.next_action()
            if isinstance(action, Reply):
                if not self._send(action.data) or action.close:
                    return None
            elif isinstance(action, LoginRequested):
                result = self._login(action)
                if result is not None:
                    return result
            elif isinstance(action, AdminRequested):
                self._send(admin.execute(self.proxy, action))
            elif isinstance(action, Closed):
                return None
            else:
                data = self.sock.recv(PRELOGIN_RECV_BYTES)
                session.receive_data(data)

    def _login(self, request: LoginRequested) -> tuple[Slot[BackendSession], bool, bytes] | None:
        self.proxy.counters.TotalClientLogins += 1
        try:
            slot, reused = self.proxy.checkout(
                request.credentials, self.session.client_id, self.where
            )
        except BackendFailure as error:
            self.proxy.counters.TotalLoginFailures += 1
            LOGGER.info(
                "LOGIN: '%s' (%s) failed: %s",
                request.credentials.username_text,
                self.where,
                error.detail,
            )
            self._send(error.response(request.tag))
            return None
        return slot, reused, request.tag

    def _logged_in(self, slot: Slot[BackendSession], reused: bool, tag: bytes) -> None:
        session = slot.session
        assert session is not None
        login = session.login
        reply = b"".join(login.untagged) + tag + b" " + login.reply + b"\r\n"
        if not self._send(REUSE_NOTICE + reply if reused else reply):
            self.proxy.checkin(slot, Outcome.RESYNCED)  # gone before its first command: idle
            return
        relay = self._relay(session, reused)
        outcome = Outcome.CLOSED
        try:
            outcome = relay.run()
        finally:
            self.proxy.checkin(slot, outcome)
        if relay.farewell and relay.client_alive:  # after checkin: the next login can reuse it
            self._send(relay.farewell)

    def _relay(self, session: BackendSession, reused: bool) -> Relay:
        config = self.proxy.config
        settings = RelaySettings(
            response_timeout=config.server_response_timeout,
            idle_timeout=config.client_idle_timeout,
            select_cache=config.enable_select_cache,
        )
        tracer = self.proxy.tracer
        trace = tracer.for_user(session.username, session.sd) if tracer else None
        if trace is not None:
            trace.proxy(f"LOGIN on {'existing' if reused else 'new'} sd [{session.sd}]")
        return Relay(self.sock, session, self.session.framer, settings, self.proxy.counters, trace)
