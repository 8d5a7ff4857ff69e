"""After login: relaying one client's session to its backend session, and ending it cleanly.

Sequential mode, the normal one: the connection's greenlet frames the client's commands
(``CommandFramer``), notes each tag as outstanding, forwards them (one ``sendall`` per read),
then copies the backend's replies to the client (``Copier``) until every outstanding command is
complete, or until a ``+`` asks the client for more (a literal, a SASL line), and only then
reads the client again. Webmail is request/response: no second greenlet, no wake-ups, no
buffer held between commands.

Duplex mode, for IDLE and NOTIFY, where the server speaks unprompted: a pump greenlet copies
backend bytes while the connection's greenlet waits for the client (IDLE's ``DONE``); once the
IDLE is over the pump is stopped (parked in ``recv``, nothing read is lost) and the session is
sequential again (``duplex``).

What each line is and what follows from it is decided by ``relay_state`` (sans-I/O); this
module carries it out. The proxy intercepts ``LOGOUT``, refuses ``COMPRESS`` and, with the
SELECT cache on, answers ``SELECT`` itself (``select_relay``, ``select_cache``).

The relay ends ``REUSABLE``/``RESYNCED`` (the backend session is idle at a response boundary,
every outstanding command complete, and back in the authenticated state unless the SELECT
cache is on) or ``CLOSED`` (it cannot be trusted: client
gone mid-literal, protocol desync, timeout, backend gone). A session is never cached with
replies in flight: when a client vanishes mid-command, IDLE gets ``DONE``, AUTHENTICATE ``*``,
and outstanding replies are drained (within ``DRAIN_MAX_BYTES`` and the response timeout).
"""

from __future__ import annotations

import contextlib
import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass

from gevent import socket
from gevent.hub import Waiter

from imapproxy.backend import BackendSession
from imapproxy.copier import BackendGone, Copier, DrainExceeded
from imapproxy.duplex import Pump
from imapproxy.errors import BackendFailure, FailureKind, why
from imapproxy.protocol.framing import (
    AWAIT_CONTINUATION,
    NEED_DATA,
    ClientClosed,
    CommandFramer,
    Line,
    LineTooLong,
    LiteralData,
)
from imapproxy.protocol.framing import Event as FramerEvent
from imapproxy.protocol.grammar import CommandStart, split_command_line
from imapproxy.relay_state import Kind, RelayState
from imapproxy.select_relay import SelectRelay, SelectTooBig
from imapproxy.send import send_all, send_quietly
from imapproxy.stats import Counters
from imapproxy.trace import SessionTrace
from imapproxy.waits import SocketWaits

LOGGER = logging.getLogger("imapproxy")

# Dovecot's imap_max_line_length default (64 KiB): after login, longer client lines are refused.
POSTLOGIN_MAX_LINE_BYTES = 65536
CLIENT_RECV_BYTES = 65536

LOGOUT_REPLY = b"* BYE LOGOUT received\r\n%s OK Completed\r\n"  # up-imapproxy's texts
COMPRESS_REFUSAL = b"%s NO [CANNOT] COMPRESS is not available through imapproxy\r\n"
IDLE_TIMEOUT_BYE = b"* BYE Autologout; idle for too long\r\n"
BACKEND_LOST_BYE = b"* BYE IMAP server connection lost\r\n"
SESSION_FAILED_BYE = b"* BYE IMAP session failed\r\n"


class Outcome(enum.Enum):
    REUSABLE = "reusable"  # the client logged out; the session is idle, in sync: may be cached
    RESYNCED = "resynced"  # the client vanished, but the session was brought back in sync
    CLOSED = "closed"  # must be closed

    @property
    def reusable(self) -> bool:
        return self is not Outcome.CLOSED


@dataclass(frozen=True)
class RelaySettings:
    response_timeout: float  # server_response_timeout
    idle_timeout: float  # client_idle_timeout: also how long a command's reply may take
    select_cache: bool  # enable_select_cache: SELECTs on the control plane, mailbox kept
    reuse_after_enable: bool = False  # a session on which ENABLE was sent may be cached


class _Desync(Exception):
    """The session can no longer be trusted to be in sync."""


class _ClientGone(Exception):
    """The client closed its side while the proxy was reading a command of its own."""


_CLIENT, _BACKEND, _TIMEOUT = "client", "backend", "timeout"  # what ended a wait


