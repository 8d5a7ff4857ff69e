"""Backend connections: reaching the IMAP server and the control-plane talk on a session.

The gevent edge for the backend side. ``Backend`` knows where the server is (``server_hostname``,
``server_port``, ``ipversion_only``, ``dns_rr``) and how to connect (timeout, ``TCP_NODELAY``,
``send_tcp_keepalives``); it runs ``backend_login.login_dialogue`` over a new connection.
``BackendSession`` is one logged-in connection: it is handed to a client (the relay then reads
its socket directly) or parked in the connection cache, and offers the few commands the proxy
sends itself: the liveness check before reuse, the return to the authenticated state, LOGOUT.

Every wait is bounded (``server_connect_timeout``, ``server_response_timeout``); every failure
becomes a ``BackendFailure`` whose kind picks the client's reply.
"""

from __future__ import annotations

import itertools
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import gevent
from gevent import socket, ssl

from imapproxy.backend_login import (
    READ,
    START_TLS,
    BackendPolicy,
    LoginResult,
    Send,
    Steps,
    greeting,
    login_dialogue,
)
from imapproxy.config import Config
from imapproxy.credentials import Credentials
from imapproxy.errors import BackendFailure, BackendProtocolError, FailureKind
from imapproxy.forwarding import ClientOrigin, originating_ip
from imapproxy.log import host_port
from imapproxy.protocol.framing import NEED_DATA, parse_literal_marker
from imapproxy.protocol.response import Response, ResponseReader
from imapproxy.reuse_check import ReuseCheck
from imapproxy.select_cache import SelectEntry, check_commands, still_valid
from imapproxy.send import send_all
from imapproxy.tls_status import TLSHealth, TLSState
from imapproxy.waits import SocketWaits

_TAG_PREFIX = b"ipx" + secrets.token_hex(3).encode()  # drawn once per process
_tag_numbers = itertools.count(1)


def _new_tag() -> bytes:
    """A tag of the proxy's own: a random prefix no client guesses, and a counter."""
    return b"%s%d" % (_TAG_PREFIX, next(_tag_numbers))


RECV_BYTES = 65536
# A cached session gets this long to answer the NOOP before reuse; a healthy backend answers in
# well under a millisecond, and a client is waiting.
REUSE_CHECK_TIMEOUT_S = 5.0
# How long a SELECT cache check made at login holds for the page's SELECT, if the client sends
# nothing else in between (webmail sends its SELECT right after the login reply).
SELECT_CHECK_FRESH_S = 1.0
# A write of ours that the server has not taken in this long (its socket buffer full) fails.
SEND_TIMEOUT_S = 30.0
LOGOUT_TIMEOUT_S = 5.0  # how long a LOGOUT to an expiring session may take before we just close

Address = tuple[Any, ...]


class HealthReport(Protocol):
    """Where a ``Backend`` reports how its addresses fare (``router.ServerHealth``)."""

    def usable(self, address: Address) -> bool: ...

    def failed(self, backend: Backend, address: Address, reason: str) -> None: ...

    def succeeded(self, backend: Backend, address: Address) -> None: ...


# Failures that say the server is not serving (counted towards marking it down); a refused
# password or a TLS set-up problem say nothing of its health.
HEALTH_FAILURES = frozenset({FailureKind.CONNECT, FailureKind.TIMEOUT, FailureKind.PROTOCOL})


@dataclass
class ServerTraits:
    """What the proxy learns about the server's habits from its replies (shared by sessions)."""

    closed_line: bytes | None = None  # "* OK [CLOSED] ..." on SELECT over a selected mailbox


