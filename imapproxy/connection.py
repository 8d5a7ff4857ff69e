"""One client connection, from greeting to close.

The pre-login dialogue (``session.PreLoginSession``) with TLS when offered (the implicit-TLS
port, or STARTTLS), the login (``Proxy.checkout``: a cached session or a new one), the relay,
and what becomes of the backend session afterwards (``Proxy.checkin``).

One triage point per connection (``run``): a known error sends its response, anything else is
logged with a traceback (which never holds a password: ``Credentials`` masks it) and the client
gets ``* BYE Internal proxy error``. Nothing escapes to the hub, nobody else is affected.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import gevent
from gevent import socket, ssl

from imapproxy import admin
from imapproxy.backend import BackendSession
from imapproxy.cache import Slot
from imapproxy.errors import BackendFailure, ClientProtocolError, FailureKind
from imapproxy.relay import Outcome, Relay, RelaySettings
from imapproxy.send import send_quietly
from imapproxy.session import (
    AdminRequested,
    Closed,
    LoginRequested,
    PreLoginPolicy,
    PreLoginSession,
    Reply,
    StartTLSRequested,
)

if TYPE_CHECKING:
    from imapproxy.server import Proxy

LOGGER = logging.getLogger("imapproxy")

REUSE_NOTICE = b"* OK [XPROXYREUSE] IMAP connection reused by imapproxy\r\n"  # Debian's text
INTERNAL_ERROR_BYE = b"* BYE Internal proxy error\r\n"
SHUTDOWN_BYE = b"* BYE imapproxy shutting down\r\n"
LOGIN_TIMEOUT_BYE = b"* BYE Login timeout\r\n"
PRELOGIN_RECV_BYTES = 16384

LoggedIn = tuple[Slot[BackendSession], bool, bytes]  # slot, reused, the login's tag


def format_address(address: tuple[object, ...]) -> str:
    return f"{address[0]}:{address[1]}" if len(address) >= 2 else str(address)


class ClientConnection:
    """One client, from greeting to close."""

    def __init__(
        self,
        proxy: Proxy,
        sock: socket.socket,
        address: tuple[object, ...],
        implicit_tls: bool = False,
    ) -> None:
        self.proxy = proxy
        self.sock = sock
        self.raw_sock = sock  # StreamServer closes this one; a TLS wrapper is ours to close
        self.address = address
        self.where = format_address(address)
        self.implicit_tls = implicit_tls
        self.tls = False
        self.session = PreLoginSession(
            PreLoginPolicy(
                capabilities=lambda: proxy.snapshot.capability_line(*self._capability_state()),
                admin_enabled=lambda: admin.allowed(proxy.config, address),
                starttls_offered=self._starttls_offered,
                login_allowed=lambda: self.tls or not proxy.config.client_tls_required,
            )
        )

    def _starttls_offered(self) -> bool:
        return (
            not self.tls and self.proxy.client_tls is not None and self.proxy.config.client_starttls
        )

    def _capability_state(self) -> tuple[bool, bool]:
        """(STARTTLS offered, LOGINDISABLED) for this connection now."""
        return self._starttls_offered(), not self.tls and self.proxy.config.client_tls_required

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
            if self.sock is not self.raw_sock:
                self.sock.close()

    def _send(self, data: bytes) -> bool:
        return send_quietly(self.sock, data)

    def _serve(self) -> None:
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.proxy.stopping:
            self._send(SHUTDOWN_BYE)
            return
        deadline = gevent.Timeout(self.proxy.config.client_login_timeout)
        deadline.start()
        try:
            login = self._before_login()
        except gevent.Timeout as timeout:
            if timeout is not deadline:
                raise
            self._send(LOGIN_TIMEOUT_BYE)
            return
        finally:
            deadline.close()
        if login is not None:
            self._logged_in(*login)

    def _before_login(self) -> LoggedIn | None:
        """TLS first on the implicit-TLS port, the greeting, then the pre-login dialogue."""
        if self.implicit_tls and not self._handshake():
            return None
        if not self._send(self.proxy.snapshot.greeting(*self._capability_state())):
            return None
        return self._prelogin()

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

    def _login(self, request: LoginRequested) -> LoggedIn | None:
        self.proxy.counters.TotalClientLogins += 1
        try:
            slot, reused = self.proxy.checkout(
                request.credentials, self.session.client_id, self.where
            )
        except BackendFailure as error:
            self.proxy.counters.TotalLoginFailures += 1
            if error.kind is FailureKind.AUTH_REJECTED:  # brute force: make it slow
                gevent.sleep(
                    self.proxy.throttle.failed(request.credentials.username, str(self.address[0]))
                )
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
            how = "existing" if reused else "new"
            trace.proxy(f"LOGIN on {how} sd [{session.sd}] on server {session.server}")
        return Relay(self.sock, session, self.session.framer, settings, self.proxy.counters, trace)
