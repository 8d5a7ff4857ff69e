"""One client connection, from greeting to close.

The PROXY protocol header first when the connection comes from a load balancer
(``proxy_protocol_trusted_networks``: its address is the client's from then on), the pre-login
dialogue (``session.PreLoginSession``) with TLS when offered (the implicit-TLS port, or
STARTTLS), the login (``Proxy.checkout``: a cached session or a new one), the relay, and what
becomes of the backend session afterwards (``Proxy.checkin``).

One triage point per connection (``run``): a known error sends its response, anything else is
logged with a traceback (which never holds a password: ``Credentials`` masks it) and the client
gets ``* BYE Internal proxy error``. Nothing escapes to the hub, nobody else is affected.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import gevent
from gevent import socket, ssl

from imapproxy import admin, proxy_protocol, worker_channel
from imapproxy.backend import BackendSession
from imapproxy.cache import Slot
from imapproxy.config import in_networks
from imapproxy.errors import BackendFailure, ClientProtocolError, FailureKind
from imapproxy.forwarding import ClientOrigin, unmapped
from imapproxy.log import host_port
from imapproxy.protocol.framing import Line
from imapproxy.protocol.proxy_header import ProxyHeaderError
from imapproxy.relay import IDLE_TIMEOUT_BYE, Outcome, Relay, RelaySettings
from imapproxy.reuse_check import goes_with_the_check
from imapproxy.send import send_quietly
from imapproxy.session import (
    AdminRequested,
    Closed,
    LoginRequested,
    PreLoginSession,
    Reply,
    StartTLSRequested,
)
from imapproxy.waits import SocketWaits
from imapproxy.worker_message import HandedClient

if TYPE_CHECKING:
    from imapproxy.credentials import Credentials
    from imapproxy.metrics import Metrics
    from imapproxy.throttle import LoginThrottle
    from imapproxy.worker_channel import WorkerChannel


class Greeter(Protocol):
    """The greeting and pre-login capabilities for a connection's state."""

    def greeting(self, starttls: bool = False, login_disabled: bool = False) -> bytes: ...

    def capability_line(self, starttls: bool = False, login_disabled: bool = False) -> bytes: ...


class SessionBroker(admin.AdminView, Protocol):
    """What a client connection needs of the proxy: check a backend session out (and
    confirm a reuse), check it back in; the settings, counters and throttle it obeys; and,
    for its admin commands, ``admin.AdminView``. ``server.Proxy`` is one."""

    @property
    def snapshot(self) -> Greeter: ...  # read only: it is replaced, never changed here

    client_tls: ssl.SSLContext | None
    relay_settings: RelaySettings  # from the configuration in force
    stopping: bool
    throttle: LoginThrottle
    metrics: Metrics | None
    workers: WorkerChannel | None

    def checkout(
        self,
        credentials: Credentials,
        client_id: tuple[bytes | None, ...] | None,
        where: str,
        origin: ClientOrigin | None = None,
    ) -> tuple[Slot[BackendSession], bool]: ...

    def start_check(
        self,
        slot: Slot[BackendSession],
        client_id: tuple[bytes | None, ...] | None,
        *,
        answered: bool,
    ) -> None: ...

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
    ) -> Slot[BackendSession]: ...

    def checkin(
        self, slot: Slot[BackendSession], outcome: Outcome, then: Callable[[], object] | None = None
    ) -> None: ...

    def log_reuse(
        self, session: BackendSession, username: str, where: str, origin: ClientOrigin | None
    ) -> None: ...


LOGGER = logging.getLogger("imapproxy")

REUSE_NOTICE = b"* OK [XPROXYREUSE] IMAP connection reused by imapproxy\r\n"  # Debian's text
INTERNAL_ERROR_BYE = b"* BYE Internal proxy error\r\n"
SHUTDOWN_BYE = b"* BYE imapproxy shutting down\r\n"
LOGIN_TIMEOUT_BYE = b"* BYE Login timeout\r\n"
SESSION_LOST_BYE = b"* BYE IMAP server unavailable, try again later\r\n"
PRELOGIN_RECV_BYTES = 16384
SEND_MARGIN_S = 10  # beyond the time a client is given: a wait of a send to it is bounded