class BackendSession:
    """A logged-in connection to the backend."""

    __slots__ = (
        "select_entry",
        "select_checked_at",
        "pending",
        "traits",
        "sock",
        "sd",
        "address",
        "reader",
        "login",
        "username",
        "created_at",
        "selected",
        "check",
        "check_tags",
        "check_send_error",
        "news",
        "check_sent_at",
        "check_sent_monotonic",
        "origin_ip",
        "server",
        "waits",
    )

    def __init__(self, sock: socket.socket, address: Address, login: LoginResult) -> None:
        self.sock = sock
        self.sd = sock.fileno()  # the number up-imapproxy's logs call "sd"
        self.address = address
        self.reader = ResponseReader()
        self.login = login
        self.username = b""
        self.created_at = time.monotonic()
        self.selected = False  # a mailbox is selected (tracked by the relay)
        self.select_entry: SelectEntry | None = None  # the SELECT cache's entry
        self.select_checked_at: float | None = None  # when the entry was last found valid
        self.pending: dict[bytes, bytes] = {}  # tag -> command sent without waiting for it
        self.traits = ServerTraits()
        self.check: ReuseCheck | None = None  # a reuse check sent, its replies not yet read
        self.check_tags: list[bytes] = []
        self.check_send_error: OSError | None = None  # the check could not be sent: gone
        self.news: list[Response] = []  # untagged replies that came while cached
        self.check_sent_at = 0.0  # time.perf_counter() when the reuse check left
        self.check_sent_monotonic = 0.0
        self.origin_ip: str | None = None  # the client address the server was told at login
        self.server = ""  # "host:port" of the server (XPROXY_DUMPICC, the trace)
        self.waits = SocketWaits(sock)  # its reads with a time limit (the relay's, the check's)

    def has_capability(self, name: bytes) -> bool | None:
        """True/False when the post-login capabilities are known, None when they are not."""
        return name.upper() in self.login.capability_set if self.login.capabilities else None

    # -- control-plane I/O ----------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        send_all(self.sock, data, SEND_TIMEOUT_S)

    def read_response(self, deadline: float | None = None) -> Response:
        """The next response; by ``deadline`` (``time.monotonic``) if given, else within an
        outer ``_Deadline``."""
        while True:
            response = self.reader.next_response()
            if response is not NEED_DATA:
                assert isinstance(response, Response)
                return response
            if deadline is None:
                data = self.sock.recv(RECV_BYTES)
            else:
                left = max(deadline - time.monotonic(), 0.001)
                data = self.waits.recv(RECV_BYTES, left, once=True)
            self.reader.receive_data(data)

    def command(self, line: bytes, timeout: float) -> tuple[list[Response], Response]:
        """Send ``line`` (without tag and CRLF) under a fresh tag; return untagged and tagged."""
        untagged, (done,) = self.pipeline([line], timeout)
        return untagged, done

    def pipeline(self, lines: list[bytes], timeout: float) -> tuple[list[Response], list[Response]]:
        """Send several commands in one write; return all untagged replies and the tagged ones
        in the order of ``lines`` (servers may complete pipelined commands out of order)."""
        with _Deadline(timeout, "no reply to " + lines[0].split(b" ", 1)[0].decode()):
            tags = self._send_tagged(lines)
            untagged, done = self._read_tagged(set(tags))
            return untagged, [done[tag] for tag in tags]

    def _send_tagged(self, lines: tuple[bytes, ...] | list[bytes]) -> list[bytes]:
        """Send commands (without tags) in one write under fresh tags; return the tags."""
        tags = [_new_tag() for _ in lines]
        self.send(b"".join(t + b" " + line + b"\r\n" for t, line in zip(tags, lines, strict=True)))
        return tags

    def _read_tagged(
        self, tags: set[bytes], deadline: float | None = None
    ) -> tuple[list[Response], dict[bytes, Response]]:
        """Read until every tag in ``tags`` completed (by ``deadline``, if given); return
        untagged replies and completions.

        An untagged BYE, or a completion for a tag we did not send, is a failure.
        """
        untagged: list[Response] = []
        done: dict[bytes, Response] = {}
        while len(done) < len(tags):
            response = self.read_response(deadline)
            if response.tag in tags:
                done[response.tag] = response
            elif response.tag in self.pending:
                self._pending_done(response)
            elif response.tag == b"*":
                if response.word == b"BYE":
                    raise BackendFailure(FailureKind.PROTOCOL, "server said BYE")
                untagged.append(response)
            elif response.tag != b"+":
                raise BackendFailure(FailureKind.PROTOCOL, "reply to a command not sent")
        return untagged, done

    def relay_command(
        self, pieces: list[bytes], literals: list[bytes], tag: bytes, timeout: float
    ) -> tuple[list[Response], Response]:
        """Send a client's command (its lines, each but the last announcing one of ``literals``)
        waiting for "+" before each literal; return untagged replies and the completion."""
        with _Deadline(timeout, "no reply to a relayed command"):
            for piece, literal in zip(pieces, literals, strict=False):  # one piece more
                self.send(piece)
                spec = parse_literal_marker(piece)
                if spec is not None and spec.synchronizing:
                    response = self.read_response()
                    if response.tag == tag:
                        return [], response  # the literal was refused
                    if response.tag != b"+":
                        raise BackendFailure(FailureKind.PROTOCOL, "no continuation for literal")
                self.send(literal)
            self.send(pieces[-1])
            untagged, done = self._read_tagged({tag})
            return untagged, done[tag]

    def read_waiting(self) -> None:
        """Read, without waiting, what the server sent while the session sat in the cache.

        A BYE or the end of the connection (the server logged it out, its process was
        killed) makes it dead (``BackendFailure``) before the client is told of a reuse;
        completions of commands sent without waiting are checked; untagged news is kept for
        the reuse check, which judges it.
        """
        self._receive_arrived()
        try:
            while (response := self.reader.next_response()) is not NEED_DATA:
                assert isinstance(response, Response)
                self._waiting_response(response)
        except BackendProtocolError as error:
            raise BackendFailure(FailureKind.PROTOCOL, str(error)) from None

    def _receive_arrived(self) -> None:
        """Take into the reader what has arrived, without waiting."""
        while (data := self.waits.recv_now(RECV_BYTES)) is not None:
            if not data:
                raise BackendFailure(FailureKind.LOST, "connection closed by server")
            self.reader.receive_data(data)
            if len(data) < RECV_BYTES:  # all there was: no read to find nothing
                return

    def _waiting_response(self, response: Response) -> None:
        if response.tag in self.pending:
            self._pending_done(response)
        elif response.tag != b"*":
            raise BackendFailure(FailureKind.PROTOCOL, "reply to a command not sent")
        elif response.word == b"BYE":
            raise BackendFailure(FailureKind.PROTOCOL, "server said BYE while cached")
        else:
            self.news.append(response)

    def start_check(self, client_id_args: bytes | None, *, answered: bool = True) -> None:
        """Before reuse: send the liveness check (``reuse_check``) without waiting for it,
        once: called before the client's answer (``answered`` false) and after it.

        A check that validates a SELECT cache entry goes before the answer: STATUS and
        SEARCH take the server longer than the client takes to send its SELECT. A bare NOOP
        goes after it: it is back before the client's command, and sent first, the server's
        wake-up could delay the client's answer.

        Its replies are read by ``finish_check``, before anything else is sent or read on
        this session; a session found gone here fails there.
        """
        entry = self.select_entry if self.selected else None
        if self.check is not None or (entry is None and not answered):
            return
        esearch = self.has_capability(b"ESEARCH") is True
        self.check = check = ReuseCheck(entry, client_id_args, esearch=esearch)
        try:
            self.check_tags = self._send_tagged(check.lines)
        except OSError as error:
            self.check_send_error = error
        self.check_sent_at = time.perf_counter()
        self.check_sent_monotonic = time.monotonic()  # the clock of select_checked_at

    def finish_check(self) -> bool:
        """Read the check's replies; ``BackendFailure`` if the session is dead or out of sync.
        True if they had not come in yet (the client waited for them after all).

        With a SELECT cache entry that still holds, the page's SELECT, coming next, is
        answered at once (``select_checked_at``, stamped with the time the check was sent:
        what the replies say is as old as that); an entry that no longer holds is dropped, and
        so is the stamp when anything follows the check's completions (news after the check).
        """
        check, tags = self.check, self.check_tags
        assert check is not None
        self.check, self.check_tags = None, []
        if (unsent := self.check_send_error) is not None:
            self.check_send_error = None
            raise exchange_failure(unsent, FailureKind.LOST)
        loop = gevent.get_hub().loop
        started = loop.now()  # the loop's clock moves only if this greenlet waits
        try:
            untagged, done = self._read_tagged(set(tags), time.monotonic() + REUSE_CHECK_TIMEOUT_S)
        except TimeoutError:
            raise BackendFailure(FailureKind.TIMEOUT, "no reply to the liveness check") from None
        except (OSError, BackendProtocolError) as error:
            raise exchange_failure(error, FailureKind.LOST) from None
        waited = loop.now() != started
        untagged, self.news = self.news + untagged, []
        verdict = check.verdict(untagged, [done[tag] for tag in tags])
        if verdict.drop_entry:
            self.select_entry = None
        if not verdict.alive:
            raise BackendFailure(FailureKind.PROTOCOL, verdict.reason)
        if verdict.entry_holds and not self.reader.has_buffered():
            self.select_checked_at = self.check_sent_monotonic
        return waited

    def _entry_check(self, entry: SelectEntry) -> list[bytes]:
        return list(check_commands(entry.mailbox, esearch=self.has_capability(b"ESEARCH") is True))

    def select_checked_just_now(self, now: float) -> bool:
        """Whether the SELECT cache entry was found valid at login, just now, with nothing
        sent since; true once (the check is used up)."""
        checked, self.select_checked_at = self.select_checked_at, None
        return checked is not None and now - checked < SELECT_CHECK_FRESH_S

    def select_entry_holds(self, entry: SelectEntry, timeout: float) -> bool:
        """Whether a fresh SELECT would still give ``entry``'s reply, asked of the server now."""
        untagged, done = self.pipeline(self._entry_check(entry), timeout)
        return all(d.word == b"OK" for d in done) and still_valid(entry, untagged)

    def leave_mailbox(self) -> None:
        """Back to the authenticated state: UNSELECT (RFC 3691), else EXAMINE of no mailbox.

        Sent without waiting: the client leaving need not wait for it. Its completion is read,
        and checked, by whatever the proxy sends next on this session (the reuse check, or
        LOGOUT); until then its tag is ``pending``.
        """
        # without UNSELECT: EXAMINE "" fails, and a failed EXAMINE deselects (RFC 9051 §6.3.2)
        line = b'EXAMINE ""' if self.has_capability(b"UNSELECT") is False else b"UNSELECT"
        tag = _new_tag()
        self.send(tag + b" " + line + b"\r\n")
        self.pending[tag] = line
        self.selected = False

    def _pending_done(self, response: Response) -> None:
        """A command sent without waiting completed: UNSELECT must have worked, and a failed
        EXAMINE "" deselected anyway."""
        line = self.pending.pop(response.tag)
        if line == b"UNSELECT" and response.word != b"OK":
            raise BackendFailure(FailureKind.PROTOCOL, "UNSELECT failed: session left selected")

    def logout(self) -> None:
        """LOGOUT and close, within ``LOGOUT_TIMEOUT_S``; errors only mean it was already gone."""
        try:
            self.command(b"LOGOUT", LOGOUT_TIMEOUT_S)
        except (OSError, BackendFailure, BackendProtocolError):
            pass
        finally:
            self.close()

    def close(self) -> None:
        self.waits.close()
        self.sock.close()