class Relay:
    """One client's logged-in session."""

    def __init__(
        self,
        client: socket.socket,
        session: BackendSession,
        framer: CommandFramer,
        settings: RelaySettings,
        counters: Counters,
        trace: SessionTrace | None = None,
        sent_early: Line | None = None,
        client_waits: SocketWaits | None = None,
    ) -> None:
        self.client = client
        self.session = session
        self.framer = framer
        framer.max_line_bytes = POSTLOGIN_MAX_LINE_BYTES
        self.settings = settings
        self.counters = counters
        self.trace = trace
        self.state = RelayState(
            session,
            select_cache=settings.select_cache,
            reuse_after_enable=settings.reuse_after_enable,
        )
        self.scanner = self.state.scanner
        self.copier = Copier(
            session.sock,
            client,
            self.scanner,
            self._handle_events,
            session.reader.take_buffered(),
            waits=session.waits,
            timeout=settings.idle_timeout,
        )
        self.copier.trace = trace
        self.backend_gone: str | None = None
        self.farewell = b""  # what the client gets after the session is dealt with (LOGOUT)
        self.sent_early = sent_early  # the client's first command, sent with the reuse check
        self._pump: Pump | None = None  # in duplex mode
        # the wait for either side: the sockets' own read watchers, the client's idle timer
        self.client_waits = client_waits or SocketWaits(client)
        self._client_watch = self.client_waits.watcher
        self._backend_watch = session.waits.watcher
        self._idle_timer = self.client_waits.timer(settings.idle_timeout)
        # TLS: bytes decrypted but not yet read, which the descriptor's watcher cannot see
        self._tls_pending: Callable[[], int] | None = getattr(session.sock, "pending", None)
        self._client_pending: Callable[[], int] | None = getattr(client, "pending", None)
        self._selects = SelectRelay(self, settings.response_timeout)

    @property
    def client_alive(self) -> bool:
        return self.copier.client_alive

    @client_alive.setter
    def client_alive(self, alive: bool) -> None:
        self.copier.client_alive = alive

    # -- what the scanner finds in the backend's replies ----------------------------------------

    def _handle_events(self) -> None:
        self.state.backend_events(self.scanner.events)
        self.scanner.events.clear()

    # -- sequential mode: copying inline --------------------------------------------------------

    def _copy(
        self, done: Callable[[], bool], timeout: float | None = None, read_first: bool = False
    ) -> None:
        """Copy backend replies to the client until ``done()``, in this greenlet; a command's
        reply may take ``idle_timeout``, the proxy's own waits ``timeout``."""
        copier = self.copier
        if timeout is not None:
            copier.timeout = timeout
        try:
            copier.copy_until(done, read_first)
        except TimeoutError:
            raise _Desync("no reply from the server in time") from None
        except BackendGone as error:
            self._backend_lost(str(error))
            raise _Desync(str(error)) from None
        except DrainExceeded as error:
            raise _Desync(str(error)) from None
        finally:
            copier.timeout = self.settings.idle_timeout

    def _backend_lost(self, why: str) -> None:
        self.backend_gone = why
        if self.client_alive and self._at_boundary():
            self.client_alive = send_quietly(self.client, BACKEND_LOST_BYE)
        with contextlib.suppress(OSError):
            self.client.shutdown(socket.SHUT_RDWR)  # in duplex mode, wakes the client side

    def _at_boundary(self) -> bool:
        """What the client got of the server's replies ends at a response's end: a BYE now is a
        response of its own. In a line or a literal it would become part of it (a message
        stored with the BYE in its body): the client then sees only the connection close."""
        scanner = self.scanner
        return scanner.at_boundary and not scanner.literal_remaining

    # -- duplex mode: the pump greenlet (``duplex``) ---------------------------------------------

    def _go_duplex(self) -> None:
        self._pump = Pump(
            self.copier,
            self.state,
            self.settings.response_timeout,
            self._backend_lost,
            lambda: self.backend_gone,
        )
        self._pump.start()

    def _stop_pump(self) -> bool:
        pump, self._pump = self._pump, None
        return pump is not None and pump.stop()

    def _pump_dead(self) -> bool:
        return self._pump is None or self._pump.dead

    def _wait_until(self, condition: Callable[[], bool], timeout: float) -> bool:
        assert self._pump is not None
        return self._pump.wait_until(condition, timeout)

    # -- the client side ------------------------------------------------------------------------

    def run(self) -> Outcome:
        """Relay until the client logs out or goes; return what may become of the session."""
        try:
            return self._client_loop()
        except (_Desync, BackendFailure) as error:
            LOGGER.info("closing session: %s", why(error))
            self._close()
            if self.client_alive and not self.backend_gone and self._at_boundary():
                send_quietly(self.client, SESSION_FAILED_BYE)  # the detail is in the log
            return Outcome.CLOSED
        finally:
            self._close()

    def _client_loop(self) -> Outcome:
        self.client.settimeout(self.settings.idle_timeout)  # the wait of a send to it
        if self.sent_early is not None:  # sent behind the reuse check: one wait for both
            self._started_early(self.sent_early)  # outstanding before its reply is copied
            self.counters.backend_waited()
            self._copy(self.state.replies_done)
        else:
            self._copy(lambda: True)  # what the server sent after the login reply, if anything
        while True:
            outcome = self._process_client_events()
            if outcome is not None:
                return outcome
            try:
                data = self._receive_client()
            except TimeoutError:
                return self._client_timed_out()
            if self.backend_gone:
                return self._close()
            if data is not None:
                self.framer.receive_data(data)

    def _started_early(self, line: Line) -> None:
        """The first command, already sent with the reuse check: outstanding, as it was
        decided then (a SIGHUP since may have turned the SELECT cache on: it must not be
        answered, or sent, again)."""
        start = split_command_line(line.data)  # goes_with_the_check parsed it already
        if self.trace is not None:
            self.trace.client_command(line.data, start.tag, start.name)
        self.state.command_started(start)

    def _receive_client(self) -> bytes | None:
        """The client's next bytes (b"" at EOF); None when the backend spoke meanwhile.

        In sequential mode nothing reads the backend while the client is silent, so both are
        waited for: unsolicited news (or a BYE and EOF, the server going down) is forwarded at
        once, between two of the client's commands. Waiting first also spares the read that
        would only find nothing there yet.
        """
        if self._pump is not None:
            return self._recv_client()
        if self._tls_pending is not None and self._tls_pending():
            which = _BACKEND
        elif self._client_pending is not None and self._client_pending():
            which = _CLIENT
        else:
            which = self._wait_either()
        if which is _BACKEND:
            self._copy(self.state.idle, read_first=True)
            return None
        return self._recv_client()

    def _wait_either(self) -> str:
        """Wait until the client or the backend is readable, the client's idle time at most
        (``TimeoutError``). The watchers are the sockets' own, the timer the client's."""
        waiter: Waiter[str] = Waiter()
        started = (
            (self._client_watch, _CLIENT),
            (self._backend_watch, _BACKEND),
            (self._idle_timer, _TIMEOUT),
        )
        for watcher, which in started:
            watcher.start(waiter.switch, which)
        try:
            which = waiter.get()
        finally:
            for watcher, _ in started:
                watcher.stop()
        if which is _TIMEOUT:
            raise TimeoutError
        return which

    def _recv_client(self) -> bytes:
        try:
            return self.client_waits.recv(CLIENT_RECV_BYTES, self.settings.idle_timeout)
        except TimeoutError:
            raise
        except OSError:
            return b""

    def _process_client_events(self) -> Outcome | None:
        out: list[bytes] = []
        try:
            while (event := self.framer.next_event()) is not NEED_DATA:
                if isinstance(event, Line):
                    outcome = self._line(event, out)
                    if outcome is not None:
                        return outcome
                elif isinstance(event, LiteralData):
                    if self.trace is not None:
                        self.trace.client_literal(event.data)
                    out.append(event.data)
                elif event is AWAIT_CONTINUATION:
                    self._send_backend(out)
                    self._await_literal_go_ahead()
                elif isinstance(event, ClientClosed):
                    self._send_backend(out)
                    return self._client_vanished()
        except LineTooLong as error:
            self._send_backend(out)
            self.send_own(error.response())
            return self._client_vanished()
        except _ClientGone:
            return self._client_vanished()
        self._send_backend(out)
        # replies are awaited only at a command boundary (a literal still coming is the
        # backend's to wait for), and only if something is due
        if (self.state.outstanding or self._pump is not None) and not self.framer.mid_command:
            self._await_replies()
        return None

    def _await_replies(self) -> None:
        """Copy the replies to what was sent, switching between sequential and duplex mode."""
        if self._pump is not None:
            if not self.state.stays_duplex() and not self._stop_pump():
                raise _Desync(self.backend_gone or "server did not end the IDLE")
            return
        self.counters.backend_waited()
        self._copy(self.state.replies_done)
        if self.state.goes_duplex():
            self._go_duplex()  # IDLE (or NOTIFY) is on: the server speaks when it likes

    def _send_backend(self, out: list[bytes]) -> None:
        if out:
            try:
                send_all(
                    self.session.sock,
                    b"".join(out) if len(out) > 1 else out[0],
                    self.settings.idle_timeout,
                )
            except OSError as error:
                raise BackendFailure(FailureKind.LOST, f"write error: {error}") from None
            out.clear()

    def _line(self, line: Line, out: list[bytes]) -> Outcome | None:
        verdict = self.state.client_line(line, duplex=self._pump is not None)
        kind, start = verdict.kind, verdict.start
        if self.trace is not None:
            self._trace_line(line, verdict.kind, start)
        if start is None or kind is Kind.COMMAND:
            out.append(line.data)
            return None
        self._send_backend(out)
        if kind is Kind.LOGOUT:
            return self._logout(start.tag)
        if kind is Kind.COMPRESS:
            self.send_own(COMPRESS_REFUSAL % start.tag)
        elif not self._select(line, start):  # Kind.SELECT that the cache cannot take
            self.state.command_started(start)
            out.append(line.data)
        return None

    def _trace_line(self, line: Line, kind: Kind, start: CommandStart | None) -> None:
        trace = self.trace
        assert trace is not None
        if kind is Kind.PART:
            trace.client_continuation(line.data)
        elif kind is Kind.ANSWER:
            trace.client_response(line.data)
        else:
            trace.client_command(line.data, *((start.tag, start.name) if start else (None, None)))

    def _await_literal_go_ahead(self) -> None:
        """A synchronising literal: pass it once the backend sent "+", or drop it if refused."""
        state = self.state
        tag = state.last_tag()

        def answered() -> bool:
            return state.literal_answered(tag)

        if self._pump is None:
            self.counters.backend_waited()
            self._copy(answered, self.settings.response_timeout)
        elif not self._wait_until(answered, self.settings.response_timeout):
            raise _Desync("no reply to a literal")
        if state.take_continuation():
            self.framer.accept_literal()
        else:
            self.framer.reject_literal()

    def _select(self, line: Line, start: CommandStart) -> bool:
        try:
            return self._selects.select(line, start, bool(self.state.outstanding))
        except SelectTooBig as error:
            raise _Desync(str(error)) from None

    def send_own(self, data: bytes) -> None:
        """Send a response of the proxy's own, between two of the backend's."""
        if not self.client_alive:
            return
        if self.trace is not None:
            self.trace.server(data)
        pump = self._pump
        if pump is None or pump.dead:  # sequential: nothing else writes to the client
            self.client_alive = send_quietly(self.client, data)
            return

        def send() -> None:
            self.client_alive = send_quietly(self.client, data)

        if not pump.send_between(send, lambda: self.scanner.at_boundary):
            raise _Desync("backend never reached a response boundary")

    def next_client_event(self) -> FramerEvent:
        """The client's next framer event, read for a command the proxy takes whole."""
        while (event := self.framer.next_event()) is NEED_DATA:
            try:
                data = self.client.recv(CLIENT_RECV_BYTES)
            except OSError:
                data = b""
            self.framer.receive_data(data)
        if isinstance(event, ClientClosed):
            raise _ClientGone
        return event

    # -- endings --------------------------------------------------------------------------------

    def _settle(self) -> None:
        """Idle at a response boundary, every outstanding reply read: stop the pump, or read
        what is still due (the client may be gone: then it is drained)."""
        if self._pump is not None:
            if not self._stop_pump():
                raise _Desync(self.backend_gone or "backend did not complete outstanding commands")
        else:
            self._copy(self.state.idle, self.settings.response_timeout)
        if not self.state.in_sync:
            raise _Desync("the server's replies did not match the client's commands")
        if self.state.changed_by is not None:
            raise _Desync(f"{self.state.changed_by.decode()} changed the connection for good")

    def _resync(self) -> None:
        """Settle, and with the SELECT cache off leave the mailbox (without waiting)."""
        self._settle()
        if self.state.leaves_mailbox():
            try:
                self.session.leave_mailbox()
            except OSError as error:
                raise BackendFailure(FailureKind.LOST, f"write error: {error}") from None

    def _logout(self, tag: bytes) -> Outcome:
        """LOGOUT: the reply is left in ``farewell`` for the caller to send once the session is
        back in the cache, so that the client's next login can already reuse it."""
        self.farewell = LOGOUT_REPLY % tag
        try:
            self._resync()
        except (_Desync, BackendFailure) as error:
            LOGGER.info("session not reusable after LOGOUT: %s", why(error))
            return self._close()
        return Outcome.REUSABLE

    def _client_vanished(self) -> Outcome:
        """The client went mid-session: bring the backend session back in sync, or close it."""
        self.client_alive = False
        farewell = self.state.client_gone(in_literal=self.framer.in_literal)
        if not farewell.resync:
            return self._close()
        if farewell.send:
            self._send_backend([farewell.send])
        try:
            self._resync()
        except (_Desync, BackendFailure) as error:
            LOGGER.info("session dropped after client left: %s", why(error))
            return self._close()
        return Outcome.RESYNCED

    def _client_timed_out(self) -> Outcome:
        if self.state.idle_tag is None and not self.state.outstanding:
            self.send_own(IDLE_TIMEOUT_BYE)
        return self._client_vanished()

    def _close(self) -> Outcome:
        pump, self._pump = self._pump, None
        if pump is not None:
            pump.kill()
        return Outcome.CLOSED