LoggedIn = tuple[Slot[BackendSession], bool, LoginRequested]  # slot, reused, the login


def format_address(address: tuple[object, ...]) -> str:
    return host_port(address[0], address[1]) if len(address) >= 2 else str(address)


_SESSION_PREFIX = secrets.token_urlsafe(6)  # drawn once per process
_session_numbers = itertools.count(1)


def new_session_id() -> str:
    """The proxy's id of a client connection (``x-session-id``; Dovecot logs it as session=)."""
    return f"{_SESSION_PREFIX}{next(_session_numbers):08x}"


class ClientConnection:
    """One client, from greeting to close."""

    def __init__(
        self,
        proxy: SessionBroker,
        sock: socket.socket,
        address: tuple[object, ...],
        implicit_tls: bool = False,
        local: tuple[object, ...] | None = None,
        nodelay: bool = False,
    ) -> None:
        self.proxy = proxy
        self.sock = sock
        self.local = local  # the address connected to, when the listener has only one
        self.nodelay = nodelay  # TCP_NODELAY already on, from the listener
        self.raw_sock = sock  # StreamServer closes this one; a TLS wrapper is ours to close
        self.address = address  # the client's: from the PROXY header when there is one
        self.connected_to: tuple[object, ...] | None = None  # from the PROXY header
        self.where = format_address(address)
        self.session_id = ""
        self._origin: ClientOrigin | None = None
        self.implicit_tls = implicit_tls
        self.sent_early: Line | None = None  # a first command sent behind the reuse check
        self._login_done: LoggedIn | None = None  # the login until _logged_in takes it
        self._handed_login: LoginRequested | None = None  # a login another worker took
        self._tls_relay: socket.socket | None = None  # a TLS client's way to its owner worker
        self._waits: SocketWaits | None = None  # once logged in (``_client_waits``)
        self.tls = False
        self.session = PreLoginSession(self)  # the connection is its policy (session.Policy)

    @classmethod
    def handed(
        cls, proxy: SessionBroker, sock: socket.socket, handed: HandedClient
    ) -> ClientConnection:
        """A client that another worker accepted, for a user of this one: its login goes on
        here as if it had arrived here (greeting, ``ID`` and bytes read after the login
        command as the other worker had them)."""
        connection = cls(proxy, sock, handed.address)
        connection.connected_to = handed.connected_to
        connection.session_id = handed.session_id
        connection.tls = handed.tls
        connection.session.client_id = handed.client_id
        if handed.unread:  # b"" would be the end of the stream
            connection.session.framer.receive_data(handed.unread)
        connection._handed_login = LoginRequested(handed.tag, handed.credentials)
        return connection

    # -- session.Policy: what the pre-login dialogue asks of this connection ---------------------

    def capabilities(self) -> bytes:
        return self.proxy.snapshot.capability_line(*self._capability_state())

    def admin_enabled(self) -> bool:
        return admin.allowed(self.proxy.config, self.address)

    def starttls_offered(self) -> bool:
        return (
            not self.tls and self.proxy.client_tls is not None and self.proxy.config.client_starttls
        )

    def login_allowed(self) -> bool:
        return self.tls or not self.proxy.config.client_tls_required

    def _capability_state(self) -> tuple[bool, bool]:
        """(STARTTLS offered, LOGINDISABLED) for this connection now."""
        return self.starttls_offered(), not self.tls and self.proxy.config.client_tls_required

    def run(self) -> None:
        counters = self.proxy.counters
        if self._handed_login is None:
            counters.client_connected()
        else:
            counters.client_arrived()
        try:
            self._serve()
        except ClientProtocolError as error:
            self._send(error.response())
        except Exception:
            LOGGER.exception("internal error serving client %s", self.where)
            self._send(INTERNAL_ERROR_BYE)
        finally:
            counters.client_disconnected()
            if self._waits is not None:
                self._waits.close()
            if self.proxy.metrics is not None:  # self.sock: TLS detaches raw_sock from its fd
                self.proxy.metrics.client_closed(self.sock)
            if self.sock is not self.raw_sock:
                self.sock.close()

    def _send(self, data: bytes) -> bool:
        # bounded: the login's deadline covers the dialogue, not the BYE after it nor the
        # login's reply (the socket's own timeout stays None: a read keeps no timer per wait)
        return send_quietly(self.sock, data, self.proxy.config.client_login_timeout + SEND_MARGIN_S)

    def _serve(self) -> None:
        if not self.nodelay and self._handed_login is None:  # handed: set where accepted
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # a handed client is served even now: its login began in a worker still accepting,
        # and a stopping worker finishes its clients (a hand-over ships the session after)
        if self.proxy.stopping and self._handed_login is None:
            self._send(SHUTDOWN_BYE)
            return
        deadline = gevent.Timeout(self.proxy.config.client_login_timeout)
        deadline.start()
        try:
            self._login_done = self._before_login()
        except gevent.Timeout as timeout:
            if timeout is not deadline:
                raise
            self._send(LOGIN_TIMEOUT_BYE)
            return
        finally:
            deadline.close()
        if self._login_done is not None:  # held by the connection, not by this frame:
            self._logged_in()  # _logged_in lets the credentials go once the reuse is sure
        elif self._tls_relay is not None:  # handed to the owner worker: carry its bytes
            idle = self.proxy.config.client_idle_timeout  # the owner's, which ends it first
            worker_channel.relay_tls_client(self.sock, self._tls_relay, idle + SEND_MARGIN_S)

    def _before_login(self) -> LoggedIn | None:
        """The PROXY header if from HAProxy, TLS first on the implicit-TLS port, the greeting,
        then the pre-login dialogue; for a client handed by another worker, its login."""
        if self._handed_login is not None:
            request, self._handed_login = self._handed_login, None
            return self._login(request) or self._prelogin()
        if not self._proxy_header():
            return None
        if self.implicit_tls and not self._handshake():
            return None
        if not self._send(self.proxy.snapshot.greeting(*self._capability_state())):
            return None
        return self._prelogin()

    def _proxy_header(self) -> bool:
        """From ``proxy_protocol_trusted_networks``, a connection must start with a PROXY
        header (never guessed), whose addresses become the client's; False: it did not."""
        if not in_networks(str(self.address[0]), self.proxy.config.proxy_protocol_trusted_networks):
            return True
        try:
            header = proxy_protocol.read_header(self.raw_sock)
        except ProxyHeaderError as error:
            LOGGER.info("PROXY header from %s refused: %s", self.where, error)
            if self.proxy.metrics is not None:
                self.proxy.metrics.proxy_header_refusals += 1
            return False
        if header.client is not None:  # None: LOCAL (a health check) or no address given
            self.address, self.connected_to = header.client, header.server
            self.where = format_address(self.address)
        return True

    def origin(self) -> ClientOrigin:
        """Who the client is, for the server (``forwarding``) and ``reuse_same_client_address``;
        made once per connection (a login and the confirmation of its reuse ask twice)."""
        if self._origin is None:
            if not self.session_id:
                self.session_id = new_session_id()
            local: tuple[Any, ...] = (  # TLS: the wrapper's
                self.connected_to or self.local or self.sock.getsockname()
            )
            client: tuple[Any, ...] = self.address
            trusted = in_networks(str(client[0]), self.proxy.config.forward_trusted_networks)
            client_ip, local_ip = unmapped(str(client[0])), unmapped(str(local[0]))
            self._origin = ClientOrigin(
                client_ip, int(client[1]), local_ip, int(local[1]), self.session_id, trusted
            )
        return self._origin

    def _handshake(self) -> bool:
        """Server-side TLS handshake (cooperative: other clients go on meanwhile)."""
        context = self.proxy.client_tls
        if context is None:
            return False
        try:
            self.sock = context.wrap_socket(self.raw_sock, server_side=True)
        except (ssl.SSLError, OSError) as error:
            LOGGER.info("TLS handshake with client %s failed: %s", self.where, error)
            return False
        self.tls = True
        return True

    def _prelogin(self) -> LoggedIn | None:
        """Answer the client until it logs in; return the slot, whether reused, and the tag."""
        while True:
            action = self.session.next_action()
            if isinstance(action, Reply):
                if not self._send(action.data) or action.close:
                    return None
            elif isinstance(action, LoginRequested):
                if self._handed_to_owner(action):
                    return None
                result = self._login(action)
                if result is not None:
                    return result
            elif isinstance(action, AdminRequested):
                self._send(admin.execute(self.proxy, action))
            elif isinstance(action, StartTLSRequested):
                if not self._send(action.reply()) or not self._handshake():
                    return None
                self.session.tls_started()
            elif isinstance(action, Closed):
                return None
            else:
                self.session.receive_data(self._receive())

    def _receive(self) -> bytes:
        try:
            return self.sock.recv(PRELOGIN_RECV_BYTES)
        except OSError:
            return b""

    def _handed_to_owner(self, request: LoginRequested) -> bool:
        """With ``workers N``: the login of a user another worker owns goes there, with this
        connection (``worker_channel``); False: it is served here (ours, or it could not go)."""
        workers = self.proxy.workers
        if workers is None or self.proxy.stopping:  # stopping: the owner may be gone already
            return False
        owner = workers.owner(request.credentials.username)
        if owner == workers.index:
            return False
        message = self._handed_message(request)
        if not self.tls:
            handed = workers.hand_over(owner, message, self.raw_sock)
        else:
            ours, theirs = socket.socketpair()
            with theirs:
                handed = workers.hand_over(owner, message, theirs)
            if handed:
                self._tls_relay = ours  # relayed by this worker: TLS cannot change process
            else:
                ours.close()
        if handed:
            LOGGER.info(
                "LOGIN: '%s' (%s) handed to worker %d%s",
                request.credentials.username_text,
                self.where,
                owner,
                " (TLS, relayed)" if self.tls else "",
            )
        return handed

    def _handed_message(self, request: LoginRequested) -> HandedClient:
        """What the owner worker needs to go on with this login as if it had arrived there."""
        local: tuple[Any, ...] = self.connected_to or self.local or self.sock.getsockname()
        client: tuple[Any, ...] = self.address
        return HandedClient(
            tag=request.tag,
            credentials=request.credentials,
            client_id=self.session.client_id,
            unread=self.session.framer.buffered(),
            address=(str(client[0]), int(client[1])),
            connected_to=(str(local[0]), int(local[1])),
            session_id=self.session_id or new_session_id(),
            tls=self.tls,
        )

    def _login(self, request: LoginRequested) -> LoggedIn | None:
        self.proxy.counters.login_requested()
        started = time.perf_counter()
        try:
            slot, reused = self.proxy.checkout(
                request.credentials, self.session.client_id, self.where, self.origin()
            )
        except BackendFailure as error:
            self.proxy.counters.TotalLoginFailures += 1
            delay = 0.0
            if error.kind is FailureKind.AUTH_REJECTED:  # brute force: make it slow
                delay = self.proxy.throttle.failed(
                    request.credentials.username, str(self.address[0])
                )
                gevent.sleep(delay)
            if self.proxy.metrics is not None:
                self.proxy.metrics.login_failed(error.kind, delay > self.proxy.throttle.base_delay)
            LOGGER.info(
                "LOGIN: '%s' (%s) failed: %s",
                request.credentials.username_text,
                self.where,
                error.detail,
            )
            self._send(error.response(request.tag))
            return None
        if self.proxy.metrics is not None:
            self.proxy.metrics.logged_in(reused, time.perf_counter() - started)
        return slot, reused, request

    def _logged_in(self) -> None:
        """Answer the login, confirm a reuse, relay, check the session back in. The
        credentials (``LoginRequested``) are dropped as soon as the reuse is confirmed: the
        relay never holds them."""
        assert self._login_done is not None
        slot, reused, request = self._login_done
        self._login_done = None
        session = slot.session
        assert session is not None
        login = session.login
        reply = b"".join(login.untagged) + request.tag + b" " + login.reply + b"\r\n"
        sent = self._send(REUSE_NOTICE + reply if reused else reply)
        if reused:
            self.proxy.start_check(slot, self.session.client_id, answered=True)
            username = request.credentials.username_text
            self.proxy.log_reuse(session, username, self.where, self._origin)
            confirmed = self._confirm(slot, request, sent)
            del request  # the check is read: nothing here needs the password any more
            if confirmed is None:
                return
            # the slot may be the same one, freed and taken again: the session tells
            reused, slot = confirmed.session is session, confirmed
            session = slot.session
            assert session is not None
        else:
            del request
        if not sent:
            self.proxy.checkin(slot, Outcome.RESYNCED)  # gone before its first command: idle
            return
        relay = None
        outcome = Outcome.CLOSED
        try:
            relay = self._relay(session, reused)
            outcome = relay.run()
        finally:
            # the farewell once the session is cached: the next login can reuse it already
            self.proxy.checkin(slot, outcome, self._farewell(relay))

    def _farewell(self, relay: Relay | None) -> Callable[[], object] | None:
        if relay is None or not relay.farewell:
            return None
        return lambda: relay.client_alive and self._send(relay.farewell)

    def _confirm(
        self, slot: Slot[BackendSession], request: LoginRequested, sent: bool
    ) -> Slot[BackendSession] | None:
        """The overlap of a reuse: the client's next command is awaited while the session's
        check (sent at checkout or just after the client's answer) travels, then the check is
        read. A session that failed it is replaced by a new one, opened with the credentials
        this connection still holds (and drops afterwards); the client notices nothing. None
        if no session can be had."""
        framer = self.session.framer
        if sent and not framer.has_input:
            framer.receive_data(self._receive_first_command())
        early = self._send_with_the_check(slot) if sent else None
        original = slot.session
        try:
            confirmed = self.proxy.confirm(
                slot,
                request.credentials,
                self.session.client_id,
                self.where,
                self.origin(),
                merged=early is not None,
                replace=sent,  # a client already gone needs no new session
            )
        except BackendFailure as error:
            LOGGER.info(
                "LOGIN: '%s' (%s) no session after a dead cached one: %s",
                request.credentials.username_text,
                self.where,
                error.detail,
            )
            self._send(SESSION_LOST_BYE)
            return None
        if early is not None and confirmed.session is original:  # sent to it: taken here
            line = framer.next_event()
            assert isinstance(line, Line) and line.data == early
            self.sent_early = line
        return confirmed

    def _send_with_the_check(self, slot: Slot[BackendSession]) -> bytes | None:
        """SELECT cache off: the page's SELECT goes right behind the reuse check, so that the
        client waits once for both (``reuse_check.goes_with_the_check``); the line sent."""
        line = self.session.framer.peek_line()
        if self.proxy.config.enable_select_cache or line is None or not goes_with_the_check(line):
            return None
        session = slot.session
        assert session is not None
        try:
            session.send(line)
        except OSError:
            return None  # the check will find the session dead
        return line

    def _receive_first_command(self) -> bytes:
        try:
            return self._client_waits().recv(
                PRELOGIN_RECV_BYTES, self.proxy.config.client_idle_timeout
            )
        except TimeoutError:
            self._send(IDLE_TIMEOUT_BYE)
            return b""
        except OSError:
            return b""

    def _client_waits(self) -> SocketWaits:
        """The logged-in client's reads with a time limit (its socket is final by then)."""
        if self._waits is None or self._waits.sock is not self.sock:
            self._waits = SocketWaits(self.sock)
        return self._waits

    def _relay(self, session: BackendSession, reused: bool) -> Relay:
        tracer = self.proxy.tracer
        trace = tracer.for_user(session.username, session.sd) if tracer else None
        if trace is not None:
            how = "existing" if reused else "new"
            trace.proxy(
                f"LOGIN on {how} sd [{session.sd}] on server {session.server}"
                f" for client {self.where}"
            )
        sent_early, self.sent_early = self.sent_early, None
        return Relay(
            self.sock,
            session,
            self.session.framer,
            self.proxy.relay_settings,
            self.proxy.counters,
            trace,
            sent_early,
            self._client_waits(),
        )