class _Deadline(gevent.Timeout):
    """A deadline for one backend exchange that ends as ``BackendFailure(TIMEOUT)``; a broken
    connection is ``lost`` (``CONNECT`` while logging in, ``LOST`` on a logged-in session)."""

    def __init__(self, seconds: float, what: str, lost: FailureKind = FailureKind.LOST) -> None:
        super().__init__(seconds)
        self.what, self.lost = what, lost

    def __exit__(self, typ: Any, value: Any, tb: Any) -> None:
        self.close()
        if value is self:
            raise BackendFailure(FailureKind.TIMEOUT, self.what) from None
        if isinstance(value, (OSError, BackendProtocolError)):
            raise exchange_failure(value, self.lost) from None


def exchange_failure(error: OSError | BackendProtocolError, lost: FailureKind) -> BackendFailure:
    """What a failed exchange with the server is: TLS, a protocol error, or the connection
    ``lost`` (``CONNECT`` while logging in, ``LOST`` on a logged-in session)."""
    if isinstance(error, ssl.SSLError):
        return BackendFailure(FailureKind.TLS, f"TLS error: {error}")
    if isinstance(error, BackendProtocolError):
        return BackendFailure(FailureKind.PROTOCOL, str(error))
    return BackendFailure(lost, f"connection lost: {error}")


def policy_from_config(config: Config, tls_available: bool = False) -> BackendPolicy:
    """The login policy the configuration asks for (auth_sasl_*, preauth_command, force_tls)."""
    static = None
    if config.auth_sasl_plain_username and config.auth_sasl_plain_password:
        static = (_raw(config.auth_sasl_plain_username), _raw(config.auth_sasl_plain_password))
    return BackendPolicy(
        force_tls=config.force_tls,
        tls_available=tls_available,
        preauth_command=_raw(config.preauth_command) if config.preauth_command else None,
        sasl_plain=config.auth_sasl_mech == "plain",
        static_identity=static,
        shared_secret=_raw(config.auth_shared_secret) if config.auth_shared_secret else None,
        forward_client_address=config.forward_client_address,
    )


def _raw(value: str) -> bytes:
    """A setting's bytes as the file has them (it is read with ``surrogateescape``): a strict
    encode would fail on non-UTF-8 bytes, and its message would show one of a secret's."""
    return value.encode("utf-8", "surrogateescape")


class Backend:
    """The IMAP server behind the proxy."""

    def __init__(self, config: Config, tls_context: ssl.SSLContext | None = None) -> None:
        self.config = config
        self.policy = policy_from_config(config, tls_context is not None)
        self.tls_context = tls_context
        self.addresses: list[Address] = []
        self._rotation = itertools.count()
        self.traits = ServerTraits()
        self.health: HealthReport | None = None  # set by the router
        self.tls_health = TLSHealth()
        self.on_tls_change: Callable[[TLSState], None] = lambda state: None

    def _tls_outcome(self, change: TLSState | None) -> None:
        if change is not None:
            self.on_tls_change(change)

    def reconfigure(self, config: Config, tls_context: ssl.SSLContext | None) -> None:
        """New settings and TLS context for connections made from now on."""
        self.config, self.tls_context = config, tls_context
        self.policy = policy_from_config(config, tls_context is not None)

    @property
    def name(self) -> str:
        return host_port(self.config.server_hostname, self.config.server_port)

    def resolve(self) -> list[Address]:
        family = {4: socket.AF_INET, 6: socket.AF_INET6}.get(
            self.config.ipversion_only or 0, socket.AF_UNSPEC
        )
        try:
            infos = socket.getaddrinfo(
                self.config.server_hostname, self.config.server_port, family, socket.SOCK_STREAM
            )
        except OSError as error:
            raise BackendFailure(
                FailureKind.CONNECT, f"cannot resolve {self.name}: {error}"
            ) from None
        self.addresses = [info[4] for info in infos]
        return self.addresses

    def _ordered_addresses(self) -> list[Address]:
        """All addresses to try, starting at the next one in turn when ``dns_rr`` is on."""
        addresses = self.addresses or self.resolve()
        if not self.config.dns_rr or len(addresses) < 2:
            return addresses
        start = next(self._rotation) % len(addresses)
        return addresses[start:] + addresses[:start]

    def connect(self) -> tuple[socket.socket, Address]:
        """A TCP connection to the first address that answers (each tried once)."""
        last_error: OSError | None = None
        addresses = self._ordered_addresses()
        health = self.health
        usable = [a for a in addresses if health.usable(a)] if health else addresses
        for address in usable:
            try:
                return self._connect_to(address), address
            except OSError as error:
                last_error = error
                if health is not None:
                    health.failed(self, address, f"connect: {error}")
        if not usable:  # fail fast: the health record says it is down, a probe watches it
            raise BackendFailure(FailureKind.CONNECT, f"{self.name} is marked down")
        self.addresses = []  # resolve again next time: the names may have moved
        raise BackendFailure(FailureKind.CONNECT, f"cannot connect to {self.name}: {last_error}")

    def _connect_to(self, address: Address) -> socket.socket:
        family = socket.AF_INET6 if len(address) == 4 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.config.server_connect_timeout)
            sock.connect(address)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.config.send_tcp_keepalives:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            if self.config.server_tls:  # port 993: TLS before the greeting
                sock = self._handshake(sock)
            sock.settimeout(None)
        except BaseException:
            sock.close()
            raise
        return sock

    def _handshake(self, sock: socket.socket) -> socket.socket:
        """TLS client handshake; the host name is sent as SNI and checked if verifying."""
        if self.tls_context is None:
            raise BackendFailure(FailureKind.TLS, "TLS is not configured")
        try:
            tls_sock = self.tls_context.wrap_socket(
                sock, server_hostname=self.config.server_hostname
            )
        except ssl.SSLError as error:
            self._tls_outcome(self.tls_health.failed(str(error), int(time.time())))
            raise BackendFailure(FailureKind.TLS, f"TLS with {self.name} failed: {error}") from None
        self._tls_outcome(self.tls_health.succeeded(int(time.time())))
        return tls_sock

    def open_session(
        self,
        credentials: Credentials,
        client_id: tuple[bytes | None, ...] | None,
        origin: ClientOrigin | None = None,
    ) -> BackendSession:
        """Connect and log in (telling the server the client's address, ``origin``, when
        forwarding); the session's ``login`` holds what the backend said."""
        sock, address = self.connect()
        reader = ResponseReader()
        try:
            with _Deadline(
                self.config.server_response_timeout, "login took too long", FailureKind.CONNECT
            ):
                sock, result = self._run(
                    login_dialogue(credentials, self.policy, client_id, origin), sock, reader
                )
        except BaseException as error:
            sock.close()
            self._report(address, error)
            raise
        self._report(address, None)
        session = BackendSession(sock, address, result)
        session.server = self.name
        session.reader = reader  # anything the backend sent after its login reply
        session.username = credentials.username
        session.traits = self.traits
        if origin is not None:
            session.origin_ip = originating_ip(origin, client_id)
        return session

    def _report(self, address: Address, error: BaseException | None) -> None:
        """Tell the health record how a login dialogue went (the server answered, or not)."""
        if self.health is None:
            return
        if error is None or (
            isinstance(error, BackendFailure) and error.kind is FailureKind.AUTH_REJECTED
        ):
            self.health.succeeded(self, address)
        elif isinstance(error, BackendFailure) and error.kind in HEALTH_FAILURES:
            self.health.failed(self, address, error.detail)

    def probe(self, address: Address | None = None) -> LoginResult:
        """Connect (to ``address``, else the first that answers), read greeting and
        capabilities, LOGOUT (start-up and health checks)."""

        def dialogue() -> Steps[LoginResult]:
            text, caps = yield from greeting(self.policy)
            yield Send(b"Z0001 LOGOUT\r\n")
            return LoginResult(text, caps, b"", (), ())

        if address is None:
            sock, _ = self.connect()
        else:
            try:
                sock = self._connect_to(address)
            except OSError as error:
                raise BackendFailure(FailureKind.CONNECT, f"connect: {error}") from None
        try:
            with _Deadline(self.config.server_response_timeout, "no greeting", FailureKind.CONNECT):
                return self._run(dialogue(), sock, ResponseReader())[1]
        finally:
            sock.close()

    def _run(
        self, dialogue: Steps[LoginResult], sock: socket.socket, reader: ResponseReader
    ) -> tuple[socket.socket, LoginResult]:
        """Drive a sans-I/O dialogue over ``sock`` (which STARTTLS may replace)."""
        value: Response | None = None
        plain = sock
        try:
            while True:
                try:
                    step = dialogue.send(value)
                except BackendFailure as failure:  # the dialogue's own: STARTTLS not possible
                    if failure.kind is FailureKind.TLS:
                        self._tls_outcome(self.tls_health.failed(failure.detail, int(time.time())))
                    raise
                value = None
                if step is READ:
                    while (response := reader.next_response()) is NEED_DATA:
                        reader.receive_data(sock.recv(RECV_BYTES))
                    value = response  # type: ignore[assignment]
                elif isinstance(step, Send):
                    send_all(sock, step.data)
                elif step is START_TLS:
                    sock = self._start_tls(sock, reader)
        except StopIteration as done:
            return sock, done.value
        except BaseException:
            if sock is not plain:  # STARTTLS's socket: the caller closes only the plain one
                sock.close()  # (detached), and the traceback would keep this one open
            raise

    def _start_tls(self, sock: socket.socket, reader: ResponseReader) -> socket.socket:
        if reader.take_buffered():  # RFC 9051 §6.2.1: nothing may follow the STARTTLS reply
            raise BackendFailure(FailureKind.TLS, "data after STARTTLS reply")
        return self._handshake(sock)
